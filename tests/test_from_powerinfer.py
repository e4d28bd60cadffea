"""`bin/prepare --from_powerinfer`: a bundle from the reference system's own files (model_<layer>.pt
predictors, activation/activation_<layer>.pt counts, config.json sparse_threshold), written here with
torch.save in that format for the bundled model; wrong formats are one-line errors (exit 2)."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import powerinfer_jax as pij
from absl import flags
from offline import powerinfer_import, profiler
from powerinfer_jax import cli
from powerinfer_jax.bundle import load_bundle
from powerinfer_jax.sparse_ffn import predict_logits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(REPO, "models", "shakespeare-relu-llama")
D, N_FF, LAYERS, RANK = 384, 1536, 6, 48  # the bundled model's config.json; the predictor width is ours
BUDGET = "40MiB"


class ReluMLP(torch.nn.Module):
    """The reference's predictor module (convert-hf-to-powerinfer-gguf.py): fc2(relu(fc1 x)), no biases."""

    def __init__(self, d: int, r: int, n: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, r, bias=False)
        self.relu = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(r, n, bias=False)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


def write_reference(folder, dtype=torch.float32, activation=True, seed=0):
    """A reference folder for the bundled model: the torch modules and the counts written into it."""
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    mlps, counts = [], []
    for l in range(LAYERS):
        mlp = ReluMLP(D, RANK, N_FF).to(dtype).eval()
        torch.save(mlp.state_dict(), os.path.join(folder, f"model_{l}.pt"))
        mlps.append(mlp)
        c = (5000 / (1 + torch.randperm(N_FF))).floor().to(torch.int64)  # a power law over a random order
        counts.append(c)
        if activation:
            os.makedirs(os.path.join(folder, "activation"), exist_ok=True)
            torch.save(c, os.path.join(folder, "activation", f"activation_{l}.pt"))
    return mlps, torch.stack(counts).numpy()


@pytest.fixture(scope="module")
def prepare_main():
    """bin/prepare's main; its flags are removed afterwards (absl flags are global to the process)."""
    before = set(flags.FLAGS)
    loader = importlib.machinery.SourceFileLoader("bin_prepare_from_powerinfer", os.path.join(REPO, "bin", "prepare"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    yield module.main
    flags.FLAGS.unparse_flags()
    for name in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("ref") / "ReluLLaMA-Predictor")
    mlps, counts = write_reference(folder)
    return folder, mlps, counts


@pytest.fixture(scope="module")
def imported(prepare_main, reference, tmp_path_factory):
    folder, _, _ = reference
    out = str(tmp_path_factory.mktemp("bundle") / "b")
    rc = cli.invoke(prepare_main, ["prepare", f"--model={MODEL}", f"--from_powerinfer={folder}", f"--out={out}",
                                   f"--budget={BUDGET}", "--nowrite_weights"])
    assert rc == 0
    return out


def _torch_logits(mlp, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return mlp.float()(torch.from_numpy(x)).numpy()


def test_bundle_holds_the_reference_predictors_and_counts(imported, reference):
    folder, mlps, counts = reference
    b = load_bundle(imported)
    assert b.counts.shape == (LAYERS, N_FF) and (b.counts == counts).all()
    assert b.tokens == int(counts.max())  # the files do not record it: the smallest total they allow
    assert list(b.predictors.thresholds) == [0.0] * LAYERS and b.predictors.ranks == [RANK] * LAYERS
    x = np.random.default_rng(1).standard_normal((32, D)).astype(np.float32) * 3
    for lp, mlp in zip(b.predictors.layers, mlps):
        np.testing.assert_allclose(np.asarray(predict_logits(lp.params, jnp.asarray(x))), _torch_logits(mlp, x),
                                   atol=1e-5, rtol=0)
    source = b.manifest["source"]
    assert source["kind"] == "from_powerinfer" and source["activation"] == "files" and source["tokens_estimated"]
    for name in [f"model_{l}.pt" for l in range(LAYERS)] + [f"activation/activation_{l}.pt" for l in range(LAYERS)]:
        with open(os.path.join(folder, name), "rb") as f:
            assert source["files"][name] == hashlib.sha256(f.read()).hexdigest()
    assert b.manifest["current_placement"] in b.manifest["placements"]
    assert not os.path.isdir(os.path.join(imported, "profile", "samples"))


def test_imported_bundle_generates_with_the_predictors_it_was_given(imported, reference):
    _, mlps, _ = reference
    eng = pij.load(imported, sparsity="predicted", device_memory_budget=BUDGET, dtype="float32")
    res = eng.generate("ROMEO:", max_new_tokens=6, temperature=0.0)
    assert 1 <= len(res.token_ids) <= 6 and res.text
    x = np.random.default_rng(2).standard_normal((4, D)).astype(np.float32)
    for layer, mlp in zip(eng.params.layers, mlps):  # the engine's own predictor, outputs in (hot, cold) order
        ffn = layer.ffn
        order = np.concatenate([np.asarray(ffn.hot_ids), np.asarray(ffn.cold_ids)])
        logits = np.empty((4, N_FF), np.float32)
        logits[:, order] = np.asarray(predict_logits(ffn.predictor, jnp.asarray(x)))
        np.testing.assert_allclose(logits, _torch_logits(mlp, x), atol=1e-5, rtol=0)


def test_another_budget_reuses_the_import(prepare_main, imported, reference, capsys):
    folder, _, _ = reference
    capsys.readouterr()
    rc = cli.invoke(prepare_main, ["prepare", f"--model={MODEL}", f"--from_powerinfer={folder}", f"--out={imported}",
                                   "--budget=60MiB", "--nowrite_weights"])
    out = capsys.readouterr().out
    assert rc == 0 and "from_powerinfer: up to date, re-used" in out
    assert len(load_bundle(imported).manifest["placements"]) == 2


def test_float16_files_and_the_config_threshold(tmp_path):
    folder = str(tmp_path / "ref")
    mlps, _ = write_reference(folder, dtype=torch.float16, seed=3)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"sparse_threshold": 0.25}, f)
    logs = []
    m = powerinfer_import.prepare_from_powerinfer(MODEL, folder, None, str(tmp_path / "b"), log=logs.append)
    assert m["source"]["threshold"] == 0.25 and m["source"]["threshold_from"] == "config.json"
    b = load_bundle(str(tmp_path / "b"))
    assert b.predictors.dtype == "float16" and list(b.predictors.thresholds) == [0.25] * LAYERS
    x = np.random.default_rng(4).standard_normal((8, D)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(predict_logits(b.predictors.layers[2].params, jnp.asarray(x))),
                               _torch_logits(mlps[2], x), atol=1e-5, rtol=0)


def test_without_activation_files_the_corpus_is_profiled(tmp_path):
    folder = str(tmp_path / "ref")
    write_reference(folder, activation=False)
    logs = []
    settings = profiler.ProfileSettings(window=64, batch=8, max_tokens=1024, min_tokens=512)
    m = powerinfer_import.prepare_from_powerinfer(MODEL, folder, None, str(tmp_path / "b"), profile_settings=settings,
                                                  log=logs.append)
    assert any("profiling the corpus" in line for line in logs)
    assert m["source"]["activation"] == "profiled" and m["profile_settings"]["max_samples"] == 0
    b = load_bundle(str(tmp_path / "b"))
    assert b.tokens == 1024 and b.counts.shape == (LAYERS, N_FF) and b.counts.sum() > 0
    assert not os.path.isdir(str(tmp_path / "b" / "profile" / "samples"))


def _save(path, obj):
    torch.save(obj, path)


def _state(fc1=(RANK, D), fc2=(N_FF, RANK), dtype=torch.float32):
    return {"fc1.weight": torch.zeros(fc1, dtype=dtype), "fc2.weight": torch.zeros(fc2, dtype=dtype)}


BAD = {  # name: (how to spoil a good folder, a fragment of the expected error line)
    "missing layer file": (lambda f: os.remove(f"{f}/model_3.pt"), "model_3.pt is missing"),
    "extra layer file": (lambda f: shutil.copy(f"{f}/model_0.pt", f"{f}/model_6.pt"), "the model has 6 layers"),
    "wrong key names": (lambda f: _save(f"{f}/model_1.pt", {"w1": torch.zeros(RANK, D), "w2": torch.zeros(N_FF, RANK)}),
                        "PowerInfer predictors have exactly"),
    "extra bias key": (lambda f: _save(f"{f}/model_1.pt", {**_state(), "fc1.bias": torch.zeros(RANK)}),
                       "PowerInfer predictors have exactly"),
    "fc1 for another hidden size": (lambda f: _save(f"{f}/model_2.pt", _state(fc1=(RANK, D + 1))), "hidden_size"),
    "fc2 for another n_ff": (lambda f: _save(f"{f}/model_2.pt", _state(fc2=(N_FF // 2, RANK))), "intermediate_size"),
    "ranks disagree": (lambda f: _save(f"{f}/model_2.pt", _state(fc2=(N_FF, RANK + 1))), "fc1's rank"),
    "integer weights": (lambda f: _save(f"{f}/model_4.pt", _state(dtype=torch.int32)), "floating point"),
    "NaN weights": (lambda f: _save(f"{f}/model_4.pt", {**_state(), "fc1.weight": torch.full((RANK, D), float("nan"))}),
                    "NaN or Inf"),
    "not a state dict": (lambda f: _save(f"{f}/model_0.pt", torch.zeros(3)), "not a state dict"),
    "garbage .pt file": (lambda f: open(f"{f}/model_5.pt", "w").write("not a torch file\n"),
                         "is not a readable torch file"),
    "Git LFS pointer": (lambda f: open(f"{f}/model_5.pt", "w").write(
        "version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 12\n"), "Git LFS pointer"),
    "stray .pt file": (lambda f: _save(f"{f}/predictor.pt", _state()), "unexpected file predictor.pt"),
    "no predictors at all": (lambda f: [os.remove(f"{f}/model_{l}.pt") for l in range(LAYERS)],
                             "not a PowerInfer predictor folder"),
    "counts of another length": (lambda f: _save(f"{f}/activation/activation_1.pt", torch.ones(N_FF + 1)),
                                 "one count per FFN neuron"),
    "negative counts": (lambda f: _save(f"{f}/activation/activation_1.pt", -torch.ones(N_FF)), "negative"),
    "boolean counts": (lambda f: _save(f"{f}/activation/activation_1.pt", torch.ones(N_FF, dtype=torch.bool)),
                       "integers or floats"),
    "a missing count file": (lambda f: os.remove(f"{f}/activation/activation_5.pt"), "activation_5.pt is missing"),
    "counts in two places": (lambda f: [shutil.copy(f"{f}/activation/activation_{l}.pt", f) for l in range(LAYERS)],
                             "keep one set"),
    "bad threshold": (lambda f: open(f"{f}/config.json", "w").write('{"sparse_threshold": "high"}'),
                      "sparse_threshold must be a finite number"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_folder_in_the_wrong_format_is_one_error_line(prepare_main, reference, tmp_path, capsys, case):
    spoil, fragment = BAD[case]
    folder = str(tmp_path / "ref")
    shutil.copytree(reference[0], folder)
    spoil(folder)
    out = str(tmp_path / "out")
    capsys.readouterr()
    rc = cli.invoke(prepare_main, ["prepare", f"--model={MODEL}", f"--from_powerinfer={folder}", f"--out={out}",
                                   "--nowrite_weights"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and fragment in err, err
    assert not os.path.exists(out)  # refused before anything is written


@pytest.mark.parametrize("argv,fragment", [
    (["--from_powerinfer=/nonexistent/pi"], "PowerInfer folder not found"),
    (["--from_powerinfer=" + MODEL + "/config.json"], "is a file"),
    (["--from_powerinfer=" + MODEL], "not a PowerInfer predictor folder"),
    (["--target_recall=0.9"], "--from_powerinfer replaces"),
])
def test_bad_flags_are_one_error_line(prepare_main, reference, tmp_path, capsys, argv, fragment):
    if not any(a.startswith("--from_powerinfer") for a in argv):
        argv = [f"--from_powerinfer={reference[0]}", *argv]
    capsys.readouterr()
    rc = cli.invoke(prepare_main, ["prepare", f"--model={MODEL}", f"--out={tmp_path / 'out'}", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and fragment in err, err


def test_rates_and_a_known_token_total(tmp_path):
    folder = str(tmp_path / "ref")
    write_reference(folder)
    for l in range(LAYERS):  # firing rates instead of counts: read as rates (a total of one token)
        torch.save(torch.rand(N_FF, dtype=torch.float64), os.path.join(folder, "activation", f"activation_{l}.pt"))
    files = powerinfer_import.find_files(folder, LAYERS)
    counts, tokens = powerinfer_import.read_counts(files, N_FF)
    assert tokens == 1 and counts.dtype == np.float64 and counts.max() <= 1
    _, counts_at = write_reference(folder)
    counts, tokens = powerinfer_import.read_counts(powerinfer_import.find_files(folder, LAYERS), N_FF, tokens=100_000)
    assert tokens == 100_000 and (counts == counts_at).all() and counts.dtype == np.int64
    with pytest.raises(powerinfer_import.PowerInferFilesError, match="fires at most once a token"):
        powerinfer_import.read_counts(files, N_FF, tokens=10)


def test_missing_torch_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(powerinfer_import.PowerInferFilesError, match="pip install torch"):
        powerinfer_import._torch()

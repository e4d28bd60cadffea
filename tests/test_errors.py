"""The cases of issue #14 one by one: NaN weights, long prompts, moved bundles, the error hierarchy and
the CLI's one-line errors, exit codes and traceback switch (the fuzz suite covers the rest at random)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import powerinfer_jax as pij
from powerinfer_jax import cli, errors, tensor_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(REPO, "models", "shakespeare-relu-llama")
BUNDLE = os.path.join(REPO, "models", "shakespeare-relu-llama-prepared")


def _with_nan(tmp_path) -> str:
    """A copy of the bundled model with one NaN in layer 2's down projection."""
    path = str(tmp_path / "nan-model")
    shutil.copytree(MODEL, path)
    f = os.path.join(path, "model.safetensors")
    start, header = tensor_file.read_header(f)
    entry = header["model.layers.2.mlp.down_proj.weight"]
    with open(f, "r+b") as fh:
        fh.seek(start + entry["data_offsets"][0] + 2 * 1000)
        fh.write(np.array([np.nan], ml_dtypes.bfloat16).tobytes())
    return path


def test_nan_weight_is_found_at_load_and_named(tmp_path):
    with pytest.raises(pij.NonFiniteError, match=r"model\.layers\.2\.mlp\.down_proj\.weight holds nan at flat index 1000"):
        pij.load(_with_nan(tmp_path))


def test_nan_weight_unscanned_stops_generation_instead_of_garbage(tmp_path):
    engine = pij.load(_with_nan(tmp_path), check_finite=False)
    with pytest.raises(pij.NonFiniteError, match="NaN/Inf logits on the prompt, so generation stopped"):
        engine.generate("ROMEO:", max_new_tokens=4)
    with pytest.raises(pij.NonFiniteError, match="scoring stopped"):
        engine.logits([1, 40, 41])


def test_check_finite_auto_follows_the_size_threshold(tmp_path, monkeypatch):
    from powerinfer_jax import loading

    path = _with_nan(tmp_path)
    monkeypatch.setattr(loading, "FINITE_SCAN_AUTO_BYTES", 1000)  # the model is ~30 MB: "auto" skips the scan
    cfg = pij.load_config(path)
    assert loading.check_finite_weights(path, cfg, "auto") is False
    with pytest.raises(pij.NonFiniteError):
        loading.check_finite_weights(path, cfg, True)


@pytest.fixture(scope="module")
def engine():
    return pij.load(max_seq_len=64)


def test_long_prompt_is_refused_in_one_line(engine):
    with pytest.raises(pij.ArgumentError) as err:
        engine.generate("ROMEO: " * 200, max_new_tokens=4)
    msg = str(err.value)
    assert "exceeds the context of 64 tokens" in msg and "truncate_prompt=True" in msg and "\n" not in msg


def test_long_prompt_truncated_keeps_bos_and_the_tail(engine):
    ids = engine.encode("ROMEO: " * 200)
    res = engine.generate(ids, max_new_tokens=4, truncate_prompt=True, stop_at_eos=False)
    assert len(res.prompt_ids) == 60 and res.prompt_ids[0] == ids[0] == engine.tokenizer.bos_token_id
    assert res.prompt_ids[1:] == ids[-59:]
    assert res.stats["prompt_truncated"] == len(ids) - 60 and len(res.token_ids) == 4


def test_tiny_temperature_is_greedy(engine):
    greedy = engine.generate("ROMEO:", max_new_tokens=6, temperature=0.0, stop_at_eos=False).token_ids
    assert engine.generate("ROMEO:", max_new_tokens=6, temperature=1e-30, stop_at_eos=False).token_ids == greedy


def test_error_hierarchy_and_old_import_places():
    from offline.evaluate import EvalError
    from offline.predictors import ProfileError
    from offline.profiler import CorpusError
    from powerinfer_jax.config import UnsupportedModelError
    from powerinfer_jax.loading import CheckpointError
    from powerinfer_jax.memory import BudgetTooSmallError
    from powerinfer_jax.tensor_file import TensorFileError

    for cls in (EvalError, ProfileError, CorpusError, UnsupportedModelError, CheckpointError, BudgetTooSmallError,
                TensorFileError, errors.ArgumentError, errors.NonFiniteError, errors.BundleError,
                errors.PathNotFoundError):
        assert issubclass(cls, errors.PowerInferError) and issubclass(cls, ValueError), cls
    assert issubclass(errors.PathNotFoundError, FileNotFoundError)
    assert str(errors.PathNotFoundError("model folder not found: x")) == "model folder not found: x"


def test_moved_bundle_is_re_pointed(tmp_path):
    moved = str(tmp_path / "elsewhere" / "bundle")
    shutil.copytree(BUNDLE, moved)
    with pytest.raises(pij.BundleError, match="is missing .*bundle_model_dir="):
        pij.load(moved)
    engine = pij.load(moved, bundle_model_dir=MODEL)
    np.testing.assert_array_equal(engine.logits([1, 40, 41]), pij.load(MODEL).logits([1, 40, 41]))
    other = str(tmp_path / "other-model")
    shutil.copytree(MODEL, other)
    with open(os.path.join(other, "config.json"), "a") as f:
        f.write("\n")  # same model, another file: the bundle's record refuses it
    with pytest.raises(pij.BundleError, match="does not match its model"):
        pij.load(moved, bundle_model_dir=other)


def _failing_main(exc):
    def main(argv):
        raise exc

    return main


def test_cli_guard_exit_codes_and_one_line(capsys, monkeypatch):
    """The guard alone (flag parsing is the fuzz suite's; absl's flags are global, so no parse here)."""
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    assert cli.guarded(_failing_main(pij.ArgumentError("bad value; fix it")))(["prog"]) == 2
    assert capsys.readouterr().err == "error: bad value; fix it\n"
    assert cli.guarded(_failing_main(RuntimeError("a bug\nsecond line")))(["prog"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error (RuntimeError: a bug second line)" in err
    assert "--verbosity=1" in err and cli.TRACEBACK_ENV in err
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    assert cli.guarded(_failing_main(RuntimeError("a bug")))(["prog"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def _run(*args, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, **(env or {})})


def test_generate_cli_bad_value_and_long_prompt_are_one_line():
    out = _run("bin/generate", "--max_new_tokens", "-5")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("error: flag --max_new_tokens")
    out = _run("bin/generate", "--prompt", "ROMEO: " * 3000, "--max_new_tokens", "4")
    assert out.returncode == 2 and out.stdout == "", out.stderr
    assert out.stderr.count("\n") == 1 and "--truncate_prompt" in out.stderr, out.stderr


def test_generate_cli_shows_no_library_logs_and_traceback_on_request():
    out = _run("bin/generate", "--model", BUNDLE, "--sparsity", "predicted", "--device_memory_budget", "40MiB",
               "--max_new_tokens", "2", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert not [ln for ln in out.stderr.splitlines() if ln[:1] == "I" and ln[1:5].isdigit()], out.stderr  # absl INFO
    out = _run("bin/generate", "--model", "/nonexistent/model", env={cli.TRACEBACK_ENV: "1"})
    assert out.returncode == 2 and "Traceback" in out.stderr and "error: model folder not found" in out.stderr


def test_moved_bundle_is_re_pointed_for_eval(tmp_path):
    """bin/eval's --bundle_model: the evaluation of a bundle moved apart from its model."""
    from offline import evaluate

    moved = str(tmp_path / "elsewhere" / "bundle")
    shutil.copytree(BUNDLE, moved)
    s = evaluate.EvalSettings(modes=("dense",), thresholds=(), max_tokens=128, window=64)
    with pytest.raises(pij.BundleError, match="is missing"):
        evaluate.evaluate(bundle=moved, settings=s, progress=False)
    res = evaluate.evaluate(bundle=moved, bundle_model=MODEL, settings=s, progress=False)
    assert [r["mode"] for r in res["runs"]] == ["dense"] and res["runs"][0]["perplexity"] > 1
    with pytest.raises(errors.PowerInferError, match="plain --model folder needs none"):
        evaluate.evaluate(model=MODEL, bundle_model=MODEL, settings=s, progress=False)

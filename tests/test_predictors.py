"""Tests for the activation predictors (offline/predictors.py) and bin/train_predictors.

Synthetic profiles use the layout offline/profiler.py writes, with masks that are a learnable
function of x: neuron i fires when (x_rest @ A @ B)_i > b_i, A @ B of rank k. x[:, 0] is a constant
1 (like the huge, nearly constant residual dimensions of real models) so the bias-free predictor can
still represent the per-neuron offsets b_i: the problem is affine of rank k + 1 and a ReLU layer
represents it exactly at width 2 (k + 1).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from offline import predictors as P

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, NFF = 32, 256
# Small data needs a faster optimiser than Deja Vu's defaults (which assume ~50k+ rows per layer).
FAST = P.TrainSettings(batch_size=128, lr=1e-2, seed=0)


class _Truth:
    def __init__(self, rng, k, mean_rate):
        self.A = rng.standard_normal((D - 1, k)) / np.sqrt(D)
        self.B = rng.standard_normal((k, NFF))
        self.rates = np.clip(rng.beta(1.0, 1.0 / mean_rate - 1.0, NFF), 0.01, 0.9)  # skewed activity
        self.b = None

    def sample(self, rng, n):
        x = rng.standard_normal((n, D)).astype(np.float32)
        x[:, 0] = 1.0
        s = x[:, 1:] @ self.A @ self.B
        if self.b is None:
            self.b = np.array([np.quantile(s[:, i], 1 - r) for i, r in enumerate(self.rates)])
        # float16 round trip, as the profiler stores inputs.
        return x.astype(np.float16).astype(np.float32), s > self.b


def make_profile(path, n_layers=2, n=4000, k=7, mean_rate=0.15, seed=0, samples=True):
    """Writes a synthetic profile folder; returns the per-layer ground truths."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(path, "samples"), exist_ok=True)
    counts = np.zeros((n_layers, NFF), np.int64)
    truths = []
    for l in range(n_layers):
        t = _Truth(rng, k, mean_rate)
        x, m = t.sample(rng, n)
        if samples:
            np.save(os.path.join(path, "samples", f"x_{l:03d}.npy"), x.astype(np.float16))
            np.save(os.path.join(path, "samples", f"mask_{l:03d}.npy"), np.packbits(m, axis=1))
        counts[l] = m.sum(0)
        truths.append(t)
    np.save(os.path.join(path, "counts.npy"), counts)
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump({"tokens": n, "samples": n, "n_ff": NFF, "hidden": D, "layers": n_layers}, f)
    return truths


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("profile"))
    truths = make_profile(path)
    preds, rows = P.train_all(path, (D, NFF, 2), FAST, model_params=10**6)
    return path, truths, preds, rows


def test_trained_predictors_meet_quality_target(trained):
    _, truths, preds, rows = trained
    for lp, row in zip(preds.layers, rows):
        m = lp.metrics
        assert m["recall"] >= 0.95 and m["ratio"] <= 1.5 and m["meets_target"], m
        assert 0.05 < m["true_frac"] < 0.3
        assert row["rank"] == lp.rank and row["recall"] == m["recall"]
    # Generalisation: fresh tokens from the same distribution, through the jitted mask.
    rng = np.random.default_rng(123)
    for lp, t in zip(preds.layers, truths):
        x, y = t.sample(rng, 2000)
        pred = np.asarray(jax.jit(P.predict_mask)(lp.params, x, lp.threshold))
        recall = (pred & y).sum() / y.sum()
        assert recall >= 0.93 and pred.mean() <= 1.6 * y.mean(), (recall, pred.mean() / y.mean())


def test_calibration_is_the_tightest_threshold():
    rng = np.random.default_rng(0)
    labels = rng.random((300, 64)) < 0.1
    logits = (rng.standard_normal((300, 64)) + 2.0 * labels).astype(np.float32)
    for target in (0.5, 0.9, 0.95, 0.99, 1.0):
        t = P.calibrate_threshold(logits, labels, target)
        m = P.mask_metrics(logits, labels, t)
        assert m["recall"] >= target
        # The next larger positive logit would miss the target: t is the tightest choice.
        pos = np.sort(logits[labels])
        above = pos[pos > t]
        if above.size:
            assert P.mask_metrics(logits, labels, above[0])["recall"] < target
    # No positives: predict nothing.
    t = P.calibrate_threshold(logits, np.zeros_like(labels), 0.95)
    assert P.mask_metrics(logits, np.zeros_like(labels), t)["pred_frac"] == 0.0


def test_predict_jittable_float32_from_bf16():
    key = jax.random.key(0)
    p = P.PredictorParams(fc1=jax.random.normal(key, (D, 8)).astype(jnp.bfloat16),
                          fc2=jax.random.normal(jax.random.fold_in(key, 1), (8, NFF)).astype(jnp.bfloat16))
    x = np.asarray(jax.random.normal(jax.random.fold_in(key, 2), (3, D)))
    logits = jax.jit(P.predict_logits)(p, x)
    assert logits.dtype == jnp.float32 and logits.shape == (3, NFF)
    ref = np.maximum(x @ np.asarray(p.fc1, np.float32), 0) @ np.asarray(p.fc2, np.float32)
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-4, atol=1e-4)
    mask = jax.jit(P.predict_mask)(p, x[0], jnp.float32(0.5))  # traced threshold, single token
    np.testing.assert_array_equal(np.asarray(mask), ref[0] >= 0.5)


def test_initial_rank_rule():
    s = P.TrainSettings(min_rank=16)
    uniform = P.initial_rank(11008, 0.10, 0.20, s, 4096)
    skewed = P.initial_rank(11008, 0.10, 0.50, s, 4096)
    assert skewed == 1024 and uniform == 2048  # 2 * 1100.8 / 2.5 = 880.6 -> 1024
    assert P.initial_rank(11008, 0.10, 0.50, s, 600) == 600  # capped by max_rank
    assert P.initial_rank(256, 0.01, 0.9, s, 128) == 16  # floored at min_rank
    assert P.initial_rank(256, 0.1, 0.5, P.TrainSettings(initial_rank=2), 128) == 2


def test_rank_doubles_when_too_small(tmp_path):
    make_profile(str(tmp_path), n_layers=1, k=7, seed=1)  # affine rank 8: needs ~16 ReLU units
    s = P.TrainSettings(batch_size=128, lr=1e-2, initial_rank=2, max_attempts=4, max_epochs=10)
    preds, rows = P.train_all(str(tmp_path), settings=s)
    tried = rows[0]["ranks_tried"]
    assert tried[:2] == [2, 4] and all(b == 2 * a for a, b in zip(tried, tried[1:]))
    assert preds.ranks[0] > 2
    assert not preds.layers[0].metrics["attempts"][0]["meets_target"]


def test_rank_halves_with_margin(tmp_path):
    x_dir = str(tmp_path)
    make_profile(x_dir, n_layers=1, k=3, seed=2)  # affine rank 4: r0 = 32 is generous
    s = P.TrainSettings(batch_size=128, lr=1e-2, initial_rank=32, halve_margin=0.9, stop_at_target=False)
    preds, rows = P.train_all(x_dir, settings=s)
    assert rows[0]["ranks_tried"] == [32, 16]
    assert preds.ranks[0] == 16 and rows[0]["meets_target"]


def test_budget_cap(tmp_path):
    make_profile(str(tmp_path), n_layers=2, n=1000, seed=3)
    model_params = 20_000  # 10% = 2,000 parameters; one rank costs D + NFF = 288 per layer
    s = P.TrainSettings(batch_size=128, lr=1e-2, max_epochs=3, max_attempts=2)
    preds, rows = P.train_all(str(tmp_path), settings=s, model_params=model_params)
    assert preds.num_params <= 2_000
    assert preds.ranks[0] <= 2_000 // 2 // (D + NFF)
    tot = preds.totals()
    assert tot["within_budget"] and tot["fraction_of_model"] == preds.num_params / model_params
    assert sum(r["params"] for r in rows) == preds.num_params
    with pytest.raises(ValueError, match="budget too small"):
        P.train_all(str(tmp_path), settings=s, model_params=1_000)


def test_save_load_round_trip(trained, tmp_path):
    _, _, preds, _ = trained
    out = P.save_predictors(preds, str(tmp_path / "preds"))
    back = P.load_predictors(out)
    assert back.ranks == preds.ranks and back.dtype == preds.dtype
    assert back.hidden_size == D and back.intermediate_size == NFF and back.model_params == 10**6
    np.testing.assert_array_equal(back.thresholds, preds.thresholds)
    for a, b in zip(preds.layers, back.layers):
        np.testing.assert_array_equal(np.asarray(a.params.fc1), np.asarray(b.params.fc1))
        np.testing.assert_array_equal(np.asarray(a.params.fc2), np.asarray(b.params.fc2))
        assert b.metrics == json.loads(json.dumps(P.jsonable(a.metrics)))
    meta = json.load(open(os.path.join(out, "predictors.json")))
    assert meta["format_version"] == P.FORMAT_VERSION and meta["settings"] == back.settings
    # Saving again over the same folder works (orbax would refuse an existing directory).
    P.save_predictors(back, out)


def test_save_load_bfloat16(tmp_path):
    p = P.PredictorParams(fc1=jnp.arange(D * 4, dtype=jnp.bfloat16).reshape(D, 4) / 7,
                          fc2=jnp.ones((4, NFF), jnp.bfloat16))
    preds = P.Predictors(layers=(P.LayerPredictor(0, 4, 0.25, p, {"recall": 1.0}),), hidden_size=D,
                         intermediate_size=NFF, dtype="bfloat16")
    back = P.load_predictors(P.save_predictors(preds, str(tmp_path)))
    assert back.layers[0].params.fc1.dtype == jnp.bfloat16 and back.nbytes == (D + NFF) * 4 * 2
    np.testing.assert_array_equal(np.asarray(back.layers[0].params.fc1, np.float32), np.asarray(p.fc1, np.float32))
    assert back.layers[0].threshold == 0.25


def test_export_powerinfer(trained, tmp_path):
    """The export is the reference's predictor folder; offline.powerinfer_import reads it back exactly."""
    import torch

    from offline import powerinfer_import as PI

    _, _, preds, _ = trained
    paths = P.export_powerinfer(preds, str(tmp_path / "pi"), dtype="float32")
    assert sorted(os.listdir(tmp_path / "pi")) == ["config.json"] + [f"model_{l}.pt" for l in range(2)]
    for lp, path in zip(preds.layers, paths):
        state = torch.load(path, weights_only=True)
        assert set(state) == {"fc1.weight", "fc2.weight"}
        fc1, fc2 = state["fc1.weight"].numpy(), state["fc2.weight"].numpy()
        assert fc1.shape == (lp.rank, D) and fc2.shape == (NFF, lp.rank)  # torch Linear [out, in]
        np.testing.assert_array_equal(fc1, np.asarray(lp.params.fc1).T)
        np.testing.assert_array_equal(fc2, np.asarray(lp.params.fc2).T)
    files = PI.find_files(str(tmp_path / "pi"), 2)
    back = PI.read_predictors(files, D, NFF)
    assert back.layers[0].threshold == min(lp.threshold for lp in preds.layers)
    for a, b in zip(preds.layers, back.layers):
        np.testing.assert_array_equal(np.asarray(b.params.fc1), np.asarray(a.params.fc1))
        np.testing.assert_array_equal(np.asarray(b.params.fc2), np.asarray(a.params.fc2))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="empty folder"):
        P.export_powerinfer(preds, str(tmp_path / "other"))


def test_error_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="profile folder not found"):
        P.train_all(str(tmp_path / "nope"))
    make_profile(str(tmp_path / "nosamples"), n_layers=1, n=100, samples=False)
    with pytest.raises(P.ProfileError, match="no predictor samples"):
        P.train_all(str(tmp_path / "nosamples"))
    with pytest.raises(FileNotFoundError, match="predictors.json"):
        P.load_predictors(str(tmp_path))


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "bin", "train_predictors"), *args],
                          capture_output=True, text=True, timeout=120)


def test_cli(tmp_path):
    prof = str(tmp_path / "prof")
    make_profile(prof, n_layers=1, n=1500, seed=4)
    out = str(tmp_path / "out")
    r = _cli("--profile", prof, "--out", out, "--model_params", "100000", "--batch_size", "128",
             "--lr", "0.01", "--max_epochs", "5", "--max_attempts", "1", "--export", str(tmp_path / "pi"))
    assert r.returncode == 0, r.stderr
    assert "| layer | rank |" in r.stdout and "of the model's 100,000" in r.stdout
    report = json.load(open(os.path.join(out, "report.json")))
    assert len(report["layers"]) == 1 and report["totals"]["within_budget"]
    assert os.path.isfile(os.path.join(out, "predictors.json"))
    assert sorted(os.listdir(tmp_path / "pi")) == ["config.json", "model_0.pt"]
    r = _cli("--profile", str(tmp_path / "missing"), "--out", out, "--model_params", "100000")
    assert r.returncode == 2 and "profile folder not found" in r.stderr


def test_model_param_count_from_headers(tmp_path):
    from safetensors.numpy import save_file

    save_file({"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float16)}, str(tmp_path / "model-1.safetensors"))
    save_file({"c": np.zeros((2, 2, 2), np.float32)}, str(tmp_path / "model-2.safetensors"))
    assert P.model_param_count(str(tmp_path)) == 12 + 5 + 8
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        P.model_param_count(str(tmp_path / "nope"))

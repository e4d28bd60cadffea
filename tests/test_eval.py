"""bin/eval and offline/evaluate.py: perplexity per sparse mode and the predictors' per-layer quality.

One small end-to-end run of bin/eval on the bundled prepared model (128 tokens, windows of 64) feeds
most checks: oracle equals dense, predicted stays close, per-layer metrics are consistent with each
other and with the engine's own FFN counters, and the JSON / markdown outputs are complete. The
jitted per-layer counting is checked against `offline.predictors.mask_metrics`, and the windows
against `metrics.perplexity`'s. Error paths run through the CLI like tests/test_cli.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from offline import evaluate
from offline.predictors import mask_metrics
from powerinfer_jax.metrics import perplexity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "models", "shakespeare-relu-llama-prepared")
MODEL = os.path.join(REPO, "models", "shakespeare-relu-llama")
HIGH = 4.0  # far above every calibrated threshold of the bundle (all within [-0.1, 0.5])


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "bin/eval", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("eval")
    proc = _run("--bundle", BUNDLE, "--max_tokens", "128", "--window", "64", f"--thresholds={HIGH:g}",
                "--out_dir", str(out_dir), "--noprogress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out_dir / "eval.json") as f:
        res = json.load(f)
    md = (out_dir / "eval.md").read_text()
    return proc, res, md


def _runs(res):
    return {(r["mode"], r["threshold"]): r for r in res["runs"]}


def _setting(res, label):
    return [next(t for t in row["thresholds"] if t["setting"] == label) for row in res["layers"]]


def test_outputs_have_the_expected_keys(cli):
    proc, res, md = cli
    for key in ("model", "bundle", "text", "tokens", "positions", "windows", "window", "runs", "layers",
                "layer_means", "versions"):
        assert key in res, key
    assert res["model"] == os.path.join("models", "shakespeare-relu-llama")
    assert "held-out" in res["text"]
    assert res["tokens"] == 128 and res["window"] == 64 and res["windows"] == 3  # 63 + 63 + 2 scored
    assert res["positions"] == res["tokens"] + res["windows"]  # each window's BOS position is run, not scored
    assert {"jax", "jaxlib", "backend", "device"} <= set(res["versions"])
    assert set(_runs(res)) == {("dense", "n/a"), ("oracle", "n/a"), ("predicted", "calibrated"),
                               ("predicted", f"{HIGH:g}")}
    for r in res["runs"]:
        for key in ("perplexity", "nll", "tokens", "ppl_change_pct", "ffn_computed_frac", "ffn_overflow", "seconds"):
            assert key in r, key
        assert r["tokens"] == 128
    assert _runs(res)["predicted", f"{HIGH:g}"]["threshold_value"] == HIGH
    assert len(res["layers"]) == 6
    # The markdown report is printed and written, with both tables.
    assert md.strip() in proc.stdout
    assert "| mode | threshold | perplexity | vs dense | FFN computed |" in md
    assert "| layer | setting | threshold | recall | precision | true active % | pred active % |" in md
    assert len(re.findall(r"^\| predicted \|", md, re.M)) == 2


def test_oracle_equals_dense_and_predicted_stays_close(cli):
    _, res, _ = cli
    runs = _runs(res)
    dense = runs["dense", "n/a"]["perplexity"]
    assert math.isfinite(dense) and 1 < dense < 200
    assert abs(runs["oracle", "n/a"]["perplexity"] - dense) / dense < 1e-3
    for key in (("predicted", "calibrated"), ("predicted", f"{HIGH:g}")):
        ppl = runs[key]["perplexity"]
        assert math.isfinite(ppl) and ppl >= 0.95 * dense, (key, ppl, dense)
        assert runs[key]["ppl_change_pct"] == pytest.approx(100 * (ppl / dense - 1))
    # Computing far fewer neurons costs quality.
    assert runs["predicted", f"{HIGH:g}"]["perplexity"] > runs["predicted", "calibrated"]["perplexity"]


def test_engine_counters_agree_with_the_layer_metrics(cli):
    _, res, _ = cli
    runs = _runs(res)
    means = {m["setting"]: m for m in res["layer_means"]}
    assert runs["dense", "n/a"]["ffn_computed_frac"] == 1.0
    # Oracle computes exactly the truly active neurons: the dense pass' true active fraction.
    assert runs["oracle", "n/a"]["ffn_computed_frac"] == pytest.approx(means["calibrated"]["true_frac"], abs=1e-3)
    # Predicted computes what its predictors pick (its residual stream differs slightly from dense's).
    cal = runs["predicted", "calibrated"]
    assert cal["ffn_overflow"] == 0
    assert cal["ffn_computed_frac"] == pytest.approx(means["calibrated"]["pred_frac"], abs=0.03)
    assert cal["mean_recall"] == pytest.approx(means["calibrated"]["recall"])
    assert 0.02 < cal["ffn_computed_frac"] < 0.5
    assert runs["predicted", f"{HIGH:g}"]["ffn_computed_frac"] < cal["ffn_computed_frac"]


def test_per_layer_metrics_are_sane_and_monotone(cli):
    _, res, _ = cli
    cal, high = _setting(res, "calibrated"), _setting(res, f"{HIGH:g}")
    for row, c, h in zip(res["layers"], cal, high):
        for m in (c, h):
            assert 0.0 <= m["recall"] <= 1.0 and 0.0 <= m["precision"] <= 1.0
            assert m["true_frac"] == row["true_frac"]
        assert 0.01 < row["true_frac"] < 0.5  # the bundled model is sparse, not dead
        assert c["threshold"] < HIGH and h["threshold"] == HIGH
        # A higher threshold predicts a subset: fewer neurons, no more recall, and here strictly less.
        assert h["pred_frac"] < c["pred_frac"]
        assert h["recall"] <= c["recall"]
        assert c["recall"] > 0.8  # calibrated for 95% recall on the training corpus' held-out rows


def test_layer_counts_match_mask_metrics():
    """The jitted streaming counts (padding, tail window, several thresholds) equal mask_metrics on full arrays."""
    import jax.numpy as jnp

    import powerinfer_jax as pij
    from powerinfer_jax.bundle import load_bundle
    from offline.profiler import _profile_batch
    from powerinfer_jax.sparse_ffn import predict_logits

    engine = pij.load(MODEL, max_seq_len=32)
    preds = load_bundle(BUNDLE).predictors
    text, _ = evaluate.read_text(None)
    ids = np.asarray(engine.tokenizer.encode(text[:2000], add_bos=False))[:71]
    tokens, valid = evaluate.score_inputs(ids, 32, engine.tokenizer.bos_token_id)
    assert tokens.shape == (3, 32) and valid.sum() == 70 + 3  # two full windows and a 9-token tail
    L = engine.cfg.num_layers
    settings = [("calibrated", preds.thresholds), ("0", np.zeros(L, np.float32)), ("2", np.full(L, 2.0, np.float32))]
    rows = evaluate.layer_metrics(engine.params, engine.cfg, tokens, valid, preds, settings)

    xs, masks = _profile_batch(engine.params, engine.cfg, jnp.asarray(tokens), jnp.zeros(L, jnp.float32))
    xs, masks = np.asarray(xs)[:, valid], np.asarray(masks)[:, valid]  # [L, positions, ...]
    for l, row in enumerate(rows):
        logits = np.asarray(predict_logits(preds.params[l], jnp.asarray(xs[l])))
        for (label, thr), got in zip(settings, row["thresholds"]):
            want = mask_metrics(logits, masks[l], float(thr[l]))
            assert got["setting"] == label
            for k in ("recall", "precision", "true_frac", "pred_frac", "ratio"):
                assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), (l, label, k)


@pytest.mark.parametrize("bos", [1, None])
@pytest.mark.parametrize("n", [2, 9, 15, 16, 40])
def test_score_inputs_are_perplexitys_windows(n, bos):
    ids = np.arange(3, 3 + n)
    seen = []
    perplexity(lambda s: seen.append(np.asarray(s)) or np.zeros((len(s), 64)), ids, window=8, bos=bos)
    tokens, valid = evaluate.score_inputs(ids, 8, bos)
    assert len(tokens) == len(seen)
    for row, ok, want in zip(tokens, valid, seen):
        np.testing.assert_array_equal(row[ok], want)
        assert ok[: len(want)].all() and not ok[len(want):].any()


def test_metrics_from_counts_is_mask_metrics():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 40)).astype(np.float32)
    labels = rng.random((50, 40)) < 0.2
    labels[:, 0] = False
    for thr in (-1.0, 0.0, 0.7, 9.0):
        pred = logits >= np.float32(thr)
        got = evaluate.metrics_from_counts(int((pred & labels).sum()), int(labels.sum()), int(pred.sum()), labels.size)
        assert got == pytest.approx(mask_metrics(logits, labels, thr))
    # No positives: recall 1 by convention, ratio inf when something is predicted (3 of 10 logits >= 0).
    none_fire = np.zeros((1, 10), bool)
    assert evaluate.metrics_from_counts(0, 0, 3, 10) == mask_metrics(np.arange(10.0)[None] - 6.5, none_fire, 0.0)


def test_parse_thresholds_and_modes():
    assert evaluate.parse_thresholds("-1, 0,1.5,0") == (-1.0, 0.0, 1.5)
    assert evaluate.parse_thresholds("") == () and evaluate.parse_thresholds(None) == ()
    assert evaluate.parse_modes("predicted,dense,predicted") == ("predicted", "dense")
    for bad in ("1,,2", "nan", "inf", "a"):
        with pytest.raises(evaluate.EvalError):
            evaluate.parse_thresholds(bad)
    with pytest.raises(evaluate.EvalError, match="unknown mode"):
        evaluate.parse_modes("dense,sparse")


def test_help_documents_every_flag():
    out = _run("--help")
    assert out.returncode in (0, 1), out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].strip()
    flag_lines = [l for l in lines if re.match(r"^  --[\w\[\]]+:", l)]
    names = {re.match(r"^  --(?:\[no\])?(\w+):", l).group(1) for l in flag_lines}
    assert {"bundle", "model", "text", "modes", "thresholds", "max_tokens", "window", "out_dir"} <= names
    for line in flag_lines:
        assert line.split(":", 1)[1].strip(), f"flag without help text: {line}"


def _short_text(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("To be.\n")
    return str(p)


@pytest.mark.parametrize("args, message", [
    (lambda t: ["--bundle", str(t / "nope")], "bundle folder not found"),
    (lambda t: ["--bundle", str(t)], "is not a prepared bundle"),
    (lambda t: ["--model", str(t / "nope"), "--modes", "dense"], "model folder not found"),
    (lambda t: ["--text", str(t / "missing.txt")], "text file not found"),
    (lambda t: ["--text", _short_text(t), "--modes", "dense"], "text too short"),
    (lambda t: ["--modes", "dense,sparse"], "unknown mode(s) 'sparse'"),
    (lambda t: ["--model", MODEL, "--modes", "dense,predicted"], "'predicted' needs predictors"),
    (lambda t: ["--thresholds=-1,zero"], "bad threshold 'zero'"),
    (lambda t: ["--modes", "dense", "--thresholds=1"], "apply to the predicted mode"),
    (lambda t: ["--max_tokens", "4"], "max_tokens must be >="),
    (lambda t: ["--bundle", BUNDLE, "--model", MODEL], "not both"),
])
def test_errors_exit_2_with_a_clear_message(tmp_path, args, message):
    out = _run(*args(tmp_path), "--out_dir", str(tmp_path / "out"), "--noprogress")
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "error: " in out.stderr and message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()

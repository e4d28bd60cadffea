"""bin/bench's parts: the synthetic power-law model, transformers on shared weights, the roofline
byte counts, and one tiny end-to-end bench run (speed is never asserted, only structure)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import report, roofline, suite, synthetic
from benchmarks.subjects import synthetic_subject
from powerinfer_jax import memory
from offline.activation_stats import plot_frequency_curves
from powerinfer_jax.engine import Engine
from powerinfer_jax.params import param_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"hidden": 128, "ffn": 512, "heads": 4}


def test_power_law_rates_hit_the_published_statistics():
    r = synthetic.power_law_rates(11008, mean_active=0.10, top_frac=0.26, top_share=0.80)
    assert np.all(np.diff(r) <= 0) and r.max() <= 0.95 and r.min() > 0
    assert abs(r.mean() - 0.10) < 1e-3
    top = int(round(0.26 * r.size))
    assert abs(r[:top].sum() / r.sum() - 0.80) < 5e-3


def _small_model(layers=2):
    cfg = synthetic.synthetic_config(layers=layers, vocab=257, **SMALL)
    return cfg, synthetic.build_synthetic(cfg, predictor_rank=64, seed=1)


def test_calibrated_predictors_fire_at_the_designed_rates():
    cfg, m = _small_model()
    params = suite.device_params(m.params)
    rng = np.random.default_rng(0)
    calib = suite.collect_residuals(params, cfg, rng.integers(3, 257, 512).astype(np.int32))
    for x in calib:  # the bias feature: residual dim 0 is exactly constant in every layer
        np.testing.assert_array_equal(x[:, 0], synthetic.BIAS_FEATURE)
    synthetic.calibrate_predictors(m, calib)
    fresh = suite.collect_residuals(params, cfg, rng.integers(3, 257, 512).astype(np.int32))
    measured = synthetic.predicted_rates(m, fresh)
    assert abs(measured.mean() - m.rates.mean()) < 0.02
    # neuron by neuron the hot ones stay hot: rank correlation with the design
    for l in range(cfg.num_layers):
        hot = m.rates[l] > np.quantile(m.rates[l], 0.8)
        assert measured[l][hot].mean() > 4 * measured[l][~hot].mean()


def test_transformers_on_shared_weights_matches_our_engine():
    from powerinfer_jax.export import to_transformers
    import torch

    cfg, m = _small_model()
    model = to_transformers(m.params, cfg)
    ids = np.random.default_rng(2).integers(0, 257, 24)
    with torch.no_grad():
        ref = model(torch.tensor(ids[None])).logits[0].numpy()
    ours = Engine(cfg, suite.device_params(m.params), max_seq_len=64).logits(ids)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # HF-layout tensors are views of our arrays, not copies
    assert np.shares_memory(model.model.layers[0].mlp.up_proj.weight.detach().numpy(), m.params.layers[0].ffn.w_up)


def test_decode_bytes_count_every_weight_read():
    cfg, m = _small_model()
    every = param_bytes(m.params)
    table = m.params.embed.nbytes
    dense = roofline.decode_bytes(cfg, "float32", ffn_neurons_per_token=cfg.num_layers * cfg.intermediate_size)
    assert dense == every - table + cfg.hidden_size * 4  # one embedding row is read, not the table
    kv = roofline.decode_bytes(cfg, "float32", ffn_neurons_per_token=0, attend_len=64) - \
        roofline.decode_bytes(cfg, "float32", ffn_neurons_per_token=0)
    assert kv == 2 * cfg.num_layers * 64 * cfg.num_kv_heads * cfg.head_dim * 4
    sparse = roofline.decode_bytes(cfg, "float32", ffn_neurons_per_token=100, predictor_bytes=m.predictor_bytes,
                                   ffn_index=True)
    ffn = cfg.num_layers * cfg.intermediate_size * memory.neuron_bytes(cfg, "float32")
    assert sparse == dense - ffn + 100 * memory.neuron_bytes(cfg, "float32") + m.predictor_bytes \
        + cfg.num_layers * cfg.intermediate_size * 4


def test_bandwidth_measurements_are_plausible():
    for bw in (roofline.host_read_bandwidth(1 << 26, repeats=2), roofline.device_read_bandwidth(1 << 26, repeats=2)):
        assert 1e8 < bw < 1e13


def test_bench_subject_end_to_end(tmp_path):
    s = synthetic_subject(2, 257, 64, prompt_len=8, calib_tokens=128, shape=SMALL, log=lambda *_: None)
    bws = iter([1e10, 2e10, 1.5e10])
    m = suite.bench_subject(s, [0.3, 1.0], repeats=2, new_tokens=4, max_seq_len=64,
                            measure_bandwidth=lambda: next(bws), with_transformers=True, log=lambda *_: None)
    assert m["floor_bandwidth_gbps"] == 20.0  # the best measurement of the run
    assert [r["fraction"] for r in m["budgets"]] == [0.3, 1.0]
    for r in m["budgets"]:
        assert set(r["configs"]) == {"dense", "offload", "hybrid", "transformers"}
        for c in r["configs"].values():
            assert len(c["decode_tok_s_all"]) == 2 and c["decode_tok_s"] > 0
            assert c["floor_ms"] > 0 and c["achieved_over_floor"] > 0
        h = r["configs"]["hybrid"]
        assert 0 < h["ffn_computed_per_token"] < 2 * 512  # predicted sparsity, 2 layers
        assert h["bytes_per_token"] < r["configs"]["dense"]["bytes_per_token"]
    full = m["budgets"][1]
    assert full["offload_layers"] == 2 and full["hot_fraction"] == 1.0  # 100%: everything fits
    assert m["budgets"][0]["hot_fraction"] < 0.5
    assert m["summary"]["dense_over_transformers"] > 0
    for r in m["budgets"]:  # same-round ratios, one per round
        assert len(r["paired"]["hybrid_over_dense"]) == 2
        h, d = r["configs"]["hybrid"]["decode_tok_s_all"], r["configs"]["dense"]["decode_tok_s_all"]
        np.testing.assert_allclose(r["paired"]["hybrid_over_dense"], np.divide(h, d))
        assert r["configs"]["dense"]["floor_ms"] == pytest.approx(r["configs"]["dense"]["bytes_per_token"] / 2e10 * 1e3)
    res = {"backend": "cpu", "device": "cpu", "machine": "test", "jax": jax.__version__, "command": "bin/bench",
           "bandwidth": {"host_gbps": 10.0, "device_gbps": 10.0}, "models": [m]}
    md = report.report_markdown({**res, "models": [{k: v for k, v in m.items() if "rates_for_plot" not in k}]})
    assert "| 30% | hybrid sparse (predicted)" in md and "SYNTHETIC" in md
    report.plot_throughput(m, str(tmp_path / "t.png"))
    plot_frequency_curves(m["rates_for_plot"], 1, str(tmp_path / "f.png"), "t", designed=m["designed_rates_for_plot"][0])
    assert (tmp_path / "t.png").stat().st_size > 1000 and (tmp_path / "f.png").stat().st_size > 1000


def test_formats_suite_sets_each_round_against_its_own_bandwidth():
    """The formats suite: floors from the best bandwidth, and per round against the bandwidth measured after it."""
    from benchmarks import precision

    s = synthetic_subject(1, 257, 64, prompt_len=8, calib_tokens=128, shape=SMALL, log=lambda *_: None)
    bws = iter([3e10, 1e10, 2e10])  # before the rounds, after round 1, after round 2
    m = precision.bench_formats(s, ["bfloat16"], fraction=0.3, repeats=2, new_tokens=4, max_seq_len=64,
                                measure_bandwidth=lambda: next(bws), log=lambda *_: None)
    assert m["bandwidth_gbps"] == [30.0, 10.0, 20.0] and m["floor_bandwidth_gbps"] == 30.0
    for r in m["rows"]:
        tok_s = r["decode_tok_s_all"]
        assert r["achieved_over_floor"] == pytest.approx(r["bytes_per_token"] / 3e10 * np.median(tok_s))
        per_round = [r["bytes_per_token"] / 1e10 * tok_s[0], r["bytes_per_token"] / 2e10 * tok_s[1]]
        assert r["achieved_over_round_floor"] == pytest.approx(np.median(per_round))
    md = precision.markdown(m)
    assert "achieved/floor, per round" in md and "measured 10.0-30.0 GB/s" in md


def test_swiglu_synthetic_subject_has_a_cats_row():
    """The SwiGLU synthetic model: thresholds calibrated to the target, a CATS configuration computing about
    that share of neurons, its bytes counted as the gate's plus up/down of the computed neurons."""
    s = synthetic_subject(2, 257, 64, prompt_len=8, calib_tokens=128, shape=SMALL, log=lambda *_: None,
                          ffn_kind="swiglu", target_sparsity=0.7)
    assert s.name == "synthetic-7b-silu-70" and len(s.act_thresholds) == 2
    bws = iter([1e10] * 3)
    m = suite.bench_subject(s, [0.3], repeats=2, new_tokens=4, max_seq_len=64, measure_bandwidth=lambda: next(bws),
                            with_transformers=False, log=lambda *_: None)
    c = m["budgets"][0]["configs"]
    assert set(c) == {"dense", "offload", "hybrid", "cats"}
    share = c["cats"]["ffn_computed_per_token"] / (2 * 512)
    assert 0.15 < share < 0.45, share  # about 30% computed on the prompt's tokens
    assert c["dense"]["bytes_per_token"] > c["cats"]["bytes_per_token"]
    assert len(m["budgets"][0]["paired"]["cats_over_dense"]) == 2 and m["summary"]["cats_over_dense"] > 0
    assert "CATS / dense" in report.model_markdown(m)


@pytest.mark.parametrize("args,message", [(["--budgets", "0.5,2"], "fractions in [0, 1]"),
                                          (["--models", "gpt5"], "unknown model"),
                                          (["--budgets", "half"], "must be numbers")])
def test_bench_bad_flags_are_clear_errors(args, message):
    out = subprocess.run([sys.executable, "bin/bench", *args], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2 and message in out.stderr


def test_bench_sampling_writes_both_samplers_for_every_case(tmp_path):
    """The sampler benchmark runs end to end on a tiny case and reports both implementations."""
    stem = str(tmp_path / "sampling")
    out = subprocess.run([sys.executable, "benchmarks/bench_sampling.py", "--vocab", "64", "--rows", "1,2",
                          "--rounds", "1", "--calls", "1", "--out", stem], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    rows = json.load(open(stem + ".json"))["rows"]
    assert [(r["rows"], r["mode"]) for r in rows] == [(1, "temperature"), (1, "cut"), (2, "temperature"), (2, "cut")]
    assert all(r["bisect_ms"] > 0 and r["sort_ms"] > 0 for r in rows)

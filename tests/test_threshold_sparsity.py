"""Threshold sparsity on SwiGLU models: calibration, the CATS oracle equals a dense model that zeroes
the activations below each layer's threshold (1e-5), predicted mode, and the refusals."""
from __future__ import annotations

import numpy as np
import pytest

import powerinfer_jax as pij
from hf_models import VOCAB, make_llama
from offline import thresholds as T
from powerinfer_jax.engine import Engine
from powerinfer_jax.errors import ArgumentError
from powerinfer_jax.ffn import thresholded_ffn_fn
from powerinfer_jax.hybrid import build_hybrid_engine
from powerinfer_jax.loading import load_params


@pytest.fixture(scope="module")
def silu_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("silu"))
    make_llama(path, act="silu")
    dense = pij.load(path, max_seq_len=64)
    windows = np.random.default_rng(0).integers(3, VOCAB, (8, 32)).astype(np.int32)
    cal = T.calibrate(dense.params, dense.cfg, windows, 0.5)
    return path, dense, cal


def _ids(n=20, seed=1):
    return [1] + np.random.default_rng(seed).integers(3, VOCAB, n - 1).tolist()


def test_calibration_hits_the_target(silu_model):
    _, dense, cal = silu_model
    assert len(cal["values"]) == dense.cfg.num_layers
    assert all(v > 0 for v in cal["values"])
    np.testing.assert_allclose(cal["achieved"], 0.5, atol=0.01)
    # Independent check of one layer's share through a plain forward.
    from powerinfer_jax.model import forward
    import jax.numpy as jnp

    w = np.random.default_rng(0).integers(3, VOCAB, (8, 32)).astype(np.int32)
    pos = jnp.broadcast_to(jnp.arange(32), w.shape)
    _, _, ex = forward(dense.params, dense.cfg, jnp.asarray(w), pos, collect=True)
    a = np.abs(np.asarray(ex["ffn_act"][1]))
    assert abs((a <= cal["values"][1]).mean() - 0.5) < 0.01


@pytest.mark.parametrize("kernel,fraction", [("numba", 0.0), ("numba", 0.4), ("numba", 1.0), ("xla", 0.0),
                                             ("xla", 0.4), ("xla", 1.0), ("pallas", 0.4)])
def test_cats_oracle_equals_thresholded_dense(silu_model, kernel, fraction):
    path, dense, cal = silu_model
    cfg = dense.cfg
    host = load_params(path, cfg, on_host=True)
    n = cfg.intermediate_size
    hot = [np.sort(np.random.default_rng(l).permutation(n)[: int(fraction * n)]).astype(np.int32)
           for l in range(cfg.num_layers)]
    eng = build_hybrid_engine(cfg, host, mode="oracle", hot_indices=hot, max_seq_len=64, device_kernel=kernel,
                              act_thresholds=cal["values"])
    ref_engine = Engine(cfg, dense.params, ffn_fn=thresholded_ffn_fn(cfg, cal["values"]), max_seq_len=64)
    ids = _ids()
    ref = ref_engine.logits(ids)
    stats = {}
    got = eng.logits_stepwise(ids, stats)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel <= 1e-5, f"{kernel} at {fraction:.0%}: {rel:.2e}"
    # ... and thresholding really changed the model (it is not the dense one).
    plain = dense.logits(ids)
    assert np.abs(plain - ref).max() / np.abs(ref).max() > 1e-3
    # Every layout counts the neurons it computed (the host CATS kernel returns its count): about half.
    share = stats["ffn_computed"] / stats["ffn_total"]
    assert 0.3 < share < 0.7, share


def test_cats_oracle_without_overlap_counts_too(silu_model):
    """overlap=False on the accelerator layout: the same result and the host's count."""
    path, dense, cal = silu_model
    cfg = dense.cfg
    host = load_params(path, cfg, on_host=True)
    hot = [np.arange(0, cfg.intermediate_size, 3, dtype=np.int32)] * cfg.num_layers
    kw = dict(mode="oracle", hot_indices=hot, max_seq_len=64, device_kernel="xla", act_thresholds=cal["values"])
    ids = _ids(12, 5)
    a_stats, b_stats = {}, {}
    a = build_hybrid_engine(cfg, host, overlap=True, **kw).logits_stepwise(ids, a_stats)
    b = build_hybrid_engine(cfg, host, overlap=False, **kw).logits_stepwise(ids, b_stats)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert a_stats["ffn_computed"] == b_stats["ffn_computed"] < 0.7 * a_stats["ffn_total"]


def test_sparse_modes_need_thresholds(silu_model):
    path, _, cal = silu_model
    with pytest.raises(ArgumentError, match="activation thresholds"):
        pij.load(path, sparsity="oracle")
    with pytest.raises(ArgumentError, match="one per layer"):
        pij.load(path, sparsity="oracle", act_thresholds=[0.1])
    eng = pij.load(path, sparsity="oracle", act_thresholds=cal["values"], max_seq_len=64)
    out = eng.generate([1, 5, 9], max_new_tokens=6, stop_at_eos=False)
    assert len(out.token_ids) == 6


def test_act_thresholds_refused_for_relu_models(tmp_path):
    make_llama(str(tmp_path), act="relu")
    with pytest.raises(ArgumentError, match="SwiGLU/GeGLU"):
        pij.load(str(tmp_path), sparsity="oracle", act_thresholds=[0.1, 0.1])


def test_prepare_calibrates_profiles_and_predicts(tmp_path):
    """bundle.prepare on a SwiGLU model: thresholds in the manifest, a profile of the thresholded mask,
    predictors; the bundle loads in predicted mode; a second run re-uses everything for the same target."""
    import os

    from offline import bundle as offline_bundle
    from offline.pipeline import DEFAULT_CORPUS
    from offline.predictors import TrainSettings
    from offline.profiler import ProfileSettings
    from offline.train_model import train_tokenizer
    from powerinfer_jax.bundle import load_bundle

    text = DEFAULT_CORPUS.read_text(encoding="utf-8")[:40000]
    tok = train_tokenizer(text, 300)
    model_dir = str(tmp_path / "model")
    make_llama(model_dir, act="silu", vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=256)
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    out = str(tmp_path / "bundle")
    prof = ProfileSettings(window=64, batch=8, max_tokens=4096, max_samples=2000, min_tokens=512)
    pred = TrainSettings(max_epochs=3, max_attempts=1, try_halve=False, initial_rank=32)
    logs = []
    offline_bundle.prepare(model_dir, [str(corpus)], out, None, prof, pred, log=logs.append, target_sparsity=0.6)
    b = load_bundle(out)
    assert b.target_sparsity == 0.6 and len(b.act_thresholds) == 2
    rate = b.counts.sum() / (b.tokens * b.counts.size)
    assert 0.3 < rate < 0.5, rate  # about 40% active on the profiled text
    eng = pij.load(out, sparsity="predicted", max_seq_len=64)
    res = eng.generate([1, 5, 9], max_new_tokens=4, stop_at_eos=False)
    assert len(res.token_ids) == 4 and 0 < res.stats["ffn_computed"] < res.stats["ffn_total"]
    offline_bundle.prepare(model_dir, [str(corpus)], out, None, prof, pred, log=logs.append, target_sparsity=0.6,
                           attention_sparsity=0.5)
    assert "thresholds: up to date, re-used" in logs and "profile: up to date, re-used" in logs
    assert len(load_bundle(out).attention_input_thresholds) == 2  # TEAL's, calibrated on the same corpus
    eng = pij.load(out, sparsity="predicted", attention_sparsity=True, max_seq_len=64)
    assert len(eng.generate([1, 5, 9], max_new_tokens=4, stop_at_eos=False).token_ids) == 4
    with pytest.raises(ArgumentError, match="target_sparsity"):
        offline_bundle.prepare(model_dir, [str(corpus)], str(tmp_path / "b2"), None, prof, pred)


@pytest.mark.parametrize("family", ["qwen2", "gemma"])
def test_qwen2_and_gemma_are_threshold_sparse(family, tmp_path):
    """Qwen2 (SwiGLU, q/k/v biases) and Gemma (tanh-GeGLU): the CATS oracle equals the thresholded dense
    model, and the memory plan counts exactly what the engine holds (Qwen2's q/k/v biases included)."""
    from hf_models import make_gemma, make_qwen2
    from powerinfer_jax import memory

    (make_qwen2 if family == "qwen2" else make_gemma)(str(tmp_path))
    dense = pij.load(str(tmp_path), max_seq_len=64, dtype="float32")
    cfg = dense.cfg
    assert cfg.needs_act_threshold
    windows = np.random.default_rng(0).integers(3, cfg.vocab_size, (4, 32)).astype(np.int32)
    cal = T.calibrate(dense.params, cfg, windows, 0.6)
    eng = pij.load(str(tmp_path), sparsity="oracle", act_thresholds=cal["values"], max_seq_len=64, dtype="float32")
    ref = Engine(cfg, dense.params, ffn_fn=thresholded_ffn_fn(cfg, cal["values"]), max_seq_len=64)
    ids = [1] + np.random.default_rng(2).integers(3, cfg.vocab_size, 15).tolist()
    want = ref.logits(ids)
    got = eng.logits(ids)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5
    fixed = dict(memory.fixed_groups(cfg, "float32", 0, 64))
    assert eng.memory_report()["device"]["attention"] == fixed["attention"]

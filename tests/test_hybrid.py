"""The hybrid engine on tiny random models of every sparse FFN family.

`oracle` (the true ReLU mask drives the sparse path) must equal `dense` within 1e-5
relative (float32) at device budgets of 0%, 30% and 100% of the FFN bytes; the layer
offload baseline must equal dense exactly up to rounding; the memory report must match
the placement.
"""

from __future__ import annotations

import numpy as np
import pytest

import powerinfer_jax as pij
from hf_models import VOCAB, make_llama, make_opt
from offline import placement
from powerinfer_jax.hybrid import build_hybrid_engine, offload_hot_indices
from powerinfer_jax.loading import load_params

FAMILIES = {
    "reglu": lambda p: make_llama(p, act="relu"),
    "drelu": lambda p: make_llama(p, act="relu", drelu=True),
    "opt_relu": lambda p: make_opt(p),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    FAMILIES[request.param](path)
    dense = pij.load(path, max_seq_len=64)
    host = load_params(path, dense.cfg, on_host=True)
    return request.param, path, dense, host


def _hot_for_fraction(cfg, fraction, seed=0):
    """Hot sets from a random power-law 'profile' through the real placement solver."""
    rng = np.random.default_rng(seed)
    freqs = [rng.pareto(1.5, cfg.intermediate_size) for _ in range(cfg.num_layers)]
    nb = 1
    budget = int(fraction * cfg.num_layers * cfg.intermediate_size) * nb
    p = placement.solve(freqs, neuron_bytes=nb, budget_bytes=budget, batch=8)
    return [np.asarray(h) for h in p.hot_indices]


def _ids(n=24, seed=0):
    return [1] + np.random.default_rng(seed).integers(3, VOCAB, n - 1).tolist()


@pytest.mark.parametrize("kernel", ["numba", "xla"])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_oracle_equals_dense(model, fraction, kernel):
    name, path, dense, host = model
    cfg = dense.cfg
    hot = _hot_for_fraction(cfg, fraction)
    eng = build_hybrid_engine(cfg, host, mode="oracle", hot_indices=hot, max_seq_len=64, device_kernel=kernel)
    ids = _ids()
    ref = dense.logits(ids)
    stats = {}
    got = eng.logits_stepwise(ids, stats)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel <= 1e-5, f"{name} at {fraction:.0%}: {rel:.2e}"
    expected_hot = sum(len(h) for h in hot)
    assert eng.memory_report()["hot_neurons_per_layer"] == [len(h) for h in hot]
    if 0 < fraction < 1:
        assert 0 < stats["ffn_hot"] < stats["ffn_computed"]
    assert expected_hot == 0 or stats["ffn_hot"] > 0


def test_oracle_generation_matches_dense(model):
    _, _, dense, host = model
    hot = _hot_for_fraction(dense.cfg, 0.3)
    eng = build_hybrid_engine(dense.cfg, host, mode="oracle", hot_indices=hot, max_seq_len=64)
    a = dense.generate([1, 5, 9, 12], max_new_tokens=16, stop_at_eos=False).token_ids
    res = eng.generate([1, 5, 9, 12], max_new_tokens=16, stop_at_eos=False)
    assert res.token_ids == a
    assert res.stats["ffn_computed"] < res.stats["ffn_total"]  # ReLU zeros skipped on the device


@pytest.mark.parametrize("offload", [0, 1, 2])
def test_layer_offload_baseline_equals_dense(model, offload):
    _, _, dense, host = model
    cfg = dense.cfg
    eng = build_hybrid_engine(cfg, host, mode="dense", hot_indices=offload_hot_indices(cfg, offload), max_seq_len=64)
    ids = _ids(seed=3)
    ref = dense.logits(ids)
    np.testing.assert_allclose(eng.logits(ids), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    rep = eng.memory_report()
    assert rep["hot_neurons_per_layer"] == [0] * (cfg.num_layers - offload) + [cfg.intermediate_size] * offload
    assert rep["host"]["ffn_cold"] > 0 if offload < cfg.num_layers else rep["host"]["ffn_cold"] == 0


def test_offload_layers_out_of_range(model):
    _, _, dense, _ = model
    with pytest.raises(ValueError, match="offload_layers must be in"):
        offload_hot_indices(dense.cfg, dense.cfg.num_layers + 1)


def test_pallas_device_kernel_in_the_engine(model):
    """The GPU path (Pallas Triton kernels, interpret mode here) inside the hybrid decode step."""
    _, _, dense, host = model
    hot = _hot_for_fraction(dense.cfg, 0.3)
    eng = build_hybrid_engine(dense.cfg, host, mode="oracle", hot_indices=hot, max_seq_len=32,
                              device_kernel="pallas")
    ids = _ids(n=6)
    ref = dense.logits(ids)
    got = eng.logits(ids)
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-5

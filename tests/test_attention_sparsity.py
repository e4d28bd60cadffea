"""TEAL-style attention input sparsity: a decode step zeroes the q/k/v and o inputs at or below per-layer
thresholds and reads only the other rows of the transposed weights; equal to a plain forward whose
projection inputs are thresholded (1e-5), prompts exact, calibration on target, bundle and refusals."""
from __future__ import annotations

import numpy as np
import pytest

import powerinfer_jax as pij
from hf_models import VOCAB, make_llama, make_opt
from offline import thresholds as T
from powerinfer_jax import layers
from powerinfer_jax.engine import Engine
from powerinfer_jax.errors import ArgumentError
from powerinfer_jax.params import input_sparse_attention


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("teal"))
    make_llama(path, act="silu")
    dense = pij.load(path, max_seq_len=64, dtype="float32")
    windows = np.random.default_rng(0).integers(3, VOCAB, (8, 32)).astype(np.int32)
    cal = T.calibrate_attention_inputs(dense.params, dense.cfg, windows, 0.5)
    return path, dense, cal


class _Thresholded:
    """layers.linear with the k-th projection input of a trace thresholded (per layer: q/k/v, then o)."""

    def __init__(self, original, thresholds):
        self.original, self.thr, self.k = original, thresholds, 0

    def __call__(self, x, w, b=None, **kw):
        import jax.numpy as jnp

        t = self.thr[self.k // 2][self.k % 2]
        self.k += 1
        return self.original(jnp.where(jnp.abs(x) > t, x, 0.0), w, b, **kw)


def test_calibration_hits_the_target(model):
    import jax.numpy as jnp

    from powerinfer_jax.model import forward

    _, dense, cal = model
    w = np.random.default_rng(0).integers(3, VOCAB, (8, 32)).astype(np.int32)
    _, _, ex = forward(dense.params, dense.cfg, jnp.asarray(w), jnp.broadcast_to(jnp.arange(32), w.shape), collect=True)
    for l, (t_in, t_o) in enumerate(cal["values"]):
        assert abs((np.abs(np.asarray(ex["attn_in"][l])) <= t_in).mean() - 0.5) < 0.01
        assert abs((np.abs(np.asarray(ex["attn_o_in"][l])) <= t_o).mean() - 0.5) < 0.01


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_equals_thresholded_forward(model, dtype, monkeypatch):
    """Every decode step equals a plain forward whose projection inputs are thresholded; prompts are exact."""
    path, _, cal = model
    base = pij.load(path, max_seq_len=64, dtype=dtype)
    eng = Engine(base.cfg, input_sparse_attention(base.params, cal["values"]), max_seq_len=64)
    ids = [1] + np.random.default_rng(3).integers(3, VOCAB, 19).tolist()
    got = eng.logits(ids)  # stepwise: every token a decode step
    plain = base.logits(ids)
    monkeypatch.setattr(layers, "linear", _Thresholded(layers.linear, cal["values"]))
    ref = Engine(base.cfg, base.params, max_seq_len=64)  # a fresh trace through the thresholded projections
    want = np.asarray(ref._full(ref.params, np.asarray([ids + [0] * (32 - len(ids))], np.int32))[0, : len(ids)])
    tol = 1e-5 if dtype == "float32" else 2e-3  # bf16: the transposed rows are the same words, summed in another order
    assert np.abs(got - want).max() / np.abs(want).max() <= tol
    assert np.abs(plain - want).max() / np.abs(want).max() > 1e-3  # the thresholds do change the model
    monkeypatch.undo()
    # The prompt path stays exact: the first generated token is the dense engine's.
    a = base.generate(ids, max_new_tokens=1, stop_at_eos=False).token_ids
    b = eng.generate(ids, max_new_tokens=1, stop_at_eos=False).token_ids
    assert a == b


def test_load_refusals(model, tmp_path):
    path, dense, cal = model
    with pytest.raises(ArgumentError, match="bin/prepare --attention_sparsity"):
        pij.load(path, attention_sparsity=True)
    with pytest.raises(ArgumentError, match="attention_sparsity is off"):
        pij.load(path, attn_input_thresholds=cal["values"])
    with pytest.raises(ArgumentError, match="pairs"):
        pij.load(path, attention_sparsity=True, attn_input_thresholds=[[0.1, 0.1]])
    make_opt(str(tmp_path))
    with pytest.raises(ArgumentError, match="not OPT"):
        pij.load(str(tmp_path), attention_sparsity=True, attn_input_thresholds=[[0.1, 0.1]] * 2)
    eng = pij.load(path, attention_sparsity=True, attn_input_thresholds=cal["values"], max_seq_len=64,
                   sparsity="oracle", act_thresholds=[0.05] * dense.cfg.num_layers)
    assert len(eng.generate([1, 5, 9], max_new_tokens=5, stop_at_eos=False).token_ids) == 5
    from powerinfer_jax import memory

    fixed = dict(memory.fixed_groups(dense.cfg, "float32", 0, 64))
    # Transposed, not duplicated: the same bytes plus the two float32 thresholds of each layer.
    assert eng.memory_report()["device"]["attention"] == fixed["attention"] + 8 * dense.cfg.num_layers

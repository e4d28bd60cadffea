"""ops.host_q8: int4 weights against int8 activations (opt-in `int4_activations="int8"`).

The kernels are checked against a float64 reference of the same rounded activations (exact integer sums: equal
within f32 rounding), and against the exact float32 path within the rounding's stated error; the engine option
end to end on the bundled model. On a CPU without AVX2/F16C only the refusals run (the kernels cannot be built).
"""
import dataclasses

import jax
import numba
import numpy as np
import pytest

from ops import host_kernels as H
from ops import host_q8 as Q
from ops.quant import Weight, dequantize, to_weight

needs_avx2 = pytest.mark.skipif(not Q.SUPPORTED, reason="the int8-activation kernels need x86-64 AVX2 and F16C")
EXACT_RTOL = 2e-6  # against the float64 reference of the rounded activations, relative to the largest output
ROUNDING_RTOL = 0.02  # against the exact f32 path, relative to the largest output (measured ~0.5% on these inputs)
rng = np.random.default_rng(0)


def _w(rows, cols, act="int8"):
    return dataclasses.replace(to_weight(rng.standard_normal((rows, cols)).astype(np.float32), "int4"), act=act)


def _quantize_ref(xk):
    """numpy twin of `_quantize_x` (same formula: dx = amax / 127, q = rint(x / dx))."""
    n_tok, k = xk.shape
    half, groups = k // 2, k // 32
    lo, hi = xk[:, :half].reshape(n_tok, groups, 16), xk[:, half:].reshape(n_tok, groups, 16)
    dx = (np.maximum(np.abs(lo).max(-1), np.abs(hi).max(-1)) / np.float32(127.0)).astype(np.float32)
    def q(v):
        with np.errstate(divide="ignore", invalid="ignore"):  # an all-zero group: 0 / 0, replaced by 0
            return np.where(dx[..., None] > 0, np.clip(np.rint(v / dx[..., None]), -127, 127), 0).astype(np.int8)

    ql, qh = q(lo), q(hi)
    xq = np.concatenate([ql.reshape(n_tok, half), qh.reshape(n_tok, half)], axis=1)
    s = ql.astype(np.int32) + qh
    xoff = (8 * (s[..., 0::2] + s[..., 1::2])).astype(np.int16).reshape(n_tok, k // 4)
    return xq, dx, xoff


@needs_avx2
def test_quantize_x_matches_numpy():
    x = rng.standard_normal((3, 512)).astype(np.float32) * np.float32(3.0)
    x[1, :16] = 0.0  # a group whose low half is zero
    x[1, 256:272] = 0.0  # ... and, with its high half, an all-zero group (scale 0, values 0)
    x[2, 5] = 1e-30  # a tiny value beside normal ones
    got = Q.quantize_x(x)
    want = _quantize_ref(x)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert got[1][1, 0] == 0 and (got[0][1, :16] == 0).all()
    assert np.abs(got[0]).max() == 127  # each group's largest value maps to +-127


@needs_avx2
@pytest.mark.parametrize("rows,cols,batch", [(37, 256, 1), (300, 1024, 3), (4000, 640, 2)])
def test_matvec_matches_the_rounded_reference_and_the_exact_path(rows, cols, batch):
    w = _w(rows, cols)
    x = rng.standard_normal((batch, cols)).astype(np.float32)
    got = H.host_matvec(w, x)
    kw = H._kernel_weight(w)
    xq, dx, _ = Q.quantize_x(H._kernel_x(kw, x))
    want = Q.q4q8_ref(kw.data, kw.scale, xq, dx)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=EXACT_RTOL * scale)
    exact = x @ dequantize(w).T
    np.testing.assert_allclose(got, exact, rtol=0, atol=ROUNDING_RTOL * np.abs(exact).max())
    assert np.abs(got - exact).max() > 0  # the rounding is really there (the option is not a no-op)


@needs_avx2
@pytest.mark.parametrize("family", ["reglu", "drelu", "swiglu", "geglu"])
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_ffn_matches_the_rounded_reference(family, batch):
    d, n = 384, 512
    wg, wu = _w(n, d), _w(n, d)
    wd = to_weight(rng.standard_normal((n, d)).astype(np.float32) * np.float32(0.05), "int4")  # down stays exact
    x = rng.standard_normal((batch, d)).astype(np.float32)
    idx = rng.choice(n, 200, replace=False).astype(np.int32)
    count = 150
    got = H.host_sparse_ffn(family, wg, wu, wd, x, idx, count)
    ku = H._kernel_weight(wu)
    xq, dx, _ = Q.quantize_x(H._kernel_x(ku, x))
    kg = H._kernel_weight(wg)
    rows = idx[:count]
    g = Q.q4q8_ref(kg.data[rows], kg.scale[rows], xq, dx)
    u = Q.q4q8_ref(ku.data[rows], ku.scale[rows], xq, dx)
    want = H._np_glu(family, g, u) @ dequantize(wd)[rows].astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    exact = H.host_sparse_ffn_ref(family, dataclasses.replace(wg, act="float32"),
                                  dataclasses.replace(wu, act="float32"), wd, x, idx, count)
    np.testing.assert_allclose(got, exact, rtol=0, atol=ROUNDING_RTOL * 2 * np.abs(exact).max())


@needs_avx2
def test_serial_parallel_and_batch_position_give_the_same_bits(monkeypatch):
    """Serial and parallel builds agree bit for bit; a token's mat-vec does not depend on the tokens beside it
    (each row's dot is one token's), nor its FFN on its place among them (the down rows of every neuron)."""
    d, n = 256, 300
    wg, wu, wd = _w(n, d), _w(n, d), to_weight(rng.standard_normal((n, d)).astype(np.float32), "int4")
    x = rng.standard_normal((5, d)).astype(np.float32)
    idx = np.arange(n, dtype=np.int32)

    def ffn(xs):
        return H.host_sparse_ffn("reglu", wg, wu, wd, xs, idx, n, skip_zero_rows=False)

    monkeypatch.setattr(H, "SERIAL_MAX_WORK_BYTES", 1 << 40)
    monkeypatch.setattr(H, "SERIAL_MAX_BYTES", 1 << 30)
    serial = ffn(x), H.host_matvec(wu, x)
    monkeypatch.setattr(H, "SERIAL_MAX_BYTES", 0)
    parallel = ffn(x), H.host_matvec(wu, x)
    for s, p in zip(serial, parallel):
        np.testing.assert_array_equal(s, p)
    np.testing.assert_array_equal(H.host_matvec(wu, x[3:4])[0], parallel[1][3])
    np.testing.assert_array_equal(ffn(x[::-1])[4], parallel[0][0])
    np.testing.assert_array_equal(ffn(x[[1, 0]])[1], parallel[0][0])


@needs_avx2
@pytest.mark.parametrize("name", ["_matvec_q4q8_kernel", "_ffn_q4q8_kernel"])
def test_a_q8_kernel_has_no_parallel_region_but_its_prange(monkeypatch, name):
    kernel = getattr(Q, name)
    fresh = numba.njit(parallel=True, fastmath=kernel.targetoptions.get("fastmath", False))(kernel.py_func)
    monkeypatch.setattr(Q, name, fresh)
    monkeypatch.setattr(H, "SERIAL_MAX_BYTES", 0)
    w = _w(64, 128)
    x = rng.random((3, 128)).astype(np.float32)
    if name == "_matvec_q4q8_kernel":
        H.host_matvec(w, x)
    else:
        H.host_sparse_ffn("reglu", w, w, to_weight(np.ones((64, 128), np.float32), "int4"), x, np.arange(64), 64)
    (sig,) = fresh.signatures
    assert fresh.get_metadata(sig)["parfor_diagnostics"].count_parfors() == 1


def test_int8_activations_are_refused_where_they_cannot_run(monkeypatch):
    x = np.ones((1, 100), np.float32)
    with pytest.raises(ValueError, match="int8 activations need int4 rows"):
        H.host_matvec(dataclasses.replace(to_weight(np.ones((4, 100), np.float32), "int8"), act="int8"), x)
    with pytest.raises(ValueError, match="multiple of 64"):  # int4 groups of 32, but not two a step
        H.host_matvec(Weight(np.zeros((4, 48), np.uint8), np.zeros((4, 3), np.uint16), "int4", 96, "int8"),
                      np.ones((1, 96), np.float32))
    monkeypatch.setattr(Q, "SUPPORTED", False)
    with pytest.raises(ValueError, match="without them"):
        H.host_matvec(_w(4, 128), np.ones((1, 128), np.float32))


def test_the_engine_option_is_checked():
    import powerinfer_jax as pij
    from powerinfer_jax.errors import ArgumentError

    with pytest.raises(ArgumentError, match="int4_activations"):
        pij.load(int4_activations="int4")
    if Q.SUPPORTED:
        with pytest.raises(ArgumentError, match="needs int4 weights"):
            pij.load(int4_activations="int8")  # bf16 weights: nothing to take int8 activations


@needs_avx2
def test_bundled_model_int4_with_int8_activations():
    """End to end: the option changes the logits by a little, not the model (the bundled model, int4)."""
    import powerinfer_jax as pij

    exact = pij.load(quantize="int4")
    fast = pij.load(quantize="int4", int4_activations="int8")
    leaves = jax.tree_util.tree_leaves(fast.params, is_leaf=lambda a: isinstance(a, Weight))
    kinds = {w.act for w in leaves if isinstance(w, Weight) and w.fmt == "int4"}
    assert kinds == {"int8"}
    ids = exact.encode("ROMEO:\nWhat light through yonder window breaks?")
    la, lb = exact.logits_stepwise(ids), fast.logits_stepwise(ids)  # decode rows: one token a step
    rel = np.abs(la - lb).max() / np.abs(la).max()
    assert 0 < rel < 0.05, rel
    ra = exact.generate(ids, max_new_tokens=24, temperature=0.0, stop_at_eos=False)
    rb = fast.generate(ids, max_new_tokens=24, temperature=0.0, stop_at_eos=False)
    same = sum(p == q for p, q in zip(ra.token_ids, rb.token_ids))
    assert same >= 12, (ra.text, rb.text)  # greedy text mostly the same


@needs_avx2
def test_prompts_take_the_int8_kernels_up_to_their_own_blas_threshold():
    """The int8-activation kernels beat BLAS further than the exact ones (7B shape: the mat-vec to 256 tokens, the
    FFN to 32): prompts below `blas_min_tokens("int4-a8")` take them; from there on BLAS, exact."""
    assert H.blas_min_tokens("int4-a8") > H.blas_min_tokens("int4")
    assert H.kernel_format(_w(4, 64)) == "int4-a8" and H.kernel_format(_w(4, 64, act="float32")) == "int4"
    w = _w(64, 128)
    exact = dataclasses.replace(w, act="float32")
    below = rng.standard_normal((H.blas_min_tokens("int4") + 8, 128)).astype(np.float32)
    assert not np.array_equal(H.host_matvec(w, below), H.host_matvec(exact, below))  # the int8 kernel, not BLAS
    at = rng.standard_normal((H.blas_min_tokens("int4-a8"), 128)).astype(np.float32)
    np.testing.assert_array_equal(H.host_matvec(w, at), H.host_matvec(exact, at))  # both BLAS

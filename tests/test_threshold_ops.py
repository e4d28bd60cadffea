"""Threshold (CATS) sparsity in the host kernels: |act(gate x)| above a threshold, up/down sparse."""
import ml_dtypes
import numpy as np
import pytest

from ops import host_kernels as H
from ops import reference as R
from ops.quant import dequantize, to_weight

RTOL, ATOL = 1e-5, 1e-5
N, D = 384, 256
GATED = ("swiglu", "geglu", "reglu", "drelu")


def _weights(family, fmt, seed=0):
    wg, wu, wd, _ = R.random_ffn_weights(family, N, D, seed)
    if fmt != "float32":
        wg, wu, wd = (to_weight(w, fmt) for w in (wg, wu, wd))
    return wg, wu, wd


def _median_threshold(family, wg, x):
    """A threshold that makes about half (ReLU kinds: three quarters) of the neurons inactive for x."""
    g = np.atleast_2d(x) @ (dequantize(wg) if not isinstance(wg, np.ndarray) else wg).T
    return float(np.quantile(np.abs(H._np_act(family, g)), 0.75 if family in ("reglu", "drelu") else 0.5))


@pytest.mark.parametrize("family", GATED)
@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8", "int4"])
@pytest.mark.parametrize("batch", [None, 3])
def test_threshold_kernel_matches_reference(family, fmt, batch):
    wg, wu, wd = _weights(family, fmt)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((D,) if batch is None else (batch, D)).astype(np.float32)
    idx = rng.permutation(N).astype(np.int32)
    count = 301
    t = _median_threshold(family, wg, x)
    live = np.zeros(1, np.int64)
    y = H.host_sparse_ffn(family, wg, wu, wd, x, idx, count, act_threshold=t, live=live)
    want = H.host_sparse_ffn_ref(family, wg, wu, wd, x, idx, count, act_threshold=t)
    scale = np.abs(want).max()
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL * scale)
    # The live count is the neurons above the threshold for some token.
    g = np.atleast_2d(x) @ (wg if isinstance(wg, np.ndarray) else dequantize(wg))[idx[:count]].T
    above = np.any(np.abs(H._np_act(family, g)) > t, axis=0)
    if family != "drelu":  # dReLU's h is also zero where up x < 0: live counts non-zero h
        assert abs(int(live[0]) - int(above.sum())) <= 2  # ties at the threshold may round either way
        assert 0.2 * count < live[0] < 0.95 * count
    # Thresholding changes the result (it is not a no-op) and equals the jnp reference on dequantized weights.
    full = H.host_sparse_ffn_ref(family, wg, wu, wd, x, idx, count)
    assert np.abs(full - want).max() > 1e-3 * scale
    deq = [w if isinstance(w, np.ndarray) else dequantize(w) for w in (wg, wu, wd)]
    sel = np.zeros(N, bool)
    sel[idx[:count]] = True
    wsel = [np.where(sel[:, None], w, 0).astype(np.float32) for w in deq]
    np.testing.assert_allclose(R.dense_ffn_ref(family, *wsel, x, act_threshold=t), want, rtol=1e-4,
                               atol=1e-4 * scale)


@pytest.mark.parametrize("family", ["swiglu", "geglu"])
def test_threshold_prompt_path_matches_decode_path(family):
    """Prompts (from blas_min_tokens tokens) threshold in the BLAS path; each token equals its own decode call."""
    wg, wu, wd = _weights(family, "float32", 2)
    x = np.random.default_rng(3).standard_normal((H.blas_min_tokens("float32", "ffn") + 1, D)).astype(np.float32)
    idx = np.arange(N, dtype=np.int32)
    t = _median_threshold(family, wg, x)
    y = H.host_sparse_ffn(family, wg, wu, wd, x, idx, N, act_threshold=t)
    for b in (0, 5):
        one = H.host_sparse_ffn(family, wg, wu, wd, x[b], idx, N, act_threshold=t)
        np.testing.assert_allclose(y[b], one, rtol=1e-4, atol=1e-5)


def test_zero_threshold_on_relu_equals_no_threshold():
    """For ReGLU, threshold 0 is the ReLU's own mask: the result is the plain kernel's."""
    wg, wu, wd = _weights("reglu", "bfloat16", 4)
    x = np.random.default_rng(5).standard_normal((2, D)).astype(np.float32)
    idx = np.arange(N, dtype=np.int32)
    a = H.host_sparse_ffn("reglu", wg, wu, wd, x, idx, N, act_threshold=0.0)
    b = H.host_sparse_ffn("reglu", wg, wu, wd, x, idx, N)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", ["float32", "bfloat16"])
def test_threshold_rows_inside_jit(fmt):
    """cpu_sparse.threshold_ffn_rows: the kernel through buffer_callback, with its live count."""
    import jax

    from ops.cpu_sparse import threshold_ffn_rows
    from ops.quant import Weight

    wg, wu, wd = _weights("swiglu", fmt, 6)
    x = np.random.default_rng(7).standard_normal((2, D)).astype(np.float32)
    t = _median_threshold("swiglu", wg, x)
    ids = np.arange(N, dtype=np.int32)
    to_jax = (lambda w: jax.tree.map(jax.numpy.asarray, w)) if isinstance(wg, Weight) else jax.numpy.asarray
    f = jax.jit(lambda wg, wu, wd, x, ids, n: threshold_ffn_rows("swiglu", wg, wu, wd, x, ids, n, t, first=100))
    y, live, live_first = f(to_jax(wg), to_jax(wu), to_jax(wd), x, ids, np.int32(N))
    want_live = np.zeros(1, np.int64)
    want = H.host_sparse_ffn("swiglu", wg, wu, wd, x, ids, N, act_threshold=t, live=want_live)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-6, atol=1e-6)
    assert int(live) == int(want_live[0])
    # The count of the first 100 listed neurons (a layer's hot ones come first), from the reference h.
    h = H.host_h_ref("swiglu", wg, wu, x, ids, N, act_threshold=t)
    assert int(live_first) == int(np.any(h[:, :100] != 0, axis=0).sum()) and 0 < int(live_first) < int(live)

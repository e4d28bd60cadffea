"""ops.host_kernels: numba kernels vs the numpy reference, determinism, and jit callbacks."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from ops import host_kernels as H
from ops import reference as R

RTOL, ATOL = 1e-5, 1e-5  # f32 both sides; bf16 storage is widened exactly to f32 by both
N = 384


def _case(family, d, cap, count, batch, seed, dtype):
    wg, wu, wd, bu = R.random_ffn_weights(family, N, d, seed, dtype)
    rng = np.random.default_rng(seed + 3)
    x = rng.standard_normal((d,) if batch is None else (batch, d)).astype(np.float32)
    idx = rng.choice(N, cap, replace=False).astype(np.int32)  # entries >= count are padding
    return wg, wu, wd, bu, x, idx, count


@pytest.mark.parametrize("family", R.FAMILIES)
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("d,batch,seed", [(203, None, 0), (256, 3, 1), (600, None, 2), (128, 16, 3)])
def test_host_sparse_ffn_matches_numpy(family, dtype, d, batch, seed):
    wg, wu, wd, bu, x, idx, count = _case(family, d, 64, 45, batch, seed, dtype)
    y = H.host_sparse_ffn(family, wg, wu, wd, x, idx, count, bu)
    want = H.host_sparse_ffn_ref(family, wg, wu, wd, x, idx, count, bu)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL)
    # ... and the numpy reference agrees with the jnp one (padding given valid=False).
    valid = np.arange(len(idx)) < count
    np.testing.assert_allclose(want, R.sparse_ffn_ref(family, wg, wu, wd, x, idx, valid, bu),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("family", R.FAMILIES)
def test_prompt_blas_path_matches_numba_kernels(family):
    """From blas_min_tokens tokens f32 weights go through GEMMs; they agree with the mat-vec kernels."""
    wg, wu, wd, bu, x, idx, count = _case(family, 256, 64, 45, H.blas_min_tokens("float32", "ffn") + 4, 5,
                                          np.float32)
    y = H.host_sparse_ffn(family, wg, wu, wd, x, idx, count, bu)
    kernels = H.host_axpy_down(wd, idx, count, H.host_sparse_h(family, wg, wu, x, idx, count, bu))
    np.testing.assert_allclose(y, kernels, rtol=RTOL, atol=ATOL)
    every = np.arange(N, dtype=np.int32)  # all rows: the no-gather branch
    np.testing.assert_allclose(H.host_sparse_ffn(family, wg, wu, wd, x, every, N, bu),
                               H.host_sparse_ffn_ref(family, wg, wu, wd, x, every, N, bu), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_gather_matvec_and_axpy(dtype, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N, 300)).astype(dtype)
    x = rng.standard_normal((2, 300)).astype(np.float32)
    idx = rng.choice(N, 50, replace=False).astype(np.int32)
    wf = w.astype(np.float32)
    got = H.host_gather_matvec(w, idx, 37, x)
    np.testing.assert_allclose(got, x @ wf[idx[:37]].T, rtol=RTOL, atol=1e-4)  # O(sqrt(300))
    h = rng.standard_normal((2, 37)).astype(np.float32)
    h[:, ::3] = 0  # rows with h == 0 for every token are skipped: must not change the result
    got = H.host_axpy_down(w, idx, 37, h)
    np.testing.assert_allclose(got, h @ wf[idx[:37]], rtol=RTOL, atol=1e-4)


def test_deterministic_and_empty():
    wg, wu, wd, _, x, idx, _ = _case("reglu", 1000, 128, 128, None, 5, np.float32)
    runs = [H.host_sparse_ffn("reglu", wg, wu, wd, x, idx, 128) for _ in range(3)]
    assert all(np.array_equal(runs[0], r) for r in runs[1:])  # bitwise, run to run
    y = H.host_sparse_ffn("reglu", wg, wu, wd, x, idx, 0)
    assert np.all(y == 0)


def test_rejects_bad_inputs():
    """numba does no bounds checks, so the wrappers must refuse what would read out of bounds."""
    x = np.ones(8, np.float32)
    with pytest.raises(TypeError):  # float32/bfloat16/float16 arrays or an ops.quant.Weight
        H.host_gather_matvec(np.ones((4, 8), np.float64), np.zeros(2, np.int32), 2, x)
    w = np.ones((4, 8), np.float32)
    with pytest.raises(IndexError):
        H.host_gather_matvec(w, np.array([1, 4], np.int32), 2, x)
    with pytest.raises(ValueError):
        H.host_gather_matvec(w, np.array([1, 2], np.int32), 3, x)
    H.host_gather_matvec(w, np.array([1, 99], np.int32), 1, x)  # padding past count is ignored


@pytest.mark.parametrize("method", ["buffer", "pure"])
@pytest.mark.parametrize("family,dtype,batch", [
    ("reglu", np.float32, None), ("relu", ml_dtypes.bfloat16, 2)])
def test_callback_inside_jit(method, family, dtype, batch):
    if method == "buffer" and jax.default_backend() != "cpu":
        pytest.skip("buffer_callback hands numpy-unreadable device buffers off the CPU backend")
    wg, wu, wd, bu, x, idx, count = _case(family, 160, 48, 30, batch, 7, dtype)

    @jax.jit
    def f(x, idx, count):
        hot = jnp.sum(x) * 0.0  # some XLA work around the callback
        return H.host_ffn_callback(family, wg, wu, wd, x, idx, count, bu, method=method) + hot

    want = H.host_sparse_ffn_ref(family, wg, wu, wd, x, idx, count, bu)
    np.testing.assert_allclose(f(x, idx, np.int32(count)), want, rtol=RTOL, atol=ATOL)
    # A count above the capacity (overflowed selection) uses the C entries that exist.
    want_all = H.host_sparse_ffn_ref(family, wg, wu, wd, x, idx, len(idx), bu)
    np.testing.assert_allclose(f(x, idx, np.int32(500)), want_all, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("family", R.FAMILIES)
def test_serial_and_parallel_kernels_agree_bit_for_bit(family, monkeypatch):
    """Small calls run the single-threaded build of the same kernels: same work split, same bits."""
    wg, wu, wd, bu, x, idx, count = _case(family, 256, 64, 45, 2, 7, np.float32)
    monkeypatch.setattr(H, "SERIAL_MAX_WORK_BYTES", 1 << 40)  # serial: by bytes alone
    monkeypatch.setattr(H, "SERIAL_MAX_BYTES", 1 << 30)
    serial = H.host_sparse_ffn(family, wg, wu, wd, x, idx, count, bu)
    monkeypatch.setattr(H, "SERIAL_MAX_BYTES", 0)
    parallel = H.host_sparse_ffn(family, wg, wu, wd, x, idx, count, bu)
    np.testing.assert_array_equal(serial, parallel)
    np.testing.assert_allclose(serial, H.host_sparse_ffn_ref(family, wg, wu, wd, x, idx, count, bu),
                               rtol=RTOL, atol=ATOL)


# bf16 (float16 shares its compiled kernels) and int4 (its own h and down paths, natural column order); int8 runs
# the elementwise code with row scales, against the reference in test_ops_quant. Each format compiles six kernels.
@pytest.mark.parametrize("fmt", ["bfloat16", "int4"])
@pytest.mark.parametrize("family,batch", [("reglu", 1), ("relu", 5), ("swiglu", 4)])
@pytest.mark.parametrize("skip_zero", [True, False])
def test_one_region_ffn_equals_gate_up_then_down_bit_for_bit(fmt, family, batch, skip_zero, monkeypatch):
    """`_ffn_kernel` (each chunk's h, then its down rows) sums exactly what `_h_kernel` then `_down_kernel` do,
    serial and parallel, reading every down row or skipping the zero ones."""
    from ops.quant import to_weight

    rng = np.random.default_rng(11)
    d, n, count = 64, 200, 150

    def w():
        return to_weight(rng.standard_normal((n, d)).astype(np.float32) * 0.1, fmt)

    wg, wu, wd = (None if family == "relu" else w()), w(), w()
    bu = rng.standard_normal(n).astype(np.float32) if family == "relu" else None
    x = rng.standard_normal((batch, d)).astype(np.float32)
    idx = rng.permutation(n).astype(np.int32)
    for serial_bytes in (0, 1 << 40):
        monkeypatch.setattr(H, "SERIAL_MAX_BYTES", serial_bytes)
        monkeypatch.setattr(H, "SERIAL_MAX_WORK_BYTES", serial_bytes)
        y = H.host_sparse_ffn(family, wg, wu, wd, x, idx, count, bu, skip_zero_rows=skip_zero)
        h = H.host_sparse_h(family, wg, wu, x, idx, count, bu)
        np.testing.assert_array_equal(y, H.host_axpy_down(wd, idx, count, h, skip_zero_rows=skip_zero))
        np.testing.assert_allclose(y, H.host_sparse_ffn_ref(family, wg, wu, wd, x, idx, count, bu),
                                   rtol=1e-4, atol=1e-4)


def test_read_only_weights_are_used_in_place_and_left_untouched():
    """Numpy views of JAX CPU buffers are read-only; the kernels alias them (no copy) and never write."""
    wg, wu, wd, bu, x, idx, count = _case("reglu", 256, 64, 45, 2, 9, np.float32)
    dev = [np.asarray(jnp.asarray(w)) for w in (wg, wu, wd)]
    assert not dev[0].flags.writeable
    before = [w.copy() for w in dev]
    y = H.host_sparse_ffn("reglu", *dev, x, idx, count)
    np.testing.assert_allclose(y, H.host_sparse_ffn_ref("reglu", wg, wu, wd, x, idx, count), rtol=RTOL, atol=ATOL)
    for w, b in zip(dev, before):
        np.testing.assert_array_equal(w, b)
    assert H._kernel_weight(dev[0]).data.ctypes.data == dev[0].ctypes.data  # an alias, not a copy


@pytest.mark.parametrize("batch,seed", [(1, 0), (4, 1), (16, 2)])
def test_select_union_matches_numpy(batch, seed):
    """host_select_union: the union over the marked rows, hot positions first, ties at the threshold kept."""
    rng = np.random.default_rng(seed)
    n, n_hot = 300, 70
    scores = rng.standard_normal((batch, n)).astype(np.float32)
    scores[:, ::17] = 0.5  # exactly at the threshold: active (>=)
    rows = rng.random(batch) < 0.7
    rows[0] = True
    order = rng.permutation(1000)[:n].astype(np.int32)  # neuron ids of the scored positions
    ids, count, hot = H.host_select_union(scores, rows, 0.5, order[:n_hot], order[n_hot:])
    want, want_hot = H.host_select_union_ref(scores, rows, 0.5, order[:n_hot], order[n_hot:])
    assert count == len(want) > 0 and hot == want_hot > 0
    np.testing.assert_array_equal(ids[:count], want)
    # No marked row: nothing selected.
    assert H.host_select_union(scores, np.zeros(batch, bool), 0.5, order[:n_hot], order[n_hot:])[1] == 0


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8", "int4"])
@pytest.mark.parametrize("batch", [1, 3])
def test_predicted_ffn_rows_equals_predictor_select_and_rows(fmt, batch):
    """cpu_sparse.predicted_ffn_rows (one callback) = the reference predictor, union, selection and FFN."""
    from ops.cpu_sparse import predicted_ffn_rows
    from ops.linear import linear_relu_linear_ref
    from ops.quant import dequantize, to_weight

    family, d, r, n_hot = "reglu", 256, 32, 100
    rng = np.random.default_rng(5)
    wg, wu, wd, bu = R.random_ffn_weights(family, N, d, 4, np.float32)
    wg, wu, wd = (to_weight(w, fmt) for w in (wg, wu, wd))
    fc1, fc2 = to_weight(rng.standard_normal((r, d)).astype(np.float32) / 8, fmt), \
        to_weight(rng.standard_normal((N, r)).astype(np.float32), fmt)
    x_pred, x = (rng.standard_normal((batch, d)).astype(np.float32) for _ in range(2))
    rows = np.array([True, False, True][:batch])
    order = rng.permutation(N).astype(np.int32)
    scores = linear_relu_linear_ref(x_pred, fc1, fc2)
    s0 = np.sort(scores[0])
    thr = float((s0[int(0.8 * N)] + s0[int(0.8 * N) + 1]) / 2)  # a fifth of row 0's neurons, no score near it
    as_jax = lambda w: jax.tree.map(jnp.asarray, w)  # noqa: E731
    f = jax.jit(lambda *a: predicted_ffn_rows(family, *a[:2], thr, *a[2:]))
    y, count, hot = f(as_jax(fc1), as_jax(fc2), order[:n_hot], order[n_hot:], as_jax(wg), as_jax(wu), as_jax(wd),
                      None, x_pred, x, rows)
    ids, want_hot = H.host_select_union_ref(scores, rows, thr, order[:n_hot], order[n_hot:])
    want = H.host_sparse_ffn_ref(family, *(dequantize(w) for w in (wg, wu, wd)), x, ids, len(ids))
    assert int(count) == len(ids) > 0 and int(hot) == want_hot > 0
    np.testing.assert_allclose(np.asarray(y), want, rtol=2e-4, atol=2e-4)
    # compute_rows=False (profile_decode's predictor part): the same selection, no rows computed.
    g = jax.jit(lambda *a: predicted_ffn_rows(family, *a[:2], thr, *a[2:], compute_rows=False))
    y0, count0, hot0 = g(as_jax(fc1), as_jax(fc2), order[:n_hot], order[n_hot:], as_jax(wg), as_jax(wu), as_jax(wd),
                         None, x_pred, x, rows)
    assert (int(count0), int(hot0)) == (int(count), int(hot)) and not np.asarray(y0).any()


def test_the_serial_rule_counts_weight_bytes_and_tokens():
    """One thread for a call under SERIAL_MAX_BYTES of weights whose bytes x tokens stay under
    SERIAL_MAX_WORK_BYTES; a many-token call over the same small weight takes both threads."""
    kw = H._kernel_weight(np.zeros((1536, 384), H.BF16))  # the bundled model's up projection, 1.1 MiB
    assert kw.rows * kw.row_bytes <= H.SERIAL_MAX_BYTES
    assert H._serial(kw.rows, kw, 1) and H._serial(kw.rows, kw, 4)
    assert not H._serial(kw.rows, kw, 16)
    assert not H._serial(2 * H.SERIAL_MAX_BYTES // kw.row_bytes, kw, 1)  # over the byte limit: parallel


def test_read_only_weights_get_one_cached_writeable_alias():
    """The kernels take a writeable alias of a read-only buffer (numba compiles read-only arrays into slower code);
    the alias is cached by address, shape and dtype, and views the same memory."""
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    a.flags.writeable = False
    alias = H._writable_alias(a)
    assert alias.flags.writeable and alias.ctypes.data == a.ctypes.data and np.array_equal(alias, a)
    assert H._writable_alias(a) is alias
    other = H._writable_alias(a.reshape(4, 3))  # same address, another shape: its own alias
    assert other is not alias and other.shape == (4, 3)
    with pytest.raises(ValueError, match="out has shape"):
        H._out(np.empty((2, 5), np.float32), (3, 4))

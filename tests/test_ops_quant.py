"""ops.quant (weight formats) and the host kernels in every format, against dequantize-then-f32 numpy.

Tolerances: the kernels and the references compute in float32 from the same stored values, in a
different order (vectorised sums, the int8 row scale applied after the sum instead of per
element). Their difference is f32 rounding: we allow atol = 1e-5 * max|reference| plus rtol 1e-5.
"""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from numba import njit
from numba import types as numba_types

from ops import host_elements
from ops import host_kernels as H
from ops import quant as Q
from ops import reference as R

N = 203  # rows: not a multiple of 4 (the kernels' row groups) nor of the chunk counts
D = 96   # columns: three int4 groups


def _assert_close(got, want):
    want = np.asarray(want, np.float32)
    scale = float(np.abs(want).max()) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale + 1e-30)


def _weights(fmt, rows=N, cols=D, seed=0):
    w = (np.random.default_rng(seed).standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
    return Q.to_weight(w, fmt), w


# ---------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_to_weight_layout_and_round_trip(fmt):
    W, w = _weights(fmt)
    want_dtype = {"float32": np.float32, "bfloat16": Q.BF16, "float16": np.uint16, "int8": np.int8,
                  "int4": np.uint8}[fmt]
    assert W.data.dtype == want_dtype and W.shape == (N, D) and W.rows == N and W.cols == D
    assert W.nbytes == N * Q.format_bytes_per_row(fmt, D)
    back = Q.dequantize(W)
    assert back.dtype == np.float32 and back.shape == (N, D)
    if fmt in ("float32", "bfloat16", "float16"):
        assert W.scale is None
        np.testing.assert_array_equal(back, w.astype(Q._FLOAT_DTYPES[fmt]).astype(np.float32))  # RNE
    elif fmt == "int8":
        assert W.scale.dtype == np.float32 and W.scale.shape == (N,)
        np.testing.assert_array_equal(W.scale, (np.abs(w).max(1) / np.float32(127)).astype(np.float32))
        assert np.abs(W.data.astype(int)).max() == 127
        err = np.abs(back - w).max(1)
        assert np.all(err <= W.scale / 2 * (1 + 1e-6))
    else:
        assert W.scale.dtype == np.uint16 and W.scale.shape == (N, D // Q.GROUP)
        d = W.scale.view(np.float16).astype(np.float32)[..., None]  # [N, G, 1], signed
        g = w.reshape(N, -1, Q.GROUP)
        err = np.abs(back.reshape(g.shape) - g)
        q = Q._int4_nibbles(W.data, D).reshape(g.shape)
        # Q4_0 spans [-8d, 7d]: values beyond 7.5|d| on the side opposite the group's extreme
        # are clipped to q = 15 and lose up to |d|; every other value is within |d|/2.
        clipped = np.rint(g / d) > 7
        bound = np.broadcast_to(np.abs(d), g.shape)
        assert np.all(err[~clipped] <= bound[~clipped] / 2 * (1 + 1e-6))
        assert np.all(q[clipped] == 15) and np.all(err <= bound * (1 + 1e-6))
        # the group's largest-magnitude value maps to q = 0 (d = m / -8)
        amax = np.abs(g).argmax(-1)
        assert np.all(np.take_along_axis(q, amax[..., None], -1) == 0)


def test_zero_rows_and_groups():
    w = np.zeros((3, 64), np.float32)
    w[1, 32:] = np.linspace(-1, 1, 32)
    W8 = Q.to_weight(w, "int8")
    assert W8.scale[0] == 0 and np.all(W8.data[0] == 0)
    W4 = Q.to_weight(w, "int4")
    assert W4.scale[0, 0] == 0 and np.all(W4.data[0] == 0x88)  # d = 0: every q is 8
    for W in (W8, W4):
        assert np.all(Q.dequantize(W)[0] == 0)
        np.testing.assert_array_equal(H.host_matvec(W, np.ones(64, np.float32))[[0, 2]], 0)


def test_int4_packing_by_hand():
    """One group: d = 0.5 (extreme -4 at column 0); column t (t < 16) holds q = t in the low
    nibble of byte t, column 16 + t holds q = 15 - t in its high nibble."""
    v = np.concatenate([0.5 * (np.arange(16) - 8), 0.5 * (7 - np.arange(16))]).astype(np.float32)
    W = Q.to_weight(v[None], "int4")
    assert W.scale[0, 0] == np.float16(0.5).view(np.uint16) == 0x3800
    t = np.arange(16)
    np.testing.assert_array_equal(W.data[0], (t | ((15 - t) << 4)).astype(np.uint8))
    np.testing.assert_array_equal(Q.dequantize(W)[0], v)


def test_float_inputs_of_any_dtype_and_views():
    w = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    for src in (np.float32, np.float16, ml_dtypes.bfloat16, np.float64):
        a = w.astype(src)
        for fmt in ("bfloat16", "float16"):
            W = Q.to_weight(a, fmt)
            np.testing.assert_array_equal(Q.dequantize(W), a.astype(Q._FLOAT_DTYPES[fmt]).astype(np.float32))
            if a.dtype == Q._FLOAT_DTYPES[fmt]:
                assert np.shares_memory(W.data, a)  # stored as is: a view of the caller's array
        for fmt in ("int8", "int4"):
            Q.dequantize(Q.to_weight(a, fmt))
    assert Q.to_weight(w, "float32").data is w
    assert Q.storage_format(np.float16) == "float16" and Q.storage_format(ml_dtypes.bfloat16) == "bfloat16"
    assert Q.storage_format(np.float32) == "float32"
    assert Q.format_bytes_per_row("int4", 4096) == 2048 + 256
    assert Q.format_bytes_per_row("int8", 4096) == 4096 + 4


def test_rejects_bad_formats_and_shapes():
    w = np.ones((4, 40), np.float32)
    with pytest.raises(ValueError, match="cols % 32"):
        Q.to_weight(w, "int4")
    with pytest.raises(ValueError, match="unknown weight format"):
        Q.to_weight(w, "int3")
    with pytest.raises(ValueError, match="2-D"):
        Q.to_weight(np.ones(8, np.float32), "int8")
    with pytest.raises(ValueError):
        Q.to_weight(np.ones((4, 32), np.int32), "int8")
    with pytest.raises(ValueError):
        Q.storage_format(np.int8)
    with pytest.raises(ValueError):
        Q.format_bytes_per_row("int4", 40)
    x = np.ones(40, np.float32)
    with pytest.raises(ValueError, match="cols % 32"):
        H.host_matvec(Q.Weight(np.zeros((4, 20), np.uint8), np.zeros((4, 1), np.uint16), "int4", 40), x)
    with pytest.raises(ValueError, match="unknown weight format"):
        H.host_matvec(Q.Weight(w, None, "int3", 40), x)
    with pytest.raises(ValueError, match="int8 scale"):
        H.host_matvec(Q.Weight(np.zeros((4, 40), np.int8), np.zeros(3, np.float32), "int8", 40), x)
    with pytest.raises(ValueError, match="needs data"):
        H.host_matvec(Q.Weight(np.zeros((4, 40), np.int8), None, "bfloat16", 40), x)
    with pytest.raises(ValueError, match="features"):
        H.host_matvec(Q.to_weight(np.ones((4, 64), np.float32), "int4"), x)
    with pytest.raises(TypeError):
        H.host_matvec(np.ones((4, 40), np.float64), x)
    wg, wu = Q.to_weight(np.ones((4, 64), np.float32), "int8"), Q.to_weight(np.ones((4, 64), np.float32), "int4")
    with pytest.raises(ValueError, match="share format"):
        H.host_sparse_h("reglu", wg, wu, np.ones(64, np.float32), np.arange(4), 4)


def test_f16_conversion_is_exact_for_every_bit_pattern():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(want)

    @njit
    def convert(f, bits):
        out = np.empty(bits.shape[0], np.float32)
        for i in range(bits.shape[0]):
            out[i] = f(bits[i])
        return out

    trick = convert(Q.f16_bits_to_f32_trick, bits)
    np.testing.assert_array_equal(trick.view(np.uint32), want.view(np.uint32))  # NaN payloads too
    kernel = convert(host_elements._f16, bits)  # the kernels' conversion (the CPU's instruction where it has one)
    np.testing.assert_array_equal(kernel.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
    assert np.all(np.isnan(kernel[nan])) and np.array_equal(np.signbit(kernel[nan]), np.signbit(want[nan]))
    # ... and through a kernel: every finite pattern as a float16 row read by the mat-vec
    finite = bits[np.isfinite(want)].reshape(-1, 8)
    W = Q.Weight(finite, None, "float16", 8)
    got = H.host_matvec(W, np.eye(8, dtype=np.float32)[:3])  # three one-hot tokens: columns 0..2
    np.testing.assert_array_equal(got, finite.view(np.float16).astype(np.float32)[:, :3].T)


def test_jnp_dequantize_matches_numpy_and_weight_is_a_pytree():
    idx = np.array([5, 0, 17, 5], np.int32)
    for fmt in Q.FORMATS:
        W, _ = _weights(fmt, rows=24, cols=64)
        want = Q.dequantize(W)
        Wj = jax.tree.map(jnp.asarray, W)
        assert isinstance(Wj, Q.Weight) and Wj.fmt == fmt and Wj.cols == 64
        np.testing.assert_array_equal(np.asarray(jax.jit(Q.dequantize_jnp)(Wj)), want)
        np.testing.assert_array_equal(np.asarray(Q.dequantize_rows_jnp(Wj, idx)), want[idx])
        leaves = jax.tree.leaves(W)
        assert len(leaves) == (1 if W.scale is None else 2)


# ---------------------------------------------------------------- kernels in every format
@pytest.mark.parametrize("fmt", Q.FORMATS)
@pytest.mark.parametrize("batch", [None, 1, 2, 3, 4, 5, 9])
def test_matvec(fmt, batch):
    W, _ = _weights(fmt, seed=2)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(D if batch is None else (batch, D)).astype(np.float32)
    want = x @ Q.dequantize(W).T
    got = H.host_matvec(W, x)
    assert got.shape == want.shape and got.dtype == np.float32
    _assert_close(got, want)
    out = np.full((1 if batch is None else batch, N), np.nan, np.float32)
    assert H.host_matvec(W, x, out=out) is out
    np.testing.assert_array_equal(out.reshape(got.shape), got)  # bit-identical, run to run
    _assert_close(H.host_matmul_blocked(W, np.atleast_2d(x)), np.atleast_2d(want))
    if batch is not None and batch >= 3 and H.blas_min_tokens(fmt) > batch:
        # From two tokens on, the elementwise formats take rows four at a time against the tokens four at a time:
        # a token's sums do not depend on the tokens beside it or on its place among them
        np.testing.assert_array_equal(H.host_matvec(W, x[[2, 0]])[0], got[2])
        np.testing.assert_array_equal(H.host_matvec(W, x[::-1])[batch - 1], got[0])


@pytest.mark.parametrize("fmt", Q.FORMATS)
@pytest.mark.parametrize("family", ["reglu", "swiglu"])
@pytest.mark.parametrize("batch", [2, 4, 5, 9])
def test_gated_h_takes_four_tokens_at_a_time(fmt, family, batch, monkeypatch):
    """From two tokens on the elementwise formats run the gate/up kernel's neurons against four tokens at a time
    (`_dot4x4`, a short last group repeating its last token): every token within f32 rounding of the reference,
    with padding in idx and a count that is no multiple of four; a token's values do not depend on the tokens
    beside it or its place among them (bit for bit); within 1e-6 of the one-token passes (GATED_FOUR_TOKENS=False)."""
    wg, wu, _, bu = R.random_ffn_weights(family, N, D, seed=8)
    wg, wu = Q.to_weight(wg, fmt), Q.to_weight(wu, fmt)
    rng = np.random.default_rng(9)
    idx = rng.choice(N, 90, replace=False).astype(np.int32)
    count = 77  # idx[77:] is padding
    x = rng.standard_normal((batch, D)).astype(np.float32)
    got = H.host_sparse_h(family, wg, wu, x, idx, count, bu)
    _assert_close(got, H.host_h_ref(family, wg, wu, x, idx, count, bu))
    np.testing.assert_array_equal(H.host_sparse_h(family, wg, wu, x[[1, 0]], idx, count, bu)[1], got[0])
    np.testing.assert_array_equal(H.host_sparse_h(family, wg, wu, x[::-1], idx, count, bu)[batch - 1], got[0])
    monkeypatch.setattr(H, "GATED_FOUR_TOKENS", False)
    one_at_a_time = H.host_sparse_h(family, wg, wu, x, idx, count, bu)
    np.testing.assert_allclose(one_at_a_time, got, rtol=1e-6, atol=1e-6 * float(np.abs(got).max()))


@njit
def _dot4x4_both_ways(one_pass, two_passes, rows, xs):
    """Both register blocks of `_dot4x4` over four rows and four token vectors (a numba caller: they inline)."""
    return (one_pass(rows[0], rows[1], rows[2], rows[3], xs[0], xs[1], xs[2], xs[3]),
            two_passes(rows[0], rows[1], rows[2], rows[3], xs[0], xs[1], xs[2], xs[3]))


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "float16", "int8"])
@pytest.mark.parametrize("cols", [8, 61, 384])
def test_dot4x4_register_blocks_agree(fmt, cols):
    """`_dot4x4` as one pass of four rows (32-register ISAs) and as two passes of two (AVX2's 16 registers; the
    CPU picks one at compile time, `FOUR_TOKEN_BLOCKS_IN_TWO_PASSES`): both give the 16 sums row-major, each within f32
    rounding of the float64 product of the stored rows, whichever this CPU runs."""
    short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int8": "i8"}[fmt]
    one_pass = getattr(host_elements, f"_{short}_dot4x4_one_pass")
    two_passes = getattr(host_elements, f"_{short}_dot4x4_two_passes")
    rng = np.random.default_rng(cols)
    w = Q.to_weight(rng.standard_normal((4, cols)).astype(np.float32), fmt)
    stored = np.ascontiguousarray(w.data).view(np.uint16) if fmt in ("bfloat16", "float16") else np.asarray(w.data)
    xs = rng.standard_normal((4, cols)).astype(np.float32)
    unscaled = stored.astype(np.float64) if fmt == "int8" else Q.dequantize(w).astype(np.float64)  # no row scales
    want = (unscaled @ xs.astype(np.float64).T).ravel()  # row i, token j at 4i + j
    bound = 1e-6 * np.abs(unscaled).sum(1).repeat(4) * np.abs(xs).max() + 1e-30
    for got in _dot4x4_both_ways(one_pass, two_passes, stored, xs):
        assert np.all(np.abs(np.asarray(got, np.float64) - want) <= bound)


@njit
def _axpy8x4_both_ways(one_pass, two_passes, accs, coefs, rows):
    """Both register blocks of `_axpy8x4` into their own accumulators [2, 4, K] (a numba caller: they inline)."""
    a, b = accs[0], accs[1]
    one_pass(a[0], a[1], a[2], a[3], coefs, rows[0], rows[1], rows[2], rows[3], rows[4], rows[5], rows[6], rows[7])
    two_passes(b[0], b[1], b[2], b[3], coefs, rows[0], rows[1], rows[2], rows[3], rows[4], rows[5], rows[6], rows[7])


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "float16", "int8"])
@pytest.mark.parametrize("cols", [8, 61, 384])
def test_axpy8x4_register_blocks_agree(fmt, cols):
    """`_axpy8x4` as one pass of eight rows and as two passes of four (`FOUR_TOKEN_BLOCKS_IN_TWO_PASSES`): both add
    token t's sum_i c[8t + i] * row_i to accumulator t, within f32 rounding of the float64 result."""
    short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int8": "i8"}[fmt]
    one_pass = getattr(host_elements, f"_{short}_axpy8x4_one_pass")
    two_passes = getattr(host_elements, f"_{short}_axpy8x4_two_passes")
    rng = np.random.default_rng(cols + 1)
    w = Q.to_weight(rng.standard_normal((8, cols)).astype(np.float32), fmt)
    stored = np.ascontiguousarray(w.data).view(np.uint16) if fmt in ("bfloat16", "float16") else np.asarray(w.data)
    unscaled = stored.astype(np.float64) if fmt == "int8" else Q.dequantize(w).astype(np.float64)
    coefs = rng.standard_normal(32).astype(np.float32)
    start = rng.standard_normal((4, cols)).astype(np.float32)
    accs = np.stack([start, start])
    _axpy8x4_both_ways(one_pass, two_passes, accs, coefs, stored)
    want = start + coefs.reshape(4, 8).astype(np.float64) @ unscaled
    bound = 1e-6 * (np.abs(start) + np.abs(coefs.reshape(4, 8)) @ np.abs(unscaled)) + 1e-30
    for got in accs:
        assert np.all(np.abs(got - want) <= bound)


@pytest.mark.parametrize("fmt", Q.FORMATS)
@pytest.mark.parametrize("batch", [4, 5, 8, 11])
def test_axpy_down_takes_four_tokens_at_a_time(fmt, batch, monkeypatch):
    """From four tokens on the elementwise formats run the down kernel's eight rows against four tokens a pass
    (`_axpy8x4`), the rest of the tokens one at a time: every token within f32 rounding of the reference,
    with skipped zero rows, padding in idx and a count that is no multiple of the eight rows; each token
    within 1e-6 of its value in any other batch and of the one-token passes (AXPY_FOUR_TOKENS=False: only
    summation order differs); the same bits run to run."""
    W, _ = _weights(fmt, seed=4)
    wf = Q.dequantize(W)
    rng = np.random.default_rng(5)
    idx = rng.choice(N, 90, replace=False).astype(np.int32)
    count = 77  # idx[77:] is padding
    h = rng.standard_normal((batch, count)).astype(np.float32)
    h[:, ::5] = 0  # rows zero for every token: skipped
    h[1, 1::7] = 0  # zeros of one token only: read, coefficient 0
    want = h @ wf[idx[:count]]
    for skip in (True, False):
        got = H.host_axpy_down(W, idx, count, h, skip_zero_rows=skip)
        _assert_close(got, want)
        np.testing.assert_array_equal(H.host_axpy_down(W, idx, count, h, skip_zero_rows=skip), got)
        for other in (h[:1], h[[2, 0, 3, 1]], h[::-1]):
            alone = H.host_axpy_down(W, idx, count, other, skip_zero_rows=skip)
            ref = other @ wf[idx[:count]]
            _assert_close(alone, ref)
            np.testing.assert_allclose(alone, [got[list(map(tuple, h)).index(tuple(r))] for r in other],
                                       rtol=1e-6, atol=1e-6 * float(np.abs(want).max()))
        monkeypatch.setattr(H, "AXPY_FOUR_TOKENS", False)
        one_at_a_time = H.host_axpy_down(W, idx, count, h, skip_zero_rows=skip)
        monkeypatch.setattr(H, "AXPY_FOUR_TOKENS", True)
        np.testing.assert_allclose(one_at_a_time, got, rtol=1e-6, atol=1e-6 * float(np.abs(want).max()))


@pytest.mark.parametrize("fmt", Q.FORMATS)
@pytest.mark.parametrize("cols", [384, 4096])
def test_matvec_one_row_kernels(fmt, cols, monkeypatch):
    """One token in bf16 goes through the pair kernel (its rows read as uint32 pairs), in f16 or over int8 rows
    shorter than I8_ONE_ROW_BELOW_COLS through the one-row kernel (parallel, or their one-thread twins below
    SERIAL_MAX_BYTES), two tokens and the other cases through the eight-stream ones; each result equals the
    reference and repeats its bits, and the bf16 pair kernel equals the one-row kernel within f32 rounding."""
    W, _ = _weights(fmt, rows=37, cols=cols, seed=11)
    wf = Q.dequantize(W)
    x = np.random.default_rng(12).standard_normal((2, cols)).astype(np.float32)
    calls = []
    names = ("_one_row_matvec_kernel", "_bf16_pair_matvec_kernel")
    for name in names + tuple(n + "_serial" for n in names):
        kernel = getattr(H, name)
        monkeypatch.setattr(H, name, lambda *a, k=kernel, n=name: calls.append((n, a[-2].shape)) or k(*a))
    monkeypatch.setattr(H, "SERIAL_MAX_WORK_BYTES", 1 << 40)  # serial: by bytes alone
    for serial_bytes in (0, 1 << 40):  # parallel, then serial kernels
        monkeypatch.setattr(H, "SERIAL_MAX_BYTES", serial_bytes)
        for n in (1, 2):
            got = H.host_matvec(W, x[:n])
            _assert_close(got, x[:n] @ wf.T)
            np.testing.assert_array_equal(H.host_matvec(W, x[:n]), got)
    one_row = fmt == "float16" or fmt == "int8" and cols < H.I8_ONE_ROW_BELOW_COLS
    bf16 = fmt == "bfloat16"
    kernel, shape = ("_bf16_pair_matvec_kernel", (cols // 2,)) if bf16 else ("_one_row_matvec_kernel", (1, cols))
    assert calls == ([(kernel, shape)] * 2 + [(kernel + "_serial", shape)] * 2 if one_row or bf16 else [])
    if fmt == "bfloat16":
        pairs = H.host_matvec(W, x[:1])
        monkeypatch.setattr(H, "BF16_PAIRS", False)
        np.testing.assert_allclose(H.host_matvec(W, x[:1]), pairs, rtol=1e-6, atol=1e-6 * float(np.abs(pairs).max()))


def test_bf16_odd_width_one_token_takes_the_one_row_kernel(monkeypatch):
    """bf16 rows of odd length (predictors of odd rank) cannot be read as uint32 pairs: one token goes through the
    one-row kernel, and equals the reference."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((9, 385)).astype(np.float32)
    W = Q.to_weight(w, "bfloat16")
    x = rng.standard_normal(385).astype(np.float32)
    calls = []
    kernel = H._one_row_matvec_kernel_serial
    monkeypatch.setattr(H, "_one_row_matvec_kernel_serial", lambda *a: calls.append(a[1].shape) or kernel(*a))
    _assert_close(H.host_matvec(W, x), Q.dequantize(W) @ x)
    assert calls == [(9, 385)]


@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_both_sides_of_the_blas_thresholds(fmt):
    """Below and at blas_min_tokens: x @ w.T (host_matvec) and h @ w (linear's transposed product, the
    axpy kernel or host_matmul_t_blocked) equal the dequantize-then-f32 reference."""
    from ops.linear import _host_linear_t

    W, _ = _weights(fmt, seed=8)
    wf = Q.dequantize(W)
    rng = np.random.default_rng(9)
    for product in ("matvec", "axpy"):
        least = H.blas_min_tokens(fmt, product)
        assert least >= 1
        for n in (least - 1, least):
            if n < 1:
                continue
            if product == "matvec":
                x = rng.standard_normal((n, D)).astype(np.float32)
                _assert_close(H.host_matvec(W, x), x @ wf.T)
            else:
                h = rng.standard_normal((n, N)).astype(np.float32)
                out = np.full((n, D), np.nan, np.float32)
                _host_linear_t(W, h, out)
                _assert_close(out, h @ wf)
    h = rng.standard_normal((3, N)).astype(np.float32)
    _assert_close(H.host_matmul_t_blocked(W, h), h @ wf)
    _assert_close(H.host_matmul_t_blocked(W, h[0]), h[0] @ wf)
    tall, _ = _weights(fmt, rows=2 * H.BLAS_BLOCK_ROWS + 37, cols=64, seed=10)  # three row blocks
    h = rng.standard_normal((2, tall.rows)).astype(np.float32)
    _assert_close(H.host_matmul_t_blocked(tall, h), h @ Q.dequantize(tall))


@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_read_only_and_jax_backed_weights(fmt):
    W, _ = _weights(fmt, seed=4)
    x = np.random.default_rng(5).standard_normal((2, D)).astype(np.float32)
    want = H.host_matvec(W, x)
    Wj = jax.tree.map(lambda a: np.asarray(jnp.asarray(a)), W)  # read-only numpy views of JAX buffers
    assert not Wj.data.flags.writeable
    np.testing.assert_array_equal(H.host_matvec(Wj, x), want)
    assert H._kernel_weight(Wj).data.ctypes.data == Wj.data.ctypes.data  # aliased, not copied


@pytest.mark.parametrize("fmt", Q.FORMATS)
@pytest.mark.parametrize("family", R.FAMILIES)
def test_sparse_kernels(fmt, family):
    wg, wu, wd, bu = R.random_ffn_weights(family, N, D, seed=6)
    wg, wu, wd = (None if w is None else Q.to_weight(w, fmt) for w in (wg, wu, wd))
    rng = np.random.default_rng(7)
    idx = rng.choice(N, 80, replace=False).astype(np.int32)
    count = 61  # idx[61:] is padding
    for batch in (None, 3, H.blas_min_tokens(fmt, "ffn") + 1):  # the last goes through blocked BLAS
        x = rng.standard_normal(D if batch is None else (batch, D)).astype(np.float32)
        want_h = H.host_h_ref(family, wg, wu, x, idx, count, bu)  # refs dequantize Weights first
        h = H.host_sparse_h(family, wg, wu, x, idx, count, bu)
        _assert_close(h, want_h)
        y = H.host_sparse_ffn(family, wg, wu, wd, x, idx, count, bu)
        _assert_close(y, H.host_sparse_ffn_ref(family, wg, wu, wd, x, idx, count, bu))
        assert y.shape == x.shape
    wdf = Q.dequantize(wd)
    _assert_close(H.host_gather_matvec(wu, idx, count, x), x @ Q.dequantize(wu)[idx[:count]].T)
    h = rng.standard_normal((2, count)).astype(np.float32)
    h[:, ::3] = 0  # skipped rows (zero for every token) must not change the result
    _assert_close(H.host_axpy_down(wd, idx, count, h), h @ wdf[idx[:count]])
    _assert_close(H.host_axpy_down(wd, idx, count, h, skip_zero_rows=False), h @ wdf[idx[:count]])
    dense = rng.standard_normal((2, count)).astype(np.float32)  # no zeros: both modes read the same rows
    np.testing.assert_array_equal(H.host_axpy_down(wd, idx, count, dense),
                                  H.host_axpy_down(wd, idx, count, dense, skip_zero_rows=False))


@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_deterministic_and_serial_equals_parallel(fmt, monkeypatch):
    """Same bits run to run, and from the one-thread and the parallel builds (fixed work split)."""
    wg, wu, wd, _ = R.random_ffn_weights("reglu", N, D, seed=8)
    wg, wu, wd = (Q.to_weight(w, fmt) for w in (wg, wu, wd))
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, D)).astype(np.float32)
    idx = rng.permutation(N).astype(np.int32)

    def run():
        h = H.host_sparse_h("reglu", wg, wu, x, idx, 150)
        dense = H.host_axpy_down(wd, idx, N, np.ones((2, N), np.float32), skip_zero_rows=False)
        return (h, H.host_axpy_down(wd, idx, 150, h), dense, H.host_matvec(wu, x),
                H.host_gather_matvec(wu, idx, 77, x), H.host_matvec(wu, np.tile(x, (5, 1))))

    monkeypatch.setattr(H, "SERIAL_MAX_WORK_BYTES", 1 << 40)  # serial: by bytes alone
    monkeypatch.setattr(H, "SERIAL_MAX_BYTES", 1 << 40)
    serial = run()
    monkeypatch.setattr(H, "SERIAL_MAX_BYTES", 0)
    parallel, again = run(), run()
    for s, p, a in zip(serial, parallel, again):
        np.testing.assert_array_equal(s, p)
        np.testing.assert_array_equal(p, a)


def test_empty_selection():
    W, _ = _weights("int4")
    x = np.ones(D, np.float32)
    assert H.host_sparse_ffn("relu", None, W, W, x, np.zeros(4, np.int32), 0).tolist() == [0.0] * D
    assert H.host_gather_matvec(W, np.zeros(4, np.int32), 0, x).shape == (1, 0)


def _avx512() -> bool:
    from ops.linear import _cpu_flags

    return "avx512f" in _cpu_flags()


@pytest.mark.skipif(not _avx512(), reason="gathers and scatters are AVX-512 instructions; elsewhere the check is moot")
def test_int4_kernels_vectorise_without_gathers_or_scatters():
    """The int4 kernels' scale expansion once compiled to scatter stores (LLVM vectorised a 16-store loop across
    groups): the down projection ran at 8% of the bandwidth while every result stayed right. This checks the
    machine code of the int4 down, widen and mat-vec kernels (benchmarks/kernel_codegen.py checks them all)."""
    from benchmarks.kernel_codegen import kernel_report

    w, _ = _weights("int4", rows=64, cols=128)
    h = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    H.host_axpy_down(w, np.arange(64, dtype=np.int32), 64, h)
    H.host_matmul_t_blocked(w, h)
    H.host_matvec(w, np.ones((1, 128), np.float32))
    for kernel in (H._down_kernel_serial, H._widen_kernel, H._matvec_q4_kernel_serial):
        sigs = [s for s in kernel.signatures if any(getattr(t, "dtype", None) == numba_types.uint8 for t in s)]
        assert sigs, kernel
        for sig, counts in kernel_report(kernel, sigs):
            assert counts["zmm"] + counts["ymm"] > 0, (kernel, sig, counts)  # vectorised at all
            assert counts["gather"] == 0 and counts["scatter"] == 0, (kernel, sig, counts)

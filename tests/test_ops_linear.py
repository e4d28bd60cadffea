"""ops.linear: every projection in every stored format, on both paths, against the plain reference.

Tolerance: the host kernels and the XLA path both compute in float32 from the same stored values,
so they match dequantize-then-float32 numpy within f32 rounding (rtol 1e-5, atol 1e-5 * max|y|).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import linear as L
from ops.quant import FORMATS, GROUP, Weight, to_weight

ROWS, COLS = 200, 96


def _weight(fmt, rows=ROWS, cols=COLS, seed=0):
    rng = np.random.default_rng(seed)
    return to_weight(rng.standard_normal((rows, cols), dtype=np.float32), fmt)


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.fixture(params=["host", "xla"])
def path(request, monkeypatch):
    monkeypatch.setattr(L, "USE_HOST_KERNELS", request.param == "host")
    return request.param


@pytest.mark.parametrize("tokens", [1, 3, 9])  # 9: a prompt, through blocked dequantize + BLAS
@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_and_linear_t_match_reference(path, fmt, tokens):
    w = _weight(fmt)
    wj = jax.tree.map(jnp.asarray, w)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((tokens, COLS), dtype=np.float32)
    h = rng.standard_normal((tokens, ROWS), dtype=np.float32)
    b = rng.standard_normal(ROWS, dtype=np.float32)
    _close(jax.jit(L.linear)(jnp.asarray(x), wj, jnp.asarray(b)), L.linear_ref(x, w, b))
    _close(jax.jit(L.linear_t)(jnp.asarray(h), wj), L.linear_t_ref(h, w))
    # Leading axes are kept: [B, T, K] -> [B, T, R].
    y3 = jax.jit(L.linear)(jnp.asarray(x)[None], wj)
    assert y3.shape == (1, tokens, ROWS)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("tokens", [1, 2, 8, 16])
def test_bf16_rows_take_xla_own_dot_where_the_cpu_has_one(native, tokens, monkeypatch):
    """Several rows against a bf16 weight: XLA's bf16 dot with the activations split in two bf16 halves
    (`linear` from 2 rows, `linear_t` from 8) where the CPU multiplies bf16; the host kernel elsewhere.
    Either way within f32 rounding of the reference (one bf16 rounding of x would miss by ~2e-3).
    """
    monkeypatch.setattr(L, "cpu_has_bf16_dot", lambda: native)
    w = _weight("bfloat16", rows=384, cols=256)
    wj = jax.tree.map(jnp.asarray, w)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((tokens, 256), dtype=np.float32)
    h = rng.standard_normal((tokens, 384), dtype=np.float32)
    for fn, arg, want, least in ((L.linear, x, L.linear_ref(x, w), L.NATIVE_BF16_MIN_ROWS),
                                 (L.linear_t, h, L.linear_t_ref(h, w), L.NATIVE_BF16_T_MIN_ROWS)):
        fresh = jax.jit(lambda a, w, fn=fn: fn(a, w))  # a new trace: the path is chosen while tracing
        _close(fresh(jnp.asarray(arg), wj), want)
        hlo = fresh.lower(jnp.asarray(arg), wj).as_text()
        xla_dot = native and tokens >= least
        assert ("callback" not in hlo) == xla_dot, (fn.__name__, tokens)
        if xla_dot:
            assert "dot_general" in hlo and "bf16" in hlo


@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("tokens", [4, 16])
def test_large_bf16_weight_at_few_rows_stays_on_the_host_without_amx(amx, tokens, monkeypatch):
    """A bf16 CPU without AMX: a weight of NO_AMX_HOST_MIN_BYTES or more at up to NO_AMX_HOST_MAX_ROWS rows
    goes through the host kernel (XLA's three-part bf16 dot is compute-bound there); with AMX, or at more
    rows, XLA's dot. Either way within f32 rounding of the reference."""
    monkeypatch.setattr(L, "cpu_has_bf16_dot", lambda: True)
    monkeypatch.setattr(L, "cpu_has_amx", lambda: amx)
    cols = 1024
    rows = L.NO_AMX_HOST_MIN_BYTES // (2 * cols)  # exactly the threshold
    w = _weight("bfloat16", rows=rows, cols=cols)
    wj = jax.tree.map(jnp.asarray, w)
    x = np.random.default_rng(6).standard_normal((tokens, cols), dtype=np.float32)
    fresh = jax.jit(lambda a, w: L.linear(a, w))
    _close(fresh(jnp.asarray(x), wj), L.linear_ref(x, w))
    host = not amx and tokens <= L.NO_AMX_HOST_MAX_ROWS
    assert ("callback" in fresh.lower(jnp.asarray(x), wj).as_text()) == host
    small = jax.tree.map(jnp.asarray, _weight("bfloat16", rows=384, cols=256))  # small weights keep XLA's dot
    assert "callback" not in jax.jit(lambda a, w: L.linear(a, w)).lower(jnp.ones((tokens, 256)), small).as_text()


def test_bf16_weight_data_is_bf16_typed_and_uint16_bits_are_viewed():
    """A bf16 Weight holds bf16-typed data (XLA's bf16 dot reads it as is; a uint16 array would be
    copied to reinterpret it every call); bit patterns passed in are viewed, not copied."""
    from ops.quant import BF16

    w = _weight("bfloat16")
    assert w.data.dtype == BF16
    bits = np.asarray(w.data).view(np.uint16)
    again = Weight(bits, None, "bfloat16", COLS)
    assert again.data.dtype == BF16 and np.shares_memory(again.data, bits)


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "float16", "int8"])
def test_linear_relu_linear_matches_reference(path, fmt, tokens):
    """The predictors' fc2(relu(fc1 x)): one fused callback on the host path, two linears on XLA."""
    w1, w2 = _weight(fmt, 64, COLS, seed=2), _weight(fmt, ROWS, 64, seed=3)
    x = np.random.default_rng(4).standard_normal((tokens, COLS), dtype=np.float32)
    got = jax.jit(L.linear_relu_linear)(jnp.asarray(x), jax.tree.map(jnp.asarray, w1), jax.tree.map(jnp.asarray, w2))
    _close(got, L.linear_relu_linear_ref(x, w1, w2))


@pytest.mark.parametrize("fmt", FORMATS)
def test_take_rows_dequantizes_gathered_rows(fmt):
    from ops.quant import dequantize

    w = _weight(fmt)
    ids = jnp.asarray([[0, 7], [199, 7]])
    _close(L.take_rows(jax.tree.map(jnp.asarray, w), ids), dequantize(w)[np.asarray(ids)])


@pytest.mark.parametrize("fmt", ["bfloat16", "int8", "int4"])
def test_xla_path_lowers_for_cuda(fmt, monkeypatch):
    """What a GPU runs: the stored weight dequantized inside the jitted function (XLA fuses it)."""
    monkeypatch.setattr(L, "USE_HOST_KERNELS", False)
    sds = jax.ShapeDtypeStruct
    R, K = 11008, 4096
    if fmt == "bfloat16":
        w = Weight(sds((R, K), jnp.uint16), None, fmt, K)
    elif fmt == "int8":
        w = Weight(sds((R, K), jnp.int8), sds((R,), jnp.float32), fmt, K)
    else:
        w = Weight(sds((R, K // 2), jnp.uint8), sds((R, K // GROUP), jnp.uint16), fmt, K)
    exp = jax.export.export(jax.jit(lambda x, w: L.linear_t(L.linear(x, w), w)), platforms=["cuda"])(
        sds((1, K), jnp.float32), w)
    assert "stablehlo.dot_general" in exp.mlir_module()

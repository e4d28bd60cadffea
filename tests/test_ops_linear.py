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

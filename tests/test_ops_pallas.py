"""ops.pallas_gpu: interpret-mode equality with the reference, and CUDA lowering on CPU.

Interpret mode runs the kernels as jnp on the CPU (slow), so cases are small. The lowering
tests export the jitted kernels for platform 'cuda' on this CPU-only machine: they run the
whole Pallas -> Triton lowering, so a GPU lowering error fails CI without a GPU. Whether the
Triton compiler then accepts the module is only checked on a real GPU (benchmarks/bench_ops.py).
"""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from ops import pallas_gpu as P
from ops import reference as R

RTOL, ATOL = 1e-5, 1e-5  # f32 accumulation both sides; bf16 storage widens exactly
N = 512


def _case(family, d, cap, count, batch, seed, dtype=np.float32, n=N):
    wg, wu, wd, bu = R.random_ffn_weights(family, n, d, seed, dtype)
    rng = np.random.default_rng(seed + 11)
    x = rng.standard_normal((d,) if batch is None else (batch, d)).astype(np.float32)
    # Padding (entries >= count) points at arbitrary valid rows: it must still add nothing.
    idx = rng.choice(n, cap, replace=False).astype(np.int32)
    valid = np.arange(cap) < count
    return wg, wu, wd, bu, x, idx, valid



@pytest.fixture(autouse=True)
def _full_precision_dots():
    """On a GPU, XLA's default f32 dots use TF32 (~1e-3 relative), in the reference too."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.mark.parametrize("family,d,cap,count,batch,seed,split_d", [
    ("reglu", 200, 64, 50, None, 0, 1),   # d not a multiple of BLOCK_D, partial count
    ("drelu", 96, 24, 24, None, 1, 2),    # capacity not a multiple of BLOCK_C, full, d split
    ("relu", 256, 40, 17, 2, 2, 3),       # bias path, batch of 2, uneven d split
    ("reglu", 160, 32, 0, None, 3, 1),    # nothing active -> exactly zero
    ("swiglu", 200, 64, 50, 2, 4, 1),     # silu in the kernel
    ("geglu", 96, 24, 20, None, 5, 2),    # tanh-GELU, d split (activation in the wrapper)
])
def test_sparse_ffn_pallas_interpret_matches_ref(family, d, cap, count, batch, seed, split_d):
    wg, wu, wd, bu, x, idx, valid = _case(family, d, cap, count, batch, seed)
    y = P.sparse_ffn_pallas(family, wg, wu, wd, x, idx, valid, bu, interpret=True,
                            h_kwargs=dict(block_c=16, block_d=64, split_d=split_d),
                            down_kwargs=dict(block_c=8, block_d=64, split=2))
    want = R.sparse_ffn_ref(family, wg, wu, wd, x, idx, valid, bu)
    assert y.shape == x.shape
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL)
    if count == 0:
        assert np.all(np.asarray(y) == 0)


def test_pallas_bf16_storage_and_default_blocks():
    wg, wu, wd, bu, x, idx, valid = _case("reglu", 136, 48, 33, None, 4, ml_dtypes.bfloat16)
    h = P.sparse_h_pallas("reglu", wg, wu, x, idx, valid, interpret=True)
    np.testing.assert_allclose(h, R.sparse_h_ref("reglu", wg, wu, x, idx, valid), rtol=RTOL, atol=ATOL)
    y = P.axpy_down_pallas(wd, idx, valid, h, interpret=True)
    np.testing.assert_allclose(y, R.axpy_down_ref(wd, idx, valid, h), rtol=RTOL, atol=ATOL)


def _export_cuda(fn, *avals):
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in P.TRITON_CUSTOM_CALL_TARGETS]
    exp = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*avals)
    return exp.mlir_module()


@pytest.mark.parametrize("family,dtype,batch,split_d", [
    ("reglu", jnp.float32, None, 1), ("drelu", jnp.bfloat16, None, 8), ("relu", jnp.float32, 2, 4),
    ("swiglu", jnp.bfloat16, None, 1), ("geglu", jnp.float32, 2, 1)])
def test_pallas_lowers_for_cuda(family, dtype, batch, split_d):
    n, d, cap = 11008, 4096, 1024  # LLaMA-7B layer shapes: large offsets, real block counts
    sds = jax.ShapeDtypeStruct
    w = sds((n, d), dtype)
    wg = None if family == "relu" else w
    bu = sds((n,), dtype) if family == "relu" else None
    x = sds((d,) if batch is None else (batch, d), jnp.float32)

    def f(wg, wu, wd, bu, x, idx, valid):
        return P.sparse_ffn_pallas(family, wg, wu, wd, x, idx, valid, bu,
                                   h_kwargs=dict(split_d=split_d))

    text = _export_cuda(f, wg, w, w, bu, x, sds((cap,), jnp.int32), sds((cap,), jnp.bool_))
    assert sum(text.count(t) for t in P.TRITON_CUSTOM_CALL_TARGETS) == 2  # h kernel + down kernel


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles with Triton: needs a GPU")
@pytest.mark.parametrize("family,d,n,cap,count,batch,dtype,atol", [
    ("reglu", 200, N, 64, 50, None, np.float32, ATOL),
    ("drelu", 4096, 11008, 2048, 1101, None, ml_dtypes.bfloat16, 1e-4),  # |y| ~ 6, 4096-term dots
    ("relu", 256, N, 40, 17, 2, np.float32, ATOL),
    ("swiglu", 4096, 11008, 2048, 1101, None, ml_dtypes.bfloat16, 1e-4),
    ("geglu", 256, N, 40, 17, 2, np.float32, ATOL),
])
def test_pallas_on_gpu_matches_ref(family, d, n, cap, count, batch, dtype, atol):
    wg, wu, wd, bu, x, idx, valid = _case(family, d, cap, count, batch, 0, dtype, n)
    y = jax.jit(lambda *a: P.sparse_ffn_pallas(family, *a))(wg, wu, wd, x, idx, valid, bu)
    with jax.default_matmul_precision("highest"):  # the jnp reference, not TF32
        want = R.sparse_ffn_ref(family, wg, wu, wd, x, idx, valid, bu)
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=atol)


def _weights_in(fmt, wg, wu, wd):
    """Stored-format Weights of the f32 test matrices and the float32 matrices they hold."""
    from ops.quant import dequantize, to_weight

    ws = [None if w is None else to_weight(w, fmt) for w in (wg, wu, wd)]
    return ws, [None if w is None else dequantize(w) for w in ws]


@pytest.mark.parametrize("fmt", ["bfloat16", "float16", "int8", "int4"])
@pytest.mark.parametrize("family,batch,split_d", [("reglu", None, 1), ("relu", 2, 2), ("drelu", None, 3),
                                                  ("swiglu", None, 1)])
def test_pallas_reads_stored_formats(fmt, family, batch, split_d):
    """Widening and dequantization in registers match dequantize-then-f32 (f32 rounding only)."""
    wg, wu, wd, bu, x, idx, valid = _case(family, 192, 40, 29, batch, 5)
    (qg, qu, qd), (fg, fu, fd) = _weights_in(fmt, wg, wu, wd)
    y = P.sparse_ffn_pallas(family, qg, qu, qd, x, idx, valid, bu, interpret=True,
                            h_kwargs=dict(block_c=16, block_d=64, split_d=split_d),
                            down_kwargs=dict(block_c=8, block_d=64, split=2))
    want = R.sparse_ffn_ref(family, fg, fu, fd, x, idx, valid, bu)
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL * np.abs(want).max())


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_pallas_quantized_lowers_for_cuda(fmt):
    from ops.quant import GROUP, Weight

    n, d, cap = 11008, 4096, 1024
    sds = jax.ShapeDtypeStruct
    if fmt == "int8":
        w = Weight(sds((n, d), jnp.int8), sds((n,), jnp.float32), fmt, d)
    else:
        w = Weight(sds((n, d // 2), jnp.uint8), sds((n, d // GROUP), jnp.uint16), fmt, d)

    def f(wg, wu, wd, x, idx, valid):
        return P.sparse_ffn_pallas("reglu", wg, wu, wd, x, idx, valid)

    text = _export_cuda(f, w, w, w, sds((d,), jnp.float32), sds((cap,), jnp.int32), sds((cap,), jnp.bool_))
    assert sum(text.count(t) for t in P.TRITON_CUSTOM_CALL_TARGETS) == 2


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles with Triton: needs a GPU")
@pytest.mark.parametrize("fmt", ["bfloat16", "int8", "int4"])
def test_pallas_stored_formats_on_gpu(fmt):
    """LLaMA-7B layer, 10% active: the dequantizing kernels compiled by Triton vs dequantize-then-f32."""
    wg, wu, wd, bu, x, idx, valid = _case("reglu", 4096, 2048, 1101, None, 0, np.float32, 11008)
    (qg, qu, qd), (fg, fu, fd) = _weights_in(fmt, wg, wu, wd)
    q = [jax.tree.map(jnp.asarray, w) for w in (qg, qu, qd)]
    y = jax.jit(lambda g, u, d, *a: P.sparse_ffn_pallas("reglu", g, u, d, *a))(*q, x, idx, valid)
    with jax.default_matmul_precision("highest"):
        want = R.sparse_ffn_ref("reglu", fg, fu, fd, x, idx, valid)
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=1e-4 * np.abs(want).max())

"""Pallas kernels for the sparse FFN on GPU, on the Triton backend.

Why Triton: jax 0.10 lowers a plain ``pallas_call`` on GPU to Mosaic GPU, which cannot gather
rows; passing Triton ``CompilerParams`` selects the Triton lowering, whose loads take arbitrary
(gathered) pointer tensors with a mask. Masked-off lanes issue no memory traffic, so padded
index entries (and, in the down projection, neurons whose h is exactly 0) cost no bandwidth:
the cost follows ``count``, not the capacity C (the XLA path reads padding rows too, though
padding that repeats row 0 mostly hits cache).

Two kernels, each fixed-capacity with masked tails and power-of-2 blocks (Triton requires them):
  * ``sparse_h_pallas``: grid (C / BLOCK_C index blocks) x (``split_d`` slices of d); each
    program gathers its gate/up rows BLOCK_D columns at a time (tail masked) and reduces
    against x in f32. With ``split_d == 1`` the activation is applied in the kernel (gate and
    up read by the same program); otherwise XLA sums the d-slice partials and activates.
  * ``axpy_down_pallas``: grid (d / BLOCK_D column blocks) x (``split`` slices of the index
    list); each program loops over its slice accumulating h_i * w_down_t[idx_i, cols] in f32.
    XLA sums the ``split`` partials afterwards: deterministic (no atomics).
Measured on an H100 (jax 0.11.2, LLaMA-7B layer f32, 1101 of 11008 active, device time per
layer inside a jitted loop): dense XLA 184 us, XLA gather 31-33 us, these kernels 32-33 us
(h ~25 us vs XLA's ~20 us; down ~14 us vs XLA's ~19 us thanks to skipping zero h).
``interpret=True`` runs the same kernels on CPU (slow; for tests only).

Weights may be plain float arrays or ``ops.quant.Weight`` in any format: a gathered block is
widened in registers (bf16/f16), or dequantized there from its stored int8 bytes and row scale,
or from int4 nibbles and their group's f16 scale, so a block costs the stored bytes only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ops.quant import GROUP, Weight, float_data_jnp
from ops.reference import activation, check_family

try:  # jax >= 0.4.31 exposes the Triton-specific API here (0.10/0.11 included).
    from jax.experimental.pallas import triton as _pltriton
except ImportError:  # pragma: no cover - very old jax
    _pltriton = None

# Custom-call targets emitted by the Triton lowering: jaxlib <= 0.10.2 defers Triton
# compilation to XLA; newer jaxlib compiles at lowering time and emits the FFI call.
TRITON_CUSTOM_CALL_TARGETS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")


# Grid size the default splits aim for. Measured on an H100 (132 SMs), LLaMA-7B layer at 10%:
# 256-program grids left the kernels latency-bound (h 29 us, down 31 us); ~1024 programs gave
# h ~25 us and down ~14 us (benchmarks/bench_ops.py, jax 0.11.2).
_TARGET_PROGRAMS = 1024


def triton_compiler_params(num_warps: int = 4, num_stages: int = 2):
    """Triton ``CompilerParams`` for this jax version (selects the Triton lowering)."""
    cls = None
    if _pltriton is not None:
        cls = getattr(_pltriton, "CompilerParams", None) or getattr(
            _pltriton, "TritonCompilerParams", None)
    if cls is None:
        cls = getattr(pl, "TritonCompilerParams", None)
    if cls is None:
        raise RuntimeError("this jax has no Pallas Triton CompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def _load(ref, mask=None, other=None):
    """Masked load of ``ref`` (already indexed with ``.at``), across jax versions."""
    fn = getattr(_pltriton, "load", None)
    if fn is not None:
        return fn(ref, mask=mask, other=other)
    return pl.load(ref, (), mask=mask, other=other)  # older jax: pl.load(ref, idx, ...)


def _store(ref, val, mask=None):
    """Masked store into ``ref`` (already indexed with ``.at``), across jax versions."""
    fn = getattr(_pltriton, "store", None)
    if fn is not None:
        return fn(ref, val, mask=mask)
    return pl.store(ref, (), val, mask=mask)


def _is_pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad_to(a, size: int):
    """Zero-pad the last axis to ``size`` (padding: row 0, invalid, h = 0)."""
    if a.shape[-1] == size:
        return a
    return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, size - a.shape[-1])])


def _parts(w) -> tuple[str, tuple]:
    """(format, the arrays a kernel reads) of a weight: float data in its own dtype (bits
    reinterpreted, free), integer data plus scales (int4's f16 scale bits as float16)."""
    if not isinstance(w, Weight):
        return "float", (w,)
    if w.fmt in ("bfloat16", "float16"):
        return "float", (float_data_jnp(w),)
    if w.fmt == "float32":
        return "float", (w.data,)
    scale = w.scale if w.fmt == "int8" else lax.bitcast_convert_type(w.scale, jnp.float16)
    return w.fmt, (w.data, scale)


def _gather_block(w, fmt, idx, cols, mask):
    """Rows w[idx, cols] as f32 [BLOCK_C, BLOCK_D] from refs ``w`` (see ``_parts``), dequantized
    in registers; masked lanes read nothing and give 0."""
    shape = (idx.shape[0], cols.shape[0])
    ri = jnp.broadcast_to(idx[:, None], shape)
    ci = jnp.broadcast_to(cols[None, :], shape)
    if fmt == "float":
        return _load(w[0].at[ri, ci], mask=mask, other=0).astype(jnp.float32)
    if fmt == "int8":  # q * row scale
        q = _load(w[0].at[ri, ci], mask=mask, other=0).astype(jnp.float32)
        return q * _load(w[1].at[ri], mask=mask, other=0).astype(jnp.float32)
    # int4 (Q4_0): column c lives in byte (c // 32) * 16 + c % 16, low nibble for c % 32 < 16
    byte = _load(w[0].at[ri, (ci // GROUP) * (GROUP // 2) + ci % (GROUP // 2)], mask=mask, other=0)
    shift = ((ci % GROUP) // (GROUP // 2)) * 4
    q = ((byte.astype(jnp.int32) >> shift) & 15).astype(jnp.float32) - 8.0
    d = _load(w[1].at[ri, ci // GROUP], mask=mask, other=0).astype(jnp.float32)
    return jnp.where(mask, q * d, 0.0)


def _h_kernel(idx_ref, valid_ref, x_ref, *refs, family, fmt, n_parts, d, n_tok, block_d, blocks_per_split,
              split_d, has_gate, has_bias):
    refs = list(refs)
    wg_ref = None
    if has_gate:
        wg_ref, refs = tuple(refs[:n_parts]), refs[n_parts:]
    wu_ref, refs = tuple(refs[:n_parts]), refs[n_parts:]
    bu_ref = refs.pop(0) if has_bias and split_d == 1 else None
    (out_ref,) = refs
    idx = idx_ref[...]
    valid = valid_ref[...] != 0
    block_c = idx.shape[0]
    d0 = pl.program_id(1) * (blocks_per_split * block_d)  # this program's slice of d

    def body(j, carry):
        cols = d0 + j * block_d + lax.iota(jnp.int32, block_d)
        cmask = cols < d
        m2 = valid[:, None] & cmask[None, :]
        wu = _gather_block(wu_ref, fmt, idx, cols, m2)
        wg = _gather_block(wg_ref, fmt, idx, cols, m2) if has_gate else None
        accs_u, accs_g = carry
        new_u, new_g = [], []
        for b in range(n_tok):  # rows are loaded once and reused by every token
            xb = _load(x_ref.at[b, cols], mask=cmask, other=0).astype(jnp.float32)
            new_u.append(accs_u[b] + jnp.sum(wu * xb[None, :], axis=1))
            if has_gate:
                new_g.append(accs_g[b] + jnp.sum(wg * xb[None, :], axis=1))
        return tuple(new_u), tuple(new_g)

    zeros = jnp.zeros((block_c,), jnp.float32)
    init = (tuple(zeros for _ in range(n_tok)), tuple(zeros for _ in range(n_tok)) if has_gate else ())
    accs_u, accs_g = lax.fori_loop(0, blocks_per_split, body, init)
    if split_d > 1:  # partial dot products; the wrapper sums the d slices and activates
        rows = pl.ds(pl.program_id(0) * block_c, block_c)
        for b in range(n_tok):
            out_ref[pl.program_id(1), 0, b, rows] = accs_u[b]
            if has_gate:
                out_ref[pl.program_id(1), 1, b, rows] = accs_g[b]
        return
    bu = _load(bu_ref.at[idx], mask=valid, other=0).astype(jnp.float32) if has_bias else None
    for b in range(n_tok):
        g = accs_g[b] if has_gate else None
        h = activation(family, g, accs_u[b], bu)
        out_ref[b, :] = jnp.where(valid, h, 0.0)


def sparse_h_pallas(family, w_gate, w_up, x, idx, valid, b_up=None, *, block_c=8, block_d=256,
                    split_d=None, num_warps=4, num_stages=2, interpret=False):
    """Fused gather-matvec + activation for neurons idx: [C] or [B, C], zero where not valid.

    ``split_d > 1`` also splits d across programs (more parallelism when C / block_c is small);
    the partial dot products are then summed and activated by XLA (fixed order: deterministic).
    None picks it so that the grid has about ``_TARGET_PROGRAMS`` programs.
    """
    check_family(family, w_gate)
    assert _is_pow2(block_c) and _is_pow2(block_d), "Triton needs power-of-2 blocks"
    squeeze = x.ndim == 1
    x2 = x[None] if squeeze else x
    n_tok, d = x2.shape
    cap = idx.shape[0]
    cap_p = _cdiv(cap, block_c) * block_c
    idx_p = _pad_to(idx.astype(jnp.int32), cap_p)
    valid_p = _pad_to(valid.astype(jnp.int32), cap_p)
    has_gate, has_bias = w_gate is not None, b_up is not None
    fmt, up_parts = _parts(w_up)
    gate_parts = _parts(w_gate)[1] if has_gate else ()
    n_dblk = _cdiv(d, block_d)
    if split_d is None:
        split_d = _cdiv(_TARGET_PROGRAMS, cap_p // block_c)
    split_d = max(1, min(split_d, n_dblk))
    per = _cdiv(n_dblk, split_d)
    weights = list(gate_parts) + list(up_parts) + ([b_up] if has_bias and split_d == 1 else [])
    blk = pl.BlockSpec((block_c,), lambda i, s: (i,))
    full = pl.BlockSpec()  # whole array: rows are gathered by pointer, not tiled
    if split_d == 1:
        out_spec = pl.BlockSpec((n_tok, block_c), lambda i, s: (0, i))
        out_shape = (n_tok, cap_p)
    else:
        out_spec, out_shape = full, (split_d, 1 + has_gate, n_tok, cap_p)
    kernel = functools.partial(_h_kernel, family=family, fmt=fmt, n_parts=len(up_parts), d=d, n_tok=n_tok,
                               block_d=block_d,
                               blocks_per_split=per, split_d=split_d, has_gate=has_gate,
                               has_bias=has_bias)
    out = pl.pallas_call(
        kernel,
        grid=(cap_p // block_c, split_d),
        in_specs=[blk, blk, full] + [full] * len(weights),
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32),
        compiler_params=triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=f"sparse_h_{family}",
    )(idx_p, valid_p, x2, *weights)
    if split_d == 1:
        h = out[:, :cap]
    else:
        parts = jnp.sum(out[..., :cap], axis=0)  # [1 + has_gate, n_tok, cap]
        bu = None if b_up is None else b_up[idx].astype(jnp.float32)
        g = parts[1] if has_gate else None
        h = jnp.where(valid, activation(family, g, parts[0], bu), 0.0)
    return h[0] if squeeze else h


def _axpy_kernel(idx_ref, valid_ref, h_ref, *refs, fmt, d, n_tok, block_c, block_d, blocks_per_split):
    *w_ref, out_ref = refs
    cols = pl.program_id(0) * block_d + lax.iota(jnp.int32, block_d)
    cmask = cols < d
    split = pl.program_id(1)

    def body(j, accs):
        base = (split * blocks_per_split + j) * block_c
        idx = idx_ref[pl.ds(base, block_c)]
        valid = valid_ref[pl.ds(base, block_c)] != 0
        hs = [jnp.where(valid, h_ref[b, pl.ds(base, block_c)], 0.0) for b in range(n_tok)]
        # Skip rows whose h is exactly 0 for every token (ReLU zeros): no bytes are read.
        live = hs[0] != 0
        for hb in hs[1:]:
            live = live | (hb != 0)
        rows = _gather_block(w_ref, fmt, idx, cols, live[:, None] & cmask[None, :])
        return tuple(accs[b] + jnp.sum(hs[b][:, None] * rows, axis=0) for b in range(n_tok))

    init = tuple(jnp.zeros((block_d,), jnp.float32) for _ in range(n_tok))
    accs = lax.fori_loop(0, blocks_per_split, body, init)
    for b in range(n_tok):
        _store(out_ref.at[split, b, cols], accs[b], mask=cmask)


def axpy_down_pallas(w_down_t, idx, valid, h, *, block_c=32, block_d=128, split=None,
                     num_warps=4, num_stages=2, interpret=False):
    """y = sum_i valid_i * h_i * w_down_t[idx_i] in f32: [d] or [B, d]."""
    assert _is_pow2(block_c) and _is_pow2(block_d), "Triton needs power-of-2 blocks"
    squeeze = h.ndim == 1
    h2 = (h[None] if squeeze else h).astype(jnp.float32)
    n_tok, cap = h2.shape
    fmt, w_parts = _parts(w_down_t)
    d = w_down_t.cols if isinstance(w_down_t, Weight) else w_down_t.shape[1]
    n_col = _cdiv(d, block_d)
    n_blk = _cdiv(cap, block_c)
    if split is None:  # about _TARGET_PROGRAMS programs, at most one per index block
        split = max(1, min(n_blk, _cdiv(_TARGET_PROGRAMS, n_col)))
    split = min(split, n_blk)
    per = _cdiv(n_blk, split)
    cap_p = per * split * block_c
    idx_p = _pad_to(idx.astype(jnp.int32), cap_p)
    valid_p = _pad_to(valid.astype(jnp.int32), cap_p)
    h_p = _pad_to(h2, cap_p)
    kernel = functools.partial(_axpy_kernel, fmt=fmt, d=d, n_tok=n_tok, block_c=block_c, block_d=block_d,
                               blocks_per_split=per)
    full = pl.BlockSpec()
    parts = pl.pallas_call(
        kernel,
        grid=(n_col, split),
        in_specs=[full] * (3 + len(w_parts)),
        out_specs=full,
        out_shape=jax.ShapeDtypeStruct((split, n_tok, d), jnp.float32),
        compiler_params=triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="sparse_axpy_down",
    )(idx_p, valid_p, h_p, *w_parts)
    y = jnp.sum(parts, axis=0)  # fixed-order reduction of the split partials
    return y[0] if squeeze else y


def sparse_ffn_pallas(family, w_gate, w_up, w_down_t, x, idx, valid, b_up=None, *,
                      interpret=False, h_kwargs=None, down_kwargs=None):
    """Sparse FFN over neurons idx[valid] with the Triton kernels (no down bias): [d] or [B, d]."""
    h = sparse_h_pallas(family, w_gate, w_up, x, idx, valid, b_up, interpret=interpret,
                        **(h_kwargs or {}))
    return axpy_down_pallas(w_down_t, idx, valid, h, interpret=interpret, **(down_kwargs or {}))

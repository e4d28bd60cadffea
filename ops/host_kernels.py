"""Host (CPU, numpy/numba) kernels: sparse FFN rows and dense mat-vecs in every weight format.

A weight argument is an ``ops.quant.Weight`` (numpy-backed) of any format (float32, bfloat16,
float16, int8, int4), or a plain numpy float32 / bfloat16 / float16 array. The kernels read the
stored bytes (at memory bandwidth: a mat-vec is memory-bound) and widen them to float32 in
registers; arithmetic is float32. ``idx`` indexes weight rows and only ``idx[:count]`` is used.

The numba kernels are deterministic: the gate/up and mat-vec kernels give each output element to
one thread, and the down axpy sums fixed row chunks into private partials that are added in chunk
order; no thread ever adds into another's output (the reference engine's unsynchronised
per-thread adds made greedy runs differ). Dots are vectorised (reassociation fixed at compile
time), so results are bit-identical from run to run whatever the thread count.

Read streams: a kernel pass reads several rows at once (mat-vec: eight page-sized streams; down
axpy: eight rows; gate/up: the gate and up rows of two neurons). One row at a time read at ~20 GB/s
here, several concurrent streams at ~30 (the hardware prefetchers follow a stream only within its
4 KiB page). Software prefetching did not help these streaming loops; it does help int4 (below).

Measured on this 2-core VM (benchmarks/bench_formats.py, LLaMA-7B shapes, one token): float32 reads
at ~85% of the streaming bandwidth, bfloat16/float16 at ~70-80%, int8 at ~60-75% (widening an int8
costs a convert and an FMA port slot per element; with LLVM's 256-bit vectors two cores are then
close to compute-bound), int4 at ~33%: unpacking nibbles runs at ~15 G values/s a core, so int4 is
compute-bound and has its own mat-vec (one row at a time, next row prefetched, scales converted
once per row, the -8 offset taken out of the inner loop).

int4 (Q4_0) rows are read in their packed order: byte j of a row holds column ``32*(j//16) + j%16``
(low nibble) and that column + 16 (high nibble). The kernels permute x into that order once per
call instead of unpacking nibbles to their columns (a shuffle per element), and the down kernel
accumulates in packed order and permutes its sums back at the end.

f16 -> f32 uses the CPU's conversion instruction where LLVM has one (F16C, ARMv8; exact for every
value, NaN stays NaN) and an exact integer trick elsewhere (``ops.quant.f16_bits_to_f32_trick``).

Threads: with numba's default OpenMP layer, workers spin-wait; on a shared 2-core machine that
stalled each parallel region to a scheduler tick (LLaMA-7B layer 16-24 ms instead of 5-6 ms).
Entry points should set ``OMP_WAIT_POLICY=PASSIVE`` (before numba's first parallel call) or
``NUMBA_THREADING_LAYER=workqueue`` (only if numba is never launched from two threads at once);
this module leaves process-wide settings alone.

``host_ffn_callback`` runs ``host_sparse_ffn`` from inside a jitted function. On the CPU backend
it uses ``buffer_callback`` (~7 us, zero-copy: numba writes straight into XLA's output buffer);
elsewhere, or on a jax without it, ``pure_callback`` (~140 us, copies). The callback must not
call jax (deadlock): it only touches numpy arrays and numba.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import time
from types import FunctionType
from typing import NamedTuple

import llvmlite.binding as llvm_binding
import ml_dtypes
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

import jax
import jax.numpy as jnp
import threadpoolctl

from ops.quant import FORMATS, GROUP, Weight, check_format, dequantize, f16_bits_to_f32_trick
from ops.reference import check_family

try:
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:  # older jax
    _buffer_callback = None

_FAMILY_CODE = {"reglu": 0, "drelu": 1, "relu": 2, "swiglu": 4, "geglu": 5}  # _h_kernel also has 3: plain mat-vec
_GELU_C = 0.7978845608028654  # sqrt(2 / pi), tanh-GELU
_F32, _BF16, _F16, _I8, _I4 = range(5)  # format codes: FORMATS.index(fmt)
BF16 = np.dtype(ml_dtypes.bfloat16)
_DATA_DTYPE = {_F32: np.dtype(np.float32), _BF16: np.dtype(np.uint16), _F16: np.dtype(np.uint16),
               _I8: np.dtype(np.int8), _I4: np.dtype(np.uint8)}


# ---------------------------------------------------------------- numpy references
def _np_f32(a):
    if a is None:
        return None
    return dequantize(a) if isinstance(a, Weight) else np.asarray(a).astype(np.float32)


def _numpy_h(family, w_gate, w_up, x2, rows, b_up=None):
    """numpy ``h [B, rows]`` over the selected rows (a slice selects without a gather copy)."""
    f32 = lambda a: np.asarray(a)[rows].astype(np.float32, copy=False)  # noqa: E731
    u = x2 @ f32(w_up).T
    if family == "relu":
        return np.maximum(u + f32(b_up), 0) if b_up is not None else np.maximum(u, 0)
    return _np_glu(family, x2 @ f32(w_gate).T, u)


def _np_act(family, g):
    """numpy act(g) of a gated family (what a threshold compares)."""
    if family == "swiglu":
        return g / (1 + np.exp(-g))
    if family == "geglu":
        return np.float32(0.5) * g * (1 + np.tanh(np.float32(_GELU_C) * (g + np.float32(0.044715) * g * g * g)))
    return np.maximum(g, 0)


def _np_glu(family, g, u):
    """numpy act(g) * u of a gated family (float32)."""
    if family == "swiglu":
        return g / (1 + np.exp(-g)) * u
    if family == "geglu":
        return np.float32(0.5) * g * (1 + np.tanh(np.float32(_GELU_C) * (g + np.float32(0.044715) * g * g * g))) * u
    return np.maximum(g, 0) * (u if family == "reglu" else np.maximum(u, 0))


def host_h_ref(family, w_gate, w_up, x, idx, count, b_up=None, act_threshold=None):
    """numpy reference of the cold activations ``h [B, count]`` (weights dequantized to f32);
    with ``act_threshold``, zero where |act(gate x)| <= it."""
    check_family(family, w_gate)
    sel = np.asarray(idx)[: int(count)]
    x2 = np.atleast_2d(_np_f32(x))
    h = _numpy_h(family, _np_f32(w_gate), _np_f32(w_up), x2, sel, b_up)
    if act_threshold is not None:
        g = x2 @ _np_f32(w_gate)[sel].T
        h = np.where(np.abs(_np_act(family, g)) > act_threshold, h, np.float32(0))
    return h


def host_sparse_ffn_ref(family, w_gate, w_up, w_down_t, x, idx, count, b_up=None, act_threshold=None):
    """numpy reference of the cold FFN part: [d] or [B, d] (no down bias)."""
    h = host_h_ref(family, w_gate, w_up, x, idx, count, b_up, act_threshold)
    y = h @ _np_f32(w_down_t)[np.asarray(idx)[: int(count)]]
    return y[0] if np.ndim(x) == 1 else y


# ---------------------------------------------------------------- widening stored elements
def _has_hw_f16() -> bool:
    """Whether LLVM lowers f16 -> f32 to one instruction here (x86 F16C, ARMv8). A fixed numba
    target (NUMBA_CPU_NAME/FEATURES, for portable caches) may lack it: use the integer trick."""
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        return False
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return bool(llvm_binding.get_host_cpu_features().get("f16c", False))
    return machine in ("aarch64", "arm64")


_HW_F16 = _has_hw_f16()


@intrinsic
def _f16_bits_to_f32_hw(typingctx, h):
    """f16 bits -> f32 by the CPU's conversion instruction (vcvtph2ps, vectorised by LLVM)."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@njit(inline="always")
def _f16(h):
    """f16 bits -> f32, exact for every non-NaN value (NaN stays NaN; the instruction quiets a
    signalling NaN's payload). The instruction is 4x the integer trick's throughput (22 vs 5.5
    G/s a core), which made float16 mat-vecs compute-bound."""
    if _HW_F16:
        return _f16_bits_to_f32_hw(h)
    return f16_bits_to_f32_trick(h)


@njit(inline="always")
def _bf16(h):
    return np.uint32(np.uint32(h) << np.uint32(16)).view(np.float32)  # bf16 is f32's top half


@njit(inline="always")
def _f32(v):
    return v


@njit(inline="always")
def _i8(q):
    return np.float32(q)


@njit(inline="always")
def _lo(v):
    # the uint8 cast keeps the conversion 32-bit wide (numba promotes v & 15 to int64, whose
    # conversion vectorises at half the width): 1.9x on the int4 dot
    return np.float32(np.uint8(v & np.uint8(15))) - np.float32(8.0)


@njit(inline="always")
def _hi(v):
    return np.float32(np.uint8(v >> np.uint8(4))) - np.float32(8.0)


# Dot products may be reassociated (vectorised) and contracted to FMAs, but no NaN/Inf
# assumptions are made. Reassociation is fixed at compile time, so results stay bit-identical
# from run to run; the work split below is fixed too, so they do not depend on the thread count.
_FASTMATH = {"reassoc", "contract"}


def _elementwise_ops(cvt):
    """Row primitives for a format whose element k is ``cvt(row[k])`` (times a row scale)."""
    @njit(fastmath=_FASTMATH, inline="always")
    def dot1(a, xb):
        s0 = np.float32(0.0)
        for k in range(xb.shape[0]):
            s0 += cvt(a[k]) * xb[k]
        return s0

    @njit(fastmath=_FASTMATH, inline="always")
    def dot4(a, b, c, d, xb):
        s0 = np.float32(0.0)
        s1 = np.float32(0.0)
        s2 = np.float32(0.0)
        s3 = np.float32(0.0)
        for k in range(xb.shape[0]):  # 1-D rows and x (not x[b, k]) vectorise best
            xk = xb[k]
            s0 += cvt(a[k]) * xk
            s1 += cvt(b[k]) * xk
            s2 += cvt(c[k]) * xk
            s3 += cvt(d[k]) * xk
        return s0, s1, s2, s3

    @njit(fastmath=_FASTMATH, inline="always")
    def dot8(p0, p1, p2, p3, p4, p5, p6, p7, xa, xb):
        """Eight concurrent streams: even ones against xa, odd ones against xb."""
        t0 = np.float32(0.0)
        t1 = np.float32(0.0)
        t2 = np.float32(0.0)
        t3 = np.float32(0.0)
        t4 = np.float32(0.0)
        t5 = np.float32(0.0)
        t6 = np.float32(0.0)
        t7 = np.float32(0.0)
        for k in range(xa.shape[0]):
            u, v = xa[k], xb[k]
            t0 += cvt(p0[k]) * u
            t1 += cvt(p1[k]) * v
            t2 += cvt(p2[k]) * u
            t3 += cvt(p3[k]) * v
            t4 += cvt(p4[k]) * u
            t5 += cvt(p5[k]) * v
            t6 += cvt(p6[k]) * u
            t7 += cvt(p7[k]) * v
        return t0, t1, t2, t3, t4, t5, t6, t7

    @njit(fastmath=_FASTMATH, inline="always")
    def axpy8(acc, coef, w, rows):
        """acc += sum_i coef[i] * w[rows[i]] over eight rows (eight read streams)."""
        p0, p1, p2, p3 = w[rows[0]], w[rows[1]], w[rows[2]], w[rows[3]]
        p4, p5, p6, p7 = w[rows[4]], w[rows[5]], w[rows[6]], w[rows[7]]
        c0, c1, c2, c3 = coef[0], coef[1], coef[2], coef[3]
        c4, c5, c6, c7 = coef[4], coef[5], coef[6], coef[7]
        for k in range(acc.shape[0]):
            acc[k] += (c0 * cvt(p0[k]) + c1 * cvt(p1[k]) + c2 * cvt(p2[k]) + c3 * cvt(p3[k])
                       + c4 * cvt(p4[k]) + c5 * cvt(p5[k]) + c6 * cvt(p6[k]) + c7 * cvt(p7[k]))

    @njit(fastmath=_FASTMATH, inline="always")
    def widen(a, m, out):
        for k in range(out.shape[0]):
            out[k] = cvt(a[k]) * m

    @njit(fastmath=_FASTMATH, inline="always")
    def dot4x4(p0, p1, p2, p3, x0, x1, x2, x3):
        """Four rows against four token vectors: each element widened once for all four tokens (a per-token
        pass widened it once per token, and from two tokens on the widening, not the bytes, set the pace).
        Returns the 16 sums row-major (row i, token j at 4i + j)."""
        s00 = s01 = s02 = s03 = np.float32(0.0)
        s10 = s11 = s12 = s13 = np.float32(0.0)
        s20 = s21 = s22 = s23 = np.float32(0.0)
        s30 = s31 = s32 = s33 = np.float32(0.0)
        for k in range(x0.shape[0]):
            a, b, c, d = cvt(p0[k]), cvt(p1[k]), cvt(p2[k]), cvt(p3[k])
            u0, u1, u2, u3 = x0[k], x1[k], x2[k], x3[k]
            s00 += a * u0
            s01 += a * u1
            s02 += a * u2
            s03 += a * u3
            s10 += b * u0
            s11 += b * u1
            s12 += b * u2
            s13 += b * u3
            s20 += c * u0
            s21 += c * u1
            s22 += c * u2
            s23 += c * u3
            s30 += d * u0
            s31 += d * u1
            s32 += d * u2
            s33 += d * u3
        return (s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)

    @njit(fastmath=_FASTMATH, inline="always")
    def axpy8x4(a0, a1, a2, a3, c, p0, p1, p2, p3, p4, p5, p6, p7):
        """a_t += sum_i c[8t + i] * p_i for four tokens' accumulators a_t and eight rows p_i (eight read
        streams, as axpy8): each element widened once for the four tokens (axpy8 widens it once per token)."""
        c00, c01, c02, c03, c04, c05, c06, c07 = c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]
        c10, c11, c12, c13, c14, c15, c16, c17 = c[8], c[9], c[10], c[11], c[12], c[13], c[14], c[15]
        c20, c21, c22, c23, c24, c25, c26, c27 = c[16], c[17], c[18], c[19], c[20], c[21], c[22], c[23]
        c30, c31, c32, c33, c34, c35, c36, c37 = c[24], c[25], c[26], c[27], c[28], c[29], c[30], c[31]
        for k in range(a0.shape[0]):
            w0, w1, w2, w3 = cvt(p0[k]), cvt(p1[k]), cvt(p2[k]), cvt(p3[k])
            w4, w5, w6, w7 = cvt(p4[k]), cvt(p5[k]), cvt(p6[k]), cvt(p7[k])
            a0[k] += (c00 * w0 + c01 * w1 + c02 * w2 + c03 * w3
                      + c04 * w4 + c05 * w5 + c06 * w6 + c07 * w7)
            a1[k] += (c10 * w0 + c11 * w1 + c12 * w2 + c13 * w3
                      + c14 * w4 + c15 * w5 + c16 * w6 + c17 * w7)
            a2[k] += (c20 * w0 + c21 * w1 + c22 * w2 + c23 * w3
                      + c24 * w4 + c25 * w5 + c26 * w6 + c27 * w7)
            a3[k] += (c30 * w0 + c31 * w1 + c32 * w2 + c33 * w3
                      + c34 * w4 + c35 * w5 + c36 * w6 + c37 * w7)

    return dot1, dot4, dot8, axpy8, widen, dot4x4, axpy8x4


_, _f32_dot4, _f32_dot8, _f32_axpy8, _f32_widen, _f32_dot4x4, _f32_axpy8x4 = _elementwise_ops(_f32)
_bf16_dot1, _bf16_dot4, _bf16_dot8, _bf16_axpy8, _bf16_widen, _bf16_dot4x4, _bf16_axpy8x4 = _elementwise_ops(_bf16)
_f16_dot1, _f16_dot4, _f16_dot8, _f16_axpy8, _f16_widen, _f16_dot4x4, _f16_axpy8x4 = _elementwise_ops(_f16)
_i8_dot1, _i8_dot4, _i8_dot8, _i8_axpy8, _i8_widen, _i8_dot4x4, _i8_axpy8x4 = _elementwise_ops(_i8)


@njit(fastmath=_FASTMATH, inline="always")
def _q4_dot4(a, sa, b, sb, c, sc, d, sd, xb):
    """int4 rows (packed) against xb in packed order: xb[j] meets low nibbles, xb[half + j] high.
    A group's scale is one value for 16 consecutive bytes, which LLVM broadcasts per vector."""
    half = a.shape[0]
    # two views, not xb[half + j]: numba's negative-index wraparound on `half + j` turned the
    # loads into gathers (3x slower)
    x_lo, x_hi = xb[:half], xb[half:]
    s0 = np.float32(0.0)
    s1 = np.float32(0.0)
    s2 = np.float32(0.0)
    s3 = np.float32(0.0)
    for j in range(half):
        g = j >> 4
        xl = x_lo[j]
        xh = x_hi[j]
        v = a[j]
        s0 += _f16(sa[g]) * (_lo(v) * xl + _hi(v) * xh)
        v = b[j]
        s1 += _f16(sb[g]) * (_lo(v) * xl + _hi(v) * xh)
        v = c[j]
        s2 += _f16(sc[g]) * (_lo(v) * xl + _hi(v) * xh)
        v = d[j]
        s3 += _f16(sd[g]) * (_lo(v) * xl + _hi(v) * xh)
    return s0, s1, s2, s3


@njit(fastmath=_FASTMATH, inline="always")
def _q4_expand_scales(sa, m, out):
    """out[j] = m * (scale of byte j's group), j < K/2: one f32 per packed byte.

    Loops that store (axpy, widen) cannot load ``scale[j >> 4]`` per element: LLVM has no runtime
    alias check for that index, so it left them scalar (1 GB/s). A splat per group is vectorised,
    and then every load of the main loop is affine. The splat is a slice of a [groups, 16] view:
    written as a loop of 16 stores, LLVM unrolled it and vectorised across groups into scatter
    stores, 2.5x slower than the whole int4 axpy it fed (a dense int4 down projection ran at
    2.7 GB/s)."""
    rows = out.reshape(sa.shape[0], GROUP // 2)
    for g in range(sa.shape[0]):
        rows[g, :] = m * _f16(sa[g])


@njit(fastmath=_FASTMATH, inline="always")
def _q4_axpy4(acc, a0, a, sa, a1, b, sb, a2, c, sc, a3, d, sd, cf):
    """acc (packed order) += sum_i a_i * row_i for four int4 rows; ``cf [4, K/2]`` f32 scratch
    for their per-byte coefficients a_i * d_i."""
    half = a.shape[0]
    _q4_expand_scales(sa, a0, cf[0])
    _q4_expand_scales(sb, a1, cf[1])
    _q4_expand_scales(sc, a2, cf[2])
    _q4_expand_scales(sd, a3, cf[3])
    e0, e1, e2, e3 = cf[0], cf[1], cf[2], cf[3]
    acc_lo, acc_hi = acc[:half], acc[half:]
    for j in range(half):
        acc_lo[j] += e0[j] * _lo(a[j]) + e1[j] * _lo(b[j]) + e2[j] * _lo(c[j]) + e3[j] * _lo(d[j])
    for j in range(half):
        acc_hi[j] += e0[j] * _hi(a[j]) + e1[j] * _hi(b[j]) + e2[j] * _hi(c[j]) + e3[j] * _hi(d[j])


@njit(fastmath=_FASTMATH, inline="always")
def _q4_widen(a, sa, out):
    """The row as f32 in packed order; ``out``'s high half first holds the expanded scales."""
    half = a.shape[0]
    out_lo, out_hi = out[:half], out[half:]
    _q4_expand_scales(sa, np.float32(1.0), out_hi)
    for j in range(half):
        out_lo[j] = out_hi[j] * _lo(a[j])
    for j in range(half):
        out_hi[j] = out_hi[j] * _hi(a[j])


# Format dispatch. The stubs run only inside numba; each overload is chosen by the stored dtype
# at compile time, and bf16/f16 (both uint16 bits) by the format code, outside the loops.
# ``sa`` is the row's scale row: [1] f32 for int8, [K/32] f16 bits for int4, [0] otherwise.
def _dot1(code, a, xb):
    """Stub: one stored row's dot with xb (bf16/f16 bits; int8 without its row scale)."""
    raise NotImplementedError


@overload(_dot1)
def _dot1_impl(code, a, xb):
    dt = a.dtype
    if dt == types.int8:
        return lambda code, a, xb: _i8_dot1(a, xb)
    if dt == types.uint16:
        def impl(code, a, xb):
            if code == _BF16:
                return _bf16_dot1(a, xb)
            return _f16_dot1(a, xb)
        return impl
    return None


def _dot4(code, a, sa, b, sb, c, sc, d, sd, xb):
    """Stub: the dots of four stored rows with xb (in the format's kernel order)."""
    raise NotImplementedError


@overload(_dot4)
def _dot4_impl(code, a, sa, b, sb, c, sc, d, sd, xb):
    dt = a.dtype
    if dt == types.float32:
        return lambda code, a, sa, b, sb, c, sc, d, sd, xb: _f32_dot4(a, b, c, d, xb)
    if dt == types.uint16:
        def impl(code, a, sa, b, sb, c, sc, d, sd, xb):
            if code == _BF16:
                return _bf16_dot4(a, b, c, d, xb)
            return _f16_dot4(a, b, c, d, xb)
        return impl
    if dt == types.int8:
        def impl(code, a, sa, b, sb, c, sc, d, sd, xb):  # the row scale once, after the sum
            s0, s1, s2, s3 = _i8_dot4(a, b, c, d, xb)
            return s0 * sa[0], s1 * sb[0], s2 * sc[0], s3 * sd[0]
        return impl
    if dt == types.uint8:
        return lambda code, a, sa, b, sb, c, sc, d, sd, xb: _q4_dot4(a, sa, b, sb, c, sc, d, sd, xb)
    return None


def _dot8(code, p0, p1, p2, p3, p4, p5, p6, p7, xa, xb):
    """Stub: eight stored row segments against xa (even) and xb (odd), without row scales
    (elementwise formats only)."""
    raise NotImplementedError


@overload(_dot8)
def _dot8_impl(code, p0, p1, p2, p3, p4, p5, p6, p7, xa, xb):
    dt = p0.dtype
    if dt == types.float32:
        def impl(code, p0, p1, p2, p3, p4, p5, p6, p7, xa, xb):
            return _f32_dot8(p0, p1, p2, p3, p4, p5, p6, p7, xa, xb)
        return impl
    if dt == types.uint16:
        def impl(code, p0, p1, p2, p3, p4, p5, p6, p7, xa, xb):
            if code == _BF16:
                return _bf16_dot8(p0, p1, p2, p3, p4, p5, p6, p7, xa, xb)
            return _f16_dot8(p0, p1, p2, p3, p4, p5, p6, p7, xa, xb)
        return impl
    if dt == types.int8:
        def impl(code, p0, p1, p2, p3, p4, p5, p6, p7, xa, xb):
            return _i8_dot8(p0, p1, p2, p3, p4, p5, p6, p7, xa, xb)
        return impl
    return None


def _dot4x4(code, p0, p1, p2, p3, x0, x1, x2, x3):
    """Stub: four stored rows against four token vectors, 16 sums row-major, without row scales
    (elementwise formats only)."""
    raise NotImplementedError


@overload(_dot4x4)
def _dot4x4_impl(code, p0, p1, p2, p3, x0, x1, x2, x3):
    dt = p0.dtype
    if dt == types.float32:
        return lambda code, p0, p1, p2, p3, x0, x1, x2, x3: _f32_dot4x4(p0, p1, p2, p3, x0, x1, x2, x3)
    if dt == types.uint16:
        def impl(code, p0, p1, p2, p3, x0, x1, x2, x3):
            if code == _BF16:
                return _bf16_dot4x4(p0, p1, p2, p3, x0, x1, x2, x3)
            return _f16_dot4x4(p0, p1, p2, p3, x0, x1, x2, x3)
        return impl
    if dt == types.int8:
        return lambda code, p0, p1, p2, p3, x0, x1, x2, x3: _i8_dot4x4(p0, p1, p2, p3, x0, x1, x2, x3)
    if dt == types.uint8:  # typed for int4's `_h_kernel`, never run there (it checks the format)
        def impl(code, p0, p1, p2, p3, x0, x1, x2, x3):
            z = np.float32(0.0)
            if code == _I4:
                raise ValueError("int4 rows take _gated4 one token at a time")
            return (z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z)
        return impl
    return None


def _row_scale(s, r):
    """Stub: the scale of row r (int8) or 1."""
    raise NotImplementedError


@overload(_row_scale)
def _row_scale_impl(s, r):
    return lambda s, r: s[r, 0] if s.shape[1] else np.float32(1.0)


def _gated4(code, wg, sg, wu, su, r0, r1, r2, r3, xb):
    """Stub: (g0, u0, ..., g3, u3), the gate and up dots of neurons r0..r3 with xb."""
    raise NotImplementedError


@overload(_gated4)
def _gated4_impl(code, wg, sg, wu, su, r0, r1, r2, r3, xb):
    # Elementwise formats read the four neurons' eight rows as eight concurrent streams (the
    # sparse rows start at random addresses: more streams in flight hide more of each new row's
    # latency); int4's unpacking is compute-bound, so it stays with two four-stream passes.
    if wg.dtype == types.uint8:
        def impl(code, wg, sg, wu, su, r0, r1, r2, r3, xb):
            g0, u0, g1, u1 = _dot4(code, wg[r0], sg[r0], wu[r0], su[r0], wg[r1], sg[r1], wu[r1], su[r1], xb)
            g2, u2, g3, u3 = _dot4(code, wg[r2], sg[r2], wu[r2], su[r2], wg[r3], sg[r3], wu[r3], su[r3], xb)
            return g0, u0, g1, u1, g2, u2, g3, u3
        return impl

    def impl(code, wg, sg, wu, su, r0, r1, r2, r3, xb):
        t = _dot8(code, wg[r0], wu[r0], wg[r1], wu[r1], wg[r2], wu[r2], wg[r3], wu[r3], xb, xb)
        return (t[0] * _row_scale(sg, r0), t[1] * _row_scale(su, r0), t[2] * _row_scale(sg, r1),
                t[3] * _row_scale(su, r1), t[4] * _row_scale(sg, r2), t[5] * _row_scale(su, r2),
                t[6] * _row_scale(sg, r3), t[7] * _row_scale(su, r3))
    return impl


def _axpy8(code, acc, coef, w, s, rows, cf):
    """Stub: acc += sum_i coef[i] * row rows[i] of (w, s), eight rows (acc in the format's kernel
    order; ``coef`` may be scaled in place; ``cf``: int4's [4, K/2] f32 scratch)."""
    raise NotImplementedError


@overload(_axpy8)
def _axpy8_impl(code, acc, coef, w, s, rows, cf):
    dt = w.dtype
    if dt == types.float32:
        def impl(code, acc, coef, w, s, rows, cf):
            _f32_axpy8(acc, coef, w, rows)
        return impl
    if dt == types.uint16:
        def impl(code, acc, coef, w, s, rows, cf):
            if code == _BF16:
                _bf16_axpy8(acc, coef, w, rows)
            else:
                _f16_axpy8(acc, coef, w, rows)
        return impl
    if dt == types.int8:
        def impl(code, acc, coef, w, s, rows, cf):
            for i in range(8):  # the row scales go into the coefficients
                coef[i] *= s[rows[i], 0]
            _i8_axpy8(acc, coef, w, rows)
        return impl
    if dt == types.uint8:
        def impl(code, acc, coef, w, s, rows, cf):  # compute-bound: two passes of four rows
            for i in range(0, 8, 4):
                r0, r1, r2, r3 = rows[i], rows[i + 1], rows[i + 2], rows[i + 3]
                _q4_axpy4(acc, coef[i], w[r0], s[r0], coef[i + 1], w[r1], s[r1],
                          coef[i + 2], w[r2], s[r2], coef[i + 3], w[r3], s[r3], cf)
        return impl
    return None


def _axpy8x4(code, a0, a1, a2, a3, c, w, s, rows):
    """Stub: a_t += sum_i c[8t + i] * row rows[i] of (w, s) for four tokens t and eight rows (``c`` may be
    scaled in place); the elementwise formats only (int4 takes `_axpy8` a token at a time)."""
    raise NotImplementedError


@overload(_axpy8x4)
def _axpy8x4_impl(code, a0, a1, a2, a3, c, w, s, rows):
    dt = w.dtype
    if dt == types.float32:
        def impl(code, a0, a1, a2, a3, c, w, s, rows):
            _f32_axpy8x4(a0, a1, a2, a3, c, w[rows[0]], w[rows[1]], w[rows[2]], w[rows[3]],
                         w[rows[4]], w[rows[5]], w[rows[6]], w[rows[7]])
        return impl
    if dt == types.uint16:
        def impl(code, a0, a1, a2, a3, c, w, s, rows):
            p0, p1, p2, p3 = w[rows[0]], w[rows[1]], w[rows[2]], w[rows[3]]
            p4, p5, p6, p7 = w[rows[4]], w[rows[5]], w[rows[6]], w[rows[7]]
            if code == _BF16:
                _bf16_axpy8x4(a0, a1, a2, a3, c, p0, p1, p2, p3, p4, p5, p6, p7)
            else:
                _f16_axpy8x4(a0, a1, a2, a3, c, p0, p1, p2, p3, p4, p5, p6, p7)
        return impl
    if dt == types.int8:
        def impl(code, a0, a1, a2, a3, c, w, s, rows):
            for t in range(4):  # the row scales go into the coefficients
                for i in range(8):
                    c[8 * t + i] *= s[rows[i], 0]
            _i8_axpy8x4(a0, a1, a2, a3, c, w[rows[0]], w[rows[1]], w[rows[2]], w[rows[3]],
                        w[rows[4]], w[rows[5]], w[rows[6]], w[rows[7]])
        return impl
    if dt == types.uint8:  # typed for int4's kernel, never run there (`_down_kernel` checks the format)
        def impl(code, a0, a1, a2, a3, c, w, s, rows):
            raise ValueError("int4 rows take _axpy8 one token at a time")
        return impl
    return None


def _widen(code, a, sa, out):
    """Stub: out[:] = the stored row as float32 (in the format's kernel order)."""
    raise NotImplementedError


@overload(_widen)
def _widen_impl(code, a, sa, out):
    dt = a.dtype
    if dt == types.float32:
        return lambda code, a, sa, out: _f32_widen(a, np.float32(1.0), out)
    if dt == types.uint16:
        def impl(code, a, sa, out):
            if code == _BF16:
                _bf16_widen(a, np.float32(1.0), out)
            else:
                _f16_widen(a, np.float32(1.0), out)
        return impl
    if dt == types.int8:
        return lambda code, a, sa, out: _i8_widen(a, sa[0], out)
    if dt == types.uint8:
        return lambda code, a, sa, out: _q4_widen(a, sa, out)
    return None


@intrinsic
def _prefetch(typingctx, arr, i):
    """Ask the CPU to start loading the cache line of the flat array ``arr`` at index ``i`` (a
    hint: never faults, whatever the address)."""
    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fn = builder.module.declare_intrinsic("llvm.prefetch", [ptr.type],
                                              ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]))
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])  # read, keep in all cache levels, data
        return context.get_dummy_value()
    return types.void(arr, types.intp), codegen


@njit(inline="always")
def _prefetch_rows(w, r0, r1):
    """Prefetch rows r0..r1-1 of the C-contiguous 2-D ``w``, one hint per 64-byte line."""
    if r1 > r0:
        flat = w.reshape(-1)
        step = max(1, 64 // w.itemsize)
        for i in range(r0 * w.shape[1], r1 * w.shape[1], step):
            _prefetch(flat, i)


@njit(inline="always")
def _natural_col(k, half):
    """Column of packed-order position k of an int4 row (low nibbles first, then high)."""
    j = k - half if k >= half else k
    return (j >> 4) * GROUP + (GROUP // 2 if k >= half else 0) + (j & 15)


# ---------------------------------------------------------------- numba kernels
_H_CHUNKS = 64  # row chunks of the gate/up kernel
_MV_CHUNKS = 64  # row chunks of the dense mat-vec
_DOWN_PARTIAL_BYTES = 1 << 22  # cap on the down kernel's per-chunk partial sums


@njit(inline="always", fastmath=_FASTMATH, cache=True)
def _glu(family, g, u):
    """act(g) * u of gated family `family` (0 reglu, 1 drelu, 4 swiglu, 5 geglu), float32."""
    zero = np.float32(0.0)
    if family == 0:
        return max(g, zero) * u
    if family == 1:
        return max(g, zero) * max(u, zero)
    if family == 4:
        return g / (np.float32(1.0) + np.exp(-g)) * u
    return np.float32(0.5) * g * (np.float32(1.0) + np.tanh(np.float32(_GELU_C) * (g + np.float32(0.044715) * g * g * g))) * u


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _h_kernel(family, code, wg, sg, wu, su, bu, has_bias, four, x, idx, count, out):
    """out[b, i] = h of neuron idx[i] for token b, i < count.

    family: 0 reglu, 1 drelu, 2 relu (+ bias), 3 plain mat-vec ``wu[idx] @ x`` (wg unused),
    4 swiglu, 5 geglu (`_glu`)
    One kernel for all of them keeps numba's (slow, parallel) compilations to one per dtype.
    Each output element is computed by one thread. Gated families read four neurons a pass
    (gate and up rows of each: eight streams, `_gated4`; from two tokens on in the elementwise formats, their
    gate rows, then their up rows, against four tokens at a time, `_dot4x4`, with ``four``); the others four
    rows. A chunk's short tail computes its last neuron again in the spare slots (same code, same value).
    """
    zero = np.float32(0.0)
    n_tok = x.shape[0]
    step = (count + _H_CHUNKS - 1) // _H_CHUNKS
    for c in prange(_H_CHUNKS):
        lo, hi = c * step, min(count, (c + 1) * step)
        if (family < 2 or family > 3) and four and code != _I4 and n_tok >= 2:
            # Two tokens or more: the four neurons' gate rows, then their up rows, against the tokens four at a
            # time (`_dot4x4`: each element widened once for four tokens; a short last group repeats its last
            # token), as `_matvec_kernel` does.
            for i in range(lo, hi, 4):
                i1, i2, i3 = min(i + 1, hi - 1), min(i + 2, hi - 1), min(i + 3, hi - 1)
                r0, r1, r2, r3 = idx[i], idx[i1], idx[i2], idx[i3]
                dg0, dg1, dg2, dg3 = _row_scale(sg, r0), _row_scale(sg, r1), _row_scale(sg, r2), _row_scale(sg, r3)
                du0, du1, du2, du3 = _row_scale(su, r0), _row_scale(su, r1), _row_scale(su, r2), _row_scale(su, r3)
                for b in range(0, n_tok, 4):
                    b0, b1, b2, b3 = b, min(b + 1, n_tok - 1), min(b + 2, n_tok - 1), min(b + 3, n_tok - 1)
                    g = _dot4x4(code, wg[r0], wg[r1], wg[r2], wg[r3], x[b0], x[b1], x[b2], x[b3])
                    u = _dot4x4(code, wu[r0], wu[r1], wu[r2], wu[r3], x[b0], x[b1], x[b2], x[b3])
                    out[b0, i] = _glu(family, g[0] * dg0, u[0] * du0)
                    out[b1, i] = _glu(family, g[1] * dg0, u[1] * du0)
                    out[b2, i] = _glu(family, g[2] * dg0, u[2] * du0)
                    out[b3, i] = _glu(family, g[3] * dg0, u[3] * du0)
                    out[b0, i1] = _glu(family, g[4] * dg1, u[4] * du1)
                    out[b1, i1] = _glu(family, g[5] * dg1, u[5] * du1)
                    out[b2, i1] = _glu(family, g[6] * dg1, u[6] * du1)
                    out[b3, i1] = _glu(family, g[7] * dg1, u[7] * du1)
                    out[b0, i2] = _glu(family, g[8] * dg2, u[8] * du2)
                    out[b1, i2] = _glu(family, g[9] * dg2, u[9] * du2)
                    out[b2, i2] = _glu(family, g[10] * dg2, u[10] * du2)
                    out[b3, i2] = _glu(family, g[11] * dg2, u[11] * du2)
                    out[b0, i3] = _glu(family, g[12] * dg3, u[12] * du3)
                    out[b1, i3] = _glu(family, g[13] * dg3, u[13] * du3)
                    out[b2, i3] = _glu(family, g[14] * dg3, u[14] * du3)
                    out[b3, i3] = _glu(family, g[15] * dg3, u[15] * du3)
        elif family < 2 or family > 3:  # gated: the branch sits outside the row loop so LLVM vectorises the dots
            for i in range(lo, hi, 4):
                i1, i2, i3 = min(i + 1, hi - 1), min(i + 2, hi - 1), min(i + 3, hi - 1)
                r0, r1, r2, r3 = idx[i], idx[i1], idx[i2], idx[i3]
                for b in range(x.shape[0]):
                    g0, u0, g1, u1, g2, u2, g3, u3 = _gated4(code, wg, sg, wu, su, r0, r1, r2, r3, x[b])
                    out[b, i] = _glu(family, g0, u0)
                    out[b, i1] = _glu(family, g1, u1)
                    out[b, i2] = _glu(family, g2, u2)
                    out[b, i3] = _glu(family, g3, u3)
        else:
            for i in range(lo, hi, 4):
                i1, i2, i3 = min(i + 1, hi - 1), min(i + 2, hi - 1), min(i + 3, hi - 1)
                r0, r1, r2, r3 = idx[i], idx[i1], idx[i2], idx[i3]
                for b in range(x.shape[0]):
                    u0, u1, u2, u3 = _dot4(code, wu[r0], su[r0], wu[r1], su[r1],
                                           wu[r2], su[r2], wu[r3], su[r3], x[b])
                    if family == 2:
                        if has_bias:
                            u0 += bu[r0]
                            u1 += bu[r1]
                            u2 += bu[r2]
                            u3 += bu[r3]
                        u0, u1, u2, u3 = max(u0, zero), max(u1, zero), max(u2, zero), max(u3, zero)
                    out[b, i] = u0
                    out[b, i1] = u1
                    out[b, i2] = u2
                    out[b, i3] = u3


@njit(inline="always", fastmath=_FASTMATH, cache=True)
def _act(family, g):
    """act(g) of gated family `family` (0/1 relu, 4 silu, 5 tanh-GELU): what a threshold compares."""
    if family == 4:
        return g / (np.float32(1.0) + np.exp(-g))
    if family == 5:
        return np.float32(0.5) * g * (np.float32(1.0) + np.tanh(np.float32(_GELU_C) * (g + np.float32(0.044715) * g * g * g)))
    return max(g, np.float32(0.0))


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _h_threshold_kernel(family, code, wg, sg, wu, su, x, idx, count, thr, out):
    """CATS: out[b, i] = act(g) * u for token b where |act(g)| > thr, else 0 (neuron idx[i], i < count).

    Every listed neuron's gate row is read; its up row only when it is above the threshold for
    some token (the down kernel then skips the zero rows): the gate dense, up and down sparse.
    Per chunk: gate dots four rows a pass, then the live neurons compacted, then their up dots
    four rows a pass (a short tail repeats its last row, written once)."""
    zero = np.float32(0.0)
    n_tok = x.shape[0]
    step = (count + _H_CHUNKS - 1) // _H_CHUNKS
    for c in prange(_H_CHUNKS):
        lo, hi = c * step, min(count, (c + 1) * step)
        if hi <= lo:
            continue
        live = np.empty(hi - lo, np.int64)
        for i in range(lo, hi, 4):
            i1, i2, i3 = min(i + 1, hi - 1), min(i + 2, hi - 1), min(i + 3, hi - 1)
            r0, r1, r2, r3 = idx[i], idx[i1], idx[i2], idx[i3]
            for b in range(n_tok):
                g0, g1, g2, g3 = _dot4(code, wg[r0], sg[r0], wg[r1], sg[r1], wg[r2], sg[r2], wg[r3], sg[r3], x[b])
                out[b, i], out[b, i1] = _act(family, g0), _act(family, g1)
                out[b, i2], out[b, i3] = _act(family, g2), _act(family, g3)
        m = 0
        for i in range(lo, hi):
            on = False
            for b in range(n_tok):
                if abs(out[b, i]) > thr:
                    on = True
                else:
                    out[b, i] = zero
            if on:
                live[m] = i
                m += 1
        for j in range(0, m, 4):
            p0, p1, p2, p3 = live[j], live[min(j + 1, m - 1)], live[min(j + 2, m - 1)], live[min(j + 3, m - 1)]
            r0, r1, r2, r3 = idx[p0], idx[p1], idx[p2], idx[p3]
            for b in range(n_tok):
                u0, u1, u2, u3 = _dot4(code, wu[r0], su[r0], wu[r1], su[r1], wu[r2], su[r2], wu[r3], su[r3], x[b])
                if family == 1:  # dReLU: relu(up) too
                    u0, u1, u2, u3 = max(u0, zero), max(u1, zero), max(u2, zero), max(u3, zero)
                out[b, p0] *= u0
                if j + 1 < m:
                    out[b, p1] *= u1
                if j + 2 < m:
                    out[b, p2] *= u2
                if j + 3 < m:
                    out[b, p3] *= u3


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _matvec_kernel(code, w, s, x, out):
    """out[b, r] = row r . x[b] for every row (elementwise formats): each row read once for all
    tokens. A pass reads eight streams of about a page or more each: four rows split in halves
    when rows are 8 KiB or more, else eight rows (the hardware prefetchers follow a stream only
    within its 4 KiB page: int8's 4 KiB rows read at 25-28 GB/s eight at a time, 23-24 four at a
    time; bf16's halves measured 24-30 vs 24-26 GB/s, within this VM's noise). Chunks hold whole
    passes, from the shapes only, so the split never depends on the thread count; a short last
    pass repeats its last row. Two tokens or more: four rows a pass against the tokens four at a
    time (`_dot4x4`: each element widened once for four tokens; a short last group repeats its
    last token), 1.2x at two tokens, 1.7x at four and 1.8x at eight on a 7B bf16 up-projection
    against a pass per token."""
    rows, k = w.shape
    n_tok = x.shape[0]
    if n_tok >= 2:
        passes = (rows + 3) // 4
        step = 4 * ((passes + _MV_CHUNKS - 1) // _MV_CHUNKS)
        for c in prange(_MV_CHUNKS):
            for r in range(c * step, min(rows, (c + 1) * step), 4):
                last = rows - 1
                r0, r1, r2, r3 = r, min(r + 1, last), min(r + 2, last), min(r + 3, last)
                d0, d1, d2, d3 = _row_scale(s, r0), _row_scale(s, r1), _row_scale(s, r2), _row_scale(s, r3)
                for b in range(0, n_tok, 4):
                    b0, b1, b2, b3 = b, min(b + 1, n_tok - 1), min(b + 2, n_tok - 1), min(b + 3, n_tok - 1)
                    t = _dot4x4(code, w[r0], w[r1], w[r2], w[r3], x[b0], x[b1], x[b2], x[b3])
                    out[b0, r0], out[b1, r0], out[b2, r0], out[b3, r0] = t[0] * d0, t[1] * d0, t[2] * d0, t[3] * d0
                    out[b0, r1], out[b1, r1], out[b2, r1], out[b3, r1] = t[4] * d1, t[5] * d1, t[6] * d1, t[7] * d1
                    out[b0, r2], out[b1, r2], out[b2, r2], out[b3, r2] = (t[8] * d2, t[9] * d2, t[10] * d2,
                                                                          t[11] * d2)
                    out[b0, r3], out[b1, r3], out[b2, r3], out[b3, r3] = (t[12] * d3, t[13] * d3, t[14] * d3,
                                                                          t[15] * d3)
        return
    halves = k % 2 == 0 and k * w.itemsize >= 8192
    per = 4 if halves else 8
    passes = (rows + per - 1) // per
    step = per * ((passes + _MV_CHUNKS - 1) // _MV_CHUNKS)
    h = k // 2 if halves else k
    for c in prange(_MV_CHUNKS):
        for r in range(c * step, min(rows, (c + 1) * step), per):
            last = rows - 1
            r0, r1, r2, r3 = r, min(r + 1, last), min(r + 2, last), min(r + 3, last)
            r4, r5, r6, r7 = min(r + 4, last), min(r + 5, last), min(r + 6, last), min(r + 7, last)
            for b in range(x.shape[0]):
                xb = x[b]
                if halves:
                    t = _dot8(code, w[r0][:h], w[r0][h:], w[r1][:h], w[r1][h:],
                              w[r2][:h], w[r2][h:], w[r3][:h], w[r3][h:], xb[:h], xb[h:])
                    out[b, r0] = (t[0] + t[1]) * _row_scale(s, r0)
                    out[b, r1] = (t[2] + t[3]) * _row_scale(s, r1)
                    out[b, r2] = (t[4] + t[5]) * _row_scale(s, r2)
                    out[b, r3] = (t[6] + t[7]) * _row_scale(s, r3)
                else:
                    t = _dot8(code, w[r0], w[r1], w[r2], w[r3], w[r4], w[r5], w[r6], w[r7], xb, xb)
                    out[b, r0] = t[0] * _row_scale(s, r0)
                    out[b, r1] = t[1] * _row_scale(s, r1)
                    out[b, r2] = t[2] * _row_scale(s, r2)
                    out[b, r3] = t[3] * _row_scale(s, r3)
                    out[b, r4] = t[4] * _row_scale(s, r4)
                    out[b, r5] = t[5] * _row_scale(s, r5)
                    out[b, r6] = t[6] * _row_scale(s, r6)
                    out[b, r7] = t[7] * _row_scale(s, r7)


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _one_row_matvec_kernel(code, w, s, x, out):
    """out[0, r] = row r . x[0] for one token over bf16/f16 rows, or int8 rows under 4 KiB (the engine reads
    f32 ones with XLA): each thread reads its rows one after another, one sequential stream, the access
    pattern the roofline's bandwidth is measured with (benchmarks/roofline.py). Beats `_matvec_kernel`'s
    eight streams at every bf16/f16 row length measured (old and new alternating on rotating matrices from
    DRAM, bf16: 7B gate/up 1.05-1.11x, the predictor's fc2 [11008, 1024] 1.52x, [32000, 512] 1.87x) and at
    short int8 rows ([11008, 1024] 2.1x, [32000, 512] 2.7x, 384-wide 1.4-1.5x; even at 2 KiB, 0.92x at 4 KiB;
    BENCHMARKS.md, "One row a pass")."""
    rows = w.shape[0]
    step = (rows + _MV_CHUNKS - 1) // _MV_CHUNKS
    for c in prange(_MV_CHUNKS):
        for r in range(c * step, min(rows, (c + 1) * step)):
            out[0, r] = _dot1(code, w[r], x[0]) * _row_scale(s, r)



@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _bf16_pair_matvec_kernel(w2, x_even, x_odd, out):
    """out[0, r] = row r . x for one token over bf16 rows read as uint32 pairs ``w2 [R, K/2]``: element 2k
    is the pair's low half shifted up, element 2k+1 its high half masked (two integer ops a pair, no
    zero-extending shuffle, against `x_even` = x[0::2] and `x_odd` = x[1::2]). One stream a thread, as
    `_one_row_matvec_kernel`."""
    rows = w2.shape[0]
    step = (rows + _MV_CHUNKS - 1) // _MV_CHUNKS
    high = np.uint32(0xFFFF0000)
    # At least one pair (rows are never empty): with a possible zero, LLVM vectorised the empty-row case across
    # rows into scatter stores (benchmarks/kernel_codegen.py); peeling the first pair instead cost 13-22% on rows
    # of 384-2048 values (the main loop's count no longer a multiple of its 64 pairs).
    pairs = max(w2.shape[1], 1)
    for c in prange(_MV_CHUNKS):
        for r in range(c * step, min(rows, (c + 1) * step)):
            a = w2[r]
            s0 = np.float32(0.0)
            for k in range(pairs):
                u = a[k]
                s0 += (np.uint32(u << np.uint32(16)).view(np.float32) * x_even[k]
                       + np.uint32(u & high).view(np.float32) * x_odd[k])
            out[0, r] = s0


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _matvec_q4_kernel(w, s, x, xsum, out, scratch):
    """int4 mat-vec: out[b, r] = row r . x[b] (x in packed order, ``xsum [B, K/32]`` its group sums).

    Unpacking nibbles makes int4 compute-bound (~15 G values/s a core with 256-bit vectors), so
    each pass does the least work per value: one row at a time, its group scales converted once
    into ``scratch [chunks, K/32]``, and the -8 offset taken out of the loop (sum_g d_g sum q x
    minus 8 sum_g d_g xsum_g). The next row is prefetched: the hardware prefetchers alone left
    this slow loop waiting at the start of every 2 KiB row (2.7x slower).
    """
    rows, half = w.shape
    step = (rows + _MV_CHUNKS - 1) // _MV_CHUNKS
    eight = np.float32(8.0)
    for c in prange(_MV_CHUNKS):
        dt = scratch[c]
        end = min(rows, (c + 1) * step)
        for r in range(c * step, end):
            if r + 1 < end:
                _prefetch_rows(w, r + 1, r + 2)
                _prefetch_rows(s, r + 1, r + 2)
            sr = s[r]
            for g in range(sr.shape[0]):
                dt[g] = _f16(sr[g])
            a = w[r]
            for b in range(x.shape[0]):
                xb, xs = x[b], xsum[b]
                x_lo, x_hi = xb[:half], xb[half:]
                corr = np.float32(0.0)
                for g in range(sr.shape[0]):
                    corr += dt[g] * xs[g]
                acc = np.float32(0.0)
                for j in range(half):
                    v = a[j]
                    acc += dt[j >> 4] * (np.float32(np.uint8(v & np.uint8(15))) * x_lo[j]
                                         + np.float32(np.uint8(v >> np.uint8(4))) * x_hi[j])
                out[b, r] = acc - eight * corr


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _down_kernel(code, wd, sd, idx, count, h, skip_zero, four, out, parts, sels, coefs, scratch):
    """out[b, :] = sum_{i<count} h[b, i] * wd[idx[i], :].

    The rows are split into a fixed number of chunks (from the shapes only); each chunk sums
    its whole rows into its own partial, eight live rows per pass (concurrent read streams:
    four were 1.7x one row at a time, eight another 5-10%), and the partials are then added in
    chunk order. No thread adds into another's memory (the reference engine's unsynchronised
    adds made greedy runs differ), and the result does not depend on the thread count. With
    ``skip_zero``, rows whose h is zero for every token (ReLU zeros of predicted-active neurons)
    are skipped: their bytes are never read. A pass with fewer than eight live rows repeats its
    last row with coefficient 0.
    From four tokens on (elementwise formats; ``four``), each group of four tokens takes the eight rows in one
    pass (`_axpy8x4`), every element widened once for the four: per token, the widening, not the bytes, set
    the pace.
    Caller-allocated: ``parts [chunks, B, d]`` zeros, ``sels [chunks, 2, 8]`` int64 (positions,
    rows), ``coefs [chunks, 40]`` f32, ``scratch [chunks, 4, K/2 or 0]`` f32 (int4).
    """
    n_tok = h.shape[0]
    n_chunks = parts.shape[0]
    d = parts.shape[2]
    zero = np.float32(0.0)
    step = (count + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        sel, rows, coef, coef32 = sels[c, 0], sels[c, 1], coefs[c, :8], coefs[c, 8:]
        acc = parts[c]
        i = c * step
        end = min(count, (c + 1) * step)
        while i < end:
            m = 0
            while i < end and m < 8:  # the next (up to) eight live rows of this chunk
                live = not skip_zero
                for b in range(n_tok):
                    live = live or h[b, i] != 0
                if live:
                    sel[m] = i
                    m += 1
                i += 1
            if m == 0:
                break
            for j in range(8):
                rows[j] = idx[sel[min(j, m - 1)]]
            b = 0
            while four and code != _I4 and b + 4 <= n_tok:  # four tokens at a time, each row widened once
                for t in range(4):
                    for j in range(8):
                        coef32[8 * t + j] = h[b + t, sel[j]] if j < m else zero
                _axpy8x4(code, acc[b], acc[b + 1], acc[b + 2], acc[b + 3], coef32, wd, sd, rows)
                b += 4
            for b in range(b, n_tok):
                for j in range(8):
                    coef[j] = h[b, sel[j]] if j < m else zero
                # acc[b]: 1-D views vectorise; acc[b, k] indexing did not as well
                _axpy8(code, acc[b], coef, wd, sd, rows, scratch[c])
    # The partials are added on the calling thread, chunk after chunk over whole rows (vectorised):
    # a second parallel loop cost more to start (~35 us waking the team, OMP_WAIT_POLICY=PASSIVE)
    # than the adds, and summing each column across chunks (a strided inner loop) took ~65 us a
    # 4096-wide token.
    for b in range(n_tok):
        total = parts[0, b]
        for c in range(1, n_chunks):
            part = parts[c, b]
            for k in range(d):
                total[k] += part[k]
        if code == _I4:
            half = d // 2
            for k in range(d):
                out[b, _natural_col(k, half)] = total[k]
        else:
            out[b, :] = total


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _widen_kernel(code, w, s, idx, lo, out):
    """out[i] = row idx[lo + i] as float32 in the format's kernel order (BLAS blocks)."""
    for i in prange(out.shape[0]):
        r = idx[lo + i]
        _widen(code, w[r], s[r], out[i])


def _serial_twin(kernel):
    """``kernel`` compiled without threads, from a copy of its Python function under its own name:
    numba's on-disk cache keys on name, signature and bytecode, not on ``parallel``, so a twin of
    the same function loaded the other's machine code (the parallel mat-vec ran on one thread)."""
    f = kernel.py_func
    twin = FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__, f.__closure__)
    twin.__qualname__ = f.__qualname__ + "_serial"
    twin.__doc__ = f.__doc__
    return njit(fastmath=_FASTMATH, cache=True)(twin)


# The same kernels compiled without threads, for small work: waking the parallel workers costs
# ~70 us per region (3 regions a call), 12x the whole call for a 384-wide layer's 120 rows.
# Identical results: the work split is fixed, only who runs the chunks changes.
_h_kernel_serial = _serial_twin(_h_kernel)
_h_threshold_kernel_serial = _serial_twin(_h_threshold_kernel)
_down_kernel_serial = _serial_twin(_down_kernel)
_matvec_kernel_serial = _serial_twin(_matvec_kernel)
_one_row_matvec_kernel_serial = _serial_twin(_one_row_matvec_kernel)
_matvec_q4_kernel_serial = _serial_twin(_matvec_q4_kernel)
_bf16_pair_matvec_kernel_serial = _serial_twin(_bf16_pair_matvec_kernel)
SERIAL_MAX_BYTES = 1 << 21  # weight bytes a call reads below which it runs on one thread
# One bf16 token over even-length rows reads them as uint32 pairs (`_bf16_pair_matvec_kernel`): alone 1.04-1.48x the
# one-row kernel from bundled to 7B shapes, 1.06x in a jitted chain of the 7B shape's q/k/v, o and head mat-vecs,
# 1.12x on the 4-layer 7B hybrid step (AMD EPYC, alternating calls; BENCHMARKS.md, "bf16 rows read as uint32
# pairs"). The eight-stream kernels gained nothing from it.
BF16_PAIRS = True
I8_ONE_ROW_BELOW_COLS = 4096  # int8 rows shorter than this take the one-row kernel for one token


# ---------------------------------------------------------------- argument handling
class _KW(NamedTuple):
    """A weight as the kernels take it: format code, contiguous data, 2-D per-row scales."""
    code: int
    data: np.ndarray   # [R, K] (int4: [R, K//2] uint8)
    scale: np.ndarray  # [R, 1] f32 (int8) | [R, K//32] uint16 (int4) | [R, 0] f32 (float formats)
    cols: int          # logical K

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    @property
    def row_bytes(self) -> int:
        return self.data.shape[1] * self.data.itemsize + self.scale.shape[1] * self.scale.itemsize


def _writable_alias(a: np.ndarray) -> np.ndarray:
    """A writeable array over a read-only array's memory, without copying.

    numba compiles read-only arrays (numpy views of JAX CPU buffers, the engine's hot rows) into
    slower code: 2.4 vs 1.9 ms for a 7B layer's 900 active rows. The kernels never write to
    weights, and the caller keeps `a` (which owns the memory) alive for the call.
    """
    buf = (ctypes.c_char * a.nbytes).from_address(a.ctypes.data)
    return np.frombuffer(buf, dtype=a.dtype).reshape(a.shape)


def _contig(a) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return _writable_alias(a) if not a.flags.writeable and a.size else a


def _kernel_weight(w) -> _KW:
    """Validate a weight argument (Weight or float array) and put it in kernel form."""
    if isinstance(w, Weight):
        check_format(w.fmt, w.cols)
        code, cols = FORMATS.index(w.fmt), int(w.cols)
        data = np.asarray(w.data)
        if code in (_BF16, _F16) and data.dtype in (BF16, np.dtype(np.float16)):
            data = data.view(np.uint16)  # a float Weight holding the float array, not its bits
    else:
        data = np.asarray(w)
        if data.ndim != 2:
            raise ValueError(f"a weight is a 2-D row matrix, got shape {data.shape}")
        kinds = {np.dtype(np.float32): _F32, BF16: _BF16, np.dtype(np.float16): _F16}
        if data.dtype not in kinds:
            raise TypeError(f"host kernels take float32, bfloat16 or float16 arrays or an "
                            f"ops.quant.Weight, got {data.dtype}")
        code, cols = kinds[data.dtype], data.shape[1]
        data = data.view(np.uint16) if code != _F32 else data
    want_cols = cols // 2 if code == _I4 else cols
    if data.dtype != _DATA_DTYPE[code] or data.ndim != 2 or data.shape[1] != want_cols:
        raise ValueError(f"{FORMATS[code]} weight of {cols} columns needs data "
                         f"{_DATA_DTYPE[code]} [rows, {want_cols}], got {data.dtype} {data.shape}")
    rows = data.shape[0]
    if code == _I8:
        scale = np.asarray(w.scale)
        if scale.dtype != np.float32 or scale.shape != (rows,):
            raise ValueError(f"int8 scale must be float32 [{rows}], got {scale.dtype} {scale.shape}")
        scale = _contig(scale).reshape(rows, 1)
    elif code == _I4:
        scale = np.asarray(w.scale)
        if scale.dtype != np.uint16 or scale.shape != (rows, cols // GROUP):
            raise ValueError(f"int4 scale must be uint16 (f16 bits) [{rows}, {cols // GROUP}], "
                             f"got {scale.dtype} {scale.shape}")
        scale = _contig(scale)
    else:
        scale = np.empty((rows, 0), np.float32)
    return _KW(code, _contig(data), scale, cols)


def _kernel_x(kw: _KW, x) -> np.ndarray:
    """x [B, K] as contiguous f32 in the weight's kernel order (int4: packed, see module doc)."""
    x2 = _arg(np.atleast_2d(x), np.float32)
    _expect(x2.ndim == 2 and x2.shape[1] == kw.cols,
            f"x has {x2.shape[-1]} features, the weight {kw.cols} columns")
    if kw.code != _I4:
        return x2
    b, k = x2.shape
    return np.ascontiguousarray(x2.reshape(b, k // GROUP, 2, GROUP // 2).transpose(0, 2, 1, 3).reshape(b, k))


def _natural_order(code: int, y: np.ndarray) -> np.ndarray:
    """Inverse of _kernel_x's permutation for sums accumulated in an int4 row's packed order."""
    if code != _I4:
        return y
    b, k = y.shape
    return y.reshape(b, 2, k // GROUP, GROUP // 2).transpose(0, 2, 1, 3).reshape(b, k)


def _serial(count, kw: _KW) -> bool:
    return count * kw.row_bytes <= SERIAL_MAX_BYTES


def _arg(a, dtype):
    """Small arrays as writeable C-contiguous ``dtype`` (readonly ones would compile anew)."""
    return np.require(a, dtype, ["C", "W"])


def _rows(idx, count, n_rows):
    """idx as int32 after checking idx[:count] (numba does no bounds checks: bad rows corrupt)."""
    idx = _arg(idx, np.int32)
    count = int(count)
    if not 0 <= count <= idx.shape[0]:
        raise ValueError(f"count {count} outside [0, {idx.shape[0]}]")
    if count and not (0 <= idx[:count].min() and idx[:count].max() < n_rows):
        raise IndexError(f"idx[:count] outside [0, {n_rows})")
    return idx, count


def _expect(ok, msg):
    if not ok:
        raise ValueError(msg)


def _out(out, shape):
    """A caller's output buffer (written in place by numba) or a new one."""
    if out is None:
        return np.empty(shape, np.float32)
    _expect(out.dtype == np.float32 and out.flags.c_contiguous and out.flags.writeable,
            "out must be a writeable C-contiguous float32 array")
    _expect(out.size == int(np.prod(shape)), f"out has shape {out.shape}, expected {shape}")
    return out.reshape(shape)


# ---------------------------------------------------------------- public kernels
def host_gather_matvec(w, idx, count, x):
    """numba ``w[idx[:count]] @ x``: [B, count] f32 (each row read once for all tokens)."""
    kw = _kernel_weight(w)
    x2 = _kernel_x(kw, x)
    idx, count = _rows(idx, count, kw.rows)
    out = np.empty((x2.shape[0], count), np.float32)
    kernel = _h_kernel_serial if _serial(count, kw) else _h_kernel
    kernel(3, kw.code, kw.data, kw.scale, kw.data, kw.scale, np.zeros(1, np.float32), False, False,
           x2, idx, count, out)
    return out


def _gate_up(family, w_gate, w_up) -> tuple[_KW, _KW]:
    check_family(family, w_gate)
    ku = _kernel_weight(w_up)
    kg = ku if w_gate is None else _kernel_weight(w_gate)
    _expect(kg.code == ku.code and kg.data.shape == ku.data.shape,
            f"gate and up must share format and shape: {FORMATS[kg.code]} {kg.data.shape} vs "
            f"{FORMATS[ku.code]} {ku.data.shape}")
    return kg, ku


def host_sparse_h(family, w_gate, w_up, x, idx, count, b_up=None, out=None, act_threshold=None):
    """numba fused cold activations ``h [B, count]`` (f32, from any stored format). With
    ``act_threshold`` (gated families), h is zero where |act(gate x)| <= it and the up rows of
    neurons below it for every token are never read (`_h_threshold_kernel`)."""
    kg, ku = _gate_up(family, w_gate, w_up)
    x2 = _kernel_x(ku, x)
    idx, count = _rows(idx, count, ku.rows)
    out = _out(out, (x2.shape[0], count))
    if act_threshold is not None:
        _expect(family != "relu", "an activation threshold needs a gated family")
        kernel = _h_threshold_kernel_serial if _serial(2 * count, ku) else _h_threshold_kernel
        kernel(_FAMILY_CODE[family], ku.code, kg.data, kg.scale, ku.data, ku.scale, x2, idx, count,
               np.float32(act_threshold), out)
        return out
    has_bias = b_up is not None
    bu = _arg(b_up, np.float32) if has_bias else np.zeros(1, np.float32)
    _expect(not has_bias or bu.shape[0] >= ku.rows, "b_up has fewer entries than w_up rows")
    kernel = _h_kernel_serial if _serial(2 * count, ku) else _h_kernel
    kernel(_FAMILY_CODE[family], ku.code, kg.data, kg.scale, ku.data, ku.scale, bu, has_bias, GATED_FOUR_TOKENS,
           x2, idx, count, out)
    return out


def _down_buffers(kw: _KW, n_tok):
    d = kw.cols
    n_chunks = max(1, min(16, _DOWN_PARTIAL_BYTES // (4 * n_tok * d)))
    return (np.zeros((n_chunks, n_tok, d), np.float32), np.empty((n_chunks, 2, 8), np.int64),
            np.empty((n_chunks, 40), np.float32),
            np.empty((n_chunks, 4, d // 2 if kw.code == _I4 else 0), np.float32))


# From two tokens on, the gated `_h_kernel` (gate and up dots of the listed neurons: the dense FFN's decode rows,
# every hybrid's cold neurons) meets the tokens four at a time (`_dot4x4`); False: one token a pass (the earlier
# kernel, kept for A/B runs and tests). BENCHMARKS.md, "Four tokens a pass in the gate/up kernel".
GATED_FOUR_TOKENS = True
# The down kernel takes tokens four at a time (`_axpy8x4`) from four tokens on; False: one at a time (the
# earlier kernel, kept for A/B runs and tests). 7B down projection [11008, 4096], alternating calls in one process:
# see BENCHMARKS.md, "Four tokens a pass in the down kernel".
AXPY_FOUR_TOKENS = True


def host_axpy_down(w_down_t, idx, count, h, out=None, skip_zero_rows=True):
    """numba deterministic ``h @ w_down_t[idx[:count]]``: [B, d] f32.

    ``skip_zero_rows``: rows whose h is 0 for every token are not read (sparse FFN); a dense
    FFN passes False (every row read; nothing to test per row)."""
    kw = _kernel_weight(w_down_t)
    h2 = _arg(np.atleast_2d(h), np.float32)
    idx, count = _rows(idx, count, kw.rows)
    out = _out(out, (h2.shape[0], kw.cols))
    _expect(h2.shape[1] >= count, f"h has {h2.shape[1]} columns, count is {count}")
    kernel = _down_kernel_serial if _serial(count, kw) else _down_kernel
    kernel(kw.code, kw.data, kw.scale, idx, count, h2, bool(skip_zero_rows), AXPY_FOUR_TOKENS, out,
           *_down_buffers(kw, h2.shape[0]))
    return out


# From how many tokens blocked BLAS GEMMs beat the numba kernels, by product and format. The kernels'
# cost grows with the tokens (their arithmetic: ~1 ms a token on a 7B up-projection on 2 cores); BLAS
# first widens every row block to f32 (~30 ms a 7B matrix in a half or integer format, nothing for
# contiguous f32 rows), then runs at GEMM speed. int4's kernels unpack nibbles per token and cross
# first. Measured on the 7B shape (BENCHMARKS.md, "Host kernels or BLAS by batch size"): at 16 tokens
# an int8 up-projection takes 15.8 ms in the kernel and 39.9 ms through BLAS, the transposed down
# projection 16.8 vs 79.7 ms; at 128 tokens BLAS wins (104 vs 124 ms). "matvec": x @ w.T;
# "axpy": h @ w (the transposed down projection); "ffn": the fused sparse FFN over listed rows.
_BLAS_MIN_TOKENS = {
    "matvec": {"float32": 8, "int4": 32},
    "axpy": {"float32": 8, "int4": 32},
    "ffn": {"float32": 32, "int4": 16},
}
_BLAS_MIN_DEFAULT = {"matvec": 64, "axpy": 128, "ffn": 64}  # bfloat16, float16, int8
_WARM_BLAS_TOKENS = max(_BLAS_MIN_DEFAULT.values())  # a batch every product takes through BLAS


def _format_of(w) -> str:
    """A weight argument's stored format (a Weight's own; a plain array's from its dtype), unchecked."""
    return w.fmt if isinstance(w, Weight) else np.dtype(w.dtype).name


def blas_min_tokens(fmt: str, product: str = "matvec") -> int:
    """Tokens from which the host `product` ("matvec", "axpy" or "ffn") over a weight stored as `fmt`
    goes through blocked BLAS GEMMs instead of the numba kernels."""
    return _BLAS_MIN_TOKENS[product].get(fmt, _BLAS_MIN_DEFAULT[product])
BLAS_BLOCK_ROWS = 512  # rows widened to f32 at a time for BLAS (bounded scratch; 256 was 10% slower)


@functools.cache
def _blas_controller() -> threadpoolctl.ThreadpoolController | None:
    # On the CPU backend XLA's own threads hold the cores while a callback runs: OpenBLAS's
    # spinning workers then fight them (a 16-row decode step of the bundled hybrid model took
    # 607 ms with 2 BLAS threads, 33 ms with 1). Elsewhere the host cores are free for BLAS.
    return threadpoolctl.ThreadpoolController() if jax.default_backend() == "cpu" else None


def one_blas_thread():
    """A context: one BLAS thread for the host kernels' GEMMs on the CPU backend (see _blas_controller)."""
    c = _blas_controller()
    return c.limit(limits=1, user_api="blas") if c is not None else contextlib.nullcontext()


def _f32_rows(kw: _KW, idx, i0, i1, scratch):
    """Rows idx[i0:i1] as f32 [n, K] in kernel order: a view when they are contiguous f32 rows,
    else widened (or gathered) into the flat f32 ``scratch``."""
    n = i1 - i0
    if kw.code == _F32 and n and idx[i1 - 1] - idx[i0] == n - 1 and \
            np.array_equal(idx[i0:i1], np.arange(idx[i0], idx[i0] + n)):
        return kw.data[idx[i0]: idx[i0] + n]
    block = scratch[: n * kw.cols].reshape(n, kw.cols)
    _widen_kernel(kw.code, kw.data, kw.scale, idx, i0, block)
    return block


def _all_rows(n):
    return np.arange(n, dtype=np.int32)


def _widened_blocks(kw: _KW):
    """(r0, r1, rows r0:r1 as f32 [n, K] in kernel order) for each ``BLAS_BLOCK_ROWS`` block of the weight,
    one scratch buffer reused (a block is valid until the next is yielded)."""
    idx = _all_rows(kw.rows)
    scratch = np.empty(min(BLAS_BLOCK_ROWS, kw.rows) * kw.cols, np.float32)
    for r0 in range(0, kw.rows, BLAS_BLOCK_ROWS):
        r1 = min(kw.rows, r0 + BLAS_BLOCK_ROWS)
        yield r0, r1, _f32_rows(kw, idx, r0, r1, scratch)


def host_matmul_blocked(w, x, out=None):
    """``x [B, K] @ dequantize(w).T`` -> [B, R] f32 through BLAS, ``BLAS_BLOCK_ROWS`` rows widened
    at a time (for prompts: the f32 matrix is never materialised)."""
    kw = _kernel_weight(w)
    xk = _kernel_x(kw, x)
    y = _out(out, (xk.shape[0], kw.rows))
    with one_blas_thread():
        for r0, r1, block in _widened_blocks(kw):
            y[:, r0:r1] = xk @ block.T
    if out is not None:
        return out
    return y[0] if np.ndim(x) == 1 else y


def host_matmul_t_blocked(w, h, out=None):
    """``h [B, R] @ dequantize(w)`` -> [B, K] f32 through BLAS (the transposed down projection of a
    prompt), ``BLAS_BLOCK_ROWS`` rows widened at a time as in ``host_matmul_blocked``."""
    kw = _kernel_weight(w)
    h2 = _arg(np.atleast_2d(h), np.float32)
    _expect(h2.ndim == 2 and h2.shape[1] == kw.rows, f"h has {h2.shape[-1]} columns, the weight {kw.rows} rows")
    y = np.zeros((h2.shape[0], kw.cols), np.float32)  # in the weight's kernel order
    with one_blas_thread():
        for r0, r1, block in _widened_blocks(kw):
            y += h2[:, r0:r1] @ block
    res = _out(out, y.shape)
    res[...] = _natural_order(kw.code, y)
    return res[0] if out is None and np.ndim(h) == 1 else res


def host_matvec(w, x, out=None):
    """``x [B, K] @ dequantize(w).T`` -> [B, R] f32 (x [K] -> [R]): every row read once for all
    tokens, at memory bandwidth in any format; BLAS blocks from ``blas_min_tokens`` tokens."""
    kw = _kernel_weight(w)
    xk = _kernel_x(kw, x)
    if xk.shape[0] >= blas_min_tokens(FORMATS[kw.code]):
        return host_matmul_blocked(w, x, out=out)
    y = _out(out, (xk.shape[0], kw.rows))
    serial = _serial(kw.rows, kw)
    if kw.code == _I4:
        half, groups = kw.cols // 2, kw.cols // GROUP
        xsum = (xk[:, :half] + xk[:, half:]).reshape(xk.shape[0], groups, GROUP // 2).sum(-1, dtype=np.float32)
        kernel = _matvec_q4_kernel_serial if serial else _matvec_q4_kernel
        kernel(kw.data, kw.scale, xk, xsum, y, np.empty((_MV_CHUNKS, groups), np.float32))
    elif xk.shape[0] == 1 and kw.code == _BF16 and BF16_PAIRS and kw.cols % 2 == 0:
        kernel = _bf16_pair_matvec_kernel_serial if serial else _bf16_pair_matvec_kernel
        x_pairs = np.ascontiguousarray(xk[0].reshape(-1, 2).T)  # [2, K/2]: x's even entries, then its odd ones
        kernel(kw.data.view(np.uint32), x_pairs[0], x_pairs[1], y)
    elif xk.shape[0] == 1 and (kw.code in (_BF16, _F16) or kw.code == _I8 and kw.cols < I8_ONE_ROW_BELOW_COLS):
        # one token in half precision or over short int8 rows: one stream a thread
        (_one_row_matvec_kernel_serial if serial else _one_row_matvec_kernel)(kw.code, kw.data, kw.scale, xk, y)
    else:
        kernel = _matvec_kernel_serial if serial else _matvec_kernel
        kernel(kw.code, kw.data, kw.scale, xk, y)
    if out is not None:
        return out
    return y[0] if np.ndim(x) == 1 else y


def _count_live(h: np.ndarray, live, first: int, offset: int = 0) -> None:
    """Adds to live[0] the listed neurons (columns of h, list positions offset...) with a non-zero h for some
    token, and to live[1] (when present) those of them at list positions below `first`."""
    nz = np.any(h != 0, axis=0)
    live[0] += np.count_nonzero(nz)
    if len(live) > 1:
        live[1] += np.count_nonzero(nz[: max(0, first - offset)])


def _blas_ffn(family, kg, ku, kd, x2, idx, count, bu, out, act_threshold=None, live=None, live_first=0):
    """Many tokens: GEMMs over blocks of the selected rows, each widened to f32 (or, for
    contiguous f32 rows, used in place), so temporaries stay ``BLAS_BLOCK_ROWS`` rows."""
    xk = _kernel_x(ku, x2)
    y = np.zeros((x2.shape[0], kd.cols), np.float32)  # in w_down_t's kernel order
    scratch = np.empty(BLAS_BLOCK_ROWS * max(ku.cols, kd.cols), np.float32)  # one block at a time
    with one_blas_thread():
        for i0 in range(0, count, BLAS_BLOCK_ROWS):
            i1 = min(count, i0 + BLAS_BLOCK_ROWS)
            u = xk @ _f32_rows(ku, idx, i0, i1, scratch).T
            if family == "relu":
                h = np.maximum(u + bu[idx[i0:i1]], 0) if bu is not None else np.maximum(u, 0)
            else:
                g = xk @ _f32_rows(kg, idx, i0, i1, scratch).T
                h = _np_glu(family, g, u)
                if act_threshold is not None:
                    h = np.where(np.abs(_np_act(family, g)) > act_threshold, h, np.float32(0))
            if live is not None:
                _count_live(h, live, live_first, i0)
            y += h @ _f32_rows(kd, idx, i0, i1, scratch)
    out[...] = _natural_order(kd.code, y)


def host_sparse_ffn(family, w_gate, w_up, w_down_t, x, idx, count, b_up=None, out=None, act_threshold=None,
                    live=None, live_first=0):
    """Cold FFN part over rows idx[:count] (no down bias): [d] or [B, d] f32, any format.

    numba kernels for decode-sized batches; blocked BLAS GEMMs for prompts. ``act_threshold``:
    neurons with |act(gate x)| <= it contribute nothing for that token (CATS); ``live``: an int array
    whose live[0] gets the number of neurons computed for some token (their h is non-zero) and, when it
    has a second entry, live[1] those among the first ``live_first`` listed (e.g. a layer's hot ones)."""
    x2 = np.atleast_2d(x)
    if live is not None:
        live[:] = 0
    if x2.shape[0] >= blas_min_tokens(_format_of(w_up), "ffn"):
        kg, ku = _gate_up(family, w_gate, w_up)
        kd = _kernel_weight(w_down_t)
        _expect(kd.rows == ku.rows, "w_down_t and w_up disagree on the number of neurons")
        idx, count = _rows(idx, count, ku.rows)
        bu = None if b_up is None else _arg(b_up, np.float32)
        y = _out(out, (x2.shape[0], kd.cols))
        _blas_ffn(family, kg, ku, kd, _arg(x2, np.float32), idx, count, bu, y, act_threshold, live, live_first)
    else:
        h = host_sparse_h(family, w_gate, w_up, x, idx, count, b_up, act_threshold=act_threshold)
        if live is not None:
            _count_live(h, live, live_first)
        y = host_axpy_down(w_down_t, idx, count, h, out=out)
    if out is not None:
        return out
    return y[0] if np.ndim(x) == 1 else y


@njit(cache=True)
def _select_union_kernel(scores, rows, thr, hot_ids, cold_ids, ids):
    n = scores.shape[1]
    on = np.zeros(n, np.bool_)
    for b in range(scores.shape[0]):  # row by row: each pass reads one contiguous row of scores
        if rows[b]:
            for j in range(n):
                if scores[b, j] >= thr:
                    on[j] = True
    n_hot, count, hot = hot_ids.shape[0], 0, 0
    for j in range(n):
        if on[j]:
            ids[count] = hot_ids[j] if j < n_hot else cold_ids[j - n_hot]
            count += 1
            if j < n_hot:
                hot += 1
    return count, hot


def host_select_union(scores, rows, threshold, hot_ids, cold_ids):
    """Neurons that some marked row scores >= threshold: (ids [n] int32 whose first `count` are them,
    count, hot count). Position j of ``scores [B, n]`` is neuron ``hot_ids[j]`` for j < H, else
    ``cold_ids[j - H]``; ids keep that order (hot first, then cold), ``rows [B]`` marks the rows that
    take part (batch padding does not)."""
    scores = _arg(np.atleast_2d(scores), np.float32)
    rows = _arg(rows, np.bool_)
    hot_ids, cold_ids = _arg(hot_ids, np.int32), _arg(cold_ids, np.int32)
    n = scores.shape[1]
    _expect(hot_ids.shape[0] + cold_ids.shape[0] == n, f"{hot_ids.shape[0]} hot + {cold_ids.shape[0]} cold ids "
            f"for {n} scores")
    _expect(rows.shape == (scores.shape[0],), f"rows has shape {rows.shape}, scores {scores.shape}")
    ids = np.empty(n, np.int32)
    count, hot = _select_union_kernel(scores, rows, np.float32(threshold), hot_ids, cold_ids, ids)
    return ids, int(count), int(hot)


def host_select_union_ref(scores, rows, threshold, hot_ids, cold_ids):
    """numpy reference of ``host_select_union``: (ids of the selected neurons, hot count)."""
    scores = np.atleast_2d(np.asarray(scores, np.float32))[np.asarray(rows, bool)]
    pos = np.flatnonzero(np.any(scores >= np.float32(threshold), axis=0))
    order = np.concatenate([np.asarray(hot_ids, np.int32), np.asarray(cold_ids, np.int32)])
    return order[pos], int(np.count_nonzero(pos < len(hot_ids)))


_WARM: set = set()


def warm(formats, gated: bool = False) -> float:
    """Runs every kernel once per weight format on small zero weights (serial and parallel variants,
    prompt and decode sizes), so numba loads their machine code from its on-disk cache (or compiles it)
    now and not inside the first tokens. Once per format and process; returns the seconds it took."""
    t0 = time.perf_counter()
    cols = 1024
    for fmt in formats:
        if (fmt, gated) in _WARM:
            continue
        for rows in (8, None):  # serial, then parallel (a call reading more than SERIAL_MAX_BYTES)
            if rows is None:
                rows = 2 * SERIAL_MAX_BYTES // _kernel_weight(_zero_weight(8, cols, fmt)).row_bytes + 8
            w = _zero_weight(rows, cols, fmt)
            idx = np.arange(rows, dtype=np.int32)
            for n_tok in (1, 2, _WARM_BLAS_TOKENS):  # the mat-vec kernels (one row, eight streams), then BLAS
                x = np.ones((n_tok, cols), np.float32)
                host_matvec(w, x)
                if fmt == "bfloat16" and n_tok == 1:  # odd-length rows (predictors of odd rank): the one-row kernel
                    host_matvec(_zero_weight(rows, cols + 1, fmt), np.ones((1, cols + 1), np.float32))
                host_sparse_ffn("reglu", w, w, w, x, idx, rows)
                host_axpy_down(w, idx, rows, np.ones((n_tok, rows), np.float32), skip_zero_rows=False)
                if gated:
                    host_sparse_ffn("swiglu", w, w, w, x, idx, rows, act_threshold=0.5)
        del w  # a large weight held into the next format's warm-up would add to the load's peak memory
        _WARM.add((fmt, gated))
    host_select_union(np.zeros((1, 4), np.float32), np.ones(1, bool), 0.0, np.arange(2, dtype=np.int32),
                      np.arange(2, 4, dtype=np.int32))
    return time.perf_counter() - t0


def _zero_weight(rows: int, cols: int, fmt: str) -> Weight:
    """A zero Weight of `fmt` ([rows, cols]) in the layout the kernels take."""
    if fmt == "float32":
        return Weight(np.zeros((rows, cols), np.float32), None, fmt, cols)
    if fmt in ("bfloat16", "float16"):
        return Weight(np.zeros((rows, cols), np.uint16), None, fmt, cols)
    if fmt == "int8":
        return Weight(np.zeros((rows, cols), np.int8), np.ones(rows, np.float32), fmt, cols)
    return Weight(np.zeros((rows, cols // 2), np.uint8), np.zeros((rows, cols // GROUP), np.uint16), fmt, cols)


# ---------------------------------------------------------------- calling from jit
def _host_array(a):
    """A weight (array or Weight) as contiguous numpy, captured by a host callback."""
    if a is None:
        return None
    if isinstance(a, Weight):
        return Weight(np.ascontiguousarray(a.data),
                      None if a.scale is None else np.ascontiguousarray(a.scale), a.fmt, a.cols)
    return np.ascontiguousarray(a)


def host_ffn_callback(family, w_gate, w_up, w_down_t, x, idx, count, b_up=None, *,
                      method="auto", after=None, act_threshold=None):
    """Inside jit: cold FFN part on the host (numba) for x [d]/[B, d], idx [C], count scalar.

    The weights are host numpy arrays or numpy-backed Weights captured by the callback (never
    passed through XLA). ``method``: "buffer" (buffer_callback, zero-copy, CPU backend only),
    "pure" (pure_callback) or "auto" (buffer when available and the default backend is CPU; on
    GPU buffer_callback hands over device buffers, which numpy cannot read).
    ``act_threshold``: CATS zeroing of the listed neurons (`host_sparse_ffn`).
    ``after``: an array the callback waits for (an input it ignores). XLA:CPU runs independent
    ops at once; two numba callbacks of one layer running together oversubscribe the cores
    (each brings its own thread team), so the engine orders its CPU callbacks with this.
    """
    check_family(family, w_gate)
    host = [_host_array(a) for a in (w_gate, w_up, w_down_t, b_up)]
    d = host[2].cols if isinstance(host[2], Weight) else host[2].shape[1]
    x = jnp.asarray(x).astype(jnp.float32)
    idx = jnp.asarray(idx).astype(jnp.int32)
    count = jnp.asarray(count).astype(jnp.int32)
    out_shape = jax.ShapeDtypeStruct(x.shape[:-1] + (d,), jnp.float32)
    deps = () if after is None else (after,)
    if method == "auto":
        method = "buffer" if _buffer_callback is not None and jax.default_backend() == "cpu" else "pure"

    def compute(xa, idxa, counta, out=None):
        n = min(int(counta), idxa.shape[0])  # overflowed lists hold only C entries
        return host_sparse_ffn(family, host[0], host[1], host[2], xa, idxa, n, host[3], out=out,
                               act_threshold=act_threshold)

    if method == "buffer":
        if _buffer_callback is None:
            raise RuntimeError("this jax has no jax.experimental.buffer_callback")
        if jax.default_backend() != "cpu":
            raise ValueError("method='buffer' needs the CPU backend (on GPU its buffers live on "
                             "the device and numpy cannot read them); use 'pure'")

        def cb(ctx, out, xb, idxb, countb, *_after):
            del ctx
            o = np.asarray(out)
            # numba writes the result straight into XLA's output buffer (no copy back).
            compute(np.asarray(xb), np.asarray(idxb), np.asarray(countb), out=o.reshape(-1, d))

        return _buffer_callback(cb, out_shape)(x, idx, count, *deps)
    if method == "pure":
        def cb(xa, idxa, counta, *_after):
            return np.asarray(compute(np.asarray(xa), np.asarray(idxa), np.asarray(counta)),
                              np.float32)

        return jax.pure_callback(cb, out_shape, x, idx, count, *deps, vmap_method="sequential")
    raise ValueError(f"unknown callback method {method!r}")

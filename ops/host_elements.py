"""Element-level numba primitives of the host kernels: widening stored elements to float32, row dots
and axpys in every weight format, prefetch hints. Inlined into the parallel loops of `ops.host_loops`.

Formats are codes (`_F32`, `_BF16`, `_F16`, `_I8`, `_I4`: positions in ``ops.quant.FORMATS``); the
``@overload`` of each primitive picks the row code at compile time, so a kernel compiles once per format.

int4 (Q4_0) rows are read in their packed order: byte j of a row holds column ``32*(j//16) + j%16``
(low nibble) and that column + 16 (high nibble). The kernels permute x into that order once per
call instead of unpacking nibbles to their columns (a shuffle per element), and the down kernel
accumulates in packed order and permutes its sums back at the end.

f16 -> f32 uses the CPU's conversion instruction where LLVM has one (F16C, ARMv8; exact for every
value, NaN stays NaN) and an exact integer trick elsewhere (``ops.quant.f16_bits_to_f32_trick``).
"""
from __future__ import annotations

import platform

import llvmlite.binding as llvm_binding
import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from ops.quant import GROUP, f16_bits_to_f32_trick

_GELU_C = 0.7978845608028654  # sqrt(2 / pi), tanh-GELU
_F32, _BF16, _F16, _I8, _I4 = range(5)  # format codes: FORMATS.index(fmt)

# Dot products may be reassociated (vectorised) and contracted to FMAs, but no NaN/Inf
# assumptions are made. Reassociation is fixed at compile time, so results stay bit-identical
# from run to run; the loops' work split (ops.host_loops) is fixed too, so they do not depend on the thread count.
_FASTMATH = {"reassoc", "contract"}


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


def _has_32_vector_registers() -> bool:
    """Whether the compile target has 32 SIMD registers (x86 with AVX-512, every ARMv8) rather than
    AVX2's 16. Register blocks sized for 32 spill on 16: `dot4x4`'s 16 accumulators did."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return True
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:  # a fixed (portable) target: its own features
        return "+avx512f" in (numba.config.CPU_FEATURES or "")
    return bool(llvm_binding.get_host_cpu_features().get("avx512f", False))


# Four rows against four tokens (`_dot4x4`) in one pass needs 16 accumulators plus the widened rows, and the down
# kernel's eight rows against four tokens (`_axpy8x4`) 32 coefficients: more registers than AVX2 has (the one-pass
# dot4x4 kept 5 accumulators on the stack). With 16 registers they run as two passes of two rows (`dot2x4`) and of
# four rows (`axpy4x4`): mat-vec 1.01-1.37x, down 0.99-1.13x from bundled to 7B shapes at 4 and 16 tokens on a
# 2-core AMD EPYC (Zen 3, AVX2; BENCHMARKS.md, "Register blocks for AVX2"). A compile-time constant from the
# target's features, so numba's cache (keyed by CPU) stays right.
FOUR_TOKEN_BLOCKS_IN_TWO_PASSES = not _has_32_vector_registers()


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
    def dot2x4(p0, p1, x0, x1, x2, x3):
        """Two rows against four token vectors: 8 accumulators, which fit AVX2's 16 registers."""
        s00 = s01 = s02 = s03 = np.float32(0.0)
        s10 = s11 = s12 = s13 = np.float32(0.0)
        for k in range(x0.shape[0]):
            a, b = cvt(p0[k]), cvt(p1[k])
            u0, u1, u2, u3 = x0[k], x1[k], x2[k], x3[k]
            s00 += a * u0
            s01 += a * u1
            s02 += a * u2
            s03 += a * u3
            s10 += b * u0
            s11 += b * u1
            s12 += b * u2
            s13 += b * u3
        return s00, s01, s02, s03, s10, s11, s12, s13

    @njit(fastmath=_FASTMATH, inline="always")
    def dot4x4_two_passes(p0, p1, p2, p3, x0, x1, x2, x3):
        """`dot4x4`'s sums as two `dot2x4` passes (rows 0-1, then 2-3)."""
        t = dot2x4(p0, p1, x0, x1, x2, x3)
        v = dot2x4(p2, p3, x0, x1, x2, x3)
        return (t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7])

    if FOUR_TOKEN_BLOCKS_IN_TWO_PASSES:
        dot4x4_one_pass, dot4x4 = dot4x4, dot4x4_two_passes
    else:
        dot4x4_one_pass = dot4x4

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

    @njit(fastmath=_FASTMATH, inline="always")
    def axpy4x4(a0, a1, a2, a3, c, o, p0, p1, p2, p3):
        """a_t += sum_i c[8t + o + i] * p_i for four tokens and four rows (rows o..o+3 of `axpy8x4`'s eight):
        16 coefficients, which fit AVX2's 16 registers with the rows less often than 32 do."""
        c00, c01, c02, c03 = c[o], c[o + 1], c[o + 2], c[o + 3]
        c10, c11, c12, c13 = c[o + 8], c[o + 9], c[o + 10], c[o + 11]
        c20, c21, c22, c23 = c[o + 16], c[o + 17], c[o + 18], c[o + 19]
        c30, c31, c32, c33 = c[o + 24], c[o + 25], c[o + 26], c[o + 27]
        for k in range(a0.shape[0]):
            w0, w1, w2, w3 = cvt(p0[k]), cvt(p1[k]), cvt(p2[k]), cvt(p3[k])
            a0[k] += c00 * w0 + c01 * w1 + c02 * w2 + c03 * w3
            a1[k] += c10 * w0 + c11 * w1 + c12 * w2 + c13 * w3
            a2[k] += c20 * w0 + c21 * w1 + c22 * w2 + c23 * w3
            a3[k] += c30 * w0 + c31 * w1 + c32 * w2 + c33 * w3

    @njit(fastmath=_FASTMATH, inline="always")
    def axpy8x4_two_passes(a0, a1, a2, a3, c, p0, p1, p2, p3, p4, p5, p6, p7):
        """`axpy8x4` as two `axpy4x4` passes (rows 0-3, then 4-7)."""
        axpy4x4(a0, a1, a2, a3, c, 0, p0, p1, p2, p3)
        axpy4x4(a0, a1, a2, a3, c, 4, p4, p5, p6, p7)

    axpy8x4_one_pass = axpy8x4
    if FOUR_TOKEN_BLOCKS_IN_TWO_PASSES:
        axpy8x4 = axpy8x4_two_passes

    return (dot1, dot4, dot8, axpy8, widen, dot4x4, axpy8x4, dot4x4_one_pass, dot4x4_two_passes,
            axpy8x4_one_pass, axpy8x4_two_passes)


(_, _f32_dot4, _f32_dot8, _f32_axpy8, _f32_widen, _f32_dot4x4, _f32_axpy8x4,
 _f32_dot4x4_one_pass, _f32_dot4x4_two_passes, _f32_axpy8x4_one_pass,
 _f32_axpy8x4_two_passes) = _elementwise_ops(_f32)
(_bf16_dot1, _bf16_dot4, _bf16_dot8, _bf16_axpy8, _bf16_widen, _bf16_dot4x4, _bf16_axpy8x4,
 _bf16_dot4x4_one_pass, _bf16_dot4x4_two_passes, _bf16_axpy8x4_one_pass,
 _bf16_axpy8x4_two_passes) = _elementwise_ops(_bf16)
(_f16_dot1, _f16_dot4, _f16_dot8, _f16_axpy8, _f16_widen, _f16_dot4x4, _f16_axpy8x4,
 _f16_dot4x4_one_pass, _f16_dot4x4_two_passes, _f16_axpy8x4_one_pass,
 _f16_axpy8x4_two_passes) = _elementwise_ops(_f16)
(_i8_dot1, _i8_dot4, _i8_dot8, _i8_axpy8, _i8_widen, _i8_dot4x4, _i8_axpy8x4,
 _i8_dot4x4_one_pass, _i8_dot4x4_two_passes, _i8_axpy8x4_one_pass,
 _i8_axpy8x4_two_passes) = _elementwise_ops(_i8)


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


@njit(fastmath=_FASTMATH, cache=True)
def _q4_dot4x2(a, sa, b, sb, c, sc, d, sd, x0, x1):
    """`_q4_dot4` against two tokens, each byte unpacked once for both: (row . x0, row . x1) for the four rows.
    Compiled once as a function of its own (as `_q4_axpy4x2`), not inlined into every kernel (see
    host_loops._q4_h_pairs)."""
    half = a.shape[0]
    x0_lo, x0_hi, x1_lo, x1_hi = x0[:half], x0[half:], x1[:half], x1[half:]
    s0 = s1 = s2 = s3 = t0 = t1 = t2 = t3 = np.float32(0.0)
    for j in range(half):
        g = j >> 4
        al, ah, bl, bh = _lo(a[j]), _hi(a[j]), _lo(b[j]), _hi(b[j])
        cl, ch, dl, dh = _lo(c[j]), _hi(c[j]), _lo(d[j]), _hi(d[j])
        da, db, dc, dd = _f16(sa[g]), _f16(sb[g]), _f16(sc[g]), _f16(sd[g])
        s0 += da * (al * x0_lo[j] + ah * x0_hi[j])
        t0 += da * (al * x1_lo[j] + ah * x1_hi[j])
        s1 += db * (bl * x0_lo[j] + bh * x0_hi[j])
        t1 += db * (bl * x1_lo[j] + bh * x1_hi[j])
        s2 += dc * (cl * x0_lo[j] + ch * x0_hi[j])
        t2 += dc * (cl * x1_lo[j] + ch * x1_hi[j])
        s3 += dd * (dl * x0_lo[j] + dh * x0_hi[j])
        t3 += dd * (dl * x1_lo[j] + dh * x1_hi[j])
    return s0, s1, s2, s3, t0, t1, t2, t3


@njit(fastmath=_FASTMATH, inline="always")
def _q4_expand_scales(sa, m, out):
    """out[j] = m * (scale of byte j's group), j < K/2: one f32 per packed byte (`_q4_widen`).

    A loop that stores cannot load ``scale[j >> 4]`` per element: LLVM has no runtime alias check
    for that index, so it left it scalar (1 GB/s). A splat per group is vectorised, and then every
    load of the main loop is affine (the axpy runs a group loop instead: `_q4_axpy4`). The splat is
    a slice of a [groups, 16] view: written as a loop of 16 stores, LLVM unrolled it and vectorised
    across groups into scatter stores, 2.5x slower than the whole int4 axpy it fed (a dense int4
    down projection ran at 2.7 GB/s)."""
    rows = out.reshape(sa.shape[0], GROUP // 2)
    for g in range(sa.shape[0]):
        rows[g, :] = m * _f16(sa[g])


@njit(fastmath=_FASTMATH, inline="always")
def _q4_axpy4(acc, a0, a, sa, a1, b, sb, a2, c, sc, a3, d, sd):
    """acc (packed order) += sum_i a_i * row_i for four int4 rows, a group (16 bytes) at a time.

    Each row's coefficient a_i * d_i[g] is a scalar for its group's 16 bytes (LLVM broadcasts it),
    and the group's low and high nibbles update both halves of acc in one pass. Expanding the
    coefficients into a per-byte f32 scratch first (as `_q4_widen` still does, where it is the
    faster form) stored and reloaded 16 KiB a row: 1.7-2.7x slower on one core at K = 384-8192
    (AVX2 Zen 3; benchmarks/results/int4_down_1208)."""
    half = a.shape[0]
    acc_lo, acc_hi = acc[:half], acc[half:]
    for g in range(half // 16):
        e0, e1, e2, e3 = a0 * _f16(sa[g]), a1 * _f16(sb[g]), a2 * _f16(sc[g]), a3 * _f16(sd[g])
        for j in range(16 * g, 16 * g + 16):
            acc_lo[j] += e0 * _lo(a[j]) + e1 * _lo(b[j]) + e2 * _lo(c[j]) + e3 * _lo(d[j])
            acc_hi[j] += e0 * _hi(a[j]) + e1 * _hi(b[j]) + e2 * _hi(c[j]) + e3 * _hi(d[j])


@njit(fastmath=_FASTMATH, cache=True)
def _q4_axpy4x2(acc0, acc1, coef, i, a, sa, b, sb, c, sc, d, sd):
    """`_q4_axpy4` for two tokens: acc_t += sum_k coef[8t + i + k] * row_k (k < 4), each group unpacked once
    for both tokens (a pass per token unpacked it twice: 1.4-1.5x on one core, benchmarks/results/int4_down_1208)."""
    half = a.shape[0]
    p0l, p0h, p1l, p1h = acc0[:half], acc0[half:], acc1[:half], acc1[half:]
    c0, c1, c2, c3 = coef[i], coef[i + 1], coef[i + 2], coef[i + 3]
    f0, f1, f2, f3 = coef[8 + i], coef[9 + i], coef[10 + i], coef[11 + i]
    for g in range(half // 16):
        da, db, dc, dd = _f16(sa[g]), _f16(sb[g]), _f16(sc[g]), _f16(sd[g])
        e0, e1, e2, e3 = c0 * da, c1 * db, c2 * dc, c3 * dd
        k0, k1, k2, k3 = f0 * da, f1 * db, f2 * dc, f3 * dd
        for j in range(16 * g, 16 * g + 16):
            qa, qb, qc, qd = _lo(a[j]), _lo(b[j]), _lo(c[j]), _lo(d[j])
            p0l[j] += e0 * qa + e1 * qb + e2 * qc + e3 * qd
            p1l[j] += k0 * qa + k1 * qb + k2 * qc + k3 * qd
            qa, qb, qc, qd = _hi(a[j]), _hi(b[j]), _hi(c[j]), _hi(d[j])
            p0h[j] += e0 * qa + e1 * qb + e2 * qc + e3 * qd
            p1h[j] += k0 * qa + k1 * qb + k2 * qc + k3 * qd


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


def _gated4x2(code, wg, sg, wu, su, r0, r1, r2, r3, x0, x1):
    """Stub: `_gated4` against two tokens, (g0, u0, ..., g3, u3) for x0 then the same for x1; int4 rows only
    (each byte unpacked once for both tokens; the elementwise formats take four tokens a pass, `_dot4x4`)."""
    raise NotImplementedError


@overload(_gated4x2)
def _gated4x2_impl(code, wg, sg, wu, su, r0, r1, r2, r3, x0, x1):
    if wg.dtype == types.uint8:
        def impl(code, wg, sg, wu, su, r0, r1, r2, r3, x0, x1):
            g0, u0, g1, u1, h0, v0, h1, v1 = _q4_dot4x2(wg[r0], sg[r0], wu[r0], su[r0], wg[r1], sg[r1], wu[r1], su[r1],
                                                        x0, x1)
            g2, u2, g3, u3, h2, v2, h3, v3 = _q4_dot4x2(wg[r2], sg[r2], wu[r2], su[r2], wg[r3], sg[r3], wu[r3], su[r3],
                                                        x0, x1)
            return g0, u0, g1, u1, g2, u2, g3, u3, h0, v0, h1, v1, h2, v2, h3, v3
        return impl

    def impl(code, wg, sg, wu, su, r0, r1, r2, r3, x0, x1):  # typed for the other formats' kernels, never run
        z = np.float32(0.0)
        if code >= 0:  # always (a bare raise would type the result as none)
            raise ValueError("only int4 rows take two tokens a pass")
        return (z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z)
    return impl


def _axpy8(code, acc, coef, w, s, rows):
    """Stub: acc += sum_i coef[i] * row rows[i] of (w, s), eight rows (acc in the format's kernel
    order; ``coef`` may be scaled in place)."""
    raise NotImplementedError


@overload(_axpy8)
def _axpy8_impl(code, acc, coef, w, s, rows):
    dt = w.dtype
    if dt == types.float32:
        def impl(code, acc, coef, w, s, rows):
            _f32_axpy8(acc, coef, w, rows)
        return impl
    if dt == types.uint16:
        def impl(code, acc, coef, w, s, rows):
            if code == _BF16:
                _bf16_axpy8(acc, coef, w, rows)
            else:
                _f16_axpy8(acc, coef, w, rows)
        return impl
    if dt == types.int8:
        def impl(code, acc, coef, w, s, rows):
            for i in range(8):  # the row scales go into the coefficients
                coef[i] *= s[rows[i], 0]
            _i8_axpy8(acc, coef, w, rows)
        return impl
    if dt == types.uint8:
        def impl(code, acc, coef, w, s, rows):  # compute-bound: two passes of four rows
            for i in range(0, 8, 4):
                r0, r1, r2, r3 = rows[i], rows[i + 1], rows[i + 2], rows[i + 3]
                _q4_axpy4(acc, coef[i], w[r0], s[r0], coef[i + 1], w[r1], s[r1],
                          coef[i + 2], w[r2], s[r2], coef[i + 3], w[r3], s[r3])
        return impl
    return None


def _axpy8x4(code, a0, a1, a2, a3, c, w, s, rows):
    """Stub: a_t += sum_i c[8t + i] * row rows[i] of (w, s) for four tokens t and eight rows (``c`` may be
    scaled in place); the elementwise formats only (int4 takes two tokens a pass, `_axpy8x2`)."""
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


def _axpy8x2(code, a0, a1, c, w, s, rows):
    """Stub: a_t += sum_i c[8t + i] * row rows[i] of (w, s) for two tokens t and eight int4 rows (the other
    formats take four tokens a pass, `_axpy8x4`)."""
    raise NotImplementedError


@overload(_axpy8x2)
def _axpy8x2_impl(code, a0, a1, c, w, s, rows):
    if w.dtype == types.uint8:
        def impl(code, a0, a1, c, w, s, rows):  # two passes of four rows, as `_axpy8`
            for i in range(0, 8, 4):
                r0, r1, r2, r3 = rows[i], rows[i + 1], rows[i + 2], rows[i + 3]
                _q4_axpy4x2(a0, a1, c, i, w[r0], s[r0], w[r1], s[r1], w[r2], s[r2], w[r3], s[r3])
        return impl

    def impl(code, a0, a1, c, w, s, rows):  # typed for the other formats' kernels, never run there
        raise ValueError("only int4 rows take two tokens a pass")
    return impl


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

"""The parallel numba loops of the host kernels (`ops.host_kernels` dispatches to them): gate/up
activations over selected rows, the down axpy, dense mat-vecs in every format, int4's own mat-vec,
and their single-threaded twins for small work. The element primitives they inline live in
`ops.host_elements`.

The kernels are deterministic: the gate/up and mat-vec kernels give each output element to
one thread, and the down axpy sums fixed row chunks into private partials that are added in chunk
order; no thread ever adds into another's output (the reference engine's unsynchronised
per-thread adds made greedy runs differ). Dots are vectorised (reassociation fixed at compile
time), so results are bit-identical from run to run whatever the thread count.
"""
from __future__ import annotations

from types import FunctionType

import numpy as np
from numba import njit, prange

from ops import host_elements, quant
from ops.host_elements import (_FASTMATH, _GELU_C, _I4, _axpy8, _axpy8x2, _axpy8x4, _dot1, _dot4, _dot4x4, _dot8, _f16,
                               _gated4, _gated4x2, _natural_col, _prefetch_rows, _row_scale, _widen)
from ops.kernel_cache import drop_stale

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


@njit(fastmath=_FASTMATH, cache=True)
def _q4_h_pairs(family, code, wg, sg, wu, su, x, idx, lo, hi, out):
    """`_h_span` of a gated family over int4 rows and two tokens or more: four neurons against two tokens a pass
    (`_gated4x2`, each byte unpacked once for both; an odd last token pairs with itself, so a token's values never
    depend on its place in the batch). A function of its own, not inlined: inlined into the four kernels that
    inline `_h_span` it added ~50% to their compile time."""
    n_tok = x.shape[0]
    for i in range(lo, hi, 4):
        i1, i2, i3 = min(i + 1, hi - 1), min(i + 2, hi - 1), min(i + 3, hi - 1)
        r0, r1, r2, r3 = idx[i], idx[i1], idx[i2], idx[i3]
        for b0 in range(0, n_tok, 2):
            b1 = min(b0 + 1, n_tok - 1)
            g0, u0, g1, u1, g2, u2, g3, u3, h0, v0, h1, v1, h2, v2, h3, v3 = _gated4x2(
                code, wg, sg, wu, su, r0, r1, r2, r3, x[b0], x[b1])
            out[b0, i], out[b0, i1] = _glu(family, g0, u0), _glu(family, g1, u1)
            out[b0, i2], out[b0, i3] = _glu(family, g2, u2), _glu(family, g3, u3)
            out[b1, i], out[b1, i1] = _glu(family, h0, v0), _glu(family, h1, v1)
            out[b1, i2], out[b1, i3] = _glu(family, h2, v2), _glu(family, h3, v3)


@njit(inline="always", fastmath=_FASTMATH, cache=True)
def _h_span(family, code, wg, sg, wu, su, bu, has_bias, four, x, idx, lo, hi, out):
    """out[b, i] = h of neuron idx[i] for token b, lo <= i < hi (one chunk of `_h_kernel` / `_ffn_kernel`).

    family: 0 reglu, 1 drelu, 2 relu (+ bias), 3 plain mat-vec ``wu[idx] @ x`` (wg unused),
    4 swiglu, 5 geglu (`_glu`)
    One kernel for all of them keeps numba's (slow, parallel) compilations to one per dtype.
    Gated families read four neurons a pass (gate and up rows of each: eight streams, `_gated4`; from two
    tokens on in the elementwise formats, their gate rows, then their up rows, against four tokens at a time,
    `_dot4x4`, with ``four``; int4 rows against two tokens at a time, `_gated4x2`); the others four rows. A
    short tail computes its last neuron again in the spare slots (same code, same value).
    """
    zero = np.float32(0.0)
    n_tok = x.shape[0]
    if hi > lo:
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
            if four and code == _I4 and n_tok >= 2:
                _q4_h_pairs(family, code, wg, sg, wu, su, x, idx, lo, hi, out)
            else:
                for i in range(lo, hi, 4):
                    i1, i2, i3 = min(i + 1, hi - 1), min(i + 2, hi - 1), min(i + 3, hi - 1)
                    r0, r1, r2, r3 = idx[i], idx[i1], idx[i2], idx[i3]
                    for b in range(n_tok):
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


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _h_kernel(family, code, wg, sg, wu, su, bu, has_bias, four, x, idx, count, out):
    """out[b, i] = h of neuron idx[i] for token b, i < count (`_h_span` over fixed chunks): each output
    element computed by one thread."""
    step = (count + _H_CHUNKS - 1) // _H_CHUNKS
    for c in prange(_H_CHUNKS):
        _h_span(family, code, wg, sg, wu, su, bu, has_bias, four, x, idx, c * step, min(count, (c + 1) * step), out)


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
    each pass does the least work per value: one row at a time (against two tokens at a time from two
    tokens on, each byte unpacked once for both: 1.3-1.4x at 7B shapes), its group scales converted once
    into ``scratch [chunks, K/32]``, and the -8 offset taken out of the loop (sum_g d_g sum q x
    minus 8 sum_g d_g xsum_g). The next row is prefetched: the hardware prefetchers alone left
    this slow loop waiting at the start of every 2 KiB row (2.7x slower).
    """
    rows, half = w.shape
    n_tok = x.shape[0]
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
            # From two tokens on, two tokens a pass (each byte unpacked once for both); an odd last token pairs
            # with itself, so a token's sums never depend on its place in the batch.
            for b in range(0, n_tok if n_tok >= 2 else 0, 2):
                b1 = min(b + 1, n_tok - 1)
                x0, x1 = x[b], x[b1]
                x0_lo, x0_hi, x1_lo, x1_hi = x0[:half], x0[half:], x1[:half], x1[half:]
                corr0 = np.float32(0.0)
                corr1 = np.float32(0.0)
                for g in range(sr.shape[0]):
                    corr0 += dt[g] * xsum[b, g]
                    corr1 += dt[g] * xsum[b1, g]
                acc0 = np.float32(0.0)
                acc1 = np.float32(0.0)
                for j in range(half):
                    v = a[j]
                    q_lo, q_hi = np.float32(np.uint8(v & np.uint8(15))), np.float32(np.uint8(v >> np.uint8(4)))
                    acc0 += dt[j >> 4] * (q_lo * x0_lo[j] + q_hi * x0_hi[j])
                    acc1 += dt[j >> 4] * (q_lo * x1_lo[j] + q_hi * x1_hi[j])
                out[b, r] = acc0 - eight * corr0
                out[b1, r] = acc1 - eight * corr1
            if n_tok == 1:
                xb, xs = x[0], xsum[0]
                x_lo, x_hi = xb[:half], xb[half:]
                corr = np.float32(0.0)
                for g in range(sr.shape[0]):
                    corr += dt[g] * xs[g]
                acc = np.float32(0.0)
                for j in range(half):
                    v = a[j]
                    acc += dt[j >> 4] * (np.float32(np.uint8(v & np.uint8(15))) * x_lo[j]
                                         + np.float32(np.uint8(v >> np.uint8(4))) * x_hi[j])
                out[0, r] = acc - eight * corr


@njit(inline="always", fastmath=_FASTMATH, cache=True)
def _down_span(code, wd, sd, idx, lo, hi, h, skip_zero, four, acc, sel, rows, coefs):
    """acc[b, :] += sum_{lo<=i<hi} h[b, i] * wd[idx[i], :]: one chunk of `_down_kernel` / `_ffn_kernel`, eight
    live rows a pass (concurrent read streams: four were 1.7x one row at a time, eight another 5-10%). With
    ``skip_zero``, rows whose h is zero for every token are skipped: their bytes are never read. A pass with
    fewer than eight live rows repeats its last row with coefficient 0. From four tokens on (elementwise
    formats; ``four``), each group of four tokens takes the eight rows in one pass (`_axpy8x4`), every element
    widened once for the four: per token, the widening, not the bytes, set the pace. int4 rows take two tokens
    a pass (`_axpy8x2`, each group unpacked once for both; four a pass measured no faster).
    ``sel [8]`` int64 positions, ``rows [8]`` int64 and ``coefs [40]`` f32: the chunk's own."""
    n_tok = h.shape[0]
    zero = np.float32(0.0)
    coef, coef32 = coefs[:8], coefs[8:]
    i = lo
    while i < hi:
        m = 0
        while i < hi and m < 8:  # the next (up to) eight live rows of this chunk
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
        while four and code == _I4 and b + 2 <= n_tok:  # int4: two tokens a pass, each group unpacked once
            for t in range(2):
                for j in range(8):
                    coef32[8 * t + j] = h[b + t, sel[j]] if j < m else zero
            _axpy8x2(code, acc[b], acc[b + 1], coef32, wd, sd, rows)
            b += 2
        for b in range(b, n_tok):
            for j in range(8):
                coef[j] = h[b, sel[j]] if j < m else zero
            # acc[b]: 1-D views vectorise; acc[b, k] indexing did not as well
            _axpy8(code, acc[b], coef, wd, sd, rows)


@njit(inline="always", fastmath=_FASTMATH, cache=True)
def _add_partials(code, parts, out):
    """out[b, :] = sum over chunks c of parts[c, b, :], in chunk order (int4: back to natural column order)."""
    n_chunks, n_tok, d = parts.shape
    # On the calling thread, chunk after chunk over whole rows (vectorised): a second parallel loop cost more to
    # start (~35 us waking the team, OMP_WAIT_POLICY=PASSIVE) than the adds, and summing each column across
    # chunks (a strided inner loop) took ~65 us a 4096-wide token.
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
        else:  # an explicit loop: under parallel=True a slice assignment becomes a parallel region of its own
            for k in range(d):  # (one per token: two thread wakes each, 1.5 ms of a 16-token call at d=384)
                out[b, k] = total[k]


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _down_kernel(code, wd, sd, idx, count, h, skip_zero, four, out, parts, sels, coefs):
    """out[b, :] = sum_{i<count} h[b, i] * wd[idx[i], :].

    The rows are split into a fixed number of chunks (from the shapes only); each chunk sums
    its whole rows into its own partial (`_down_span`), and the partials are then added in
    chunk order (`_add_partials`). No thread adds into another's memory (the reference engine's
    unsynchronised adds made greedy runs differ), and the result does not depend on the thread count.
    Caller-allocated: ``parts [chunks, B, d]`` zeros, ``sels [chunks, 2, 8]`` int64 (positions,
    rows) and ``coefs [chunks, 40]`` f32.
    """
    n_chunks = parts.shape[0]
    step = (count + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        _down_span(code, wd, sd, idx, c * step, min(count, (c + 1) * step), h, skip_zero, four, parts[c],
                   sels[c, 0], sels[c, 1], coefs[c])
    _add_partials(code, parts, out)


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _ffn_kernel(family, code, wg, sg, wu, su, bu, has_bias, four, x, idx, count, code_d, wd, sd, skip_zero, h, out,
                parts, sels, coefs):
    """The whole FFN over neurons idx[:count] in one parallel region: out[b, :] = sum_i h[b, i] * wd[idx[i], :]
    with h [B, count] (written) the activations of `_h_span`. Each of `_down_kernel`'s chunks computes its
    neurons' h, then adds their down rows into its own partial while h is in cache; partials are added as
    there. The same results as `_h_kernel` then `_down_kernel` (same chunks, same sums), but one team wake
    a call instead of two (~100-200 us each on a VM whose idle vCPU halts)."""
    n_chunks = parts.shape[0]
    step = (count + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        lo, hi = c * step, min(count, (c + 1) * step)
        _h_span(family, code, wg, sg, wu, su, bu, has_bias, four, x, idx, lo, hi, h)
        _down_span(code_d, wd, sd, idx, lo, hi, h, skip_zero, four, parts[c], sels[c, 0], sels[c, 1], coefs[c])
    _add_partials(code_d, parts, out)


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
_ffn_kernel_serial = _serial_twin(_ffn_kernel)
_matvec_kernel_serial = _serial_twin(_matvec_kernel)
_one_row_matvec_kernel_serial = _serial_twin(_one_row_matvec_kernel)
_matvec_q4_kernel_serial = _serial_twin(_matvec_q4_kernel)
_bf16_pair_matvec_kernel_serial = _serial_twin(_bf16_pair_matvec_kernel)

# numba keys these kernels' cache on this file alone; they inline host_elements (and it quant): a change there
# must recompile them (`ops.kernel_cache`).
drop_stale(_down_kernel, [host_elements.__file__, quant.__file__])

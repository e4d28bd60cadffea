"""int4 weights against int8 activations: integer dot products on x86 (opt-in, ``int4_activations="int8"``).

The exact int4 kernels (`ops.host_loops`) convert every nibble to f32 and multiply it by an f32 activation; on
two AVX2 cores that is compute-bound at ~10-19 G values/s, a quarter of what memory delivers. Here, as in
llama.cpp's Q4_0 x Q8_0 dot, each token's activations are first rounded to int8 in groups of 32 (the weight's
own groups, in its packed order) with one f32 scale a group, and a row's 64 values (two groups) take two
``vpmaddubsw`` (4-bit weight x int8 activation, pairs summed into int16), a ``vpmaddwd`` into int32, one convert
and one FMA by the two groups' combined scales: 2.8x the exact kernel's values a second on one core, int4
mat-vecs 2.0-2.5x and the dense FFN 1.6-2.0x through `ops.host_kernels` (benchmarks/results/int4_q8_1208/). The
arithmetic after the rounding is exact (integer sums, then f32): the kernels match a float64 reference of the
rounded activations within f32 rounding (tests/test_host_q8.py). The rounding itself moves outputs by ~0.5% of
their largest magnitude on random inputs: an approximation the caller opts into, like
`prompt_activations="bfloat16"`; the default keeps activations in float32.

Layout: x in int4's packed order (`ops.host_kernels._kernel_x`); group g is x_lo[16g:16g+16] with
x_hi[16g:16g+16]. ``xq [B, K]`` int8 (packed order), ``dx [B, K/32]`` f32 scales, ``xoff [B, K/4]`` int16: 8 times
the pair sums each ``vpmaddubsw`` lane sees (the weight's -8 offset taken out in int16 before the int32 sums).
Rows need K % 64 == 0 (two groups a step; every LLaMA-family width is). x86-64 with AVX2 and F16C only
(`SUPPORTED`); the LLVM intrinsics are ``llvm.x86.avx2.pmadd.ub.sw`` / ``pmadd.wd``.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import config, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ops import host_elements, host_loops, quant
from ops.host_elements import _FASTMATH
from ops.host_loops import _add_partials, _down_span, _glu, _serial_twin
from ops.kernel_cache import drop_stale

BLOCK = 64  # values a step of the dot: two int4 groups


def _cpu_supports() -> bool:
    """Whether numba's target CPU has AVX2 and F16C (the host's, or NUMBA_CPU_NAME/FEATURES where set)."""
    try:
        import llvmlite.binding as llvm

        if config.CPU_NAME and config.CPU_NAME != "host":
            feats = (config.CPU_FEATURES or "").split(",")
            return "+avx2" in feats and "+f16c" in feats
        host = llvm.get_host_cpu_features()
        return bool(host.get("avx2")) and bool(host.get("f16c"))
    except Exception:  # noqa: BLE001 (no x86 feature map: an ARM host, an llvmlite without it)
        return False


SUPPORTED = _cpu_supports()


def usable(cols: int) -> bool:
    """Whether int4 rows of `cols` columns can take the int8-activation kernels on this CPU."""
    return SUPPORTED and cols % BLOCK == 0


_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


def _vec(t, n):
    return ir.VectorType(t, n)


def _splat(t, n, v):
    return ir.Constant(_vec(t, n), [v] * n)


@intrinsic
def _q4q8_dot(typingctx, a, sw, xq, dx, xoff):
    """One packed int4 row ``a [K/2]`` (f16 scale bits ``sw [K/32]``) . one token's int8 activations:
    sum_g d(sw[g]) * dx[g] * sum_{j in g} (q_j - 8) * xq_j, two groups a step (see the module doc)."""
    def codegen(context, builder, sig, args):
        A, SW, XQ, DX, XO = (context.make_array(t)(context, builder, v) for t, v in zip(sig.args, args))
        intp = cgutils.intp_t
        steps = builder.lshr(builder.extract_value(SW.shape, 0), ir.Constant(intp, 1))
        half = builder.extract_value(A.shape, 0)
        mod = builder.module
        maddubs = mod.declare_intrinsic("llvm.x86.avx2.pmadd.ub.sw", (),
                                        ir.FunctionType(_vec(_I16, 16), [_vec(_I8, 32)] * 2))
        maddwd = mod.declare_intrinsic("llvm.x86.avx2.pmadd.wd", (),
                                       ir.FunctionType(_vec(_I32, 8), [_vec(_I16, 16)] * 2))
        fma = mod.declare_intrinsic("llvm.fma.v8f32", (), ir.FunctionType(_vec(_F32, 8), [_vec(_F32, 8)] * 3))
        acc_p = cgutils.alloca_once_value(builder, _splat(_F32, 8, 0.0))

        def load(base, offset, ty):
            return builder.load(builder.bitcast(builder.gep(base, [offset]), ty.as_pointer()), align=1)

        x_hi = builder.gep(XQ.data, [half])
        with cgutils.for_range(builder, steps) as loop:
            k = loop.index
            at = builder.mul(k, ir.Constant(intp, 32))  # 32 bytes of the row: 64 values, groups 2k and 2k+1
            packed = load(A.data, at, _vec(_I8, 32))
            low = builder.and_(packed, _splat(_I8, 32, 15))
            high = builder.lshr(packed, _splat(_I8, 32, 4))
            pairs = builder.add(builder.call(maddubs, [low, load(XQ.data, at, _vec(_I8, 32))]),
                                builder.call(maddubs, [high, load(x_hi, at, _vec(_I8, 32))]))
            pairs = builder.sub(pairs, load(XO.data, builder.mul(k, ir.Constant(intp, 16)), _vec(_I16, 16)))
            sums = builder.sitofp(builder.call(maddwd, [pairs, _splat(_I16, 16, 1)]), _vec(_F32, 8))
            g = builder.mul(k, ir.Constant(intp, 2))  # lanes 0-3 hold group 2k, lanes 4-7 group 2k+1
            scales = builder.fpext(builder.bitcast(load(SW.data, g, _vec(_I16, 2)), _vec(ir.HalfType(), 2)),
                                   _vec(_F32, 2))
            scales = builder.fmul(scales, load(DX.data, g, _vec(_F32, 2)))
            lanes = builder.shuffle_vector(scales, scales, ir.Constant(_vec(_I32, 8), [0, 0, 0, 0, 1, 1, 1, 1]))
            builder.store(builder.call(fma, [sums, lanes, builder.load(acc_p)]), acc_p)
        acc = builder.load(acc_p)
        total = builder.extract_element(acc, ir.Constant(_I32, 0))
        for lane in range(1, 8):
            total = builder.fadd(total, builder.extract_element(acc, ir.Constant(_I32, lane)))
        return total
    return types.float32(a, sw, xq, dx, xoff), codegen


@njit(cache=True)
def _quantize_x(x, xq, dx, xoff):
    """x [B, K] f32 (packed order) -> xq [B, K] int8, dx [B, K/32] f32, xoff [B, K/4] int16 (module doc):
    dx = max |x| over the group / 127, xq = round-half-even(x / dx), 0 for an all-zero group."""
    half = x.shape[1] // 2
    for b in range(x.shape[0]):
        for g in range(half // 16):
            amax = np.float32(0.0)
            for j in range(16 * g, 16 * g + 16):
                amax = max(amax, abs(x[b, j]), abs(x[b, half + j]))
            d = amax / np.float32(127.0)
            dx[b, g] = d
            for j in range(16 * g, 16 * g + 16):
                for k in (j, half + j):
                    q = np.rint(x[b, k] / d) if d > 0 else np.float32(0.0)
                    xq[b, k] = np.int8(min(max(q, np.float32(-127.0)), np.float32(127.0)))
            for p in range(8):
                j = 16 * g + 2 * p
                xoff[b, 8 * g + p] = np.int16(8 * (np.int32(xq[b, j]) + np.int32(xq[b, j + 1])
                                                   + np.int32(xq[b, half + j]) + np.int32(xq[b, half + j + 1])))


def quantize_x(xk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations [B, K] f32 in packed order -> (xq int8 [B, K], dx f32 [B, K/32], xoff int16 [B, K/4])."""
    n_tok, k = xk.shape
    xq = np.empty((n_tok, k), np.int8)
    dx = np.empty((n_tok, k // quant.GROUP), np.float32)
    xoff = np.empty((n_tok, k // 4), np.int16)
    _quantize_x(xk, xq, dx, xoff)
    return xq, dx, xoff


@njit(parallel=True, cache=True)
def _matvec_q4q8_kernel(w, s, xq, dx, xoff, out):
    """out[b, r] = row r . token b (int8 activations): rows in fixed chunks, each row against every token."""
    rows = w.shape[0]
    step = (rows + host_loops._MV_CHUNKS - 1) // host_loops._MV_CHUNKS
    for c in prange(host_loops._MV_CHUNKS):
        for r in range(c * step, min(rows, (c + 1) * step)):
            a, sr = w[r], s[r]
            for b in range(xq.shape[0]):
                out[b, r] = _q4q8_dot(a, sr, xq[b], dx[b], xoff[b])


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _ffn_q4q8_kernel(family, wg, sg, wu, su, xq, dx, xoff, idx, count, code_d, wd, sd, skip_zero, four, h, out,
                     parts, sels, coefs):
    """`host_loops._ffn_kernel` for a gated family over int4 gate/up rows with int8 activations: each chunk's
    h (neuron by neuron, every token), then its down rows (`_down_span`, the exact kernel's), partials added
    in chunk order as there."""
    n_chunks = parts.shape[0]
    step = (count + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        lo, hi = c * step, min(count, (c + 1) * step)
        for i in range(lo, hi):
            r = idx[i]
            for b in range(xq.shape[0]):
                g = _q4q8_dot(wg[r], sg[r], xq[b], dx[b], xoff[b])
                u = _q4q8_dot(wu[r], su[r], xq[b], dx[b], xoff[b])
                h[b, i] = _glu(family, g, u)
        _down_span(code_d, wd, sd, idx, lo, hi, h, skip_zero, four, parts[c], sels[c, 0], sels[c, 1], coefs[c])
    _add_partials(code_d, parts, out)


_matvec_q4q8_kernel_serial = _serial_twin(_matvec_q4q8_kernel)
_ffn_q4q8_kernel_serial = _serial_twin(_ffn_q4q8_kernel)

# These kernels inline host_loops' down span and host_elements' primitives: a change there recompiles them.
drop_stale(_ffn_q4q8_kernel, [host_loops.__file__, host_elements.__file__, quant.__file__])


def q4q8_ref(data: np.ndarray, scale_bits: np.ndarray, xq: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """numpy float64 reference of the int8-activation dot: int4 rows ``data [R, K/2]`` (packed) with f16 scale
    bits ``[R, K/32]`` against ``xq [B, K]`` / ``dx [B, K/32]`` -> [B, R]."""
    half = data.shape[1]
    q = np.concatenate([data & 15, data >> 4], axis=1).astype(np.int64) - 8  # [R, K] packed order
    groups = half // 16
    out = []
    for b in range(xq.shape[0]):
        prod = q * xq[b].astype(np.int64)[None]
        per_group = prod[:, :half].reshape(-1, groups, 16).sum(-1) + prod[:, half:].reshape(-1, groups, 16).sum(-1)
        out.append((per_group * scale_bits.view(np.float16).astype(np.float64) * dx[b].astype(np.float64)).sum(1))
    return np.stack(out)

"""Decode attention on the host (CPU backend): every row attends over its own cache prefix, in place.

XLA:CPU's decode attention over a batch reads the attended span through a strided slice of the
cache `[:B, :, :span]`, which it copies before its batched dots: at 16 rows of the bundled model
the copies and dots took ~4 ms of a ~10 ms step (BENCHMARKS.md, "attention at batch > 1"). This
kernel reads the cache where it lies (a zero-copy `buffer_callback` operand) and only each row's
own slots (its length, not the batch's span bucket). A step of fewer rows comes here too once the
span it would copy is large (`HOST_ATTENTION_MIN_SPAN_BYTES`): one row of a 7B-shaped model copies
4 MiB of K/V a layer at the shortest span, and the kernel made its decode 1.03x faster at a 32-token
prompt and 1.25x at 400; the bundled model's shortest span (384 KiB) was even either way, its longer
ones 1.18-1.43x faster here (BENCHMARKS.md, "one-row attention").

`decode_attention_ref` is the plain numpy reference; `tests/test_ops_host_attention.py` checks the
kernel and the jitted path against it and against the XLA attention.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ops import host_elements, quant
from ops import linear  # its USE_HOST_KERNELS = False sends everything through XLA (what a GPU runs)
from ops.host_elements import _BF16, _F16, _F32, _bf16, _f16
from ops.host_loops import _serial_twin
from ops.kernel_cache import drop_stale

HOST_ATTENTION_MIN_ROWS = 4  # decode steps of at least this many rows attend here (CPU backend)
HOST_ATTENTION_MIN_SPAN_BYTES = 512 << 10  # ... and smaller ones whose attended K+V span is at least this big
USE_HOST_ATTENTION = True  # False keeps XLA's attention everywhere (tests compare the two)
# A call reading at most this many K+V bytes runs on the calling thread: waking the second one costs 100-200 us
# on a VM whose idle vCPU halts, 10x a bundled-model row's attention (BENCHMARKS.md, "One parallel region"). Two
# threads broke even at ~4 MiB (16 bundled rows at 150 slots, one 7B row at 300; "Attention loops inlined").
SERIAL_MAX_BYTES = 1 << 22
# The bit patterns a KVCache stores half precisions in (powerinfer_jax.layers.KV_STORAGE), and cache dtype -> the
# kernel's format code (bf16 and f16 as floats or as their bits)
_HALF_BITS = {np.dtype(np.uint16): np.dtype(jnp.bfloat16), np.dtype(np.int16): np.dtype(np.float16)}
_CACHE_CODES = {np.dtype(np.float32): _F32, np.dtype(jnp.bfloat16): _BF16, np.dtype(np.float16): _F16}
_CACHE_CODES.update({bits: _CACHE_CODES[half] for bits, half in _HALF_BITS.items()})


def uses_host_attention(rows: int, tokens: int, cache_dtype, span_bytes: int = 0) -> bool:
    """Whether a step of `rows` x `tokens` over a cache of `cache_dtype` attends through this kernel
    (`span_bytes`: the K and V bytes of the attended span of those rows, what XLA would copy)."""
    large = rows >= HOST_ATTENTION_MIN_ROWS or span_bytes >= HOST_ATTENTION_MIN_SPAN_BYTES
    return (USE_HOST_ATTENTION and linear.USE_HOST_KERNELS and linear._buffer_callback is not None and tokens == 1
            and large and np.dtype(cache_dtype) in _CACHE_CODES and jax.default_backend() == "cpu")


def _kv(code, x):
    """Stub: a cache entry as float32 (f32 as is; bf16/f16 from their bits by `code`)."""
    raise NotImplementedError


@overload(_kv)
def _kv_impl(code, x):
    if isinstance(x, types.Float):
        return lambda code, x: x
    if x == types.uint16:
        return lambda code, x: _bf16(x) if code == _BF16 else _f16(x)
    return None


@njit(inline="always", fastmath={"reassoc", "contract"})
def _exp_neg(x):
    """exp(x) in float32 for x <= 0 (within 2 ulp; exp(-87) for anything below -87): range reduction to
    2^n e^r, |r| <= ln2 / 2, and a degree-6 polynomial, arithmetic LLVM vectorises (np.exp is a libm
    call per element: ~10-15% of this kernel's time at the bundled shape)."""
    x = max(x, np.float32(-87.0))
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * np.float32(0.693145751953125) - n * np.float32(1.428606765330187e-06)  # ln2 in two parts
    p = np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * np.uint32((np.int32(n) + np.int32(127)) << np.int32(23)).view(np.float32)  # times 2^n


@njit(inline="always", fastmath={"reassoc", "contract"})
def _scores4(code, kg, s0, s1, s2, s3, qh):
    """The dots of slots s0..s3 of kg [S, hd] with qh: one pass over the head dimension, four sums."""
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    for d in range(qh.shape[0]):
        qd = qh[d]
        a0 += _kv(code, kg[s0, d]) * qd
        a1 += _kv(code, kg[s1, d]) * qd
        a2 += _kv(code, kg[s2, d]) * qd
        a3 += _kv(code, kg[s3, d]) * qd
    return a0, a1, a2, a3


@njit(inline="always", fastmath={"reassoc", "contract"})
def _values8(code, acc, vg, s, c):
    """acc += sum_i c[i] vg[s + i] over eight slots: the output row loaded and stored once for eight."""
    c0, c1, c2, c3, c4, c5, c6, c7 = c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]
    for d in range(acc.shape[0]):
        acc[d] += (c0 * _kv(code, vg[s, d]) + c1 * _kv(code, vg[s + 1, d]) + c2 * _kv(code, vg[s + 2, d])
                   + c3 * _kv(code, vg[s + 3, d]) + c4 * _kv(code, vg[s + 4, d]) + c5 * _kv(code, vg[s + 5, d])
                   + c6 * _kv(code, vg[s + 6, d]) + c7 * _kv(code, vg[s + 7, d]))


@njit(inline="always", fastmath={"reassoc", "contract"})
def _scores2x4(code, kg, s, t, q4):
    """The dots of slots s and t of kg [S, hd] with the four queries q4 [4, hd]: each K entry widened once for
    the four heads of a query group; eight sums (slot s's four, then slot t's)."""
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    b0 = np.float32(0.0)
    b1 = np.float32(0.0)
    b2 = np.float32(0.0)
    b3 = np.float32(0.0)
    for d in range(q4.shape[1]):
        ks, kt = _kv(code, kg[s, d]), _kv(code, kg[t, d])
        q0, q1, q2, q3 = q4[0, d], q4[1, d], q4[2, d], q4[3, d]
        a0 += ks * q0
        a1 += ks * q1
        a2 += ks * q2
        a3 += ks * q3
        b0 += kt * q0
        b1 += kt * q1
        b2 += kt * q2
        b3 += kt * q3
    return a0, a1, a2, a3, b0, b1, b2, b3


@njit(inline="always", fastmath={"reassoc", "contract"})
def _values2x4(code, acc4, vg, s, c):
    """acc4[j] += c[2j] vg[s] + c[2j+1] vg[s+1] for the four heads j of a group: each V entry widened once."""
    c0, c1, c2, c3, c4, c5, c6, c7 = c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]
    for d in range(acc4.shape[1]):
        v0, v1 = _kv(code, vg[s, d]), _kv(code, vg[s + 1, d])
        acc4[0, d] += c0 * v0 + c1 * v1
        acc4[1, d] += c2 * v0 + c3 * v1
        acc4[2, d] += c4 * v0 + c5 * v1
        acc4[3, d] += c6 * v0 + c7 * v1


@njit(inline="always", fastmath={"reassoc", "contract"})
def _softmax_in_place(sc, n, top):
    """sc[:n] <- exp(sc[:n] - top), top their maximum; returns 1 / their sum."""
    for i in range(n):
        sc[i] = _exp_neg(sc[i] - top)
    total = np.float32(0.0)
    for i in range(n):
        total += sc[i]
    return np.float32(1.0) / total


@njit(fastmath={"reassoc", "contract"}, cache=True)
def _four_heads(code, q4, kg, vg, s0, s1, scale, scores, coef, acc4):
    """Attention of four query heads that share one kv head: each K and V entry widened once for the four
    (`_scores2x4`, `_values2x4`: two slots x four heads a pass), the softmax per head. Against each head on its
    own: 1.5-1.8x at 600 slots on the 7B GQA shape (BENCHMARKS.md, "Grouped-query attention")."""
    n = s1 - s0
    m0 = m1 = m2 = m3 = np.float32(-np.inf)
    for s in range(s0, s1, 2):  # an odd last pass scores its slot twice (the same value, written once)
        t = min(s + 1, s1 - 1)
        a0, a1, a2, a3, b0, b1, b2, b3 = _scores2x4(code, kg, s, t, q4)
        a0, a1, a2, a3, b0, b1, b2, b3 = a0 * scale, a1 * scale, a2 * scale, a3 * scale, b0 * scale, b1 * scale, \
            b2 * scale, b3 * scale
        i, j = s - s0, t - s0
        scores[0, i], scores[1, i], scores[2, i], scores[3, i] = a0, a1, a2, a3
        scores[0, j], scores[1, j], scores[2, j], scores[3, j] = b0, b1, b2, b3
        m0, m1, m2, m3 = max(m0, max(a0, b0)), max(m1, max(a1, b1)), max(m2, max(a2, b2)), max(m3, max(a3, b3))
    tops = (m0, m1, m2, m3)
    for j in range(4):
        inv = _softmax_in_place(scores[j], n, tops[j])
        for i in range(n):
            scores[j, i] *= inv
    full = s0 + n // 2 * 2
    for s in range(s0, full, 2):
        for j in range(4):
            coef[2 * j], coef[2 * j + 1] = scores[j, s - s0], scores[j, s - s0 + 1]
        _values2x4(code, acc4, vg, s, coef)
    if full < s1:  # the last slot of an odd count
        for j in range(4):
            c = scores[j, n - 1]
            for d in range(acc4.shape[1]):
                acc4[j, d] += c * _kv(code, vg[s1 - 1, d])


@njit(inline="always", fastmath={"reassoc", "contract"})
def _scores4x2(code, kg, s, t1, t2, t3, q2):
    """The dots of slots s, t1, t2, t3 of kg [S, hd] with the two queries q2 [2, hd]: each K entry widened once
    for the two heads; eight sums (the first head's four, then the second's)."""
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    b0 = np.float32(0.0)
    b1 = np.float32(0.0)
    b2 = np.float32(0.0)
    b3 = np.float32(0.0)
    for d in range(q2.shape[1]):
        k0, k1, k2, k3 = _kv(code, kg[s, d]), _kv(code, kg[t1, d]), _kv(code, kg[t2, d]), _kv(code, kg[t3, d])
        q0, q1 = q2[0, d], q2[1, d]
        a0 += k0 * q0
        a1 += k1 * q0
        a2 += k2 * q0
        a3 += k3 * q0
        b0 += k0 * q1
        b1 += k1 * q1
        b2 += k2 * q1
        b3 += k3 * q1
    return a0, a1, a2, a3, b0, b1, b2, b3


@njit(inline="always", fastmath={"reassoc", "contract"})
def _values4x2(code, acc2, vg, s, c):
    """acc2[j] += sum_i c[4j + i] vg[s + i] over four slots for the two heads j: each V entry widened once."""
    c0, c1, c2, c3, c4, c5, c6, c7 = c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]
    for d in range(acc2.shape[1]):
        v0, v1 = _kv(code, vg[s, d]), _kv(code, vg[s + 1, d])
        v2, v3 = _kv(code, vg[s + 2, d]), _kv(code, vg[s + 3, d])
        acc2[0, d] += c0 * v0 + c1 * v1 + c2 * v2 + c3 * v3
        acc2[1, d] += c4 * v0 + c5 * v1 + c6 * v2 + c7 * v3


@njit(fastmath={"reassoc", "contract"}, cache=True)
def _two_heads(code, q2, kg, vg, s0, s1, scale, scores, coef, acc2):
    """Attention of two query heads that share one kv head (groups of 2, and the two left after groups of four
    in groups of 6 and 7): four slots x two heads a pass for scores and values (`_scores4x2`, `_values4x2`)."""
    n = s1 - s0
    m0 = m1 = np.float32(-np.inf)
    for s in range(s0, s1, 4):  # a short last pass repeats its last slot (same value, written once)
        t1, t2, t3 = min(s + 1, s1 - 1), min(s + 2, s1 - 1), min(s + 3, s1 - 1)
        a0, a1, a2, a3, b0, b1, b2, b3 = _scores4x2(code, kg, s, t1, t2, t3, q2)
        a0, a1, a2, a3, b0, b1, b2, b3 = a0 * scale, a1 * scale, a2 * scale, a3 * scale, b0 * scale, b1 * scale, \
            b2 * scale, b3 * scale
        scores[0, s - s0], scores[0, t1 - s0], scores[0, t2 - s0], scores[0, t3 - s0] = a0, a1, a2, a3
        scores[1, s - s0], scores[1, t1 - s0], scores[1, t2 - s0], scores[1, t3 - s0] = b0, b1, b2, b3
        m0 = max(m0, max(max(a0, a1), max(a2, a3)))
        m1 = max(m1, max(max(b0, b1), max(b2, b3)))
    inv0 = _softmax_in_place(scores[0], n, m0)
    inv1 = _softmax_in_place(scores[1], n, m1)
    full = s0 + n // 4 * 4
    for s in range(s0, full, 4):
        for i in range(4):
            coef[i], coef[4 + i] = scores[0, s - s0 + i] * inv0, scores[1, s - s0 + i] * inv1
        _values4x2(code, acc2, vg, s, coef)
    for s in range(full, s1):  # the last n % 4 slots one at a time
        c0, c1 = scores[0, s - s0] * inv0, scores[1, s - s0] * inv1
        for d in range(acc2.shape[1]):
            vd = _kv(code, vg[s, d])
            acc2[0, d] += c0 * vd
            acc2[1, d] += c1 * vd


@njit(fastmath={"reassoc", "contract"}, cache=True)
def _one_head(code, qh, kg, vg, s0, s1, scale, sc, coef, acc):
    """Attention of one query head: scores four slots a pass, the weighted values eight slots a pass."""
    n = s1 - s0
    top = np.float32(-np.inf)
    for s in range(s0, s1, 4):  # a short last pass repeats its last slot (same value, written once)
        t1, t2, t3 = min(s + 1, s1 - 1), min(s + 2, s1 - 1), min(s + 3, s1 - 1)
        e0, e1, e2, e3 = _scores4(code, kg, s, t1, t2, t3, qh)
        e0, e1, e2, e3 = e0 * scale, e1 * scale, e2 * scale, e3 * scale
        sc[s - s0], sc[t1 - s0], sc[t2 - s0], sc[t3 - s0] = e0, e1, e2, e3
        top = max(top, max(max(e0, e1), max(e2, e3)))
    inv = _softmax_in_place(sc, n, top)
    full = s0 + n // 8 * 8
    for s in range(s0, full, 8):
        for i in range(8):
            coef[i] = sc[s - s0 + i] * inv
        _values8(code, acc, vg, s, coef)
    for s in range(full, s1):  # the last n % 8 slots one at a time
        c = sc[s - s0] * inv
        for d in range(acc.shape[0]):
            acc[d] += c * _kv(code, vg[s, d])


@njit(parallel=True, fastmath={"reassoc", "contract"}, cache=True)
def _decode_attention(code, q, k, v, rows_of, starts, ends, scale, out):
    """out[b, h] = softmax over slots starts[b]..ends[b]-1 of (q[b, h] . k[r, h // group, s]) v[r, ...],
    r = rows_of[b] (the cache row query b reads); k and v f32, or bf16/f16 bits (uint16) by `code`.

    One job a (row, kv head). Its query heads go four at a time while four remain (`_four_heads`: each K and V
    entry widened once for the four; grouped-query models: Llama-3 and Mistral have groups of 4, Llama-2-70B of
    8), then two (`_two_heads`: Gemma-2's groups of 2; Qwen2.5's of 7 go 4 + 2 + 1), then one (`_one_head`;
    multi-head models). Those three are calls, once per head block over the whole span: inlined, they tripled the
    kernel's first compile (27 s against 14 s for bf16 at two threads plus serial) for no measurable speed. Inside
    them every per-slot loop is inlined over the [S, hd] block of the (row, kv head): the host_elements overloads
    they replaced (`_dot4`, `_axpy8`, a row view per slot) are calls numba does not inline, array structs in and a
    tuple out per four or eight slots, and that kernel ran 1.3-2.3x slower (BENCHMARKS.md, "Attention loops
    inlined"). The softmax's exponentials are vectorised (`_exp_neg`)."""
    rows, hq, hd = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    longest = 1
    for b in range(rows):
        longest = max(longest, ends[b] - starts[b])
    for job in prange(rows * hkv):  # one (row, kv head) a job: its K/V slots are read once for the group
        b, g = job // hkv, job % hkv
        r, s0, s1 = rows_of[b], starts[b], ends[b]
        kg, vg = k[r, g], v[r, g]  # [S, hd] each
        scores = np.empty((4, longest), np.float32)
        coef = np.empty(8, np.float32)
        h, h_end = g * group, (g + 1) * group
        for j in range(h, h_end):
            for d in range(hd):
                out[b, j, d] = 0.0
        if s1 <= s0:  # a padding row (no sequence): zeros
            continue
        while h + 4 <= h_end:
            _four_heads(code, q[b, h:h + 4], kg, vg, s0, s1, scale, scores, coef, out[b, h:h + 4])
            h += 4
        if h + 2 <= h_end:
            _two_heads(code, q[b, h:h + 2], kg, vg, s0, s1, scale, scores, coef, out[b, h:h + 2])
            h += 2
        if h < h_end:
            _one_head(code, q[b, h], kg, vg, s0, s1, scale, scores[0], coef, out[b, h])


_decode_attention_serial = _serial_twin(_decode_attention)
# numba keys this kernel's cache on this file alone; a change in what it inlines must recompile it
drop_stale(_decode_attention, [host_elements.__file__, quant.__file__])


def _attention_kernel(k_bits: np.ndarray, starts: np.ndarray, ends: np.ndarray):
    """The serial kernel where the call reads at most SERIAL_MAX_BYTES of K and V, else the parallel one."""
    _, hkv, _, hd = k_bits.shape
    slots = int(np.maximum(ends - starts, 0).sum())
    small = 2 * slots * hkv * hd * k_bits.itemsize <= SERIAL_MAX_BYTES
    return _decode_attention_serial if small else _decode_attention


def _slot_ranges(positions: jax.Array, max_len: int, window: int | None) -> tuple[jax.Array, jax.Array]:
    """Each row's attended slots [start, end): up to its position; none for a padding row (position
    past the cache); the last `window` only under a sliding window."""
    pos = positions.astype(jnp.int32)
    ends = jnp.where(pos < max_len, pos + 1, 0)
    starts = jnp.maximum(ends - window, 0) if window else jnp.zeros_like(ends)
    return starts, ends


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array,
                     window: int | None = None, cache_rows: jax.Array | None = None) -> jax.Array:
    """q [B, hq, hd] (one query a row) against the caches [B', hkv, S, hd] (f32, bf16 or f16) at `positions` [B]:
    query b reads cache row `cache_rows[b]` (default: row b; a packed prompt chunk's tokens read their prompts'
    rows). The attention output [B, hq, hd] (f32), computed on the host in place."""
    B, hq, hd = q.shape
    starts, ends = _slot_ranges(positions, k_cache.shape[2], window)
    rows_of = jnp.arange(B, dtype=jnp.int32) if cache_rows is None else cache_rows.astype(jnp.int32)
    scale = np.float32(1.0 / math.sqrt(hd))

    code = _CACHE_CODES[np.dtype(k_cache.dtype)]
    bits = (lambda a: np.asarray(a)) if code == _F32 else (lambda a: np.asarray(a).view(np.uint16))

    def cb(ctx, out, qb, kb, vb, rb, sb, eb):
        del ctx
        k_bits, starts, ends = bits(kb), np.asarray(sb), np.asarray(eb)
        _attention_kernel(k_bits, starts, ends)(code, np.asarray(qb), k_bits, bits(vb), np.asarray(rb), starts,
                                                ends, scale, np.asarray(out))

    shape = jax.ShapeDtypeStruct((B, hq, hd), jnp.float32)
    return linear._buffer_callback(cb, shape)(q.astype(jnp.float32), k_cache, v_cache, rows_of, starts, ends)


def decode_attention_ref(q, k_cache, v_cache, positions, window: int | None = None,
                         cache_rows=None) -> np.ndarray:
    """numpy reference of `decode_attention` (float64 inside)."""
    arrays = (np.asarray(a) for a in (q, k_cache, v_cache))
    q, k, v = (a.view(_HALF_BITS.get(a.dtype, a.dtype)).astype(np.float64) for a in arrays)
    B, hq, hd = q.shape
    group = hq // k.shape[1]
    rows_of = np.arange(B) if cache_rows is None else np.asarray(cache_rows)
    out = np.zeros((B, hq, hd))
    for b, p in enumerate(np.asarray(positions)):
        if p >= k.shape[2]:
            continue
        r, s0 = rows_of[b], (max(0, p + 1 - window) if window else 0)
        for h in range(hq):
            scores = k[r, h // group, s0:p + 1] @ q[b, h] / math.sqrt(hd)
            e = np.exp(scores - scores.max())
            out[b, h] = (e / e.sum()) @ v[r, h // group, s0:p + 1]
    return out.astype(np.float32)

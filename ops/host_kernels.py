"""Host (CPU, numpy/numba) kernels for the cold neurons, and a way to call them from jit.

``idx`` here indexes the rows of the host-resident (cold) matrices and only ``idx[:count]``
is used. Storage may be float32 or bfloat16 (``ml_dtypes``); arithmetic is float32.

The numba kernels are deterministic: the gate/up mat-vec gives each output element to one
thread, and the down axpy sums fixed row chunks into private partials that are added in chunk
order; no thread ever adds into another's output (the reference engine's unsynchronised
per-thread adds made greedy runs differ). Dots are vectorised (reassociation fixed at compile
time), so results are bit-identical from run to run whatever the thread count.

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

import ctypes

import ml_dtypes
import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

import jax
import jax.numpy as jnp

from ops.reference import check_family

try:
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:  # older jax
    _buffer_callback = None

_COL_BLOCK = 256  # output columns per thread task in the down kernel's final sum
_FAMILY_CODE = {"reglu": 0, "drelu": 1, "relu": 2}  # _h_kernel also has 3: plain mat-vec
BF16 = np.dtype(ml_dtypes.bfloat16)


# ---------------------------------------------------------------- numpy references
def _np_f32(a):
    return None if a is None else np.asarray(a).astype(np.float32)


def _numpy_h(family, w_gate, w_up, x2, rows, b_up=None):
    """numpy ``h [B, rows]`` over the selected rows (a slice selects without a gather copy)."""
    f32 = lambda a: np.asarray(a)[rows].astype(np.float32, copy=False)  # noqa: E731
    u = x2 @ f32(w_up).T
    if family == "relu":
        return np.maximum(u + f32(b_up), 0) if b_up is not None else np.maximum(u, 0)
    g = np.maximum(x2 @ f32(w_gate).T, 0)
    return g * (u if family == "reglu" else np.maximum(u, 0))


def host_h_ref(family, w_gate, w_up, x, idx, count, b_up=None):
    """numpy reference of the cold activations ``h [B, count]`` (``W[idx] @ x`` style)."""
    check_family(family, w_gate)
    sel = np.asarray(idx)[: int(count)]
    return _numpy_h(family, w_gate, w_up, np.atleast_2d(_np_f32(x)), sel, b_up)


def host_sparse_ffn_ref(family, w_gate, w_up, w_down_t, x, idx, count, b_up=None):
    """numpy reference of the cold FFN part: [d] or [B, d] (no down bias)."""
    h = host_h_ref(family, w_gate, w_up, x, idx, count, b_up)
    y = h @ _np_f32(np.asarray(w_down_t)[np.asarray(idx)[: int(count)]])
    return y[0] if np.ndim(x) == 1 else y


# ---------------------------------------------------------------- numba kernels
def _as_f32(src, tmp):
    """Stub: ``src`` (1-D f32, or bf16 bits as uint16) as a float32 array (numba only)."""
    raise NotImplementedError


@overload(_as_f32)
def _as_f32_impl(src, tmp):
    if src.dtype == types.uint16:
        def impl(src, tmp):  # bf16 -> f32 is a 16-bit left shift of the bit pattern
            for k in range(src.shape[0]):
                tmp[k] = np.uint32(src[k]) << np.uint32(16)
            return tmp[: src.shape[0]].view(np.float32)
        return impl
    return lambda src, tmp: src


# Dot products may be reassociated (vectorised) and contracted to FMAs, but no NaN/Inf
# assumptions are made. Reassociation is fixed at compile time, so results stay bit-identical
# from run to run; the work split below is fixed too, so they do not depend on the thread count.
_FASTMATH = {"reassoc", "contract"}
_H_CHUNKS = 64  # row chunks of the gate/up kernel (one scratch buffer each)
_DOWN_PARTIAL_BYTES = 1 << 22  # cap on the down kernel's per-chunk partial sums


@njit(fastmath=_FASTMATH, inline="always")
def _dot(row, xb):
    """f32 dot of ``row`` with the 1-D ``xb`` (vectorised: 2.3x the strict-order loop at 7B
    sizes; a 1-D row of x, not x[b, k] indexing, which cost another 1.4x)."""
    s = np.float32(0.0)
    for k in range(row.shape[0]):
        s += row[k] * xb[k]
    return s


@njit(fastmath=_FASTMATH, inline="always")
def _dot2(a, c, xb):
    """(a . xb, c . xb) in one pass: two read streams at once, which a single-stream dot
    cannot match on rows that start on cold pages (24 vs 14 GB/s for 900 random 7B rows)."""
    s = np.float32(0.0)
    t = np.float32(0.0)
    for k in range(a.shape[0]):
        s += a[k] * xb[k]
        t += c[k] * xb[k]
    return s, t


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _h_kernel(code, wg, wu, bu, has_bias, x, idx, count, out, scratch):
    """out[b, i] = h of neuron idx[i] for token b, i < count.

    code: 0 reglu, 1 drelu, 2 relu (+ bias), 3 plain mat-vec ``wu[idx] @ x`` (wg unused).
    One kernel for all of them keeps numba's (slow, parallel) compilations to one per dtype.
    Each output element is computed by one thread; a neuron's gate and up rows are read in
    the same pass. ``scratch [_H_CHUNKS, 2, d or 1]`` uint32: bf16 -> f32 rows (allocated by the
    caller: 128 allocations inside made a small call 50 us instead of a few).
    """
    d = wu.shape[1]
    zero = np.float32(0.0)
    step = (count + _H_CHUNKS - 1) // _H_CHUNKS
    for c in prange(_H_CHUNKS):
        wide_u = scratch[c, 0]
        wide_g = scratch[c, 1]
        lo, hi = c * step, min(count, (c + 1) * step)
        if code < 2:  # gated: the branch sits outside the row loop so LLVM vectorises _dot2
            for i in range(lo, hi):
                r = idx[i]
                urow = _as_f32(wu[r], wide_u)
                grow = _as_f32(wg[r], wide_g)
                for b in range(x.shape[0]):
                    g, u = _dot2(grow, urow, x[b])
                    out[b, i] = max(g, zero) * (u if code == 0 else max(u, zero))
        else:
            for i in range(lo, hi):
                r = idx[i]
                urow = _as_f32(wu[r], wide_u)
                for b in range(x.shape[0]):
                    u = _dot(urow, x[b])
                    if code == 2:
                        if has_bias:
                            u += bu[r]
                        u = max(u, zero)
                    out[b, i] = u


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _down_kernel(wd, idx, count, h, out, parts, scratch, sels):
    """out[b, :] = sum_{i<count} h[b, i] * wd[idx[i], :].

    The rows are split into a fixed number of chunks (from the shapes only); each chunk sums
    its whole rows into its own partial, four live rows per pass (four read streams: 1.7x one
    row at a time), and the partials are then added in chunk order. No thread adds into
    another's memory (the reference engine's unsynchronised adds made greedy runs differ), and
    the result does not depend on the thread count. Rows whose h is zero for every token (ReLU
    zeros of predicted-active neurons) are skipped: their bytes are never read.
    Caller-allocated: ``parts [chunks, B, d]`` zeros, ``scratch [chunks, 4, d or 1]`` uint32 (bf16
    rows), ``sels [chunks, 4]`` int64.
    """
    d = wd.shape[1]
    n_tok = h.shape[0]
    n_chunks = parts.shape[0]
    step = (count + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        wide = scratch[c]
        sel = sels[c]
        acc = parts[c]
        i = c * step
        end = min(count, (c + 1) * step)
        while i < end:
            m = 0
            while i < end and m < 4:  # the next (up to) four live rows of this chunk
                live = False
                for b in range(n_tok):
                    live = live or h[b, i] != 0
                if live:
                    sel[m] = i
                    m += 1
                i += 1
            if m == 4:
                r0 = _as_f32(wd[idx[sel[0]]], wide[0])
                r1 = _as_f32(wd[idx[sel[1]]], wide[1])
                r2 = _as_f32(wd[idx[sel[2]]], wide[2])
                r3 = _as_f32(wd[idx[sel[3]]], wide[3])
                for b in range(n_tok):
                    a0, a1, a2, a3 = h[b, sel[0]], h[b, sel[1]], h[b, sel[2]], h[b, sel[3]]
                    ab = acc[b]  # 1-D views vectorise; acc[b, k] indexing did not as well
                    for k in range(d):
                        ab[k] += a0 * r0[k] + a1 * r1[k] + a2 * r2[k] + a3 * r3[k]
            else:
                for j in range(m):
                    row = _as_f32(wd[idx[sel[j]]], wide[j])
                    for b in range(n_tok):
                        a = h[b, sel[j]]
                        ab = acc[b]
                        for k in range(d):
                            ab[k] += a * row[k]
    n_blk = (d + _COL_BLOCK - 1) // _COL_BLOCK
    for blk in prange(n_blk):
        for b in range(n_tok):
            for k in range(blk * _COL_BLOCK, min(d, (blk + 1) * _COL_BLOCK)):
                s = np.float32(0.0)
                for c in range(n_chunks):
                    s += parts[c, b, k]
                out[b, k] = s


# The same kernels compiled without threads, for small work: waking the parallel workers costs
# ~70 us per region (3 regions a call), 12x the whole call for a 384-wide layer's 120 rows.
# Identical results: the work split is fixed, only who runs the chunks changes.
_h_kernel_serial = njit(fastmath=_FASTMATH, cache=True)(_h_kernel.py_func)
_down_kernel_serial = njit(fastmath=_FASTMATH, cache=True)(_down_kernel.py_func)
SERIAL_MAX_BYTES = 1 << 21  # weight bytes a call reads below which it runs on one thread


def _serial(count, w) -> bool:
    return count * w.shape[1] * w.itemsize <= SERIAL_MAX_BYTES


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


def _writable_alias(a: np.ndarray) -> np.ndarray:
    """A writeable array over a read-only array's memory, without copying.

    numba compiles read-only arrays (numpy views of JAX CPU buffers, the engine's hot rows) into
    slower code: 2.4 vs 1.9 ms for a 7B layer's 900 active rows. The kernels never write to
    weights, and the caller keeps `a` (which owns the memory) alive for the call.
    """
    buf = (ctypes.c_char * a.nbytes).from_address(a.ctypes.data)
    return np.frombuffer(buf, dtype=a.dtype).reshape(a.shape)


def _raw(w):
    """Weights as numba-friendly contiguous arrays: bf16 becomes its uint16 bit pattern."""
    if w is None:
        return None
    w = np.ascontiguousarray(w)
    if not w.flags.writeable and w.size:
        w = _writable_alias(w)
    if w.dtype == BF16:
        return w.view(np.uint16)
    if w.dtype != np.float32:
        raise TypeError(f"host kernels take float32 or bfloat16 storage, got {w.dtype}")
    return w


def _h_scratch(w):
    return np.empty((_H_CHUNKS, 2, w.shape[1] if w.dtype == np.uint16 else 1), np.uint32)


def _down_buffers(wd, n_tok):
    d = wd.shape[1]
    n_chunks = max(1, min(16, _DOWN_PARTIAL_BYTES // (4 * n_tok * d)))
    return (np.zeros((n_chunks, n_tok, d), np.float32),
            np.empty((n_chunks, 4, d if wd.dtype == np.uint16 else 1), np.uint32),
            np.empty((n_chunks, 4), np.int64))


def host_gather_matvec(w, idx, count, x):
    """numba ``w[idx[:count]] @ x``: [B, count] f32 (each row read once for all tokens)."""
    x2 = _arg(np.atleast_2d(x), np.float32)
    wr = _raw(w)
    idx, count = _rows(idx, count, wr.shape[0])
    _expect(x2.shape[1] == wr.shape[1], "x and w disagree on d")
    out = np.empty((x2.shape[0], count), np.float32)
    _h_kernel(3, wr, wr, np.zeros(1, np.float32), False, x2, idx, count, out, _h_scratch(wr))
    return out


def host_sparse_h(family, w_gate, w_up, x, idx, count, b_up=None, out=None):
    """numba fused cold activations ``h [B, count]`` (f32, from f32 or bf16 storage)."""
    check_family(family, w_gate)
    x2 = _arg(np.atleast_2d(x), np.float32)
    wu = _raw(w_up)
    idx, count = _rows(idx, count, wu.shape[0])
    if out is None:
        out = np.empty((x2.shape[0], count), np.float32)
    wg = wu if w_gate is None else _raw(w_gate)
    has_bias = b_up is not None
    bu = _arg(b_up, np.float32) if has_bias else np.zeros(1, np.float32)
    _expect(x2.shape[1] == wu.shape[1] and wg.shape == wu.shape, "weights and x disagree")
    _expect(out.shape == (x2.shape[0], count) and (not has_bias or bu.shape[0] >= wu.shape[0]),
            "bad out or b_up shape")
    kernel = _h_kernel_serial if _serial(2 * count, wu) else _h_kernel
    kernel(_FAMILY_CODE[family], wg, wu, bu, has_bias, x2, idx, count, out, _h_scratch(wu))
    return out


def host_axpy_down(w_down_t, idx, count, h, out=None):
    """numba deterministic ``h @ w_down_t[idx[:count]]``: [B, d] f32."""
    h2 = _arg(np.atleast_2d(h), np.float32)
    wd = _raw(w_down_t)
    idx, count = _rows(idx, count, wd.shape[0])
    if out is None:
        out = np.empty((h2.shape[0], wd.shape[1]), np.float32)
    _expect(h2.shape[1] >= count and out.shape == (h2.shape[0], wd.shape[1]), "bad h or out shape")
    (_down_kernel_serial if _serial(count, wd) else _down_kernel)(wd, idx, count, h2, out,
                                                                  *_down_buffers(wd, h2.shape[0]))
    return out


# From this many tokens (prompts) the host part is compute-bound: BLAS GEMMs beat the mat-vec
# kernels (2.4x on a 32-token prompt of a 7B-shaped layer).
BLAS_MIN_TOKENS = 8


def _blas_ffn(family, w_gate, w_up, w_down_t, x2, idx, count, b_up, out):
    """float32 storage, many tokens: GEMMs over the selected rows (all rows: no gather copy)."""
    rows = slice(None) if count == w_up.shape[0] and np.array_equal(idx[:count], np.arange(count)) \
        else idx[:count]
    y = _numpy_h(family, w_gate, w_up, x2, rows, b_up) @ w_down_t[rows]
    if out is None:
        return y
    out[...] = y
    return out


def host_sparse_ffn(family, w_gate, w_up, w_down_t, x, idx, count, b_up=None, out=None):
    """Cold FFN part over rows idx[:count] (no down bias): [d] or [B, d] f32.

    numba kernels for decode-sized batches; BLAS GEMMs for prompts of float32 weights."""
    x2 = np.atleast_2d(x)
    if x2.shape[0] >= BLAS_MIN_TOKENS and all(w is None or np.asarray(w).dtype == np.float32
                                                for w in (w_gate, w_up, w_down_t)):
        check_family(family, w_gate)
        idx, count = _rows(idx, count, np.asarray(w_up).shape[0])
        y = _blas_ffn(family, w_gate, w_up, w_down_t, _arg(x2, np.float32), idx, count, b_up, out)
        return y[0] if np.ndim(x) == 1 else y
    h = host_sparse_h(family, w_gate, w_up, x, idx, count, b_up)
    y = host_axpy_down(w_down_t, idx, count, h, out=out)
    return y[0] if np.ndim(x) == 1 else y


# ---------------------------------------------------------------- calling from jit
def host_ffn_callback(family, w_gate, w_up, w_down_t, x, idx, count, b_up=None, *,
                      method="auto", after=None):
    """Inside jit: cold FFN part on the host (numba) for x [d]/[B, d], idx [C], count scalar.

    The weights are host numpy arrays captured by the callback (never passed through XLA).
    ``method``: "buffer" (buffer_callback, zero-copy, CPU backend only), "pure"
    (pure_callback) or "auto" (buffer when available and the default backend is CPU; on GPU
    buffer_callback hands over device buffers, which numpy cannot read).
    ``after``: an array the callback waits for (an input it ignores). XLA:CPU runs independent
    ops at once; two numba callbacks of one layer running together oversubscribe the cores
    (each brings its own thread team), so the engine orders its CPU callbacks with this.
    """
    check_family(family, w_gate)
    host = [None if a is None else np.ascontiguousarray(a) for a in (w_gate, w_up, w_down_t, b_up)]
    d = host[2].shape[1]
    x = jnp.asarray(x).astype(jnp.float32)
    idx = jnp.asarray(idx).astype(jnp.int32)
    count = jnp.asarray(count).astype(jnp.int32)
    out_shape = jax.ShapeDtypeStruct(x.shape[:-1] + (d,), jnp.float32)
    deps = () if after is None else (after,)
    if method == "auto":
        method = "buffer" if _buffer_callback is not None and jax.default_backend() == "cpu" else "pure"

    def compute(xa, idxa, counta, out=None):
        n = min(int(counta), idxa.shape[0])  # overflowed lists hold only C entries
        return host_sparse_ffn(family, host[0], host[1], host[2], xa, idxa, n, host[3], out=out)

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

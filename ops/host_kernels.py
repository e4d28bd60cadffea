"""Host (CPU, numpy/numba) kernels for the cold neurons, and a way to call them from jit.

``idx`` here indexes the rows of the host-resident (cold) matrices and only ``idx[:count]``
is used. Storage may be float32 or bfloat16 (``ml_dtypes``); arithmetic is float32.

The numba kernels are deterministic: the gate/up mat-vec gives each output row to one thread
(prange over rows) and the down axpy gives each block of output columns to one thread, adding
neurons in index order; no thread ever adds into another's output (the reference engine's
unsynchronised per-thread adds made greedy runs differ). Dot products use a pairwise halving
sum so LLVM can vectorise them without ``fastmath`` reassociation.

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

_LANES = 16       # the halving reduction in _dot stops at this many partial sums
_COL_BLOCK = 256  # output columns per thread task in the down axpy
_FAMILY_CODE = {"reglu": 0, "drelu": 1, "relu": 2}  # _h_kernel also has 3: plain mat-vec
BF16 = np.dtype(ml_dtypes.bfloat16)


# ---------------------------------------------------------------- numpy references
def _np_f32(a):
    return None if a is None else np.asarray(a).astype(np.float32)


def host_h_ref(family, w_gate, w_up, x, idx, count, b_up=None):
    """numpy reference of the cold activations ``h [B, count]`` (``W[idx] @ x`` style)."""
    check_family(family, w_gate)
    sel = np.asarray(idx)[: int(count)]
    x2 = np.atleast_2d(_np_f32(x))
    u = x2 @ _np_f32(np.asarray(w_up)[sel]).T
    if family == "relu":
        if b_up is not None:
            u = u + _np_f32(np.asarray(b_up)[sel])
        return np.maximum(u, 0)
    g = x2 @ _np_f32(np.asarray(w_gate)[sel]).T
    u = u if family == "reglu" else np.maximum(u, 0)
    return np.maximum(g, 0) * u


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


@njit(inline="always")
def _dot(row, x, b, tmp):
    """f32 dot of ``row`` with ``x[b]``, deterministic and vectorisable without fastmath.

    Products go to ``tmp`` and are summed by repeated halving (each step an elementwise add
    of two halves, which LLVM vectorises without reassociation); pairwise order also rounds
    better than a running sum. ~1.4x slower than a fastmath dot when cache-resident (1.04 vs
    0.75 ms, one thread, 1101 x 4096), the same when memory-bound.
    """
    n = row.shape[0]
    for j in range(n):
        tmp[j] = row[j] * x[b, j]
    while n > _LANES:
        half = n // 2
        for k in range(half):
            tmp[k] += tmp[k + half]
        if n % 2:
            tmp[0] += tmp[n - 1]
        n = half
    s = np.float32(0.0)
    for k in range(n):
        s += tmp[k]
    return s


@njit(parallel=True, fastmath=False, cache=True)
def _h_kernel(code, wg, wu, bu, has_bias, x, idx, count, out):
    """out[b, i] = h of neuron idx[i] for token b, i < count.

    code: 0 reglu, 1 drelu, 2 relu (+ bias), 3 plain mat-vec ``wu[idx] @ x`` (wg unused).
    One kernel for all of them keeps numba's (slow, parallel) compilations to one per dtype.
    """
    d = wu.shape[1]
    zero = np.float32(0.0)
    for i in prange(count):
        r = idx[i]
        wide = np.empty(d, np.uint32)
        tmp = np.empty(d, np.float32)
        urow = _as_f32(wu[r], wide)
        for b in range(x.shape[0]):
            u = _dot(urow, x, b, tmp)
            if code == 2 and has_bias:
                u += bu[r]
            out[b, i] = u
        if code == 2:
            for b in range(x.shape[0]):
                out[b, i] = max(out[b, i], zero)
        elif code < 2:
            grow = _as_f32(wg[r], wide)  # urow is dead now: its buffer can be reused
            for b in range(x.shape[0]):
                g = max(_dot(grow, x, b, tmp), zero)
                u = out[b, i] if code == 0 else max(out[b, i], zero)
                out[b, i] = g * u


@njit(parallel=True, fastmath=False, cache=True)
def _down_kernel(wd, idx, count, h, out):
    """out[b, :] = sum_{i<count} h[b, i] * wd[idx[i], :]; one thread per column block."""
    d = wd.shape[1]
    n_tok = h.shape[0]
    n_blk = (d + _COL_BLOCK - 1) // _COL_BLOCK
    for blk in prange(n_blk):
        c0 = blk * _COL_BLOCK
        c1 = min(c0 + _COL_BLOCK, d)
        acc = np.zeros((n_tok, c1 - c0), np.float32)
        tmp = np.empty(_COL_BLOCK, np.uint32)
        for i in range(count):
            live = False
            for b in range(n_tok):
                live = live or h[b, i] != 0
            if not live:  # ReLU zeros: skip the row, no bytes read
                continue
            row = _as_f32(wd[idx[i], c0:c1], tmp)
            for b in range(n_tok):
                hb = h[b, i]
                for c in range(c1 - c0):
                    acc[b, c] += hb * row[c]
        for b in range(n_tok):
            out[b, c0:c1] = acc[b]


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


def _raw(w):
    """Weights as numba-friendly contiguous arrays: bf16 becomes its uint16 bit pattern."""
    if w is None:
        return None
    w = np.ascontiguousarray(w)
    if w.dtype == BF16:
        return w.view(np.uint16)
    if w.dtype != np.float32:
        raise TypeError(f"host kernels take float32 or bfloat16 storage, got {w.dtype}")
    return w


def host_gather_matvec(w, idx, count, x):
    """numba ``w[idx[:count]] @ x``: [B, count] f32 (each row read once for all tokens)."""
    x2 = _arg(np.atleast_2d(x), np.float32)
    wr = _raw(w)
    idx, count = _rows(idx, count, wr.shape[0])
    _expect(x2.shape[1] == wr.shape[1], "x and w disagree on d")
    out = np.empty((x2.shape[0], count), np.float32)
    _h_kernel(3, wr, wr, np.zeros(1, np.float32), False, x2, idx, count, out)
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
    _h_kernel(_FAMILY_CODE[family], wg, wu, bu, has_bias, x2, idx, count, out)
    return out


def host_axpy_down(w_down_t, idx, count, h, out=None):
    """numba deterministic ``h @ w_down_t[idx[:count]]``: [B, d] f32."""
    h2 = _arg(np.atleast_2d(h), np.float32)
    wd = _raw(w_down_t)
    idx, count = _rows(idx, count, wd.shape[0])
    if out is None:
        out = np.empty((h2.shape[0], wd.shape[1]), np.float32)
    _expect(h2.shape[1] >= count and out.shape == (h2.shape[0], wd.shape[1]), "bad h or out shape")
    _down_kernel(wd, idx, count, h2, out)
    return out


def host_sparse_ffn(family, w_gate, w_up, w_down_t, x, idx, count, b_up=None, out=None):
    """numba cold FFN part over rows idx[:count] (no down bias): [d] or [B, d] f32."""
    h = host_sparse_h(family, w_gate, w_up, x, idx, count, b_up)
    y = host_axpy_down(w_down_t, idx, count, h, out=out)
    return y[0] if np.ndim(x) == 1 else y


# ---------------------------------------------------------------- calling from jit
def host_ffn_callback(family, w_gate, w_up, w_down_t, x, idx, count, b_up=None, *,
                      method="auto"):
    """Inside jit: cold FFN part on the host (numba) for x [d]/[B, d], idx [C], count scalar.

    The weights are host numpy arrays captured by the callback (never passed through XLA).
    ``method``: "buffer" (buffer_callback, zero-copy, CPU backend only), "pure"
    (pure_callback) or "auto" (buffer when available and the default backend is CPU; on GPU
    buffer_callback hands over device buffers, which numpy cannot read).
    """
    check_family(family, w_gate)
    host = [None if a is None else np.ascontiguousarray(a) for a in (w_gate, w_up, w_down_t, b_up)]
    d = host[2].shape[1]
    x = jnp.asarray(x).astype(jnp.float32)
    idx = jnp.asarray(idx).astype(jnp.int32)
    count = jnp.asarray(count).astype(jnp.int32)
    out_shape = jax.ShapeDtypeStruct(x.shape[:-1] + (d,), jnp.float32)
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

        def cb(ctx, out, xb, idxb, countb):
            del ctx
            o = np.asarray(out)
            # numba writes the result straight into XLA's output buffer (no copy back).
            compute(np.asarray(xb), np.asarray(idxb), np.asarray(countb), out=o.reshape(-1, d))

        return _buffer_callback(cb, out_shape)(x, idx, count)
    if method == "pure":
        def cb(xa, idxa, counta):
            return np.asarray(compute(np.asarray(xa), np.asarray(idxa), np.asarray(counta)),
                              np.float32)

        return jax.pure_callback(cb, out_shape, x, idx, count, vmap_method="sequential")
    raise ValueError(f"unknown callback method {method!r}")

"""The sparse FFN over neuron ids of whole weight matrices, as a zero-copy CPU-backend callback.

On the CPU backend the "device" and the host share one memory, so the hybrid engine keeps each
FFN matrix whole, once, and only marks which neurons the device owns (as the reference engine
does on the CPU): the hot and the cold part both call ``host_sparse_ffn`` over the same matrices,
each with its own list of neuron ids. The matrices are operands of a ``buffer_callback``
(JAX buffers, read in place: no copy, no capture), so the parameters stay an ordinary pytree.
``ops.host_kernels.host_ffn_callback`` is the variant for weights that live outside XLA (the
cold part on a GPU machine).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ops.host_kernels import host_sparse_ffn, host_sparse_h
from ops.quant import Weight
from ops.reference import check_family

try:
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:  # pragma: no cover - older jax
    _buffer_callback = None


def _leaves(w):
    if w is None:
        return ()
    return (w.data,) + (() if w.scale is None else (w.scale,)) if isinstance(w, Weight) else (w,)


def _rebuild(w, bufs: list):
    """The numpy view of operand `w` from the callback's buffers (consumed in order)."""
    if w is None:
        return None
    if isinstance(w, Weight):
        data = np.asarray(bufs.pop(0))
        scale = None if w.scale is None else np.asarray(bufs.pop(0))
        return Weight(data, scale, w.fmt, w.cols)
    return np.asarray(bufs.pop(0))


def sparse_ffn_rows(family: str, w_gate, w_up, w_down_t, b_up, x: jax.Array, ids: jax.Array, count: jax.Array,
                    after: jax.Array | None = None) -> jax.Array:
    """Inside jit on the CPU backend: FFN over neurons ``ids[:count]`` of whole matrices (no down
    bias): [B, d] f32 for x [B, d]. ``after``: an array to wait for (orders two numba calls of one
    layer, which together would oversubscribe the cores)."""
    return _rows_call(family, w_gate, w_up, w_down_t, b_up, x, ids, count, after, None, 0)


def threshold_ffn_rows(family: str, w_gate, w_up, w_down_t, x: jax.Array, ids: jax.Array, count: jax.Array,
                       act_threshold: float, first: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Inside jit on the CPU backend: CATS over neurons ``ids[:count]``: the gate of each, up and down
    only where |act(gate x)| > act_threshold (per token). Returns (y [B, d], neurons computed for some
    token, of them those among the first ``first`` listed: int32)."""
    y, live = _rows_call(family, w_gate, w_up, w_down_t, None, x, ids, count, None, float(act_threshold), first)
    return y, live[0], live[1]


def _rows_call(family, w_gate, w_up, w_down_t, b_up, x, ids, count, after, act_threshold, first):
    if _buffer_callback is None or jax.default_backend() != "cpu":
        raise RuntimeError("sparse_ffn_rows reads JAX buffers in place: CPU backend with buffer_callback only")
    check_family(family, w_gate)
    weights = (w_gate, w_up, w_down_t, b_up)
    d = w_down_t.cols if isinstance(w_down_t, Weight) else w_down_t.shape[1]
    x = jnp.asarray(x, jnp.float32)
    operands = [x, jnp.asarray(ids, jnp.int32), jnp.asarray(count, jnp.int32)]
    for w in weights:
        operands.extend(_leaves(w))
    deps = () if after is None else (after,)

    def cb(ctx, out, xb, idsb, countb, *rest):
        del ctx
        bufs = list(rest[: len(rest) - len(deps)])
        wg, wu, wd, bu = (_rebuild(w, bufs) for w in weights)
        ids_np = np.asarray(idsb)
        n = min(int(np.asarray(countb)), ids_np.shape[0])  # an overflowed list holds only its capacity
        if act_threshold is None:
            host_sparse_ffn(family, wg, wu, wd, np.asarray(xb), ids_np, n, bu, out=np.asarray(out))
            return
        y, live = out
        host_sparse_ffn(family, wg, wu, wd, np.asarray(xb), ids_np, n, bu, out=np.asarray(y),
                        act_threshold=act_threshold, live=np.asarray(live), live_first=first)

    shape = jax.ShapeDtypeStruct(x.shape[:-1] + (d,), jnp.float32)
    if act_threshold is not None:
        shape = (shape, jax.ShapeDtypeStruct((2,), jnp.int32))
    return _buffer_callback(cb, shape)(*operands, *deps)


def dense_h_rows(family: str, w_gate, w_up, b_up, x: jax.Array) -> jax.Array:
    """Inside jit on the CPU backend: the FFN activations h [B, n_ff] of every neuron, gate and up
    rows read in one pass (fused: ~5-8% faster than two mat-vecs on a 7B layer, two read streams)."""
    check_family(family, w_gate)
    weights = (w_gate, w_up, b_up)
    n = w_up.rows if isinstance(w_up, Weight) else w_up.shape[0]
    x = jnp.asarray(x, jnp.float32)
    operands = [x]
    for w in weights:
        operands.extend(_leaves(w))
    every = np.arange(n, dtype=np.int32)

    def cb(ctx, out, xb, *rest):
        del ctx
        bufs = list(rest)
        wg, wu, bu = (_rebuild(w, bufs) for w in weights)
        host_sparse_h(family, wg, wu, np.asarray(xb), every, n, bu, out=np.asarray(out))

    return _buffer_callback(cb, jax.ShapeDtypeStruct(x.shape[:-1] + (n,), jnp.float32))(*operands)

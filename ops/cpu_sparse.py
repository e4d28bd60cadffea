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

from ops.host_kernels import host_select_union, host_sparse_ffn
from ops.linear import host_relu_linear2, linear_relu_linear, uses_host_kernel
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
        return Weight(data, scale, w.fmt, w.cols, w.act)
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


def predicted_ffn_rows(family: str, fc1: Weight, fc2: Weight, threshold: float, hot_ids: jax.Array,
                       cold_ids: jax.Array, w_gate, w_up, w_down_t, b_up, x_pred: jax.Array, x: jax.Array,
                       rows: jax.Array | None = None, compute_rows: bool = True
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Inside jit on the CPU backend: a layer's whole predicted sparse FFN in one host call. The
    predictor fc2(relu(fc1 x_pred)) scores the neurons hot_ids then cold_ids; those some row in `rows`
    [B] (default: all) scores >= threshold (the union) are computed over the whole matrices, hot
    first. Returns (y [B, d] f32, neurons computed, of them hot: int32). The same result as the
    predictor, the selection and ``sparse_ffn_rows`` apart, but one callback a layer instead of two and
    no selection ops between them (a small model's step is per-call overheads, not bytes). A predictor
    the host kernels do not read (float32: XLA's mat-vec reads f32 at full bandwidth) is run by XLA
    before the call, which then gets its scores. ``compute_rows=False`` (profiling) stops after the
    selection: y is zero."""
    if _buffer_callback is None or jax.default_backend() != "cpu":
        raise RuntimeError("predicted_ffn_rows reads JAX buffers in place: CPU backend with buffer_callback only")
    check_family(family, w_gate)
    x_pred, x = jnp.asarray(x_pred, jnp.float32), jnp.asarray(x, jnp.float32)
    in_call = uses_host_kernel(fc1) and uses_host_kernel(fc2)
    predictor = (fc1, fc2) if in_call else (linear_relu_linear(x_pred, fc1, fc2),)
    weights = predictor + (w_gate, w_up, w_down_t, b_up)
    d = w_down_t.cols if isinstance(w_down_t, Weight) else w_down_t.shape[1]
    B = x.shape[0]
    rows = jnp.ones((B,), bool) if rows is None else jnp.asarray(rows, bool)
    operands = [x_pred, x, rows, jnp.asarray(hot_ids, jnp.int32), jnp.asarray(cold_ids, jnp.int32)]
    for w in weights:
        operands.extend(_leaves(w))
    thr = float(threshold)

    def cb(ctx, out, xpb, xb, rowsb, hotb, coldb, *rest):
        del ctx
        y, counts = out
        bufs = list(rest)
        if in_call:
            scores = host_relu_linear2(np.asarray(xpb), _rebuild(fc1, bufs), _rebuild(fc2, bufs))
        else:
            scores = np.asarray(bufs.pop(0))
        wg, wu, wd, bu = (_rebuild(w, bufs) for w in weights[len(predictor):])
        ids, count, hot = host_select_union(scores, np.asarray(rowsb), thr, np.asarray(hotb), np.asarray(coldb))
        if compute_rows:
            host_sparse_ffn(family, wg, wu, wd, np.asarray(xb), ids, count, bu, out=np.asarray(y))
        else:
            np.asarray(y)[...] = 0.0
        counts_np = np.asarray(counts)
        counts_np[0], counts_np[1] = count, hot

    shapes = (jax.ShapeDtypeStruct((B, d), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32))
    y, counts = _buffer_callback(cb, shapes)(*operands)
    return y, counts[0], counts[1]


def dense_ffn_rows(family: str, w_gate, w_up, w_down_t, b_up, x: jax.Array) -> jax.Array:
    """Inside jit on the CPU backend: the dense FFN of x [B, d] (no down bias), every neuron computed and every
    down row read, in one callback and one parallel region (`host_sparse_ffn` over all rows: gate and up rows
    in one pass, each chunk's down rows while its activations are in cache). [B, d] f32."""
    check_family(family, w_gate)
    weights = (w_gate, w_up, w_down_t, b_up)
    n = w_up.rows if isinstance(w_up, Weight) else w_up.shape[0]
    d = w_down_t.cols if isinstance(w_down_t, Weight) else w_down_t.shape[1]
    x = jnp.asarray(x, jnp.float32)
    operands = [x]
    for w in weights:
        operands.extend(_leaves(w))
    every = np.arange(n, dtype=np.int32)

    def cb(ctx, out, xb, *rest):
        del ctx
        bufs = list(rest)
        wg, wu, wd, bu = (_rebuild(w, bufs) for w in weights)
        host_sparse_ffn(family, wg, wu, wd, np.asarray(xb), every, n, bu, out=np.asarray(out), skip_zero_rows=False)

    return _buffer_callback(cb, jax.ShapeDtypeStruct(x.shape[:-1] + (d,), jnp.float32))(*operands)

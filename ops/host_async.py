"""The cold FFN part on the host *while* the device computes the hot part: launch / collect.

PowerInfer's speed comes from the CPU and the GPU working on the same layer at once and meeting
at the layer's end. Inside one jitted step that is two host callbacks around the hot kernel:

    ticket, x = launch(x, cold_ids, count)  # copies x to the host, queues the numba kernel, hands x back
    y_hot  = hot kernel(x)                  # reads launch's x: cannot start before the launch
    y_cold = collect(ticket, y_hot)         # waits for the host result (after the hot kernel)

Both orders are data dependencies, so XLA cannot reorder the three: an optimization barrier is
not enough (XLA:CPU scheduled the hot part before the launch: the layer took host + device). On a
GPU the callbacks are host work that the stream waits for, with the hot kernel between them.
The host work runs on one worker thread per handle (the numba kernel brings its own threads).
``host_ffn_callback`` in `host_kernels.py` is the serial variant (overlap off), and the reference.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from ops.host_kernels import host_sparse_ffn
from ops.quant import Weight
from ops.reference import check_family

_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pij-host-ffn")
_PENDING: dict[int, Future] = {}
_TICKETS = itertools.count(1)
_LOCK = threading.Lock()
# Set to a list to record (event, ticket, perf_counter) of every launch, host run and collect: the
# trace that shows whether host and device work overlapped (benchmarks/bench_hybrid_layer.py).
TRACE: list | None = None


def _event(name: str, ticket: int) -> None:
    if TRACE is not None:
        TRACE.append((name, ticket, time.perf_counter()))


class HostFFN:
    """One layer's host-side FFN matrices (numpy arrays or numpy-backed Weights): the layer's host
    handle. Hashes by identity, so it can be static metadata of the layer's pytree."""

    def __init__(self, family: str, w_gate, w_up, w_down_t, b_up=None):
        check_family(family, w_gate)
        self.family = family
        self.w_gate, self.w_up, self.w_down_t, self.b_up = w_gate, w_up, w_down_t, b_up
        self.d = w_down_t.cols if isinstance(w_down_t, Weight) else w_down_t.shape[1]

    def compute(self, x: np.ndarray, ids: np.ndarray, count: int, ticket: int = 0,
                act_threshold: float | None = None) -> tuple[np.ndarray, int]:
        """FFN over neurons ids[:count] for x [B, d]: (float32 [B, d], no down bias; neurons computed). With
        `act_threshold`, CATS: only where |act(gate x)| is above it (computed: those above it for some row)."""
        _event("host_start", ticket)
        n = min(int(count), ids.shape[0])  # an overflowed list holds only its capacity
        live = np.full(1, n, np.int64)
        y = np.asarray(host_sparse_ffn(self.family, self.w_gate, self.w_up, self.w_down_t, x, ids, n, self.b_up,
                                       act_threshold=act_threshold,
                                       live=live if act_threshold is not None else None),
                       np.float32).reshape(x.shape[0], self.d)
        _event("host_end", ticket)
        return y, int(live[0])

    def arrays(self) -> list:
        """The matrices (for memory accounting)."""
        return [a for a in (self.w_gate, self.w_up, self.w_down_t, self.b_up) if a is not None]


def _launch_host(handle: HostFFN, x, ids, count, act_threshold=None) -> tuple[np.ndarray, np.ndarray]:
    # Copies: the callback's buffers belong to XLA and may be reused once it returns.
    x, ids, count = np.array(x, np.float32), np.array(ids, np.int32), int(count)
    ticket = next(_TICKETS) % (1 << 31)
    _event("launch", ticket)
    with _LOCK:
        _PENDING[ticket] = _POOL.submit(handle.compute, x, ids, count, ticket, act_threshold)
    return np.asarray(ticket, np.int32), x


def _collect_host(ticket) -> tuple[np.ndarray, int]:
    ticket = int(ticket)
    _event("collect", ticket)
    with _LOCK:
        fut = _PENDING.pop(ticket)
    y, live = fut.result()
    _event("collected", ticket)
    return y, live


def launch(handle: HostFFN, x: jax.Array, ids: jax.Array, count: jax.Array,
           act_threshold: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Inside jit: starts the host FFN over ids[:count] for x [B, d] (CATS above `act_threshold` when
    given); returns (ticket, x) where the returned x must feed the device work that should overlap
    (it is ordered after the launch)."""
    x = jnp.asarray(x, jnp.float32)
    shapes = (jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct(x.shape, jnp.float32))
    # x comes back through the callback: the device work that reads it is ordered after the launch.
    return io_callback(lambda a, i, c: _launch_host(handle, a, i, c, act_threshold), shapes, x, jnp.asarray(ids, jnp.int32),
                       jnp.asarray(count, jnp.int32))


def collect(handle: HostFFN, ticket: jax.Array, batch: int, after: jax.Array, with_live: bool = False):
    """Inside jit: the launched host result [batch, d] float32, waited for after `after` exists
    (pass the overlapped device result, so the wait comes after the device work). `with_live`: also
    the number of neurons the host computed (int32; CATS counts those above the threshold)."""
    y_shape = jax.ShapeDtypeStruct((batch, handle.d), jnp.float32)
    if with_live:
        return io_callback(lambda t, _a: (lambda r: (r[0], np.asarray(r[1], np.int32)))(_collect_host(t)),
                           (y_shape, jax.ShapeDtypeStruct((), jnp.int32)), ticket, after)
    return io_callback(lambda t, _a: _collect_host(t)[0], y_shape, ticket, after)

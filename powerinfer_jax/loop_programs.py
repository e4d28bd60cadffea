"""The decode loop's jitted programs (`batching.ContinuousBatcher` and `generate_rows` run them): a decode step
over the first rows of the batch cache, the same step carrying a packed prompt chunk, a prompt chunk into a staging
cache, and the row copies (a staged prompt inserted into the batch, a row moved when the batch shrinks). They belong
to the engine (`programs(engine)`), so every loop over one engine shares their compiled executables, which are called
through JAX's C++ dispatch (`fast_call`).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
import numpy as np

from powerinfer_jax.engine import Engine, _ffn_totals, _finite_or_flag
from powerinfer_jax.model import KVCache, RowGroup, forward, forward_groups
from powerinfer_jax.sampling import row_mode, sample_rows

if TYPE_CHECKING:
    from powerinfer_jax.batching import Request

log = logging.getLogger(__name__)


class _Programs:
    """One engine's jitted loop programs and their compiled executables, shared by every loop over it."""

    def __init__(self, engine: Engine):
        cfg, ffn_fn = engine.cfg, engine._ffn_fn
        self.step = jax.jit(engine.traced(functools.partial(_decode_rows, cfg=cfg, ffn_fn=ffn_fn)),
                            static_argnames=("attend_len", "mode"), donate_argnames=("cache",))
        self.chunk = jax.jit(engine.traced(functools.partial(_prefill_chunk, cfg=cfg, ffn_fn=ffn_fn)),
                             static_argnames=("attend_len", "mode"), donate_argnames=("cache",))
        self.mixed = jax.jit(engine.traced(functools.partial(_decode_and_pack, cfg=cfg, ffn_fn=ffn_fn)),
                             static_argnames=("attend_len", "mode"), donate_argnames=("cache",))
        self.insert = jax.jit(_insert_row, static_argnames=("span",), donate_argnames=("cache",))
        self.move = jax.jit(_move_row, static_argnames=("span",), donate_argnames=("cache",))
        self.executables: dict[tuple, Callable] = {}  # (program name, argument shapes, static values) -> executable
        # The row programs are compiled ahead of time too (0.16 s the first insert cost inside a request) where
        # every array lives on one device; over a mesh a prefilled staging cache comes back replicated over it,
        # unlike a new one, so there they stay jit calls (compiled on first use, for the sharding they meet).
        self.rows_ahead = all(len(a.sharding.device_set) == 1 for a in jax.tree.leaves(engine.params))


def programs(engine: Engine) -> _Programs:
    """The engine's loop programs (made on first use and kept on the engine)."""
    if engine._loop_programs is None:
        engine._loop_programs = _Programs(engine)
    return engine._loop_programs


def fast_call(compiled) -> Callable:
    """`compiled` (an ahead-of-time `jax.stages.Compiled`) called through JAX's C++ dispatch path.

    JAX gives an AOT executable that holds host callbacks (our numba kernels' buffer_callbacks) only
    its Python dispatch, which checks every argument's sharding and layout on every call: 0.65 ms of a
    3.8 ms bundled-model step at batch 1 (114 parameter arrays; a 7B model has ~3x as many), while a
    plain `jax.jit` call of the same program takes the C++ path (jit never makes that exception). So
    the C++ call is built here as jit would build it. This reaches into `jax._src` (`_executable`,
    `_params`, `create_cpp_call`); if any of that is missing, the normal call is used: only the
    speed differs (tests/test_batching.py checks both)."""
    try:
        replicated = compiled._executable.unsafe_call
        if not replicated.has_host_callbacks:
            return compiled
        replicated.has_host_callbacks = False
        try:
            call = compiled._executable.create_cpp_call(compiled._params)
        finally:
            replicated.has_host_callbacks = True
    except (AttributeError, TypeError) as err:
        _warn_slow_dispatch(f"{type(err).__name__}: {err}")
        return compiled
    if call is None:
        _warn_slow_dispatch("create_cpp_call gave no call")
        return compiled
    return call


@functools.lru_cache(maxsize=1)
def _warn_slow_dispatch(why: str) -> None:
    log.warning("this jax (%s) changed the internals loop_programs.fast_call uses (%s): decode steps go through JAX's "
                "Python dispatch, which is slower", jax.__version__, why)


def row_settings(reqs: list[Request | None], size: int | None = None):
    """(mode, keys [b, 2], temperatures, top_ks, top_ps, steps) for rows of `reqs` (None: a padding row),
    padded to `size`."""
    size = size or len(reqs)
    keys = np.zeros((size, 2), np.uint32)
    temps, top_ps = np.zeros(size, np.float32), np.ones(size, np.float32)
    top_ks, steps = np.zeros(size, np.int32), np.zeros(size, np.int32)
    real = np.zeros(size, bool)
    for i, r in enumerate(reqs):
        if r is None:
            continue
        keys[i], temps[i], top_ks[i], top_ps[i] = r.key, r.params.temperature, r.params.top_k, r.params.top_p
        steps[i], real[i] = len(r.generated), True
    mode = row_mode(temps[real], top_ks[real], top_ps[real])
    return mode, *(jnp.asarray(a) for a in (keys, temps, top_ks, top_ps, steps))


def _sample(logits, keys, temps, top_ks, top_ps, steps, mode):
    # The n-th token of a request is drawn with its own key folded with n: batch-independent.
    keys = jax.vmap(jax.random.fold_in)(keys, steps)
    return _finite_or_flag(sample_rows(logits, keys, temps, top_ks, top_ps, mode), logits)


def _decode_rows(params, tokens, positions, cache, keys, temps, top_ks, top_ps, steps, *, cfg, ffn_fn, attend_len,
                 mode):
    """One decode step for the first len(tokens) rows of the batch cache."""
    # tokens has `rows` rows; the cache has max_batch: attention writes and reads its first `rows` in place.
    holds = positions < cache.max_len  # padding rows sit past the cache: a sparse FFN skips their neurons
    logits, cache, extras = forward(params, cfg, tokens[:, None], positions[:, None], cache, attend_len,
                                    ffn_fn=ffn_fn, rows=holds)
    return _sample(logits[:, 0], keys, temps, top_ks, top_ps, steps, mode), cache, _ffn_totals(extras["ffn_aux"])


def _decode_and_pack(params, tokens, positions, cache, chunk_tokens, chunk_positions, chunk_rows, row_set, last,
                     keys, temps, top_ks, top_ps, steps, *, cfg, ffn_fn, attend_len, mode):
    """`_decode_rows` for the batch and a packed prompt chunk [1, W] (token t at chunk_positions[0, t] into
    row chunk_rows[0, t] of the same batch cache: pieces of several prompts, each in the free row it will
    decode in; slot r's row is row_set[r]), in one program (`forward_groups`: each weight read once for
    both). Samples len(tokens) + R tokens (R slots): the rows', then each slot's after its token at `last[r]`
    (used where a piece completes a prompt)."""
    holds = positions < cache.max_len
    groups = [RowGroup(tokens[:, None], positions[:, None], cache, rows=holds),
              RowGroup(chunk_tokens, chunk_positions, None, logits_at=last, cache_rows=chunk_rows, row_set=row_set,
                       shares_cache=True)]
    (rows_logits, _, aux), (chunk_logits, cache, _) = forward_groups(params, cfg, groups, attend_len, ffn_fn)
    logits = jnp.concatenate([rows_logits[:, 0], chunk_logits[:, 0]])
    return _sample(logits, keys, temps, top_ks, top_ps, steps, mode), cache, _ffn_totals(aux)


def _prefill_chunk(params, tokens, positions, cache, last, keys, temps, top_ks, top_ps, steps, *, cfg, ffn_fn,
                   attend_len, mode):
    """A prompt chunk [1, C] at `positions` into row 0 of a staging cache; samples after its `last` token."""
    logits, cache, _ = forward(params, cfg, tokens, positions, cache, attend_len, ffn_fn=ffn_fn, logits_at=last)
    return _sample(logits[:, 0], keys, temps, top_ks, top_ps, steps, mode), cache


@functools.lru_cache(maxsize=None)
def row_index(i: int) -> jax.Array:
    """A row number as the int32 scalar the row programs take (made once per row, not a ~40 us transfer
    at every insert and move; the programs never donate it)."""
    return jnp.asarray(i, np.int32)


def _copy_row(dst: jax.Array, src: jax.Array, src_row: jax.Array, dst_row: jax.Array, span: int) -> jax.Array:
    """One layer's cache `dst` [B, n_kv, S, hd] with the first `span` slots of row `src_row` of `src` written
    into row `dst_row`."""
    zero = jnp.zeros((), jnp.int32)
    part = jax.lax.dynamic_slice(src, (src_row, zero, zero, zero), (1, src.shape[1], span, src.shape[3]))
    return jax.lax.dynamic_update_slice(dst, part.astype(dst.dtype), (dst_row, zero, zero, zero))


def _insert_row(cache: KVCache, staging: KVCache, row: jax.Array, src: jax.Array, *, span: int) -> KVCache:
    """The first `span` slots of row `src` of the staging cache written into `row` of the batch cache."""
    return KVCache(k=[_copy_row(c, s, src, row, span) for c, s in zip(cache.k, staging.k)],
                   v=[_copy_row(c, s, src, row, span) for c, s in zip(cache.v, staging.v)])


def _move_row(cache: KVCache, src: jax.Array, dst: jax.Array, *, span: int) -> KVCache:
    """The first `span` slots of row `src` of the batch cache copied into row `dst` (a retired row refilled by
    the last one)."""
    return KVCache(k=[_copy_row(c, c, src, dst, span) for c in cache.k],
                   v=[_copy_row(c, c, src, dst, span) for c in cache.v])

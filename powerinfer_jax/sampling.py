"""Token sampling inside jit: greedy, temperature, top-k, top-p (`sample_rows`, the engine's; `sample`, its reference)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from powerinfer_jax import checks


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen; hashable, so it is a static jit argument."""

    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0  # 1 means no nucleus cut

    def __post_init__(self):
        # Plain Python values: the dataclass is a static jit argument (hashed, compared).
        object.__setattr__(self, "temperature", checks.real("temperature", self.temperature, lo=0.0))
        object.__setattr__(self, "top_k", checks.integer("top_k", self.top_k, lo=0))
        top_p = checks.real("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise checks.ArgumentError(f"top_p must be in (0, 1], got {top_p}")
        object.__setattr__(self, "top_p", top_p)


def sample(logits: jax.Array, key: jax.Array, sp: SamplingParams) -> jax.Array:
    """Picks one token per row of logits [B, V] -> int32 [B]: the plain reference of `sample_rows` (a sort
    for the cuts, a Gumbel draw; the same rule, other random draws)."""
    if sp.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # Shifted so the best logit is 0 before dividing: a tiny temperature then sends the others to -inf
    # (greedy) instead of every positive logit to +inf (a tie among them).
    logits = logits.astype(jnp.float32)
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / sp.temperature
    if sp.top_k > 0 or sp.top_p < 1.0:
        B = logits.shape[0]
        logits = cut_rows_ref(logits, jnp.full(B, sp.top_k, jnp.int32), jnp.full(B, sp.top_p, jnp.float32))
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _top_p_cutoff(desc: jax.Array, top_p) -> jax.Array:
    """[B, 1]: the lowest logit kept by nucleus sampling, from logits sorted descending [B, V]: the
    smallest prefix whose mass reaches top_p (a scalar or [B, 1]; always at least one token)."""
    probs = jax.nn.softmax(desc, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    return jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)


# How much of `sample_rows` a batch needs: a static jit argument, so an all-greedy batch (the common
# serving case) pays only an argmax, and the vocabulary sort only runs when a row cuts top-k/top-p.
ROW_MODES = ("greedy", "temperature", "cut")


def row_mode(temperatures, top_ks, top_ps) -> str:
    """The cheapest ROW_MODES entry that serves every row's settings."""
    if all(t == 0.0 for t in temperatures):
        return "greedy"
    if all(k == 0 for k in top_ks) and all(p >= 1.0 for p in top_ps):
        return "temperature"
    return "cut"


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                mode: str = "cut") -> jax.Array:
    """Picks one token per row of logits [B, V], each row with its own key [B, 2] and settings [B]:
    the rule of `sample` row by row, so requests with different settings share one batch.

    The engine's sampler, built to cost little at real vocabularies: the top-k and top-p cuts are found
    by bisection over the logits' bit patterns (32 counting passes over the row, exact) instead of a sort,
    and the draw is one uniform per row through the cumulative distribution instead of a Gumbel variate per
    logit. XLA:CPU sorts slowly: at V = 32000 and 16 rows the sort-based cut took 106 ms a step, this
    one ~10 (`benchmarks/bench_sampling.py`). `sample` is its plain reference (sort, Gumbel)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode == "greedy":
        return greedy
    z = logits.astype(jnp.float32)
    z = (z - jnp.max(z, axis=-1, keepdims=True)) / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    if mode == "cut":
        z = cut_rows(z, top_k, top_p)
    drawn = _draw_rows(z, keys)
    return jnp.where(temperature > 0, drawn, greedy)


def cut_rows(z: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """z [B, V] with every logit outside row b's top-k (top_k[b] > 0) and then outside its nucleus
    (top_p[b] < 1) set to -inf; ties with the last kept logit are kept. `cut_rows_ref` sorts instead."""
    V = z.shape[-1]
    order = _order_keys(z)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)[:, None]
    # the largest key with at least k logits at or above it: the k-th largest logit
    kth = _largest_key_where(order, lambda t: jnp.sum(order >= t, axis=-1, keepdims=True) >= k)
    z = jnp.where(order >= kth, z, -jnp.inf)
    probs = jax.nn.softmax(z, axis=-1)
    # the largest key whose logits at or above it hold top_p of the mass: the nucleus's smallest logit
    mass = lambda t: jnp.sum(jnp.where(order >= t, probs, 0.0), axis=-1, keepdims=True)  # noqa: E731
    cutoff = _largest_key_where(order, lambda t: mass(t) >= top_p[:, None])
    cutoff = jnp.where(top_p[:, None] < 1.0, cutoff, jnp.uint32(0))  # top_p 1: no cut (float mass may stop short of 1)
    return jnp.where(order >= cutoff, z, -jnp.inf)


def _order_keys(z: jax.Array) -> jax.Array:
    """uint32 keys whose unsigned order is the float order of z (negative floats' bits flipped, positive
    floats' sign bit set)."""
    bits = jax.lax.bitcast_convert_type(z, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _largest_key_where(order: jax.Array, holds) -> jax.Array:
    """[B, 1]: per row the largest t in [min key, max key] with holds(t) true, by bisection over the 32-bit
    key (holds must be monotone: true up to some t, false above; the row minimum is the fallback)."""
    lo = jnp.min(order, axis=-1, keepdims=True)  # holds here for any sensible rule, else it is the fallback
    hi = jnp.max(order, axis=-1, keepdims=True) + jnp.uint32(1)  # hi may wrap to 0 only for a NaN-free +max row

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // jnp.uint32(2)
        ok = holds(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
    return lo


def _draw_rows(z: jax.Array, keys: jax.Array) -> jax.Array:
    """One draw per row from softmax(z) [B, V] with its key: a uniform u in (0, total] through the
    cumulative sum (a token of zero probability is never drawn)."""
    probs = jax.nn.softmax(z, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    u = jax.vmap(lambda key: 1.0 - jax.random.uniform(key, (), jnp.float32))(keys)[:, None] * cum[:, -1:]
    return jnp.minimum(jnp.sum(cum < u, axis=-1), z.shape[-1] - 1).astype(jnp.int32)


def cut_rows_ref(z: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Reference of `cut_rows`: the same cut through a full sort of each row."""
    V = z.shape[-1]
    desc = -jnp.sort(-z, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    z = jnp.where(z < kth, -jnp.inf, z)
    desc = jnp.where(jnp.arange(V)[None, :] < k[:, None], desc, -jnp.inf)  # the top-k cut, sorted
    cutoff = jnp.where(top_p[:, None] < 1.0, _top_p_cutoff(desc, top_p[:, None]), -jnp.inf)
    return jnp.where(z < cutoff, -jnp.inf, z)

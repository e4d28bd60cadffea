"""Token sampling inside jit: greedy, temperature, top-k, top-p."""

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
    """Picks one token per row of logits [B, V] -> int32 [B]."""
    if sp.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # Shifted so the best logit is 0 before dividing: a tiny temperature then sends the others to -inf
    # (greedy) instead of every positive logit to +inf (a tie among them).
    logits = logits.astype(jnp.float32)
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / sp.temperature
    if sp.top_k > 0:
        kth = jax.lax.top_k(logits, min(sp.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sp.top_p < 1.0:
        cutoff = _top_p_cutoff(jnp.sort(logits, axis=-1)[:, ::-1], sp.top_p)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
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
    the rule of `sample` row by row, so requests with different settings share one batch."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode == "greedy":
        return greedy
    z = logits.astype(jnp.float32)
    z = (z - jnp.max(z, axis=-1, keepdims=True)) / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    if mode == "cut":
        V = z.shape[-1]
        desc = -jnp.sort(-z, axis=-1)
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
        kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
        z = jnp.where(z < kth, -jnp.inf, z)
        desc = jnp.where(jnp.arange(V)[None, :] < k[:, None], desc, -jnp.inf)  # the top-k cut, sorted
        z = jnp.where(z < _top_p_cutoff(desc, top_p[:, None]), -jnp.inf, z)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, z).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)

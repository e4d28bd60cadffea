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
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        before = jnp.cumsum(probs, axis=-1) - probs
        keep = before < sp.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

"""Active-neuron selection inside jit with static shapes.

A predictor gives one score per FFN neuron; a neuron is active when ``score >= threshold``.
The active set is compacted into a fixed-capacity index list ``idx [C]`` (threshold + cumsum
compaction: ~141 us at n=11008 on a 2-core CPU versus ~445 us for ``lax.top_k``), padded with
row 0 so that every entry is a valid row number, plus ``valid [C]`` and the true ``count``.

Capacity policy: callers pick C from the predictor's activity statistics, rounded up by
``capacity_bucket`` so that only a few shapes are ever compiled. If more than C neurons are
active the *first* C (lowest neuron ids) are kept and the rest dropped; ``count`` is the true,
unclipped number, so ``count > C`` tells the caller that it overflowed (it can then grow the
bucket for the next token, or fall back to dense).
"""
from __future__ import annotations

import jax.numpy as jnp


def capacity_bucket(n_active: int, n: int, min_capacity: int = 32) -> int:
    """Round ``n_active`` up to a power of two, at least ``min_capacity``, at most ``n``."""
    n_active = max(int(n_active), 1)
    c = 1 << (n_active - 1).bit_length()
    return int(min(max(c, min_capacity), n))


def compact_mask(mask, capacity: int):
    """Compact a boolean mask [n] into (idx [C] int32, valid [C] bool, count int32)."""
    mask = jnp.asarray(mask, bool)
    n = mask.shape[-1]
    pos = jnp.cumsum(mask, dtype=jnp.int32) - 1  # slot of each active neuron
    count = pos[-1] + 1
    # Inactive neurons and overflow (slot >= C) are sent to slot C, which mode='drop' discards.
    slot = jnp.where(mask & (pos < capacity), pos, capacity)
    idx = jnp.zeros((capacity,), jnp.int32).at[slot].set(
        jnp.arange(n, dtype=jnp.int32), mode="drop", unique_indices=False)
    valid = jnp.arange(capacity, dtype=jnp.int32) < count
    return idx, valid, count


def select_active(scores, threshold, capacity: int):
    """Neurons with ``scores >= threshold`` as (idx [C], valid [C], true count)."""
    return compact_mask(scores >= threshold, capacity)


def union_mask(scores, threshold):
    """Active mask for a batch [B, n]: a neuron is active if any token activates it."""
    return jnp.any(scores >= threshold, axis=0)


def select_active_union(scores, threshold, capacity: int):
    """Union of the active sets of a token batch [B, n] as (idx, valid, count)."""
    return compact_mask(union_mask(scores, threshold), capacity)

"""ops.select: fixed-capacity compaction inside jit, overflow, batch union, buckets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import select as S


def test_capacity_bucket():
    assert S.capacity_bucket(0, 11008) == 32
    assert S.capacity_bucket(5, 11008) == 32
    assert S.capacity_bucket(32, 11008) == 32
    assert S.capacity_bucket(33, 11008) == 64
    assert S.capacity_bucket(1101, 11008) == 2048
    assert S.capacity_bucket(9000, 11008) == 11008  # capped at n
    assert S.capacity_bucket(10, 16) == 16           # min 32 still capped at n


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("capacity", [8, 64, 512])
def test_select_matches_nonzero(seed, capacity):
    rng = np.random.default_rng(seed)
    n = 512
    scores = rng.standard_normal(n).astype(np.float32)
    thr = np.float32(rng.uniform(0.5, 2.0))
    sel = jax.jit(S.select_active, static_argnums=2)
    idx, valid, count = map(np.asarray, sel(scores, thr, capacity))
    want = np.nonzero(scores >= thr)[0]
    assert idx.dtype == np.int32 and idx.shape == (capacity,) and valid.shape == (capacity,)
    assert int(count) == len(want)                       # the true count, even on overflow
    k = min(len(want), capacity)
    np.testing.assert_array_equal(idx[:k], want[:k])      # overflow keeps the first C
    np.testing.assert_array_equal(valid, np.arange(capacity) < k)
    assert np.all(idx[k:] == 0)                           # padding points at a valid row


def test_empty_and_full_masks():
    idx, valid, count = S.compact_mask(jnp.zeros(100, bool), 32)
    assert int(count) == 0 and not np.any(valid) and np.all(np.asarray(idx) == 0)
    idx, valid, count = S.compact_mask(jnp.ones(100, bool), 32)
    assert int(count) == 100 and np.all(valid)
    np.testing.assert_array_equal(idx, np.arange(32))


@pytest.mark.parametrize("seed", [0, 1])
def test_union_over_batch(seed):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((4, 300)).astype(np.float32)
    idx, valid, count = S.select_active_union(scores, 1.5, 256)
    want = np.nonzero(np.any(scores >= 1.5, axis=0))[0]
    assert int(count) == len(want)
    np.testing.assert_array_equal(np.asarray(idx)[np.asarray(valid)], want)

"""ops.xla_sparse against ops.reference: families, f32/bf16 storage, batch, padding."""
import jax
import ml_dtypes
import numpy as np
import pytest

from ops import reference as R
from ops import select as S
from ops import xla_sparse as X

RTOL, ATOL = 1e-5, 1e-5  # f32 compute both sides (bf16 storage widens exactly to f32)
N, D = 512, 160


def _case(family, seed, dtype, batch, cap=96, count=70):
    wg, wu, wd, bu = R.random_ffn_weights(family, N, D, seed, dtype)
    rng = np.random.default_rng(seed + 7)
    x = rng.standard_normal((D,) if batch is None else (batch, D)).astype(np.float32)
    idx = rng.choice(N, cap, replace=False).astype(np.int32)
    valid = np.asarray(R.valid_from_count(count, cap))
    return wg, wu, wd, bu, x, idx, valid


@pytest.mark.parametrize("family", R.FAMILIES)
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("batch", [None, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_sparse_ffn_xla_matches_ref(family, dtype, batch, seed):
    wg, wu, wd, bu, x, idx, valid = _case(family, seed, dtype, batch)
    f = jax.jit(X.sparse_ffn_xla, static_argnums=0)
    y = f(family, wg, wu, wd, x, idx, valid, bu)
    want = R.sparse_ffn_ref(family, wg, wu, wd, x, idx, valid, bu)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("family,batch,count,chunk", [
    ("reglu", None, 70, 16), ("relu", 2, 70, 32), ("drelu", None, 10, 16), ("reglu", 3, 0, 32)])
def test_chunked_scan_matches_ref(family, batch, count, chunk):
    """The CPU chunked scan (uneven last chunk, all-padding chunks skipped) equals the reference."""
    wg, wu, wd, bu, x, idx, valid = _case(family, 3, np.float32, batch, cap=100, count=count)
    f = jax.jit(lambda *a: X.sparse_ffn_xla(family, *a, chunk=chunk))
    y = f(wg, wu, wd, x, idx, valid, bu)
    want = R.sparse_ffn_ref(family, wg, wu, wd, x, idx, valid, bu)
    assert y.shape == x.shape
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_gather_matvec_and_axpy_xla(seed):
    wg, wu, wd, _, x, idx, valid = _case("reglu", seed, np.float32, None)
    np.testing.assert_allclose(X.gather_matvec_xla(wu, idx, valid, x),
                               R.gather_matvec_ref(wu, idx, valid, x), rtol=RTOL, atol=ATOL)
    h = np.random.default_rng(seed).standard_normal(len(idx)).astype(np.float32)
    np.testing.assert_allclose(X.axpy_down_xla(wd, idx, valid, h),
                               R.axpy_down_ref(wd, idx, valid, h), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("family", R.FAMILIES)
def test_select_then_sparse_equals_dense(family):
    """End to end in one jit: exact active set -> compaction -> sparse FFN == dense FFN."""
    wg, wu, wd, bu = R.random_ffn_weights(family, N, D, 5)
    x = np.random.default_rng(5).standard_normal(D).astype(np.float32)
    cap = S.capacity_bucket(N // 2 + 40, N)

    @jax.jit
    def f(x):
        h = R.dense_h_ref(family, wg, wu, x, bu)
        idx, valid, count = S.compact_mask(h != 0, cap)
        return X.sparse_ffn_xla(family, wg, wu, wd, x, idx, valid, bu), count

    y, count = f(x)
    assert int(count) <= cap
    np.testing.assert_allclose(y, R.dense_ffn_ref(family, wg, wu, wd, x, bu), rtol=RTOL, atol=ATOL)

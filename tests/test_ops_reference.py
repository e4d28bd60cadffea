"""ops.reference against float64 numpy: dense families, sparse forms, padding semantics."""
import numpy as np
import pytest

from ops import reference as R

RTOL, ATOL = 1e-5, 1e-5  # f32 compute vs float64 numpy, O(1) activations
N, D = 256, 96


def _np_dense(family, wg, wu, wd, x, bu=None, bd=None):
    f = lambda a: None if a is None else np.asarray(a, np.float64)
    x, wg, wu, wd, bu, bd = map(f, (x, wg, wu, wd, bu, bd))
    u = x @ wu.T
    if family == "relu":
        h = np.maximum(u + (0 if bu is None else bu), 0)
    else:
        g = x @ wg.T
        if family == "swiglu":
            h = g / (1 + np.exp(-g)) * u
        elif family == "geglu":  # tanh-GELU, as Gemma's gelu_pytorch_tanh
            h = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3))) * u
        else:
            h = np.maximum(g, 0) * (u if family == "reglu" else np.maximum(u, 0))
    y = h @ wd
    return y if bd is None else y + bd


@pytest.mark.parametrize("family", R.FAMILIES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("batch", [None, 3])
def test_dense_matches_numpy(family, seed, batch):
    wg, wu, wd, bu = R.random_ffn_weights(family, N, D, seed)
    rng = np.random.default_rng(seed + 100)
    x = rng.standard_normal((D,) if batch is None else (batch, D)).astype(np.float32)
    bd = rng.standard_normal(D).astype(np.float32)
    y = R.dense_ffn_ref(family, wg, wu, wd, x, bu, bd)
    np.testing.assert_allclose(y, _np_dense(family, wg, wu, wd, x, bu, bd), rtol=RTOL, atol=ATOL)
    assert y.shape == x.shape


@pytest.mark.parametrize("family", R.FAMILIES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_on_true_active_set_equals_dense(family, seed):
    """With idx = exactly the neurons whose h != 0, the sparse FFN is the dense FFN."""
    wg, wu, wd, bu = R.random_ffn_weights(family, N, D, seed)
    x = np.random.default_rng(seed).standard_normal(D).astype(np.float32)
    h = np.asarray(R.dense_h_ref(family, wg, wu, x, bu))
    active = np.nonzero(h)[0].astype(np.int32)
    cap = len(active) + 7
    idx = np.concatenate([active, np.zeros(7, np.int32)])
    valid = R.valid_from_count(len(active), cap)
    y = R.sparse_ffn_ref(family, wg, wu, wd, x, idx, valid, bu)
    np.testing.assert_allclose(y, R.dense_ffn_ref(family, wg, wu, wd, x, bu), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_padding_contributes_zero(seed):
    """Padded entries may point at any row; with valid=False they add exactly nothing."""
    rng = np.random.default_rng(seed)
    wg, wu, wd, _ = R.random_ffn_weights("reglu", N, D, seed)
    x = rng.standard_normal((2, D)).astype(np.float32)
    idx = rng.choice(N, 40, replace=False).astype(np.int32)
    valid = rng.random(40) < 0.6
    y = R.sparse_ffn_ref("reglu", wg, wu, wd, x, idx, valid)
    y_only = R.sparse_ffn_ref("reglu", wg, wu, wd, x, idx[valid], np.ones(valid.sum(), bool))
    np.testing.assert_allclose(y, y_only, rtol=RTOL, atol=ATOL)
    h = R.sparse_h_ref("reglu", wg, wu, x, idx, valid)
    assert np.all(np.asarray(h)[:, ~valid] == 0)


def test_gather_and_axpy_match_numpy():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((N, D)).astype(np.float32)
    x = rng.standard_normal(D).astype(np.float32)
    idx = rng.choice(N, 32, replace=False).astype(np.int32)
    valid = np.arange(32) < 20
    gm = np.asarray(R.gather_matvec_ref(w, idx, valid, x))
    want = np.where(valid, w[idx].astype(np.float64) @ x, 0)
    np.testing.assert_allclose(gm, want, rtol=RTOL, atol=1e-4)  # sums of 96 N(0,1) products
    h = rng.standard_normal(32).astype(np.float32)
    ax = np.asarray(R.axpy_down_ref(w, idx, valid, h))
    np.testing.assert_allclose(ax, (h * valid) @ w[idx].astype(np.float64), rtol=RTOL, atol=1e-4)


def test_family_checks():
    wg, wu, wd, bu = R.random_ffn_weights("reglu", 8, 4)
    with pytest.raises(ValueError):
        R.dense_ffn_ref("gelu", wg, wu, wd, np.ones(4, np.float32))
    with pytest.raises(ValueError):
        R.dense_ffn_ref("relu", wg, wu, wd, np.ones(4, np.float32))
    with pytest.raises(ValueError):
        R.dense_ffn_ref("reglu", None, wu, wd, np.ones(4, np.float32))

"""Tests for the offline placement solver (offline/placement.py)."""

import itertools

import numpy as np
import pytest

from offline import placement


def _rand_freqs(rng, n_ff, n_layers):
    """Continuous random rates: no ties, so optimal index sets are unique."""
    sizes = [n_ff] * n_layers if np.ndim(n_ff) == 0 else list(n_ff)
    return [rng.random(n) ** 3 for n in sizes]


def _check_feasible(p, freqs, neuron_bytes, budget, min_hot):
    nbs = [neuron_bytes] * len(freqs) if np.ndim(neuron_bytes) == 0 else list(neuron_bytes)
    assert p.bytes_used <= budget
    assert p.bytes_used == sum(c * nb for c, nb in zip(p.hot_counts, nbs))
    for h, f, c in zip(p.hot_indices, freqs, p.hot_counts):
        assert h.dtype == np.int32 and h.size == c
        assert np.all(np.diff(h) > 0), "sorted and unique"
        assert h.size == 0 or (h[0] >= 0 and h[-1] < f.size)
        assert c == 0 or c >= min(min_hot, f.size), "communication constraint"
    assert p.objective == pytest.approx(sum(f[h].sum() for f, h in zip(freqs, p.hot_indices)))


def _brute_force(freqs, nbs, budget, batch, min_hot):
    """Best objective over every 0/1 vector of batches (no ordering assumed)."""
    sizes, masses, costs, layer = [], [], [], []
    for l, f in enumerate(freqs):
        fs = np.sort(f)[::-1]
        for s in range(0, f.size, batch):
            chunk = fs[s:s + batch]
            sizes.append(chunk.size), masses.append(chunk.sum())
            costs.append(chunk.size * nbs[l]), layer.append(l)
    sizes, masses, costs, layer = map(np.asarray, (sizes, masses, costs, layer))
    X = np.array(list(itertools.product((0, 1), repeat=sizes.size)))
    ok = X @ costs <= budget
    for l, f in enumerate(freqs):
        cnt = X[:, layer == l] @ sizes[layer == l]
        ok &= (cnt == 0) | (cnt >= min(min_hot, f.size))
    return (X[ok] @ masses).max()


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_with_communication_constraint(seed):
    rng = np.random.default_rng(seed)
    batch = 3
    n_ff = [12, 11, 10]  # 4 batches per layer; two layers end in a partial batch
    freqs = _rand_freqs(rng, n_ff, 3)
    nbs = [2, 3, 2] if seed % 2 else [2, 2, 2]
    total = sum(n * b for n, b in zip(n_ff, nbs))
    for min_hot in (0, 5, 7, 11):  # 11 > n_ff of layer 2: that layer is all-or-nothing
        for frac in (0.15, 0.4, 0.7):
            budget = int(frac * total)
            p = placement.solve(freqs, nbs, budget, batch=batch, min_hot_per_split_layer=min_hot,
                                mip_rel_gap=0.0)
            best = _brute_force(freqs, nbs, budget, batch, min_hot)
            assert p.objective == pytest.approx(best, rel=1e-9, abs=1e-12), (min_hot, frac)
            _check_feasible(p, freqs, nbs, budget, min_hot)
            assert p.status == "optimal"


def test_communication_constraint_changes_the_answer():
    # Layer 1 is cold: greedy would give it a few neurons; with min_hot it gets none or many.
    rng = np.random.default_rng(0)
    freqs = [rng.random(40) + 1.0, rng.random(40) * 0.8 + 0.3]
    g = placement.greedy_hottest(freqs, 1, 50)
    assert 0 < g.hot_counts[1] < 20
    p = placement.solve(freqs, 1, 50, batch=1, min_hot_per_split_layer=20, mip_rel_gap=0.0)
    assert p.hot_counts[1] == 0 or p.hot_counts[1] >= 20
    assert p.objective <= g.objective


@pytest.mark.parametrize("seed", range(3))
def test_equals_greedy_when_unconstrained(seed):
    rng = np.random.default_rng(100 + seed)
    freqs = _rand_freqs(rng, 150, 4)
    for budget in (1, 97, 300, 599):
        p = placement.solve(freqs, 8, 8 * budget, batch=1, min_hot_per_split_layer=0,
                            mip_rel_gap=0.0)
        g = placement.greedy_hottest(freqs, 8, 8 * budget)
        assert p.objective == pytest.approx(g.objective, rel=1e-12)
        for a, b in zip(p.hot_indices, g.hot_indices):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("seed", range(4))
def test_budget_never_exceeded(seed):
    rng = np.random.default_rng(200 + seed)
    L = int(rng.integers(2, 6))
    n_ff = rng.integers(20, 120, size=L).tolist()
    freqs = _rand_freqs(rng, n_ff, L)
    nbs = rng.integers(1, 5, size=L).tolist() if seed % 2 else int(rng.integers(1, 50))
    per = [nbs] * L if np.ndim(nbs) == 0 else nbs
    total = sum(n * b for n, b in zip(n_ff, per))
    batch = int(rng.integers(1, 17))
    min_hot = int(rng.integers(0, 60))
    for frac in (0.05, 0.33, 0.8, 0.999):
        budget = int(frac * total)
        p = placement.solve(freqs, nbs, budget, batch=batch, min_hot_per_split_layer=min_hot)
        _check_feasible(p, freqs, nbs, budget, min_hot)
        assert p.batch == batch and p.min_hot_per_split_layer == min_hot


def test_per_layer_neuron_bytes_and_prefix_shape():
    freqs = [np.linspace(1, 0, 10), np.linspace(1, 0, 10)]
    # Layer 1 neurons cost 4x more: at equal frequency the solver prefers layer 0.
    p = placement.solve(freqs, [1, 4], 12, batch=1, mip_rel_gap=0.0)
    assert p.bytes_used <= 12
    assert p.hot_counts[0] >= 8
    np.testing.assert_array_equal(p.hot_indices[0], np.arange(p.hot_counts[0]))  # hottest first


def test_fast_paths():
    freqs = [np.array([3.0, 1.0, 2.0]), np.array([0.5, 0.25])]
    full = placement.solve(freqs, 10, 50)
    assert full.method == "all_fit" and full.status == "optimal" and full.mip_gap == 0
    assert full.hot_counts == (3, 2) and full.objective == pytest.approx(6.75)
    for budget in (0, 9):
        empty = placement.solve(freqs, 10, budget)
        assert empty.method == "empty" and empty.hot_counts == (0, 0) and empty.objective == 0
        assert empty.bytes_used == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget_bytes=-1), "budget_bytes must be >= 0"),
    (dict(frequencies=[np.array([1.0, np.nan])]), r"frequencies\[0\] contains NaN"),
    (dict(frequencies=[np.ones(3), np.array([1.0, -2.0])]), r"frequencies\[1\] contains negative"),
    (dict(frequencies=[]), "non-empty list"),
    (dict(frequencies=[np.ones((2, 2))]), "1-D"),
    (dict(batch=0), "batch must be an integer >= 1"),
    (dict(neuron_bytes=0), "neuron_bytes must be > 0"),
    (dict(neuron_bytes=-3), "neuron_bytes must be > 0"),
    (dict(neuron_bytes=[1, 2, 3]), "neuron_bytes has 3 entries for 1 layers"),
    (dict(min_hot_per_split_layer=-1), "min_hot_per_split_layer must be"),
    (dict(time_limit_s=0), "time_limit_s must be > 0"),
])
def test_input_errors(kwargs, match):
    args = dict(frequencies=[np.ones(4)], neuron_bytes=2, budget_bytes=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        placement.solve(**args)


def test_json_round_trip():
    rng = np.random.default_rng(7)
    freqs = _rand_freqs(rng, [40, 33, 50], 3)
    p = placement.solve(freqs, [2, 3, 2], 120, batch=4, min_hot_per_split_layer=6)
    q = placement.Placement.from_json(p.to_json())
    assert q == p
    assert q.hot_counts == p.hot_counts and q.bytes_used == p.bytes_used
    for a, b in zip(p.hot_indices, q.hot_indices):
        assert b.dtype == np.int32
        np.testing.assert_array_equal(a, b)
    masks = q.masks()
    assert [m.sum() for m in masks] == list(q.hot_counts)
    with pytest.raises(Exception):
        p.batch = 3  # frozen
    with pytest.raises(ValueError, match="sorted, unique"):
        d = p.to_dict()
        d["hot_indices"][0] = [5, 5]
        placement.Placement.from_dict(d)


def test_time_limited_solve_returns_feasible_placement():
    rng = np.random.default_rng(3)
    freqs = [rng.pareto(1.5, 2048) for _ in range(8)]
    budget = int(0.25 * 8 * 2048)
    p = placement.solve(freqs, 1, budget, batch=2, min_hot_per_split_layer=300,
                        time_limit_s=0.05, mip_rel_gap=0.0)
    _check_feasible(p, freqs, 1, budget, 300)
    assert p.status in ("time_limit", "optimal")
    assert p.objective > 0
    if p.status == "time_limit":
        assert p.mip_gap is not None and p.mip_gap >= 0


def test_min_hot_from_costs():
    # t_fixed 100 us, saving (50 - 5) ns per active neuron at 10% activation -> ceil(22222.2)
    assert placement.min_hot_from_costs(100e-6, 50e-9, 5e-9, 0.1) == 22223
    assert placement.min_hot_from_costs(0.0, 2e-9, 1e-9, 0.5) == 0
    assert placement.min_hot_from_costs(4e-6, 2e-9, 1e-9, 0.5) == 8000  # exact ratio stays exact
    with pytest.raises(ValueError, match="not faster"):
        placement.min_hot_from_costs(1e-6, 1e-9, 2e-9, 0.1)
    with pytest.raises(ValueError, match="mean_activation_rate"):
        placement.min_hot_from_costs(1e-6, 2e-9, 1e-9, 0.0)

"""Offline neuron placement: which FFN neurons live on the device (PowerInfer's ILP, made live).

Given per-layer activation frequencies from the profiler, choose a set of "hot" FFN neurons to keep
on the accelerator so that the activation mass served there is maximal, subject to

* the byte budget left for FFN neurons (everything else is accounted for elsewhere), and
* the *communication constraint*: a layer either keeps no neuron on the device, or at least
  ``min_hot_per_split_layer`` of them (or all of them).

Formulation (a MILP in CVXPY, solved by HiGHS). Within each layer neurons are sorted by frequency,
descending, and grouped into batches of ``batch`` neurons (the last one may be partial; its size,
bytes and mass are those of its real neurons). Binary ``x[l, b]``: batch b of layer l is on the
device; binary ``y[l]``: layer l is split (has hot neurons)::

    maximise   sum_{l,b} mass[l,b] * x[l,b]
    subject to sum_{l,b} bytes[l,b] * x[l,b] <= budget
               sum_b size[l,b] * x[l,b] >= C_l * y[l]          (communication)
               x[l,b] <= y[l]
               x[l,b] >= x[l,b+1]   for consecutive *full* batches (hot batches form a prefix)
               x[l,b] >= y[l]       for the first batches any split layer must hold (a valid cut)

The prefix constraint is without loss of generality: full batches of a layer all cost the same and
are sorted by mass, so any solution can swap a chosen full batch for an earlier unchosen one without
changing bytes or counts. It is *not* imposed on the partial tail batch, which costs less than a
full one; so the MILP optimum equals the optimum over all 0/1 vectors ``x``. With these rows HiGHS
solves a LLaMA-7B-sized instance (32 x 172 batches of 64) to optimality in about a second on two
cores (benchmarks/bench_placement.py).

``C_l = min(min_hot_per_split_layer, n_ff_l)``: when the minimum exceeds a layer's width, that layer
is all-or-nothing (every neuron on the device, or none).

Solver behaviour. ``time_limit_s`` goes to HiGHS (building the model is not counted, and HiGHS's
presolve reads the clock only now and then: on models with 10k+ binaries it was seen to overrun by
seconds). On a time limit the best incumbent is returned; a cheap greedy incumbent that respects the
communication constraint is built first and returned instead when HiGHS has none or a worse one
(``method`` says which). ``mip_gap`` is the relative gap of the returned placement against the best
upper bound known: HiGHS's dual bound, or an LP bound computed here when HiGHS stopped without one.
``mip_rel_gap`` (HiGHS's default 1e-4) is the stopping rule; pass 0 to prove optimality.

Choosing ``min_hot_per_split_layer`` from measured costs. For a split layer, merging the host part
into the device part costs a fixed overhead ``t_fixed`` per layer per token (callback launch +
synchronisation + copying a d-vector between host and device), whatever the split. Putting k neurons
on the device saves about ``k * f_mean * (t_host - t_device)`` per token, where ``f_mean`` is the
mean activation rate of those neurons and ``t_host``/``t_device`` are the per-neuron costs of an
active neuron's rows (gate/up/down) on each side. A split only pays when the saving exceeds the
overhead::

    min_hot ~= t_fixed / (f_mean * (t_host - t_device))

:func:`min_hot_from_costs` computes this. Use the mean rate of the neurons you would put on the
device (the hottest ones), not the layer mean, unless you want a conservative (larger) value. A
layer placed wholly on the device needs no merge, so the constraint never forbids that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
import warnings
from typing import Any, Sequence

import numpy as np

__all__ = [
    "Placement",
    "solve",
    "greedy_hottest",
    "min_hot_from_costs",
]

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class Placement:
    """Which neurons of each FFN layer are on the device, and how the choice was made."""

    # eq=False: the generated __eq__ would compare numpy arrays inside tuples (ambiguous truth
    # value); equality is defined on the serialised form instead, and instances are unhashable.

    hot_indices: tuple[np.ndarray, ...]  # per layer, sorted unique np.int32 neuron ids on device
    n_ff: tuple[int, ...]  # per layer FFN width (so masks can be rebuilt from the indices)
    neuron_bytes: tuple[int, ...]  # per layer device bytes of one neuron
    budget_bytes: int
    batch: int
    min_hot_per_split_layer: int
    objective: float  # activation mass on device: sum of frequencies of the hot neurons
    total_mass: float  # sum of all frequencies (objective / total_mass = fraction served on device)
    mip_gap: float | None  # relative gap of the returned solution; None when unknown
    solve_time_s: float  # wall time of the whole call, model building included
    status: str  # "optimal", "optimal_inaccurate", "time_limit", "solver_error", "heuristic"
    method: str  # "milp", "all_fit", "empty", "greedy" or "fallback_heuristic"

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    @property
    def hot_counts(self) -> tuple[int, ...]:
        """Number of hot neurons per layer."""
        return tuple(int(h.size) for h in self.hot_indices)

    @property
    def bytes_used(self) -> int:
        """Device bytes taken by the hot neurons."""
        return int(sum(c * nb for c, nb in zip(self.hot_counts, self.neuron_bytes)))

    @property
    def num_layers(self) -> int:
        """Number of FFN layers."""
        return len(self.hot_indices)

    @property
    def split_layers(self) -> tuple[int, ...]:
        """Layers with some but not all neurons on the device (these pay the merge overhead)."""
        return tuple(l for l, (c, n) in enumerate(zip(self.hot_counts, self.n_ff)) if 0 < c < n)

    def masks(self) -> list[np.ndarray]:
        """Per-layer boolean masks over n_ff (PowerInfer's ``gpu_idx``)."""
        out = []
        for idx, n in zip(self.hot_indices, self.n_ff):
            m = np.zeros(n, dtype=bool)
            m[idx] = True
            out.append(m)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (index arrays as lists of ints)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["hot_indices"] = [h.tolist() for h in self.hot_indices]
        d["n_ff"] = list(self.n_ff)
        d["neuron_bytes"] = list(self.neuron_bytes)
        d["hot_counts"] = list(self.hot_counts)  # redundant, for people reading the file
        d["bytes_used"] = self.bytes_used
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Placement":
        """Inverse of :meth:`to_dict` (accepts lists or arrays for the indices)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["hot_indices"] = tuple(_frozen_idx(np.asarray(h, np.int64)) for h in d["hot_indices"])
        kw["n_ff"] = tuple(int(n) for n in d["n_ff"])
        kw["neuron_bytes"] = tuple(int(n) for n in d["neuron_bytes"])
        kw["mip_gap"] = None if d.get("mip_gap") is None else float(d["mip_gap"])
        p = cls(**kw)
        for h, n in zip(p.hot_indices, p.n_ff):
            if h.size and (h[0] < 0 or h[-1] >= n or np.any(np.diff(h) <= 0)):
                raise ValueError("hot_indices must be sorted, unique and within [0, n_ff)")
        return p

    def to_json(self, **kwargs: Any) -> str:
        """Serialise to a JSON string."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, s: str) -> "Placement":
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(s))


def min_hot_from_costs(
    t_fixed_s: float,
    t_host_per_neuron_s: float,
    t_device_per_neuron_s: float,
    mean_activation_rate: float,
) -> int:
    """Smallest hot-neuron count per split layer whose saving pays the fixed merge overhead."""
    for name, v in (("t_fixed_s", t_fixed_s), ("t_host_per_neuron_s", t_host_per_neuron_s),
                    ("t_device_per_neuron_s", t_device_per_neuron_s)):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {v}")
    if not (0 < mean_activation_rate <= 1):
        raise ValueError(f"mean_activation_rate must be in (0, 1], got {mean_activation_rate}")
    saving = mean_activation_rate * (t_host_per_neuron_s - t_device_per_neuron_s)
    if saving <= 0:
        # No split can ever pay; the caller should not place FFN neurons on the device at all.
        raise ValueError(
            "the device is not faster per neuron than the host (t_host_per_neuron_s <= "
            "t_device_per_neuron_s): placing neurons on the device never pays")
    return int(math.ceil(t_fixed_s / saving - 1e-12))  # tolerance: exact ratios stay exact


# ----------------------------------------------------------------------------- input handling


def _frozen_idx(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.int32)
    a.setflags(write=False)  # the dataclass is frozen; keep its arrays from changing under it
    return a


def _check_inputs(frequencies, neuron_bytes, budget_bytes, batch=1, min_hot=0, time_limit_s=1.0):
    """Validate and normalise inputs; returns (freqs, per-layer bytes, budget)."""
    if isinstance(frequencies, np.ndarray) and frequencies.ndim == 2:
        frequencies = list(frequencies)
    if not isinstance(frequencies, (list, tuple)) or len(frequencies) == 0:
        raise ValueError("frequencies must be a non-empty list of per-layer 1-D arrays")
    freqs = []
    for l, f in enumerate(frequencies):
        f = np.asarray(f, dtype=np.float64)
        if f.ndim != 1 or f.size == 0:
            raise ValueError(f"frequencies[{l}] must be a non-empty 1-D array, got shape {f.shape}")
        if not np.all(np.isfinite(f)):
            raise ValueError(f"frequencies[{l}] contains NaN or inf")
        if np.any(f < 0):
            raise ValueError(f"frequencies[{l}] contains negative values")
        freqs.append(f)
    L = len(freqs)

    if np.ndim(neuron_bytes) == 0:
        nbs = [neuron_bytes] * L
    else:
        nbs = list(neuron_bytes)
        if len(nbs) != L:
            raise ValueError(f"neuron_bytes has {len(nbs)} entries for {L} layers")
    out_nb = []
    for v in nbs:
        if isinstance(v, (bool, np.bool_)) or not float(v).is_integer():
            raise ValueError(f"neuron_bytes must be positive integers, got {v!r}")
        if v <= 0:
            raise ValueError(f"neuron_bytes must be > 0, got {v!r}")
        out_nb.append(int(v))

    if budget_bytes is None or not math.isfinite(float(budget_bytes)):
        raise ValueError(f"budget_bytes must be a finite number, got {budget_bytes!r}")
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes!r}")
    if int(batch) != batch or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    if int(min_hot) != min_hot or min_hot < 0:
        raise ValueError(f"min_hot_per_split_layer must be an integer >= 0, got {min_hot!r}")
    if not (time_limit_s > 0):
        raise ValueError(f"time_limit_s must be > 0, got {time_limit_s!r}")
    return freqs, out_nb, int(math.floor(budget_bytes))


# ----------------------------------------------------------------------------- batch model


@dataclasses.dataclass
class _Batches:
    """Flattened batch model of all layers (arrays over all batches, layer-major)."""

    order: list[np.ndarray]  # per layer, neuron ids sorted by frequency descending
    layer: np.ndarray  # layer of each batch
    pos: np.ndarray  # position of each batch within its layer
    size: np.ndarray  # neurons in each batch
    mass: np.ndarray  # sum of frequencies in each batch
    cost: np.ndarray  # bytes of each batch in units of `unit`
    unit: int  # gcd of neuron_bytes: integer costs make the budget row exact
    first: np.ndarray  # index of each layer's first batch in the flat arrays
    n_full: np.ndarray  # full batches per layer
    min_hot: np.ndarray  # effective C_l = min(min_hot, n_ff_l)
    must: np.ndarray  # batches per layer that any split layer must hold (for the cut)


def _build_batches(freqs, nbs, batch, min_hot) -> _Batches:
    unit = math.gcd(*nbs)
    order, layer, pos, size, mass, cost, first, n_full, c_eff, must = ([] for _ in range(10))
    start = 0
    for l, f in enumerate(freqs):
        o = np.argsort(-f, kind="stable")  # stable: ties keep id order, results are deterministic
        order.append(o)
        n = f.size
        nb = -(-n // batch)
        sz = np.full(nb, batch, dtype=np.int64)
        sz[-1] = n - batch * (nb - 1)
        fs = f[o]
        m = np.add.reduceat(fs, np.arange(0, n, batch))
        first.append(start)
        start += nb
        layer.append(np.full(nb, l))
        pos.append(np.arange(nb))
        size.append(sz)
        mass.append(m)
        cost.append(sz * (nbs[l] // unit))
        full = n // batch
        n_full.append(full)
        c = min(min_hot, n)
        c_eff.append(c)
        # A split layer holds a prefix of full batches plus maybe the tail, so it needs at least
        # ceil((C - tail)/batch) full batches. Each of those equals y[l]: a valid, tightening cut.
        tail = n - full * batch
        must.append(min(full, -(-max(c - tail, 0) // batch)))
    cat = np.concatenate
    return _Batches(order, cat(layer), cat(pos), cat(size), cat(mass).astype(np.float64),
                    cat(cost), unit, np.asarray(first), np.asarray(n_full),
                    np.asarray(c_eff), np.asarray(must))


def _feasible(bm: _Batches, x: np.ndarray, budget_units: int) -> bool:
    """Exact integer check of the budget and communication constraints."""
    if int(bm.cost @ x) > budget_units:
        return False
    counts = np.bincount(bm.layer, weights=bm.size * x, minlength=len(bm.order)).astype(np.int64)
    return bool(np.all((counts == 0) | (counts >= bm.min_hot)))


def _heuristic(bm: _Batches, budget_units: int) -> np.ndarray:
    """Feasible incumbent: per layer, a mandatory block then batches, taken by mass per byte."""
    L = len(bm.order)
    items = []  # (density, layer, rank within layer, batch indices)
    for l in range(L):
        lo = bm.first[l]
        hi = bm.first[l + 1] if l + 1 < L else bm.layer.size
        # Smallest prefix that satisfies the communication constraint forms one block.
        csz = np.cumsum(bm.size[lo:hi])
        k = int(np.searchsorted(csz, bm.min_hot[l])) + 1 if bm.min_hot[l] > 0 else 1
        groups = [np.arange(lo, lo + k)] + [np.array([b]) for b in range(lo + k, hi)]
        for r, g in enumerate(groups):
            items.append((bm.mass[g].sum() / bm.cost[g].sum(), l, r, g))
    # Within a layer density never increases along the prefix, so sorting keeps prefixes in order.
    items.sort(key=lambda t: (-t[0], t[1], t[2]))
    x = np.zeros(bm.layer.size, dtype=np.int64)
    next_rank = np.zeros(L, dtype=np.int64)
    left = budget_units
    for _, l, r, g in items:
        if r != next_rank[l]:
            continue  # an earlier item of this layer was skipped: keep the prefix
        c = int(bm.cost[g].sum())
        if c <= left:
            x[g] = 1
            left -= c
            next_rank[l] += 1
        else:
            next_rank[l] = -1  # full batches cost the same: later ones of this layer won't fit
    return x


def _placement_from_x(bm, x, freqs, nbs, budget, batch, min_hot, **kw) -> Placement:
    hot = []
    for l, o in enumerate(bm.order):
        sel = np.flatnonzero(x[bm.layer == l])
        parts = [o[p * batch:(p + 1) * batch] for p in sel]
        hot.append(_frozen_idx(np.sort(np.concatenate(parts)) if parts else np.array([], np.int64)))
    obj = float(sum(f[h].sum() for f, h in zip(freqs, hot)))
    return Placement(tuple(hot), tuple(f.size for f in freqs), tuple(nbs), budget, batch, min_hot,
                     objective=obj, total_mass=float(sum(f.sum() for f in freqs)), **kw)


def _trivial(freqs, nbs, budget, batch, min_hot, t0, everything: bool, method: str) -> Placement:
    hot = tuple(_frozen_idx(np.arange(f.size if everything else 0)) for f in freqs)
    total = float(sum(f.sum() for f in freqs))
    return Placement(hot, tuple(f.size for f in freqs), tuple(nbs), budget, batch, min_hot,
                     objective=total if everything else 0.0, total_mass=total, mip_gap=0.0,
                     solve_time_s=time.perf_counter() - t0, status="optimal", method=method)


# ----------------------------------------------------------------------------- public API


def solve(
    frequencies: Sequence[np.ndarray],
    neuron_bytes: int | Sequence[int],
    budget_bytes: int,
    batch: int = 64,
    min_hot_per_split_layer: int = 0,
    time_limit_s: float = 30.0,
    mip_rel_gap: float = 1e-4,
    verbose: bool = False,
    highs_options: dict[str, Any] | None = None,
) -> Placement:
    """Choose the device-resident FFN neurons by MILP (HiGHS); returns the best placement found."""
    t0 = time.perf_counter()
    freqs, nbs, budget = _check_inputs(frequencies, neuron_bytes, budget_bytes, batch,
                                       min_hot_per_split_layer, time_limit_s)
    if not (0 <= mip_rel_gap < 1):
        raise ValueError(f"mip_rel_gap must be in [0, 1), got {mip_rel_gap!r}")
    batch, min_hot = int(batch), int(min_hot_per_split_layer)
    args = (freqs, nbs, budget, batch, min_hot)

    # Fast paths: the solver is not needed (and both answers are provably optimal).
    if sum(f.size * nb for f, nb in zip(freqs, nbs)) <= budget:
        return _trivial(*args, t0, everything=True, method="all_fit")
    if budget < min(nbs):
        return _trivial(*args, t0, everything=False, method="empty")

    bm = _build_batches(freqs, nbs, batch, min_hot)
    budget_units = budget // bm.unit
    x_heur = _heuristic(bm, budget_units)
    # Scale so the largest batch mass is 1, whether the profiler gave counts (~1e6) or rates
    # (~0.1): HiGHS's tolerances are absolute (dual feasibility 1e-7), and normalising to total
    # mass 1 instead made batch masses ~1e-4 and let it call nearly tied solutions optimal.
    top = bm.mass.max()
    scale = 1.0 / top if top > 0 else 1.0

    try:
        x_mip, status, bound = _solve_milp(bm, budget_units, mass=bm.mass * scale,
                                           time_limit_s=time_limit_s, mip_rel_gap=mip_rel_gap,
                                           verbose=verbose, highs_options=highs_options)
    except ImportError as err:  # e.g. a GPU machine without cvxpy: the greedy placement still works
        _log.warning("placement: no MILP solver (%s); using the greedy heuristic", err)
        x_mip, status, bound = None, "no_solver", None
    if x_mip is not None and not _feasible(bm, x_mip, budget_units):
        # Rounded solver output should always be feasible (integer costs); never trust it blindly.
        _log.warning("placement: solver solution violates constraints after rounding; discarded")
        x_mip = None
    if x_mip is None:
        x, method = x_heur, "fallback_heuristic"
        if status != "time_limit":
            _log.warning("placement: MILP failed (%s); returning the heuristic placement", status)
    elif bm.mass @ x_heur > bm.mass @ x_mip:  # possible only when stopped early
        x, method = x_heur, "milp+heuristic"
    else:
        x, method = x_mip, "milp"

    # Gap of the returned solution against the best upper bound we know: HiGHS's dual bound, or
    # an LP bound of our own (_knapsack_bound) when HiGHS stopped before it had one.
    ub = _knapsack_bound(bm, budget_units) * scale
    if bound is not None:
        ub = min(ub, bound)
    obj = float(bm.mass @ x) * scale
    gap = max(0.0, ub - obj) / obj if obj > 0 else (0.0 if ub <= 0 else None)
    return _placement_from_x(bm, x, *args, mip_gap=gap, solve_time_s=time.perf_counter() - t0,
                             status=status, method=method)


def _knapsack_bound(bm: _Batches, budget_units: int) -> float:
    """Upper bound on the objective: the LP relaxation of a precedence-constrained knapsack."""
    # Items: each layer's mandatory block (its first `must` full batches, all-or-nothing for a
    # split layer) and every other batch. Densities never increase along a layer's chain (the
    # block holds the hottest batches, the partial tail the coldest neurons), so the fractional
    # greedy by density respects precedence and solves that LP exactly. Any MILP solution is
    # feasible for it, so it bounds the MILP from above.
    in_block = bm.pos < bm.must[bm.layer]
    key = np.where(in_block, -1 - bm.layer, np.arange(bm.layer.size))  # block -> one item
    _, item = np.unique(key, return_inverse=True)
    mass = np.bincount(item, weights=bm.mass)
    cost = np.bincount(item, weights=bm.cost.astype(np.float64))
    dens = mass / cost
    o = np.argsort(-dens, kind="stable")
    csum = np.cumsum(cost[o])
    k = int(np.searchsorted(csum, budget_units, side="right"))  # items that fit entirely
    val = float(mass[o[:k]].sum())
    if k < o.size:
        val += float(dens[o[k]]) * (budget_units - (float(csum[k - 1]) if k else 0.0))
    return val


@contextlib.contextmanager
def _stdout_silenced():
    """Sends file descriptor 1 to /dev/null for the block: HiGHS prints its banner from C++ even when
    not verbose, which would land in the middle of a CLI's generated text."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _solve_milp(bm: _Batches, budget_units: int, mass: np.ndarray, time_limit_s: float,
                mip_rel_gap: float, verbose: bool, highs_options: dict[str, Any] | None = None):
    """Build and solve the MILP; returns (x or None, status, upper bound or None), scaled."""
    import cvxpy as cp
    import scipy.sparse as sp

    nb, L = bm.layer.size, len(bm.order)
    x = cp.Variable(nb, boolean=True)
    y = cp.Variable(L, boolean=True)
    E = sp.csr_matrix((np.ones(nb), (np.arange(nb), bm.layer)), shape=(nb, L))  # batch -> layer
    S = sp.csr_matrix((bm.size.astype(np.float64), (bm.layer, np.arange(nb))), shape=(L, nb))
    cons = [bm.cost.astype(np.float64) @ x <= budget_units]
    # Prefix order among full batches: x[b] >= x[b+1] when both are full batches of one layer.
    nxt = np.flatnonzero((bm.pos[:-1] + 1 < bm.n_full[bm.layer[:-1]])
                         & (bm.layer[:-1] == bm.layer[1:]))
    if nxt.size:
        cons.append(x[nxt] >= x[nxt + 1])
    if np.any(bm.min_hot > 0):
        # x <= y is implied by the prefix order for all but the first and tail batches, and the
        # cut below needs only its last row; yet HiGHS solved the fully written-out rows several
        # times faster on LLaMA-7B-sized instances at batch 16-32 (measured; kept for that reason).
        cons.append(x <= E @ y)
        cons.append(S @ x >= cp.multiply(bm.min_hot.astype(np.float64), y))
        # Valid cut: a split layer holds at least its first `must` full batches (see _Batches).
        req = np.flatnonzero(bm.pos < bm.must[bm.layer])
        if req.size:
            cons.append(x[req] >= E[req] @ y)
    prob = cp.Problem(cp.Maximize(mass @ x), cons)
    try:
        with warnings.catch_warnings():
            # cvxpy warns "may be inaccurate" on a time limit; the status is reported instead.
            warnings.simplefilter("ignore", UserWarning)
            with contextlib.nullcontext() if verbose else _stdout_silenced():
                prob.solve(solver=cp.HIGHS, verbose=verbose, time_limit=float(time_limit_s),
                           mip_rel_gap=float(mip_rel_gap), mip_abs_gap=0.0, **(highs_options or {}))
    except cp.error.SolverError as e:
        _log.warning("placement: HiGHS raised %s", e)
        return None, "solver_error", None

    info = prob.solver_stats.extra_stats if prob.solver_stats is not None else None
    status = {cp.OPTIMAL: "optimal", cp.OPTIMAL_INACCURATE: "optimal_inaccurate",
              cp.USER_LIMIT: "time_limit"}.get(prob.status, prob.status or "unknown")
    # HiGHS minimises -mass @ x; its dual bound is therefore minus our upper bound.
    bound = None
    if info is not None and math.isfinite(getattr(info, "mip_dual_bound", math.inf)):
        bound = -float(info.mip_dual_bound)
    has_solution = (
        prob.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE, cp.USER_LIMIT)
        and x.value is not None
        # On a time limit without incumbent HiGHS still returns a vector (2 = feasible solution).
        and (info is None or int(getattr(info, "primal_solution_status", 2)) == 2)
    )
    if not has_solution:
        return None, status, bound
    return np.rint(x.value).astype(np.int64), status, bound


def greedy_hottest(
    frequencies: Sequence[np.ndarray],
    neuron_bytes: int | Sequence[int],
    budget_bytes: int,
) -> Placement:
    """Reference: globally hottest neurons first until the budget is full (no communication rule)"""
    t0 = time.perf_counter()
    freqs, nbs, budget = _check_inputs(frequencies, neuron_bytes, budget_bytes)
    lay = np.concatenate([np.full(f.size, l) for l, f in enumerate(freqs)])
    ids = np.concatenate([np.arange(f.size) for f in freqs])
    allf = np.concatenate(freqs)
    order = np.lexsort((ids, lay, -allf))  # hottest first; ties by (layer, id) for determinism
    cost = np.asarray(nbs, dtype=np.int64)[lay[order]]
    if np.all(cost == cost[0]):
        take = order[: min(budget // int(cost[0]), order.size)]
    else:
        # Per-layer byte costs: fill hottest first, skipping neurons that no longer fit.
        keep, left = [], budget
        for i, c in zip(order, cost):
            if c <= left:
                keep.append(i)
                left -= int(c)
        take = np.asarray(keep, dtype=np.int64)
    hot = tuple(_frozen_idx(np.sort(ids[take][lay[take] == l])) for l in range(len(freqs)))
    return Placement(hot, tuple(f.size for f in freqs), tuple(nbs), budget, 1, 0,
                     objective=float(sum(f[h].sum() for f, h in zip(freqs, hot))),
                     total_mass=float(allf.sum()), mip_gap=None,
                     solve_time_s=time.perf_counter() - t0, status="heuristic", method="greedy")

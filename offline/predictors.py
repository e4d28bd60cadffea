"""Per-layer activation predictors (PowerInfer's ``fc2(relu(fc1 x))``): training, calibration, I/O.

Model. One predictor per FFN layer, no biases::

    logits = relu(x @ fc1) @ fc2        fc1 [d, r], fc2 [r, n_ff]
    neuron i predicted active  <=>  logits[i] >= threshold   (one scalar threshold per layer)

``x`` is the residual stream *before* the FFN norm, exactly what ``offline/profiler.py`` stores.
Compute is float32 whatever the storage dtype (XLA:CPU bf16 dots are several times slower).

Training (per layer, per rank). Deja Vu's recipe: weighted BCE (positives weight 1, negatives
``mean(y) + 0.005``; see ``_loss``), AdamW (lr 1e-3, wd 0.01), minibatch 1024, at most 20 epochs.
The inputs are divided by their per-feature RMS (no centring: there is no bias to absorb a mean),
which conditions the problem when a few residual dimensions are huge; the scale is folded back
into the rows of fc1 at the end, so the stored predictor takes the raw residual stream.
A held-out split (``holdout_frac``, default 10%) serves early stopping, threshold calibration and
the reported metrics.

Calibration. On the held-out split the threshold is the largest logit value that keeps recall
(macro over samples: total true positives / total positives) >= ``target_recall``; recall and the
number of predicted neurons both fall as the threshold rises, so that threshold predicts the fewest
neurons among those reaching the target. It is the k-th largest logit of the positives,
k = ceil(target_recall * positives).

Early stopping. After calibration recall equals the target by construction, so what an epoch can
improve is the *predicted-active fraction needed to reach that recall* (FIELD-NOTES: recall alone is
the wrong target). Training stops when the layer meets its quality target (below), or when that
fraction has not improved by ``min_delta`` (relative) for ``patience`` epochs, or at ``max_epochs``.
The best epoch's weights are kept.

Quality target of a layer: recall >= ``target_recall`` with predicted-active fraction <=
``max_pred_ratio`` x the true active fraction (held-out).

Rank rule (per layer, iterative)::

    active  = counts.sum() / (tokens * n_ff)          # mean active fraction, from the profile
    skew    = max(1, hot20_share / 0.2)               # 1 when uniform, up to 5 when the hottest 20%
                                                      #   of neurons carry all activations
    r0      = clip(pow2_round(rank_scale * n_ff * active / skew), min_rank, max_rank)
    attempt 1: train at r0.
      - misses the target      -> double r (capped at max_rank) and retrain, until it meets the target,
                                  r == max_rank, or max_attempts trainings were made;
      - meets it with a margin (ratio <= halve_margin * max_pred_ratio) on the *first* attempt
                               -> try r0 / 2 once (if >= min_rank) and keep it if it also meets.
    keep: the smallest rank that met the target; if none did, the attempt with the lowest
          predicted-active fraction.

More skewed layers get smaller ranks because their hot neurons are easy (nearly always on) and the
predictor only has to resolve the cold tail. rank_scale = 2 gives r0 = 1024 for a LLaMA-7B-sized
layer at 10% activity with a hot-20% share of 0.5 (PowerInfer ships r = 1024 there).

Budget. Predictors may take at most ``budget_fraction`` (default 10%) of the model's parameters.
Layers are trained in order and each layer's ``max_rank`` is the remaining budget split evenly over
the remaining layers, divided by the parameters per rank (d + n_ff), and capped at
min(d, n_ff // 2) (a larger width costs more than the FFN rows it saves). A layer that needs less
leaves the surplus to the later ones; the total can never exceed the budget.

Saved format (``save_predictors`` / ``load_predictors``), format version 1::

    out_dir/predictors.json   {"format": "powerinfer-jax-predictors", "format_version": 1,
                               "hidden_size", "intermediate_size", "num_layers", "dtype",
                               "model_params", "settings", "totals",
                               "layers": [{"layer", "rank", "threshold", "metrics"}, ...]}
    out_dir/arrays/           orbax-checkpoint (StandardCheckpointer) of
                               {"layer_000": {"fc1": [d, r], "fc2": [r, n_ff]}, ...}

Layer keys are zero-padded so that string order is numeric order. predictors.json is written last
(atomically), so a folder with it is complete.

PowerInfer export (``export_powerinfer``): one file per layer, ``activation_{l}.safetensors``, with
``fc1.weight`` [r, d] and ``fc2.weight`` [n_ff, r] (torch ``nn.Linear`` layout), the names PowerInfer's
converter reads from ``activation_{l}.pt``. Its loader counts the files of the folder to find the
number of layers, so the folder holds nothing else; each file's safetensors metadata records the
layer, rank and threshold. PowerInfer itself applies a fixed threshold of 0 (sigmoid >= 0.5): the
metrics ``recall_at_0`` / ``pred_frac_at_0`` say what it would get.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from offline.activation_stats import hot_share
from offline.profiler import load_counts, load_samples
from powerinfer_jax.errors import ArgumentError, PathNotFoundError, PowerInferError

__all__ = [
    "FORMAT_VERSION",
    "LayerPredictor",
    "PredictorParams",
    "Predictors",
    "ProfileError",
    "TrainSettings",
    "calibrate_threshold",
    "check_profile",
    "export_powerinfer",
    "initial_rank",
    "jsonable",
    "load_predictors",
    "markdown_table",
    "mask_metrics",
    "model_param_count",
    "predict_logits",
    "predict_mask",
    "report_rows",
    "save_predictors",
    "train_all",
    "train_layer",
]

_EVAL_CHUNK = 2048  # held-out rows per jitted logits call (fixed shape: one compile per rank)
_log = logging.getLogger(__name__)


class ProfileError(PowerInferError):
    """A profile folder that cannot train predictors (no samples, wrong shapes, too few rows)."""


# The runtime owns the predictor's definition (the engine applies it inside the decode step);
# training here produces exactly that pytree.
from powerinfer_jax.sparse_ffn import PredictorParams, predict_logits  # noqa: E402
# Reading predictors is the library's job (the engine loads them from bundles); training writes them.
from powerinfer_jax.predictor_store import (FORMAT, FORMAT_VERSION, LayerPredictor, Predictors,  # noqa: E402,F401
                                            load_predictors)
from powerinfer_jax.predictor_store import ARRAYS as _ARRAYS, META_JSON as _JSON  # noqa: E402


def predict_mask(p: PredictorParams, x: jax.Array, threshold) -> jax.Array:
    """Predicted active mask [..., n_ff] (logit >= threshold); jittable, threshold may be traced."""
    return predict_logits(p, x) >= jnp.asarray(threshold, jnp.float32)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Training, calibration, rank-search and budget knobs (defaults: Deja Vu + the rules above)."""

    target_recall: float = 0.95
    max_pred_ratio: float = 1.5  # quality target: predicted-active <= this x true-active
    max_epochs: int = 20
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.01
    holdout_frac: float = 0.1
    patience: int = 2  # epochs without a min_delta relative gain before stopping
    min_delta: float = 0.01
    stop_at_target: bool = True  # stop a run as soon as the layer meets its quality target
    rank_scale: float = 2.0
    min_rank: int = 16
    max_attempts: int = 4
    try_halve: bool = True
    halve_margin: float = 0.8  # halve r0 when the first run's ratio <= this x max_pred_ratio
    initial_rank: int | None = None  # force r0 (tests, experiments); still capped by max_rank
    budget_fraction: float = 0.10  # of the model's parameters; <= 0 disables the budget
    dtype: str = "float32"  # storage dtype of the saved weights: float32 | bfloat16 | float16
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# Calibration and metrics (numpy: run once per epoch on the held-out logits).


def calibrate_threshold(logits: np.ndarray, labels: np.ndarray, target_recall: float) -> float:
    """Largest threshold whose recall (total TP / total positives) is >= target_recall."""
    pos = np.asarray(logits, np.float32)[np.asarray(labels, bool)]
    if pos.size == 0:
        # Nothing fires here: predict nothing (recall is vacuously 1). Finite, so JSON keeps it.
        return float(np.max(logits)) + 1.0 if np.size(logits) else 0.0
    k = min(pos.size, max(1, math.ceil(target_recall * pos.size - 1e-9)))
    # The k-th largest positive logit: exactly k positives (more with ties) are >= it.
    return float(np.partition(pos, pos.size - k)[pos.size - k])


def metrics_from_counts(tp: int, positives: int, predicted: int, total: int) -> dict:
    """Recall, precision, true/predicted active fractions and their ratio from mask counts."""
    total = max(int(total), 1)
    true_frac, pred_frac = positives / total, predicted / total
    if positives:
        ratio = pred_frac / true_frac
    else:
        ratio = 0.0 if predicted == 0 else float("inf")
    return {"recall": tp / positives if positives else 1.0, "precision": tp / predicted if predicted else 1.0,
            "true_frac": true_frac, "pred_frac": pred_frac, "ratio": ratio}


def mask_metrics(logits: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """Recall, precision, true/predicted active fractions and their ratio at a threshold."""
    labels = np.asarray(labels, bool)
    pred = np.asarray(logits, np.float32) >= np.float32(threshold)
    return metrics_from_counts(int(np.count_nonzero(pred & labels)), int(np.count_nonzero(labels)),
                               int(np.count_nonzero(pred)), labels.size)


def _meets(m: dict, s: TrainSettings) -> bool:
    return m["recall"] >= s.target_recall - 1e-9 and m["ratio"] <= s.max_pred_ratio


# ----------------------------------------------------------------------------------------------
# Training.


def _loss(p: PredictorParams, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = predict_logits(p, x)
    # Deja Vu's positive-rate weighting. w = (share of positive entries in the batch) + 0.005 and
    # weight = y*(1-w) + w, so a positive entry weighs (1-w)+w = 1 and a negative weighs w (not
    # "positives 1-w": the formula is easy to misread). With activity p the positives carry total
    # weight ~p and the negatives ~(1-p)(p+0.005) ~ p: both classes count about equally, which moves
    # the boundary toward recall (a missed active neuron costs quality, a false positive only
    # compute). The +0.005 keeps negatives from vanishing on nearly dead layers.
    w = jnp.mean(y) + 0.005
    weight = y * (1.0 - w) + w
    return jnp.mean(weight * optax.sigmoid_binary_cross_entropy(logits, y))


@functools.lru_cache(maxsize=None)
def _optimizer(lr: float, wd: float) -> optax.GradientTransformation:
    # Cached so the jitted epoch (which closes over it) is traced once per (lr, wd, shapes).
    return optax.adamw(lr, weight_decay=wd)


@functools.lru_cache(maxsize=None)
def _epoch_fn(lr: float, wd: float):
    opt = _optimizer(lr, wd)

    @jax.jit
    def run_epoch(params, opt_state, x, y, batches):
        # One whole epoch in a single jitted scan: no per-step Python dispatch, which dominates
        # on CPU for small predictors. Minibatches are gathered on the device from index rows.
        def step(carry, idx):
            p, st = carry
            loss, g = jax.value_and_grad(_loss)(p, x[idx], y[idx].astype(jnp.float32))
            upd, st = opt.update(g, st, p)
            return (optax.apply_updates(p, upd), st), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batches)
        return params, opt_state, jnp.mean(losses)

    return run_epoch


_logits_jit = jax.jit(predict_logits)


def _heldout_logits(p: PredictorParams, x: np.ndarray) -> np.ndarray:
    """Logits of all held-out rows, in fixed-size padded chunks (one compile per rank)."""
    out = []
    for i in range(0, len(x), _EVAL_CHUNK):
        chunk = x[i : i + _EVAL_CHUNK]
        n = len(chunk)
        if n < _EVAL_CHUNK and len(x) > _EVAL_CHUNK:
            chunk = np.concatenate([chunk, np.zeros((_EVAL_CHUNK - n, x.shape[1]), x.dtype)])
        out.append(np.asarray(_logits_jit(p, chunk))[:n])
    return np.concatenate(out) if out else np.zeros((0, p.fc2.shape[1]), np.float32)


def _init_params(key: jax.Array, d: int, r: int, n_ff: int) -> PredictorParams:
    k1, k2 = jax.random.split(key)
    # He init for the ReLU layer (inputs are RMS-normalised), 1/sqrt(r) for the output layer.
    return PredictorParams(
        fc1=jax.random.normal(k1, (d, r), jnp.float32) * math.sqrt(2.0 / d),
        fc2=jax.random.normal(k2, (r, n_ff), jnp.float32) * math.sqrt(1.0 / r),
    )


def _fit(x_tr, y_tr, x_ho, y_ho, rank: int, s: TrainSettings, key: jax.Array, np_seed) -> dict:
    """Trains one predictor of a given rank (on RMS-scaled inputs) with early stopping."""
    n, d = x_tr.shape
    n_ff = y_tr.shape[1]
    params = _init_params(key, d, rank, n_ff)
    opt_state = _optimizer(s.lr, s.weight_decay).init(params)
    run_epoch = _epoch_fn(s.lr, s.weight_decay)
    bs = max(1, min(s.batch_size, n))
    nb = n // bs
    rng = np.random.default_rng(np_seed)
    xd, yd = jnp.asarray(x_tr), jnp.asarray(y_tr)
    best, best_score, stale, epochs, history = None, math.inf, 0, 0, []
    for epoch in range(s.max_epochs):
        # Drop the remainder of each shuffled epoch: fixed shapes, and every row is seen over epochs.
        batches = rng.permutation(n)[: nb * bs].reshape(nb, bs).astype(np.int32)
        params, opt_state, loss = run_epoch(params, opt_state, xd, yd, jnp.asarray(batches))
        logits = _heldout_logits(params, x_ho)
        m = mask_metrics(logits, y_ho, calibrate_threshold(logits, y_ho, s.target_recall))
        epochs = epoch + 1
        history.append({"epoch": epochs, "loss": float(loss), "pred_frac": m["pred_frac"]})
        # Keep the best epoch; only a gain of min_delta (relative) resets the patience counter.
        stale = 0 if m["pred_frac"] < best_score * (1.0 - s.min_delta) else stale + 1
        if best is None or m["pred_frac"] < best_score:
            best, best_score = (params, m), m["pred_frac"]
        if (s.stop_at_target and _meets(m, s)) or stale >= s.patience:
            break
    params, m = best
    return {"params": params, "metrics": m, "epochs": epochs, "history": history}


def initial_rank(n_ff: int, active_frac: float, hot20_share: float, s: TrainSettings, max_rank: int) -> int:
    """r0 = clip(pow2_round(rank_scale * n_ff * active / skew), min_rank, max_rank)."""
    if s.initial_rank is not None:
        return int(max(1, min(s.initial_rank, max_rank)))
    skew = max(1.0, hot20_share / 0.2)
    raw = max(1.0, s.rank_scale * n_ff * active_frac / skew)
    r = 2 ** int(round(math.log2(raw)))
    return int(min(max(r, min(s.min_rank, max_rank)), max_rank))


def _split(n: int, s: TrainSettings, layer: int) -> tuple[np.ndarray, np.ndarray]:
    n_ho = max(1, int(round(s.holdout_frac * n)))
    perm = np.random.default_rng([s.seed, layer]).permutation(n)
    return perm[n_ho:], perm[:n_ho]


def _cast(p: PredictorParams, dtype: str) -> PredictorParams:
    dt = jnp.dtype(dtype)
    return PredictorParams(fc1=jnp.asarray(p.fc1, dt), fc2=jnp.asarray(p.fc2, dt))


def train_layer(x: np.ndarray, y: np.ndarray, layer: int, r0: int, max_rank: int,
                s: TrainSettings = TrainSettings()) -> LayerPredictor:
    """Trains one layer with the iterative rank rule; returns the calibrated predictor."""
    x = np.asarray(x, np.float32)
    y = np.asarray(y, bool)
    if len(x) < 20:
        raise ProfileError(f"layer {layer}: {len(x)} samples, need at least 20 to train and hold out")
    t0 = time.perf_counter()
    tr, ho = _split(len(x), s, layer)
    # Per-feature RMS scaling (training only; folded into fc1 afterwards).
    inv_scale = (1.0 / (np.sqrt(np.mean(np.square(x[tr]), axis=0)) + 1e-6)).astype(np.float32)
    x_tr, y_tr = x[tr] * inv_scale, y[tr]
    x_ho, y_ho = x[ho] * inv_scale, y[ho]
    key = jax.random.fold_in(jax.random.key(s.seed), layer)

    attempts: list[dict] = []
    runs: dict[int, dict] = {}
    r, halving = r0, False
    while len(attempts) < s.max_attempts:
        run = _fit(x_tr, y_tr, x_ho, y_ho, r, s, jax.random.fold_in(key, r), [s.seed, layer, r])
        runs[r] = run
        met = _meets(run["metrics"], s)
        attempts.append({"rank": r, "recall": run["metrics"]["recall"], "ratio": _finite(run["metrics"]["ratio"]),
                         "pred_frac": run["metrics"]["pred_frac"], "meets_target": met, "epochs": run["epochs"]})
        _log.info("layer %d rank %d: recall %.4f ratio %.3f (%s, %d epochs)", layer, r,
                  run["metrics"]["recall"], run["metrics"]["ratio"], "meets" if met else "misses", run["epochs"])
        if halving:
            break  # the one r0/2 trial is done, whatever its outcome
        if met:
            smaller = r // 2
            if (s.try_halve and len(attempts) == 1 and smaller >= min(s.min_rank, r0)
                    and smaller not in runs and run["metrics"]["ratio"] <= s.halve_margin * s.max_pred_ratio):
                r, halving = smaller, True
                continue
            break
        if r >= max_rank:
            break
        r = min(2 * r, max_rank)
    met_ranks = [a["rank"] for a in attempts if a["meets_target"]]
    if met_ranks:
        best_r = min(met_ranks)
    else:
        best_r = min(runs, key=lambda k: (runs[k]["metrics"]["pred_frac"], k))
    run = runs[best_r]

    # Fold the input scale into fc1, cast to the storage dtype, then calibrate *that* predictor on
    # raw inputs: the threshold must match exactly what the engine will compute.
    p = run["params"]
    p = _cast(PredictorParams(fc1=p.fc1 * jnp.asarray(inv_scale)[:, None], fc2=p.fc2), s.dtype)
    logits = _heldout_logits(p, x[ho])
    thr = calibrate_threshold(logits, y_ho, s.target_recall)
    m = mask_metrics(logits, y_ho, thr)
    m0 = mask_metrics(logits, y_ho, 0.0)
    metrics = {
        **m,
        "ratio": _finite(m["ratio"]),
        "meets_target": _meets(m, s),
        "recall_at_0": m0["recall"],
        "pred_frac_at_0": m0["pred_frac"],
        "initial_rank": int(r0),
        "max_rank": int(max_rank),
        "epochs": run["epochs"],
        "attempts": attempts,
        "train_samples": int(len(tr)),
        "holdout_samples": int(len(ho)),
        "train_seconds": time.perf_counter() - t0,
    }
    return LayerPredictor(layer=layer, rank=int(best_r), threshold=thr, params=p, metrics=metrics)


def _dims(dims, profile_dir: str) -> tuple[int, int, int]:
    if dims is None:
        with open(os.path.join(profile_dir, "summary.json")) as f:
            sm = json.load(f)
        try:
            return int(sm["hidden"]), int(sm["n_ff"]), int(sm["layers"])
        except KeyError as err:
            raise ProfileError(f"{profile_dir}/summary.json lacks {err}; pass dims=(d, n_ff, layers)") from None
    if hasattr(dims, "hidden_size"):
        return int(dims.hidden_size), int(dims.intermediate_size), int(dims.num_layers)
    d, n_ff, n_layers = dims
    return int(d), int(n_ff), int(n_layers)


def check_profile(profile_dir: str, n_layers: int | None = None) -> None:
    """Raises a clear error when a profile folder is missing or has no predictor samples."""
    if not os.path.isdir(profile_dir):
        raise PathNotFoundError(f"profile folder not found: {profile_dir} (run bin/profile first)")
    for name in ("summary.json", "counts.npy"):
        if not os.path.isfile(os.path.join(profile_dir, name)):
            raise ProfileError(f"{profile_dir} is not a profile folder: {name} is missing (run bin/profile)")
    sdir = os.path.join(profile_dir, "samples")
    missing = [l for l in range(n_layers or 1)
               if not (os.path.isfile(os.path.join(sdir, f"x_{l:03d}.npy"))
                       and os.path.isfile(os.path.join(sdir, f"mask_{l:03d}.npy")))]
    if missing:
        raise ProfileError(f"profile {profile_dir} has no predictor samples for layer(s) {missing} in {sdir} "
                           "(run bin/profile with --max_samples > 0)")


def train_all(profile_dir: str, dims=None, settings: TrainSettings = TrainSettings(),
              model_params: int | None = None, progress: bool = False) -> tuple[Predictors, list[dict]]:
    """Trains every layer's predictor from a profile folder; returns (Predictors, report rows)."""
    profile_dir = os.path.abspath(profile_dir)
    check_profile(profile_dir)
    d, n_ff, n_layers = _dims(dims, profile_dir)
    check_profile(profile_dir, n_layers)
    counts, tokens = load_counts(profile_dir)
    if counts.shape != (n_layers, n_ff):
        raise ProfileError(f"counts.npy has shape {counts.shape}, expected {(n_layers, n_ff)} (layers, n_ff)")
    s = settings
    per_rank = d + n_ff
    structural = max(1, min(d, n_ff // 2))
    budget = None
    if s.budget_fraction and s.budget_fraction > 0 and model_params:
        budget = int(s.budget_fraction * model_params)
        if budget // n_layers < per_rank:
            raise ArgumentError(
                f"predictor budget too small: {s.budget_fraction:.1%} of {model_params:,} parameters is "
                f"{budget:,}, less than one rank per layer ({n_layers} x {per_rank:,})")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_layers, desc="predictors", unit="layer")
    layers, used = [], 0
    try:
        for l in range(n_layers):
            max_rank = structural
            if budget is not None:
                # An even share of the budget; what layers leave unused goes, in the second pass
                # below, to the layers that missed their target.
                max_rank = max(1, min(structural, budget // n_layers // per_rank))
            row = counts[l]
            active = float(row.sum() / max(tokens * n_ff, 1))
            r0 = initial_rank(n_ff, active, hot_share(row, 0.20), s, max_rank)
            x, y = load_samples(profile_dir, l, n_ff)
            if x.ndim != 2 or x.shape[1] != d or y.shape != (len(x), n_ff):
                raise ProfileError(f"layer {l} samples have shapes {x.shape}/{y.shape}, expected [N, {d}]/[N, {n_ff}]")
            lp = train_layer(x, y, l, r0, max_rank, s)
            lp.metrics["profile_active_frac"] = active
            layers.append(lp)
            used += lp.rank * per_rank
            if bar is not None:
                ratio = lp.metrics["ratio"]  # None when the layer never fires on the held-out split
                bar.set_postfix_str(f"L{l} r={lp.rank} recall={lp.metrics['recall']:.3f} "
                                    f"ratio={'inf' if ratio is None else f'{ratio:.2f}'}")
                bar.update(1)
        # Second pass: layers that missed their target (often the first, whose share was only an
        # even split) get what the others left of the budget, largest first.
        for i, lp in enumerate(layers):
            if lp.metrics.get("meets_target") or budget is None:
                continue
            spare = (budget - used) // per_rank
            new_rank = min(structural, lp.rank + spare, 2 * lp.rank)
            if new_rank <= lp.rank:
                continue
            x, y = load_samples(profile_dir, lp.layer, n_ff)
            retry = train_layer(x, y, lp.layer, new_rank, new_rank, s)
            better = retry.metrics.get("meets_target") or (retry.metrics.get("ratio") or np.inf) < (
                lp.metrics.get("ratio") or np.inf)
            if better:
                retry.metrics["profile_active_frac"] = lp.metrics.get("profile_active_frac")
                retry.metrics["second_pass"] = True
                used += (retry.rank - lp.rank) * per_rank
                layers[i] = retry
    finally:
        if bar is not None:
            bar.close()
    preds = Predictors(layers=tuple(layers), hidden_size=d, intermediate_size=n_ff, dtype=s.dtype,
                       model_params=int(model_params) if model_params else None,
                       settings=dataclasses.asdict(s))
    return preds, report_rows(preds)


def report_rows(preds: Predictors) -> list[dict]:
    """One JSON-safe dict per layer: rank, recall, precision, active fractions, ratio, size."""
    rows = []
    for lp in preds.layers:
        m = lp.metrics
        rows.append({
            "layer": lp.layer, "rank": lp.rank, "initial_rank": m.get("initial_rank"), "max_rank": m.get("max_rank"),
            "ranks_tried": [a["rank"] for a in m.get("attempts", [])],
            "threshold": lp.threshold, "recall": m["recall"], "precision": m["precision"],
            "true_active": m["true_frac"], "pred_active": m["pred_frac"], "ratio": m["ratio"],
            "meets_target": m["meets_target"], "recall_at_0": m.get("recall_at_0"),
            "pred_active_at_0": m.get("pred_frac_at_0"), "epochs": m.get("epochs"),
            "params": lp.rank * (preds.hidden_size + preds.intermediate_size),
            "bytes": int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(lp.params))),
        })
    return rows


# ----------------------------------------------------------------------------------------------
# Saving, loading, export.


def save_predictors(preds: Predictors, out_dir: str) -> str:
    """Writes arrays (orbax) and predictors.json into out_dir; returns its absolute path."""
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)  # orbax requires absolute paths
    os.makedirs(out_dir, exist_ok=True)
    tree = {f"layer_{lp.layer:03d}": {"fc1": lp.params.fc1, "fc2": lp.params.fc2} for lp in preds.layers}
    with ocp.StandardCheckpointer() as ckptr:  # the context manager waits for the async save
        ckptr.save(os.path.join(out_dir, _ARRAYS), tree, force=True)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hidden_size": preds.hidden_size,
        "intermediate_size": preds.intermediate_size,
        "num_layers": len(preds),
        "dtype": preds.dtype,
        "model_params": preds.model_params,
        "settings": preds.settings,
        "totals": preds.totals(),
        "layers": [{"layer": lp.layer, "rank": lp.rank, "threshold": lp.threshold, "metrics": lp.metrics}
                   for lp in preds.layers],
    }
    tmp = os.path.join(out_dir, _JSON + ".tmp")
    with open(tmp, "w") as f:
        json.dump(jsonable(meta), f, indent=2, allow_nan=False)
    os.replace(tmp, os.path.join(out_dir, _JSON))
    return out_dir


_EXPORT_NAME = re.compile(r"model_\d+\.pt|config\.json")


def export_powerinfer(preds: Predictors, out_dir: str, dtype: str = "float16") -> list[str]:
    """Writes the predictors as the reference system's predictor folder: per layer `model_<l>.pt`, a torch
    state dict {fc1.weight [r, d], fc2.weight [n_ff, r]} (its files are float16), and `config.json` with
    `sparse_threshold` (one for every layer: the lowest of ours, so no layer loses recall; PowerInfer
    compares the logits with it). `offline/powerinfer_import.py` reads such a folder back (tested)."""
    try:
        import torch
    except ImportError:
        raise ArgumentError("exporting PowerInfer's .pt files needs torch (not a dependency of powerinfer-jax): "
                            "pip install torch") from None
    if dtype not in ("float32", "float16"):
        raise ArgumentError(f"export dtype must be float32 or float16 (PowerInfer's converter), got {dtype!r}")
    os.makedirs(out_dir, exist_ok=True)
    # PowerInfer infers the layer count from the number of .pt files in the folder: refuse strangers.
    others = [n for n in os.listdir(out_dir) if not _EXPORT_NAME.fullmatch(n)]
    if others:
        raise ArgumentError(f"{out_dir} holds other files ({', '.join(sorted(others)[:5])}); PowerInfer counts the "
                         "files of its predictor folder, so export into an empty folder")
    paths = []
    tdtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
    for lp in preds.layers:
        state = {
            "fc1.weight": torch.from_numpy(np.ascontiguousarray(np.asarray(lp.params.fc1, np.float32).T)).to(tdtype),
            "fc2.weight": torch.from_numpy(np.ascontiguousarray(np.asarray(lp.params.fc2, np.float32).T)).to(tdtype),
        }
        path = os.path.join(out_dir, f"model_{lp.layer}.pt")
        torch.save(state, path)
        paths.append(path)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({"sparse_threshold": min(float(lp.threshold) for lp in preds.layers)}, f, indent=2)
    return paths


def model_param_count(model_dir: str) -> int:
    """Exact parameter count of an HF folder, from its safetensors headers (no tensor is read)."""
    if not os.path.isdir(model_dir):
        raise PathNotFoundError(f"model folder not found: {model_dir}")
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise PathNotFoundError(f"no *.safetensors in {model_dir}: cannot count the model's parameters")
    from powerinfer_jax.tensor_file import read_header

    total = 0
    for name in files:
        _, header = read_header(os.path.join(model_dir, name))  # checked: a corrupt header is one clear error
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return int(total)


# ----------------------------------------------------------------------------------------------


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def jsonable(obj: Any) -> Any:
    """A JSON-safe copy: numpy scalars -> Python, non-finite floats -> None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def markdown_table(rows: Sequence[dict], totals: dict | None = None) -> str:
    """Per-layer markdown table (rank, recall, precision, true/predicted active %, ratio) + totals."""
    lines = ["| layer | rank | tried | recall | precision | true active % | pred active % | ratio | target |",
             "|---:|---:|---|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        ratio = "inf" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['layer']} | {r['rank']} | {'/'.join(map(str, r['ranks_tried']))} | {r['recall']:.4f} | "
                     f"{r['precision']:.4f} | {100 * r['true_active']:.2f} | {100 * r['pred_active']:.2f} | "
                     f"{ratio} | {'yes' if r['meets_target'] else 'no'} |")
    if totals:
        frac = totals.get("fraction_of_model")
        budget = totals.get("budget_fraction")
        lines.append("")
        lines.append(f"total: {totals['predictor_params']:,} parameters, {totals['predictor_bytes']:,} bytes"
                     + (f", {100 * frac:.2f}% of the model's {totals['model_params']:,}" if frac is not None else "")
                     + (f" (budget {100 * budget:.1f}%: {'ok' if totals['within_budget'] else 'EXCEEDED'})"
                        if frac is not None and budget and budget > 0 else ""))
        lines.append(f"layers meeting the target: {totals['layers_meeting_target']}/{totals['num_layers']}")
    return "\n".join(lines)

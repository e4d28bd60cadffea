"""Trained predictors as the engine reads them: the per-layer weights, thresholds and metrics
that `offline/predictors.py` trains and writes (orbax arrays + predictors.json)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from powerinfer_jax.errors import BundleError, PathNotFoundError
from powerinfer_jax.sparse_ffn import PredictorParams

FORMAT = "powerinfer-jax-predictors"
FORMAT_VERSION = 1
META_JSON = "predictors.json"
ARRAYS = "arrays"


def mean_or_none(vals) -> float | None:
    """Mean of the values that are not None (None when there are none)."""
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


@dataclasses.dataclass(frozen=True, eq=False)
class LayerPredictor:
    """One trained layer: weights, rank, calibrated threshold and held-out metrics."""

    layer: int
    rank: int
    threshold: float
    params: PredictorParams
    metrics: dict  # JSON-safe: recall, precision, true_frac, pred_frac, ratio, attempts, ...


@dataclasses.dataclass(frozen=True, eq=False)
class Predictors:
    """All layers' predictors plus what they were trained for."""

    layers: tuple[LayerPredictor, ...]
    hidden_size: int
    intermediate_size: int
    dtype: str = "float32"
    model_params: int | None = None
    settings: dict | None = None

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def params(self) -> list[PredictorParams]:
        """Per-layer weight pytrees (pass to a jitted step)."""
        return [lp.params for lp in self.layers]

    @property
    def thresholds(self) -> np.ndarray:
        """Per-layer thresholds, float32 [L]."""
        return np.asarray([lp.threshold for lp in self.layers], np.float32)

    @property
    def ranks(self) -> list[int]:
        """Per-layer predictor widths r."""
        return [lp.rank for lp in self.layers]

    @property
    def num_params(self) -> int:
        """Total predictor parameters."""
        return sum(r * (self.hidden_size + self.intermediate_size) for r in self.ranks)

    @property
    def nbytes(self) -> int:
        """Total bytes of the stored weights."""
        return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self.params)))

    def totals(self) -> dict:
        """Totals for reports: parameters, bytes, share of the model, budget."""
        frac = self.num_params / self.model_params if self.model_params else None
        budget = (self.settings or {}).get("budget_fraction")
        return {
            "num_layers": len(self),
            "ranks": self.ranks,
            "predictor_params": self.num_params,
            "predictor_bytes": self.nbytes,
            "model_params": self.model_params,
            "fraction_of_model": frac,
            "budget_fraction": budget,
            "within_budget": None if frac is None or not budget or budget <= 0 else frac <= budget + 1e-12,
            "mean_recall": mean_or_none(lp.metrics.get("recall") for lp in self.layers),
            "mean_ratio": mean_or_none(lp.metrics.get("ratio") for lp in self.layers),
            "layers_meeting_target": sum(bool(lp.metrics.get("meets_target")) for lp in self.layers),
        }



def load_predictors(out_dir: str) -> Predictors:
    """Reads a folder written by save_predictors; a damaged one is a BundleError."""
    out_dir = os.path.abspath(out_dir)
    path = os.path.join(out_dir, META_JSON)
    if not os.path.isfile(path):
        raise PathNotFoundError(f"no {META_JSON} in {out_dir}: not a predictors folder (see bin/train_predictors)")
    try:
        with open(path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{path}: format {meta.get('format')!r} version {meta.get('format_version')!r}, "
                              f"this code reads {FORMAT!r} version {FORMAT_VERSION}")
        return _restore(out_dir, meta)
    except BundleError:
        raise
    except Exception as err:  # noqa: BLE001  (orbax/tensorstore raise plain Exception for damaged files)
        msg = " ".join(str(err).split())[:160]
        raise BundleError(f"the predictors in {out_dir} are damaged ({type(err).__name__}: {msg}); re-run "
                          "bin/prepare (or bin/train_predictors)") from None


def _restore(out_dir: str, meta: dict) -> Predictors:
    import orbax.checkpoint as ocp

    d, n_ff, dt = meta["hidden_size"], meta["intermediate_size"], jnp.dtype(meta["dtype"])
    # Name the target device: orbax refuses to restore onto another topology (a CPU-saved bundle
    # loaded on a GPU machine) unless the target tree carries the sharding to restore to.
    # A local device: in a multi-process run (powerinfer_jax.distributed) every process reads the
    # predictors on its own, with no barrier among processes.
    where = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = {f"layer_{e['layer']:03d}": {"fc1": jax.ShapeDtypeStruct((d, e["rank"]), dt, sharding=where),
                                          "fc2": jax.ShapeDtypeStruct((e["rank"], n_ff), dt, sharding=where)}
                for e in meta["layers"]}
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    with ocp.StandardCheckpointer(multiprocessing_options=alone) as ckptr:
        tree = ckptr.restore(os.path.join(out_dir, ARRAYS), abstract)
    layers = []
    for i, e in enumerate(meta["layers"]):
        t = tree[f"layer_{e['layer']:03d}"]
        if int(e["layer"]) != i or not np.isfinite(float(e["threshold"])) or not all(
                bool(jnp.isfinite(t[k]).all()) for k in ("fc1", "fc2")):
            raise BundleError(f"{out_dir}: layer {e['layer']}'s predictor is out of order or holds NaN/Inf; re-run "
                              "bin/prepare")
        layers.append(LayerPredictor(layer=int(e["layer"]), rank=int(e["rank"]), threshold=float(e["threshold"]),
                                     params=PredictorParams(fc1=t["fc1"], fc2=t["fc2"]), metrics=e["metrics"]))
    return Predictors(layers=tuple(layers), hidden_size=d, intermediate_size=n_ff, dtype=meta["dtype"],
                      model_params=meta.get("model_params"), settings=meta.get("settings"))

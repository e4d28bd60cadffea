"""Reading a prepared bundle: the library's side of what `bin/prepare` (offline/bundle.py) writes.

    prepared/
      manifest.json          format version, model reference (relative path, sha256 and a cheap
                             fingerprint of its files), corpus hash, settings, tool versions,
                             the current placement's name
      profile/               profiler output (counts.npy, summary.json, samples/, plot)
      predictors/            per-layer predictors (orbax arrays + predictors.json)
      placements/<name>.json one per budget: hot neuron ids per layer and the device memory plan
      weights_<fmt>.safetensors  optional: the weights in the engine's layout and format

Loading never writes into a bundle. A bundle is checked against its model by a fingerprint of
each file (size and a few sampled blocks: milliseconds at any size); `verify="full"` compares
sha256 of every byte instead (what `bin/prepare` records; seconds per GB).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os

import numpy as np

from powerinfer_jax.errors import BundleError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VERIFY_MODES = ("fast", "full", "none")
_SAMPLE_BLOCKS = 8  # blocks of _SAMPLE_BYTES spread over the file, plus its first and last MiB
_SAMPLE_BYTES = 1 << 16
_EDGE_BYTES = 1 << 20


def is_bundle(path: str) -> bool:
    """Whether `path` is a prepared-bundle folder."""
    return os.path.isfile(os.path.join(path, MANIFEST))


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_fingerprint(path: str) -> str:
    """Hex sha256 of a file's size, first and last MiB (the safetensors header is at the start)
    and a few blocks spread between: catches a replaced, re-saved, truncated or re-quantized file
    without reading it all."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        offsets = [0, max(0, size - _EDGE_BYTES)] + [size * (i + 1) // (_SAMPLE_BLOCKS + 1)
                                                      for i in range(_SAMPLE_BLOCKS)]
        for i, off in enumerate(offsets):
            f.seek(off)
            h.update(f.read(_EDGE_BYTES if i < 2 else _SAMPLE_BYTES))
    return h.hexdigest()


def _model_files(model_dir: str) -> list[str]:
    return sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors") or f == "config.json")


def model_hashes(model_dir: str) -> dict[str, str]:
    """sha256 of config.json and every safetensors file of a model folder."""
    return {n: sha256_file(os.path.join(model_dir, n)) for n in _model_files(model_dir)}


def model_fingerprints(model_dir: str) -> dict[str, str]:
    """`file_fingerprint` of config.json and every safetensors file of a model folder."""
    return {n: file_fingerprint(os.path.join(model_dir, n)) for n in _model_files(model_dir)}


@dataclasses.dataclass(frozen=True)
class PlacementSettings:
    """How the device budget is turned into a placement."""

    budget_bytes: int
    dtype: str = "float32"
    max_context: int = 1024
    batch: int = 64
    min_hot_per_split_layer: int = 0
    time_limit_s: float = 30.0
    reserve_predictors: bool = True  # False for dense/oracle runs, which hold no predictors
    devices: int = 1  # a mesh of this many devices, each with `budget_bytes`


def placement_name(ps: PlacementSettings) -> str:
    """File stem naming a placement by its budget and settings."""
    pred = "" if ps.reserve_predictors else "_nopred"
    mesh = f"_d{ps.devices}" if ps.devices > 1 else ""
    return (f"budget_{ps.budget_bytes}_{ps.dtype}_ctx{ps.max_context}_b{ps.batch}_m{ps.min_hot_per_split_layer}"
            f"{pred}{mesh}")


def load_counts(profile_dir: str) -> tuple[np.ndarray, int]:
    """(firing counts [L, n_ff], profiled tokens) from a profile folder; a damaged one is a BundleError."""
    try:
        with open(os.path.join(profile_dir, "summary.json")) as f:
            tokens = json.load(f)["tokens"]
        counts = np.load(os.path.join(profile_dir, "counts.npy"))
        ok = (type(tokens) is int and tokens > 0 and counts.ndim == 2 and counts.dtype.kind in "iuf"
              and np.isfinite(counts).all() and (counts >= 0).all() and (counts <= tokens).all())
    except (OSError, ValueError, KeyError, TypeError, EOFError) as err:
        raise BundleError(f"the profile in {profile_dir} is damaged ({type(err).__name__}); re-run bin/prepare") from None
    if not ok:
        raise BundleError(f"the profile in {profile_dir} is damaged (counts or token total out of range); re-run "
                          "bin/prepare")
    return counts, tokens


@dataclasses.dataclass
class Bundle:
    """A loaded prepared bundle."""

    path: str
    manifest: dict
    counts: np.ndarray
    tokens: int
    predictors: object | None  # powerinfer_jax.predictor_store.Predictors

    @property
    def model_dir(self) -> str:
        """The HF model folder the bundle was prepared from."""
        return self.manifest["model"]["path"]

    @property
    def act_thresholds(self) -> list[float] | None:
        """SwiGLU/GeGLU bundles: the per-layer thresholds on |act(gate x)| calibrated to the bundle's
        target sparsity (`bin/prepare --target_sparsity`); None for ReLU models."""
        rec = self.manifest.get("activation_thresholds")
        if rec is None:
            return None
        values = rec.get("values") if isinstance(rec, dict) else None
        if not (isinstance(values, list) and len(values) == len(self.counts)
                and all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values)):
            raise BundleError(f"{self.path}/{MANIFEST}: activation_thresholds is damaged (want {len(self.counts)} "
                              "finite numbers >= 0); re-run bin/prepare")
        return [float(v) for v in values]

    @property
    def attention_input_thresholds(self) -> list[list[float]] | None:
        """TEAL: per layer the thresholds on |x| of the q/k/v input and of the o input
        (`bin/prepare --attention_sparsity`), or None."""
        rec = self.manifest.get("attention_input_thresholds")
        if rec is None:
            return None
        values = rec.get("values") if isinstance(rec, dict) else None
        ok = isinstance(values, list) and len(values) == len(self.counts) and all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(t, (int, float)) and math.isfinite(t) and t >= 0
                                                         for t in v) for v in values)
        if not ok:
            raise BundleError(f"{self.path}/{MANIFEST}: attention_input_thresholds is damaged; re-run bin/prepare")
        return [[float(t) for t in v] for v in values]

    @property
    def target_sparsity(self) -> float | None:
        """The FFN sparsity the activation thresholds were calibrated to (None for ReLU models)."""
        rec = self.manifest.get("activation_thresholds")
        return float(rec["target_sparsity"]) if isinstance(rec, dict) and "target_sparsity" in rec else None

    def stored_placement(self, ps: PlacementSettings) -> dict | None:
        """The placement solved earlier for exactly these settings, if the bundle has it."""
        path = os.path.join(self.path, "placements", placement_name(ps) + ".json")
        if not os.path.isfile(path):
            return None
        return self._read_placement(path)

    def _read_placement(self, path: str) -> dict:
        """A placement record, checked against the profile's [layers, n_ff] (hot ids sorted, unique, in range)."""
        layers, n_ff = self.counts.shape
        try:
            with open(path) as f:
                rec = json.load(f)
            hot = rec["placement"]["hot_indices"]
            ok = isinstance(rec.get("device_plan"), dict) and isinstance(hot, list) and len(hot) == layers
            for h in hot if ok else []:
                a = np.asarray(h)
                ok = ok and a.ndim == 1 and (a.size == 0 or (a.dtype.kind in "iu" and a.min() >= 0 and a.max() < n_ff
                                                             and (np.diff(a) > 0).all()))
        except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
            raise BundleError(f"{path} is damaged ({type(err).__name__}); re-run bin/prepare --budget or "
                              "bin/solve_placement") from None
        if not ok:
            raise BundleError(f"{path} does not fit the bundle's profile ({layers} layers of {n_ff} neurons); re-run "
                              "bin/prepare --budget or bin/solve_placement")
        return rec

    def placement(self, name: str | None = None) -> dict:
        """A stored placement record (the current one by default)."""
        name = name or self.manifest.get("current_placement")
        if not name:
            raise BundleError(f"{self.path} has no placement yet; run bin/prepare with --budget")
        return self._read_placement(os.path.join(self.path, "placements", str(name) + ".json"))


def verify_model(path: str, manifest: dict, model_dir: str, verify: str = "fast") -> None:
    """Raises BundleError when the model folder's files differ from what the manifest recorded.

    "fast" compares fingerprints (full sha256 for a bundle written before fingerprints were
    recorded); "full" compares sha256 of every byte; "none" only checks the folder exists."""
    if verify not in VERIFY_MODES:
        raise BundleError(f"unknown bundle verification {verify!r}; choose one of {', '.join(VERIFY_MODES)}")
    if not os.path.isdir(model_dir):
        raise BundleError(f"{path}: its model folder {model_dir} is missing")
    if verify == "none":
        return
    recorded = manifest["model"].get("fingerprint") if verify == "fast" else None
    if recorded is not None:
        now = model_fingerprints(model_dir)
    else:
        recorded, now = manifest["model"]["sha256"], model_hashes(model_dir)
    if now != recorded:
        changed = sorted(set(now) ^ set(recorded) | {k for k in now if recorded.get(k) != now[k]})
        raise BundleError(f"{path}: the bundle does not match its model {model_dir} (changed files: "
                          f"{', '.join(changed)}); re-run bin/prepare")


def _read_manifest(path: str) -> dict:
    """The manifest, with the fields the reader relies on checked (a damaged one is a BundleError)."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise BundleError(f"{path}/{MANIFEST} is unreadable ({type(err).__name__}); re-run bin/prepare") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}/{MANIFEST} is not a JSON object; re-run bin/prepare")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {manifest.get('format_version')!r:.40} is not {FORMAT_VERSION}; "
                          "re-run bin/prepare")
    model = manifest.get("model")
    if not (isinstance(model, dict) and isinstance(model.get("path"), str) and model["path"]
            and isinstance(model.get("sha256"), dict)
            and isinstance(model.get("fingerprint", {}), dict)):
        raise BundleError(f"{path}/{MANIFEST} has no valid model record; re-run bin/prepare")
    return manifest


def load_bundle(path: str, verify: str = "fast", model_dir: str | None = None) -> Bundle:
    """Reads a bundle (manifest, profile counts, predictors); fails clearly when its manifest does
    not match the model it references (`verify`: "fast", "full" or "none", see `verify_model`).
    `model_dir` re-points a bundle whose model folder moved (it must still match the manifest)."""
    from powerinfer_jax.predictor_store import load_predictors

    if not is_bundle(path):
        raise BundleError(f"{path} is not a prepared bundle (no {MANIFEST}); create one with bin/prepare")
    manifest = _read_manifest(path)
    recorded = manifest["model"]["path"]
    if model_dir is None:
        model_dir = recorded
        if not os.path.isabs(model_dir):  # stored relative to the bundle so bundles can move with their model
            model_dir = os.path.normpath(os.path.join(path, model_dir))
        if not os.path.isdir(model_dir) and os.path.isdir(str(manifest["model"].get("abs_path", ""))):
            model_dir = manifest["model"]["abs_path"]  # the bundle moved, its model did not
        if not os.path.isdir(model_dir):
            raise BundleError(f"{path}: its model folder {model_dir} is missing (recorded as {recorded!r}); if the "
                              "bundle or the model moved, pass the model folder (pij.load(..., bundle_model_dir=) or "
                              "--bundle_model)")
    manifest["model"]["path"] = str(model_dir)
    verify_model(path, manifest, str(model_dir), verify)
    counts, tokens = load_counts(os.path.join(path, "profile"))
    preds_dir = os.path.join(path, "predictors")
    preds = load_predictors(preds_dir) if os.path.isdir(preds_dir) else None
    return Bundle(path, manifest, counts, tokens, preds)

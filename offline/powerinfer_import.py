"""Building a bundle from the reference system's own files (`bin/prepare --from_powerinfer DIR`).

PowerInfer publishes, for each of its models (ReluLLaMA, ProSparse, Bamboo, ReluFalcon), trained
predictors and profiled activation counts. Users of those checkpoints already have them, so this
module turns them into a bundle in place of our profiling and predictor training; the placement
MILP per budget, the engine-layout weights and the manifest are then made as for any bundle.

The reference format, as read from SJTU-IPADS/PowerInfer (commit d3ebd7c):

  predictors  `model_<layer>.pt` for layer 0 .. L-1, one folder (the "-Predictor" Hugging Face repos;
              `convert.py` load_predictor_model, `convert-hf-to-powerinfer-gguf.py` ReluMLP.from_file).
              Each is a torch state dict with exactly `fc1.weight` [rank, d] and `fc2.weight`
              [n_ff, rank]: two bias-free `nn.Linear`s, logits = fc2(relu(fc1 x)) (FP16 as published).
              x is the layer's residual stream before the FFN norm for LLaMA and OPT (`llama.cpp`,
              `llm_build_ffn_sparse(..., ffn_inp, ...)`), which is what our predictors take.
  threshold   optional `config.json` beside them, key `sparse_threshold` (GGUF key
              `powerinfer.sparse_threshold`), default 0.0; a neuron is skipped when its logit
              < threshold (`ggml.c`/`ggml-cuda.cu`): active <=> logit >= threshold, i.e. sigmoid >= 0.5
              at the default. Ours is the same rule with one threshold per layer: every layer gets it.
  activation  `activation/activation_<layer>.pt` beside the model (the GGUF repos); each a 1-D tensor
              [n_ff] of per-neuron firing counts, which the solver (`powerinfer-py/powerinfer/solver.py`)
              sorts and sums in groups and `export_split.py` ranks with topk. The token total they
              were counted over is not stored.

What this module accepts: DIR holding the `model_<layer>.pt` files, with the activation files in
`DIR/activation/` (where the GGUF repos keep them: link or copy that folder in) or in DIR itself.
Layers are matched by the number in each name (`export_split.py` sorts names as strings, so its
activation_10 comes before activation_2; we do not). Anything in the wrong format is one
`PowerInferFilesError` line: a missing or extra layer, a stray `.pt` file, a file torch cannot read,
other keys, shapes that contradict the model's config.json, a non-float predictor, non-numeric,
negative or non-finite counts.

Counts -> our profile. Our placement only uses each neuron's firing rate (counts / tokens); the MILP
is scale-free, but rates also size the device-side active lists (`hybrid.predicted_capacities`).
As the token total is unknown we take the smallest one the counts allow, the largest count (a
neuron fires at most once a token; counts already <= 1 are taken as rates): rates are then upper
bounds, so lists are sized generously (never too small). Pass `tokens=` when the total is known.

Without activation files the reference system logs an error and runs with an empty GPU split
(every FFN neuron on the CPU). We profile instead: our profiler's firing counts over the corpus
(`--corpus`, `--max_tokens`; no predictor samples are kept), still with the imported predictors.

Predictor quality metrics (recall, predicted/true ratio) are unknown for imported predictors; the
engine then assumes a predicted/true ratio of 1.5 when sizing lists, and `bin/eval` measures them.
Reading `.pt` files needs torch, which powerinfer-jax does not depend on: it is imported only here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import time

import numpy as np

from powerinfer_jax.errors import CheckpointError

PREDICTOR_RE = re.compile(r"model_(0|[1-9][0-9]*)\.pt")
ACTIVATION_RE = re.compile(r"activation_(0|[1-9][0-9]*)\.pt")
ACTIVATION_DIR = "activation"
CONFIG = "config.json"
THRESHOLD_KEY = "sparse_threshold"
DEFAULT_THRESHOLD = 0.0  # the reference's default (ggml.c: sparse_pred_threshold = 0.)
SOURCE_KIND = "from_powerinfer"
_KEYS = ("fc1.weight", "fc2.weight")
_STORED = {"torch.float16": "float16", "torch.bfloat16": "bfloat16", "torch.float32": "float32"}


class PowerInferFilesError(CheckpointError):
    """A folder of the reference system's files that is missing pieces or is in another format."""


@dataclasses.dataclass(frozen=True)
class ReferenceFiles:
    """The files found in a reference folder: per-layer predictors, optional counts and config."""

    folder: str
    predictors: tuple[str, ...]  # model_<l>.pt, layer order
    activations: tuple[str, ...] | None  # activation_<l>.pt, layer order; None when absent
    config: str | None  # config.json (sparse_threshold), if present

    def all_paths(self) -> list[str]:
        return [*self.predictors, *(self.activations or ()), *([self.config] if self.config else [])]


def _fail(msg: str):
    raise PowerInferFilesError(msg)


def _numbered(folder: str, pattern: re.Pattern, stem: str, num_layers: int, what: str) -> tuple[str, ...] | None:
    """Paths of `<stem>_<l>.pt` for l in 0..L-1 in `folder` (None when there are none); a gap, an
    extra layer or a stray .pt file is an error."""
    names = sorted(os.listdir(folder))
    found = {int(m.group(1)): n for n in names if (m := pattern.fullmatch(n))}
    other_pt = [n for n in names
                if n.endswith(".pt") and not PREDICTOR_RE.fullmatch(n) and not ACTIVATION_RE.fullmatch(n)]
    if other_pt:
        _fail(f"{folder}: unexpected file {other_pt[0]}: a PowerInfer folder holds model_<layer>.pt predictors "
              "and activation_<layer>.pt counts (layer numbers without leading zeros)")
    if not found:
        return None
    extra = sorted(l for l in found if l >= num_layers)
    if extra:
        _fail(f"{folder}: {found[extra[0]]} but the model has {num_layers} layers (0..{num_layers - 1}): {what} for "
              "another model?")
    missing = [l for l in range(num_layers) if l not in found]
    if missing:
        _fail(f"{folder}: {stem}_{missing[0]}.pt is missing ({len(missing)} of {num_layers} layers' {what} missing)")
    return tuple(os.path.join(folder, found[l]) for l in range(num_layers))


def find_files(folder: str, num_layers: int) -> ReferenceFiles:
    """The predictor, activation and config files of a reference folder, checked for completeness."""
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            _fail(f"{folder} is a file; --from_powerinfer takes the folder holding model_<layer>.pt")
        _fail(f"PowerInfer folder not found: {folder}")
    folder = os.path.abspath(folder)
    preds = _numbered(folder, PREDICTOR_RE, "model", num_layers, "predictors")
    if preds is None:
        _fail(f"{folder} has no model_<layer>.pt: not a PowerInfer predictor folder (expected model_0.pt .. "
              f"model_{num_layers - 1}.pt, torch state dicts of fc1.weight and fc2.weight)")
    here = _numbered(folder, ACTIVATION_RE, "activation", num_layers, "activation counts")
    sub = os.path.join(folder, ACTIVATION_DIR)
    below = _numbered(sub, ACTIVATION_RE, "activation", num_layers, "activation counts") if os.path.isdir(sub) else None
    if here and below:
        _fail(f"{folder}: activation counts both in the folder and in {ACTIVATION_DIR}/; keep one set")
    config = os.path.join(folder, CONFIG)
    return ReferenceFiles(folder, preds, here or below, config if os.path.isfile(config) else None)


def _torch():
    try:
        import torch
    except ImportError:
        _fail("reading PowerInfer's .pt files needs torch (not a dependency of powerinfer-jax): pip install torch")
    return torch


def _load_pt(path: str):
    """A .pt file's object, read without running pickled code (weights_only)."""
    torch = _torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (torch raises RuntimeError, UnpicklingError, EOFError, ...)
        msg = " ".join(str(err).split())[:120]
        with open(path, "rb") as f:
            lfs = f.read(40).startswith(b"version https://git-lfs")
        _fail(f"{path} is not a readable torch file ({type(err).__name__}: {msg})"
              + ("; it is a Git LFS pointer: fetch the file itself (git lfs pull)" if lfs else ""))


def read_threshold(files: ReferenceFiles) -> tuple[float, str]:
    """(threshold, where it came from): config.json's sparse_threshold, else the reference's 0."""
    if files.config is None:
        return DEFAULT_THRESHOLD, "default"
    try:
        with open(files.config, encoding="utf-8") as f:
            conf = json.load(f)
    except (OSError, ValueError) as err:
        _fail(f"{files.config} is not a JSON file ({type(err).__name__}); PowerInfer reads {THRESHOLD_KEY} from it")
    if not isinstance(conf, dict):
        _fail(f"{files.config} is not a JSON object; PowerInfer reads {THRESHOLD_KEY} from it")
    if THRESHOLD_KEY not in conf or conf[THRESHOLD_KEY] is None:
        return DEFAULT_THRESHOLD, "default"
    v = conf[THRESHOLD_KEY]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        _fail(f"{files.config}: {THRESHOLD_KEY} must be a finite number, got {v!r:.40}")
    return float(v), CONFIG


def _tensor(obj, key: str, path: str):
    torch = _torch()
    t = obj[key]
    if not isinstance(t, torch.Tensor):
        _fail(f"{path}: {key} is a {type(t).__name__}, not a tensor")
    return t


def read_layer(path: str, hidden: int, n_ff: int) -> tuple[np.ndarray, np.ndarray, str]:
    """One reference predictor file -> (fc1 [d, r], fc2 [r, n_ff]) in our layout (float32) and the
    file's dtype name."""
    torch = _torch()
    obj = _load_pt(path)
    if not isinstance(obj, dict):
        _fail(f"{path} holds a {type(obj).__name__}, not a state dict of {' and '.join(_KEYS)}")
    keys = sorted(map(str, obj))
    if keys != sorted(_KEYS):
        _fail(f"{path} has keys {keys[:6]}, PowerInfer predictors have exactly {list(_KEYS)}")
    fc1, fc2 = (_tensor(obj, k, path) for k in _KEYS)
    for k, t in zip(_KEYS, (fc1, fc2)):
        if not t.is_floating_point():
            _fail(f"{path}: {k} has dtype {t.dtype}; predictor weights are floating point (published as float16)")
        if t.ndim != 2:
            _fail(f"{path}: {k} has shape {list(t.shape)}, expected a matrix")
    rank = fc1.shape[0]
    if fc1.shape[1] != hidden or rank < 1:
        _fail(f"{path}: fc1.weight is {list(fc1.shape)}, expected [rank, {hidden}] (the model's hidden_size)")
    if tuple(fc2.shape) != (n_ff, rank):
        _fail(f"{path}: fc2.weight is {list(fc2.shape)}, expected [{n_ff}, {rank}] (the model's intermediate_size, "
              "fc1's rank)")
    if fc1.dtype != fc2.dtype:
        _fail(f"{path}: fc1.weight is {fc1.dtype} but fc2.weight is {fc2.dtype}")
    a, b = (t.detach().to(torch.float32).numpy() for t in (fc1, fc2))
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        _fail(f"{path} holds NaN or Inf weights")
    return np.ascontiguousarray(a.T), np.ascontiguousarray(b.T), str(fc1.dtype)


def read_predictors(files: ReferenceFiles, hidden: int, n_ff: int, model_params: int | None = None):
    """All layers' reference predictors as our `Predictors`, stored in the files' dtype (float16,
    bfloat16, float32; float32 for anything else or a mix), every layer at the reference threshold."""
    import jax.numpy as jnp

    from powerinfer_jax.predictor_store import LayerPredictor, Predictors
    from powerinfer_jax.sparse_ffn import PredictorParams

    threshold, origin = read_threshold(files)
    layers, dtypes = [], set()
    for l, path in enumerate(files.predictors):
        fc1, fc2, dt = read_layer(path, hidden, n_ff)
        dtypes.add(dt)
        layers.append((l, path, fc1, fc2))
    store = _STORED.get(dtypes.pop(), "float32") if len(dtypes) == 1 else "float32"
    out = []
    for l, path, fc1, fc2 in layers:
        metrics = {"source": SOURCE_KIND, "file": os.path.basename(path), "threshold_from": origin}
        out.append(LayerPredictor(layer=l, rank=fc1.shape[1], threshold=threshold, metrics=metrics,
                                  params=PredictorParams(fc1=jnp.asarray(fc1, store), fc2=jnp.asarray(fc2, store))))
    settings = {"source": SOURCE_KIND, "folder": files.folder, "threshold": threshold, "threshold_from": origin}
    return Predictors(layers=tuple(out), hidden_size=hidden, intermediate_size=n_ff, dtype=store,
                      model_params=model_params, settings=settings)


def read_counts(files: ReferenceFiles, n_ff: int, tokens: int | None = None) -> tuple[np.ndarray, int]:
    """(counts [L, n_ff], tokens) from the activation files; tokens, unless given, is the smallest
    total the counts allow (see the module doc)."""
    torch = _torch()
    rows = []
    for path in files.activations or ():
        t = _load_pt(path)
        if not isinstance(t, torch.Tensor):
            _fail(f"{path} holds a {type(t).__name__}, not a tensor of per-neuron activation counts")
        if t.dtype == torch.bool or t.is_complex() or not (t.is_floating_point() or t.dtype in (
                torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)):
            _fail(f"{path} has dtype {t.dtype}; activation counts are integers or floats")
        if tuple(t.shape) != (n_ff,):
            _fail(f"{path} has shape {list(t.shape)}, expected [{n_ff}] (one count per FFN neuron)")
        row = t.detach().to(torch.float64).numpy()
        if not np.isfinite(row).all() or (row < 0).any():
            _fail(f"{path} holds negative, NaN or Inf counts")
        rows.append(row)
    if not rows:
        _fail(f"{files.folder} has no activation_<layer>.pt counts")
    counts = np.stack(rows)
    top = float(counts.max())
    if tokens is None:
        tokens = max(1, math.ceil(top))
    elif isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < max(1, top):
        _fail(f"tokens={tokens!r} is below the largest activation count {top:g}: a neuron fires at most once a token")
    if (counts == np.round(counts)).all():
        counts = counts.astype(np.int64)
    return counts, int(tokens)


def source_record(files: ReferenceFiles, threshold: float, origin: str, tokens: int | None,
                  tokens_estimated: bool | None) -> dict:
    """What the manifest records about the imported files: folder, sha256 of each, threshold, counts."""
    from powerinfer_jax.bundle import sha256_file

    return {"kind": SOURCE_KIND, "path": files.folder,
            "files": {os.path.relpath(p, files.folder): sha256_file(p) for p in files.all_paths()},
            "threshold": threshold, "threshold_from": origin,
            "activation": "files" if files.activations else "profiled",
            "tokens": tokens, "tokens_estimated": tokens_estimated}


def _write_counts(profile_dir: str, counts: np.ndarray, tokens: int, source: dict, estimated: bool) -> None:
    from offline import activation_stats

    os.makedirs(profile_dir, exist_ok=True)
    np.save(os.path.join(profile_dir, "counts.npy"), counts)
    summary = activation_stats.summarize(counts, tokens)
    summary.update(samples=0, n_ff=int(counts.shape[1]), layers=int(counts.shape[0]), source=SOURCE_KIND,
                   files=sorted(k for k in source["files"] if ACTIVATION_RE.fullmatch(os.path.basename(k))),
                   tokens_estimated=estimated,
                   note="counts imported from PowerInfer activation files" + (
                       "; tokens is the largest count (the files do not record it), so rates are upper bounds"
                       if estimated else ""))
    with open(os.path.join(profile_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    activation_stats.plot_frequency_curves(counts, tokens, os.path.join(profile_dir, "frequency_curves.png"),
                                           title="imported PowerInfer activation counts")


def prepare_from_powerinfer(model_dir: str, folder: str, corpus: list[str] | None, out_dir: str, ps=None,
                            profile_settings=None, tokens: int | None = None, log=print) -> dict:
    """A bundle in `out_dir` from the reference files in `folder` (see the module doc), re-using an
    earlier import of the same files and model; solves and stores the placement for `ps` if given.
    Returns the manifest. The engine-layout weights are written separately (`bundle.write_engine_weights`)."""
    from offline import bundle as bundle_lib
    from offline import pipeline, profiler
    from offline import predictors as predictors_lib
    from powerinfer_jax import checks
    from powerinfer_jax.bundle import FORMAT_VERSION, MANIFEST, is_bundle, model_hashes
    from powerinfer_jax.config import load_config
    from powerinfer_jax.errors import ArgumentError
    from powerinfer_jax.predictor_store import META_JSON

    checks.path("folder", folder, kind="PowerInfer folder")
    pipeline.check_sparse_model(model_dir)
    cfg = load_config(model_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not is_bundle(out_dir):
        raise ArgumentError(f"{out_dir} holds other files and is not a bundle; give a new or empty folder")
    # Every file is read and checked before anything is written or profiled.
    files = find_files(folder, cfg.num_layers)
    preds = read_predictors(files, cfg.hidden_size, cfg.intermediate_size,
                            predictors_lib.model_param_count(model_dir))
    threshold, origin = preds.settings["threshold"], preds.settings["threshold_from"]
    counts, estimated = None, None
    if files.activations:
        estimated = tokens is None
        counts, tokens = read_counts(files, cfg.intermediate_size, tokens)
    elif tokens is not None:
        raise ArgumentError(f"tokens= describes activation files, and {files.folder} has none")
    source = source_record(files, threshold, origin, tokens, estimated)
    profile_settings = dataclasses.replace(profile_settings or profiler.ProfileSettings(), max_samples=0)
    hashes = model_hashes(model_dir)
    if counts is None:
        text = pipeline.corpus_text(corpus)
        corpus_rec = {"paths": [os.path.abspath(p) for p in corpus] if corpus else ["<default training split>"],
                      "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
        prof_cfg = dataclasses.asdict(profile_settings)
    else:
        corpus_rec, prof_cfg = {"paths": [], "sha256": None}, None
    old = {}
    if is_bundle(out_dir):
        try:
            with open(os.path.join(out_dir, MANIFEST)) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
    profile_dir, preds_dir = os.path.join(out_dir, "profile"), os.path.join(out_dir, "predictors")
    current = (isinstance(old, dict) and old.get("source") == source and isinstance(old.get("model"), dict)
               and old["model"].get("sha256") == hashes
               and old.get("corpus") == corpus_rec and old.get("profile_settings") == prof_cfg
               and os.path.isfile(os.path.join(profile_dir, "counts.npy"))
               and os.path.isfile(os.path.join(preds_dir, META_JSON)))
    if current:
        log(f"{SOURCE_KIND}: up to date, re-used")
    else:
        # Anything made from other inputs goes: stale placements would otherwise be loaded by name.
        for sub in ("profile", "predictors", "placements"):
            shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
        os.makedirs(out_dir, exist_ok=True)
        if counts is not None:
            log(f"{SOURCE_KIND}: {cfg.num_layers} predictors (ranks {min(preds.ranks)}..{max(preds.ranks)}, "
                f"{preds.dtype}, threshold {threshold:g} from {origin}) and activation counts"
                + (f" (token total unknown: taken as the largest count, {tokens})" if estimated else ""))
            _write_counts(profile_dir, counts, tokens, source, bool(estimated))
        else:
            log(f"{SOURCE_KIND}: {cfg.num_layers} predictors (threshold {threshold:g} from {origin}); no "
                f"activation_<layer>.pt in {files.folder} or its {ACTIVATION_DIR}/, so profiling the corpus for the "
                "firing counts")
            pipeline.run_profile(model_dir, corpus, profile_dir, profile_settings)
            shutil.rmtree(os.path.join(profile_dir, "samples"), ignore_errors=True)
        predictors_lib.save_predictors(preds, preds_dir)
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": bundle_lib.model_record(model_dir, out_dir, cfg, hashes),
        "source": source,
        "corpus": corpus_rec,
        "profile_settings": prof_cfg,
        "predictor_settings": None,  # imported, not trained
        "predictor_bytes": preds.nbytes,
        "tools": bundle_lib.tool_versions(),
        "placements": old.get("placements", []) if current else [],
        "current_placement": None,
    }
    return bundle_lib.finish_bundle(out_dir, manifest, cfg, profile_dir, preds.nbytes, ps, log)

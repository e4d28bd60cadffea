"""Writing the prepared bundle (`bin/prepare`): everything the hybrid engine needs beside the HF
weights. Its layout and the reader are in `powerinfer_jax/bundle.py`; this module profiles,
trains, solves placements and writes them (full sha256 of the model's files, plus the cheap
fingerprints the engine checks on every load).

`prepare` re-uses the profile and the predictors when the model, corpus and their settings are
unchanged, so another budget only re-solves the placement.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from importlib import metadata

import numpy as np

from offline import profiler
from powerinfer_jax import memory
from powerinfer_jax.errors import ArgumentError
# The reader side of a bundle lives in the library (the engine loads bundles); this module writes them.
from powerinfer_jax.bundle import (FORMAT_VERSION, MANIFEST, PlacementSettings, is_bundle, model_fingerprints,
                                   model_hashes, placement_name)


def tool_versions() -> dict[str, str]:
    """Versions of the packages that shaped the bundle."""
    out = {}
    for pkg in ("powerinfer-jax", "jax", "jaxlib", "cvxpy", "highspy", "orbax-checkpoint", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def solve_placement(cfg, counts: np.ndarray, tokens: int, predictor_bytes: int, ps: PlacementSettings):
    """Device plan + MILP placement for one budget; returns (Placement, DevicePlan).

    With `ps.devices` > 1 every device has the budget and holds the replicated parts (the plan is
    per device); hot neurons fill one capacity per device. All neurons of a layer cost the same,
    so those capacities are exactly one MILP capacity of their sum plus an equal split of each
    layer's hot set over the devices (`hybrid.deal_to_devices`), provided every layer's hot count
    divides evenly: the MILP picks neurons in batches of `ps.batch`, a multiple of the device count.
    """
    from offline import placement

    if ps.devices < 1 or ps.batch % ps.devices:
        raise ArgumentError(f"placement_batch {ps.batch} must be a multiple of the device count {ps.devices}: "
                            f"pass placement_batch={max(ps.devices, ps.batch // max(ps.devices, 1) * ps.devices)}")
    plan = memory.plan_device_memory(cfg, ps.budget_bytes, ps.dtype,
                                     predictor_bytes if ps.reserve_predictors else 0, ps.max_context)
    rates = [row / max(tokens, 1) for row in counts]
    p = placement.solve(rates, neuron_bytes=plan.neuron_bytes, budget_bytes=plan.ffn_budget * ps.devices,
                        batch=ps.batch, min_hot_per_split_layer=ps.min_hot_per_split_layer,
                        time_limit_s=ps.time_limit_s)
    return p, plan


def write_placement(bundle_dir: str, p, plan, ps: PlacementSettings, make_current: bool = False) -> str:
    """Saves a placement (+ its memory plan) into the bundle; optionally makes it the manifest's current one."""
    os.makedirs(os.path.join(bundle_dir, "placements"), exist_ok=True)
    name = placement_name(ps)
    with open(os.path.join(bundle_dir, "placements", name + ".json"), "w") as f:
        json.dump({"settings": dataclasses.asdict(ps), "device_plan": plan.as_dict(), "placement": p.to_dict()}, f)
    manifest_path = os.path.join(bundle_dir, MANIFEST)
    if make_current and os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        manifest["placements"] = sorted(set(manifest.get("placements", [])) | {name})
        manifest["current_placement"] = name
        with open(manifest_path, "w") as f:
            json.dump(manifest, f, indent=2)
    return name


def write_engine_weights(bundle_dir: str, model_dir: str, dtype: str = "auto", quantize: str | None = None) -> str:
    """Writes the model's weights in the engine's layout and chosen format into the bundle
    (transposed down matrix, fused q/k/v, quantized if asked): done once, mapped by every load."""
    from powerinfer_jax.config import load_config
    from powerinfer_jax.loading import engine_weights_name, load_params, matrix_format, save_engine_weights

    cfg = load_config(model_dir)
    path = os.path.join(bundle_dir, engine_weights_name(matrix_format(model_dir, cfg, dtype, quantize)))
    params = load_params(model_dir, cfg, dtype=dtype, quantize=quantize, on_host=True)
    save_engine_weights(params, path, source={"model_sha256": model_hashes(model_dir), "dtype": dtype,
                                              "quantize": quantize})
    return path


def model_record(model_dir: str, out_dir: str, cfg, hashes: dict) -> dict:
    """The manifest's record of the model a bundle was prepared from."""
    # Relative, so a bundle moves with its model; absolute too, so a bundle copied elsewhere still finds it.
    return {"path": os.path.relpath(os.path.abspath(model_dir), os.path.abspath(out_dir)),
            "abs_path": os.path.abspath(model_dir), "sha256": hashes, "fingerprint": model_fingerprints(model_dir),
            "architecture": cfg.architecture, "ffn_kind": cfg.ffn_kind}


def prepare(model_dir: str, corpus: list[str] | None, out_dir: str, ps: PlacementSettings | None,
            profile_settings: profiler.ProfileSettings = profiler.ProfileSettings(),
            predictor_settings=None, keep_samples: bool = True, log=print,
            target_sparsity: float | None = None, attention_sparsity: float | None = None) -> dict:
    """Profile -> predictors -> placement into `out_dir`, re-using finished steps; returns the manifest.
    A SwiGLU/GeGLU model needs `target_sparsity`: per-layer activation thresholds are calibrated to it
    first (stored in the manifest) and define what the profiler counts as active. `attention_sparsity`:
    also calibrate TEAL's attention input thresholds to it (`pij.load(attention_sparsity=True)`)."""
    from offline import pipeline
    from offline import predictors as predictors_lib
    from powerinfer_jax.config import load_config

    predictor_settings = predictor_settings or predictors_lib.TrainSettings()
    pipeline.check_sparse_model(model_dir)
    cfg = load_config(model_dir)
    os.makedirs(out_dir, exist_ok=True)
    text = pipeline.corpus_text(corpus)
    corpus_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
    hashes = model_hashes(model_dir)
    old = {}
    if is_bundle(out_dir):
        with open(os.path.join(out_dir, MANIFEST)) as f:
            old = json.load(f)
    same_inputs = (old.get("model", {}).get("sha256") == hashes and old.get("corpus", {}).get("sha256") == corpus_hash)
    profile_dir = os.path.join(out_dir, "profile")
    prof_cfg = dataclasses.asdict(profile_settings)
    act = None
    if cfg.needs_act_threshold:
        if target_sparsity is None:
            raise ArgumentError(f"{model_dir} is a {cfg.ffn_kind} model (activations never exactly zero): give "
                                "--target_sparsity (e.g. 0.5) to calibrate its per-layer activation thresholds")
        prof_cfg["target_sparsity"] = float(target_sparsity)  # another target means another profile
        act = old.get("activation_thresholds")
        if not (same_inputs and isinstance(act, dict) and act.get("target_sparsity") == float(target_sparsity)
                and act.get("profile_window") == profile_settings.window):
            log(f"thresholds: calibrating to {target_sparsity:.0%} sparsity")
            act = pipeline.run_calibration(model_dir, corpus, float(target_sparsity), profile_settings)
            act["profile_window"] = profile_settings.window
            log("thresholds: " + ", ".join(f"{v:.4g}" for v in act["values"]))
        else:
            log("thresholds: up to date, re-used")
    elif target_sparsity is not None:
        raise ArgumentError(f"--target_sparsity is for SwiGLU/GeGLU models; {model_dir} has a {cfg.ffn_kind!r} FFN, "
                            "whose sparsity is its ReLU's")
    attn = None
    if attention_sparsity is not None:
        if cfg.family != "llama":
            raise ArgumentError("--attention_sparsity supports LLaMA-family models (fused q/k/v), not OPT")
        attn = old.get("attention_input_thresholds")
        if same_inputs and isinstance(attn, dict) and attn.get("target_sparsity") == float(attention_sparsity):
            log("attention thresholds: up to date, re-used")
        else:
            log(f"attention thresholds: calibrating to {attention_sparsity:.0%} input sparsity")
            attn = pipeline.run_calibration(model_dir, corpus, float(attention_sparsity), profile_settings,
                                            attention=True)
    pred_cfg = dataclasses.asdict(predictor_settings)
    preds_dir = os.path.join(out_dir, "predictors")
    preds_current = old.get("predictor_settings") == pred_cfg and same_inputs and os.path.isdir(preds_dir)
    # Samples are deleted after training unless kept; re-training predictors then needs a new profile.
    have_samples = os.path.isdir(os.path.join(profile_dir, "samples"))
    if (same_inputs and old.get("profile_settings") == prof_cfg and os.path.isfile(os.path.join(profile_dir, "counts.npy"))
            and (preds_current or have_samples)):
        log("profile: up to date, re-used")
    else:
        log("profile: running")
        pipeline.run_profile(model_dir, corpus, profile_dir, profile_settings,
                             act_thresholds=None if act is None else act["values"])
        preds_current = False  # a new profile means new predictors
    if preds_current:
        log("predictors: up to date, re-used")
        preds = predictors_lib.load_predictors(preds_dir)
    else:
        log("predictors: training")
        preds, rows = predictors_lib.train_all(profile_dir, (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers),
                                               predictor_settings, model_params=predictors_lib.model_param_count(model_dir),
                                               progress=True)
        predictors_lib.save_predictors(preds, preds_dir)
        log(predictors_lib.markdown_table(rows, preds.totals()))
    if not keep_samples:
        shutil.rmtree(os.path.join(profile_dir, "samples"), ignore_errors=True)
    if old and not same_inputs:  # placements of another model or corpus: a load must never find them by name
        shutil.rmtree(os.path.join(out_dir, "placements"), ignore_errors=True)
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": model_record(model_dir, out_dir, cfg, hashes),
        "corpus": {"paths": [os.path.abspath(p) for p in corpus] if corpus else ["<default training split>"],
                   "sha256": corpus_hash},
        "profile_settings": prof_cfg,
        "activation_thresholds": act,
        "attention_input_thresholds": attn,
        "predictor_settings": pred_cfg,
        "predictor_bytes": preds.nbytes,
        "tools": tool_versions(),
        "placements": old.get("placements", []) if same_inputs else [],
        "current_placement": None,
    }
    return finish_bundle(out_dir, manifest, cfg, profile_dir, preds.nbytes, ps, log)


def finish_bundle(out_dir: str, manifest: dict, cfg, profile_dir: str, predictor_bytes: int,
                  ps: PlacementSettings | None, log) -> dict:
    """Writes the manifest, then (with `ps`) solves the placement from the profile's counts and stores it as the
    current one; returns the manifest as stored (shared by `prepare` and the PowerInfer import)."""
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    if ps is not None:
        counts, tokens = profiler.load_counts(profile_dir)
        p, plan = solve_placement(cfg, counts, tokens, predictor_bytes, ps)
        name = write_placement(out_dir, p, plan, ps, make_current=True)
        log(f"placement {name}: {p.status}, gap {p.mip_gap}, {p.solve_time_s:.2f} s; hot per layer {list(p.hot_counts)}; "
            f"device plan {plan.as_dict()}")
    with open(os.path.join(out_dir, MANIFEST)) as f:
        return json.load(f)

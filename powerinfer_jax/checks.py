"""Argument checks shared by the public API and the CLIs: each fails with one `ArgumentError` line.

Why strict types: `int(1.7)`, `int("3")` or `True` as a count would run with a value nobody asked
for; a NaN passes every `<`/`>` range test. These helpers refuse all of them up front.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Iterable

import numpy as np

from powerinfer_jax.errors import ArgumentError, PathNotFoundError


def integer(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """`value` as a Python int in [lo, hi]; bools, floats and strings are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ArgumentError(f"{name} must be an integer, got {_show(value)}")
    v = int(value)
    if lo is not None and v < lo:
        raise ArgumentError(f"{name} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ArgumentError(f"{name} must be <= {hi}, got {v}")
    return v


def real(name: str, value, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    """`value` as a finite float in [lo, hi] (or (lo, hi] with lo_open); NaN and Inf are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ArgumentError(f"{name} must be a number, got {_show(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise ArgumentError(f"{name} must be a finite number, got {v}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ArgumentError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise ArgumentError(f"{name} must be <= {hi}, got {v}")
    return v


def choice(name: str, value, choices: Iterable):
    """`value` if it is one of `choices` (compared by equality, types included)."""
    choices = tuple(choices)
    if not any(type(value) is type(c) and value == c for c in choices):
        shown = ", ".join("None" if c is None else str(c) for c in choices)
        raise ArgumentError(f"unsupported {name} {_show(value)}; choose one of {shown}")
    return value


def boolean(name: str, value) -> bool:
    """`value` if it is a bool (numpy's too)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentError(f"{name} must be True or False, got {_show(value)}")
    return bool(value)


def path(name: str, value, kind: str = "folder", must_exist: bool = True) -> str:
    """A str/PathLike path as a str; with must_exist, a missing one is a `PathNotFoundError`."""
    if not isinstance(value, (str, os.PathLike)):
        raise ArgumentError(f"{name} must be a path (str or os.PathLike), got {_show(value)}")
    p = os.fspath(value)
    if isinstance(p, bytes) or not p or "\x00" in p:
        raise ArgumentError(f"{name} must be a non-empty path, got {_show(value)}")
    if must_exist:
        if not os.path.exists(p):
            raise PathNotFoundError(f"{kind} not found: {p}")
        if kind.endswith("folder") and not os.path.isdir(p):
            raise ArgumentError(f"{name} {p} is a file, not a {kind}")
        if kind.endswith("file") and os.path.isdir(p):
            raise ArgumentError(f"{name} {p} is a folder, not a {kind}")
    return p


def output_folder(name: str, value) -> str:
    """A folder we may create or write into: refused up front when it cannot be (a file is in the way,
    or no writable ancestor), so a long run does not fail at its end."""
    p = path(name, value, must_exist=False)
    if os.path.exists(p) and not os.path.isdir(p):
        raise ArgumentError(f"{name} {p} is a file; give a folder")
    probe = os.path.abspath(p)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ArgumentError(f"{name} {p}: {probe} is a file, so the folder cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ArgumentError(f"{name} {p}: {probe} is not writable")
    return p


def byte_size(name: str, value) -> int:
    """Bytes from an int or a "1.5GiB"/"800MB"-style string; must be finite and >= 0."""
    if isinstance(value, (bool, np.bool_)):
        raise ArgumentError(f"{name} must be bytes or a size like 1.5GiB, got {_show(value)}")
    if isinstance(value, numbers.Real):
        f = float(value)
        if not math.isfinite(f) or f < 0:
            raise ArgumentError(f"{name} must be a byte count >= 0, got {_show(value)}")
        return int(f)
    if not isinstance(value, str):
        raise ArgumentError(f"{name} must be bytes or a size like 1.5GiB, got {_show(value)}")
    s = value.strip().replace(" ", "").upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6,
             "GB": 10**9, "TB": 10**12, "B": 1}
    mult = 1
    for unit, m in units.items():
        if s.endswith(unit):
            s, mult = s[: -len(unit)], m
            break
    try:
        f = float(s) * mult
    except ValueError:
        f = float("nan")
    if not math.isfinite(f) or f < 0 or f >= 2**62:
        raise ArgumentError(f"cannot read a byte size >= 0 from {name}={value!r} (use e.g. 1.5GiB, 800MB, 1000000)")
    return int(f)


def token_ids(name: str, value, vocab_size: int) -> list[int]:
    """A 1-D sequence of integer token ids in [0, vocab_size) as a list (not empty)."""
    if isinstance(value, (str, bytes)) or value is None:
        raise ArgumentError(f"{name} must be a 1-D sequence of token ids, got {_show(value)}")
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as err:  # ragged nesting
        raise ArgumentError(f"{name} must be a 1-D sequence of token ids: {err}") from None
    if arr.ndim != 1:
        raise ArgumentError(f"{name} must be a 1-D sequence of token ids, got an array of shape {arr.shape}")
    if arr.size == 0:
        raise ArgumentError(f"empty {name}: give at least one token")
    if arr.dtype == object:
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in arr):
            raise ArgumentError(f"{name} must hold integers, got {_show(value)}")
    elif arr.dtype.kind not in "iu":
        raise ArgumentError(f"{name} must hold integers, got dtype {arr.dtype}")
    ids = [int(t) for t in arr]
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ArgumentError(f"token ids out of range [0, {vocab_size}): {bad[:5]}")
    return ids


def _show(value) -> str:
    """A short repr for messages (one line, bounded length)."""
    r = repr(value).replace("\n", " ")
    r = r if len(r) <= 60 else r[:57] + "..."
    return f"{r} ({type(value).__name__})"


def load_arguments(model_dir, dtype, max_seq_len, quantize, kv_dtype, sparsity, device_memory_budget, threshold,
                   offload_layers, placement_batch, min_hot_per_split_layer, device_kernel, verify_bundle,
                   check_finite, bundle_model_dir=None, devices=None) -> None:
    """Every `pij.load` argument's type and range, before anything is read."""
    from powerinfer_jax.loading import DTYPES, QUANTIZATIONS
    from powerinfer_jax.model import KV_DTYPES

    if model_dir is not None:
        path("model_dir", model_dir, kind="model folder")
    choice("dtype", dtype, DTYPES)
    choice("quantize", quantize, QUANTIZATIONS)
    choice("kv_dtype", kv_dtype, ("auto", *KV_DTYPES))
    if max_seq_len is not None:
        integer("max_seq_len", max_seq_len, lo=1)
    choice("sparsity", sparsity, (None, "dense", "oracle", "predicted"))
    if device_memory_budget is not None:
        byte_size("device_memory_budget", device_memory_budget)
    if threshold is not None:
        real("threshold", threshold)
    if offload_layers is not None:
        integer("offload_layers", offload_layers, lo=0)
    integer("placement_batch", placement_batch, lo=1)
    integer("min_hot_per_split_layer", min_hot_per_split_layer, lo=0)
    choice("device_kernel", device_kernel, ("auto", "numba", "xla", "pallas"))
    choice("verify_bundle", verify_bundle, ("fast", "full", "none"))
    choice("check_finite", check_finite, (True, False, "auto"))
    if bundle_model_dir is not None:
        path("bundle_model_dir", bundle_model_dir, kind="model folder")
    if devices is not None and not isinstance(devices, numbers.Integral):  # counts: checked against jax.devices()
        import jax

        if not (isinstance(devices, (list, tuple)) and devices and all(isinstance(d, jax.Device) for d in devices)):
            raise ArgumentError(f"devices must be a count or a non-empty list of jax devices, got {_show(devices)}")
    elif devices is not None:
        integer("devices", devices, lo=1)


def hybrid_arguments(cfg, bundle, sparsity, device_memory_budget, offload_layers) -> None:
    """What the sparse modes need from the model and bundle, refused before the weights are read."""
    if bundle is not None:  # a bundle's statistics must describe this model's FFNs
        from powerinfer_jax.errors import BundleError

        want = (cfg.num_layers, cfg.intermediate_size)
        preds = bundle.predictors
        if tuple(bundle.counts.shape) != want or (preds is not None and (
                len(preds) != cfg.num_layers or preds.hidden_size != cfg.hidden_size
                or preds.intermediate_size != cfg.intermediate_size)):
            raise BundleError(f"{bundle.path} was prepared for another model (profile {tuple(bundle.counts.shape)}, "
                              f"this model has {want[0]} layers of {want[1]} neurons); re-run bin/prepare")
    if offload_layers is not None and offload_layers > cfg.num_layers:
        raise ArgumentError(f"offload_layers must be <= the model's {cfg.num_layers} layers, got {offload_layers}")
    if sparsity in ("oracle", "predicted") and not cfg.is_sparse_capable:
        raise ArgumentError(f"sparsity={sparsity!r} is not supported for this model's FFN ({cfg.ffn_kind!r}); "
                            "run it dense")
    if sparsity == "predicted" and (bundle is None or bundle.predictors is None):
        raise ArgumentError("sparsity='predicted' needs a prepared bundle with predictors: run bin/prepare on the "
                            "model and load the bundle folder")
    if device_memory_budget is not None and offload_layers is None and bundle is None:
        raise ArgumentError("device_memory_budget needs activation statistics: run bin/prepare on the model and load "
                            "the bundle folder")


def act_thresholds(cfg, bundle, sparsity, given) -> list[float] | None:
    """The per-layer activation thresholds a SwiGLU/GeGLU model's sparse modes use: `given`, else the
    bundle's; refused for ReLU models (their zeros are exact) and when a sparse mode has none."""
    if given is not None:
        if not cfg.needs_act_threshold:
            raise ArgumentError(f"act_thresholds apply to SwiGLU/GeGLU models; this model's FFN is {cfg.ffn_kind!r} "
                                "(its inactive neurons are exact zeros)")
        try:
            values = [float(v) for v in given]
        except (TypeError, ValueError):
            raise ArgumentError("act_thresholds must be a sequence of numbers, one per layer") from None
        if len(values) != cfg.num_layers or not all(math.isfinite(v) and v >= 0 for v in values):
            raise ArgumentError(f"act_thresholds must hold {cfg.num_layers} finite numbers >= 0 (one per layer), "
                                f"got {len(values)}")
        return values
    values = bundle.act_thresholds if bundle is not None and cfg.needs_act_threshold else None
    if values is None and cfg.needs_act_threshold and sparsity in ("oracle", "predicted"):
        raise ArgumentError(f"sparsity={sparsity!r} on a {cfg.ffn_kind} model needs per-layer activation thresholds: "
                            "load a bundle prepared with bin/prepare --target_sparsity (or pass act_thresholds=)")
    return values


def attn_input_thresholds(cfg, bundle, enabled, given) -> list | None:
    """The per-layer (q/k/v input, o input) thresholds of TEAL attention sparsity, when it is on: `given`,
    else the bundle's; None when off. Refused when on with none, or when given while off."""
    if not isinstance(enabled, bool):
        raise ArgumentError(f"attention_sparsity must be True or False, got {enabled!r:.40}")
    if given is not None and not enabled:
        raise ArgumentError("attn_input_thresholds given but attention_sparsity is off: pass attention_sparsity=True")
    if not enabled:
        return None
    if given is None:
        given = bundle.attention_input_thresholds if bundle is not None else None
        if given is None:
            raise ArgumentError("attention_sparsity needs per-layer input thresholds: load a bundle prepared with "
                                "bin/prepare --attention_sparsity (or pass attn_input_thresholds=)")
    try:
        values = np.asarray(given, np.float64)
    except (TypeError, ValueError):
        values = None
    if values is None or values.shape != (cfg.num_layers, 2) or not (np.isfinite(values).all() and (values >= 0).all()):
        raise ArgumentError(f"attn_input_thresholds must be {cfg.num_layers} pairs of finite numbers >= 0 "
                            "(q/k/v input, o input), one pair per layer")
    if cfg.family != "llama":
        raise ArgumentError("attention_sparsity supports LLaMA-family models (fused q/k/v), not OPT")
    return values.tolist()

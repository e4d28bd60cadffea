"""Quality of the sparse modes (`bin/eval`): perplexity per mode and threshold, predictor metrics per layer.

Measured on the same tokens (a text file's first `max_tokens` scored tokens, or by default the held-out
tail of Tiny Shakespeare the bundled model never trained on):

  perplexity  `metrics.perplexity` over non-overlapping windows of `window` tokens, each starting with
              BOS. `dense` scores a window in one forward; the sparse engines (`oracle`, `predicted`)
              score it token by token through the decode path (`Engine.stepwise_logits`), so their
              numbers measure what the sparse machinery computes. A sparse run also reports the FFN
              neurons the engine computed (`ffn_computed / ffn_total`, summed over layers and steps) and
              the active neurons dropped because an index list overflowed its capacity.
  per layer   one dense forward over the same windows (`forward(..., collect=True)`, as the profiler
              does) gives each layer's predictor input (the residual stream before the FFN norm) and
              its true ReLU mask; the predictor's logits (`sparse_ffn.predict_logits`) against that
              mask give recall, precision and the true / predicted active fractions, with
              `offline.predictors.mask_metrics`' definitions, at each layer's calibrated threshold and
              at every extra threshold. Counts accumulate batch by batch inside one jitted function, so
              memory stays bounded whatever `max_tokens` is.

Positions: every input position of every window, the BOS one included, i.e. exactly the decode steps
the sparse engines run (so a predicted run's computed fraction is comparable with its layers' mean
predicted-active fraction; they differ only because the sparse engine's residual stream, fed by
earlier sparse layers, differs slightly from the dense one, and by capacity overflows).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import platform
import time
from typing import Sequence

import numpy as np

from offline import bundle as bundle_lib
from powerinfer_jax.bundle import MANIFEST, is_bundle, load_bundle
from offline.pipeline import DEFAULT_CORPUS, HOLDOUT_FRACTION, REPO
from offline.predictors import jsonable, metrics_from_counts
from offline.profiler import make_windows
from offline.train_model import split_corpus
from powerinfer_jax.errors import PathNotFoundError, PowerInferError

MODES = ("dense", "oracle", "predicted")
MIN_TOKENS = 32  # fewer scored tokens make a perplexity that is mostly noise
BATCH = 8  # windows per jitted metrics forward
DEFAULT_BUNDLE = REPO / "models" / "shakespeare-relu-llama-prepared"
DEFAULT_OUT_DIR = REPO / "benchmarks" / "results" / "eval"


class EvalError(PowerInferError):
    """Bad evaluation input: unknown mode, bad threshold list, text too short, missing predictors..."""


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What to evaluate and on how many tokens."""

    modes: tuple[str, ...] = MODES
    thresholds: tuple[float, ...] = ()  # extra predicted runs, each threshold applied to every layer
    max_tokens: int = 2048  # scored tokens (perplexity targets)
    window: int = 128  # tokens per window, BOS included; also the engines' context
    attention_sparsity: bool = False  # also every mode with TEAL attention input sparsity ("<mode>+attn" runs)


# ---------------------------------------------------------------------------------------------
# Inputs.


def parse_modes(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'dense,oracle' -> ('dense', 'oracle'), in order, duplicates dropped; unknown modes are an EvalError."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    modes = [m.strip() for m in items if m.strip()]
    if not modes:
        raise EvalError(f"no mode given; choose from {', '.join(MODES)}")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise EvalError(f"unknown mode(s) {', '.join(map(repr, bad))}; choose from {', '.join(MODES)}")
    return tuple(dict.fromkeys(modes))


def parse_thresholds(spec: str | Sequence[float] | None) -> tuple[float, ...]:
    """'-1,0,1.5' -> (-1.0, 0.0, 1.5): finite floats, duplicates dropped; '' or None -> ()."""
    if spec is None:
        return ()
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if isinstance(spec, str) and not spec.strip():
        return ()
    out = []
    for s in items:
        try:
            v = float(s)
        except (TypeError, ValueError):
            raise EvalError(f"bad threshold {s!r} in {spec!r}: give comma-separated numbers, e.g. -1,0,1") from None
        if not math.isfinite(v):
            raise EvalError(f"bad threshold {s!r} in {spec!r}: thresholds must be finite")
        out.append(v)
    return tuple(dict.fromkeys(out))


def check_settings(s: EvalSettings) -> EvalSettings:
    """Validates and normalises settings (modes, thresholds, token counts)."""
    modes = parse_modes(s.modes)
    thresholds = parse_thresholds(s.thresholds)
    if thresholds and "predicted" not in modes:
        raise EvalError("--thresholds apply to the predicted mode: add 'predicted' to the modes")
    if s.max_tokens < MIN_TOKENS:
        raise EvalError(f"max_tokens must be >= {MIN_TOKENS}, got {s.max_tokens}")
    if s.window < 2:
        raise EvalError(f"window must be >= 2 (BOS + one token), got {s.window}")
    return dataclasses.replace(s, modes=modes, thresholds=thresholds)


@dataclasses.dataclass
class Source:
    """What is evaluated: an HF model folder, optionally through a prepared bundle."""

    path: str  # what pij.load gets (the bundle folder when there is one)
    model_dir: str
    bundle: object | None  # powerinfer_jax.bundle.Bundle

    @property
    def predictors(self):
        return None if self.bundle is None else self.bundle.predictors


def open_source(bundle: str | None = None, model: str | None = None, bundle_model: str | None = None) -> Source:
    """A prepared bundle (`bundle`, default the bundled one; `bundle_model` re-points a bundle moved
    apart from its model) or a plain model folder (`model`)."""
    from powerinfer_jax.config import load_config

    if bundle is not None and model is not None:
        raise EvalError("give --bundle or --model, not both")
    if model is None:
        path = str(bundle if bundle is not None else DEFAULT_BUNDLE)
        if not os.path.isdir(path):
            raise PathNotFoundError(f"bundle folder not found: {path}")
        if not is_bundle(path):
            raise EvalError(f"{path} is not a prepared bundle (no {MANIFEST}): create one with "
                            "bin/prepare, or pass a plain model folder with --model (dense and oracle only)")
    else:
        path = str(model)
        if not os.path.isdir(path):
            raise PathNotFoundError(f"model folder not found: {path}")
    if is_bundle(path):
        b = load_bundle(path, model_dir=bundle_model)  # BundleError when its model changed or is missing
        load_config(b.model_dir)
        return Source(path, b.model_dir, b)
    if bundle_model is not None:
        raise EvalError("--bundle_model re-points a prepared bundle; a plain --model folder needs none")
    load_config(path)  # clear errors for a folder that is not an HF model
    return Source(path, path, None)


def read_text(text_path: str | None) -> tuple[str, str]:
    """(text, description): a file's whole text, or by default the bundled model's held-out tail."""
    if text_path is None:
        text = DEFAULT_CORPUS.read_text(encoding="utf-8")
        _, heldout = split_corpus(text, HOLDOUT_FRACTION)
        return heldout, f"{_display(DEFAULT_CORPUS)} (held-out last {HOLDOUT_FRACTION:.0%})"
    if not os.path.isfile(text_path):
        raise PathNotFoundError(f"text file not found: {text_path}")
    try:
        with open(text_path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise EvalError(f"the text file {text_path} is not UTF-8 (byte {err.start}); convert it to UTF-8") from None
    if not text.strip():
        raise EvalError(f"the text file is empty: {text_path}")
    return text, _display(text_path)


def score_inputs(ids: np.ndarray, window: int, bos: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The windows `metrics.perplexity(ids, window, bos)` feeds the model: (tokens, valid), both [N, window].

    perplexity's windows are BOS + ids[k*step : (k+1)*step] (step = window - 1 with a BOS) up to the
    last id, which is only a target: make_windows' full windows, plus a shorter tail.
    """
    body = window - (1 if bos is not None else 0)
    inputs = np.asarray(ids[:-1])
    full = make_windows(inputs, window, bos)
    rows, valid = [full], [np.ones(full.shape, bool)]
    rest = inputs[len(full) * body:]
    if len(rest):
        tail = np.concatenate([[bos], rest]) if bos is not None else rest
        rows.append(np.pad(tail, (0, window - len(tail)))[None].astype(np.int32))
        valid.append((np.arange(window) < len(tail))[None])
    return np.concatenate(rows), np.concatenate(valid)


# ---------------------------------------------------------------------------------------------
# Per-layer predictor metrics.


@functools.lru_cache(maxsize=None)
def _counts_fn():
    import jax
    import jax.numpy as jnp

    from powerinfer_jax.model import forward
    from powerinfer_jax.sparse_ffn import predict_logits

    @functools.partial(jax.jit, static_argnames=("cfg",))
    def counts(params, cfg, tokens, valid, preds, thresholds, act_thresholds):
        """Per layer: true-active count [L]; per layer and threshold: predicted and true-positive counts [L, K].
        True-active: a ReLU output above 0, or |act(gate x)| above the layer's act threshold (SwiGLU/GeGLU)."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        _, _, ex = forward(params, cfg, tokens, positions, collect=True)
        v = valid[..., None]
        true_n, pred_n, tp = [], [], []
        for l, (x, act) in enumerate(zip(ex["ffn_in"], ex["ffn_act"])):
            mask = (jnp.abs(act) > act_thresholds[l]) & v  # [B, T, n_ff]
            true_n.append(mask.sum(dtype=jnp.int32))
            if preds is not None:
                hit = (predict_logits(preds[l], x)[..., None] >= thresholds[l]) & v[..., None]  # [B, T, n_ff, K]
                pred_n.append(hit.sum(axis=(0, 1, 2), dtype=jnp.int32))
                tp.append((hit & mask[..., None]).sum(axis=(0, 1, 2), dtype=jnp.int32))
        if preds is None:
            return jnp.stack(true_n), None, None
        return jnp.stack(true_n), jnp.stack(pred_n), jnp.stack(tp)

    return counts


def layer_metrics(params, cfg, tokens: np.ndarray, valid: np.ndarray, predictors=None,
                  settings: Sequence[tuple[str, np.ndarray]] = (), act_thresholds=None) -> list[dict]:
    """Per layer: true active fraction and, per threshold setting (label, per-layer thresholds [L]), the
    predictor's recall / precision / predicted active fraction over the valid positions of `tokens`
    (`act_thresholds` [L]: what "active" means for a SwiGLU/GeGLU model)."""
    import jax.numpy as jnp

    fn = _counts_fn()
    L, n = cfg.num_layers, cfg.intermediate_size
    preds = predictors.params if predictors is not None and settings else None
    thr = (jnp.asarray(np.stack([np.asarray(t, np.float32) for _, t in settings], axis=1))
           if preds is not None else None)  # [L, K]
    K = len(settings) if preds is not None else 0
    act = jnp.asarray(np.zeros(L) if act_thresholds is None else act_thresholds, jnp.float32)
    true_n, pred_n, tp = np.zeros(L, np.int64), np.zeros((L, K), np.int64), np.zeros((L, K), np.int64)
    batch = min(BATCH, len(tokens))
    for i in range(0, len(tokens), batch):
        tok, val = tokens[i : i + batch], valid[i : i + batch]
        if len(tok) < batch:  # one compiled shape
            pad = batch - len(tok)
            tok = np.concatenate([tok, np.zeros((pad, tok.shape[1]), tok.dtype)])
            val = np.concatenate([val, np.zeros((pad, val.shape[1]), bool)])
        t, p, h = fn(params, cfg, jnp.asarray(tok), jnp.asarray(val), preds, thr, act)
        true_n += np.asarray(t, np.int64)
        if preds is not None:
            pred_n += np.asarray(p, np.int64)
            tp += np.asarray(h, np.int64)
    positions = int(valid.sum()) * n
    rows = []
    for l in range(L):
        row = {"layer": l, "true_frac": true_n[l] / max(positions, 1), "thresholds": []}
        for k, (label, t) in enumerate(settings if preds is not None else ()):
            m = metrics_from_counts(int(tp[l, k]), int(true_n[l]), int(pred_n[l, k]), positions)
            row["thresholds"].append({"setting": label, "threshold": float(np.asarray(t)[l]), **m})
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Perplexity runs.


def _perplexity_run(engine, ids: np.ndarray, window: int, bos: int | None, bar=None) -> dict:
    """perplexity() of one engine, with its FFN counters when it is a sparse one."""
    from powerinfer_jax.metrics import perplexity

    stats: dict = {}
    stepwise = getattr(engine, "stepwise_logits", False)

    def scorer(seq):
        out = engine.logits_stepwise(seq, stats) if stepwise else engine.logits(seq)
        if bar is not None:
            bar.update(len(seq))
        return out

    t0 = time.perf_counter()
    res = perplexity(scorer, ids, window=window, bos=bos)
    res["seconds"] = time.perf_counter() - t0
    if stats.get("ffn_total"):
        res["ffn_computed_frac"] = stats["ffn_computed"] / stats["ffn_total"]
        res["ffn_overflow"] = int(stats.get("ffn_overflow", 0))
    else:  # the dense engine computes every neuron
        res["ffn_computed_frac"] = 1.0
        res["ffn_overflow"] = 0
    return res


def run_plan(s: EvalSettings) -> list[tuple[str, float | None]]:
    """(mode, threshold) per perplexity run; threshold None = each layer's calibrated one (or n/a)."""
    plan = []
    for mode in s.modes:
        plan.append((mode, None))
        if mode == "predicted":
            plan += [(mode, t) for t in s.thresholds]
    if s.attention_sparsity:  # the same modes with attention inputs sparse too: compared with FFN-only
        plan += [(mode + "+attn", None) for mode in s.modes]
    return plan


def evaluate(bundle: str | None = None, model: str | None = None, text_path: str | None = None,
             settings: EvalSettings = EvalSettings(), progress: bool = True, log=None,
             precision: dict | None = None, bundle_model: str | None = None) -> dict:
    """Runs every perplexity run and the per-layer metrics; returns the JSON-safe result (see module doc).

    `precision`: `pij.load` keyword arguments (dtype, quantize, kv_dtype) every engine is loaded with;
    `bundle_model`: the model folder of a bundle moved apart from it."""
    import jax

    import powerinfer_jax as pij
    from offline.pipeline import check_sparse_model, tokenize

    s = check_settings(settings)
    text, text_desc = read_text(text_path)
    src = open_source(bundle, model, bundle_model)
    if "predicted" in s.modes and src.predictors is None:
        raise EvalError(f"mode 'predicted' needs predictors: {src.path} is "
                        + ("a bundle without predictors" if src.bundle is not None else "not a prepared bundle")
                        + "; run bin/prepare and pass the bundle with --bundle")
    if any(m != "dense" for m in s.modes):
        check_sparse_model(src.model_dir)
    if s.attention_sparsity and (src.bundle is None or src.bundle.attention_input_thresholds is None):
        raise EvalError(f"--attention_sparsity needs a bundle with attention input thresholds: run bin/prepare "
                        f"--attention_sparsity 0.5 on {src.path}")
    precision = dict(precision or {})
    if bundle_model is not None:
        precision["bundle_model_dir"] = bundle_model
    dense = pij.load(src.path, max_seq_len=s.window, **precision)
    cfg = dense.cfg
    if s.window > cfg.max_position_embeddings:
        raise EvalError(f"window {s.window} exceeds the model's context of {cfg.max_position_embeddings}")
    ids = tokenize(dense, text)[: s.max_tokens + 1]
    if len(ids) < MIN_TOKENS + 1:
        raise EvalError(f"text too short: {len(ids)} tokens, need at least {MIN_TOKENS + 1} "
                        f"({MIN_TOKENS} scored after the first)")
    bos = dense.tokenizer.bos_token_id
    tokens, valid = score_inputs(ids, s.window, bos)
    positions = int(valid.sum())
    say = log or (lambda msg: None)

    # Per-layer predictor metrics from one dense pass.
    preds = src.predictors
    threshold_settings = []
    if preds is not None and cfg.is_sparse_capable:
        threshold_settings = [("calibrated", preds.thresholds)]
        threshold_settings += [(_fmt_thr(t), np.full(cfg.num_layers, t, np.float32)) for t in s.thresholds]
    layers = []
    act_thr = src.bundle.act_thresholds if src.bundle is not None and cfg.needs_act_threshold else None
    if cfg.is_sparse_capable and (act_thr is not None or not cfg.needs_act_threshold):
        say(f"per-layer metrics over {positions:,} positions")
        layers = layer_metrics(dense.params, cfg, tokens, valid, preds, threshold_settings, act_thr)

    # Perplexity runs.
    plan = run_plan(s)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan) * positions, desc="perplexity", unit="tok")
    runs = []
    try:
        for mode, thr in plan:
            base, attn = mode.removesuffix("+attn"), mode.endswith("+attn")
            label = "n/a" if base != "predicted" else ("calibrated" if thr is None else _fmt_thr(thr))
            if bar is not None:
                bar.set_postfix_str(f"{mode} {label}" if base == "predicted" else mode)
            engine = dense if mode == "dense" else pij.load(src.path, sparsity=base, threshold=thr,
                                                            max_seq_len=s.window, attention_sparsity=attn,
                                                            **precision)
            r = _perplexity_run(engine, ids, s.window, bos, bar)
            del engine
            r.update(mode=mode, threshold=label, threshold_value=thr)  # value None: calibrated or n/a
            if base == "predicted":
                ms = [t for row in layers for t in row["thresholds"] if t["setting"] == label]
                r["mean_recall"] = float(np.mean([m["recall"] for m in ms])) if ms else None
                r["mean_pred_frac"] = float(np.mean([m["pred_frac"] for m in ms])) if ms else None
            runs.append(r)
    finally:
        if bar is not None:
            bar.close()
    base = next((r["perplexity"] for r in runs if r["mode"] == "dense"), None)
    for r in runs:
        r["ppl_change_pct"] = None if base is None else 100.0 * (r["perplexity"] / base - 1.0)

    means = []
    for label, _ in threshold_settings:
        ms = [t for row in layers for t in row["thresholds"] if t["setting"] == label]
        means.append({"setting": label, **{k: float(np.mean([m[k] for m in ms]))
                                           for k in ("recall", "precision", "true_frac", "pred_frac")}})
    versions = bundle_lib.tool_versions()
    return jsonable({
        "model": _display(src.model_dir),
        "bundle": _display(src.path) if src.bundle is not None else None,
        "text": text_desc,
        "tokens": int(len(ids) - 1),
        "positions": positions,
        "windows": int(len(tokens)),
        "window": s.window,
        "max_tokens": s.max_tokens,
        "precision": {"dtype": precision.get("dtype", "auto"), "quantize": precision.get("quantize"),
                      "kv_dtype": dense.kv_dtype, "prompt_activations": dense.prompt_activations,
                      "int4_activations": precision.get("int4_activations", "float32")},
        "bos": bos,
        "modes": list(s.modes),
        "target_sparsity": src.bundle.target_sparsity if src.bundle is not None else None,
        "thresholds": list(s.thresholds),
        "runs": runs,
        "layers": layers,
        "layer_means": means,
        "versions": {**versions, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                     "python": platform.python_version(),
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores"},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })


# ---------------------------------------------------------------------------------------------
# Reports.


def markdown_report(res: dict) -> str:
    """Summary table (mode, threshold, perplexity, change vs dense, FFN computed) and the per-layer table."""
    v = res["versions"]
    src = res["model"] + (f" (bundle {res['bundle']})" if res.get("bundle") else "")
    lines = [
        f"# Sparse-mode evaluation: {os.path.basename(res['model'].rstrip('/'))}",
        "",
        f"model: {src}  ",
        f"text: {res['text']}: {res['tokens']:,} tokens scored in {res['windows']} windows of {res['window']}"
        + (" (BOS first)" if res.get("bos") is not None else ""),
        f"backend: {v['backend']} ({v['device']}), jax {v.get('jax')}, jaxlib {v.get('jaxlib')}",
        "",
        "## Perplexity",
        "",
        "| mode | threshold | perplexity | vs dense | FFN computed | overflows | mean recall | mean pred active | s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["runs"]:
        ch = "" if r["ppl_change_pct"] is None else f"{r['ppl_change_pct'] + 0.0:+.2f}%".replace("-0.00", "+0.00")
        rec = "" if r.get("mean_recall") is None else f"{r['mean_recall']:.4f}"
        pa = "" if r.get("mean_pred_frac") is None else f"{100 * r['mean_pred_frac']:.2f}%"
        lines.append(f"| {r['mode']} | {r['threshold']} | {r['perplexity']:.4f} | {ch} | "
                     f"{100 * r['ffn_computed_frac']:.2f}% | {r['ffn_overflow']} | {rec} | {pa} | {r['seconds']:.1f} |")
    lines += ["", "FFN computed: neurons the engine computed over all layers and decode steps (dense: all); "
              "mean recall / pred active: the per-layer metrics below, averaged over layers."]
    if res["layers"]:
        lines += ["", "## Per layer (dense forward over the same positions)", ""]
        if res["layers"][0]["thresholds"]:
            lines += ["| layer | setting | threshold | recall | precision | true active % | pred active % | ratio |",
                      "|---:|---|---:|---:|---:|---:|---:|---:|"]
            for row in res["layers"]:
                for t in row["thresholds"]:
                    ratio = "inf" if t["ratio"] is None else f"{t['ratio']:.2f}"
                    lines.append(f"| {row['layer']} | {t['setting']} | {t['threshold']:.3f} | {t['recall']:.4f} | "
                                 f"{t['precision']:.4f} | {100 * t['true_frac']:.2f} | {100 * t['pred_frac']:.2f} | "
                                 f"{ratio} |")
            for m in res["layer_means"]:
                lines.append(f"| mean | {m['setting']} | | {m['recall']:.4f} | {m['precision']:.4f} | "
                             f"{100 * m['true_frac']:.2f} | {100 * m['pred_frac']:.2f} | |")
        else:
            lines += ["| layer | true active % |", "|---:|---:|"]
            lines += [f"| {row['layer']} | {100 * row['true_frac']:.2f} |" for row in res["layers"]]
            lines += ["", "(no predictors: pass a prepared bundle for predictor metrics)"]
    return "\n".join(lines) + "\n"


def write_report(res: dict, out_dir: str) -> tuple[str, str]:
    """Writes eval.json and eval.md into out_dir; returns their paths."""
    import json

    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, "eval.json"), os.path.join(out_dir, "eval.md")
    with open(json_path, "w") as f:
        json.dump(res, f, indent=2, allow_nan=False)
    with open(md_path, "w") as f:
        f.write(markdown_report(res))
    return json_path, md_path


def _fmt_thr(t: float) -> str:
    return f"{t:g}"


def _display(path) -> str:
    """A path relative to the repo when inside it (reports stay machine-independent), else absolute."""
    p = os.path.abspath(str(path))
    try:
        rel = os.path.relpath(p, REPO)
    except ValueError:
        return p
    return p if rel.startswith("..") else rel

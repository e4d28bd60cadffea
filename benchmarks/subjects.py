"""The models `bin/bench` measures: the bundled model (from its prepared bundle) and the
synthetic LLaMA-7B-shaped model (benchmarks/synthetic.py)."""

from __future__ import annotations

import gc
import os

import jax
import numpy as np

from benchmarks import synthetic
from benchmarks.suite import Subject, collect_residuals, device_params
from offline.activation_stats import summarize
from powerinfer_jax.bundle import load_bundle
from powerinfer_jax.config import load_config
from powerinfer_jax.loading import load_params, matrix_format
from powerinfer_jax.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shown(path: str) -> str:
    """A path relative to the repository when it is inside it (reports stay machine-independent)."""
    rel = os.path.relpath(os.path.abspath(path), REPO)
    return path if rel.startswith("..") else rel


def bundled_subject(bundle_path: str, prompt_len: int, corpus: str | None = None) -> Subject:
    """The bundled model with its bundle's predictors and profiled firing rates; prompt = corpus text."""
    b = load_bundle(bundle_path)
    cfg = load_config(b.model_dir)
    host = load_params(b.model_dir, cfg, dtype="float32", on_host=True)
    tok = Tokenizer(b.model_dir, cfg.bos_token_id, cfg.eos_token_ids)
    text = open(corpus).read(20_000) if corpus else "ROMEO:\n" * 200
    prompt = tok.encode(text)[:prompt_len]
    preds = b.predictors

    def hf_model():
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(b.model_dir, dtype=torch.float32).eval()

    rates = b.counts / max(b.tokens, 1)
    return Subject(
        name="bundled" if not cfg.needs_act_threshold else "bundled-silu", description=f"{_shown(b.model_dir)} (bundle {_shown(bundle_path)})", cfg=cfg, host_params=host,
        predictors=[jax.tree.map(np.asarray, p) for p in preds.params], thresholds=list(preds.thresholds),
        predicted_ratio=[lp.metrics.get("ratio") or 1.5 for lp in preds.layers], rates=rates,
        prompt_ids=prompt, hf_model=hf_model,
        quality_note="real model: quality in bin/eval", stored_format=matrix_format(b.model_dir, cfg),
        extra={"activity": summarize(b.counts, b.tokens)["mean"], "rates_for_plot": rates},
        act_thresholds=b.act_thresholds)


def synthetic_subject(layers: int, vocab: int, predictor_rank: int, prompt_len: int, seed: int = 0,
                      calib_tokens: int = 256, log=print, shape: dict | None = None, ffn_kind: str = "reglu",
                      target_sparsity: float | None = None, **rate_kw) -> Subject:
    """The LLaMA-7B-shaped model with calibrated power-law predictors; its text means nothing.

    `shape` overrides the layer dimensions (hidden, ffn, heads), for tests. `ffn_kind="swiglu"` with
    `target_sparsity`: a SwiGLU model whose activation thresholds are calibrated to that sparsity on random
    tokens (the CATS row) and whose predictors fire on 1 - target_sparsity of neurons per token."""
    if ffn_kind == "swiglu":
        rate_kw["mean_active"] = mean = 1.0 - target_sparsity
        # A mean this high caps the share the hottest 26% can carry (each fires at most 95%): stay below the cap.
        rate_kw["top_share"] = min(rate_kw.get("top_share", 0.80), 0.9 * 0.26 * 0.95 / mean)
    cfg = synthetic.synthetic_config(layers=layers, vocab=vocab, ffn_kind=ffn_kind, **(shape or {}))
    log(f"[synthetic] building {layers} layers (d={cfg.hidden_size}, n_ff={cfg.intermediate_size}, "
        f"{cfg.num_heads} heads), predictor rank {predictor_rank}")
    m = synthetic.build_synthetic(cfg, predictor_rank=predictor_rank, seed=seed, **rate_kw)
    rng = np.random.default_rng(seed + 1)
    params = device_params(m.params)
    calib = collect_residuals(params, cfg, rng.integers(3, vocab, calib_tokens).astype(np.int32))
    synthetic.calibrate_predictors(m, calib)
    check = collect_residuals(params, cfg, rng.integers(3, vocab, calib_tokens // 2).astype(np.int32))
    measured = synthetic.predicted_rates(m, check)
    act = None
    if ffn_kind == "swiglu":
        from offline.thresholds import calibrate

        windows = rng.integers(3, vocab, (2, calib_tokens)).astype(np.int32)
        act = calibrate(params, cfg, windows, target_sparsity, batch=1)["values"]
        log(f"[synthetic] activation thresholds for {target_sparsity:.0%} sparsity: {[round(v, 4) for v in act]}")
    del params
    gc.collect()
    log(f"[synthetic] predicted-active fraction on fresh tokens: {measured.mean():.3f} (designed "
        f"{m.rates.mean():.3f})")

    def hf_model():
        from powerinfer_jax.export import to_transformers

        return to_transformers(m.params, cfg)

    top = int(round(0.2 * cfg.intermediate_size))
    return Subject(
        name="synthetic-7b-shape" if ffn_kind == "reglu" else f"synthetic-7b-silu-{round(100 * target_sparsity)}",
        act_thresholds=act,
        description=(f"random LLaMA-{'ReGLU' if ffn_kind == 'reglu' else 'SwiGLU'}, {layers} layers of d={cfg.hidden_size}, n_ff={cfg.intermediate_size}, "
                     f"{cfg.num_heads} heads (LLaMA-7B's are 4096/11008/32), vocab {vocab}, float32; predictors "
                     f"rank {predictor_rank} with power-law firing rates"),
        cfg=cfg, host_params=m.params, predictors=m.predictors, thresholds=[0.0] * layers,
        predicted_ratio=[1.0] * layers, rates=m.rates,
        prompt_ids=rng.integers(3, vocab, prompt_len).tolist(), hf_model=hf_model,
        quality_note="SYNTHETIC: random weights, its quality means nothing; its speed does",
        extra={"designed_mean_active": float(m.rates.mean()),
               "designed_hot20_share": float(np.mean([np.sort(r)[::-1][:top].sum() / r.sum() for r in m.rates])),
               "measured_mean_active": float(measured.mean()),
               "measured_hot20_share": float(np.mean([np.sort(r)[::-1][:top].sum() / r.sum() for r in measured])),
               "rates_for_plot": measured, "designed_rates_for_plot": m.rates})

"""The benchmark suite behind `bin/bench`: decode/prefill throughput of dense, layer offload,
hybrid sparse and transformers, side by side over device budgets, with a roofline per row.

A *subject* is a model with what the hybrid engine needs (host weights, predictors, firing
rates). For every budget the configurations run in alternating rounds (dense, offload, hybrid,
transformers, then again), so slow drifts of a shared machine hit all of them alike.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import roofline
from powerinfer_jax import memory
from offline.bundle import PlacementSettings, solve_placement
from powerinfer_jax.config import ModelConfig
from powerinfer_jax.engine import Engine, bucket
from powerinfer_jax.hybrid import build_hybrid_engine, offload_hot_indices, predicted_capacities
from powerinfer_jax.loading import engine_params, to_device
from powerinfer_jax.model import forward
from powerinfer_jax.params import ModelParams
from powerinfer_jax.sparse_ffn import PredictorParams

DTYPE = "float32"  # the default weight format of the budget suite (--dtype/--quantize choose another)
CONFIGS = ("dense", "offload", "hybrid", "cats", "transformers")  # cats: threshold (SwiGLU) models only


@dataclasses.dataclass
class Subject:
    """A model under test and what the hybrid engine needs of it."""

    name: str
    description: str
    cfg: ModelConfig
    host_params: ModelParams  # numpy float arrays (our layout), or host Weights of one format
    predictors: list[PredictorParams]
    thresholds: list[float]
    predicted_ratio: list[float]  # predicted-active / truly-active neurons, per layer (for capacities)
    rates: np.ndarray  # [L, n_ff] firing rate of every neuron (placement input)
    prompt_ids: list[int]
    hf_model: Callable[[], object] | None = None  # builds the transformers model, or None
    quality_note: str = ""
    stored_format: str = "float32"  # the checkpoint's precision ("auto" resolves to it)
    extra: dict = dataclasses.field(default_factory=dict)
    act_thresholds: list[float] | None = None  # SwiGLU/GeGLU: per-layer |act(gate x)| thresholds (bundle)
    formats: dict = dataclasses.field(default_factory=dict, repr=False)  # host_in's cache

    def host_in(self, fmt: str) -> ModelParams:
        """The host parameters as aligned Weights of matrix format `fmt` (converted once, cached)."""
        cache = self.formats
        if fmt not in cache:
            quantize = fmt if fmt in ("int8", "int4") else None
            cache[fmt] = engine_params(self.host_params, dtype="auto" if quantize else fmt, quantize=quantize)
        return cache[fmt]

    def predictor_shapes(self) -> list[tuple[int, int, int]]:
        """(d, rank, n_ff) of each layer's predictor."""
        return [tuple(np.asarray(p.fc1).shape) + (np.asarray(p.fc2).shape[1],) for p in self.predictors]

    @property
    def predictor_bytes(self) -> int:
        """Bytes of all predictors as the engine holds them (float32)."""
        return int(sum(np.asarray(p.fc1).size + np.asarray(p.fc2).size for p in self.predictors) * 4)


def device_params(host: ModelParams, fmt: str = DTYPE) -> ModelParams:
    """Host numpy parameters -> JAX device arrays in the engine's form (matrices as Weights of `fmt`)."""
    return to_device(engine_params(host, dtype="auto" if fmt in ("int8", "int4") else fmt,
                                   quantize=fmt if fmt in ("int8", "int4") else None))


@dataclasses.dataclass
class Budget:
    """One device budget: bytes, the hybrid placement for it, and the offload layer count."""

    fraction: float  # of all FFN bytes, on top of the fixed parts and the predictors
    budget_bytes: int
    hot_indices: list[np.ndarray]
    offload_layers: int
    placement_method: str


def plan_budget(s: Subject, fraction: float, max_seq_len: int, fmt: str = DTYPE) -> Budget:
    """The MILP placement for the hybrid engine and llama.cpp's `-ngl` layer count at one budget."""
    cfg = s.cfg
    ffn_total = memory.ffn_total_bytes(cfg, fmt)
    fixed_pred = sum(v for _, v in memory.fixed_groups(cfg, fmt, s.predictor_bytes, max_seq_len))
    fixed_dense = sum(v for _, v in memory.fixed_groups(cfg, fmt, 0, max_seq_len))
    budget = fixed_pred + int(fraction * ffn_total)
    per_layer = ffn_total // cfg.num_layers
    offload = int(min(cfg.num_layers, max(0, budget - fixed_dense) // per_layer))
    tokens = 1_000_000  # rates are given; the solver wants counts
    ps = PlacementSettings(budget_bytes=budget, dtype=fmt, max_context=max_seq_len, batch=64,
                           reserve_predictors=True)
    p, _ = solve_placement(cfg, np.round(s.rates * tokens), tokens, s.predictor_bytes, ps)
    return Budget(fraction, budget, [np.asarray(h, np.int32) for h in p.hot_indices], offload, p.method)


def build_engines(s: Subject, b: Budget, max_seq_len: int, fmt: str = DTYPE,
                  kv_dtype: str = "float32") -> dict[str, Engine]:
    """The offload and hybrid engines for one budget (`kv_dtype`: their KV caches' precision)."""
    cfg = s.cfg
    host = s.host_in(fmt)
    offload = build_hybrid_engine(cfg, host, mode="dense", hot_indices=offload_hot_indices(cfg, b.offload_layers),
                                  max_seq_len=max_seq_len, kv_dtype=kv_dtype)
    caps = predicted_capacities(s.rates, b.hot_indices, s.predicted_ratio)
    hybrid = build_hybrid_engine(cfg, host, mode="predicted", hot_indices=b.hot_indices,
                                 predictors=s.predictors, thresholds=s.thresholds, capacities=caps,
                                 max_seq_len=max_seq_len, act_thresholds=s.act_thresholds, kv_dtype=kv_dtype)
    engines = {"offload": offload, "hybrid": hybrid}
    if s.act_thresholds is not None:  # CATS: the same placement, the gate dense and up/down above the threshold
        engines["cats"] = build_hybrid_engine(cfg, host, mode="oracle", hot_indices=b.hot_indices,
                                              max_seq_len=max_seq_len, act_thresholds=s.act_thresholds,
                                              kv_dtype=kv_dtype)
    return engines


def run_engine(engine: Engine, prompt: Sequence[int], new_tokens: int) -> dict:
    """One greedy generation; its prefill/decode rates and sparse counters."""
    r = engine.generate(list(prompt), max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
    st = r.stats
    out = {"decode_tok_s": st["decode_tokens_per_s"], "prefill_tok_s": st["prefill_tokens_per_s"]}
    if "ffn_computed" in st and st["decode_steps"]:
        out["ffn_computed_per_token"] = st["ffn_computed"] / st["decode_steps"]
        out["ffn_hot_per_token"] = st["ffn_hot"] / st["decode_steps"]
        out["ffn_overflow_per_token"] = st.get("ffn_overflow", 0) / st["decode_steps"]
    return out


def run_transformers(model, prompt: Sequence[int], new_tokens: int) -> dict:
    """transformers eager: one prompt forward, then greedy decode with its KV cache."""
    import torch

    with torch.no_grad():
        ids = torch.tensor([list(prompt)])
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill_s = time.perf_counter() - t0
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        decode_s = time.perf_counter() - t1
    return {"decode_tok_s": (new_tokens - 1) / decode_s, "prefill_tok_s": len(prompt) / prefill_s}


def _summarize(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        vals = [r[key] for r in runs]
        out[key] = float(np.median(vals))
        if key.endswith("tok_s"):
            out[key + "_all"] = [float(v) for v in vals]
            out[key + "_spread"] = [float(min(vals)), float(max(vals))]
    return out


def roofline_row(s: Subject, name: str, res: dict, attend_len: int, bw: float, fmt: str = DTYPE) -> None:
    """Adds bytes touched per token, the time floor and achieved/floor to a config's result."""
    cfg = s.cfg
    table = s.host_in(fmt).embed.fmt
    if name == "cats":  # every gate row, up and down rows of the computed neurons: in whole-neuron units
        neurons = (cfg.num_layers * cfg.intermediate_size + 2 * res["ffn_computed_per_token"]) / 3
        nbytes = roofline.decode_bytes(cfg, fmt, ffn_neurons_per_token=neurons, attend_len=attend_len,
                                       table_dtype=table)
    elif name == "hybrid":
        nbytes = roofline.decode_bytes(cfg, fmt, ffn_neurons_per_token=res["ffn_computed_per_token"],
                                       predictor_bytes=roofline.predictor_bytes(s.predictor_shapes(), fmt),
                                       attend_len=attend_len, ffn_index=True,
                                       table_dtype=table)
    else:
        nbytes = roofline.decode_bytes(cfg, fmt, ffn_neurons_per_token=cfg.num_layers * cfg.intermediate_size,
                                       attend_len=attend_len, table_dtype=table)
    floor_s = nbytes / bw
    res["bytes_per_token"] = nbytes
    res["floor_ms"] = 1000 * floor_s
    res["ms_per_token"] = 1000 / res["decode_tok_s"]
    res["achieved_over_floor"] = floor_s * res["decode_tok_s"]


def bench_subject(s: Subject, fractions: Sequence[float], *, repeats: int, new_tokens: int, max_seq_len: int,
                  measure_bandwidth: Callable[[], float], with_transformers: bool, log=print, fmt: str = DTYPE) -> dict:
    """Every budget: build offload + hybrid, alternate all configurations `repeats` times.

    `measure_bandwidth()` (bytes/s) runs before the first and after every budget; floors use the best."""
    bandwidths = [measure_bandwidth()]
    prompt = s.prompt_ids
    attend_len = bucket(len(prompt) + new_tokens, max_seq_len)  # the span decode steps attend over
    log(f"[{s.name}] building the dense engine")
    dense = Engine(s.cfg, to_device(s.host_in(fmt)), max_seq_len=max_seq_len)
    hf = s.hf_model() if (with_transformers and s.hf_model is not None) else None
    run_engine(dense, prompt, new_tokens)  # compile
    if hf is not None:
        run_transformers(hf, prompt, 4)  # allocator warm-up
    rows = []
    for f in fractions:
        b = plan_budget(s, f, max_seq_len, fmt)
        log(f"[{s.name}] budget {f:.0%} of FFN bytes ({b.budget_bytes / 2**20:.1f} MiB): hybrid hot "
            f"{sum(len(h) for h in b.hot_indices) / (s.cfg.num_layers * s.cfg.intermediate_size):.1%}, "
            f"offload {b.offload_layers}/{s.cfg.num_layers} layers")
        engines = {"dense": dense, **build_engines(s, b, max_seq_len, fmt)}
        for e in engines.values():
            run_engine(e, prompt, new_tokens)  # compile every bucket before timing
        runs: dict[str, list[dict]] = {k: [] for k in CONFIGS if k in engines or (k == "transformers" and hf)}
        for _ in range(repeats):
            for name in runs:
                runs[name].append(run_transformers(hf, prompt, new_tokens) if name == "transformers"
                                  else run_engine(engines[name], prompt, new_tokens))
        configs = {name: _summarize(rs) for name, rs in runs.items()}
        hot = sum(len(h) for h in b.hot_indices) / (s.cfg.num_layers * s.cfg.intermediate_size)
        rows.append({"fraction": f, "budget_bytes": b.budget_bytes, "offload_layers": b.offload_layers,
                     "hot_fraction": hot, "placement_method": b.placement_method, "configs": configs,
                     "paired": paired_ratios(runs)})
        log("  " + ", ".join(f"{k} {v['decode_tok_s']:.2f} tok/s" for k, v in configs.items()))
        del engines
        gc.collect()
        bandwidths.append(measure_bandwidth())  # again: a shared machine's bandwidth drifts
    del dense
    gc.collect()
    bw = max(bandwidths)
    for r in rows:  # floors from the best bandwidth the machine showed during this model's run
        for name, c in r["configs"].items():
            roofline_row(s, name, c, attend_len, bw, fmt)
    return {"name": s.name, "description": s.description, "quality_note": s.quality_note, "weight_format": fmt,
            "config": {"layers": s.cfg.num_layers, "hidden": s.cfg.hidden_size, "ffn": s.cfg.intermediate_size,
                       "heads": s.cfg.num_heads, "vocab": s.cfg.vocab_size, "ffn_kind": s.cfg.ffn_kind},
            "predictor_bytes": s.predictor_bytes, "prompt_tokens": len(prompt), "new_tokens": new_tokens,
            "attend_len": attend_len, "bandwidth_gbps": [b / 1e9 for b in bandwidths], "floor_bandwidth_gbps": bw / 1e9,
            "budgets": rows, "summary": summarize_goals(rows), **s.extra}


PAIRS = (("hybrid", "dense"), ("hybrid", "offload"), ("dense", "transformers"), ("cats", "dense"))


def paired_ratios(runs: dict[str, list[dict]]) -> dict[str, list[float]]:
    """Decode-speed ratios of configurations measured in the same round (seconds apart), per round:
    robust to the slow drifts of a shared machine that move whole rounds up or down."""
    out = {}
    for a, b in PAIRS:
        if a in runs and b in runs:
            out[f"{a}_over_{b}"] = [ra["decode_tok_s"] / rb["decode_tok_s"] for ra, rb in zip(runs[a], runs[b])]
    return out


def _median_over(rows, cfg_name, key="decode_tok_s"):
    vals = [v for r in rows if cfg_name in r["configs"] for v in r["configs"][cfg_name][key + "_all"]]
    return float(np.median(vals)) if vals else None


def summarize_goals(rows: list[dict]) -> dict:
    """The issue's goal ratios (medians of same-round ratios): sparse speedup vs its byte-ratio
    ideal, achieved/floor, hybrid vs offload, dense vs transformers; per budget and over all."""
    per_budget = []
    for r in rows:
        c, p = r["configs"], r["paired"]
        h, d = c["hybrid"], c["dense"]
        ideal = d["bytes_per_token"] / h["bytes_per_token"]
        speedup = float(np.median(p["hybrid_over_dense"]))
        per_budget.append({"fraction": r["fraction"], "hybrid_over_dense": speedup, "ideal_ratio": ideal,
                           "share_of_ideal": speedup / ideal,
                           "hybrid_over_offload": float(np.median(p["hybrid_over_offload"])),
                           "hybrid_achieved_over_floor": h["achieved_over_floor"],
                           "dense_achieved_over_floor": d["achieved_over_floor"]})
    pooled = {k: float(np.median([v for r in rows for v in r["paired"].get(k, [])]))
              for k in rows[0]["paired"]}
    ideal = float(np.median([g["ideal_ratio"] for g in per_budget]))
    return {"dense_decode_tok_s": _median_over(rows, "dense"),
            "transformers_decode_tok_s": _median_over(rows, "transformers"),
            "dense_over_transformers": pooled.get("dense_over_transformers"),
            "hybrid_over_dense": pooled["hybrid_over_dense"], "ideal_ratio": ideal,
            "share_of_ideal": pooled["hybrid_over_dense"] / ideal,
            "hybrid_achieved_over_floor": float(np.median([g["hybrid_achieved_over_floor"] for g in per_budget])),
            "cats_over_dense": pooled.get("cats_over_dense"), "per_budget": per_budget}


def collect_residuals(params: ModelParams, cfg: ModelConfig, tokens: np.ndarray) -> list[np.ndarray]:
    """Each layer's FFN input before its norm (the predictor input) [T, d] for one token window."""
    fn = jax.jit(lambda p, t: forward(p, cfg, t, jnp.arange(t.shape[1])[None], collect=True)[2]["ffn_in"])
    return [np.asarray(x[0]) for x in fn(params, jnp.asarray(tokens[None]))]

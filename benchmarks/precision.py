"""Decode speed per weight format, side by side: float32, bfloat16, float16, int8, int4 (and int4-a8, int4 with
int8 activations), each dense
and hybrid (predicted sparsity at one device budget), on one subject (the 4-layer LLaMA-7B cut).

Every engine is built and compiled first; then rounds alternate over all of them, so the drifts
of a shared machine hit every format alike, and the ratios that matter (a format's hybrid over
its dense, int8 hybrid over bf16 hybrid) are taken within a round. Each row gets its roofline:
weight bytes touched per token in that format / the best bandwidth measured during the run.
"""

from __future__ import annotations

import gc
from typing import Callable, Sequence

import numpy as np

from benchmarks import roofline
from benchmarks.suite import Subject, plan_budget, run_engine
from powerinfer_jax.engine import Engine, bucket
from powerinfer_jax.hybrid import build_hybrid_engine, predicted_capacities
from powerinfer_jax.loading import to_device

FORMATS = ("float32", "bfloat16", "float16", "int8", "int4", "int4-a8")
# "int4-a8": int4 weights whose host kernels take int8 activations (`Engine.set_int4_activations("int8")`): the
# same bytes as int4, another arithmetic.


def weight_format(fmt: str) -> str:
    """The stored weight format of a suite format ("int4-a8" -> "int4")."""
    return fmt.split("-")[0]


def _engines(s: Subject, fmt: str, fraction: float, max_seq_len: int) -> tuple[dict, dict]:
    wfmt = weight_format(fmt)
    host = s.host_in(wfmt)
    b = plan_budget(s, fraction, max_seq_len, wfmt)
    caps = predicted_capacities(s.rates, b.hot_indices, s.predicted_ratio)
    hybrid = build_hybrid_engine(s.cfg, host, mode="predicted", hot_indices=b.hot_indices, predictors=s.predictors,
                                 thresholds=s.thresholds, capacities=caps, max_seq_len=max_seq_len)
    info = {"budget_bytes": b.budget_bytes, "hot_fraction": float(sum(len(h) for h in b.hot_indices)
                                                                  / (s.cfg.num_layers * s.cfg.intermediate_size))}
    engines = {"dense": Engine(s.cfg, to_device(host), max_seq_len=max_seq_len), "hybrid": hybrid}
    if fmt.endswith("-a8"):
        for e in engines.values():
            e.set_int4_activations("int8")
    return engines, info


def bench_formats(s: Subject, formats: Sequence[str], *, fraction: float, repeats: int, new_tokens: int,
                  max_seq_len: int, measure_bandwidth: Callable[[], float], log=print) -> dict:
    """Dense and hybrid decode per format in alternating rounds; medians, spreads, floors, paired ratios."""
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"unknown formats {bad}; choose from {', '.join(FORMATS)}")
    bandwidths = [measure_bandwidth()]
    engines, infos = {}, {}
    for fmt in formats:
        log(f"[{s.name}] building {fmt} engines")
        e, infos[fmt] = _engines(s, fmt, fraction, max_seq_len)
        for kind, eng in e.items():
            run_engine(eng, s.prompt_ids, new_tokens)  # compile every bucket before timing
            engines[(fmt, kind)] = eng
    runs: dict = {k: [] for k in engines}
    for r in range(repeats):
        for key, eng in engines.items():
            runs[key].append(run_engine(eng, s.prompt_ids, new_tokens))
        # Every round ends with a bandwidth measure: a shared machine's bandwidth drifts over minutes (30-53 GB/s
        # on one day), so each round's tokens/s is also set against the bandwidth of its own moment.
        bandwidths.append(measure_bandwidth())
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{f}/{k} {runs[(f, k)][-1]['decode_tok_s']:.2f}"
                                                      for f, k in engines))
    bw = max(bandwidths)
    attend_len = bucket(len(s.prompt_ids) + new_tokens, max_seq_len)
    rows = []
    for (fmt, kind), rs in runs.items():
        tok_s = [x["decode_tok_s"] for x in rs]
        wfmt = weight_format(fmt)
        table = s.host_in(wfmt).embed.fmt
        neurons = (np.median([x["ffn_computed_per_token"] for x in rs]) if kind == "hybrid"
                   else s.cfg.num_layers * s.cfg.intermediate_size)
        nbytes = roofline.decode_bytes(s.cfg, wfmt, ffn_neurons_per_token=float(neurons), attend_len=attend_len,
                                       predictor_bytes=roofline.predictor_bytes(s.predictor_shapes(), wfmt)
                                       if kind == "hybrid" else 0,
                                       ffn_index=kind == "hybrid", table_dtype=table)
        med = float(np.median(tok_s))
        per_round = [nbytes / b * t for b, t in zip(bandwidths[1:], tok_s)]  # each round against its own bandwidth
        rows.append({"format": fmt, "kind": kind, "decode_tok_s": med, "decode_tok_s_all": tok_s,
                     "ms_per_token": 1000 / med, "bytes_per_token": nbytes, "floor_ms": 1000 * nbytes / bw,
                     "achieved_over_floor": nbytes / bw * med,
                     "achieved_over_round_floor": float(np.median(per_round)),
                     "ffn_computed_per_token": float(neurons), **(infos[fmt] if kind == "hybrid" else {})})
    paired = {}

    def ratio(a, b):
        if a in runs and b in runs:
            return float(np.median([x["decode_tok_s"] / y["decode_tok_s"] for x, y in zip(runs[a], runs[b])]))
        return None

    for fmt in formats:
        paired[f"{fmt}_hybrid_over_dense"] = ratio((fmt, "hybrid"), (fmt, "dense"))
    for fmt in formats:
        if fmt != "bfloat16":
            paired[f"{fmt}_hybrid_over_bfloat16_hybrid"] = ratio((fmt, "hybrid"), ("bfloat16", "hybrid"))
            paired[f"{fmt}_dense_over_bfloat16_dense"] = ratio((fmt, "dense"), ("bfloat16", "dense"))
        plain = weight_format(fmt)
        if plain != fmt:  # another arithmetic over the same bytes: against the plain format
            for kind in ("dense", "hybrid"):
                paired[f"{fmt}_{kind}_over_{plain}_{kind}"] = ratio((fmt, kind), (plain, kind))
    del engines
    gc.collect()
    return {"name": s.name, "description": s.description, "quality_note": s.quality_note, "fraction": fraction,
            "prompt_tokens": len(s.prompt_ids), "new_tokens": new_tokens, "attend_len": attend_len,
            "bandwidth_gbps": [b / 1e9 for b in bandwidths], "floor_bandwidth_gbps": bw / 1e9,
            "rows": rows, "paired": {k: v for k, v in paired.items() if v is not None}}


def markdown(res: dict) -> str:
    """The per-format table and the paired ratios."""
    lines = [f"### {res['name']}: weight formats (budget {res['fraction']:.0%} of FFN bytes for hybrid)", "",
             f"{res['description']}. {res['quality_note']}. Floor bandwidth {res['floor_bandwidth_gbps']:.1f} GB/s.", "",
             "| format | engine | ms/token | tok/s (min-max) | MB/token | floor ms | achieved/floor | "
             "achieved/floor, per round |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lo, hi = min(r["decode_tok_s_all"]), max(r["decode_tok_s_all"])
        per_round = f"{r['achieved_over_round_floor']:.0%}" if "achieved_over_round_floor" in r else "-"
        lines.append(f"| {r['format']} | {r['kind']} | {r['ms_per_token']:.1f} | {r['decode_tok_s']:.2f} "
                     f"({lo:.2f}-{hi:.2f}) | {r['bytes_per_token'] / 1e6:.0f} | {r['floor_ms']:.1f} | "
                     f"{r['achieved_over_floor']:.0%} | {per_round} |")
    bws = res["bandwidth_gbps"]
    lines += ["", f"Floor ms and achieved/floor use the best bandwidth of the run ({res['floor_bandwidth_gbps']:.1f} "
              f"GB/s); the last column is the median over rounds of each round against the bandwidth measured right "
              f"after it (measured {min(bws):.1f}-{max(bws):.1f} GB/s)."]
    lines += ["", "| paired ratio (same round, median) | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f}x |" for k, v in res["paired"].items()]
    return "\n".join(lines)

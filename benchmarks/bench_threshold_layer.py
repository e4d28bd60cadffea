"""Threshold sparsity on one LLaMA-7B-shaped SwiGLU FFN layer (bf16): CATS vs predicted vs dense, on this CPU.

Issue #13 asks which is faster at equal quality: thresholding |silu(gate x)| (the gate computed
densely, up and down only for neurons above the threshold: CATS, the engine's "oracle" mode on a
SwiGLU model) or predicting the mask (all three matrices sparse, plus a predictor read per token:
"predicted" mode). At equal quality both compute the same neurons (a predictor with recall 1 and
no false positives); so per target sparsity s this times, for one decode token:
  dense       every neuron (host_sparse_ffn over all ids)
  cats        host_sparse_ffn over all ids with act_threshold = the s-quantile of |silu(g)|
  predicted   host_sparse_ffn over exactly the above-threshold ids + the predictor's two mat-vecs
              (rank --rank, bf16 like the weights, as the engine stores them): a perfect predictor
  predicted-real  the same over the share of neurons a real predictor needs for recall 0.95 (measured on
              the SwiGLU bundled model: --predicted_active), i.e. predicted mode at about equal quality
and the bytes each must read (its floor at the measured bandwidth). Cases alternate within each
round; medians (min-max) over --repeats rounds. Writes results/threshold_layer_cpu.{json,md}.

  python benchmarks/bench_threshold_layer.py     # ~1 GiB of RAM, about a minute on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from ops import host_kernels as H  # noqa: E402
from ops.quant import to_weight  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
D, N_FF = 4096, 11008


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=9, help="rounds (medians over them)")
    p.add_argument("--sparsities", default="0.5,0.7,0.9", help="target FFN sparsities")
    p.add_argument("--rank", type=int, default=1024, help="predictor rank (fc1 [rank, d], fc2 [n_ff, rank])")
    p.add_argument("--tokens", type=int, default=8, help="distinct tokens rotated through (each its own x)")
    p.add_argument("--predicted_active", default="0.5:0.793,0.7:0.642",
                   help="sparsity:share pairs: a predictor as good as the SwiGLU bundled model's (recall 0.95) "
                        "computes this share of the neurons (bin/eval 'pred active'); timed as 'predicted, real'")
    p.add_argument("--out", default=str(RESULTS / "threshold_layer_cpu.json"))
    return p.parse_args(argv)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main(argv=None):
    a = parse_args(argv)
    rng = np.random.default_rng(0)
    mat = lambda r, c: to_weight((rng.standard_normal((r, c), np.float32) * c ** -0.5), "bfloat16")  # noqa: E731
    wg, wu, wd = mat(N_FF, D), mat(N_FF, D), mat(N_FF, D)
    fc1, fc2 = mat(a.rank, D), mat(N_FF, a.rank)
    xs = rng.standard_normal((a.tokens, D)).astype(np.float32)
    g = xs @ H._np_f32(wg).T
    absact = np.abs(H._np_act("swiglu", g))  # [tokens, n_ff]
    every = np.arange(N_FF, dtype=np.int32)
    row = D * 2  # bf16 bytes per row
    sparsities = [float(s) for s in a.sparsities.split(",")]
    cases = {"dense": []}
    for s in sparsities:
        cases[f"cats {s:.0%}"] = []
        cases[f"predicted {s:.0%}"] = []
    real = {float(k): float(v) for k, v in (kv.split(":") for kv in a.predicted_active.split(",") if kv)}
    for s in real:
        cases[f"predicted-real {s:.0%}"] = []
    thr = {s: [float(np.quantile(absact[t], s)) for t in range(a.tokens)] for s in sparsities}
    # A realistic predictor's list: the above-threshold neurons plus random others up to the measured share.
    extra = {}
    for s, share in real.items():
        ids_t = []
        for t in range(a.tokens):
            on = absact[t] > float(np.quantile(absact[t], s))
            off = np.nonzero(~on)[0]
            add = rng.choice(off, max(0, int(share * N_FF) - int(on.sum())), replace=False)
            ids_t.append(np.sort(np.concatenate([np.nonzero(on)[0], add])).astype(np.int32))
        extra[s] = ids_t
    active = {s: [np.nonzero(absact[t] > thr[s][t])[0].astype(np.int32) for t in range(a.tokens)] for s in sparsities}
    H.host_sparse_ffn("swiglu", wg, wu, wd, xs[0], every, N_FF)  # compile
    H.host_sparse_ffn("swiglu", wg, wu, wd, xs[0], every, N_FF, act_threshold=thr[sparsities[0]][0])
    H.host_matvec(fc1, xs[0])
    live = np.zeros(1, np.int64)

    def predicted(x, ids):  # the predictor's two mat-vecs, then the listed neurons
        H.host_matvec(fc2, np.maximum(H.host_matvec(fc1, x), 0))
        H.host_sparse_ffn("swiglu", wg, wu, wd, x, ids, len(ids))

    for r in range(a.repeats):
        t = r % a.tokens
        x = xs[t]
        cases["dense"].append(_time(lambda: H.host_sparse_ffn("swiglu", wg, wu, wd, x, every, N_FF)))
        for s in sparsities:
            cases[f"cats {s:.0%}"].append(_time(lambda: H.host_sparse_ffn(
                "swiglu", wg, wu, wd, x, every, N_FF, act_threshold=thr[s][t], live=live)))
            cases[f"predicted {s:.0%}"].append(_time(lambda: predicted(x, active[s][t])))
        for s in real:
            cases[f"predicted-real {s:.0%}"].append(_time(lambda: predicted(x, extra[s][t])))
    from benchmarks.roofline import host_read_bandwidth

    bw = host_read_bandwidth()  # bytes/s: the floor of each row is its bytes at this speed
    pred_bytes = (a.rank * D + N_FF * a.rank) * 2
    rows = []
    dense_ms = float(np.median(cases["dense"]))
    for name, ts in cases.items():
        kind, s = name.split()[0], (float(name.split()[1].rstrip("%")) / 100 if " " in name else 0.0)
        if kind == "dense":
            nbytes = 3 * N_FF * row
        elif kind == "cats":
            nbytes = N_FF * row + 2 * (1 - s) * N_FF * row
        elif kind == "predicted-real":
            nbytes = 3 * real[s] * N_FF * row + pred_bytes
        else:
            nbytes = 3 * (1 - s) * N_FF * row + pred_bytes
        med = float(np.median(ts))
        rows.append({"case": name, "ms_median": med, "ms_min": float(np.min(ts)), "ms_max": float(np.max(ts)),
                     "bytes": int(nbytes), "gb_per_s": nbytes / med / 1e6, "speedup_vs_dense": dense_ms / med,
                     "floor_ms": nbytes / bw * 1e3, "achieved_over_floor": nbytes / bw * 1e3 / med})
    md = [f"Read bandwidth {bw / 1e9:.1f} GB/s (floors: bytes / bandwidth).", "",
          "| case | ms (median, min-max) | bytes read | GB/s | x dense | floor ms | achieved/floor |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['case']} | {r['ms_median']:.2f} ({r['ms_min']:.2f}-{r['ms_max']:.2f}) | "
                  f"{r['bytes'] / 2**20:.1f} MiB | {r['gb_per_s']:.1f} | {r['speedup_vs_dense']:.2f} | "
                  f"{r['floor_ms']:.2f} | {r['achieved_over_floor']:.0%} |")
    table = "\n".join(md)
    print(table)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"layer": f"SwiGLU [{N_FF}, {D}] bf16", "predictor_rank": a.rank, "repeats": a.repeats,
            "read_bandwidth_gbps": bw / 1e9, "predicted_active": real,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(f"# {meta['layer']}, one decode token ({meta['machine']})\n\n{table}\n")


if __name__ == "__main__":
    main()

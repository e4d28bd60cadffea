"""TEAL-style input sparsity for attention (issue #13 item 2): does it measure better than FFN-only sparsity?

TEAL (arXiv 2408.14690) zeroes the small-magnitude entries of each projection's *input* (per-layer,
per-projection thresholds calibrated to a target), so a mat-vec reads only the weight columns of the
kept entries. This script measures both halves of that claim before the engine grows such a mode:

quality  the SwiGLU bundled model with its FFN thresholded to 50% (CATS, as its bundle), and on top the
         inputs of the fused q/k/v and of o_proj thresholded to 30/50/70% per layer and projection
         (calibrated on the training split, quantiles of |x|), held-out perplexity vs FFN-only;
speed    one LLaMA-7B layer's attention projections in bf16 (q/k/v [12288, 4096] fused, o [4096, 4096]),
         one token: the dense row mat-vec (host_matvec, today's path) against the input-sparse form
         (the matrices stored transposed, [in, out], and only the rows of kept inputs read: the down
         projection's axpy kernel, host_axpy_down), at 30/50/70% input sparsity.
Writes results/teal_attention_cpu.{json,md}.   python benchmarks/teal_attention.py   (about 2 minutes)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="0.3,0.5,0.7")
    p.add_argument("--max_tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=str(RESULTS / "teal_attention_cpu.json"))
    return p.parse_args(argv)


class _Inputs:
    """Wraps layers.linear: records or thresholds the input of the k-th projection of a trace
    (LLaMA: per layer the fused q/k/v, then o_proj)."""

    def __init__(self, original):
        self.original, self.k, self.record, self.thresholds = original, 0, None, None

    def __call__(self, x, w, b=None):
        import jax.numpy as jnp

        k = self.k
        self.k += 1
        if self.record is not None:
            self.record.setdefault(k, []).append(x)
        if self.thresholds is not None:
            x = jnp.where(jnp.abs(x) > self.thresholds[k], x, 0.0)
        return self.original(x, w, b)


def quality(a, targets) -> list[dict]:
    import jax
    import jax.numpy as jnp

    import powerinfer_jax as pij
    from offline.evaluate import read_text
    from offline.pipeline import corpus_text, tokenize
    from offline.profiler import make_windows
    from powerinfer_jax import layers
    from powerinfer_jax.bundle import load_bundle
    from powerinfer_jax.ffn import thresholded_ffn_fn
    from powerinfer_jax.metrics import perplexity
    from powerinfer_jax.model import forward

    bundle = load_bundle(str(REPO / "models" / "shakespeare-silu-llama-prepared"))
    dense = pij.load(bundle.model_dir, max_seq_len=a.window)
    cfg, bos = dense.cfg, dense.tokenizer.bos_token_id
    ffn = thresholded_ffn_fn(cfg, bundle.act_thresholds)
    heldout = tokenize(dense, read_text(None)[0])[: a.max_tokens + 1]
    calib = make_windows(tokenize(dense, corpus_text(None)), 256, bos)[:8]
    wrap = _Inputs(layers.linear)
    layers.linear = wrap
    try:
        wrap.record = {}
        pos = jnp.broadcast_to(jnp.arange(calib.shape[1]), calib.shape)
        forward(dense.params, cfg, jnp.asarray(calib), pos, ffn_fn=ffn)  # eager: records every projection input
        absx = {k: np.abs(np.concatenate([np.asarray(v).reshape(-1) for v in vs])) for k, vs in wrap.record.items()}
        wrap.record = None

        def scorer_for(thr):
            def body(p, t):
                wrap.k, wrap.thresholds = 0, thr  # runs while tracing: counts this trace's projections
                return forward(p, cfg, t[None], jnp.arange(t.shape[0])[None], ffn_fn=ffn)[0][0]

            fn = jax.jit(body)
            return lambda ids: np.asarray(fn(dense.params, jnp.asarray(np.asarray(ids, np.int32))))

        rows = []
        base = perplexity(scorer_for(None), heldout, a.window, bos)["perplexity"]
        rows.append({"attention_input_sparsity": 0.0, "perplexity": base, "vs_ffn_only_pct": 0.0})
        for s in targets:
            thr = {k: float(np.quantile(v, s)) for k, v in absx.items()}
            ppl = perplexity(scorer_for(thr), heldout, a.window, bos)["perplexity"]
            rows.append({"attention_input_sparsity": s, "perplexity": ppl, "vs_ffn_only_pct": 100 * (ppl / base - 1)})
            print(f"  attention inputs {s:.0%} sparse: ppl {ppl:.3f} ({100 * (ppl / base - 1):+.2f}% vs FFN-only)",
                  flush=True)
    finally:
        layers.linear = wrap.original
    return rows


def speed(a, targets) -> list[dict]:
    from benchmarks.roofline import host_read_bandwidth
    from ops import host_kernels as H
    from ops.quant import to_weight

    rng = np.random.default_rng(0)
    d = 4096
    shapes = {"qkv": (3 * d, d), "o": (d, d)}
    rows_w = {n: rng.standard_normal(s, np.float32) * d ** -0.5 for n, s in shapes.items()}
    w = {n: to_weight(m, "bfloat16") for n, m in rows_w.items()}  # [out, in]: today's layout
    wt = {n: to_weight(np.ascontiguousarray(m.T), "bfloat16") for n, m in rows_w.items()}  # [in, out]
    xs = rng.standard_normal((8, d)).astype(np.float32)
    every = np.arange(d, dtype=np.int32)
    bw = host_read_bandwidth()
    cases = {"dense (row mat-vec)": []} | {f"input-sparse {s:.0%} (axpy over kept rows)": [] for s in targets}
    for n in shapes:  # compile
        H.host_matvec(w[n], xs[0])
        H.host_axpy_down(wt[n], every, d, xs[:1])
    for r in range(a.repeats):
        x = xs[r % len(xs)]
        t0 = time.perf_counter()
        for n in shapes:
            H.host_matvec(w[n], x)
        cases["dense (row mat-vec)"].append((time.perf_counter() - t0) * 1e3)
        for s in targets:
            xz = np.where(np.abs(x) > np.quantile(np.abs(x), s), x, 0).astype(np.float32)[None]
            t0 = time.perf_counter()
            for n in shapes:
                H.host_axpy_down(wt[n], every, d, xz)  # rows of zero inputs are skipped, never read
            cases[f"input-sparse {s:.0%} (axpy over kept rows)"].append((time.perf_counter() - t0) * 1e3)
    total = sum(r * c for r, c in shapes.values()) * 2
    out, base = [], float(np.median(cases["dense (row mat-vec)"]))
    for name, ts in cases.items():
        s = 0.0 if name.startswith("dense") else float(name.split()[1].rstrip("%")) / 100
        nbytes = total * (1 - s)
        med = float(np.median(ts))
        out.append({"case": name, "ms": med, "bytes": int(nbytes), "speedup_vs_dense": base / med,
                    "achieved_over_floor": nbytes / bw * 1e3 / med})
    return out, bw


def main(argv=None):
    a = parse_args(argv)
    targets = [float(t) for t in a.targets.split(",")]
    q = quality(a, targets)
    sp, bw = speed(a, targets)
    lines = ["Quality: SwiGLU bundled model, FFN at 50% threshold sparsity (CATS), attention inputs thresholded on top; "
             f"held-out perplexity, {a.max_tokens} tokens.", "",
             "| attention input sparsity | perplexity | vs FFN-only |", "|---|---|---|"]
    lines += [f"| {r['attention_input_sparsity']:.0%} | {r['perplexity']:.3f} | {r['vs_ffn_only_pct']:+.2f}% |" for r in q]
    lines += ["", f"Speed: one LLaMA-7B layer's q/k/v + o projections, bf16, one token (read bandwidth {bw / 1e9:.1f} GB/s).",
              "", "| case | ms | bytes | x dense | achieved/floor |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['ms']:.2f} | {r['bytes'] / 2**20:.1f} MiB | {r['speedup_vs_dense']:.2f} | "
              f"{r['achieved_over_floor']:.0%} |" for r in sp]
    table = "\n".join(lines)
    print(table)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"quality": q, "speed": sp, "read_bandwidth_gbps": bw / 1e9,
                               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()

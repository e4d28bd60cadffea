"""FFN sparsity vs held-out perplexity of the two bundled models, by activation thresholds (issue #13).

For each target sparsity s, per-layer thresholds on |act(gate x)| are calibrated to s on the training
split (`offline.thresholds.calibrate`, as `bin/prepare --target_sparsity` does) and the held-out
perplexity is measured with the FFN activations at or below them zeroed (`ffn.thresholded_ffn_fn`:
the model the engine's oracle mode computes, equal to it within 1e-5 by tests/test_threshold_sparsity.py).
The SwiGLU model (models/shakespeare-silu-llama) gets its whole curve this way; the ReGLU model
(models/shakespeare-relu-llama) is already ~88% sparse by its ReLU, so its curve starts there (its
dense point) and thresholds only push beyond. Writes results/sparsity_curve.{json,md,png}.

  python benchmarks/sparsity_curve.py      # about 2 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
MODELS = {"SwiGLU (shakespeare-silu-llama)": REPO / "models" / "shakespeare-silu-llama",
          "ReGLU (shakespeare-relu-llama)": REPO / "models" / "shakespeare-relu-llama"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="0.3,0.4,0.5,0.6,0.7,0.8,0.85,0.9,0.93,0.95,0.97")
    p.add_argument("--max_tokens", type=int, default=8192, help="held-out tokens scored per point")
    p.add_argument("--window", type=int, default=128, help="tokens per window (as bin/eval)")
    p.add_argument("--calibration_tokens", type=int, default=32768)
    p.add_argument("--out", default=str(RESULTS / "sparsity_curve.json"))
    return p.parse_args(argv)


def curve(model_dir: Path, targets, a) -> dict:
    """Dense and thresholded perplexities of one model."""
    import powerinfer_jax as pij
    from offline import thresholds
    from offline.evaluate import read_text
    from offline.pipeline import corpus_text, tokenize
    from offline.profiler import make_windows
    from powerinfer_jax.engine import Engine
    from powerinfer_jax.ffn import thresholded_ffn_fn
    from powerinfer_jax.metrics import perplexity

    dense = pij.load(str(model_dir), max_seq_len=a.window)
    cfg, bos = dense.cfg, dense.tokenizer.bos_token_id
    heldout = tokenize(dense, read_text(None)[0])[: a.max_tokens + 1]
    train = tokenize(dense, corpus_text(None))
    windows = make_windows(train, 256, bos)[: a.calibration_tokens // 256]
    base = perplexity(dense, heldout, a.window, bos)["perplexity"]
    # The share of exact zeros (ReLU) is the sparsity at a threshold of 0.
    zero_share = float(np.mean([h for h in _zero_share(dense, cfg, windows[:16])]))
    points = [{"target": None, "sparsity": zero_share, "perplexity": base, "ppl_change_pct": 0.0, "thresholds": None}]
    for t in targets:
        if t <= zero_share + 0.005:
            continue  # a ReLU model is already this sparse at no cost
        cal = thresholds.calibrate(dense.params, cfg, windows, t, allow_relu=True)
        eng = Engine(cfg, dense.params, dense.tokenizer, max_seq_len=a.window,
                     ffn_fn=thresholded_ffn_fn(cfg, cal["values"]))
        ppl = perplexity(eng, heldout, a.window, bos)["perplexity"]
        points.append({"target": t, "sparsity": float(np.mean(cal["achieved"])), "perplexity": ppl,
                       "ppl_change_pct": 100 * (ppl / base - 1), "thresholds": cal["values"]})
        print(f"  {model_dir.name}: {t:.0%} -> ppl {ppl:.3f} ({100 * (ppl / base - 1):+.2f}%)", flush=True)
    return {"model": str(model_dir.relative_to(REPO)), "ffn_kind": cfg.ffn_kind, "dense_perplexity": base,
            "points": points}


def _zero_share(dense, cfg, windows):
    """Per layer, the share of activations that are zero (below 1e-12: the histogram's first bin; 0 for SwiGLU)."""
    from offline.thresholds import _histograms

    hist = _histograms(dense.params, cfg, ("ffn_act",), windows, 8)[:, 0]
    return list(hist[:, 0] / hist.sum(axis=1))


def main(argv=None):
    a = parse_args(argv)
    targets = [float(t) for t in a.targets.split(",")]
    res = {name: curve(path, targets, a) for name, path in MODELS.items()}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"max_tokens": a.max_tokens, "window": a.window, "calibration_tokens": a.calibration_tokens,
            "text": "Tiny Shakespeare, held-out last 10%", "machine": f"{os.cpu_count()} cores",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.write_text(json.dumps({**meta, "models": res}, indent=2))
    lines = ["| model | target | FFN sparsity | perplexity | vs dense |", "|---|---|---|---|---|"]
    for name, r in res.items():
        for p in r["points"]:
            tgt = "dense" if p["target"] is None else f"{p['target']:.0%}"
            lines.append(f"| {name} | {tgt} | {p['sparsity']:.1%} | {p['perplexity']:.3f} | {p['ppl_change_pct']:+.2f}% |")
    table = "\n".join(lines)
    print(table)
    out.with_suffix(".md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in res.items():
        xs = [p["sparsity"] for p in r["points"]]
        ys = [p["ppl_change_pct"] for p in r["points"]]
        ax.plot(xs, ys, "o-", label=name)
    ax.axhline(2, color="grey", ls=":", lw=1)
    ax.axhline(5, color="grey", ls="--", lw=1)
    ax.set_xlabel("FFN sparsity (share of neurons inactive per token)")
    ax.set_ylabel("held-out perplexity vs dense (%)")
    ax.set_title("Activation-threshold sparsity: SwiGLU vs ReGLU bundled models")
    ax.set_yscale("symlog", linthresh=1)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()

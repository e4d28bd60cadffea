#!/usr/bin/env python3
"""End-to-end decode throughput of the engine's configurations, side by side in one run.

  dense      everything on the device
  offload    llama.cpp `-ngl` semantics at the same device budget: the last N layers on the
             device, the other layers' dense FFNs on the host
  hybrid     predicted sparsity, hot neurons on the device by the bundle's MILP placement,
             cold neurons on the host
Runs on whatever JAX's default backend is (CPU here; GPU on a lent machine). Alternates the
configurations for --repeats rounds and reports medians. Prints a table and writes JSON.
"""

import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("bundle", None, "Prepared bundle (bin/prepare) of the model to measure.", required=True)
flags.DEFINE_float("budget_fraction", 0.35, "Device budget: fixed parts + this share of all FFN bytes.")
flags.DEFINE_integer("new_tokens", 64, "Tokens generated per round.")
flags.DEFINE_integer("repeats", 3, "Alternating rounds per configuration.")
flags.DEFINE_integer("max_seq_len", 256, "KV-cache length (also what the budget reserves for it).")
flags.DEFINE_string("prompt", "ROMEO:", "Prompt.")
flags.DEFINE_string("out", None, "JSON output path (default benchmarks/results/engine_<backend>.json).")


def main(argv):
    del argv
    import jax
    import numpy as np

    import powerinfer_jax as pij
    from powerinfer_jax import bundle as bundle_lib
    from powerinfer_jax import memory

    b = bundle_lib.load_bundle(FLAGS.bundle)
    cfg = pij.load_config(b.model_dir)
    ctx = FLAGS.max_seq_len
    ffn_total = memory.ffn_total_bytes(cfg, "float32")
    fixed_pred = sum(v for _, v in memory.fixed_groups(cfg, "float32", b.predictors.nbytes, ctx))
    fixed_dense = sum(v for _, v in memory.fixed_groups(cfg, "float32", 0, ctx))
    budget = fixed_pred + int(FLAGS.budget_fraction * ffn_total)
    per_layer = ffn_total // cfg.num_layers
    n_offload = int(max(0, budget - fixed_dense) // per_layer)
    makers = {
        "dense (all on device)": lambda: pij.load(b.model_dir, max_seq_len=ctx),
        f"offload (last {n_offload}/{cfg.num_layers} layers on device)": lambda: pij.load(
            b.model_dir, offload_layers=n_offload, max_seq_len=ctx),
        "hybrid predicted": lambda: pij.load(FLAGS.bundle, sparsity="predicted", device_memory_budget=budget,
                                             max_seq_len=ctx),
    }
    gen = dict(max_new_tokens=FLAGS.new_tokens, temperature=0.0, stop_at_eos=False)
    engines, errors = {}, {}
    for name, make in makers.items():
        try:  # one failing configuration must not hide the others' numbers
            e = make()
            e.generate(FLAGS.prompt, **gen)  # compile every bucket once
            engines[name] = e
        except Exception as err:  # noqa: BLE001 - reported in the output and the JSON
            errors[name] = f"{type(err).__name__}: {err}"
            print(f"{name} FAILED: {errors[name]}")
    rates = {k: [] for k in engines}
    extra = {}
    for _ in range(FLAGS.repeats):
        for name, e in engines.items():
            res = e.generate(FLAGS.prompt, **gen)
            rates[name].append(res.stats["decode_tokens_per_s"])
            if "ffn_total" in res.stats:
                s = res.stats
                extra[name] = {"computed_frac": s["ffn_computed"] / s["ffn_total"],
                               "hot_hit_rate": s["ffn_hot"] / max(s["ffn_computed"], 1),
                               "overflow": s.get("ffn_overflow", 0)}
    med = {k: float(np.median(v)) for k, v in rates.items()}
    base = next((med[k] for k in med if k.startswith("offload")), next(iter(med.values())))
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); budget {budget / 2**20:.2f} MiB "
          f"({FLAGS.budget_fraction:.0%} of FFN bytes)\n")
    print("| configuration | decode tok/s (median) | ms/token | vs offload | computed FFN | hot hit |")
    print("|---|---|---|---|---|---|")
    for k, v in med.items():
        x = extra.get(k, {})
        print(f"| {k} | {v:.1f} | {1000 / v:.2f} | {v / base:.2f}x | "
              f"{x.get('computed_frac', 1.0):.3f} | {x.get('hot_hit_rate', float('nan')):.3f} |")
    out = FLAGS.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"engine_{jax.default_backend()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores", "budget_bytes": budget,
                   "budget_fraction": FLAGS.budget_fraction, "tok_s_median": med, "tok_s_all": rates,
                   "sparse_stats": extra, "errors": errors, "new_tokens": FLAGS.new_tokens}, f, indent=2)


if __name__ == "__main__":
    app.run(main)

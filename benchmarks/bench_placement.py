"""Solve time of the placement MILP on a LLaMA-7B-sized instance (32 layers x 11008 neurons).

Frequencies are synthetic: per layer, rates follow a power law over a random permutation of the
neurons, with a per-layer exponent (some layers skewed, some flat, as profiles of ReLU-fied models
are), scaled so each layer's mean rate is --mean_rate. Prints a markdown table and writes JSON.

    python benchmarks/bench_placement.py
    python benchmarks/bench_placement.py --batches=64 --min_hot=512,2048,4096
"""

import json
import os
import platform
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from offline import placement  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("layers", 32, "Number of FFN layers (LLaMA-7B: 32).")
flags.DEFINE_integer("n_ff", 11008, "FFN width per layer (LLaMA-7B: 11008).")
flags.DEFINE_integer("d_model", 4096, "Model width; a neuron costs 3 rows (gate, up, down) of it.")
flags.DEFINE_integer("bytes_per_param", 2, "Bytes per weight on the device (2 = f16/bf16).")
flags.DEFINE_float("budget_frac", 0.30, "Device budget for FFN neurons, fraction of all FFN bytes.")
flags.DEFINE_float("mean_rate", 0.10, "Mean activation rate per layer of the synthetic rates.")
flags.DEFINE_float("exp_lo", 0.2, "Smallest per-layer power-law exponent (flattest layer).")
flags.DEFINE_float("exp_hi", 1.2, "Largest per-layer power-law exponent (most skewed layer).")
flags.DEFINE_list("batches", ["64", "256"], "Neuron batch sizes to solve with (comma-separated).")
flags.DEFINE_list("min_hot", ["512", "4096"], "min_hot_per_split_layer values (comma-separated).")
flags.DEFINE_float("time_limit_s", 30.0, "HiGHS time limit per solve, in seconds.")
flags.DEFINE_float("mip_rel_gap", 1e-4, "Relative MIP gap at which HiGHS stops.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic frequencies.")
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        "placement.json"), "Where to write the JSON results.")


def synthetic_rates(rng, layers, n_ff, mean_rate, exp_lo, exp_hi):
    """Per-layer power-law activation rates in [0, 1] with the given mean."""
    out = []
    for _ in range(layers):
        raw = (rng.permutation(n_ff) + 1.0) ** -rng.uniform(exp_lo, exp_hi)
        # Bisect the scale so the mean after clipping to 1 is mean_rate (clipping lowers it).
        lo, hi = 0.0, mean_rate / raw.mean() * 1e3
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if np.minimum(raw * mid, 1.0).mean() < mean_rate else (lo, mid)
        out.append(np.minimum(raw * hi, 1.0))
    return out


def main(argv):
    del argv
    rng = np.random.default_rng(FLAGS.seed)
    freqs = synthetic_rates(rng, FLAGS.layers, FLAGS.n_ff, FLAGS.mean_rate, FLAGS.exp_lo,
                            FLAGS.exp_hi)
    neuron_bytes = 3 * FLAGS.d_model * FLAGS.bytes_per_param
    total_bytes = FLAGS.layers * FLAGS.n_ff * neuron_bytes
    budget = int(FLAGS.budget_frac * total_bytes)

    placement.solve([np.ones(4)], 1, 2, batch=1)  # import cvxpy/highspy outside the timings
    greedy = placement.greedy_hottest(freqs, neuron_bytes, budget)
    rows = []
    for min_hot in map(int, FLAGS.min_hot):
        g_counts = np.asarray(greedy.hot_counts)
        g_bad = int(np.sum((g_counts > 0) & (g_counts < min_hot)))
        for batch in map(int, FLAGS.batches):
            t0 = time.perf_counter()
            p = placement.solve(freqs, neuron_bytes, budget, batch=batch,
                                min_hot_per_split_layer=min_hot, time_limit_s=FLAGS.time_limit_s,
                                mip_rel_gap=FLAGS.mip_rel_gap)
            wall = time.perf_counter() - t0
            assert p.bytes_used <= budget
            n_batches = sum(-(-f.size // batch) for f in freqs)
            rows.append(dict(
                batch=batch, min_hot=min_hot, variables=n_batches + FLAGS.layers,
                solve_time_s=round(wall, 3), status=p.status, method=p.method,
                mip_gap=p.mip_gap, objective=p.objective, greedy_objective=greedy.objective,
                objective_vs_greedy=p.objective / greedy.objective,
                mass_on_device=p.objective / p.total_mass,
                split_layers=len(p.split_layers),
                empty_layers=int(sum(c == 0 for c in p.hot_counts)),
                greedy_layers_violating=g_bad, bytes_used=p.bytes_used))

    print(f"\n{FLAGS.layers} layers x {FLAGS.n_ff} neurons, {neuron_bytes} B/neuron, budget "
          f"{budget / 2**30:.2f} GiB ({FLAGS.budget_frac:.0%} of FFN), "
          f"mean rate {FLAGS.mean_rate}\n")
    print("| batch | min_hot | variables | solve time (s) | status | gap | objective / greedy "
          "| mass on device | split / empty layers | greedy layers violating min_hot |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gap = "n/a" if r["mip_gap"] is None else f"{r['mip_gap']:.2e}"
        print(f"| {r['batch']} | {r['min_hot']} | {r['variables']} | {r['solve_time_s']:.2f} "
              f"| {r['status']} | {gap} | {r['objective_vs_greedy']:.5f} "
              f"| {r['mass_on_device']:.4f} | {r['split_layers']} / {r['empty_layers']} "
              f"| {r['greedy_layers_violating']} |")

    from importlib.metadata import version
    result = dict(
        config={k: FLAGS[k].value for k in ("layers", "n_ff", "d_model", "bytes_per_param",
                                            "budget_frac", "mean_rate", "exp_lo", "exp_hi",
                                            "time_limit_s", "mip_rel_gap", "seed")},
        neuron_bytes=neuron_bytes, budget_bytes=budget, greedy_objective=greedy.objective,
        total_mass=greedy.total_mass, rows=rows,
        env=dict(python=platform.python_version(), cvxpy=version("cvxpy"),
                 highspy=version("highspy"), cpus=os.cpu_count(),
                 loadavg_1m=os.getloadavg()[0], machine=platform.machine()),
    )
    os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
    with open(FLAGS.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)

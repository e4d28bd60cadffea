#!/usr/bin/env python3
"""One decode step of a LLaMA-7B-shaped FFN layer: hybrid sparse vs dense, side by side.

d=4096, n_ff=11008, ReGLU, float32, batch 1. Active neurons (~10%) are drawn from a power law
so the hottest neurons fire most; the hottest `--hot_fraction` of neurons sit on the device
(XLA gather path on the CPU backend), the rest on the host (numba kernels via the callback),
both inside one jitted function, exactly as the engine's decode step runs them. Dense is the
plain XLA FFN. Configurations alternate; medians reported. Prints a table, writes JSON.
"""

import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("d", 4096, "Hidden size.")
flags.DEFINE_integer("n_ff", 11008, "FFN neurons.")
flags.DEFINE_float("activity", 0.10, "Mean fraction of neurons active per token.")
flags.DEFINE_float("hot_fraction", 0.30, "Share of neurons placed on the device (the hottest).")
flags.DEFINE_integer("repeats", 30, "Timed calls per configuration (alternating).")
flags.DEFINE_integer("tokens", 16, "Distinct random tokens (masks) cycled through.")
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        "hybrid_layer_cpu.json"), "JSON output path.")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ops.host_kernels import host_ffn_callback
    from ops.select import capacity_bucket, compact_mask
    from ops.xla_sparse import sparse_ffn_xla
    from powerinfer_jax.ffn import dense_ffn
    from powerinfer_jax.params import FFNParams

    d, n = FLAGS.d, FLAGS.n_ff
    rng = np.random.default_rng(0)
    scale = float(1 / np.sqrt(d))
    wg = (rng.standard_normal((n, d), np.float32) * scale)
    wu = (rng.standard_normal((n, d), np.float32) * scale)
    wd = (rng.standard_normal((n, d), np.float32) * scale)
    # Power-law firing rates with the requested mean; neuron ids sorted hottest first.
    rates = 1.0 / np.arange(1, n + 1) ** 0.9
    for _ in range(50):  # rescale until the mean is right despite clipping the hottest at 1
        rates = np.clip(rates * FLAGS.activity / rates.mean(), 0, 1)
    n_hot = int(FLAGS.hot_fraction * n)
    hot_ids, cold_ids = np.arange(n_hot), np.arange(n_hot, n)
    masks = rng.random((FLAGS.tokens, n)) < rates
    xs = rng.standard_normal((FLAGS.tokens, d)).astype(np.float32)
    cap_hot = capacity_bucket(int(masks[:, :n_hot].sum(1).max()), n_hot)
    cap_cold = capacity_bucket(int(masks[:, n_hot:].sum(1).max()), n - n_hot)

    dense_p = FFNParams(w_up=jnp.asarray(wu), w_down_t=jnp.asarray(wd), w_gate=jnp.asarray(wg))
    hot_g, hot_u, hot_d = (jnp.asarray(w[:n_hot]) for w in (wg, wu, wd))
    cold = [np.ascontiguousarray(w[n_hot:]) for w in (wg, wu, wd)]

    @jax.jit
    def dense(p, x):
        return dense_ffn(p, "reglu", x)

    @jax.jit
    def hybrid(hg, hu, hd, x, mask):
        idx, valid, _ = compact_mask(mask[:n_hot], cap_hot)
        y = sparse_ffn_xla("reglu", hg, hu, hd, x, idx, valid)
        cidx, _, ccount = compact_mask(mask[n_hot:], cap_cold)
        return y + host_ffn_callback("reglu", cold[0], cold[1], cold[2], x, cidx, jnp.minimum(ccount, cap_cold))

    # On the CPU backend the "device" is this same CPU: its hot rows can go through the fused
    # numba kernel too (zero-copy views of the device arrays), instead of XLA's gather + dot.
    hot_views = [np.asarray(a) for a in (hot_g, hot_u, hot_d)]

    @jax.jit
    def hybrid_numba(x, mask):
        idx, _, count = compact_mask(mask[:n_hot], cap_hot)
        y = host_ffn_callback("reglu", hot_views[0], hot_views[1], hot_views[2], x, idx, jnp.minimum(count, cap_hot))
        cidx, _, ccount = compact_mask(mask[n_hot:], cap_cold)
        return y + host_ffn_callback("reglu", cold[0], cold[1], cold[2], x, cidx, jnp.minimum(ccount, cap_cold))

    # Correctness first: hybrid equals the masked dense FFN (ReLU zeros of unselected neurons aside).
    x0, m0 = jnp.asarray(xs[0]), jnp.asarray(masks[0])
    g = xs[0] @ wg.T
    h = np.maximum(g, 0) * (xs[0] @ wu.T) * masks[0]
    ref = h @ wd
    got = np.asarray(hybrid(hot_g, hot_u, hot_d, x0, m0))
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert rel < 1e-4, rel
    rel_numba = float(np.abs(np.asarray(hybrid_numba(x0, m0)) - ref).max() / np.abs(ref).max())
    assert rel_numba < 1e-4, rel_numba
    dense(dense_p, x0).block_until_ready()

    times = {"dense": [], "hybrid": [], "hybrid_numba_device": []}
    for r in range(FLAGS.repeats):
        x, m = jnp.asarray(xs[r % FLAGS.tokens]), jnp.asarray(masks[r % FLAGS.tokens])
        t0 = time.perf_counter()
        dense(dense_p, x).block_until_ready()
        times["dense"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hybrid(hot_g, hot_u, hot_d, x, m).block_until_ready()
        times["hybrid"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hybrid_numba(x, m).block_until_ready()
        times["hybrid_numba_device"].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    active = float(masks.mean())
    hot_share = float(masks[:, :n_hot].sum() / masks.sum())
    res = {
        "machine": f"{platform.machine()} {jax.default_backend()}, {os.cpu_count()} cores", "d": d, "n_ff": n,
        "activity_measured": active, "hot_fraction": FLAGS.hot_fraction, "hot_hit_rate": hot_share,
        "capacities": [cap_hot, cap_cold], "rel_err_vs_masked_dense": rel,
        "median_ms": med, "min_ms": {k: float(np.min(v)) * 1e3 for k, v in times.items()},
        "speedup_dense_over_hybrid": med["dense"] / med["hybrid"],
        "speedup_dense_over_hybrid_numba_device": med["dense"] / med["hybrid_numba_device"],
    }
    print(f"| config | median ms | min ms |\n|---|---|---|")
    for k in times:
        print(f"| {k} | {med[k]:.2f} | {res['min_ms'][k]:.2f} |")
    print(f"activity {active:.3f}, hot-hit rate {hot_share:.3f}, speedup {res['speedup_dense_over_hybrid']:.2f}x "
          f"(XLA device part), {res['speedup_dense_over_hybrid_numba_device']:.2f}x (numba device part)")
    os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    app.run(main)

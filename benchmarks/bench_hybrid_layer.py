#!/usr/bin/env python3
"""One decode step of a LLaMA-7B-shaped FFN layer through the engine's hybrid runtime: host time,
device time and the layer's time, with the host part overlapped or not.

d=4096, n_ff=11008, ReGLU, batch 1. Active neurons (~10%) are drawn from a power law so the
hottest neurons fire most; the hottest `--hot_fraction` of neurons sit on the device, the rest on
the host. Everything runs through `powerinfer_jax.sparse_ffn` exactly as the decode step does:

  dense            the plain XLA dense FFN (f32)
  device_only      the hot part alone (accelerator layout: compact hot rows, XLA gather + dot)
  host_only        the cold part alone (numba over the host matrices, a serial callback)
  layer_serial     accelerator layout, overlap off: hot part, then the host part
  layer_overlap    accelerator layout, overlap on: launch host, hot part, collect (`ops.host_async`)
  cpu_one_call     CPU layout: whole shared matrices, one numba call over hot + cold neurons
Overlap means the layer takes max(host, device), not their sum; `hidden` is the share of the
shorter part that the overlapped layer hid. On this 2-core CPU the "device" (XLA) and the host
(numba) share the same cores, so the CPU layout's single call is the engine's choice here; the
overlap is for a GPU (benchmarks/gpu_check.sh runs this script there).
A trace of the overlapped runs (`ops.host_async.TRACE`) gives, per layer call, when the host
started and ended relative to the launch and to the moment the device part finished (collect).
Configurations alternate; medians reported. Prints a table, writes JSON.
"""

import json
import os
import platform
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("d", 4096, "Hidden size.")
flags.DEFINE_integer("n_ff", 11008, "FFN neurons.")
flags.DEFINE_float("activity", 0.10, "Mean fraction of neurons active per token.")
flags.DEFINE_float("hot_fraction", 0.30, "Share of neurons placed on the device (the hottest).")
flags.DEFINE_integer("repeats", 30, "Timed calls per configuration (alternating).")
flags.DEFINE_integer("tokens", 16, "Distinct random tokens (masks) cycled through.")
flags.DEFINE_string("out", None, "JSON output path (default: results/hybrid_layer_<backend>.json).")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ops import host_async
    from ops.host_kernels import host_ffn_callback
    from ops.select import capacity_bucket
    from powerinfer_jax.ffn import dense_ffn
    from powerinfer_jax.params import FFNParams
    from powerinfer_jax.sparse_ffn import HybridRuntime, LayerPlan, split_ffn

    d, n = FLAGS.d, FLAGS.n_ff
    rng = np.random.default_rng(0)
    scale = float(1 / np.sqrt(d))
    wg, wu, wd = (rng.standard_normal((n, d), np.float32) * scale for _ in range(3))
    # Power-law firing rates with the requested mean; neuron ids sorted hottest first.
    rates = 1.0 / np.arange(1, n + 1) ** 0.9
    for _ in range(50):  # rescale until the mean is right despite clipping the hottest at 1
        rates = np.clip(rates * FLAGS.activity / rates.mean(), 0, 1)
    n_hot = int(FLAGS.hot_fraction * n)
    hot_ids = np.arange(n_hot, dtype=np.int32)
    masks = rng.random((FLAGS.tokens, n)) < rates
    xs = rng.standard_normal((FLAGS.tokens, 1, d)).astype(np.float32)
    cap_hot = capacity_bucket(int(masks[:, :n_hot].sum(1).max()), n_hot)
    cap_cold = n - n_hot
    plan = LayerPlan(n_hot, n - n_hot, cap_hot, cap_cold, 0.0)
    host = FFNParams(w_up=wu, w_down_t=wd, w_gate=wg)
    split = split_ffn("reglu", host, hot_ids, None, False, plan)  # accelerator layout
    shared = split_ffn("reglu", host, hot_ids, None, True, plan) if jax.default_backend() == "cpu" else None
    cfg = SimpleNamespace(ffn_kind="reglu", is_sparse_capable=True)
    on_gpu = jax.default_backend() == "gpu"
    kernel = "pallas" if on_gpu else "xla"  # the device part as the engine runs it there
    rt = {o: HybridRuntime(cfg, "oracle", device_kernel=kernel, overlap=o) for o in (False, True)}
    dense_p = FFNParams(w_up=jnp.asarray(wu), w_down_t=jnp.asarray(wd), w_gate=jnp.asarray(wg))

    def lists(mask):
        """The hot positions, cold neuron ids and their counts of a token's mask (what the
        predictor's selection produces inside the step)."""
        from ops.select import compact_mask

        idx, valid, count = compact_mask(mask[:n_hot], cap_hot)
        cidx, _, ccount = compact_mask(mask[n_hot:], cap_cold)
        return idx, valid, count, cidx + n_hot, ccount

    @jax.jit
    def dense(p, x):
        return dense_ffn(p, "reglu", x)

    @jax.jit
    def device_only(p, x, mask):
        idx, valid, _, _, _ = lists(mask)
        return rt[True]._hot(p.hot, x, idx, valid)

    @jax.jit
    def host_only(x, mask):
        _, _, _, cids, ccount = lists(mask)
        h = p_split_host
        return host_ffn_callback("reglu", h.w_gate, h.w_up, h.w_down_t, x, cids, ccount)

    p_split_host = split.host

    def layer(overlap):
        @jax.jit
        def f(p, x, mask):
            idx, valid, _, cids, ccount = lists(mask)
            return rt[overlap]._split(p, x, lambda xd: rt[overlap]._hot(p.hot, xd, idx, valid), cids, ccount)
        return f

    layer_serial, layer_overlap = layer(False), layer(True)

    @jax.jit
    def cpu_one_call(p, x, mask):
        from ops.cpu_sparse import sparse_ffn_rows
        from powerinfer_jax.sparse_ffn import merge_prefix

        idx, _, count, cids, ccount = lists(mask)
        ids = merge_prefix(idx, jnp.minimum(count, cap_hot), cids, ccount)
        w = p.shared
        return sparse_ffn_rows("reglu", w.w_gate, w.w_up, w.w_down_t, None, x, ids, jnp.minimum(count, cap_hot) + ccount)

    configs = {
        "dense": lambda x, m: dense(dense_p, x),
        "device_only": lambda x, m: device_only(split, x, m),
        "host_only": lambda x, m: host_only(x, m),
        "layer_serial": lambda x, m: layer_serial(split, x, m),
        "layer_overlap": lambda x, m: layer_overlap(split, x, m),
    }
    if not on_gpu:  # the CPU layout reads the shared matrices in place: CPU backend only
        configs["cpu_one_call"] = lambda x, m: cpu_one_call(shared, x, m)
    # Correctness first: every layer variant equals the masked dense FFN.
    x0, m0 = jnp.asarray(xs[0]), jnp.asarray(masks[0])
    ref = (np.maximum(xs[0] @ wg.T, 0) * (xs[0] @ wu.T) * masks[0]) @ wd
    errs = {}
    for k in [c for c in ("layer_serial", "layer_overlap", "cpu_one_call") if c in configs]:
        errs[k] = float(np.abs(np.asarray(configs[k](x0, m0)) - ref).max() / np.abs(ref).max())
        assert errs[k] < 1e-4, (k, errs[k])
    for f in configs.values():
        jax.block_until_ready(f(x0, m0))

    times = {k: [] for k in configs}
    trace = []
    for r in range(FLAGS.repeats):
        x, m = jnp.asarray(xs[r % FLAGS.tokens]), jnp.asarray(masks[r % FLAGS.tokens])
        for k, f in configs.items():
            host_async.TRACE = trace if k == "layer_overlap" else None
            t0 = time.perf_counter()
            jax.block_until_ready(f(x, m))
            times[k].append(time.perf_counter() - t0)
    host_async.TRACE = None
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    host_ms, dev_ms = med["host_only"], med["device_only"]
    hidden = (host_ms + dev_ms - med["layer_overlap"]) / min(host_ms, dev_ms)
    res = {
        "machine": f"{platform.machine()} {jax.default_backend()}, {os.cpu_count()} cores "
                   f"({jax.devices()[0].device_kind})", "d": d, "n_ff": n,
        "activity_measured": float(masks.mean()), "hot_fraction": FLAGS.hot_fraction,
        "hot_hit_rate": float(masks[:, :n_hot].sum() / masks.sum()), "capacities": [cap_hot, cap_cold],
        "rel_err_vs_masked_dense": errs, "median_ms": med,
        "min_ms": {k: float(np.min(v)) * 1e3 for k, v in times.items()},
        "overlap_hidden_share_of_shorter_part": hidden,
        "trace_ms": _trace_summary(trace),
    }
    print("| config | median ms | min ms |\n|---|---|---|")
    for k in times:
        print(f"| {k} | {med[k]:.2f} | {res['min_ms'][k]:.2f} |")
    print(f"host {host_ms:.2f} ms, device {dev_ms:.2f} ms: sum {host_ms + dev_ms:.2f}, max {max(host_ms, dev_ms):.2f}; "
          f"overlapped layer {med['layer_overlap']:.2f} (serial {med['layer_serial']:.2f}); hid {hidden:.0%} of the "
          f"shorter part")
    print("trace (medians, ms from launch):", res["trace_ms"])
    out = FLAGS.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"hybrid_layer_{jax.default_backend()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)


def _trace_summary(trace):
    """Per overlapped call, ms after the launch: host start/end, device part done (collect called),
    result back; medians over calls."""
    import numpy as np

    by = {}
    for name, ticket, t in trace:
        by.setdefault(ticket, {})[name] = t
    rows = [e for e in by.values() if len(e) == 5]
    if not rows:
        return {}
    keys = ("host_start", "host_end", "collect", "collected")
    out = {k: float(np.median([(e[k] - e["launch"]) * 1e3 for e in rows])) for k in keys}
    # The host ran while the device worked when it started before the device part was done.
    out["host_started_before_device_done_share"] = float(np.mean([e["host_start"] < e["collect"] for e in rows]))
    out["calls"] = len(rows)
    return out


if __name__ == "__main__":
    app.run(main)

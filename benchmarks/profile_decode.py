#!/usr/bin/env python3
"""Where a hybrid decode step's time goes (the synthetic LLaMA-7B-shaped model, or the bundled one).

Builds engines that differ by one part of the FFN and times them side by side (alternating
rounds, medians), so the differences attribute the step's time to its parts:
  no_ffn         attention, norms, head, sampling; the FFN returns zeros
  predictor      no_ffn + each layer's predictor and the hot/cold active-set selection
  hybrid         predictor + the sparse FFN kernels (hot part and cold part through the callbacks)
  dense          the dense engine, for reference
Each part's bytes over its time give the bandwidth it reaches; compare with the measured read
bandwidth. Prints a table and writes benchmarks/results/profile_decode_<backend>.json.
"""

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_enum("model", "synthetic", ["synthetic", "bundled"], "Which model to profile.")
flags.DEFINE_integer("layers", 4, "Layers of the synthetic model.")
flags.DEFINE_float("budget", 0.3, "Device budget (fraction of FFN bytes) of the hybrid engine.")
flags.DEFINE_integer("new_tokens", 12, "Greedy tokens per round.")
flags.DEFINE_integer("repeats", 5, "Alternating rounds.")
flags.DEFINE_enum("format", "bfloat16", ["float32", "bfloat16", "float16", "int8", "int4"], "Weight format of both engines.")
flags.DEFINE_string("out", None, "JSON path (default benchmarks/results/profile_decode_<backend>_<model>_<format>.json).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax
    import jax.numpy as jnp
    import numpy as np

    import powerinfer_jax  # noqa: F401
    from benchmarks import roofline, suite
    from benchmarks.subjects import bundled_subject, synthetic_subject
    from powerinfer_jax import memory
    from ops.cpu_sparse import predicted_ffn_rows
    from ops.select import compact_mask
    from powerinfer_jax.engine import Engine
    from powerinfer_jax.sparse_ffn import predict_logits

    if FLAGS.model == "synthetic":
        s = synthetic_subject(FLAGS.layers, 4096, 1024, prompt_len=32)
    else:
        s = bundled_subject(os.path.join(REPO, "models", "shakespeare-relu-llama-prepared"), 32,
                            os.path.join(REPO, "data", "tinyshakespeare.txt"))
    cfg = s.cfg
    ctx = 256
    fmt = FLAGS.format
    b = suite.plan_budget(s, FLAGS.budget, ctx, fmt)
    hybrid = suite.build_engines(s, b, ctx, fmt)["hybrid"]
    dense = Engine(cfg, suite.device_params(s.host_params, fmt), max_seq_len=ctx)

    def zeros_ffn(i, p, x_norm, x_resid, rows=None):
        return jnp.zeros_like(x_norm), {}

    def predictor_ffn(i, p, x_norm, x_resid, rows=None):
        """Only the predictor and the selection; the result feeds the output as 0 * count."""
        B, T, d = x_norm.shape
        plan = p.plan
        if p.shared is not None:  # the CPU engine: its one host call, stopped after the selection
            w = p.shared
            y, count, _ = predicted_ffn_rows(cfg.ffn_kind, p.predictor.fc1, p.predictor.fc2, plan.threshold, p.hot_ids,
                                             p.cold_ids, w.w_gate, w.w_up, w.w_down_t, w.b_up,
                                             x_resid.reshape(B * T, d), x_norm.reshape(B * T, d), compute_rows=False)
            return y.reshape(B, T, d) + 0.0 * count.astype(jnp.float32), {}
        active = jnp.any(predict_logits(p.predictor, x_resid.reshape(B * T, d)) >= plan.threshold, axis=0)
        hot, cold = active[:plan.n_hot], active[plan.n_hot:]  # the predictor's outputs are in hot, cold order
        n = jnp.int32(0)  # uses the index lists themselves, so XLA cannot drop the compaction
        if plan.n_hot:
            n += compact_mask(hot, plan.hot_capacity)[0].sum()
        if plan.n_cold:
            n += compact_mask(cold, plan.cold_capacity)[0].sum()
        return jnp.zeros_like(x_norm) + 0.0 * n.astype(jnp.float32), {}

    no_ffn_layers = [dataclasses.replace(lp, ffn=jnp.zeros((1,), jnp.float32)) for lp in hybrid.params.layers]
    engines = {
        "no_ffn": Engine(cfg, dataclasses.replace(hybrid.params, layers=no_ffn_layers), max_seq_len=ctx,
                         ffn_fn=zeros_ffn),
        "predictor": Engine(cfg, hybrid.params, max_seq_len=ctx, ffn_fn=predictor_ffn),
        "hybrid": hybrid,
        "dense": dense,
    }
    prompt = s.prompt_ids
    for e in engines.values():
        suite.run_engine(e, prompt, FLAGS.new_tokens)
    runs = {k: [] for k in engines}
    computed = []
    for _ in range(FLAGS.repeats):
        for k, e in engines.items():
            r = suite.run_engine(e, prompt, FLAGS.new_tokens)
            runs[k].append(1000 / r["decode_tok_s"])
            if k == "hybrid":
                computed.append(r["ffn_computed_per_token"])
    ms = {k: float(np.median(v)) for k, v in runs.items()}
    bw = max(roofline.host_read_bandwidth(), roofline.device_read_bandwidth())
    attend = 64
    table = s.host_in(fmt).embed.fmt
    base = roofline.decode_bytes(cfg, fmt, ffn_neurons_per_token=0, attend_len=attend, table_dtype=table)
    nb = memory.neuron_bytes(cfg, fmt)
    ffn_bytes = float(np.median(computed)) * nb
    pred_bytes = roofline.predictor_bytes(s.predictor_shapes(), fmt)  # as the engine stores them, not f32
    parts = {
        "attention, head, norms, sampling (no_ffn)": (ms["no_ffn"], base),
        "predictors + selection (predictor - no_ffn)": (ms["predictor"] - ms["no_ffn"], pred_bytes),
        "sparse FFN kernels + callbacks (hybrid - predictor)": (ms["hybrid"] - ms["predictor"], ffn_bytes),
        "whole hybrid step": (ms["hybrid"], base + pred_bytes + ffn_bytes),
        "whole dense step": (ms["dense"], base + cfg.num_layers * cfg.intermediate_size * nb),
    }
    print(f"{s.name} ({fmt}): backend {jax.default_backend()}; read bandwidth {bw / 1e9:.1f} GB/s; budget {FLAGS.budget:.0%}; "
          f"{float(np.median(computed)):.0f} FFN neurons computed per token\n")
    print("| part | ms/token | MB read | GB/s reached | floor ms | achieved/floor |\n|---|---|---|---|---|---|")
    rows = []
    for name, (t, nbytes) in parts.items():
        floor = 1000 * nbytes / bw
        print(f"| {name} | {t:.2f} | {nbytes / 1e6:.1f} | {nbytes / max(t, 1e-9) / 1e6:.1f} | {floor:.2f} | "
              f"{floor / max(t, 1e-9):.0%} |")
        rows.append({"part": name, "ms": t, "bytes": nbytes, "floor_ms": floor})
    out = FLAGS.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"profile_decode_{jax.default_backend()}_{FLAGS.model}_{fmt}.json")
    with open(out, "w") as f:
        json.dump({"model": s.name, "backend": jax.default_backend(), "bandwidth_gbps": bw / 1e9, "budget": FLAGS.budget,
                   "ms_all": runs, "parts": rows, "ffn_computed_per_token": computed}, f, indent=2)


if __name__ == "__main__":
    app.run(main)

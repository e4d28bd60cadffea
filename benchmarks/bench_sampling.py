#!/usr/bin/env python3
"""The engine's sampler (`sampling.sample_rows`) against the sort-based rule it replaced, side by side.

Per vocabulary size (the bundled model's 2048, LLaMA-2's 32000, LLaMA-3's 128256) and batch (1, 16 rows):
milliseconds per call of the jitted sampler in "temperature" mode (a draw from softmax(logits / T)) and
"cut" mode (top-p 0.95 on every row, top-k 40 on half of them), for
  * bisect: `sample_rows` (the cuts by bisection over the logits' bits, one uniform per row), and
  * sort:   the same rule with a full sort per row for the cuts (`sampling.cut_rows_ref`) and a Gumbel
            draw per logit (`jax.random.categorical`): what the engine ran before.
Rounds alternate between the two; medians reported. Prints a table, writes JSON and markdown.
"""

import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from powerinfer_jax import cli  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS


def define_flags() -> None:
    """The script's flags (defined when it runs, not on import)."""
    flags.DEFINE_list("vocab", ["2048", "32000", "128256"], "Vocabulary sizes.")
    flags.DEFINE_list("rows", ["1", "16"], "Batch rows.")
    flags.DEFINE_integer("rounds", 5, "Alternating rounds (medians reported).", lower_bound=1)
    flags.DEFINE_integer("calls", 10, "Calls timed per round.", lower_bound=1)
    flags.DEFINE_string("out", None, "Output stem (default benchmarks/results/sampling_<backend>).")


def sort_gumbel_rows(logits, keys, temperature, top_k, top_p, mode):
    """The rule of `sample_rows` as the engine computed it before: sort-based cuts, a Gumbel draw."""
    import jax
    import jax.numpy as jnp

    from powerinfer_jax.sampling import cut_rows_ref

    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    z = (logits - jnp.max(logits, axis=-1, keepdims=True)) / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    if mode == "cut":
        z = cut_rows_ref(z, top_k, top_p)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, z).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


def main(argv):
    cli.check_no_arguments(argv)
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from powerinfer_jax.sampling import sample_rows

    impls = {"bisect": sample_rows, "sort": sort_gumbel_rows}
    rows_out, rng = [], np.random.default_rng(0)
    for V in map(int, FLAGS.vocab):
        for B in map(int, FLAGS.rows):
            logits = jnp.asarray(rng.standard_normal((B, V)).astype(np.float32) * 3)
            keys = jax.random.split(jax.random.PRNGKey(0), B)
            temps = jnp.full(B, 0.8, jnp.float32)
            top_k = jnp.asarray([40 if b % 2 else 0 for b in range(B)], jnp.int32)
            top_p = jnp.full(B, 0.95, jnp.float32)
            for mode in ("temperature", "cut"):
                fns = {name: jax.jit(functools.partial(fn, mode=mode)) for name, fn in impls.items()}
                args = (logits, keys, temps, top_k, top_p)
                for fn in fns.values():
                    fn(*args).block_until_ready()
                times = {name: [] for name in fns}
                for _ in range(FLAGS.rounds):
                    for name, fn in fns.items():
                        t0 = time.perf_counter()
                        for _ in range(FLAGS.calls):
                            out = fn(*args)
                        out.block_until_ready()
                        times[name].append((time.perf_counter() - t0) / FLAGS.calls * 1e3)
                row = {"vocab": V, "rows": B, "mode": mode,
                       **{f"{name}_ms": float(np.median(t)) for name, t in times.items()}}
                row["speedup"] = row["sort_ms"] / row["bisect_ms"]
                rows_out.append(row)
                print(f"V={V:6d} rows={B:2d} {mode:11s} bisect {row['bisect_ms']:8.2f} ms  sort {row['sort_ms']:8.2f} ms"
                      f"  {row['speedup']:.1f}x", flush=True)
    backend = jax.default_backend()
    stem = FLAGS.out or os.path.join(REPO, "benchmarks", "results", f"sampling_{backend}")
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows_out}, f, indent=1)
    lines = [f"Sampling per call ({meta['machine']}, jax {meta['jax']}, {meta['date']}); "
             "`python benchmarks/bench_sampling.py`", "",
             "| vocab | rows | mode | sample_rows (bisection) ms | sort + Gumbel ms | speedup |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['vocab']} | {r['rows']} | {r['mode']} | {r['bisect_ms']:.2f} | {r['sort_ms']:.2f} | "
              f"{r['speedup']:.1f}x |" for r in rows_out]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {stem}.{{json,md}}")
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)

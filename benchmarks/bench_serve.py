#!/usr/bin/env python3
"""Serving throughput and latency with continuous batching (`powerinfer_jax.batching`), 1/4/16 clients.

Each client is a thread that sends its requests one after another (greedy, `--max_tokens` tokens,
EOS ignored so every request is the same length; each client has its own prompt, cut from the
corpus for the bundled model, random ids for the synthetic one) to one `ContinuousBatcher`, the
engine side of `bin/serve` (the HTTP layer adds a constant per token and is not measured here).
Per configuration: throughput (generated tokens/s over the wall time of all requests), time to first
token (submit to first token event, p50) and inter-token time (gaps between a request's token
events, p50/p99), and for sparse engines the fraction of FFN neurons computed per row (the union of
the batch's predicted masks per layer, so it grows with the batch). Engines:

  bundled dense / bundled hybrid   the bundled model (f32; --hybrid_dtype) and its bundle's predictors, --budget hot
  bundled dense_bfloat16           the bundled model in its stored precision (what `pij.load` gives)
  synthetic dense / hybrid         the LLaMA-7B-shaped model (benchmarks/synthetic.py), --budget hot

Every configuration is warmed up first (all batch sizes and spans compiled), then measured
`--repeats` times alternating with the others; medians reported. Also: how often a request's
greedy tokens differ between running alone and in a batch of 16 (predicted sparsity's masks
depend on the batch; dense and oracle must not differ). Prints a table, writes JSON and markdown.
"""

import json
import os
import platform
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from powerinfer_jax import cli  # noqa: E402
from powerinfer_jax.batching import MIXED_CHUNK, STAGE_ROWS  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS


def define_flags() -> None:
    """The script's flags (defined when it runs, not on import: tests import its helpers)."""
    flags.DEFINE_list("models", ["bundled", "synthetic"], "Which models: bundled, synthetic.")
    flags.DEFINE_list("clients", ["1", "4", "16"], "Concurrent clients per configuration.")
    flags.DEFINE_integer("requests_per_client", 2, "Requests each client sends, one after another.", lower_bound=1)
    flags.DEFINE_integer("max_tokens", 32, "Tokens per request (bundled model).", lower_bound=2)
    flags.DEFINE_integer("synthetic_max_tokens", 12, "Tokens per request (synthetic model).", lower_bound=2)
    flags.DEFINE_integer("prompt_len", 24, "Prompt tokens per request.", lower_bound=1)
    flags.DEFINE_integer("repeats", 3, "Measured rounds per configuration (alternating).", lower_bound=1)
    flags.DEFINE_float("budget", 0.3, "Hybrid engines: device budget as a fraction of FFN bytes.", lower_bound=0.0,
                       upper_bound=1.0)
    flags.DEFINE_integer("max_seq_len", 256, "KV-cache length.", lower_bound=16)
    flags.DEFINE_integer("synthetic_layers", 4, "Layers of the synthetic 7B-shaped model (~0.8 GB each, f32).",
                         lower_bound=1)
    flags.DEFINE_string("bundle", os.path.join(REPO, "models", "shakespeare-relu-llama-prepared"), "The bundled bundle.")
    flags.DEFINE_string("corpus", os.path.join(REPO, "data", "tinyshakespeare.txt"), "Text prompts are cut from.")
    flags.DEFINE_list("dense_dtypes", ["float32", "bfloat16"], "Weight precisions of the dense engines (the "
                      "float32 one is `dense`, the others `dense_<dtype>`).")
    flags.DEFINE_string("hybrid_dtype", "float32", "Weight precision of the hybrid engine.")
    flags.DEFINE_enum("kv_dtype", "float32", ["auto", "float32", "bfloat16", "float16"],
                      "KV-cache precision of every engine: float32 (as the earlier runs), or auto (each engine's "
                      "weights' half precision, float32 for float32 weights: what pij.load and bin/serve default to).")
    flags.DEFINE_integer("mixed_chunk", MIXED_CHUNK, "Prompt tokens a decode step carries while sequences run "
                         "(ContinuousBatcher.mixed_chunk); 0: separate prompt chunks between decode steps.",
                         lower_bound=0)
    flags.DEFINE_integer("stage_rows", STAGE_ROWS, "Waiting prompts whose pieces one decode step can carry "
                         "(ContinuousBatcher.stage_rows).", lower_bound=1)
    flags.DEFINE_list("carry", [], "Batcher settings compared side by side, as mixed_chunk x stage_rows (e.g. "
                      "32x1,24x4): each engine gets one batcher per setting, named engine@WxR, in the same "
                      "alternating rounds. Default: the one setting --mixed_chunk/--stage_rows give.")
    flags.DEFINE_string("out", None, "Output stem (default benchmarks/results/serve_<backend>).")


def _percentile(xs, q):
    import numpy as np

    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def run_round(batcher, prompts, clients: int, per_client: int, max_tokens: int) -> dict:
    """`clients` threads each sending `per_client` requests; timings of every token event."""
    from powerinfer_jax.batching import RequestParams

    params = RequestParams(max_tokens=max_tokens, stop_at_eos=False)
    ttft, gaps, texts, tokens = [], [], {}, [0]
    lock = threading.Lock()
    before = dict(batcher.stats())

    def client(c: int) -> None:
        for r in range(per_client):
            stamps, done = [], threading.Event()
            t0 = time.perf_counter()

            def on_event(ev):
                if ev.kind == "token":
                    stamps.append(time.perf_counter())
                else:
                    texts[(c, r)] = ev.token_ids if ev.kind == "done" else None
                    done.set()

            batcher.submit(prompts[c % len(prompts)], params, on_event)
            done.wait(600)
            with lock:
                tokens[0] += len(stamps)
                if stamps:
                    ttft.append(stamps[0] - t0)
                    gaps.extend(b - a for a, b in zip(stamps, stamps[1:]))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = batcher.stats()
    d = {k: after.get(k, 0) - before.get(k, 0)
         for k in ("steps", "rows_computed", "ffn_computed", "ffn_total", "mixed_steps")}
    out = {"tokens": tokens[0], "wall_s": wall, "tok_s": tokens[0] / wall, "ttft_p50_ms": 1e3 * _percentile(ttft, 50),
           "itl_p50_ms": 1e3 * _percentile(gaps, 50), "itl_p99_ms": 1e3 * _percentile(gaps, 99),
           "mean_batch": d["rows_computed"] / max(d["steps"], 1), "carrying": d["mixed_steps"] / max(d["steps"], 1),
           "texts": texts}
    if d["ffn_total"]:  # per step and layer: the neurons of the union of the batch's masks, and all neurons
        out["ffn_computed_fraction"] = d["ffn_computed"] / d["ffn_total"]
    return out


def _engines(name: str, log):
    """(engines by config name, prompts, tokens per request, description) for one model."""
    import numpy as np

    from benchmarks import subjects
    from benchmarks.suite import build_engines, plan_budget
    from powerinfer_jax.engine import Engine
    from powerinfer_jax.loading import to_device

    if name == "bundled":
        s = subjects.bundled_subject(FLAGS.bundle, 4 * FLAGS.prompt_len * 16, FLAGS.corpus)
        n_tokens = FLAGS.max_tokens
        ids = s.prompt_ids[1:]
        prompts = [[s.prompt_ids[0]] + ids[k * FLAGS.prompt_len:(k + 1) * FLAGS.prompt_len] for k in range(16)]
    else:
        s = subjects.synthetic_subject(FLAGS.synthetic_layers, 4096, 1024, FLAGS.prompt_len, log=log)
        n_tokens = FLAGS.synthetic_max_tokens
        rng = np.random.default_rng(7)
        prompts = [rng.integers(3, s.cfg.vocab_size, FLAGS.prompt_len).tolist() for _ in range(16)]
    engines = {("dense" if dt == "float32" else f"dense_{dt}"): Engine(s.cfg, to_device(s.host_in(dt)),
                                                                       max_seq_len=FLAGS.max_seq_len,
                                                                       kv_dtype=kv_for(dt))
               for dt in FLAGS.dense_dtypes}
    b = plan_budget(s, FLAGS.budget, FLAGS.max_seq_len)
    engines["hybrid"] = build_engines(s, b, FLAGS.max_seq_len, FLAGS.hybrid_dtype,
                                      kv_for(FLAGS.hybrid_dtype))["hybrid"]
    hot = sum(len(h) for h in b.hot_indices) / (s.cfg.num_layers * s.cfg.intermediate_size)
    return engines, prompts, n_tokens, f"{s.description}; hybrid hot {hot:.1%}"


def kv_for(weights_dtype: str) -> str:
    """The KV-cache precision --kv_dtype gives an engine whose weights are `weights_dtype` ("auto": as
    pij.load decides for a checkpoint)."""
    from powerinfer_jax.loading import kv_dtype_for

    return FLAGS.kv_dtype if FLAGS.kv_dtype != "auto" else kv_dtype_for(weights_dtype)


def bench_model(name: str, clients: list[int], log=print) -> dict:
    """Every engine x client count for one model, alternating rounds; plus batch-dependence of tokens."""
    import numpy as np

    from powerinfer_jax.batching import ContinuousBatcher, RequestParams

    engines, prompts, n_tokens, description = _engines(name, log)
    batchers = {}
    for k, e in engines.items():
        for label, (width, stage_rows) in carry_settings(FLAGS.carry, FLAGS.mixed_chunk, FLAGS.stage_rows):
            batchers[k + label] = ContinuousBatcher(e, max_batch=max(clients), prefill_chunk=64,
                                                    mixed_chunk=width or None, stage_rows=stage_rows).start()
    try:
        for k, b in batchers.items():  # warm-up: compile every batch size and span these rounds reach
            for c in clients:
                log(f"[{name}] warm-up {k} x{c}")
                run_round(b, prompts, c, 1, n_tokens)
        runs = {(k, c): [] for k in batchers for c in clients}
        for rep in range(FLAGS.repeats):
            for (k, c) in runs:
                r = run_round(batchers[k], prompts, c, FLAGS.requests_per_client, n_tokens)
                runs[(k, c)].append(r)
                log(f"[{name}] round {rep + 1}: {k} x{c}: {r['tok_s']:.1f} tok/s, itl p50 {r['itl_p50_ms']:.1f} ms")
        rows = []
        for (k, c), rs in runs.items():
            row = {"engine": k, "clients": c}
            for key in ("tok_s", "ttft_p50_ms", "itl_p50_ms", "itl_p99_ms", "mean_batch", "carrying",
                        "ffn_computed_fraction"):
                vals = [r[key] for r in rs if key in r]
                if vals:
                    row[key] = float(np.median(vals))
                    row[key + "_range"] = [float(min(vals)), float(max(vals))]
            rows.append(row)
        differ = {}
        for k, b in batchers.items():  # each prompt alone vs in the largest round: the same greedy tokens?
            together = runs[(k, max(clients))][0]["texts"]
            alone = {c: b.generate(prompts[c], RequestParams(max_tokens=n_tokens, stop_at_eos=False), 600).token_ids
                     for c in range(max(clients))}
            same = [alone[c] == together[(c, 0)] for c in range(max(clients))]
            differ[k] = {"compared": len(same), "differing": len(same) - sum(same)}
            log(f"[{name}] {k}: {differ[k]['differing']}/{len(same)} requests' tokens differ alone vs batched")
        return {"model": name, "description": description, "tokens_per_request": n_tokens, "rows": rows,
                "batched_vs_alone": differ, "goals": _goals(rows)}
    finally:
        for b in batchers.values():
            b.stop()


def carry_settings(carry: list[str], mixed_chunk: int, stage_rows: int) -> list[tuple[str, tuple[int, int]]]:
    """(name suffix, (mixed_chunk, stage_rows)) per batcher setting: "" and the flags' one without --carry."""
    if not carry:
        return [("", (mixed_chunk, stage_rows))]
    out = []
    for item in carry:
        try:
            width, rows = (int(v) for v in item.lower().split("x"))
        except ValueError:
            from powerinfer_jax.errors import ArgumentError

            raise ArgumentError(f"--carry: {item!r} is not mixed_chunk x stage_rows, e.g. 24x4") from None
        out.append((f"@{width}x{rows}", (width, rows)))
    return out


def _goals(rows) -> dict:
    get = {(r["engine"], r["clients"]): r for r in rows}
    out = {}
    lo, hi = min(r["clients"] for r in rows), max(r["clients"] for r in rows)
    for k in sorted({r["engine"] for r in rows}):
        if (k, lo) in get and (k, hi) in get:
            out[f"{k}_throughput_x{hi}_over_x{lo}"] = get[(k, hi)]["tok_s"] / get[(k, lo)]["tok_s"]
            out[f"{k}_itl_p99_x{hi}_over_itl_p50_x{lo}"] = get[(k, hi)]["itl_p99_ms"] / get[(k, lo)]["itl_p50_ms"]
    # Hybrid against the dense engine: the f32 one when it ran, else the first other precision (without --carry).
    dense = "dense" if any(k == "dense" for k, _ in get) else next(
        (k for k, _ in sorted(get) if k.startswith("dense_") and "@" not in k), None)
    for c in sorted({lo, hi}):
        if ("hybrid", c) in get and (dense, c) in get:
            out[f"hybrid_over_{dense}_throughput_x{c}"] = get[("hybrid", c)]["tok_s"] / get[(dense, c)]["tok_s"]
    return out


def to_markdown(res: dict) -> str:
    if res.get("bf16_dot") == "host":  # a CPU without bf16 dot instructions: the split-dot setting is unused
        bf16 = "bf16 products of several rows in the host kernels (no bf16 dot instructions)"
    else:
        bf16 = (f"bf16 split dot in {res.get('bf16_split_parts', 3)} parts (prompt rows: "
                f"{res.get('prompt_bf16_parts', res.get('bf16_split_parts', 3))})")
    lines = [f"Serving benchmark ({res['machine']}, jax {res['jax']}, {res['date']}); `{res['command']}`; "
             f"{bf16}; KV cache {res.get('kv_dtype', 'float32')}",
             ""]
    for m in res["models"]:
        lines += [f"### {m['model']}: {m['description']}; {m['tokens_per_request']} tokens per request", "",
                  "| engine | clients | tok/s | TTFT p50 ms | inter-token p50 ms | p99 ms | mean batch | "
                  "steps carrying prompt tokens | FFN neurons computed per step |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            ffn = f"{r['ffn_computed_fraction']:.1%}" if "ffn_computed_fraction" in r else "-"
            carrying = f"{r['carrying']:.0%}" if "carrying" in r else "-"
            lines.append(f"| {r['engine']} | {r['clients']} | {r['tok_s']:.1f} | {r['ttft_p50_ms']:.0f} | "
                         f"{r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} | {r['mean_batch']:.1f} | {carrying} | "
                         f"{ffn} |")
        lines += ["", "Ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in m["goals"].items()),
                  "Batched vs alone (greedy, first request of each client): " +
                  ", ".join(f"{k} {v['differing']}/{v['compared']} differ" for k, v in m["batched_vs_alone"].items()),
                  ""]
    return "\n".join(lines)


def main(argv):
    cli.check_no_arguments(argv)
    clients = sorted({int(c) for c in FLAGS.clients})
    if not clients or min(clients) < 1:
        from powerinfer_jax.errors import ArgumentError

        raise ArgumentError("--clients must list positive integers")
    import jax

    from ops.linear import bf16_split_parts, cpu_has_bf16_dot, prompt_bf16_parts

    t0 = time.time()
    models = [bench_model(m, clients) for m in FLAGS.models]
    for m in models:
        for r in m["rows"]:
            r.pop("texts", None)
    res = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "backend": jax.default_backend(),
           "jax": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": " ".join(["python benchmarks/bench_serve.py", *sys.argv[1:]]), "wall_s": time.time() - t0,
           "mixed_chunk": FLAGS.mixed_chunk, "stage_rows": FLAGS.stage_rows, "bf16_split_parts": bf16_split_parts(),
           "prompt_bf16_parts": prompt_bf16_parts(), "kv_dtype": FLAGS.kv_dtype, "models": models,
           "bf16_dot": "host" if jax.default_backend() == "cpu" and not cpu_has_bf16_dot() else "xla"}
    md = to_markdown(res)
    print("\n" + md)
    stem = FLAGS.out or os.path.join(REPO, "benchmarks", "results", f"serve_{jax.default_backend()}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(md + "\n")
    print(f"wrote {stem}.{{json,md}}")
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)

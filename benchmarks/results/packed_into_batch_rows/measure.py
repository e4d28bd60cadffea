"""Packed prompts prefilled straight into their batch rows (new) against a staging cache + row insert (old).

Usage (from the repository root): python benchmarks/results/packed_into_batch_rows/measure.py OLD_CHECKOUT [pairs]
OLD_CHECKOUT: a checkout of the commit before (git worktree add /tmp/old 91efec6). The two versions are different
code, so each round is its own process, in ABBA order: one bundled bf16 engine (float32 cache, as bench_serve),
warm-up, then 3 rounds of bench_serve's 16 clients x 2 requests of 32 tokens and 3 rounds of one client. Prints
per process the medians (tok/s, inter-token p50/p99 at 16 clients, p50 at 1 client), the paired ratios, and
whether both versions gave the same texts.
"""
import json, os, subprocess, sys
import numpy as np

ROUND = r'''
import os, sys, json
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import numpy as np
from absl import flags
import bench_serve as bs
bs.define_flags(); flags.FLAGS(["x"])
import powerinfer_jax.batching as B
from powerinfer_jax.engine import Engine
from powerinfer_jax.loading import to_device
from benchmarks import subjects
F = flags.FLAGS
s = subjects.bundled_subject(F.bundle, 4 * F.prompt_len * 16, F.corpus)
ids = s.prompt_ids[1:]
prompts = [[s.prompt_ids[0]] + ids[k * F.prompt_len:(k + 1) * F.prompt_len] for k in range(16)]
b = B.ContinuousBatcher(Engine(s.cfg, to_device(s.host_in("bfloat16")), max_seq_len=256), max_batch=16,
                        prefill_chunk=64).start()
for c in (1, 16): bs.run_round(b, prompts, c, 1, 32)
many = [bs.run_round(b, prompts, 16, 2, 32) for _ in range(3)]
one = [bs.run_round(b, prompts, 1, 2, 32) for _ in range(3)]
b.stop()
med = lambda rs, k: float(np.median([r[k] for r in rs]))
print("RESULT " + json.dumps({"tok_s": med(many, "tok_s"), "p50": med(many, "itl_p50_ms"), "p99": med(many, "itl_p99_ms"),
      "one_p50": med(one, "itl_p50_ms"), "one_tok_s": med(one, "tok_s"),
      "texts": sorted((str(k), v) for k, v in many[0]["texts"].items())}))
'''


def run(checkout: str) -> dict:
    out = subprocess.run([sys.executable, "-c", ROUND], cwd=checkout, capture_output=True, text=True, check=True)
    return json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:])


def main() -> None:
    old_dir, pairs = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2
    new_dir = os.getcwd()
    res = {"old": [], "new": []}
    for i in range(pairs):
        for k in (("old", "new") if i % 2 == 0 else ("new", "old")):
            r = run(old_dir if k == "old" else new_dir)
            res[k].append(r)
            print(f"{k}: tok/s {r['tok_s']:.1f} p50 {r['p50']:.2f} p99 {r['p99']:.2f} | one client p50 "
                  f"{r['one_p50']:.2f} ms ({r['one_tok_s']:.1f} tok/s)", flush=True)
    for key in ("tok_s", "p50", "p99", "one_p50"):
        o, n = (np.array([r[key] for r in res[v]]) for v in ("old", "new"))
        print(f"{key}: old median {np.median(o):.2f}, new {np.median(n):.2f}, paired new/old {np.median(n / o):.3f}")
    ratio = lambda r: r["p99"] / r["one_p50"]  # noqa: E731
    print("p99 at 16 over one client's p50: old", [round(ratio(r), 2) for r in res["old"]], "new",
          [round(ratio(r), 2) for r in res["new"]])
    print("same texts:", all(a["texts"] == b["texts"] for a in res["old"] for b in res["new"]))


if __name__ == "__main__":
    main()

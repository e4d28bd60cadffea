"""Where do the slowest inter-token gaps of a 16-client round come from? Every program and gap of live rounds, timed.

Usage: REPO=<checkout> python benchmarks/results/packed_into_batch_rows/probe.py [rounds]  (run from that checkout)
One bundled bf16 engine (float32 cache), a 16-row batcher; after a warm-up, `rounds` rounds of bench_serve's 16
clients x 2 requests of 32 tokens. Each decode loop turn is timed, and each program inside it (blocking on its
result: "step", "mixed" (carrying a packed chunk), "chunk" (a prompt alone), "insert", "move"). Prints per round
tok/s, inter-token p50/p99, the 8 slowest gaps with what ran in them, program medians (count, median, max ms)
and the loop's own time outside the programs.
"""
import os, sys, time, gc, threading
REPO = os.environ.get("REPO", "/work/main")
sys.path.insert(0, REPO); sys.path.insert(0, os.path.join(REPO, "benchmarks"))
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
W = int(os.environ.get("W", "32"))
b = B.ContinuousBatcher(Engine(s.cfg, to_device(s.host_in("bfloat16")), max_seq_len=256), max_batch=16,
                        prefill_chunk=64, mixed_chunk=W).start()
STEPS = []; CUR = [None]
orig_step, orig_call, orig_exe = B.ContinuousBatcher._step_once, B.ContinuousBatcher._call, B.ContinuousBatcher._executable
def step_once(self):
    info = {"t0": time.perf_counter(), "prog": [], "row": [], "rows": len(self._running()), "gc": gc.get_count()}
    CUR[0] = info
    orig_step(self)
    info["t1"] = time.perf_counter()
    STEPS.append(info)
def call(self, name, *a, span):
    t = time.perf_counter(); r = orig_call(self, name, *a, span=span); jax_block(r)
    CUR[0]["row"].append((name, time.perf_counter() - t)); return r
def jax_block(r):
    import jax; jax.block_until_ready(r)
def exe(self, name, args, static):
    f = orig_exe(self, name, args, static)
    def g(*a):
        t = time.perf_counter(); r = f(*a); jax_block(r)
        CUR[0]["prog"].append((name, time.perf_counter() - t)); return r
    return g
B.ContinuousBatcher._step_once, B.ContinuousBatcher._call, B.ContinuousBatcher._executable = step_once, call, exe
gcs = []
gc.callbacks.append(lambda phase, info: gcs.append((phase, info["generation"], time.perf_counter())))
for c in (1, 16): bs.run_round(b, prompts, c, 1, 32)
allg = []
for rep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 4):
    STEPS.clear(); gcs.clear()
    r = bs.run_round(b, prompts, 16, 2, 32)
    print("round tok/s %.1f p50 %.2f p99 %.2f" % (r["tok_s"], r["itl_p50_ms"], r["itl_p99_ms"]))
    # gap attributed to step k = t1[k] - t1[k-1] (emits happen at the end of a step)
    t1 = np.array([x["t1"] for x in STEPS])
    d = np.diff(t1) * 1e3
    top = np.argsort(d)[::-1][:8]
    for i in top:
        x = STEPS[i + 1]
        between = (x["t0"] - STEPS[i]["t1"]) * 1e3
        g = [(p, round((te - STEPS[i]["t1"]) * 1e3, 2)) for p, gen, te in gcs if STEPS[i]["t1"] <= te <= x["t1"] and p == "stop"]
        print("  gap %.2f  idle-before %.2f  rows %d  prog %s  row %s gc %s" % (d[i], between, x["rows"],
              [(n, round(t * 1e3, 2)) for n, t in x["prog"]], [(n, round(t * 1e3, 2)) for n, t in x["row"]], g))
    kinds = {}
    for x in STEPS:
        for n, t in x["prog"]: kinds.setdefault(n, []).append(t * 1e3)
    print("  prog medians", {k: (len(v), round(float(np.median(v)), 2), round(float(np.max(v)), 2)) for k, v in kinds.items()})
    print("  step overhead (step - prog - row) median %.2f" % np.median([(x["t1"] - x["t0"]) * 1e3 - sum(t for _, t in x["prog"] + x["row"]) * 1e3 for x in STEPS]))
b.stop()

"""Rows refilled in place (commit 04f88d4) against the previous batcher (e911ae8), in one process, alternating rounds.

Usage (from the repository root, with the old batcher checked out beside it):
    git worktree add /tmp/old e911ae8
    OLD_TREE=/tmp/old python benchmarks/results/rows_in_place_ab/measure.py 10
Both batchers run over the same bundled bf16 engine; each round is bench_serve's 16 clients x 2 requests of 32 tokens.
Prints each batcher's tok/s per round, medians, row moves per round and the median paired new/old ratio.
"""
import os, sys, time, importlib.util
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, REPO); sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import numpy as np
from absl import flags
import bench_serve as bs
bs.define_flags(); flags.FLAGS(["x"])
import powerinfer_jax.batching as new_b
OLD = os.path.join(os.environ.get("OLD_TREE", "/tmp/old"), "powerinfer_jax", "batching.py")
spec = importlib.util.spec_from_file_location("old_batching", OLD)
old_b = importlib.util.module_from_spec(spec); sys.modules["old_batching"] = old_b; spec.loader.exec_module(old_b)
from powerinfer_jax.engine import Engine
from powerinfer_jax.loading import to_device
from benchmarks import subjects
F = flags.FLAGS
s = subjects.bundled_subject(F.bundle, 4 * F.prompt_len * 16, F.corpus)
ids = s.prompt_ids[1:]
prompts = [[s.prompt_ids[0]] + ids[k * F.prompt_len:(k + 1) * F.prompt_len] for k in range(16)]
e = Engine(s.cfg, to_device(s.host_in("bfloat16")), max_seq_len=256)
B = {"old": old_b.ContinuousBatcher(e, max_batch=16, prefill_chunk=64).start(),
     "new": new_b.ContinuousBatcher(e, max_batch=16, prefill_chunk=64).start()}
moves = {k: 0 for k in B}
for k, b in B.items():
    call = b._call
    def c(name, *a, _k=k, _call=call, **kw):
        if name == "move": moves[_k] += 1
        return _call(name, *a, **kw)
    b._call = c
for k, b in B.items():
    for c in (1, 16): bs.run_round(b, prompts, c, 1, 32)
res = {k: [] for k in B}
for rep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 8):
    for k in (("old", "new") if rep % 2 == 0 else ("new", "old")):
        m0 = moves[k]
        r = bs.run_round(B[k], prompts, 16, 2, 32)
        res[k].append((r["tok_s"], r["itl_p50_ms"], r["itl_p99_ms"], moves[k] - m0))
for b in B.values(): b.stop()
for k, v in res.items():
    a = np.array(v)
    print(k, "tok/s", np.round(a[:, 0], 1), "median %.1f" % np.median(a[:, 0]),
          "itl p50 %.2f p99 %.2f moves/round %.1f" % (np.median(a[:, 1]), np.median(a[:, 2]), a[:, 3].mean()))
print("paired new/old tok/s", np.median(np.array(res["new"])[:, 0] / np.array(res["old"])[:, 0]))

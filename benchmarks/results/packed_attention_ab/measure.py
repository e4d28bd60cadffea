"""A packed prompt chunk's attention in the host kernel (new) against XLA's every-row attention (old), in one process.

Usage (from the repository root): python benchmarks/results/packed_attention_ab/measure.py 8
Two batchers over one bundled bf16 engine's weights; "old" traces its programs with the packed chunk's attention kept
in XLA (every chunk token against every staging row), "new" with the host kernel (commit of this directory). Each
round is bench_serve's 16 clients x 2 requests of 32 tokens, alternating ABBA. Prints tok/s and inter-token p50/p99
per round, the paired ratios, one client's inter-token p50 after it, and whether both produced the same texts.
"""
import os, sys, time
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, REPO); sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import numpy as np
from absl import flags
import bench_serve as bs
bs.define_flags(); flags.FLAGS(["x"])
import powerinfer_jax.layers as L
import powerinfer_jax.batching as B
from powerinfer_jax.engine import Engine
from powerinfer_jax.loading import to_device
from benchmarks import subjects
MODE = ["new"]
real = L.uses_host_attention
def uha(rows, tokens, dtype, span_bytes=0, _real=real):
    import traceback
    if MODE[0] == "old" and any(f.name == "_attend_packed" for f in traceback.extract_stack(limit=4)):
        return False
    return _real(rows, tokens, dtype, span_bytes)
L.uses_host_attention = uha
F = flags.FLAGS
s = subjects.bundled_subject(F.bundle, 4 * F.prompt_len * 16, F.corpus)
ids = s.prompt_ids[1:]
prompts = [[s.prompt_ids[0]] + ids[k * F.prompt_len:(k + 1) * F.prompt_len] for k in range(16)]
dt = os.environ.get("DT", "bfloat16")
params = to_device(s.host_in(dt))
Bs = {k: B.ContinuousBatcher(Engine(s.cfg, params, max_seq_len=256), max_batch=16, prefill_chunk=64).start()
      for k in ("old", "new")}
for k, b in Bs.items():
    MODE[0] = k
    for c in (1, 16): bs.run_round(b, prompts, c, 1, 32)
res = {k: [] for k in Bs}
for rep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 8):
    for k in (("old", "new") if rep % 2 == 0 else ("new", "old")):
        MODE[0] = k
        r = bs.run_round(Bs[k], prompts, 16, 2, 32)
        res[k].append((r["tok_s"], r["itl_p50_ms"], r["itl_p99_ms"], r["texts"]))
    MODE[0] = "new"
one = [bs.run_round(Bs["new"], prompts, 1, 2, 32) for _ in range(3)]
for b in Bs.values(): b.stop()
for k, v in res.items():
    a = np.array([x[:3] for x in v])
    print(k, "tok/s", np.round(a[:, 0], 1), "median %.1f" % np.median(a[:, 0]),
          "| itl p50 %.2f | p99" % np.median(a[:, 1]), np.round(a[:, 2], 1), "median %.2f" % np.median(a[:, 2]))
paired = lambda i: np.median(np.array([x[i] for x in res["new"]]) / np.array([x[i] for x in res["old"]]))  # noqa
print("paired new/old tok/s %.3f  p99 %.3f" % (paired(0), paired(2)))
print("one client itl p50", [round(o["itl_p50_ms"], 2) for o in one], "tok/s", [round(o["tok_s"], 1) for o in one])
print("same texts old/new:", all(a[3] == b[3] for a, b in zip(res["old"], res["new"])))

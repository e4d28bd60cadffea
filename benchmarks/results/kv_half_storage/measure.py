"""Decode-step programs over an f32 against a bf16 KV cache, alternating calls (medians, ms).

Usage (from the repository root): python benchmarks/results/kv_half_storage/measure.py {bundled|synthetic} CALLS
Every row sits at its span's last slot, so attention reads the whole span. The "before" numbers in result.txt were
measured with this script while bf16 caches were still stored as bf16 (the host attention kernel already read them).
"""
import os, sys, time
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, REPO); sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import numpy as np, jax, jax.numpy as jnp
from absl import flags
import bench_serve as bs
bs.define_flags(); flags.FLAGS(["x"])
import powerinfer_jax.batching as B
from powerinfer_jax.engine import Engine
from powerinfer_jax.loading import to_device
from benchmarks import subjects
F = flags.FLAGS
model = sys.argv[1]; calls = int(sys.argv[2])
if model == "bundled":
    s = subjects.bundled_subject(F.bundle, 64, F.corpus); max_len = 1024; cases = [(1, 1024), (16, 256), (16, 1024)]
else:
    s = subjects.synthetic_subject(4, 32000, 1024, 32); max_len = 1024; cases = [(1, 1024), (16, 1024)]
params = to_device(s.host_in("bfloat16"))
exes = {}
for kv in ("float32", "bfloat16"):
    b = B.ContinuousBatcher(Engine(s.cfg, params, max_seq_len=max_len, kv_dtype=kv), max_batch=16, prefill_chunk=64)
    for rows, span in cases:
        name, prog, args, static = b._step_job(rows, span, "greedy")
        args = list(args)
        args[2] = jnp.full(rows, span - 1, jnp.int32)
        args[3] = jax.tree.map(lambda x: x.copy(), args[3])
        exes[f"{rows} rows span {span} kv {kv}"] = [prog.lower(*args, **static).compile(), args]
res = {k: [] for k in exes}
for r in range(calls):
    for k in (list(exes) if r % 2 == 0 else list(reversed(list(exes)))):
        exe, args = exes[k]
        t0 = time.perf_counter(); out = exe(*args); jax.block_until_ready(out)
        res[k].append((time.perf_counter() - t0) * 1e3); args[3] = out[1]
for k, v in sorted(res.items()):
    print(f"{k:34s} median {np.median(v[1:]):8.2f} ms")

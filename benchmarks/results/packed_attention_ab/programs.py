"""The carrying decode step's program alone: a packed chunk's attention in the host kernel (new) or in XLA (old).

Usage (from the repository root): python benchmarks/results/packed_attention_ab/programs.py {bundled|synthetic} [calls]
Compiles, for one bf16 engine, a 16-row decode step carrying a 32-token packed chunk (4 staging rows) with each
attention path, and (bundled model) a plain step of 16 and of 48 rows for scale, at spans 128 (and 1024 for the
synthetic 7B-shaped model); then calls them in alternating order and prints medians (ms).
"""
import os, sys, time
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, REPO); sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import numpy as np, jax
from absl import flags
import bench_serve as bs
bs.define_flags(); flags.FLAGS(["x"])
import powerinfer_jax.layers as L
import powerinfer_jax.batching as B
from powerinfer_jax.engine import Engine
from powerinfer_jax.loading import to_device
from benchmarks import subjects
F = flags.FLAGS
model = sys.argv[1] if len(sys.argv) > 1 else "bundled"
calls = int(sys.argv[2]) if len(sys.argv) > 2 else 20
if model == "bundled":
    s = subjects.bundled_subject(F.bundle, 64, F.corpus)
    max_len, spans = 256, (128,)
else:
    s = subjects.synthetic_subject(4, 32000, 1024, 32)
    max_len, spans = 1024, (128, 1024)
params = to_device(s.host_in("bfloat16"))
real = L.uses_host_attention
PACKED_IN_XLA = [False]
L.uses_host_attention = lambda rows, tokens, dtype, span_bytes=0: (
    False if PACKED_IN_XLA[0] and rows == 32 else real(rows, tokens, dtype, span_bytes))
# one engine per path: jit reuses a traced program for the same shapes, so each path needs its own programs
rows = 64 if model == "bundled" else 16  # a 7B-shaped f32 cache of 16 rows x 1024 slots is 2.1 GB
old, new = (B.ContinuousBatcher(Engine(s.cfg, params, max_seq_len=max_len), max_batch=rows, prefill_chunk=64,
                                mixed_chunk=32) for _ in range(2))
exes = {}
for span in spans:
    jobs = {f"mixed16+32 xla span{span}": (True, old._mixed_job(16, span, "greedy")),
            f"mixed16+32 host span{span}": (False, new._mixed_job(16, span, "greedy")),
            f"step16 span{span}": (False, new._step_job(16, span, "greedy")),
            f"step48 span{span}": (False, new._step_job(48, span, "greedy"))}
    if model != "bundled":  # the plain steps only on the small model (each program holds its own cache copy)
        jobs = {k: v for k, v in jobs.items() if k.startswith("mixed")}
    for k, (xla, (name, prog, args, static)) in jobs.items():
        PACKED_IN_XLA[0] = xla
        args = list(args)
        args[3] = jax.tree.map(lambda x: x.copy(), args[3])  # donated: each program its own cache
        if name == "mixed":
            args[7] = jax.tree.map(lambda x: x.copy(), args[7])
        exes[k] = [prog.lower(*args, **static).compile(), args, name]
res = {k: [] for k in exes}
for r in range(calls):
    for k in (list(exes) if r % 2 == 0 else list(reversed(list(exes)))):
        exe, args, name = exes[k]
        t0 = time.perf_counter(); out = exe(*args); jax.block_until_ready(out)
        res[k].append((time.perf_counter() - t0) * 1e3)
        args[3] = out[1]
        if name == "mixed":
            args[7] = out[2]
for k, v in res.items():
    print(f"{k:28s} median {np.median(v[1:]):8.2f} ms")

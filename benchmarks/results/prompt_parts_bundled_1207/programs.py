# Bundled bf16 model: decode-step programs with prompt rows in 2 vs 1 bf16 parts (POWERINFER_PROMPT_BF16_PARTS),
# compiled side by side, alternating calls. Usage (repository root): python benchmarks/results/prompt_parts_bundled_1207/programs.py 80
import os, sys, time
REPO = os.getcwd()
sys.path.insert(0, REPO); sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import numpy as np, jax
from absl import flags
import bench_serve as bs
bs.define_flags(); flags.FLAGS(["x"])
import powerinfer_jax.batching as B
from powerinfer_jax.engine import Engine
from powerinfer_jax.loading import to_device
from benchmarks import subjects
F = flags.FLAGS
calls = int(sys.argv[1]) if len(sys.argv) > 1 else 20
s = subjects.bundled_subject(F.bundle, 64, F.corpus)
params = to_device(s.host_in("bfloat16"))
exes = {}
span = 128
for parts in ("2", "1"):
    os.environ["POWERINFER_PROMPT_BF16_PARTS"] = parts

    for W in (32,):
        b = B.ContinuousBatcher(Engine(s.cfg, params, max_seq_len=256), max_batch=64, prefill_chunk=64, mixed_chunk=W)
        jobs = {f"p{parts} mixed16+{W}": b._mixed_job(16, span, "greedy")}
        if W == 32:
            jobs[f"p{parts} step1"] = b._step_job(1, span, "greedy")
            jobs[f"p{parts} step16"] = b._step_job(16, span, "greedy")
        for k, (name, prog, args, static) in jobs.items():
            args = list(args)
            args[3] = jax.tree.map(lambda x: x.copy(), args[3])
            exes[k] = [prog.lower(*args, **static).compile(), args, name]
res = {k: [] for k in exes}
for r in range(calls):
    for k in (list(exes) if r % 2 == 0 else list(reversed(list(exes)))):
        exe, args, name = exes[k]
        t0 = time.perf_counter(); out = exe(*args); jax.block_until_ready(out)
        res[k].append((time.perf_counter() - t0) * 1e3)
        args[3] = out[1]
for k, v in res.items():
    print(f"{k:28s} median {np.median(v[1:]):8.2f} ms  p10 {np.percentile(v[1:],10):7.2f}")

# 4-layer 7B shape, bf16: a 4-row decode step carrying a 32-token chunk and a 64-token prompt chunk, prompt rows in
# 2 vs 1 bf16 parts, alternating calls. Usage (repository root): python benchmarks/results/prompt_parts_realsize_1207/programs_4layer.py 7
import os, sys, time
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import numpy as np, jax
from powerinfer_jax import batching as B
from powerinfer_jax.engine import Engine
from powerinfer_jax.loading import to_device
from benchmarks import subjects
calls = int(sys.argv[1]) if len(sys.argv) > 1 else 6
s = subjects.synthetic_subject(4, 32000, 1024, 32)
params = to_device(s.host_in("bfloat16"))
exes = {}
for parts in ("2", "1"):
    os.environ["POWERINFER_PROMPT_BF16_PARTS"] = parts
    b = B.ContinuousBatcher(Engine(s.cfg, params, max_seq_len=256), max_batch=16, prefill_chunk=64, mixed_chunk=32)
    jobs = {f"p{parts} mixed4+32": b._mixed_job(4, 128, "greedy"),
            f"p{parts} chunk64": b._chunk_job(64, b._stage_key(1), 128, "greedy")}
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
    print(f"{k:20s} median {np.median(v[1:]):8.1f} ms  min {np.min(v[1:]):8.1f}")

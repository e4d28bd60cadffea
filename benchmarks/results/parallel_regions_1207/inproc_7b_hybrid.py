import sys, os, time, importlib.util, numpy as np
os.chdir("/work/main"); sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/benchmarks")
import powerinfer_jax as pij
from powerinfer_jax.engine import Engine
from powerinfer_jax.loading import to_device
import ops.host_kernels as H, ops.host_attention as HA
import subjects
spec = importlib.util.spec_from_file_location("ops.host_loops_old", "/tmp/w/host_loops_old.py")
OLD = importlib.util.module_from_spec(spec); spec.loader.exec_module(OLD)
NEW = dict(down=H._down_kernel, work=H.SERIAL_MAX_WORK_BYTES, att=HA.SERIAL_MAX_BYTES)
def setv(v):
    if v == "old": H._down_kernel, H.SERIAL_MAX_WORK_BYTES, HA.SERIAL_MAX_BYTES = OLD._down_kernel, 1 << 60, 0
    else: H._down_kernel, H.SERIAL_MAX_WORK_BYTES, HA.SERIAL_MAX_BYTES = NEW["down"], NEW["work"], NEW["att"]
s = subjects.synthetic_subject(4, 32000, 1024, 16)
from benchmarks.suite import build_engines, plan_budget
b = plan_budget(s, 0.3, 256)
eng = build_engines(s, b, 256, "bfloat16", "float32")["hybrid"]
rng = np.random.default_rng(7)
for B, N in [(1, 16), (16, 8)]:
    prompts = [rng.integers(3, s.cfg.vocab_size, 16).tolist() for _ in range(B)]
    res = {"old": [], "new": []}
    for v in res: setv(v); eng.generate_batch(prompts, max_new_tokens=3, stop_at_eos=False)
    for rep in range(4):
        for v in (["old", "new"] if rep % 2 == 0 else ["new", "old"]):
            setv(v)
            st = eng.generate_batch(prompts, max_new_tokens=N, stop_at_eos=False)[0].stats
            res[v].append(1e3*st["decode_s"]/st["decode_steps"])
    o, n = np.median(res["old"]), np.median(res["new"])
    print(f"7B 4-layer bf16 hybrid 30% B={B}: old {o:.1f} ms/step  new {n:.1f}  old/new {o/n:.2f}, paired {np.round(np.array(res['old'])/np.array(res['new']), 2)}", flush=True)

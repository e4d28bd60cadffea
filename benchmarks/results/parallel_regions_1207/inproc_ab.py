import sys, os, time, json, importlib.util, numpy as np
os.chdir("/work/main"); sys.path.insert(0, "/work/main")
import powerinfer_jax as pij
import ops.host_kernels as H, ops.host_attention as HA
spec = importlib.util.spec_from_file_location("ops.host_loops_old", "/tmp/w/host_loops_old.py")
OLD = importlib.util.module_from_spec(spec); spec.loader.exec_module(OLD)
NEW = dict(down=H._down_kernel, work=H.SERIAL_MAX_WORK_BYTES, att=HA.SERIAL_MAX_BYTES)
def setv(v):
    if v == "old": H._down_kernel, H.SERIAL_MAX_WORK_BYTES, HA.SERIAL_MAX_BYTES = OLD._down_kernel, 1 << 60, 0
    else: H._down_kernel, H.SERIAL_MAX_WORK_BYTES, HA.SERIAL_MAX_BYTES = NEW["down"], NEW["work"], NEW["att"]
eng = pij.load(sys.argv[1] if len(sys.argv) > 1 else "models/shakespeare-relu-llama")
ids = eng.encode("ROMEO:\nWhat light through yonder window breaks?")
N = int(sys.argv[2]) if len(sys.argv) > 2 else 128
Bs = [int(b) for b in sys.argv[3].split(",")] if len(sys.argv) > 3 else [1, 4, 16]
for B in Bs:
    res = {"old": [], "new": []}
    for v in res: setv(v); eng.generate_batch([ids]*B, max_new_tokens=8, stop_at_eos=False)
    for rep in range(5):
        for v in (["old", "new"] if rep % 2 == 0 else ["new", "old"]):
            setv(v)
            s = eng.generate_batch([ids]*B, max_new_tokens=N, stop_at_eos=False)[0].stats
            res[v].append(1e3*s["decode_s"]/s["decode_steps"])
    o, n = np.median(res["old"]), np.median(res["new"])
    ratios = np.array(res["old"]) / np.array(res["new"])
    print(f"B={B}: old {o:.2f} ms/step  new {n:.2f}  old/new median {o/n:.2f}, paired {np.round(ratios, 2)}", flush=True)

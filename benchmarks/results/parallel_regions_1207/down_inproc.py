import os, sys; os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import time, importlib.util, numpy as np, ml_dtypes
sys.path.insert(0, "/work/main")
import ops.host_kernels as H
from ops import host_loops as NEW
spec = importlib.util.spec_from_file_location("ops.host_loops_old", "/tmp/w/host_loops_old.py")
OLD = importlib.util.module_from_spec(spec); spec.loader.exec_module(OLD)
rng = np.random.default_rng(0)
for R, K, Bs, n in [(1536, 384, [1, 4, 16], 200), (11008, 4096, [1, 4, 16], 15)]:
    w = rng.standard_normal((R, K)).astype(ml_dtypes.bfloat16)
    kw = H._kernel_weight(w); idx = np.arange(R, dtype=np.int32)
    for B in Bs:
        h = np.maximum(rng.standard_normal((B, R)), 0).astype(np.float32)
        out = np.empty((B, K), np.float32)
        res = {"old": [], "new": []}
        ks = {"old": OLD._down_kernel, "new": NEW._down_kernel}
        for name, k in ks.items(): k(kw.code, kw.data, kw.scale, idx, R, h, False, True, out, *H._down_buffers(kw, B))
        for i in range(n):
            for name, k in ks.items():
                bufs = H._down_buffers(kw, B)
                t = time.perf_counter(); k(kw.code, kw.data, kw.scale, idx, R, h, False, True, out, *bufs); res[name].append(time.perf_counter() - t)
        o, nw = np.median(res["old"]) * 1e6, np.median(res["new"]) * 1e6
        print(f"parallel down [{R},{K}] B={B}: old {o:.0f} us  new {nw:.0f} us  old/new {o/nw:.2f}", flush=True)

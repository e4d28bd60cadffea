import os; os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import time, numpy as np, ml_dtypes
import ops.host_kernels as H
from ops.quant import Weight
rng = np.random.default_rng(0)
def med(f, n=200):
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return np.median(ts) * 1e6
for R, K in [(1152, 384), (1536, 384), (4096, 4096)]:
    w = rng.standard_normal((R, K)).astype(ml_dtypes.bfloat16)
    for B in [1, 4, 16]:
        x = rng.standard_normal((B, K)).astype(np.float32)
        out = {}
        for thr in [1 << 40, 0, 1 << 40, 0]:
            H.SERIAL_MAX_BYTES = thr
            H.host_matvec(w, x)
            out[thr] = med(lambda: H.host_matvec(w, x), 100 if R < 2000 else 20)
        print(f"[{R},{K}] B={B}: serial {out[1<<40]:.0f} us  parallel {out[0]:.0f} us  ratio {out[1<<40]/out[0]:.2f}", flush=True)

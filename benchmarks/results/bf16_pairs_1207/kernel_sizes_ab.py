# host_matvec, one bf16 token: the uint32-pair kernel against the one-row kernel (host_kernels.BF16_PAIRS toggled),
# alternating rounds in one process, at the bundled and 7B shapes. Usage (repository root):
# PYTHONPATH=. python benchmarks/results/bf16_pairs_1207/kernel_sizes_ab.py
import time, numpy as np, ml_dtypes
import powerinfer_jax
from ops import host_kernels as HK
from ops import quant as Q
rng = np.random.default_rng(0)
for rows, cols in ((1152, 384), (384, 384), (1536, 384), (3072, 1024), (1024, 2048), (4096, 4096)):
    W = Q.to_weight((rng.standard_normal((rows, cols)) * 0.02).astype(np.float32), "bfloat16")
    x = rng.standard_normal((1, cols)).astype(np.float32)
    out = np.zeros((1, rows), np.float32)
    n = max(20, int(2e8 // (rows * cols * 2)))
    res = {False: [], True: []}
    for v in (False, True):
        HK.BF16_PAIRS = v; HK.host_matvec(W, x, out=out)
    for r in range(10):
        for v in ((False, True) if r % 2 == 0 else (True, False)):
            HK.BF16_PAIRS = v
            t0 = time.perf_counter()
            for _ in range(n): HK.host_matvec(W, x, out=out)
            res[v].append((time.perf_counter() - t0) / n * 1e6)
    a, b = np.median(res[False]), np.median(res[True])
    print(f"[{rows},{cols}] one_row {a:8.1f} us  pairs {b:8.1f} us  one_row/pairs {np.median(np.array(res[False]) / np.array(res[True])):.3f}")

import time, sys, os, numpy as np
sys.path.insert(0, __import__("os").path.abspath(__file__).rsplit("/benchmarks/", 1)[0])
import powerinfer_jax  # OMP_WAIT_POLICY=PASSIVE as in the engine
import ops.host_kernels as hk
from ops.quant import to_weight
rng = np.random.default_rng(0)
d, f = 384, 1536
def W(r, c): return to_weight(rng.standard_normal((r, c)).astype(np.float32) * 0.05, "bfloat16")
L = 6
layers = [(W(f, d), W(f, d), W(f, d)) for _ in range(L)]
big = np.ones(50_000_000, np.float32)
t = time.perf_counter(); [big.sum() for _ in range(3)]; print("numpy sum 200MB: %.1f GB/s" % (3 * big.nbytes / (time.perf_counter() - t) / 1e9))
idx = np.arange(f, dtype=np.int32)
for B in (1, 16):
    x = rng.standard_normal((B, d)).astype(np.float32); out = np.empty((B, d), np.float32)
    for mode in ("auto", "serial", "parallel"):
        hk.SERIAL_MAX_BYTES = {"auto": 1 << 21, "serial": 1 << 40, "parallel": 0}[mode]
        hk.SERIAL_MAX_WORK_BYTES = {"auto": 8 << 20, "serial": 1 << 40, "parallel": 0}[mode]
        for rot in (1, 6):
            tf = []
            for _ in range(40):
                for wg, wu, wd in layers[:rot]:
                    t2 = time.perf_counter(); hk.host_sparse_ffn("reglu", wg, wu, wd, x, idx, f, out=out); tf.append(time.perf_counter() - t2)
            tm = np.median(tf[10:])
            print(B, mode, "rotating %d layers: %.0f us  %.1f GB/s" % (rot, 1e6 * tm, 3 * f * d * 2 / tm / 1e9), flush=True)

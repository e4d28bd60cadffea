# One-region FFN against gate/up then down at the 7B shape [11008, 4096] bf16, alternating calls in one process:
# all neurons (dense, every down row read) and a hybrid-like list (a random 35% of the neurons, zero rows skipped).
# usage: python ffn_one_region_7b.py
import os, sys, time, numpy as np
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
from ops.quant import to_weight
from ops import host_kernels as hk
rng = np.random.default_rng(0)
n, d = 11008, 4096
def W(): return to_weight((rng.standard_normal((n, d), dtype=np.float32) * 0.02), "bfloat16")
wg, wu, wd = W(), W(), W()
every = np.arange(n, dtype=np.int32)
some = np.sort(rng.choice(n, int(0.35 * n), replace=False)).astype(np.int32)
def fused(x, idx, skip): hk.host_sparse_ffn("reglu", wg, wu, wd, x, idx, len(idx), skip_zero_rows=skip)
def split(x, idx, skip):
    h = hk.host_sparse_h("reglu", wg, wu, x, idx, len(idx))
    hk.host_axpy_down(wd, idx, len(idx), h, skip_zero_rows=skip)
for name, idx, skip in (("all", every, False), ("35%", some, True)):
    for B in (1, 4, 16):
        x = rng.standard_normal((B, d)).astype(np.float32)
        fused(x, idx, skip); split(x, idx, skip)
        v = {"fused": [], "split": []}
        for r in range(10):
            for f in ((fused, split) if r % 2 == 0 else (split, fused)):
                t0 = time.perf_counter(); f(x, idx, skip); v[f.__name__].append(time.perf_counter() - t0)
        ratios = np.array(v["split"]) / np.array(v["fused"])
        print(f"[{n},{d}] {name} B={B}: fused {np.median(v['fused'])*1e3:.2f} ms split {np.median(v['split'])*1e3:.2f} ms "
              f"split/fused {np.median(ratios):.2f} (paired {ratios.min():.2f}-{ratios.max():.2f})", flush=True)

"""Where int8-activation kernels meet BLAS: int4 [11008, 4096] mat-vec and dense FFN at 16-256 tokens, the kernels
(forced below the BLAS threshold) against the blocked dequantize + BLAS path, alternating calls in one process.
`python blas_thresholds.py [what:tokens ...]` (default: every case)."""
import dataclasses
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.abspath(__file__)).rsplit("/benchmarks/", 1)[0]
sys.path.insert(0, ROOT)
from ops import host_kernels as H  # noqa: E402
from ops.quant import to_weight  # noqa: E402

rng = np.random.default_rng(0)
w = [to_weight(rng.standard_normal((11008, 4096)).astype(np.float32), "int4") for _ in range(3)]
g, u, d = (dataclasses.replace(x, act="int8") for x in w)
idx = np.arange(11008, dtype=np.int32)
orig = H.blas_min_tokens


def run(path, what, x):
    H.blas_min_tokens = (lambda fmt, product="matvec": 1 << 30) if path == "kernel" else (lambda fmt, product="matvec": 1)
    try:
        if what == "mat-vec":
            return H.host_matvec(u, x)
        return H.host_sparse_ffn("reglu", g, u, d, x, idx, 11008, skip_zero_rows=False)
    finally:
        H.blas_min_tokens = orig


CASES = [("mat-vec", n) for n in (16, 32, 48, 64, 128, 256)] + [("FFN", n) for n in (16, 32, 48, 64, 128)]
if len(sys.argv) > 1:  # e.g. "mat-vec:256"
    CASES = [(a.split(":")[0], int(a.split(":")[1])) for a in sys.argv[1:]]
for what, n_tok in CASES:
    x = rng.standard_normal((n_tok, 4096)).astype(np.float32)
    t = {"kernel": [], "blas": []}
    for r in range(4):
        for p in (["kernel", "blas"] if r % 2 == 0 else ["blas", "kernel"]):
            t0 = time.perf_counter()
            run(p, what, x)
            t[p].append(time.perf_counter() - t0)
    k, b = 1e3 * np.median(t["kernel"][1:]), 1e3 * np.median(t["blas"][1:])
    print(f"{what} {n_tok} tokens: int8-activation kernel {k:.1f} ms, BLAS {b:.1f} ms, BLAS/kernel {b / k:.2f}x",
          flush=True)

"""Down kernel, four tokens a pass (new) against one token a pass (old), alternating calls in one process.

Usage (from the repository root): python benchmarks/results/down_four_tokens_1207/measure.py bfloat16,int8,float16 15
7B down projection [11008, 4096] (three matrices in rotation, so reads come from DRAM), every row, skip_zero off.
"""
import os
import sys
sys.path.insert(0, os.getcwd())
import json, sys, time
import numpy as np
from ops import host_kernels as H
from ops.quant import to_weight
rng = np.random.default_rng(0)
fmts = sys.argv[1].split(",")
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 15
res = {}
for fmt in fmts:
    mats = [to_weight((rng.standard_normal((11008, 4096)) * 0.02).astype(np.float32), fmt) for _ in range(3)]
    idx = np.arange(11008, dtype=np.int32)
    for nt in (1, 2, 4, 5, 8, 16):
        h = rng.standard_normal((nt, 11008)).astype(np.float32)
        t = {False: [], True: []}
        for r in range(rounds + 1):
            for four in ((False, True) if r % 2 else (True, False)):
                H.AXPY_FOUR_TOKENS = four
                w = mats[r % 3]
                t0 = time.perf_counter(); H.host_axpy_down(w, idx, 11008, h, skip_zero_rows=False)
                if r:
                    t[four].append(time.perf_counter() - t0)
        ratio = np.median(np.array(t[False]) / np.array(t[True]))
        res[f"{fmt} {nt}"] = {"old_ms": np.median(t[False]) * 1e3, "new_ms": np.median(t[True]) * 1e3,
                              "old_over_new_paired": float(ratio)}
        print(f"{fmt:9s} {nt:3d} tokens: one-token passes {np.median(t[False])*1e3:7.2f} ms, four-token {np.median(t[True])*1e3:7.2f} ms, paired old/new {ratio:.2f}x", flush=True)
json.dump(res, open(sys.argv[3] if len(sys.argv) > 3 else "benchmarks/results/down_four_tokens_1207/result.json", "w"), indent=1)

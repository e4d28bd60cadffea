"""Gate/up kernel (`host_sparse_h`, reglu), four tokens a pass (new) against one token a pass (old), alternating
calls in one process.

Usage (from the repository root): python benchmarks/results/gated_four_tokens_1207/measure.py bfloat16,int8 15
7B gate and up [11008, 4096] (three pairs in rotation, so reads come from DRAM), every neuron listed (the dense FFN's
decode rows).
"""
import os
import sys
sys.path.insert(0, os.getcwd())
import json, time
import numpy as np
from ops import host_kernels as H
from ops.quant import to_weight
rng = np.random.default_rng(0)
fmts = sys.argv[1].split(",")
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 15
res = {}
for fmt in fmts:
    pairs = [tuple(to_weight((rng.standard_normal((11008, 4096)) * 0.02).astype(np.float32), fmt) for _ in range(2))
             for _ in range(3)]
    idx = np.arange(11008, dtype=np.int32)
    for nt in (1, 2, 4, 8, 16):
        x = rng.standard_normal((nt, 4096)).astype(np.float32)
        t = {False: [], True: []}
        for r in range(rounds + 1):
            for four in ((False, True) if r % 2 else (True, False)):
                H.GATED_FOUR_TOKENS = four
                wg, wu = pairs[r % 3]
                t0 = time.perf_counter(); H.host_sparse_h("reglu", wg, wu, x, idx, 11008)
                if r:
                    t[four].append(time.perf_counter() - t0)
        ratio = np.median(np.array(t[False]) / np.array(t[True]))
        res[f"{fmt} {nt}"] = {"old_ms": np.median(t[False]) * 1e3, "new_ms": np.median(t[True]) * 1e3,
                              "old_over_new_paired": float(ratio)}
        print(f"{fmt:9s} {nt:3d} tokens: one-token passes {np.median(t[False])*1e3:7.2f} ms, four-token "
              f"{np.median(t[True])*1e3:7.2f} ms, paired old/new {ratio:.2f}x", flush=True)
json.dump(res, open("benchmarks/results/gated_four_tokens_1207/result.json", "w"), indent=1)

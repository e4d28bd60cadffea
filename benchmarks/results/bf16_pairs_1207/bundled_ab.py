# Bundled model (bf16, d=384): one-token decode with the uint32-pair kernel (host_kernels.BF16_PAIRS) or the one-row
# kernel, toggled between alternating generations in one process, dense and hybrid predicted (40 MiB budget).
# Usage (repository root): python benchmarks/results/bf16_pairs_1207/bundled_ab.py 12
import sys
import numpy as np
import powerinfer_jax as pij
from ops import host_kernels as HK
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 12
engines = {"dense": pij.load(max_seq_len=256),
           "hybrid": pij.load("models/shakespeare-relu-llama-prepared", sparsity="predicted",
                              device_memory_budget="40MiB", max_seq_len=256)}
res = {f"{k} {v}": [] for k in engines for v in ("one_row", "pairs")}
for e in engines.values():
    e.generate("ROMEO:", max_new_tokens=8, temperature=0.0)
for r in range(rounds):
    for v in ((False, True) if r % 2 == 0 else (True, False)):
        HK.BF16_PAIRS = v
        for k, e in engines.items():
            st = e.generate("ROMEO:", max_new_tokens=64, temperature=0.0, stop_at_eos=False).stats
            res[f"{k} {'pairs' if v else 'one_row'}"].append(1000 / st["decode_tokens_per_s"])
for k, v in res.items():
    print(k, "median %.3f ms/token" % np.median(v))
for k in engines:
    print(k, "paired one_row/pairs %.3f" % np.median(np.array(res[f"{k} one_row"]) / np.array(res[f"{k} pairs"])))

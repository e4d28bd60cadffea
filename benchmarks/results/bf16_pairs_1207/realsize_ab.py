# 32-layer LLaMA-7B-shaped bf16 checkpoint (benchmarks.realsize), dense engine: one-token bf16 mat-vecs through the
# uint32-pair kernel (host_kernels.BF16_PAIRS) or the one-row kernel, toggled between alternating generations in
# one process. Usage (repository root): python benchmarks/results/bf16_pairs_1207/realsize_ab.py runs/synthetic-7b-bf16 4
import sys, time, json
import numpy as np
import powerinfer_jax as pij
from ops import host_kernels as HK
from benchmarks import roofline
ckpt, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4
eng = pij.load(ckpt, max_seq_len=256)
prompt = list(np.random.default_rng(0).integers(3, eng.cfg.vocab_size, 8))
res = {"pairs": [], "one_row": []}
toks = {}
for v in (True, False):
    HK.BF16_PAIRS = v
    toks[v] = eng.generate(prompt, max_new_tokens=4, temperature=0.0, stop_at_eos=False).token_ids
for r in range(rounds):
    for v in ((True, False) if r % 2 == 0 else (False, True)):
        HK.BF16_PAIRS = v
        st = eng.generate(prompt, max_new_tokens=12, temperature=0.0, stop_at_eos=False).stats
        res["pairs" if v else "one_row"].append(1000 / st["decode_tokens_per_s"])
        print(r, "pairs" if v else "one_row", round(res["pairs" if v else "one_row"][-1], 1), flush=True)
bw = roofline.host_read_bandwidth()
out = {k: {"ms_per_token": v, "median": float(np.median(v))} for k, v in res.items()}
out["paired_one_row_over_pairs"] = float(np.median(np.array(res["one_row"]) / np.array(res["pairs"])))
out["same_tokens"] = toks[True] == toks[False]
out["bandwidth_gbps_after"] = bw / 1e9
print(json.dumps(out, indent=1))

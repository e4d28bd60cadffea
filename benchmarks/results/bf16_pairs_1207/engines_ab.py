# 4-layer LLaMA-7B-shaped cut (vocab 4096, synthetic power-law predictors), bf16: decode of the dense and the hybrid
# (30% budget) engines and a jitted chain of the attention/head mat-vecs, with one-token bf16 mat-vecs through the
# uint32-pair kernel (host_kernels.BF16_PAIRS) or the one-row kernel, toggled between alternating calls in one
# process. Usage (repository root): python benchmarks/results/bf16_pairs_1207/engines_ab.py 10
import sys, time, json
import numpy as np, jax, jax.numpy as jnp
import powerinfer_jax
from benchmarks import suite, roofline
from benchmarks.subjects import synthetic_subject
from ops import host_kernels as HK
from ops.linear import linear
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
s = synthetic_subject(4, 4096, 1024, prompt_len=32)
b = suite.plan_budget(s, 0.3, 256, "bfloat16")
engines = suite.build_engines(s, b, 256, "bfloat16")
engines = {"dense": engines["dense"] if "dense" in engines else None, "hybrid": engines["hybrid"]}
if engines["dense"] is None:
    from powerinfer_jax.engine import Engine
    engines["dense"] = Engine(s.cfg, suite.device_params(s.host_params, "bfloat16"), max_seq_len=256)
params = engines["dense"].params
at = [lp.attn for lp in params.layers]
@jax.jit
def chain(x, at, head):
    for a in at:
        y = linear(x, a.wqkv); x = x + linear(y[:, :4096] * 1e-3, a.wo)
    return linear(x, head)
x = jnp.ones((1, 4096), jnp.float32)
same = {}
for v in (False, True):
    HK.BF16_PAIRS = v
    chain(x, at, params.lm_head).block_until_ready()
    same[v] = [e.generate(s.prompt_ids, max_new_tokens=8, temperature=0.0, stop_at_eos=False).token_ids for e in engines.values()]
res = {f"{k} {v}": [] for k in ("chain", "dense", "hybrid") for v in ("one_row", "pairs")}
for r in range(rounds):
    for v in ((False, True) if r % 2 == 0 else (True, False)):
        HK.BF16_PAIRS = v
        name = "pairs" if v else "one_row"
        t0 = time.perf_counter()
        for _ in range(5): chain(x, at, params.lm_head).block_until_ready()
        res[f"chain {name}"].append((time.perf_counter() - t0) / 5 * 1000)
        for k, e in engines.items():
            res[f"{k} {name}"].append(1000 / suite.run_engine(e, s.prompt_ids, 12)["decode_tok_s"])
out = {k: {"ms": v, "median": float(np.median(v))} for k, v in res.items()}
for k in ("chain", "dense", "hybrid"):
    out[f"{k} paired one_row/pairs"] = float(np.median(np.array(res[f"{k} one_row"]) / np.array(res[f"{k} pairs"])))
out["same_greedy_tokens"] = same[False] == same[True]
out["bandwidth_gbps"] = roofline.host_read_bandwidth() / 1e9
for k, v in out.items():
    print(k, v["median"] if isinstance(v, dict) else v)
json.dump(out, open("benchmarks/results/bf16_pairs_1207/engines_ab.json", "w"), indent=1)

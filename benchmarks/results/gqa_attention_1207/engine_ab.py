"""In-process old/new A/B of the decode attention kernel (../attention_inlined_1207/toggle.py; OLD_ATTENTION: the
parent commit's ops/host_attention.py saved elsewhere) on a 4-layer grouped-query cut: LLaMA-7B layer dimensions
with 8 kv heads for 32 query heads (Llama-3's grouping), bf16 weights, dense, bf16 KV cache.
usage: OLD_ATTENTION=/tmp/w/attn_old_mod.py python engine_ab.py  (ROUNDS, CASES as in inproc_7b.py there)"""
import os, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "attention_inlined_1207"))
import numpy as np
from toggle import setv  # also: chdir to the checkout, benchmarks/ on the path
from powerinfer_jax.engine import Engine
from powerinfer_jax.loading import to_device
import subjects
s = subjects.synthetic_subject(4, 32000, 1024, 16, shape={"kv_heads": 8})
eng = Engine(s.cfg, to_device(s.host_in("bfloat16")), max_seq_len=2048, kv_dtype="bfloat16")
rng = np.random.default_rng(7)
CASES = [(1, 1800, 12), (4, 900, 8), (16, 16, 8)]  # each round prefills again: 1800 tokens ~30 s here
ROUNDS = int(os.environ.get("ROUNDS", 4))
if os.environ.get("CASES"):
    CASES = [CASES[int(i)] for i in os.environ["CASES"].split(",")]
for B, P, N in CASES:
    prompts = [rng.integers(3, s.cfg.vocab_size, P).tolist() for _ in range(B)]
    res = {"old": [], "new": []}
    for v in res: setv(v); eng.generate_batch(prompts, max_new_tokens=3, stop_at_eos=False)
    for rep in range(ROUNDS):
        for v in (["old", "new"] if rep % 2 == 0 else ["new", "old"]):
            setv(v)
            st = eng.generate_batch(prompts, max_new_tokens=N, stop_at_eos=False)[0].stats
            res[v].append(1e3 * st["decode_s"] / st["decode_steps"])
    o, n = np.median(res["old"]), np.median(res["new"])
    print(f"GQA 4-layer bf16 dense (32 q / 8 kv heads), KV bf16, B={B} prompt={P}: old {o:.1f} ms/step  new {n:.1f}  "
          f"old/new {o/n:.2f}, paired {np.round(np.array(res['old'])/np.array(res['new']), 2)}", flush=True)

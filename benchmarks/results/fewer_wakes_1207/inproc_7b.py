"""In-process old/new A/B (toggle.py) on the 4-layer 7B cut, bf16, KV cache f32: `python inproc_7b.py [dense|hybrid]`."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
from toggle import setv  # also: chdir to the checkout, benchmarks/ on the path
from powerinfer_jax.engine import Engine
from powerinfer_jax.loading import to_device
import subjects
MODE = sys.argv[1] if len(sys.argv) > 1 else "dense"
s = subjects.synthetic_subject(4, 32000, 1024, 16)
if MODE == "dense":
    eng = Engine(s.cfg, to_device(s.host_in("bfloat16")), max_seq_len=512, kv_dtype="float32")
else:  # the hybrid engine at a 30% budget
    from benchmarks.suite import build_engines, plan_budget
    eng = build_engines(s, plan_budget(s, 0.3, 512), 512, "bfloat16", "float32")["hybrid"]
rng = np.random.default_rng(7)
for B, P, N in [(1, 16, 16), (1, 400, 12), (16, 16, 8)]:
    prompts = [rng.integers(3, s.cfg.vocab_size, P).tolist() for _ in range(B)]
    res = {"old": [], "new": []}
    for v in res: setv(v); eng.generate_batch(prompts, max_new_tokens=3, stop_at_eos=False)
    for rep in range(4):
        for v in (["old", "new"] if rep % 2 == 0 else ["new", "old"]):
            setv(v)
            st = eng.generate_batch(prompts, max_new_tokens=N, stop_at_eos=False)[0].stats
            res[v].append(1e3*st["decode_s"]/st["decode_steps"])
    o, n = np.median(res["old"]), np.median(res["new"])
    print(f"7B 4-layer bf16 {MODE} B={B} prompt={P}: old {o:.1f} ms/step  new {n:.1f}  old/new {o/n:.2f}, "
          f"paired {np.round(np.array(res['old'])/np.array(res['new']), 2)}", flush=True)

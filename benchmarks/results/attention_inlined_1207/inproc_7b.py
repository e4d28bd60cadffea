"""In-process old/new A/B (toggle.py) on the 4-layer 7B cut, bf16 weights, dense:
`python inproc_7b.py [bfloat16|float32]` (the KV cache's precision; bfloat16 is what "auto" gives bf16 weights).
`ab_rounds` is also the loop of ../gqa_attention_1207/engine_ab.py (a grouped-query cut)."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
from toggle import setv  # also: chdir to the checkout, benchmarks/ on the path


def ab_rounds(eng, vocab, cases, label):
    """For each (rows, prompt tokens, new tokens): decode ms/step with the old and new kernels, alternating rounds
    ($ROUNDS, default 4; $CASES: indices into `cases`, comma-separated), printed as one line a case."""
    rng = np.random.default_rng(7)
    if os.environ.get("CASES"):
        cases = [cases[int(i)] for i in os.environ["CASES"].split(",")]
    for B, P, N in cases:
        prompts = [rng.integers(3, vocab, P).tolist() for _ in range(B)]
        res = {"old": [], "new": []}
        for v in res: setv(v); eng.generate_batch(prompts, max_new_tokens=3, stop_at_eos=False)
        for rep in range(int(os.environ.get("ROUNDS", 4))):
            for v in (["old", "new"] if rep % 2 == 0 else ["new", "old"]):
                setv(v)
                st = eng.generate_batch(prompts, max_new_tokens=N, stop_at_eos=False)[0].stats
                res[v].append(1e3*st["decode_s"]/st["decode_steps"])
        o, n = np.median(res["old"]), np.median(res["new"])
        print(f"{label}, B={B} prompt={P}: old {o:.1f} ms/step  new {n:.1f}  old/new {o/n:.2f}, "
              f"paired {np.round(np.array(res['old'])/np.array(res['new']), 2)}", flush=True)


if __name__ == "__main__":
    from powerinfer_jax.engine import Engine
    from powerinfer_jax.loading import to_device
    import subjects
    KV = sys.argv[1] if len(sys.argv) > 1 else "bfloat16"
    s = subjects.synthetic_subject(4, 32000, 1024, 16)
    eng = Engine(s.cfg, to_device(s.host_in("bfloat16")), max_seq_len=1024, kv_dtype=KV)
    ab_rounds(eng, s.cfg.vocab_size, [(1, 16, 16), (1, 900, 12), (4, 400, 8), (16, 16, 8)],
              f"7B 4-layer bf16 dense, KV {KV}")

"""Prefill of the int4 4-layer LLaMA-7B cut, dense, prompts of 32 and 128 tokens: float32 against int8 activations
(the latter's kernels take prompts to 256 tokens for the mat-vecs and 48 for the FFN), alternating rounds."""
import copy
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.abspath(__file__)).rsplit("/benchmarks/", 1)[0]
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)
import precision  # noqa: E402
import subjects  # noqa: E402

s = subjects.synthetic_subject(4, 32000, 1024, 16)
exact = precision._engines(s, "int4", 0.3, 512)[0]["dense"]
fast = copy.copy(exact)
fast._loop_programs = None
fast.set_int4_activations("int8")
rng = np.random.default_rng(3)
for n in (32, 128):
    prompt = rng.integers(3, s.cfg.vocab_size, n).tolist()
    res = {"float32": [], "int8": []}
    for e in (exact, fast):
        e.generate(prompt, max_new_tokens=2, stop_at_eos=False)
    for r in range(4):
        for k in (["float32", "int8"] if r % 2 == 0 else ["int8", "float32"]):
            e = exact if k == "float32" else fast
            res[k].append(e.generate(prompt, max_new_tokens=2, stop_at_eos=False).stats["prefill_tokens_per_s"])
    a, b = np.median(res["float32"]), np.median(res["int8"])
    print(f"prompt {n} tokens: prefill float32 {a:.1f} tok/s, int8 activations {b:.1f} tok/s, {b / a:.2f}x", flush=True)

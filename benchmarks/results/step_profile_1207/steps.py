import sys, numpy as np
sys.path.insert(0, __import__("os").path.abspath(__file__).rsplit("/benchmarks/", 1)[0])
import powerinfer_jax as pij
eng = pij.load("models/shakespeare-relu-llama")
ids = eng.encode("ROMEO:\nWhat light through yonder window breaks?")
out = []
for B in (1, 16):
    eng.generate_batch([ids] * B, max_new_tokens=8, stop_at_eos=False)
    t = []
    for r in range(4):
        s = eng.generate_batch([ids] * B, max_new_tokens=96, stop_at_eos=False)[0].stats
        t.append(1e3 * s["decode_s"] / s["decode_steps"])
    out.append("%d rows %.2f ms" % (B, np.median(t)))
print(" | ".join(out))

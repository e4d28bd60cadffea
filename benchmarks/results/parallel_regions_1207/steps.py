import sys, os, time, json, numpy as np
repo = sys.argv[1]; sys.path.insert(0, repo); os.chdir(repo)
import powerinfer_jax as pij
assert pij.__file__.startswith(repo), pij.__file__
eng = pij.load("models/shakespeare-relu-llama")
ids = eng.encode("ROMEO:\nWhat light through yonder window breaks?")
out = {}
for B in [1, 4, 16]:
    eng.generate_batch([ids]*B, max_new_tokens=8, stop_at_eos=False)
    v = []
    for rep in range(3):
        s = eng.generate_batch([ids]*B, max_new_tokens=128, stop_at_eos=False)[0].stats
        v.append(1e3*s["decode_s"]/s["decode_steps"])
    out[B] = float(np.median(v))
print(json.dumps({"repo": repo, **out}), flush=True)

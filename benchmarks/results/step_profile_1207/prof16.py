import time, sys, collections, threading
import numpy as np
sys.path.insert(0, __import__("os").path.abspath(__file__).rsplit("/benchmarks/", 1)[0])
import ops.host_kernels as hk, ops.host_attention as ha, ops.linear as lin
T = collections.defaultdict(float); N = collections.defaultdict(int)
def wrap(mod, name, key):
    f = getattr(mod, name)
    def g(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); T[key] += time.perf_counter() - t; N[key] += 1; return r
    setattr(mod, name, g)
wrap(hk, "host_matvec", "matvec")
wrap(hk, "host_sparse_ffn", "ffn")
wrap(hk, "host_axpy_down", "axpy_down")
orig = ha._attention_kernel
def ak(*a):
    k = orig(*a)
    def run(*b):
        t = time.perf_counter(); r = k(*b); T["attn"] += time.perf_counter() - t; N["attn"] += 1; return r
    return run
ha._attention_kernel = ak
import powerinfer_jax as pij
eng = pij.load("models/shakespeare-relu-llama")
ids = eng.encode("ROMEO:\nWhat light through yonder window breaks?")
for B in [int(x) for x in sys.argv[1:]] or [1, 16]:
    eng.generate_batch([ids] * B, max_new_tokens=8, stop_at_eos=False)
    for rep in range(2):
        T.clear(); N.clear()
        s = eng.generate_batch([ids] * B, max_new_tokens=96, stop_at_eos=False)[0].stats
        steps = s["decode_steps"]; tot = 1e3 * s["decode_s"] / steps
        # prefill callbacks included in T; estimate decode-only by per-step division (prefill is 1 step of ~12 tokens)
        parts = {k: round(1e3 * v / steps, 3) for k, v in T.items()}
        calls = {k: round(v / steps, 1) for k, v in N.items()}
        print(B, "step ms %.2f" % tot, "callback ms/step", parts, "calls/step", calls,
              "rest %.2f" % (tot - sum(parts.values())), flush=True)

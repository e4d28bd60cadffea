import sys, os, time, numpy as np, ml_dtypes
repo = sys.argv[1]; sys.path.insert(0, repo); os.chdir(repo)
import jax, jax.numpy as jnp
import powerinfer_jax
from ops import linear as L
from ops.quant import Weight
assert L.__file__.startswith(repo)
rng = np.random.default_rng(0)
ws = [jax.tree.map(jnp.asarray, Weight(rng.standard_normal((384, 384)).astype(ml_dtypes.bfloat16), None, "bfloat16", 384)) for _ in range(6)]
@jax.jit
def chain(x, ws):
    for w in ws * 4:
        x = jnp.tanh(L.linear(x, w))
    return x
x = jnp.asarray(rng.standard_normal((1, 384)).astype(np.float32))
chain(x, ws).block_until_ready()
ts = []
for _ in range(400):
    t = time.perf_counter(); chain(x, ws).block_until_ready(); ts.append(time.perf_counter() - t)
print(repo, f"{np.median(ts)*1e3:.3f} ms for 24 one-row callbacks")

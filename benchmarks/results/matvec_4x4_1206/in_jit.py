import sys, time, numpy as np, jax, jax.numpy as jnp
import powerinfer_jax
from ops import linear as L
from ops.quant import Weight
rng = np.random.default_rng(0)
ws = [Weight(jnp.asarray((rng.standard_normal((11008, 4096)).astype(np.float32) * .02).astype(jnp.bfloat16)), None, "bfloat16", 4096) for _ in range(2)]
f = jax.jit(lambda x, w: L.linear(x, w))
for B in (1, 2, 4, 8):
    x = jnp.asarray(rng.standard_normal((B, 4096)).astype(np.float32))
    print(B, "callback" in f.lower(x, ws[0]).as_text(), end=" ")
    f(x, ws[0]).block_until_ready()
    ts = []
    for r in range(9):
        t = time.perf_counter(); f(x, ws[r % 2]).block_until_ready(); ts.append(time.perf_counter() - t)
    print(f"{np.median(ts)*1e3:.2f} ms", flush=True)

import time, numpy as np, jax, jax.numpy as jnp
import powerinfer_jax
from ops import linear as L
from ops.quant import Weight
rng = np.random.default_rng(0)
ws = [Weight(jnp.asarray((rng.standard_normal((11008, 4096)).astype(np.float32) * .02).astype(jnp.bfloat16)), None, "bfloat16", 4096) for _ in range(2)]
f = jax.jit(lambda h, w: L.linear_t(h, w))
g = jax.jit(lambda x, w: L.linear(x, w))
for B in (1, 4):
    h = rng.standard_normal((B, 11008)).astype(np.float32); h[h < 0.5] = 0  # ~30% live per token, as after a ReLU
    h = jnp.asarray(h); x = jnp.asarray(rng.standard_normal((B, 4096)).astype(np.float32))
    f(h, ws[0]).block_until_ready(); g(x, ws[0]).block_until_ready()
    tf, tg = [], []
    for r in range(9):
        t = time.perf_counter(); f(h, ws[r % 2]).block_until_ready(); tf.append(time.perf_counter() - t)
        t = time.perf_counter(); g(x, ws[r % 2]).block_until_ready(); tg.append(time.perf_counter() - t)
    print(f"B={B}: linear_t (down, 30% live) {np.median(tf)*1e3:.2f} ms   linear (up) {np.median(tg)*1e3:.2f} ms", flush=True)

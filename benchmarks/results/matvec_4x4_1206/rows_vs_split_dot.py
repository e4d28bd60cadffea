# host_matvec (4x4 kernel) vs XLA's two-part bf16 dot, 7B up-projection [11008, 4096] bf16, by rows
import os, time, numpy as np, jax, jax.numpy as jnp
import powerinfer_jax
from ops import host_kernels as H
from ops.linear import _bf16_split_dot
from ops.quant import Weight
rng = np.random.default_rng(0)
SHAPE = tuple(int(v) for v in os.environ.get("SHAPE", "11008,4096").split(","))
ws = [(rng.standard_normal(SHAPE).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16) for _ in range(3)]
Wn = [Weight(w, None, "bfloat16", SHAPE[1]) for w in ws]
Wj = [Weight(jnp.asarray(w.view(jnp.bfloat16)), None, "bfloat16", SHAPE[1]) for w in ws]
f = jax.jit(lambda x, w: _bf16_split_dot(x, w))
for B in [int(v) for v in os.environ.get("ROWS", "4,8,12,16,24").split(",")]:
    x = rng.standard_normal((B, SHAPE[1])).astype(np.float32); xj = jnp.asarray(x)
    f(xj, Wj[0]).block_until_ready(); H.host_matvec(Wn[0], x)
    th, tx = [], []
    for r in range(9):
        t = time.perf_counter(); H.host_matvec(Wn[r % 3], x); th.append(time.perf_counter() - t)
        t = time.perf_counter(); f(xj, Wj[r % 3]).block_until_ready(); tx.append(time.perf_counter() - t)
    h, xx = np.median(th) * 1e3, np.median(tx) * 1e3
    print(f"rows {B}: host {h:.2f} ms  xla two-part {xx:.2f} ms  xla/host {xx/h:.2f}x", flush=True)

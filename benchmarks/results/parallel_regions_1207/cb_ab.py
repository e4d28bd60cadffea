import time, sys, numpy as np, ml_dtypes, jax, jax.numpy as jnp
import powerinfer_jax  # sets OMP_WAIT_POLICY
import ops.host_kernels as H
from ops import linear as L
from ops.quant import Weight
rng = np.random.default_rng(0)
ws = [Weight(rng.standard_normal((384, 384)).astype(ml_dtypes.bfloat16), None, "bfloat16", 384) for _ in range(6)]
wsj = [jax.tree.map(jnp.asarray, w) for w in ws]
B = int(sys.argv[1])
@jax.jit
def chain(x, ws):
    for w in ws * 4:
        x = jnp.tanh(L.linear(x, w))
    return x
x = jnp.asarray(rng.standard_normal((B, 384)).astype(np.float32))
def run():
    t = time.perf_counter(); chain(x, wsj).block_until_ready(); return time.perf_counter() - t
res = {}
for rep in range(3):
    for thr in [1 << 60, 0]:
        H.SERIAL_MAX_WORK_BYTES = thr; H.SERIAL_MAX_BYTES = (1 << 21) if thr else 0
        run()
        res.setdefault(thr, []).append(np.median([run() for _ in range(50)]) * 1e3)
print(B, {("serial" if k else "parallel"): np.round(v, 2) for k, v in res.items()}, "ms for 24 callbacks")

import sys, time
import numpy as np
sys.path.insert(0, "/work/main")
import powerinfer_jax  # noqa
import ops.host_kernels as hk
from ops.quant import to_weight
rng = np.random.default_rng(0)
d, f = 4096, 11008
L = [tuple(to_weight(rng.standard_normal((f, d)).astype(np.float32) * 0.02, "int4") for _ in range(3)) for _ in range(2)]
idx = np.arange(f, dtype=np.int32)
sel = np.sort(rng.permutation(f)[: int(0.3 * f)]).astype(np.int32)
for T in [int(v) for v in sys.argv[1:]]:
    x = rng.standard_normal((T, d)).astype(np.float32)
    hh = np.maximum(rng.standard_normal((T, f)), 0).astype(np.float32)
    for name, prod, fn in (("FFN 30%", "ffn", lambda l: hk.host_sparse_ffn("reglu", *l, x, sel, len(sel))),
                           ("axpy", "axpy", lambda l: hk.host_axpy_down(l[2], idx, f, hh)),
                           ("matvec", "matvec", lambda l: hk.host_matvec(l[0], x))):
        ts = {"numba": [], "blas": []}
        for r in range(5):
            for k in ts:
                hk._BLAS_MIN_TOKENS[prod]["int4"] = 1 if k == "blas" else 10**6
                with hk.one_blas_thread():
                    t0 = time.perf_counter()
                    for l in L: fn(l)
                ts[k].append((time.perf_counter() - t0) / 2)
        print(f"{T} tokens {name}: numba {1e3*np.median(ts['numba']):.1f} ms, blas {1e3*np.median(ts['blas']):.1f} ms, numba/blas time {np.median(np.array(ts['numba'])/np.array(ts['blas'])):.2f}", flush=True)

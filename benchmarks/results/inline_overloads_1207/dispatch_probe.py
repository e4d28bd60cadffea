# The multi-token mat-vec loop at the bundled shape through the `_dot4x4` overload (a call, with a runtime bf16/f16
# branch), through an inline="always" copy of it, and calling the bf16/int8 4x4 dot directly; one process.
import time, sys, os
import numpy as np, ml_dtypes
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
import powerinfer_jax  # noqa: F401  (thread settings)
from numba import njit, types
from numba.extending import overload
from ops import host_loops as L, host_elements as E
from ops.host_elements import _dot4x4
FM = {"reassoc", "contract"}

def dot4x4_inl(code, p0, p1, p2, p3, x0, x1, x2, x3):
    raise NotImplementedError

@overload(dot4x4_inl, inline="always")
def _impl(code, p0, p1, p2, p3, x0, x1, x2, x3):
    if p0.dtype == types.uint16:
        def impl(code, p0, p1, p2, p3, x0, x1, x2, x3):
            if code == E._BF16:
                return E._bf16_dot4x4(p0, p1, p2, p3, x0, x1, x2, x3)
            return E._f16_dot4x4(p0, p1, p2, p3, x0, x1, x2, x3)
        return impl
    if p0.dtype == types.int8:
        return lambda code, p0, p1, p2, p3, x0, x1, x2, x3: E._i8_dot4x4(p0, p1, p2, p3, x0, x1, x2, x3)

def make(dot, direct=False):
    @njit(fastmath=FM)
    def mv(code, w, x, out):
        rows = w.shape[0]; n_tok = x.shape[0]; last = rows - 1
        for r in range(0, rows, 4):
            r0, r1, r2, r3 = r, min(r + 1, last), min(r + 2, last), min(r + 3, last)
            for b in range(0, n_tok, 4):
                b0, b1, b2, b3 = b, min(b + 1, n_tok - 1), min(b + 2, n_tok - 1), min(b + 3, n_tok - 1)
                if direct:
                    t = dot(w[r0], w[r1], w[r2], w[r3], x[b0], x[b1], x[b2], x[b3])
                else:
                    t = dot(code, w[r0], w[r1], w[r2], w[r3], x[b0], x[b1], x[b2], x[b3])
                out[b0, r0], out[b1, r0], out[b2, r0], out[b3, r0] = t[0], t[1], t[2], t[3]
                out[b0, r1], out[b1, r1], out[b2, r1], out[b3, r1] = t[4], t[5], t[6], t[7]
                out[b0, r2], out[b1, r2], out[b2, r2], out[b3, r2] = t[8], t[9], t[10], t[11]
                out[b0, r3], out[b1, r3], out[b2, r3], out[b3, r3] = t[12], t[13], t[14], t[15]
    return mv

rng = np.random.default_rng(0)
R, K = 1536, 384
data = {"bf16": (E._BF16, rng.standard_normal((R, K)).astype(ml_dtypes.bfloat16).view(np.uint16), E._bf16_dot4x4),
        "int8": (E._I8, rng.integers(-127, 127, (R, K)).astype(np.int8), E._i8_dot4x4)}
s_none = {"bf16": np.empty((1, 0), np.float32), "int8": np.ones((R, 1), np.float32)}
for fmt, (code, w, direct) in data.items():
    fns = {"kernel (serial)": lambda code, w, x, o: L._matvec_kernel_serial(code, w, s_none[fmt], x, o),
           "overload": make(_dot4x4), "inline overload": make(dot4x4_inl), "direct": make(direct, True)}
    for T in (4, 16):
        x = rng.standard_normal((T, K)).astype(np.float32); o = np.empty((T, R), np.float32)
        for f in fns.values():
            f(code, w, x, o)
        t = {n: [] for n in fns}
        for _ in range(100):
            for n, f in fns.items():
                t0 = time.perf_counter(); f(code, w, x, o); t[n].append(time.perf_counter() - t0)
        print(fmt, R, K, T, "  ".join(f"{n} {np.median(v) * 1e6:.0f} us" for n, v in t.items()), flush=True)

import time, numpy as np, sys
from numba import njit
sys.path.insert(0, "/work/main")
from ops.host_elements import _f16, _lo, _hi, _q4_widen
FM = {"nnan", "ninf", "nsz", "arcp", "contract", "afn", "reassoc"}
@njit(fastmath=FM)
def cur(w, s, out):
    for r in range(w.shape[0]):
        _q4_widen(w[r], s[r], out[r])
@njit(fastmath=FM)
def grp(w, s, out):
    half = w.shape[1]
    for r in range(w.shape[0]):
        a, sa, o = w[r], s[r], out[r]
        o_lo, o_hi = o[:half], o[half:]
        for g in range(half // 16):
            e = _f16(sa[g])
            for k in range(16):
                j = 16 * g + k
                o_lo[j] = e * _lo(a[j])
                o_hi[j] = e * _hi(a[j])
rng = np.random.default_rng(0)
R, K = 512, 4096
w = rng.integers(0, 256, (R, K // 2), dtype=np.uint8)
s = (rng.standard_normal((R, K // 32)).astype(np.float16) * 0.01).view(np.uint16)
o1 = np.zeros((R, K), np.float32); o2 = np.zeros((R, K), np.float32)
cur(w, s, o1); grp(w, s, o2); print("equal", np.array_equal(o1, o2))
ts = {"cur": [], "grp": []}
for rnd in range(10):
    for f in (cur, grp):
        t = time.perf_counter()
        for _ in range(5): f(w, s, o1)
        ts[f.__name__].append((time.perf_counter() - t) / 5)
for k, v in ts.items():
    m = np.median(v); print(k, "%.2f ms  %.2f G values/s" % (m * 1e3, R * K / m / 1e9))

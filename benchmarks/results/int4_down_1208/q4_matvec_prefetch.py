import time, numpy as np, sys
from numba import njit, prange
sys.path.insert(0, "/work/main")
from ops.host_elements import _f16, _prefetch_rows
FM = {"nnan", "ninf", "nsz", "arcp", "contract", "afn", "reassoc"}
def make(dist, par):
    @njit(fastmath=FM, cache=False, parallel=par)
    def k(w, s, x, xsum, out, scratch):
        rows, half = w.shape
        step = (rows + 63) // 64
        eight = np.float32(8.0)
        for c in prange(64):
            dt = scratch[c]
            end = min(rows, (c + 1) * step)
            for r in range(c * step, end):
                if dist > 0 and r + dist < end:
                    _prefetch_rows(w, r + dist, r + dist + 1)
                    _prefetch_rows(s, r + dist, r + dist + 1)
                if dist > 1 and r == c * step:
                    _prefetch_rows(w, r + 1, min(r + dist, end))
                    _prefetch_rows(s, r + 1, min(r + dist, end))
                sr = s[r]
                for g in range(sr.shape[0]):
                    dt[g] = _f16(sr[g])
                a = w[r]
                xb, xs = x[0], xsum[0]
                x_lo, x_hi = xb[:half], xb[half:]
                corr = np.float32(0.0)
                for g in range(sr.shape[0]):
                    corr += dt[g] * xs[g]
                acc = np.float32(0.0)
                for j in range(half):
                    v = a[j]
                    acc += dt[j >> 4] * (np.float32(np.uint8(v & np.uint8(15))) * x_lo[j]
                                         + np.float32(np.uint8(v >> np.uint8(4))) * x_hi[j])
                out[0, r] = acc - eight * corr
    return k
par = sys.argv[1] == "par"
ks = {d: make(d, par) for d in (0, 1, 2, 4)}
rng = np.random.default_rng(0)
R, K, NM = 11008, 4096, 5
mats = [(rng.integers(0, 256, (R, K // 2), dtype=np.uint8),
         (rng.standard_normal((R, K // 32)).astype(np.float16)).view(np.uint16)) for _ in range(NM)]
x = rng.standard_normal((1, K)).astype(np.float32)
xs = (x[0, :K//2].reshape(-1, 16).sum(1) + x[0, K//2:].reshape(-1, 16).sum(1)).reshape(1, -1).astype(np.float32)
sc = np.empty((64, K // 32), np.float32)
o = np.zeros((1, R), np.float32)
for d, k in ks.items(): k(mats[0][0], mats[0][1], x, xs, o, sc)
ts = {d: [] for d in ks}
for rnd in range(8):
    for d, k in (ks.items() if rnd % 2 else list(ks.items())[::-1]):
        t = time.perf_counter()
        for w, s in mats: k(w, s, x, xs, o, sc)
        ts[d].append((time.perf_counter() - t) / NM)
for d, v in ts.items():
    m = np.median(v); print("par" if par else "serial", "dist", d, "%.2f ms  %.2f G values/s  %.1f GB/s" % (m * 1e3, R * K / m / 1e9, (R * K / 2 + R * K / 16) / m / 1e9))

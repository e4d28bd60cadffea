import time, numpy as np, sys
from numba import njit
sys.path.insert(0, "/work/main")
from ops.host_elements import _f16, _q4_dot4
FM = {"nnan", "ninf", "nsz", "arcp", "contract", "afn", "reassoc"}
@njit(inline="always")
def _ulo(v):
    return np.float32(np.uint8(v & np.uint8(15)))
@njit(inline="always")
def _uhi(v):
    return np.float32(np.uint8(v >> np.uint8(4)))
@njit(fastmath=FM, inline="always")
def dot4_off(a, sa, b, sb, c, sc, d, sd, xb, xs):
    half = a.shape[0]
    x_lo, x_hi = xb[:half], xb[half:]
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for j in range(half):
        g = j >> 4
        xl = x_lo[j]; xh = x_hi[j]
        v = a[j]; s0 += _f16(sa[g]) * (_ulo(v) * xl + _uhi(v) * xh)
        v = b[j]; s1 += _f16(sb[g]) * (_ulo(v) * xl + _uhi(v) * xh)
        v = c[j]; s2 += _f16(sc[g]) * (_ulo(v) * xl + _uhi(v) * xh)
        v = d[j]; s3 += _f16(sd[g]) * (_ulo(v) * xl + _uhi(v) * xh)
    c0 = c1 = c2 = c3 = np.float32(0.0)
    for g in range(sa.shape[0]):
        c0 += _f16(sa[g]) * xs[g]; c1 += _f16(sb[g]) * xs[g]; c2 += _f16(sc[g]) * xs[g]; c3 += _f16(sd[g]) * xs[g]
    e = np.float32(8.0)
    return s0 - e * c0, s1 - e * c1, s2 - e * c2, s3 - e * c3
@njit(fastmath=FM)
def cur(w, s, x, xs, out):
    for r in range(0, w.shape[0] - 3, 4):
        out[r], out[r+1], out[r+2], out[r+3] = _q4_dot4(w[r], s[r], w[r+1], s[r+1], w[r+2], s[r+2], w[r+3], s[r+3], x)
@njit(fastmath=FM)
def off(w, s, x, xs, out):
    for r in range(0, w.shape[0] - 3, 4):
        out[r], out[r+1], out[r+2], out[r+3] = dot4_off(w[r], s[r], w[r+1], s[r+1], w[r+2], s[r+2], w[r+3], s[r+3], x, xs)

@njit(fastmath=FM, inline="always")
def row_mv(a, sa, dt, x_lo, x_hi, xs):
    half = a.shape[0]
    for g in range(sa.shape[0]):
        dt[g] = _f16(sa[g])
    corr = np.float32(0.0)
    for g in range(sa.shape[0]):
        corr += dt[g] * xs[g]
    acc = np.float32(0.0)
    for j in range(half):
        v = a[j]
        acc += dt[j >> 4] * (_ulo(v) * x_lo[j] + _uhi(v) * x_hi[j])
    return acc - np.float32(8.0) * corr
@njit(fastmath=FM)
def rows1(w, s, x, xs, out):
    dt = np.empty(s.shape[1], np.float32)
    half = w.shape[1]
    x_lo, x_hi = x[:half], x[half:]
    for r in range(w.shape[0]):
        out[r] = row_mv(w[r], s[r], dt, x_lo, x_hi, xs)
rng = np.random.default_rng(0)
R, K = int(sys.argv[1]), 4096
w = rng.integers(0, 256, (R, K // 2), dtype=np.uint8)
s = (rng.standard_normal((R, K // 32)).astype(np.float16) * 0.01).view(np.uint16)
x = rng.standard_normal(K).astype(np.float32)
xs = (x[:K//2].reshape(-1, 16).sum(1) + x[K//2:].reshape(-1, 16).sum(1)).astype(np.float32)
o1 = np.zeros(R, np.float32); o2 = np.zeros(R, np.float32)
cur(w, s, x, xs, o1); off(w, s, x, xs, o2); print("max diff", float(np.abs(o1 - o2).max()), float(np.abs(o1).max()))
o3 = np.zeros(R, np.float32); rows1(w, s, x, xs, o3); print("rows1 diff", float(np.abs(o1 - o3).max()))
ts = {"cur": [], "off": [], "rows1": []}
for r in range(10):
    for f in (cur, off, rows1):
        t = time.perf_counter()
        for _ in range(5): f(w, s, x, xs, o1)
        ts[f.__name__].append((time.perf_counter() - t) / 5)
for k, v in ts.items():
    m = np.median(v); print(k, "%.2f ms  %.2f G values/s" % (m * 1e3, R * K / m / 1e9))

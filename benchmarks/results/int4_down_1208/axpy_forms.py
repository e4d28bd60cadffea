import time, numpy as np, sys
from numba import njit
sys.path.insert(0, "/work/main")
from ops.host_elements import _f16, _lo, _hi
sys.path.insert(0, "/tmp/w/old")
from host_elements_old import _q4_axpy4
FM = {"nnan", "ninf", "nsz", "arcp", "contract", "afn", "reassoc"}
@njit(fastmath=FM)
def cur(acc, h, w, s, cf):
    rows = w.shape[0]
    for r in range(0, rows - 3, 4):
        _q4_axpy4(acc, h[r], w[r], s[r], h[r + 1], w[r + 1], s[r + 1], h[r + 2], w[r + 2], s[r + 2], h[r + 3], w[r + 3], s[r + 3], cf)
@njit(fastmath=FM, inline="always")
def blk4(acc, a0, a, sa, a1, b, sb, a2, c, sc, a3, d, sd, cf):
    half = a.shape[0]
    acc_lo, acc_hi = acc[:half], acc[half:]
    B = 256
    e0, e1, e2, e3 = cf[0, :B], cf[1, :B], cf[2, :B], cf[3, :B]
    r0, r1, r2, r3 = e0.reshape(B // 16, 16), e1.reshape(B // 16, 16), e2.reshape(B // 16, 16), e3.reshape(B // 16, 16)
    for j0 in range(0, half, B):
        for g in range(B // 16):
            gg = (j0 >> 4) + g
            r0[g, :] = a0 * _f16(sa[gg])
            r1[g, :] = a1 * _f16(sb[gg])
            r2[g, :] = a2 * _f16(sc[gg])
            r3[g, :] = a3 * _f16(sd[gg])
        al, ah = acc_lo[j0:j0 + B], acc_hi[j0:j0 + B]
        aa, bb, cc, dd = a[j0:j0 + B], b[j0:j0 + B], c[j0:j0 + B], d[j0:j0 + B]
        for j in range(B):
            al[j] += e0[j] * _lo(aa[j]) + e1[j] * _lo(bb[j]) + e2[j] * _lo(cc[j]) + e3[j] * _lo(dd[j])
        for j in range(B):
            ah[j] += e0[j] * _hi(aa[j]) + e1[j] * _hi(bb[j]) + e2[j] * _hi(cc[j]) + e3[j] * _hi(dd[j])
@njit(fastmath=FM)
def blk(acc, h, w, s, cf):
    rows = w.shape[0]
    for r in range(0, rows - 3, 4):
        blk4(acc, h[r], w[r], s[r], h[r + 1], w[r + 1], s[r + 1], h[r + 2], w[r + 2], s[r + 2], h[r + 3], w[r + 3], s[r + 3], cf)
@njit(fastmath=FM, inline="always")
def grp4(acc, a0, a, sa, a1, b, sb, a2, c, sc, a3, d, sd):
    half = a.shape[0]
    acc_lo, acc_hi = acc[:half], acc[half:]
    for g in range(half // 16):
        e0 = a0 * _f16(sa[g]); e1 = a1 * _f16(sb[g]); e2 = a2 * _f16(sc[g]); e3 = a3 * _f16(sd[g])
        o = 16 * g
        for k in range(16):
            j = o + k
            acc_lo[j] += e0 * _lo(a[j]) + e1 * _lo(b[j]) + e2 * _lo(c[j]) + e3 * _lo(d[j])
            acc_hi[j] += e0 * _hi(a[j]) + e1 * _hi(b[j]) + e2 * _hi(c[j]) + e3 * _hi(d[j])
@njit(fastmath=FM)
def grp(acc, h, w, s, cf):
    rows = w.shape[0]
    for r in range(0, rows - 3, 4):
        grp4(acc, h[r], w[r], s[r], h[r + 1], w[r + 1], s[r + 1], h[r + 2], w[r + 2], s[r + 2], h[r + 3], w[r + 3], s[r + 3])

@njit(inline="always")
def _ulo(v):
    return np.float32(np.uint8(v & np.uint8(15)))
@njit(inline="always")
def _uhi(v):
    return np.float32(np.uint8(v >> np.uint8(4)))
@njit(fastmath=FM, inline="always")
def off4(acc, a0, a, sa, a1, b, sb, a2, c, sc, a3, d, sd):
    half = a.shape[0]
    acc_lo, acc_hi = acc[:half], acc[half:]
    for g in range(half // 16):
        e0 = a0 * _f16(sa[g]); e1 = a1 * _f16(sb[g]); e2 = a2 * _f16(sc[g]); e3 = a3 * _f16(sd[g])
        off = np.float32(-8.0) * (e0 + e1 + e2 + e3)
        for j in range(16 * g, 16 * g + 16):
            acc_lo[j] += e0 * _ulo(a[j]) + e1 * _ulo(b[j]) + e2 * _ulo(c[j]) + e3 * _ulo(d[j]) + off
            acc_hi[j] += e0 * _uhi(a[j]) + e1 * _uhi(b[j]) + e2 * _uhi(c[j]) + e3 * _uhi(d[j]) + off
@njit(fastmath=FM)
def off(acc, h, w, s, cf):
    rows = w.shape[0]
    for r in range(0, rows - 3, 4):
        off4(acc, h[r], w[r], s[r], h[r + 1], w[r + 1], s[r + 1], h[r + 2], w[r + 2], s[r + 2], h[r + 3], w[r + 3], s[r + 3])
rng = np.random.default_rng(0)
R, K = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 4096
w = rng.integers(0, 256, (R, K // 2), dtype=np.uint8)
s = (rng.standard_normal((R, K // 32)).astype(np.float16) * 0.01).view(np.uint16)
h = rng.standard_normal(R).astype(np.float32)
cf = np.zeros((4, K // 2), np.float32)
res = {}
fs = (cur, grp, off)
for f in fs:
    acc = np.zeros(K, np.float32); f(acc, h, w, s, cf); res[f.__name__] = acc
print({k: float(np.max(np.abs(v - res["cur"]))) for k, v in res.items()}, float(np.abs(res["cur"]).max()), "sum|terms|", float(np.sum(np.abs(h))*0.01*8))
ts = {f.__name__: [] for f in fs}
for rnd in range(10):
    for f in fs:
        acc = np.zeros(K, np.float32)
        t = time.perf_counter()
        for _ in range(5): f(acc, h, w, s, cf)
        ts[f.__name__].append((time.perf_counter() - t) / 5)
for k, v in ts.items():
    m = np.median(v); print(k, "%.2f ms  %.2f G values/s" % (m * 1e3, R * K / m / 1e9))

import time, sys, numpy as np
from numba import njit, prange
import powerinfer_jax
from ops import host_elements as E
cvt = E._bf16
F = E._FASTMATH
@njit(fastmath=F, inline="always")
def dot2x4(p0, p1, x0, x1, x2, x3):
    s00 = s01 = s02 = s03 = np.float32(0.0)
    s10 = s11 = s12 = s13 = np.float32(0.0)
    for k in range(x0.shape[0]):
        a, b = cvt(p0[k]), cvt(p1[k])
        u0, u1, u2, u3 = x0[k], x1[k], x2[k], x3[k]
        s00 += a * u0; s01 += a * u1; s02 += a * u2; s03 += a * u3
        s10 += b * u0; s11 += b * u1; s12 += b * u2; s13 += b * u3
    return s00, s01, s02, s03, s10, s11, s12, s13
@njit(fastmath=F, inline="always")
def dot3x4(p0, p1, p2, x0, x1, x2, x3):
    s00 = s01 = s02 = s03 = np.float32(0.0)
    s10 = s11 = s12 = s13 = np.float32(0.0)
    s20 = s21 = s22 = s23 = np.float32(0.0)
    for k in range(x0.shape[0]):
        a, b, c = cvt(p0[k]), cvt(p1[k]), cvt(p2[k])
        u0, u1, u2, u3 = x0[k], x1[k], x2[k], x3[k]
        s00 += a * u0; s01 += a * u1; s02 += a * u2; s03 += a * u3
        s10 += b * u0; s11 += b * u1; s12 += b * u2; s13 += b * u3
        s20 += c * u0; s21 += c * u1; s22 += c * u2; s23 += c * u3
    return s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23

@njit(parallel=True, fastmath=F)
def mv44(w, x, out):
    rows = w.shape[0]; n = x.shape[0]
    for c in prange(64):
        step = 4 * (((rows + 3) // 4 + 63) // 64)
        for r in range(c * step, min(rows, (c + 1) * step), 4):
            for b in range(0, n, 4):
                t = E._bf16_dot4x4(w[r], w[r+1], w[r+2], w[r+3], x[b], x[b+1], x[b+2], x[b+3])
                for i in range(4):
                    for j in range(4):
                        out[b + j, r + i] = t[4 * i + j]
@njit(parallel=True, fastmath=F)
def mv24(w, x, out):
    rows = w.shape[0]; n = x.shape[0]
    for c in prange(64):
        step = 4 * (((rows + 3) // 4 + 63) // 64)
        for r in range(c * step, min(rows, (c + 1) * step), 4):
            for b in range(0, n, 4):
                t = dot2x4(w[r], w[r+1], x[b], x[b+1], x[b+2], x[b+3])
                v = dot2x4(w[r+2], w[r+3], x[b], x[b+1], x[b+2], x[b+3])
                for i in range(2):
                    for j in range(4):
                        out[b + j, r + i] = t[4 * i + j]
                        out[b + j, r + 2 + i] = v[4 * i + j]
@njit(parallel=True, fastmath=F)
def mv34(w, x, out):
    rows = w.shape[0]; n = x.shape[0]
    for c in prange(64):
        step = 3 * (((rows + 2) // 3 + 63) // 64)
        for r in range(c * step, min(rows, (c + 1) * step), 3):
            for b in range(0, n, 4):
                t = dot3x4(w[r], w[r+1], w[r+2], x[b], x[b+1], x[b+2], x[b+3])
                for i in range(3):
                    for j in range(4):
                        out[b + j, r + i] = t[4 * i + j]
rng = np.random.default_rng(0)
for rows, cols in ((1152, 384), (1536, 384), (384, 1536), (12288, 4096), (4096, 11008)):
    rows = rows // 12 * 12
    w = (rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    wf = (w.astype(np.uint32) << 16).view(np.float32)
    for n in (4, 16):
        x = rng.standard_normal((n, cols)).astype(np.float32)
        ref = x @ wf.T
        outs = {k: np.zeros((n, rows), np.float32) for k in ("44", "24", "34")}
        fns = {"44": mv44, "24": mv24, "34": mv34}
        for k in fns: fns[k](w, x, outs[k]); assert np.allclose(outs[k], ref, rtol=1e-3, atol=1e-3), k
        ts = {k: [] for k in fns}
        reps = int(min(40, max(6, 2e8 // (rows * cols * n))))
        for r in range(reps):
            for k in fns:
                t = time.perf_counter(); fns[k](w, x, outs[k]); ts[k].append(time.perf_counter() - t)
        m = {k: np.median(v) * 1e3 for k, v in ts.items()}
        print(f"[{rows},{cols}] {n:2d} tok: 4x4 {m['44']:.3f} 2x4x2 {m['24']:.3f} 3x4 {m['34']:.3f} ms; 4x4/2x4 {np.median(np.array(ts['44'])/np.array(ts['24'])):.2f} 4x4/3x4 {np.median(np.array(ts['44'])/np.array(ts['34'])):.2f}", flush=True)

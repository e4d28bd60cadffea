import time, numpy as np
from numba import njit, prange
import powerinfer_jax
from ops import host_elements as E
cvt = E._bf16
F = E._FASTMATH
@njit(fastmath=F, inline="always")
def axpy4x4(a0, a1, a2, a3, c, o, p0, p1, p2, p3):
    # rows p0..p3 are rows o..o+3 of the 8-row group; c[8t + i]
    c00, c01, c02, c03 = c[o], c[o + 1], c[o + 2], c[o + 3]
    c10, c11, c12, c13 = c[8 + o], c[9 + o], c[10 + o], c[11 + o]
    c20, c21, c22, c23 = c[16 + o], c[17 + o], c[18 + o], c[19 + o]
    c30, c31, c32, c33 = c[24 + o], c[25 + o], c[26 + o], c[27 + o]
    for k in range(a0.shape[0]):
        w0, w1, w2, w3 = cvt(p0[k]), cvt(p1[k]), cvt(p2[k]), cvt(p3[k])
        a0[k] += c00 * w0 + c01 * w1 + c02 * w2 + c03 * w3
        a1[k] += c10 * w0 + c11 * w1 + c12 * w2 + c13 * w3
        a2[k] += c20 * w0 + c21 * w1 + c22 * w2 + c23 * w3
        a3[k] += c30 * w0 + c31 * w1 + c32 * w2 + c33 * w3
@njit(fastmath=F, inline="always")
def axpy8x2(a0, a1, c, t, p0, p1, p2, p3, p4, p5, p6, p7):
    c00, c01, c02, c03, c04, c05, c06, c07 = c[8*t], c[8*t+1], c[8*t+2], c[8*t+3], c[8*t+4], c[8*t+5], c[8*t+6], c[8*t+7]
    c10, c11, c12, c13, c14, c15, c16, c17 = c[8*t+8], c[8*t+9], c[8*t+10], c[8*t+11], c[8*t+12], c[8*t+13], c[8*t+14], c[8*t+15]
    for k in range(a0.shape[0]):
        w0, w1, w2, w3 = cvt(p0[k]), cvt(p1[k]), cvt(p2[k]), cvt(p3[k])
        w4, w5, w6, w7 = cvt(p4[k]), cvt(p5[k]), cvt(p6[k]), cvt(p7[k])
        a0[k] += c00 * w0 + c01 * w1 + c02 * w2 + c03 * w3 + c04 * w4 + c05 * w5 + c06 * w6 + c07 * w7
        a1[k] += c10 * w0 + c11 * w1 + c12 * w2 + c13 * w3 + c14 * w4 + c15 * w5 + c16 * w6 + c17 * w7

def make(variant):
    @njit(parallel=True, fastmath=F)
    def down(w, h, acc):
        rows = w.shape[0]; n = h.shape[0]
        nch = acc.shape[0]
        for ch in prange(nch):
            step = 8 * (((rows + 7) // 8 + nch - 1) // nch)
            a = acc[ch]
            c = np.empty(32, np.float32)
            for r in range(ch * step, min(rows, (ch + 1) * step), 8):
                for b in range(0, n, 4):
                    for t in range(4):
                        for i in range(8):
                            c[8 * t + i] = h[b + t, r + i]
                    if variant == 0:
                        E._bf16_axpy8x4(a[b], a[b+1], a[b+2], a[b+3], c, w[r], w[r+1], w[r+2], w[r+3], w[r+4], w[r+5], w[r+6], w[r+7])
                    elif variant == 1:
                        axpy4x4(a[b], a[b+1], a[b+2], a[b+3], c, 0, w[r], w[r+1], w[r+2], w[r+3])
                        axpy4x4(a[b], a[b+1], a[b+2], a[b+3], c, 4, w[r+4], w[r+5], w[r+6], w[r+7])
                    else:
                        axpy8x2(a[b], a[b+1], c, 0, w[r], w[r+1], w[r+2], w[r+3], w[r+4], w[r+5], w[r+6], w[r+7])
                        axpy8x2(a[b+2], a[b+3], c, 2, w[r], w[r+1], w[r+2], w[r+3], w[r+4], w[r+5], w[r+6], w[r+7])
    return down
fns = {"8x4": make(0), "4x4x2": make(1), "8x2x2": make(2)}
rng = np.random.default_rng(0)
for rows, cols in ((1536, 384), (11008, 4096)):
    w = (rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    wf = (w.astype(np.uint32) << 16).view(np.float32)
    for n in (4, 16):
        h = rng.standard_normal((n, rows)).astype(np.float32)
        ref = h @ wf
        accs = {k: np.zeros((2, n, cols), np.float32) for k in fns}
        for k, f in fns.items():
            f(w, h, accs[k]); assert np.allclose(accs[k].sum(0), ref, rtol=1e-3, atol=1e-2), k
        ts = {k: [] for k in fns}
        reps = int(min(40, max(6, 2e8 // (rows * cols * n))))
        for r in range(reps):
            for k, f in fns.items():
                accs[k][:] = 0
                t = time.perf_counter(); f(w, h, accs[k]); ts[k].append(time.perf_counter() - t)
        base = np.array(ts["8x4"])
        print(f"[{rows},{cols}] {n:2d} tok: " + "  ".join(f"{k} {np.median(v)*1e3:.3f} ms ({np.median(base/np.array(v)):.2f}x)" for k, v in ts.items()), flush=True)

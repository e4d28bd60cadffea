import re, numpy as np
from numba import njit
import powerinfer_jax
from ops import host_elements as E
@njit(fastmath=E._FASTMATH)
def d44(p0, p1, p2, p3, x0, x1, x2, x3):
    return E._bf16_dot4x4(p0, p1, p2, p3, x0, x1, x2, x3)
@njit(fastmath=E._FASTMATH)
def d44f(p0, p1, p2, p3, x0, x1, x2, x3):
    return E._f32_dot4x4(p0, p1, p2, p3, x0, x1, x2, x3)
@njit(fastmath=E._FASTMATH)
def a84(a0, a1, a2, a3, c, p0, p1, p2, p3, p4, p5, p6, p7):
    E._bf16_axpy8x4(a0, a1, a2, a3, c, p0, p1, p2, p3, p4, p5, p6, p7)
u = np.zeros(512, np.uint16); f = np.zeros(512, np.float32)
d44(u, u, u, u, f, f, f, f); d44f(f, f, f, f, f, f, f, f)
a84(f, f, f, f, np.zeros(32, np.float32), *([u] * 8))
for fn in (d44, d44f, a84):
    asm = fn.inspect_asm(fn.signatures[0])
    lines = [l.strip() for l in asm.splitlines()]
    ymm = [l for l in lines if "ymm" in l]
    spill = [l for l in ymm if "rsp" in l or "rbp" in l]
    bcast = [l for l in lines if l.startswith("vbroadcastss")]
    fma = [l for l in lines if l.startswith("vfmadd")]
    print(fn.__name__, "ymm", len(ymm), "stack ymm", len(spill), "vbroadcastss", len(bcast), "fma", len(fma))
    if fn is d44:
        open("/tmp/w/d44.s", "w").write(asm)
    if fn is a84:
        open("/tmp/w/a84.s", "w").write(asm)

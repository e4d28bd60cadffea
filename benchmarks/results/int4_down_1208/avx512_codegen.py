import sys, re
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/tmp/w/old")
from numba import njit
import host_elements_old as OLD
import ops.host_elements as NEW
FM = NEW._FASTMATH
@njit(fastmath=FM)
def new4(acc, h, w, s):
    for r in range(0, w.shape[0] - 3, 4):
        NEW._q4_axpy4(acc, h[r], w[r], s[r], h[r + 1], w[r + 1], s[r + 1], h[r + 2], w[r + 2], s[r + 2], h[r + 3], w[r + 3], s[r + 3])
@njit(fastmath=FM)
def old4(acc, h, w, s, cf):
    for r in range(0, w.shape[0] - 3, 4):
        OLD._q4_axpy4(acc, h[r], w[r], s[r], h[r + 1], w[r + 1], s[r + 1], h[r + 2], w[r + 2], s[r + 2], h[r + 3], w[r + 3], s[r + 3], cf)
for f, sig in ((new4, "void(float32[::1], float32[::1], uint8[:, ::1], uint16[:, ::1])"),
               (old4, "void(float32[::1], float32[::1], uint8[:, ::1], uint16[:, ::1], float32[:, ::1])")):
    f.compile(sig)
    asm = list(f.inspect_asm().values())[0]
    c = lambda p: len(re.findall(p, asm))
    print(f.__name__, "zmm", c(r"%zmm"), "ymm", c(r"%ymm"), "gather", c(r"vgather|vpgather"), "scatter", c(r"vscatter|vpscatter"), "pinsr", c(r"vpinsr"))
    print("  avx512 regs", c(r"%[xyz]mm(1[6-9]|2[0-9]|3[01])\b"), "kmask", c(r"%k[1-7]"))
import numba; print(numba.config.CPU_NAME, numba.config.CPU_FEATURES)

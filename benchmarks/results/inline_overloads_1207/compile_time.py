import time, numpy as np
import powerinfer_jax
from numba import njit
import ops.host_loops as HL
FM = {"reassoc", "contract"}
x = np.zeros((4, 64), np.float32); idx = np.arange(8, dtype=np.int32); s0 = np.empty((1, 0), np.float32)
for name in ("_ffn_kernel", "_matvec_kernel"):
    for par in (True, False):
        for dt in (np.uint16, np.int16):
            f = njit(fastmath=FM, parallel=par)(getattr(HL, name).py_func)
            w = np.zeros((8, 64), dt)
            t0 = time.perf_counter()
            if name == "_ffn_kernel":
                f(0, 1, w, s0, w, s0, np.zeros(1, np.float32), False, True, x, idx, 8, 1, w, s0, False,
                  np.zeros((4, 8), np.float32), np.zeros((4, 64), np.float32), np.zeros((2, 4, 64), np.float32),
                  np.zeros((2, 2, 8), np.int64), np.zeros((2, 40), np.float32), np.zeros((2, 4, 0), np.float32))
            else:
                f(1, w, s0, x, np.zeros((4, 8), np.float32))
            print(name, "parallel" if par else "serial", np.dtype(dt).name, f"{time.perf_counter() - t0:.1f} s", flush=True)

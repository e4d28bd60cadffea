import sys, time, importlib, numpy as np
sys.path.insert(0, "/tmp/w")
import powerinfer_jax
name = sys.argv[1]
m = importlib.import_module(name)
q = np.zeros((4, 8, 128), np.float32); k = np.zeros((4, 2, 16, 128), np.uint16)
args = (m._BF16, q, k, k, np.arange(4, dtype=np.int32), np.zeros(4, np.int32), np.full(4, 5, np.int32), np.float32(1), np.empty_like(q))
for kern in ("_decode_attention", "_decode_attention_serial"):
    t = time.perf_counter(); getattr(m, kern)(*args); print(name, kern, "first call %.1f s" % (time.perf_counter() - t))

# host_matvec: old kernel (a pass per token) vs new (_dot4x4), side by side in one process, 7B shapes
import importlib.util, sys, time, numpy as np
import powerinfer_jax
from ops import host_kernels as NEW
from ops import quant as Q
spec = importlib.util.spec_from_file_location("old_host_kernels", "/tmp/w/old/ops/host_kernels.py")
OLD = importlib.util.module_from_spec(spec); spec.loader.exec_module(OLD)
rng = np.random.default_rng(0)
for fmt in ("bfloat16", "float16", "int8"):
    for shape in ((11008, 4096), (4096, 11008)):
        Ws = [Q.to_weight(rng.standard_normal(shape).astype(np.float32) * 0.02, fmt) for _ in range(2)]
        for B in (2, 4, 8, 16):
            x = rng.standard_normal((B, shape[1])).astype(np.float32)
            a = OLD.host_matvec(Ws[0], x); b = NEW.host_matvec(Ws[0], x)
            err = float(np.abs(a - b).max() / np.abs(a).max())
            to, tn = [], []
            for r in range(7):
                W = Ws[r % 2]
                t = time.perf_counter(); OLD.host_matvec(W, x); to.append(time.perf_counter() - t)
                t = time.perf_counter(); NEW.host_matvec(W, x); tn.append(time.perf_counter() - t)
            o, n = np.median(to) * 1e3, np.median(tn) * 1e3
            print(f"{fmt:9s} {str(shape):14s} B={B:2d}: old {o:6.2f} ms  new {n:6.2f} ms  old/new {o/n:.2f}x  rel.diff {err:.1e}", flush=True)

# One process: the host_loops kernels compiled with one-pass (AVX-512-sized) blocks vs two-pass blocks, alternating.
import sys, time, types, numpy as np
import powerinfer_jax
from ops import host_kernels as HK, quant as Q, host_elements as E
def load(name, path, subs):
    src = open(path).read()
    for a, b in subs: 
        assert a in src, a; src = src.replace(a, b)
    m = types.ModuleType(name); m.__file__ = path; sys.modules[name] = m
    exec(compile(src, path, "exec"), m.__dict__); return m
variants = {}
for v in ("False", "True"):
    el = load(f"el_{v}", E.__file__, [("FOUR_TOKEN_BLOCKS_IN_TWO_PASSES = not _has_32_vector_registers()", f"FOUR_TOKEN_BLOCKS_IN_TWO_PASSES = {v}")])
    lo = load(f"lo_{v}", sys.modules["ops.host_loops"].__file__, [("from ops.host_elements import", f"from el_{v} import"), ("cache=True", "cache=False"), ("drop_stale(_down_kernel", "(lambda *a: None)(_down_kernel")])
    variants[v] = lo
rng = np.random.default_rng(0)
codes = {"bfloat16": E._BF16, "int8": E._I8}
for fmt in ("bfloat16", "int8"):
    for rows, cols in ((1536, 384), (11008, 4096)):
        w = Q.to_weight((rng.standard_normal((rows, cols)) * 0.02).astype(np.float32), fmt)
        kw = HK._kernel_weight(w)
        idx = np.arange(rows, dtype=np.int32)
        for n in (4, 16):
            x = rng.standard_normal((n, cols)).astype(np.float32)
            h = rng.standard_normal((n, rows)).astype(np.float32)
            out = np.zeros((n, rows), np.float32); outd = np.zeros((n, cols), np.float32)
            def mv(lo): lo._matvec_kernel(kw.code, kw.data, kw.scale, x, out)
            def dn(lo): lo._down_kernel(kw.code, kw.data, kw.scale, idx, rows, h, False, True, outd, *HK._down_buffers(kw, n))
            for name, f in (("matvec", mv), ("down", dn)):
                res = {}
                for v, lo in variants.items():
                    f(lo); res[v] = np.copy(out if name == "matvec" else outd)
                np.testing.assert_allclose(res["True"], res["False"], rtol=1e-4, atol=1e-4 * np.abs(res["False"]).max())
                reps = int(min(30, max(8, 2e8 // (rows * cols * n))))
                ts = {v: [] for v in variants}
                for r in range(reps):
                    for v in (("False", "True") if r % 2 else ("True", "False")):
                        t = time.perf_counter(); f(variants[v]); ts[v].append(time.perf_counter() - t)
                ratio = np.median(np.array(ts["False"]) / np.array(ts["True"]))
                print(f"{fmt:8s} {name:6s} [{rows},{cols}] {n:2d} tok: one pass {np.median(ts['False'])*1e3:7.3f} two passes {np.median(ts['True'])*1e3:7.3f} ms  one/two {ratio:.2f}", flush=True)

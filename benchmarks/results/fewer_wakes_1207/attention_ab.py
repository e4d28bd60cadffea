# A/B of the decode attention kernel, old and new compiled in one process, alternating calls.
# usage: python attention_ab.py ROWS KV_HEADS HEAD_DIM GROUP OLD.py  (OLD.py: `git show 6619e3c:ops/host_attention.py`)
import os, sys, time, importlib.util, numpy as np
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, "/work/main")
import ops.host_attention as NEW
spec = importlib.util.spec_from_file_location("attn_old", sys.argv[5] if len(sys.argv) > 5 else "/tmp/w/host_attention_old.py")
OLD = importlib.util.module_from_spec(spec); spec.loader.exec_module(OLD)
import ml_dtypes
rng = np.random.default_rng(0)
B, hkv, S, hd = int(sys.argv[1]), int(sys.argv[2]), 1024, int(sys.argv[3])
hq = hkv * int(sys.argv[4]) if len(sys.argv) > 4 else hkv
for kvname in ("f32", "bf16"):
    k = rng.standard_normal((B, hkv, S, hd)).astype(np.float32)
    v = rng.standard_normal((B, hkv, S, hd)).astype(np.float32)
    code = NEW._F32
    if kvname == "bf16":
        k = k.astype(ml_dtypes.bfloat16).view(np.uint16); v = v.astype(ml_dtypes.bfloat16).view(np.uint16); code = NEW._BF16
    q = rng.standard_normal((B, hq, hd)).astype(np.float32)
    rows = np.arange(B, dtype=np.int32)
    for L in (40, 150, 600):
        starts = np.zeros(B, np.int32); ends = np.full(B, L, np.int32)
        for par in ("serial", "parallel"):
            ks = {m.__name__: (m._decode_attention_serial if par == "serial" else m._decode_attention) for m in (OLD, NEW)}
            outs = {n: np.empty_like(q) for n in ks}
            for n, kern in ks.items():
                kern(code, q, k, v, rows, starts, ends, np.float32(0.125), outs[n])
            assert np.allclose(outs["attn_old"], outs["ops.host_attention"], rtol=1e-4, atol=1e-5)
            ts = {n: [] for n in ks}
            for _ in range(25):
                for n, kern in ks.items():
                    t0 = time.perf_counter(); kern(code, q, k, v, rows, starts, ends, np.float32(0.125), outs[n]); ts[n].append(time.perf_counter() - t0)
            to, tn = np.median(ts["attn_old"]), np.median(ts["ops.host_attention"])
            print(kvname, L, par, f"old {to*1e6:.0f} new {tn*1e6:.0f} old/new {to/tn:.2f}")

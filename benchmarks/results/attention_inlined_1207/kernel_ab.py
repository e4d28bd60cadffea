# Decode attention kernels compiled in one process, alternating calls: module names on sys.path (/tmp/w: the parent
# commit's host_attention.py saved as /tmp/w/attn_old_mod.py) and ops.host_attention. Serial and parallel twins.
# usage: kernel_ab.py attn_old_mod,ops.host_attention B hkv hd group f32|bf16|f16 L1,L2 [reps]
import os, sys, time, importlib, numpy as np
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, "/tmp/w")
import powerinfer_jax
import ops.host_attention as H
import ml_dtypes
mods = {n: importlib.import_module(n) for n in sys.argv[1].split(",")}
B, hkv, hd, group = map(int, sys.argv[2:6]); dt = sys.argv[6]; Ls = [int(x) for x in sys.argv[7].split(",")]
reps = int(sys.argv[8]) if len(sys.argv) > 8 else 30
S = max(Ls) + 8; hq = hkv * group
rng = np.random.default_rng(0)
k = rng.standard_normal((B, hkv, S, hd)).astype(np.float32); v = rng.standard_normal((B, hkv, S, hd)).astype(np.float32)
code = H._F32
if dt == "bf16":
    k = k.astype(ml_dtypes.bfloat16).view(np.uint16); v = v.astype(ml_dtypes.bfloat16).view(np.uint16); code = H._BF16
kr = k.view(ml_dtypes.bfloat16) if dt == "bf16" else k; vr = v.view(ml_dtypes.bfloat16) if dt == "bf16" else v
if dt == "f16":
    kr, vr = k.astype(np.float16), v.astype(np.float16); k, v = kr.view(np.uint16), vr.view(np.uint16); code = H._F16
q = rng.standard_normal((B, hq, hd)).astype(np.float32); rows = np.arange(B, dtype=np.int32)
for L in Ls:
    starts = np.zeros(B, np.int32); ends = np.full(B, L, np.int32)
    ref = H.decode_attention_ref(q, kr, vr, ends - 1)
    for par in ("serial", "parallel"):
        ks = {n: (m._decode_attention_serial if par == "serial" else m._decode_attention) for n, m in mods.items()}
        errs = {}
        for n, kern in ks.items():
            o = np.empty_like(q); kern(code, q, k, v, rows, starts, ends, np.float32(1 / np.sqrt(hd)), o)
            errs[n] = float(np.abs(o - ref).max())
        ts = {n: [] for n in ks}
        for _ in range(reps):
            for n, kern in ks.items():
                o = np.empty_like(q)
                t0 = time.perf_counter(); kern(code, q, k, v, rows, starts, ends, np.float32(1 / np.sqrt(hd)), o); ts[n].append(time.perf_counter() - t0)
        base = np.median(ts[list(ks)[0]])
        print(f"B{B} hkv{hkv} hd{hd} g{group} {dt} L{L} {par:8s}", "  ".join(f"{n} {np.median(t)*1e6:.0f}us ({base/np.median(t):.2f}x) err {errs[n]:.0e}" for n, t in ts.items()), flush=True)

"""int4 host kernels with float32 activations (exact) against int8 activations (`ops.host_q8`), alternating calls
in one process on LLaMA-7B shapes from DRAM (rotating weight copies): `python kernel_ab.py [rounds]`."""
import dataclasses
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.abspath(__file__)).rsplit("/benchmarks/", 1)[0]
sys.path.insert(0, ROOT)
from ops import host_kernels as H  # noqa: E402
from ops.quant import to_weight  # noqa: E402

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
rng = np.random.default_rng(0)


def weights(rows, cols, n):
    return [to_weight(rng.standard_normal((rows, cols)).astype(np.float32), "int4") for _ in range(n)]


def act(w, a):
    return dataclasses.replace(w, act=a)


mats = {"[4096, 4096]": weights(4096, 4096, 6), "[11008, 4096]": weights(11008, 4096, 3)}
ffn = [(weights(11008, 4096, 1)[0], weights(11008, 4096, 1)[0], weights(11008, 4096, 1)[0]) for _ in range(2)]
cases = []
for name, ws in mats.items():
    for n_tok in (1, 2, 4, 16):
        cases.append((f"mat-vec {name}, {n_tok} tok", n_tok,
                      lambda a, i, x, ws=ws: H.host_matvec(act(ws[i % len(ws)], a), x)))
for frac in (1.0, 0.3):
    n = int(11008 * frac)  # a hybrid's host part: a sorted random 30% of the rows (the same list for both)
    idx = np.sort(rng.choice(11008, n, replace=False)).astype(np.int32) if frac < 1 else np.arange(n, dtype=np.int32)
    for n_tok in (1, 2, 4, 16):
        def run(a, i, x, frac=frac, n=n, idx=idx):
            g, u, d = ffn[i % 2]
            return H.host_sparse_ffn("reglu", act(g, a), act(u, a), d, x, idx, n, skip_zero_rows=frac < 1)
        cases.append((f"FFN [11008, 4096] x3, {int(frac * 100)}% of rows, {n_tok} tok", n_tok, run))
for label, n_tok, f in cases:
    x = rng.standard_normal((n_tok, 4096)).astype(np.float32)
    t = {"float32": [], "int8": []}
    ref, got = f("float32", 0, x), f("int8", 0, x)
    rel = float(np.abs(ref - got).max() / np.abs(ref).max())
    for r in range(rounds):
        for a in (["float32", "int8"] if r % 2 == 0 else ["int8", "float32"]):
            for i in range(4):
                t0 = time.perf_counter()
                f(a, i, x)
                t[a].append(time.perf_counter() - t0)
    e, q = 1e3 * np.median(t["float32"]), 1e3 * np.median(t["int8"])
    print(f"{label}: float32 {e:.2f} ms, int8 {q:.2f} ms, float32/int8 {e / q:.2f}x "
          f"(max diff {rel:.1e} of the largest)", flush=True)

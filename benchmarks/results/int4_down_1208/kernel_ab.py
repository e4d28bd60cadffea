"""int4 down projection, old (per-byte scale scratch) against new (group loop) `_q4_axpy4`, compiled in one process.

The old host_elements/host_loops are the parent commit's files (git show HEAD~:...) placed in $OLD_OPS (default
/tmp/w/old) as host_elements_old.py / host_loops_old.py; ops.host_kernels' kernel names are swapped per call.
LLaMA-7B FFN shapes ([11008, 4096] int4), rows from DRAM (two layers alternating), alternating rounds."""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.abspath(__file__).rsplit("/benchmarks/", 1)[0])
sys.path.insert(0, os.environ.get("OLD_OPS", "/tmp/w/old"))
import powerinfer_jax  # noqa: E402,F401  (OMP_WAIT_POLICY=PASSIVE as in the engine)
import host_loops_old  # noqa: E402
import ops.host_kernels as hk  # noqa: E402
import ops.host_loops as host_loops_new  # noqa: E402
from ops.quant import to_weight  # noqa: E402

NAMES = ["_down_kernel", "_down_kernel_serial", "_ffn_kernel", "_ffn_kernel_serial"]
MODS = {"old": host_loops_old, "new": host_loops_new}


NEW_BUFFERS = hk._down_buffers


def old_buffers(kw, n_tok):
    """The parent's down buffers: the new ones plus the old int4 scratch [chunks, 4, K/2]."""
    parts, sels, coefs = NEW_BUFFERS(kw, n_tok)
    return parts, sels, coefs, np.empty((parts.shape[0], 4, kw.cols // 2 if kw.code == 4 else 0), np.float32)


def use(which):
    """Points ops.host_kernels at the old or new kernels (and their buffers)."""
    for n in NAMES:
        setattr(hk, n, getattr(MODS[which], n))
    hk._down_buffers = old_buffers if which == "old" else NEW_BUFFERS


def main():
    """The kernel cases, old against new."""
    rng = np.random.default_rng(0)
    d, f = 4096, 11008
    fmt = sys.argv[1] if len(sys.argv) > 1 else "int4"
    layers = [tuple(to_weight(rng.standard_normal((f, d)).astype(np.float32) * 0.02, fmt) for _ in range(3))
              for _ in range(2)]
    sel30 = np.sort(rng.permutation(f)[: int(0.3 * f)]).astype(np.int32)
    all_rows = np.arange(f, dtype=np.int32)
    cases = []
    for n_tok in (1, 4):
        x = rng.standard_normal((n_tok, d)).astype(np.float32)
        h = np.maximum(rng.standard_normal((n_tok, f)), 0).astype(np.float32)
        cases.append((f"down, all rows, {n_tok} tok", lambda lw, h=h: hk.host_axpy_down(lw[2], all_rows, f, h,
                                                                                      skip_zero_rows=False)))
        cases.append((f"FFN dense, {n_tok} tok", lambda lw, x=x: hk.host_sparse_ffn("reglu", *lw, x, all_rows, f)))
        cases.append((f"FFN 30% rows, {n_tok} tok", lambda lw, x=x: hk.host_sparse_ffn("reglu", *lw, x, sel30,
                                                                                       len(sel30))))
    for name, fn in cases:
        outs = {}
        for k in MODS:
            use(k)
            outs[k] = fn(layers[0])
        err = float(np.max(np.abs(outs["new"] - outs["old"])) / (np.max(np.abs(outs["old"])) + 1e-30))
        ts = {k: [] for k in MODS}
        for rnd in range(8):
            for k in (list(MODS) if rnd % 2 else list(MODS)[::-1]):
                use(k)
                t = time.perf_counter()
                for lw in layers * 2:
                    fn(lw)
                ts[k].append((time.perf_counter() - t) / 4)
        paired = np.median(np.array(ts["old"]) / np.array(ts["new"]))
        print(f"{fmt} {name}: old {1e3 * np.median(ts['old']):.2f} ms, new {1e3 * np.median(ts['new']):.2f} ms, "
              f"old/new paired {paired:.2f}x, max rel diff {err:.1e}", flush=True)


if __name__ == "__main__":
    main()

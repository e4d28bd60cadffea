"""Where a bf16 dense decode step's distance to the roofline floor goes (issue #10; 2026-12-07, eleventh session).

Usage (from the repository root): python benchmarks/results/dense_gap_1207/measure.py [rounds]
The 4-layer 7B cut's one-token attention and head mat-vecs ([12288, 4096] q/k/v and [4096, 4096] o, x4, plus a
[4096, 4096] head: 570 MB of bf16), read by `host_matvec` in one chain, timed in alternating rounds against:
  probe        the floor's own probe (`roofline._row_dots`, f32 row dots over as many bytes): its median,
               and its best (what the floor of `bin/bench` uses: best of 7 over 1 GiB)
  jitted       the same chain inside one jitted program (`ops.linear.linear`: nine buffer callbacks),
               on the same memory (zero-copy `tensor_file.to_jax`)
  xla memory   the chain over copies that XLA allocated (`jnp.asarray`): 4 KiB pages, where numpy's
               large allocations (and so the loader's aligned buffers) get transparent huge pages
Prints medians and paired ratios.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import roofline  # noqa: E402
from ops import host_kernels as hk  # noqa: E402
from ops.linear import linear  # noqa: E402
from ops.quant import Weight  # noqa: E402
from powerinfer_jax.tensor_file import aligned, to_jax  # noqa: E402

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 25
rng = np.random.default_rng(0)
shapes = [(12288, 4096), (4096, 4096)] * 4 + [(4096, 4096)]
host = [Weight(aligned(rng.standard_normal(s, np.float32).astype(ml_dtypes.bfloat16)), None, "bfloat16", s[1])
        for s in shapes]
zero_copy = [Weight(to_jax(w.data), None, "bfloat16", w.cols) for w in host]
assert all(np.asarray(z.data).ctypes.data == w.data.ctypes.data for z, w in zip(zero_copy, host))
xla_copies = [Weight(np.asarray(jnp.asarray(w.data)), None, "bfloat16", w.cols) for w in host]
nbytes = sum(w.data.nbytes for w in host)
probe_rows = np.ones((nbytes // 4 // 4096, 4096), np.float32)
x = rng.random((1, 4096), np.float32)
outs = [np.zeros((1, w.data.shape[0]), np.float32) for w in host]


@jax.jit
def chain(ws, v):
    acc = jnp.zeros((), jnp.float32)
    for w in ws:
        acc = acc + linear(v[None], w)[0, :8].sum()
        v = v + 1e-6 * acc  # a data dependency: the calls run in order
    return acc


def timed(fn):
    t = time.perf_counter()
    fn()
    return nbytes / (time.perf_counter() - t) / 1e9


def python_chain(ws):
    for w, o in zip(ws, outs):
        hk.host_matvec(w, x, out=o)


cases = {
    "python chain (numpy memory, huge pages)": lambda: python_chain(host),
    "jitted chain (same memory)": lambda: chain(zero_copy, jnp.asarray(x[0])).block_until_ready(),
    "python chain over XLA-allocated copies": lambda: python_chain(xla_copies),
    "probe (f32 row dots, same bytes)": lambda: roofline._row_dots(probe_rows, x[0]),
}
for fn in cases.values():
    fn()
res = {k: [] for k in cases}
for r in range(rounds):
    for k, fn in cases.items():
        res[k].append(timed(fn))
base = np.array(res["python chain (numpy memory, huge pages)"])
probe = np.array(res["probe (f32 row dots, same bytes)"])
print(f"{jax.__version__=}, {nbytes / 1e6:.0f} MB a chain, {rounds} alternating rounds")
print("| case | GB/s median (max) | paired over python chain | paired over the probe |\n|---|---|---|---|")
for k, v in res.items():
    v = np.array(v)
    print(f"| {k} | {np.median(v):.1f} ({v.max():.1f}) | {np.median(v / base):.3f} | {np.median(v / probe):.3f} |")
best = roofline.host_read_bandwidth() / 1e9
print(f"floor probe as bin/bench takes it (best of 7 over 1 GiB): {best:.1f} GB/s; "
      f"probe median over best: {np.median(probe) / best:.2f}")

"""Host kernels in every weight format on LLaMA-7B-shaped matrices, next to the memory bandwidth.

One decode token reads every weight once, so a mat-vec's time cannot be below (bytes stored) /
(memory bandwidth). This script times, for one token:
  * ``host_matvec`` on gate/up [11008, 4096] and a fused q/k/v [12288, 4096],
  * ``host_axpy_down`` over every row of the transposed down [11008, 4096] (skip_zero_rows=False,
    the dense FFN's down projection),
  * ``host_sparse_ffn`` over 10% random neurons of an [11008, 4096] ReGLU layer (the sparse path;
    bytes = gate + up rows of the selected neurons + the down rows it reads, those with h != 0),
in each format, beside numpy's float32 ``w @ x`` and a measured streaming read bandwidth (numba
parallel sums over a 1 GiB array, one and four streams per thread; the larger is the reference).
Cases alternate within each round and medians are reported. Every call reads a different copy of
its matrix (each format's copies total ``--pool_mib``) so the weights come from DRAM, not from a
large last-level cache (this VM shows ~45 GB/s on 96 MiB working sets, ~30 GB/s beyond ~180 MiB).

  python benchmarks/bench_formats.py            # table + results/host_kernels_formats_cpu.json

Run nothing else heavy beside it (2 cores): it needs ~4 GiB of RAM and about 2 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before numba's first parallel call (ops.host_kernels)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

from ops import host_kernels as H  # noqa: E402
from ops import quant as Q  # noqa: E402
from ops import reference as R  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
D, N_FF, N_QKV = 4096, 11008, 3 * 4096


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=9, help="rounds (medians over them; >= 7)")
    p.add_argument("--pool_mib", type=int, default=512, help="bytes of copies each format rotates through")
    p.add_argument("--activity", type=float, default=0.10, help="fraction of neurons in the sparse path")
    p.add_argument("--rotate", type=int, default=8, help="distinct active sets of the sparse path")
    p.add_argument("--formats", default=",".join(Q.FORMATS))
    p.add_argument("--out", default=str(RESULTS / "host_kernels_formats_cpu.json"))
    return p.parse_args(argv)


# ---------------------------------------------------------------- bandwidth
_CHUNKS = 64


@njit(parallel=True, fastmath=True)  # fastmath: vectorised sums, not a latency chain
def _sum_1(a):
    step = (a.shape[0] + _CHUNKS - 1) // _CHUNKS
    parts = np.zeros(_CHUNKS, np.float32)
    for c in prange(_CHUNKS):
        s = np.float32(0.0)
        for i in range(c * step, min(a.shape[0], (c + 1) * step)):
            s += a[i]
        parts[c] = s
    return parts.sum()


@njit(parallel=True, fastmath=True)
def _sum_4(a):
    """Each thread reads its chunk as four concurrent streams (a quarter each), like the kernels."""
    q = a.shape[0] // (4 * _CHUNKS)
    parts = np.zeros(_CHUNKS, np.float32)
    for c in prange(_CHUNKS):
        s0 = a[c * 4 * q: c * 4 * q + q]
        s1 = a[c * 4 * q + q: c * 4 * q + 2 * q]
        s2 = a[c * 4 * q + 2 * q: c * 4 * q + 3 * q]
        s3 = a[c * 4 * q + 3 * q: c * 4 * q + 4 * q]
        s = np.float32(0.0)
        for i in range(q):
            s += s0[i] + s1[i] + s2[i] + s3[i]
        parts[c] = s
    return parts.sum()


# ---------------------------------------------------------------- cases
class Case:
    """A timed call: fn(k) with k the call number (which copy / active set it uses)."""

    def __init__(self, group, name, fn, nbytes, fmt="", variants=1):
        self.group, self.name, self.fn, self.nbytes, self.fmt = group, name, fn, nbytes, fmt
        self.variants = variants  # calls k and k + variants read the same data
        self.times: list[float] = []

    def run(self, k):
        t0 = time.perf_counter()
        self.fn(k)
        self.times.append(time.perf_counter() - t0)


def _pool(w: Q.Weight, pool_bytes: int) -> list[Q.Weight]:
    n = max(2, -(-pool_bytes // w.nbytes))
    return [w] + [Q.Weight(w.data.copy(), None if w.scale is None else w.scale.copy(), w.fmt, w.cols)
                  for _ in range(n - 1)]


def _check(got, want, what):
    scale = float(np.abs(want).max())
    if not np.allclose(got, want, rtol=1e-4, atol=1e-4 * scale):
        raise AssertionError(f"{what}: kernel disagrees with the dequantize-then-f32 reference")


def dense_cases(group, shape, op, formats, pool_bytes, rng):
    """host_matvec (op "matvec") or host_axpy_down over all rows (op "down") per format, and numpy f32."""
    rows, cols = shape
    w = (rng.standard_normal(shape, dtype=np.float32) * cols ** -0.5)
    x = rng.standard_normal(cols if op == "matvec" else rows).astype(np.float32)
    all_rows = np.arange(rows, dtype=np.int32)
    cases = []
    for fmt in formats:
        pool = _pool(Q.to_weight(w, fmt), pool_bytes)
        wd = Q.dequantize(pool[0])
        if op == "matvec":
            _check(H.host_matvec(pool[0], x), wd @ x, f"{group} {fmt}")
            fn = (lambda p: lambda k: H.host_matvec(p[k % len(p)], x))(pool)
        else:
            h = x[None]
            _check(H.host_axpy_down(pool[0], all_rows, rows, h, skip_zero_rows=False)[0], x @ wd, f"{group} {fmt}")
            fn = (lambda p: lambda k: H.host_axpy_down(p[k % len(p)], all_rows, rows, h, skip_zero_rows=False))(pool)
        cases.append(Case(group, "host kernel", fn, pool[0].nbytes, fmt, len(pool)))
        if fmt == "float32":
            f32 = [p.data for p in pool]
            fn = (lambda k: f32[k % len(f32)] @ x) if op == "matvec" else (lambda k: x @ f32[k % len(f32)])
            cases.append(Case(group, "numpy f32 (BLAS)", fn, pool[0].nbytes, "float32", len(pool)))
        del wd
    return cases


def sparse_cases(formats, activity, n_sets, rng):
    """host_sparse_ffn over `activity` of the neurons of one ReGLU layer, per format."""
    wg, wu, wd, _ = R.random_ffn_weights("reglu", N_FF, D, seed=3)
    count = int(round(activity * N_FF))
    sets = [np.sort(rng.choice(N_FF, count, replace=False)).astype(np.int32) for _ in range(n_sets)]
    xs = rng.standard_normal((n_sets, D)).astype(np.float32)
    cases = []
    for fmt in formats:
        ws = [Q.to_weight(a, fmt) for a in (wg, wu, wd)]
        row = Q.format_bytes_per_row(fmt, D)
        # bytes read: gate + up rows of every selected neuron, down rows of those with h != 0
        live = [int(np.count_nonzero(H.host_sparse_h("reglu", ws[0], ws[1], xs[k], sets[k], count)))
                for k in range(n_sets)]
        nbytes = int(np.mean([(2 * count + n) * row for n in live]))
        k0 = 0
        _check(H.host_sparse_ffn("reglu", *ws, xs[k0], sets[k0], count),
               H.host_sparse_ffn_ref("reglu", *ws, xs[k0], sets[k0], count), f"sparse {fmt}")
        fn = (lambda ws: lambda k: H.host_sparse_ffn("reglu", *ws, xs[k % n_sets], sets[k % n_sets], count))(ws)
        cases.append(Case(f"sparse FFN 10% of [{N_FF}, {D}] x3", "host_sparse_ffn", fn, nbytes, fmt, n_sets))
    return cases


def time_rounds(cases, bw_cases, repeats):
    """Alternating rounds of the numba cases and the bandwidth probes, then numpy's BLAS rounds
    apart: OpenBLAS's idle threads spin (sched_yield) for a while after each call, which made
    the numba kernels timed right after them 2-3x slower."""
    blas = [c for c in cases if c.name.startswith("numpy")]
    ours = [c for c in cases if c not in blas]
    for c in bw_cases + ours + blas:  # compile, and one untimed pass over every copy: the first
        for k in range(c.variants):   # read of a freshly written copy was 1.5-3x slower here
            c.fn(k)
    for r in range(repeats):
        for c in bw_cases + ours:
            c.run(r + 1)
    for r in range(repeats):
        for c in blas:
            c.run(r + 1)
    time.sleep(0.5)  # let OpenBLAS's threads go idle before the next numba work


def main(argv=None):
    a = parse_args(argv)
    formats = [f for f in a.formats.split(",") if f]
    for f in formats:
        Q.check_format(f)
    rng = np.random.default_rng(0)
    big = np.ones(1 << 28, np.float32)  # 1 GiB
    bw_cases = [Case("bandwidth", "numba sum, 1 stream/thread", lambda k: _sum_1(big), big.nbytes),
                Case("bandwidth", "numba sum, 4 streams/thread", lambda k: _sum_4(big), big.nbytes)]
    pool_bytes = a.pool_mib << 20
    groups = [
        (f"gate/up matvec [{N_FF}, {D}]", (N_FF, D), "matvec"),
        (f"down_t axpy, all rows [{N_FF}, {D}]", (N_FF, D), "down"),
        (f"qkv matvec [{N_QKV}, {D}]", (N_QKV, D), "matvec"),
    ]
    done = []
    for group, shape, op in groups:  # one shape's pools at a time (bounded memory)
        cases = dense_cases(group, shape, op, formats, pool_bytes, rng)
        time_rounds(cases, bw_cases, a.repeats)
        done += cases
        del cases
    cases = sparse_cases(formats, a.activity, a.rotate, rng)
    time_rounds(cases, bw_cases, a.repeats)
    done += cases

    bw = {c.name: c.nbytes / float(np.median(c.times)) for c in bw_cases}
    ref_bw = max(bw.values())
    rows = []
    for c in done:
        med = float(np.median(c.times))
        rows.append(dict(group=c.group, kernel=c.name, format=c.fmt, ms=med * 1e3,
                         ms_min=min(c.times) * 1e3, ms_max=max(c.times) * 1e3, bytes=int(c.nbytes),
                         gbps=c.nbytes / med / 1e9, of_bandwidth=c.nbytes / med / ref_bw))
    lines = [f"measured read bandwidth: " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bw.items())
             + f" (reference {ref_bw / 1e9:.1f} GB/s)", "",
             f"| {'case':38s} | {'kernel':18s} | {'format':8s} | {'ms':>7s} | {'MB read':>8s} "
             f"| {'GB/s':>5s} | {'of bw':>5s} |",
             f"|{'-' * 40}|{'-' * 20}|{'-' * 10}|{'-' * 9}|{'-' * 10}|{'-' * 7}|{'-' * 7}|"]
    for r in rows:
        lines.append(f"| {r['group']:38s} | {r['kernel']:18s} | {r['format']:8s} | {r['ms']:7.2f} | "
                     f"{r['bytes'] / 1e6:8.1f} | {r['gbps']:5.1f} | {r['of_bandwidth']:5.0%} |")
    print("\n".join(lines))
    out = dict(
        machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                     numba=numba.__version__, numba_threads=numba.get_num_threads(),
                     threading_layer=numba.threading_layer(), hw_f16_conversion=bool(H._HW_F16)),
        settings=dict(repeats=a.repeats, pool_mib=a.pool_mib, activity=a.activity, rotate=a.rotate),
        bandwidth_gbps={k: v / 1e9 for k, v in bw.items()}, reference_bandwidth_gbps=ref_bw / 1e9,
        bandwidth_ms={c.name: float(np.median(c.times)) * 1e3 for c in bw_cases},
        rows=rows, table="\n".join(lines))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()

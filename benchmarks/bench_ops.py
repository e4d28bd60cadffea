"""Benchmark of the sparse FFN kernels on one LLaMA-7B FFN layer (not a test).

Default: d=4096, n=11008, ReGLU, f32, 10% of neurons active, batch 1. Configurations are run
in alternation (one call each per repeat) and medians reported; every repeat uses the next of
``--rotate`` random active sets so that the gathered rows do not simply stay in a large L3
(this machine reports 300 MB of shared L3; one 10% set of three f32 matrices is 54 MB).
Each sparse result is checked against a float32 numpy reference before it is timed.

  python benchmarks/bench_ops.py                    # this backend; table + results/ops_<backend>.json
  python benchmarks/bench_ops.py --malloc_compare   # CPU: XLA paths with/without glibc tuning

glibc finding (``--malloc_compare``, jax 0.10.2, glibc 2.36): unchunked, the XLA gather path
needs one temporary block per call (``memory_analysis().temp_size_in_bytes``: 52 MB at C=1101,
96 MB at C=2048). glibc mmaps any allocation above its mmap threshold, whose ceiling is 32 MiB on
64-bit (MALLOC_MMAP_THRESHOLD_ above that is ignored), so that block is mmapped, faulted in page
by page (13.2k / 24.6k minor faults per call) and unmapped on every call. Measured faults per
call at C=1101: unchanged with MALLOC_MMAP_THRESHOLD_=32MiB + MALLOC_TRIM_THRESHOLD_=1GiB (with
or without MALLOC_ARENA_MAX=1); only adding MALLOC_TOP_PAD_=256MiB helped, inconsistently
(2-12k); at C=2048 nothing helped. The fix is in the op instead: ``sparse_ffn_xla`` scans over
256-row chunks on CPU (12 MB temporaries, ~10x fewer faults, ~3x faster, all-padding chunks
skipped). The "(unchunked)" rows keep the old form for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# numba's OpenMP workers spin-wait by default; on a shared 2-core machine a spinning or
# descheduled worker stalls every parallel region to a scheduler tick (numba LLaMA-7B layer:
# 16-24 ms, quantised, vs 5-6 ms with PASSIVE, the workqueue layer, or one thread). Must be set
# before libgomp loads. Override with OMP_WAIT_POLICY in the environment.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from ops import pallas_gpu as P  # noqa: E402
from ops import reference as R  # noqa: E402
from ops import select as S  # noqa: E402
from ops import xla_sparse as X  # noqa: E402

try:
    from ops import host_kernels as H  # noqa: E402
except ModuleNotFoundError:  # no numba: host rows are skipped
    H = None

# Batch-1 mat-vecs are memory-bound, so exact f32 costs nothing and keeps the checks tight
# (XLA:GPU would otherwise use TF32 for f32 dots).
jax.config.update("jax_default_matmul_precision", "highest")

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--n", type=int, default=11008)
    p.add_argument("--family", default="reglu", choices=R.FAMILIES)
    p.add_argument("--activity", type=float, default=0.10)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--rotate", type=int, default=8, help="distinct active sets cycled through")
    p.add_argument("--inner", type=int, default=0, help="calls per timing (0: 1 on CPU, 20 on GPU)")
    p.add_argument("--loop", type=int, default=0,
                   help="also time N steps inside one jitted fori_loop (device time without "
                        "Python dispatch); the GPU run uses 200")
    p.add_argument("--only", default="", help="comma-separated substrings of config names to run")
    p.add_argument("--malloc_compare", action="store_true",
                   help="rerun in two subprocesses, without and with MALLOC_* tuning")
    p.add_argument("--tag", default="", help="label stored in the JSON (set by --malloc_compare)")
    p.add_argument("--out", default="", help="JSON path (default results/ops_<backend>.json)")
    return p.parse_args(argv)


def _looped(step, n_iter: int):
    """jit of ``n_iter`` sequential steps cycling through the active sets (no host dispatch)."""
    def f(wg, wu, wd, bu, xs, idxs, valid):
        def body(t, acc):
            k = t % xs.shape[0]
            return acc + step(wg, wu, wd, bu, xs[k], idxs[k], valid)
        return lax.fori_loop(0, n_iter, body, jnp.zeros(xs.shape[1], jnp.float32))
    return jax.jit(f)


def build_configs(a, backend):
    """Returns ({name: (fn(k), check, divisor)}, reference(k), info); k picks the active set."""
    w_gate, w_up, w_down_t, b_up = R.random_ffn_weights(a.family, a.n, a.d, seed=0)
    rng = np.random.default_rng(1)
    count = int(round(a.activity * a.n))
    bucket = S.capacity_bucket(count, a.n)
    xs = rng.standard_normal((a.rotate, a.d)).astype(np.float32)
    sets = np.stack([np.sort(rng.choice(a.n, count, replace=False)) for _ in range(a.rotate)])
    sets = sets.astype(np.int32)
    padded = np.pad(sets, [(0, 0), (0, bucket - count)])  # padding points at row 0
    valid_t, valid_b = np.ones(count, bool), np.arange(bucket) < count
    dev = [None if w is None else jax.device_put(w) for w in (w_gate, w_up, w_down_t, b_up)]
    xs_d, sets_d, padded_d = map(jax.device_put, (xs, sets, padded))
    valid_t_d, valid_b_d = map(jax.device_put, (valid_t, valid_b))
    fam = a.family

    unchunked = lambda wg, wu, wd, bu, x, i, v: X.sparse_ffn_xla(fam, wg, wu, wd, x, i, v, bu, chunk=0)
    steps = {  # name: (step(wg, wu, wd, bu, x, idx, valid) -> y, tight or bucket lists)
        "dense_xla": (lambda wg, wu, wd, bu, x, i, v: R.dense_ffn_ref(fam, wg, wu, wd, x, bu), True),
        f"xla_gather C={count} (tight)": (
            lambda wg, wu, wd, bu, x, i, v: X.sparse_ffn_xla(fam, wg, wu, wd, x, i, v, bu), True),
        f"xla_gather C={bucket} (bucket)": (
            lambda wg, wu, wd, bu, x, i, v: X.sparse_ffn_xla(fam, wg, wu, wd, x, i, v, bu), False),
    }
    if backend == "cpu":
        steps[f"xla_gather C={count} (tight, unchunked)"] = (unchunked, True)
        steps[f"xla_gather C={bucket} (bucket, unchunked)"] = (unchunked, False)
    if backend == "gpu":
        # Block shapes to compare (an H100 has 132 SMs). h: (block_c, block_d, split_d);
        # down: (block_c, block_d, split). Only count / block_c of the h programs load rows.
        full = [((8, 256, None), (32, 128, None), False), ((8, 256, None), (32, 128, None), True),
                ((8, 256, None), (64, 128, 16), False), ((16, 512, 8), (16, 128, 32), False),
                ((4, 1024, None), (32, 128, None), False)]
        for hk, dk, tight in full:
            kw = dict(h_kwargs=dict(zip(("block_c", "block_d", "split_d"), hk)),
                      down_kwargs=dict(zip(("block_c", "block_d", "split"), dk)))
            cap = count if tight else bucket
            steps[f"pallas_triton C={cap} h{hk} down{dk}"] = (
                lambda wg, wu, wd, bu, x, i, v, kw=kw: P.sparse_ffn_pallas(
                    fam, wg, wu, wd, x, i, v, bu, **kw), tight)
        # Breakdown (loop rows only): h alone, and down alone with a stand-in h that is zero
        # for about half the neurons, like ReGLU's relu(gate).
        fake_h = lambda x, c: jnp.maximum(jnp.resize(x, (c,)), 0)
        steps["part: xla h"] = (lambda wg, wu, wd, bu, x, i, v: jnp.sum(
            X.sparse_h_xla(fam, wg, wu, x, i, v, bu)), False)
        steps["part: xla down"] = (lambda wg, wu, wd, bu, x, i, v: X.axpy_down_xla(
            wd, i, v, fake_h(x, i.shape[0])), False)
        for hk in [(8, 256, None), (8, 256, None, 4, 3), (8, 256, None, 4, 4), (8, 512, None),
                   (4, 1024, None), (4, 512, None), (16, 256, None), (8, 256, None, 2, 3)]:
            kw = dict(zip(("block_c", "block_d", "split_d", "num_warps", "num_stages"), hk))
            steps[f"part: pallas h{hk}"] = (lambda wg, wu, wd, bu, x, i, v, kw=kw: jnp.sum(
                P.sparse_h_pallas(fam, wg, wu, x, i, v, bu, **kw)), False)
        for dk in [(32, 128, None), (64, 128, 16), (64, 64, None), (32, 128, None, 4, 3),
                   (64, 128, None, 8, 3)]:
            kw = dict(zip(("block_c", "block_d", "split", "num_warps", "num_stages"), dk))
            steps[f"part: pallas down{dk}"] = (lambda wg, wu, wd, bu, x, i, v, kw=kw:
                                               P.axpy_down_pallas(wd, i, v, fake_h(x, i.shape[0]),
                                                                  **kw), False)

    cfg = {}
    xs_l, sets_l, padded_l = ([jax.device_put(r) for r in m] for m in (xs, sets, padded))
    for name, (step, tight) in steps.items():
        idx_d, v_d = (sets_d, valid_t_d) if tight else (padded_d, valid_b_d)
        idx_l = sets_l if tight else padded_l
        if not name.startswith("part:"):
            one = jax.jit(step)
            check = None if name == "dense_xla" else "ref"
            cfg[name] = (lambda k, one=one, idx_l=idx_l, v_d=v_d: one(*dev, xs_l[k], idx_l[k], v_d),
                         check, 1)
        if a.loop:
            looped = _looped(step, a.loop)
            cfg[name + f" [loop x{a.loop}]"] = (
                lambda k, f=looped, idx_d=idx_d, v_d=v_d: f(*dev, xs_d, idx_d, v_d), None, a.loop)
    if backend == "cpu" and H is not None:
        cb = {m: jax.jit(lambda x, i, c, m=m: H.host_ffn_callback(
            fam, w_gate, w_up, w_down_t, x, i, c, b_up, method=m)) for m in ("buffer", "pure")}
        cfg.update({
            "numpy W[idx]@x": (lambda k: H.host_sparse_ffn_ref(
                fam, w_gate, w_up, w_down_t, xs[k], sets[k], count, b_up), "ref", 1),
            "numba direct": (lambda k: H.host_sparse_ffn(
                fam, w_gate, w_up, w_down_t, xs[k], sets[k], count, b_up), "ref", 1),
            "numba buffer_callback in jit": (
                lambda k: cb["buffer"](xs_l[k], padded_l[k], np.int32(count)), "ref", 1),
            "numba pure_callback in jit": (
                lambda k: cb["pure"](xs_l[k], padded_l[k], np.int32(count)), "ref", 1),
        })
    if a.only:
        keys = [s.strip() for s in a.only.split(",")]
        cfg = {k: v for k, v in cfg.items() if any(s in k for s in keys)}

    def reference(k):  # jnp reference on the CPU for the active set k
        with jax.default_device(jax.devices("cpu")[0]):
            return np.asarray(R.sparse_ffn_ref(fam, w_gate, w_up, w_down_t, xs[k], sets[k],
                                               valid_t, b_up))

    info = dict(d=a.d, n=a.n, family=fam, activity=a.activity, count=count, bucket=bucket,
                dtype="float32", batch=1, rotate=a.rotate)
    return cfg, reference, info


def run(a):
    backend = jax.default_backend()
    inner = a.inner or (20 if backend == "gpu" else 1)
    cfg, reference, info = build_configs(a, backend)
    errs = {}
    for name, (fn, check, _) in cfg.items():  # compile, warm up, check correctness
        y = np.asarray(jax.block_until_ready(fn(0)))
        if check:
            want = reference(0)
            errs[name] = float(np.max(np.abs(y - want)) / np.max(np.abs(want)))
            assert errs[name] < 1e-4, (name, errs[name])
    times = {name: [] for name in cfg}
    for r in range(a.repeats):
        for name, (fn, _, div) in cfg.items():  # alternate configurations within each repeat
            k = (r + 1) % a.rotate
            n_calls = inner if div == 1 else 1
            t0 = time.perf_counter()
            for _ in range(n_calls):
                y = fn(k)
            jax.block_until_ready(y)
            times[name].append((time.perf_counter() - t0) / (n_calls * div) * 1e3)
    rows = [dict(config=name, median_ms=float(np.median(t)), min_ms=float(np.min(t)),
                 rel_err=errs.get(name)) for name, t in times.items()]
    return dict(backend=backend, device=str(jax.devices()[0]), jax=jax.__version__,
                tag=a.tag, malloc_env={k: os.environ.get(k) for k in MALLOC_ENV},
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                numba_threads=None if H is None else H.numba.get_num_threads(),
                repeats=a.repeats, inner=inner, loop=a.loop, **info, results=rows)


def table(res):
    lines = [f"### {res['backend']} ({res['device']}, jax {res['jax']}) {res['tag']}",
             f"d={res['d']} n={res['n']} {res['family']} f32, {res['count']} active "
             f"(bucket {res['bucket']}), batch 1, {res['repeats']} repeats x {res['inner']} calls; "
             "[loop xN] rows: per step of one jitted loop (no dispatch)",
             "", "| config | median ms | min ms | rel err |", "|---|---:|---:|---:|"]
    for r in res["results"]:
        err = "" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        lines.append(f"| {r['config']} | {r['median_ms']:.3f} | {r['min_ms']:.3f} | {err} |")
    return "\n".join(lines)


def main(argv=None):
    a = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if a.malloc_compare:
        out = []
        for tag, extra in (("malloc default", {}), ("malloc tuned", MALLOC_ENV)):
            env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV} | extra
            tmp = RESULTS / f".ops_{tag.replace(' ', '_')}.json"
            args = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--malloc_compare"]
            subprocess.run([sys.executable, __file__, *args, "--tag", tag, "--out", str(tmp)],
                           env=env, check=True)
            out.append(json.loads(tmp.read_text()))
            tmp.unlink()
        path = Path(a.out or RESULTS / f"ops_{out[0]['backend']}.json")
        path.write_text(json.dumps(out, indent=1))
        return
    res = run(a)
    print(table(res), flush=True)
    path = Path(a.out or RESULTS / f"ops_{res['backend']}.json")
    path.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What LLVM made of the host kernels: vector, gather and scatter instructions per kernel and format.

A numba kernel is only as fast as the loops LLVM vectorises. Two failures have cost this project 2x or
more without any test failing: a loop left scalar (alias checks LLVM cannot emit), and a loop vectorised
the wrong way round, across an outer loop, into gather/scatter instructions (the int4 scale expansion:
`vscatterqps` stores made the int4 down projection run at 8% of the memory bandwidth, BENCHMARKS.md
"int4's down projection"). This script runs every public host kernel once per weight format (small
shapes), recompiles each numba kernel it used without threads and without the on-disk cache (cached code
cannot be inspected; the loops are the same), and prints per kernel and signature the number of zmm/ymm
instructions, gathers, scatters and element inserts (`vpinsr*`, a sign of scalar lane-by-lane work).
Gathers and scatters show up on AVX-512 machines; elsewhere LLVM writes the same mistakes as scalar code.

  python benchmarks/kernel_codegen.py              # table of every kernel
  python benchmarks/kernel_codegen.py --only_bad   # only the kernels with gathers or scatters
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import powerinfer_jax  # noqa: E402,F401  (thread settings before numba loads)
import numpy as np  # noqa: E402
from numba import njit  # noqa: E402
from numba.core.registry import CPUDispatcher  # noqa: E402

from ops import host_attention as HA  # noqa: E402
from ops import host_kernels as HK  # noqa: E402
from ops import quant as Q  # noqa: E402


def exercise(rows: int = 300, cols: int = 512, seed: int = 0) -> None:
    """Calls every public host kernel in every format (one and three tokens, prompts through BLAS blocks)."""
    rng = np.random.default_rng(seed)
    x1 = rng.standard_normal((1, cols), dtype=np.float32)
    x3 = rng.standard_normal((3, cols), dtype=np.float32)
    for fmt in Q.FORMATS:
        w = Q.to_weight(rng.standard_normal((rows, cols), dtype=np.float32), fmt)
        wd = Q.to_weight(rng.standard_normal((rows, cols), dtype=np.float32), fmt)
        idx = np.sort(rng.choice(rows, rows // 3, replace=False)).astype(np.int32)
        for x in (x1, x3):
            HK.host_matvec(w, x)
            for family in ("reglu", "relu", "swiglu"):
                HK.host_sparse_ffn(family, None if family == "relu" else w, w, wd, x, idx, len(idx))
            HK.host_sparse_h("swiglu", w, w, x, idx, len(idx), act_threshold=0.1)
        HK.host_matmul_t_blocked(w, rng.standard_normal((3, rows), dtype=np.float32))
    q = rng.standard_normal((2, 8, 64), dtype=np.float32)
    kv = rng.standard_normal((2, 4, 128, 64), dtype=np.float32)
    HA._decode_attention(HA._F32, q, kv, kv, np.arange(2, dtype=np.int32), np.zeros(2, np.int32),
                         np.full(2, 100, np.int32), np.float32(0.1), np.empty((2, 8, 64), np.float32))


def instruction_counts(asm: str) -> dict:
    """Counts of the instructions this script reports, from x86 assembly text."""
    lines = [ln.strip() for ln in asm.splitlines()]
    ops = [ln for ln in lines if ln and not ln.startswith((".", "#")) and not ln.endswith(":")]
    names = [ln.split()[0] for ln in ops]
    return {"zmm": sum("zmm" in ln for ln in ops), "ymm": sum("ymm" in ln for ln in ops),
            "gather": sum(n.startswith(("vgather", "vpgather")) for n in names),
            "scatter": sum(n.startswith(("vscatter", "vpscatter")) for n in names),
            "insert": sum(n.startswith("vpinsr") for n in names),
            # vector registers loaded from or stored to the stack: spills, when a register block outgrows the ISA
            # (AVX2 has 16 vector registers, AVX-512 32)
            "stack": sum(("ymm" in ln or "zmm" in ln) and ("(%rsp)" in ln or "(%rbp)" in ln) for ln in ops)}


def kernel_report(dispatcher, signatures=None) -> list[tuple[str, dict]]:
    """(signature, counts) for each compiled signature of a numba dispatcher, recompiled without threads or cache."""
    opts = dict(dispatcher.targetoptions)
    opts.pop("cache", None)
    opts["parallel"] = False
    fresh = njit(**opts)(dispatcher.py_func)
    out = []
    for sig in signatures or dispatcher.signatures:
        fresh.compile(sig)
        out.append((str(sig), instruction_counts(fresh.inspect_asm(sig))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only_bad", action="store_true", help="print only kernels with gathers or scatters")
    a = ap.parse_args()
    exercise()
    bad = 0
    print(f"{'kernel':40s} {'signature (first arguments)':60s} {'zmm':>5s} {'ymm':>5s} {'gather':>6s} {'scatter':>7s} "
          f"{'vpinsr':>6s} {'stack':>5s}")
    for mod in (HK, Q, HA):
        for name, obj in sorted(vars(mod).items()):
            if not isinstance(obj, CPUDispatcher) or not obj.signatures:
                continue
            for sig, c in kernel_report(obj):
                flagged = c["gather"] or c["scatter"]
                bad += bool(flagged)
                if flagged or not a.only_bad:
                    print(f"{mod.__name__ + '.' + name:40s} {sig[:60]:60s} {c['zmm']:5d} {c['ymm']:5d} {c['gather']:6d} "
                          f"{c['scatter']:7d} {c['insert']:6d} {c['stack']:5d}")
    print(f"\n{bad} kernel signatures with gathers or scatters")
    sys.exit(1 if bad and a.only_bad else 0)


if __name__ == "__main__":
    main()

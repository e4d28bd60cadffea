"""The parallel host kernels start a parallel region only where their code says ``prange``.

Under ``parallel=True`` numba turns more than ``prange`` loops into parallel regions: a slice assignment
or a whole-array expression outside the ``prange`` becomes one too, and inside a serial loop one per
iteration. Each region wakes the worker threads (two futex wakes with OMP_WAIT_POLICY=PASSIVE, 100-200 us
each on a VM whose idle vCPU halts): the down kernel's ``out[b, :] = total`` cost 1.5 ms of a 16-token call
at d=384 (BENCHMARKS.md, "One parallel region a kernel call"). The kernels are compiled afresh here (their
on-disk cache keeps no diagnostics) and numba's own parfor count is checked against the ``prange`` loops
of their source (a kernel with two branches has one in each; a call runs one of them).
"""

import inspect

import numba
import numpy as np
import pytest

import ops.host_attention as A
import ops.host_kernels as H
from ops import host_loops as L
from ops.quant import to_weight

rng = np.random.default_rng(0)


def _fresh(kernel):
    """A new, uncached parallel compile of `kernel` (same options)."""
    return numba.njit(parallel=True, fastmath=kernel.targetoptions.get("fastmath", False))(kernel.py_func)


def _parfors(dispatcher) -> int:
    (sig,) = dispatcher.signatures
    return dispatcher.get_metadata(sig)["parfor_diagnostics"].count_parfors()


def _pranges(kernel) -> int:
    return inspect.getsource(kernel.py_func).count(" in prange(")


def _w(rows, cols, fmt="bfloat16"):
    return to_weight(rng.standard_normal((rows, cols)).astype(np.float32), fmt)


def _down():
    H.host_axpy_down(_w(64, 64), np.arange(64), 64, rng.random((5, 64)).astype(np.float32))


def _ffn():
    H.host_sparse_ffn("reglu", _w(64, 64), _w(64, 64), _w(64, 64), rng.random((5, 64)).astype(np.float32),
                      np.arange(64), 64)


def _matvec():
    H.host_matvec(_w(64, 64), rng.random((5, 64)).astype(np.float32))


def _pair_matvec():
    H.host_matvec(_w(64, 64), rng.random(64).astype(np.float32))


def _one_row_matvec():
    H.host_matvec(_w(64, 64, "float16"), rng.random(64).astype(np.float32))


# `_h_kernel` (host_sparse_h, host_gather_matvec: not the engine's) is a prange over `_h_span`, which `_ffn_kernel`'s
# check compiles too (a fresh parallel compile is 20-35 s a kernel).
CASES = {"_down_kernel": _down, "_ffn_kernel": _ffn, "_matvec_kernel": _matvec,
         "_bf16_pair_matvec_kernel": _pair_matvec, "_one_row_matvec_kernel": _one_row_matvec}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_host_kernel_has_no_parallel_region_but_its_pranges(monkeypatch, name):
    kernel = getattr(L, name)
    fresh = _fresh(kernel)
    monkeypatch.setattr(H, name, fresh)
    monkeypatch.setattr(H, "SERIAL_MAX_BYTES", 0)  # the parallel kernels, whatever the size
    CASES[name]()
    assert len(fresh.signatures) == 1, f"{name} was not called"
    assert _pranges(kernel) >= 1
    assert _parfors(fresh) == _pranges(kernel)


def test_the_attention_kernel_has_no_parallel_region_but_its_prange():
    fresh = _fresh(A._decode_attention)
    rows, heads, slots, hd = 3, 4, 8, 16
    q = rng.standard_normal((rows, heads, hd)).astype(np.float32)
    kv = rng.standard_normal((rows, 2, slots, hd)).astype(np.float32)
    out = np.empty_like(q)
    fresh(0, q, kv, kv, np.arange(rows, dtype=np.int32), np.zeros(rows, np.int32), np.full(rows, slots, np.int32),
          np.float32(0.25), out)
    assert _pranges(A._decode_attention) == 1
    assert _parfors(fresh) == 1

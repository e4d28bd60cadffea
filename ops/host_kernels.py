"""Host (CPU, numpy/numba) kernels: sparse FFN rows and dense mat-vecs in every weight format.

A weight argument is an ``ops.quant.Weight`` (numpy-backed) of any format (float32, bfloat16,
float16, int8, int4), or a plain numpy float32 / bfloat16 / float16 array. The kernels read the
stored bytes (at memory bandwidth: a mat-vec is memory-bound) and widen them to float32 in
registers; arithmetic is float32. ``idx`` indexes weight rows and only ``idx[:count]`` is used.

This module is the kernels' entry points: argument checks, the choice of loop (parallel or serial,
one token or several, BLAS from ``blas_min_tokens`` tokens), the numpy references, warm-up and the
jit callbacks. The parallel numba loops (deterministic: fixed work split, private partials) are in
`ops.host_loops`, the element primitives they inline (widening each format, int4's packed order,
f16 conversion) in `ops.host_elements`.

Read streams: a kernel pass reads several rows at once (down axpy: eight rows; gate/up: the gate and
up rows of two neurons); one-token half-precision mat-vecs read one row a thread (bf16 as uint32
pairs). Software prefetching did not help these streaming loops; it does help int4's compute-bound
mat-vec.

Measured on this 2-core VM (benchmarks/bench_formats.py, LLaMA-7B shapes, one token): float32 reads
at ~85% of the streaming bandwidth, bfloat16/float16 at ~70-80%, int8 at ~60-75% (widening an int8
costs a convert and an FMA port slot per element; with LLVM's 256-bit vectors two cores are then
close to compute-bound), int4 at ~33%: unpacking nibbles runs at ~15 G values/s a core, so int4 is
compute-bound and has its own mat-vec (one row at a time, next row prefetched, scales converted
once per row, the -8 offset taken out of the inner loop). Opt-in, int4 weights marked ``act="int8"`` take
int8-rounded activations and integer dot products instead (`ops.host_q8`: mat-vec and gate/up, 2-2.5x).

Threads: with numba's default OpenMP layer, workers spin-wait; on a shared 2-core machine that
stalled each parallel region to a scheduler tick (LLaMA-7B layer 16-24 ms instead of 5-6 ms).
Entry points should set ``OMP_WAIT_POLICY=PASSIVE`` (before numba's first parallel call) or
``NUMBA_THREADING_LAYER=workqueue`` (only if numba is never launched from two threads at once);
this module leaves process-wide settings alone.

``host_ffn_callback`` runs ``host_sparse_ffn`` from inside a jitted function. On the CPU backend
it uses ``buffer_callback`` (~7 us, zero-copy: numba writes straight into XLA's output buffer);
elsewhere, or on a jax without it, ``pure_callback`` (~140 us, copies). The callback must not
call jax (deadlock): it only touches numpy arrays and numba.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import math
import time
from typing import NamedTuple

import ml_dtypes
import numpy as np
from numba import njit

import jax
import jax.numpy as jnp
import threadpoolctl

from ops import host_q8
from ops.host_elements import _BF16, _F16, _F32, _GELU_C, _I4, _I8
from ops.host_loops import (_DOWN_PARTIAL_BYTES, _MV_CHUNKS, _bf16_pair_matvec_kernel,
                            _bf16_pair_matvec_kernel_serial, _down_kernel, _down_kernel_serial, _ffn_kernel,
                            _ffn_kernel_serial, _h_kernel,
                            _h_kernel_serial, _h_threshold_kernel, _h_threshold_kernel_serial, _matvec_kernel,
                            _matvec_kernel_serial, _matvec_q4_kernel, _matvec_q4_kernel_serial,
                            _one_row_matvec_kernel, _one_row_matvec_kernel_serial, _widen_kernel)
from ops.quant import FORMATS, GROUP, Weight, check_format, dequantize
from ops.reference import check_family

try:
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:  # older jax
    _buffer_callback = None

_FAMILY_CODE = {"reglu": 0, "drelu": 1, "relu": 2, "swiglu": 4, "geglu": 5}  # _h_kernel also has 3: plain mat-vec
BF16 = np.dtype(ml_dtypes.bfloat16)
_DATA_DTYPE = {_F32: np.dtype(np.float32), _BF16: np.dtype(np.uint16), _F16: np.dtype(np.uint16),
               _I8: np.dtype(np.int8), _I4: np.dtype(np.uint8)}


# ---------------------------------------------------------------- numpy references
def _np_f32(a):
    if a is None:
        return None
    return dequantize(a) if isinstance(a, Weight) else np.asarray(a).astype(np.float32)


def _numpy_h(family, w_gate, w_up, x2, rows, b_up=None):
    """numpy ``h [B, rows]`` over the selected rows (a slice selects without a gather copy)."""
    f32 = lambda a: np.asarray(a)[rows].astype(np.float32, copy=False)  # noqa: E731
    u = x2 @ f32(w_up).T
    if family == "relu":
        return np.maximum(u + f32(b_up), 0) if b_up is not None else np.maximum(u, 0)
    return _np_glu(family, x2 @ f32(w_gate).T, u)


def _np_act(family, g):
    """numpy act(g) of a gated family (what a threshold compares)."""
    if family == "swiglu":
        return g / (1 + np.exp(-g))
    if family == "geglu":
        return np.float32(0.5) * g * (1 + np.tanh(np.float32(_GELU_C) * (g + np.float32(0.044715) * g * g * g)))
    return np.maximum(g, 0)


def _np_glu(family, g, u):
    """numpy act(g) * u of a gated family (float32)."""
    if family == "swiglu":
        return g / (1 + np.exp(-g)) * u
    if family == "geglu":
        return np.float32(0.5) * g * (1 + np.tanh(np.float32(_GELU_C) * (g + np.float32(0.044715) * g * g * g))) * u
    return np.maximum(g, 0) * (u if family == "reglu" else np.maximum(u, 0))


def host_h_ref(family, w_gate, w_up, x, idx, count, b_up=None, act_threshold=None):
    """numpy reference of the cold activations ``h [B, count]`` (weights dequantized to f32);
    with ``act_threshold``, zero where |act(gate x)| <= it."""
    check_family(family, w_gate)
    sel = np.asarray(idx)[: int(count)]
    x2 = np.atleast_2d(_np_f32(x))
    h = _numpy_h(family, _np_f32(w_gate), _np_f32(w_up), x2, sel, b_up)
    if act_threshold is not None:
        g = x2 @ _np_f32(w_gate)[sel].T
        h = np.where(np.abs(_np_act(family, g)) > act_threshold, h, np.float32(0))
    return h


def host_sparse_ffn_ref(family, w_gate, w_up, w_down_t, x, idx, count, b_up=None, act_threshold=None):
    """numpy reference of the cold FFN part: [d] or [B, d] (no down bias)."""
    h = host_h_ref(family, w_gate, w_up, x, idx, count, b_up, act_threshold)
    y = h @ _np_f32(w_down_t)[np.asarray(idx)[: int(count)]]
    return y[0] if np.ndim(x) == 1 else y



SERIAL_MAX_BYTES = 1 << 21  # weight bytes a call reads below which it runs on one thread
# ... and for which (weight bytes x tokens), the arithmetic, is at most this: a 16-row step of the bundled model
# 1.12-1.16x faster with its [1536, 384] projections on two threads, 1- to 4-row steps even (BENCHMARKS.md,
# "One parallel region a kernel call")
SERIAL_MAX_WORK_BYTES = 8 << 20
# One bf16 token over even-length rows reads them as uint32 pairs (`_bf16_pair_matvec_kernel`): alone 1.04-1.48x the
# one-row kernel from bundled to 7B shapes, 1.06x in a jitted chain of the 7B shape's q/k/v, o and head mat-vecs,
# 1.12x on the 4-layer 7B hybrid step (AMD EPYC, alternating calls; BENCHMARKS.md, "bf16 rows read as uint32
# pairs"). The eight-stream kernels gained nothing from it.
BF16_PAIRS = True
I8_ONE_ROW_BELOW_COLS = 4096  # int8 rows shorter than this take the one-row kernel for one token


# ---------------------------------------------------------------- argument handling
class _KW(NamedTuple):
    """A weight as the kernels take it: format code, contiguous data, 2-D per-row scales."""
    code: int
    data: np.ndarray   # [R, K] (int4: [R, K//2] uint8)
    scale: np.ndarray  # [R, 1] f32 (int8) | [R, K//32] uint16 (int4) | [R, 0] f32 (float formats)
    cols: int          # logical K
    int8_x: bool = False  # int4 rows the int8-activation kernels take (`ops.host_q8`: Weight.act == "int8")

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    @property
    def row_bytes(self) -> int:
        return self.data.shape[1] * self.data.itemsize + self.scale.shape[1] * self.scale.itemsize


def _writable_alias(a: np.ndarray) -> np.ndarray:
    """A writeable array over a read-only array's memory, without copying.

    numba compiles read-only arrays (numpy views of JAX CPU buffers, the engine's hot rows) into
    slower code: 2.4 vs 1.9 ms for a 7B layer's 900 active rows. The kernels never write to
    weights, and the caller keeps `a` (which owns the memory) alive for the call.
    """
    key = (a.ctypes.data, a.shape, a.dtype.str)
    alias = _ALIASES.get(key)
    if alias is None:
        if len(_ALIASES) >= 4096:  # bounded: a long-lived process sees new buffers (batch sizes, reloads)
            _ALIASES.clear()
        buf = (ctypes.c_char * a.nbytes).from_address(a.ctypes.data)
        alias = _ALIASES[key] = np.frombuffer(buf, dtype=a.dtype).reshape(a.shape)
    return alias


# Aliases by (address, shape, dtype): the engine's weights come back at the same addresses every step, and a new
# ctypes alias cost ~3 us a call. An alias owns nothing and is only used while a caller passes memory at its address
# (it is the same view a fresh one would be).
_ALIASES: dict[tuple, np.ndarray] = {}


def _contig(a) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return _writable_alias(a) if not a.flags.writeable and a.size else a


def _kernel_weight(w) -> _KW:
    """Validate a weight argument (Weight or float array) and put it in kernel form."""
    if isinstance(w, Weight):
        check_format(w.fmt, w.cols)
        code, cols = FORMATS.index(w.fmt), int(w.cols)
        data = np.asarray(w.data)
        if code in (_BF16, _F16) and data.dtype in (BF16, np.dtype(np.float16)):
            data = data.view(np.uint16)  # a float Weight holding the float array, not its bits
    else:
        data = np.asarray(w)
        if data.ndim != 2:
            raise ValueError(f"a weight is a 2-D row matrix, got shape {data.shape}")
        kinds = {np.dtype(np.float32): _F32, BF16: _BF16, np.dtype(np.float16): _F16}
        if data.dtype not in kinds:
            raise TypeError(f"host kernels take float32, bfloat16 or float16 arrays or an "
                            f"ops.quant.Weight, got {data.dtype}")
        code, cols = kinds[data.dtype], data.shape[1]
        data = data.view(np.uint16) if code != _F32 else data
    want_cols = cols // 2 if code == _I4 else cols
    if data.dtype != _DATA_DTYPE[code] or data.ndim != 2 or data.shape[1] != want_cols:
        raise ValueError(f"{FORMATS[code]} weight of {cols} columns needs data "
                         f"{_DATA_DTYPE[code]} [rows, {want_cols}], got {data.dtype} {data.shape}")
    rows = data.shape[0]
    if code == _I8:
        scale = np.asarray(w.scale)
        if scale.dtype != np.float32 or scale.shape != (rows,):
            raise ValueError(f"int8 scale must be float32 [{rows}], got {scale.dtype} {scale.shape}")
        scale = _contig(scale).reshape(rows, 1)
    elif code == _I4:
        scale = np.asarray(w.scale)
        if scale.dtype != np.uint16 or scale.shape != (rows, cols // GROUP):
            raise ValueError(f"int4 scale must be uint16 (f16 bits) [{rows}, {cols // GROUP}], "
                             f"got {scale.dtype} {scale.shape}")
        scale = _contig(scale)
    else:
        scale = np.empty((rows, 0), np.float32)
    int8_x = isinstance(w, Weight) and w.act == "int8"
    if int8_x and not (code == _I4 and host_q8.usable(cols)):
        raise ValueError(f"int8 activations need int4 rows of a multiple of {host_q8.BLOCK} columns on an x86-64 CPU "
                         f"with AVX2 and F16C; got {FORMATS[code]} rows of {cols} columns"
                         + ("" if host_q8.SUPPORTED else " on a CPU without them"))
    return _KW(code, _contig(data), scale, cols, int8_x)


def _kernel_x(kw: _KW, x) -> np.ndarray:
    """x [B, K] as contiguous f32 in the weight's kernel order (int4: packed, see module doc)."""
    x2 = _arg(np.atleast_2d(x), np.float32)
    if x2.ndim != 2 or x2.shape[1] != kw.cols:
        raise ValueError(f"x has {x2.shape[-1]} features, the weight {kw.cols} columns")
    if kw.code != _I4:
        return x2
    b, k = x2.shape
    return np.ascontiguousarray(x2.reshape(b, k // GROUP, 2, GROUP // 2).transpose(0, 2, 1, 3).reshape(b, k))


def _natural_order(code: int, y: np.ndarray) -> np.ndarray:
    """Inverse of _kernel_x's permutation for sums accumulated in an int4 row's packed order."""
    if code != _I4:
        return y
    b, k = y.shape
    return y.reshape(b, 2, k // GROUP, GROUP // 2).transpose(0, 2, 1, 3).reshape(b, k)


def _serial(count, kw: _KW, tokens: int = 1) -> bool:
    """One thread for a call that reads at most SERIAL_MAX_BYTES of weights for at most SERIAL_MAX_WORK_BYTES
    of (weight bytes x tokens): waking the second thread costs more than it saves below that."""
    return _serial_bytes(count * kw.row_bytes, tokens)


def _serial_bytes(nbytes: int, tokens: int = 1) -> bool:
    """`_serial` for a call reading `nbytes` of weights."""
    return nbytes <= SERIAL_MAX_BYTES and nbytes * tokens <= SERIAL_MAX_WORK_BYTES


def _arg(a, dtype):
    """Small arrays as writeable C-contiguous ``dtype`` (readonly ones would compile anew)."""
    return np.require(a, dtype, ["C", "W"])


def _rows(idx, count, n_rows):
    """idx as int32 after checking idx[:count] (numba does no bounds checks: bad rows corrupt)."""
    idx = _arg(idx, np.int32)
    count = int(count)
    if not 0 <= count <= idx.shape[0]:
        raise ValueError(f"count {count} outside [0, {idx.shape[0]}]")
    if count and not (0 <= idx[:count].min() and idx[:count].max() < n_rows):
        raise IndexError(f"idx[:count] outside [0, {n_rows})")
    return idx, count


def _expect(ok, msg):
    if not ok:
        raise ValueError(msg)


def _out(out, shape):
    """A caller's output buffer (written in place by numba) or a new one."""
    if out is None:
        return np.empty(shape, np.float32)
    _expect(out.dtype == np.float32 and out.flags.c_contiguous and out.flags.writeable,
            "out must be a writeable C-contiguous float32 array")
    if out.size != math.prod(shape):  # messages formatted only on failure: a decode step makes ~30 calls
        raise ValueError(f"out has shape {out.shape}, expected {shape}")
    return out if out.shape == shape else out.reshape(shape)


# ---------------------------------------------------------------- public kernels
def host_gather_matvec(w, idx, count, x):
    """numba ``w[idx[:count]] @ x``: [B, count] f32 (each row read once for all tokens)."""
    kw = _kernel_weight(w)
    x2 = _kernel_x(kw, x)
    idx, count = _rows(idx, count, kw.rows)
    out = np.empty((x2.shape[0], count), np.float32)
    kernel = _h_kernel_serial if _serial(count, kw, x2.shape[0]) else _h_kernel
    kernel(3, kw.code, kw.data, kw.scale, kw.data, kw.scale, np.zeros(1, np.float32), False, False,
           x2, idx, count, out)
    return out


def _gate_up(family, w_gate, w_up) -> tuple[_KW, _KW]:
    check_family(family, w_gate)
    ku = _kernel_weight(w_up)
    kg = ku if w_gate is None else _kernel_weight(w_gate)
    _expect(kg.code == ku.code and kg.data.shape == ku.data.shape and kg.int8_x == ku.int8_x,
            f"gate and up must share format and shape: {FORMATS[kg.code]} {kg.data.shape} vs "
            f"{FORMATS[ku.code]} {ku.data.shape}")
    return kg, ku


def _gated_args(family, w_gate, w_up, x, idx, count, b_up):
    """The gate/up kernels' checked arguments: (gate, up kernel weights, x as the kernel reads it, idx, count,
    b_up as f32, or a one-entry placeholder when there is none)."""
    kg, ku = _gate_up(family, w_gate, w_up)
    x2 = _kernel_x(ku, x)
    idx, count = _rows(idx, count, ku.rows)
    bu = _arg(b_up, np.float32) if b_up is not None else np.zeros(1, np.float32)
    _expect(b_up is None or bu.shape[0] >= ku.rows, "b_up has fewer entries than w_up rows")
    return kg, ku, x2, idx, count, bu


def host_sparse_h(family, w_gate, w_up, x, idx, count, b_up=None, out=None, act_threshold=None):
    """numba fused cold activations ``h [B, count]`` (f32, from any stored format). With
    ``act_threshold`` (gated families), h is zero where |act(gate x)| <= it and the up rows of
    neurons below it for every token are never read (`_h_threshold_kernel`)."""
    kg, ku, x2, idx, count, bu = _gated_args(family, w_gate, w_up, x, idx, count, b_up)
    out = _out(out, (x2.shape[0], count))
    if act_threshold is not None:
        _expect(family != "relu", "an activation threshold needs a gated family")
        kernel = _h_threshold_kernel_serial if _serial(2 * count, ku, x2.shape[0]) else _h_threshold_kernel
        kernel(_FAMILY_CODE[family], ku.code, kg.data, kg.scale, ku.data, ku.scale, x2, idx, count,
               np.float32(act_threshold), out)
        return out
    kernel = _h_kernel_serial if _serial(2 * count, ku, x2.shape[0]) else _h_kernel
    kernel(_FAMILY_CODE[family], ku.code, kg.data, kg.scale, ku.data, ku.scale, bu, b_up is not None, GATED_FOUR_TOKENS,
           x2, idx, count, out)
    return out


def _down_buffers(kw: _KW, n_tok):
    d = kw.cols
    n_chunks = max(1, min(16, _DOWN_PARTIAL_BYTES // (4 * n_tok * d)))
    return (np.zeros((n_chunks, n_tok, d), np.float32), np.empty((n_chunks, 2, 8), np.int64),
            np.empty((n_chunks, 40), np.float32))


# From two tokens on, the gated `_h_kernel` (gate and up dots of the listed neurons: the dense FFN's decode rows,
# every hybrid's cold neurons) meets the tokens four at a time (`_dot4x4`); False: one token a pass (the earlier
# kernel, kept for A/B runs and tests). BENCHMARKS.md, "Four tokens a pass in the gate/up kernel".
GATED_FOUR_TOKENS = True
# The down kernel takes tokens four at a time (`_axpy8x4`) from four tokens on; False: one at a time (the
# earlier kernel, kept for A/B runs and tests). 7B down projection [11008, 4096], alternating calls in one process:
# see BENCHMARKS.md, "Four tokens a pass in the down kernel".
AXPY_FOUR_TOKENS = True


def host_axpy_down(w_down_t, idx, count, h, out=None, skip_zero_rows=True):
    """numba deterministic ``h @ w_down_t[idx[:count]]``: [B, d] f32.

    ``skip_zero_rows``: rows whose h is 0 for every token are not read (sparse FFN); a dense
    FFN passes False (every row read; nothing to test per row)."""
    kw = _kernel_weight(w_down_t)
    h2 = _arg(np.atleast_2d(h), np.float32)
    idx, count = _rows(idx, count, kw.rows)
    out = _out(out, (h2.shape[0], kw.cols))
    _expect(h2.shape[1] >= count, f"h has {h2.shape[1]} columns, count is {count}")
    kernel = _down_kernel_serial if _serial(count, kw, h2.shape[0]) else _down_kernel
    kernel(kw.code, kw.data, kw.scale, idx, count, h2, bool(skip_zero_rows), AXPY_FOUR_TOKENS, out,
           *_down_buffers(kw, h2.shape[0]))
    return out


# From how many tokens blocked BLAS GEMMs beat the numba kernels, by product and format. The kernels'
# cost grows with the tokens (their arithmetic: ~1 ms a token on a 7B up-projection on 2 cores); BLAS
# first widens every row block to f32 (~30 ms a 7B matrix in a half or integer format, nothing for
# contiguous f32 rows), then runs at GEMM speed. int4's kernels unpack nibbles once per two tokens and
# cross first (BLAS time over the kernels' on the 7B shape, one BLAS thread as in the engine, AVX2: fused FFN
# over 30% of the rows 0.43 / 0.82 / 1.00 / 1.49 at 8 / 16 / 32 / 48 tokens, mat-vec 0.40 / 0.62 / 0.88 /
# 1.02 / 1.13 at 8 / 16 / 32 / 48 / 64, down 1.03 / 0.99 at 32 / 48; benchmarks/results/int4_down_1208/
# blas_thresholds.txt). Measured on the 7B shape (BENCHMARKS.md, "Host kernels or BLAS by batch size"): at 16 tokens
# an int8 up-projection takes 15.8 ms in the kernel and 39.9 ms through BLAS, the transposed down
# projection 16.8 vs 79.7 ms; at 128 tokens BLAS wins (104 vs 124 ms). "matvec": x @ w.T;
# "axpy": h @ w (the transposed down projection); "ffn": the fused sparse FFN over listed rows.
# "int4-a8": int4 rows against int8 activations (`ops.host_q8`), whose kernels beat BLAS much further: 7B shape,
# BLAS over the kernels' time, mat-vec 2.70 / 2.72 / 1.81 / 1.64 / 1.42 / 1.31 at 16 / 32 / 48 / 64 / 128 / 256 tokens,
# dense FFN 1.80 / 1.36 / 0.99 at 16 / 32 / 48 (benchmarks/results/int4_q8_1208/blas_thresholds.txt).
_BLAS_MIN_TOKENS = {
    "matvec": {"float32": 8, "int4": 48, "int4-a8": 256},
    "axpy": {"float32": 8, "int4": 32},
    "ffn": {"float32": 32, "int4": 32, "int4-a8": 48},
}
_BLAS_MIN_DEFAULT = {"matvec": 64, "axpy": 128, "ffn": 64}  # bfloat16, float16, int8
_WARM_BLAS_TOKENS = max(_BLAS_MIN_DEFAULT.values())  # a batch every product takes through BLAS


def kernel_format(w) -> str:
    """A weight argument's kernel format for `blas_min_tokens`: a Weight's own ("int4-a8" for int4 rows against
    int8 activations), a plain array's from its dtype; unchecked."""
    if isinstance(w, Weight):
        return "int4-a8" if w.fmt == "int4" and w.act == "int8" else w.fmt
    return np.dtype(w.dtype).name


def blas_min_tokens(fmt: str, product: str = "matvec") -> int:
    """Tokens from which the host `product` ("matvec", "axpy" or "ffn") over a weight stored as `fmt` (or
    "int4-a8", int4 against int8 activations) goes through blocked BLAS GEMMs instead of the numba kernels."""
    return _BLAS_MIN_TOKENS[product].get(fmt, _BLAS_MIN_DEFAULT[product])
BLAS_BLOCK_ROWS = 512  # rows widened to f32 at a time for BLAS (bounded scratch; 256 was 10% slower)


@functools.cache
def _blas_controller() -> threadpoolctl.ThreadpoolController | None:
    # On the CPU backend XLA's own threads hold the cores while a callback runs: OpenBLAS's
    # spinning workers then fight them (a 16-row decode step of the bundled hybrid model took
    # 607 ms with 2 BLAS threads, 33 ms with 1). Elsewhere the host cores are free for BLAS.
    return threadpoolctl.ThreadpoolController() if jax.default_backend() == "cpu" else None


def one_blas_thread():
    """A context: one BLAS thread for the host kernels' GEMMs on the CPU backend (see _blas_controller)."""
    c = _blas_controller()
    return c.limit(limits=1, user_api="blas") if c is not None else contextlib.nullcontext()


def _f32_rows(kw: _KW, idx, i0, i1, scratch):
    """Rows idx[i0:i1] as f32 [n, K] in kernel order: a view when they are contiguous f32 rows,
    else widened (or gathered) into the flat f32 ``scratch``."""
    n = i1 - i0
    if kw.code == _F32 and n and idx[i1 - 1] - idx[i0] == n - 1 and \
            np.array_equal(idx[i0:i1], np.arange(idx[i0], idx[i0] + n)):
        return kw.data[idx[i0]: idx[i0] + n]
    block = scratch[: n * kw.cols].reshape(n, kw.cols)
    _widen_kernel(kw.code, kw.data, kw.scale, idx, i0, block)
    return block


def _all_rows(n):
    return np.arange(n, dtype=np.int32)


def _widened_blocks(kw: _KW):
    """(r0, r1, rows r0:r1 as f32 [n, K] in kernel order) for each ``BLAS_BLOCK_ROWS`` block of the weight,
    one scratch buffer reused (a block is valid until the next is yielded)."""
    idx = _all_rows(kw.rows)
    scratch = np.empty(min(BLAS_BLOCK_ROWS, kw.rows) * kw.cols, np.float32)
    for r0 in range(0, kw.rows, BLAS_BLOCK_ROWS):
        r1 = min(kw.rows, r0 + BLAS_BLOCK_ROWS)
        yield r0, r1, _f32_rows(kw, idx, r0, r1, scratch)


def host_matmul_blocked(w, x, out=None):
    """``x [B, K] @ dequantize(w).T`` -> [B, R] f32 through BLAS, ``BLAS_BLOCK_ROWS`` rows widened
    at a time (for prompts: the f32 matrix is never materialised)."""
    kw = _kernel_weight(w)
    xk = _kernel_x(kw, x)
    y = _out(out, (xk.shape[0], kw.rows))
    with one_blas_thread():
        for r0, r1, block in _widened_blocks(kw):
            y[:, r0:r1] = xk @ block.T
    if out is not None:
        return out
    return y[0] if np.ndim(x) == 1 else y


def host_matmul_t_blocked(w, h, out=None):
    """``h [B, R] @ dequantize(w)`` -> [B, K] f32 through BLAS (the transposed down projection of a
    prompt), ``BLAS_BLOCK_ROWS`` rows widened at a time as in ``host_matmul_blocked``."""
    kw = _kernel_weight(w)
    h2 = _arg(np.atleast_2d(h), np.float32)
    _expect(h2.ndim == 2 and h2.shape[1] == kw.rows, f"h has {h2.shape[-1]} columns, the weight {kw.rows} rows")
    y = np.zeros((h2.shape[0], kw.cols), np.float32)  # in the weight's kernel order
    with one_blas_thread():
        for r0, r1, block in _widened_blocks(kw):
            y += h2[:, r0:r1] @ block
    res = _out(out, y.shape)
    res[...] = _natural_order(kw.code, y)
    return res[0] if out is None and np.ndim(h) == 1 else res


def host_matvec(w, x, out=None):
    """``x [B, K] @ dequantize(w).T`` -> [B, R] f32 (x [K] -> [R]): every row read once for all
    tokens, at memory bandwidth in any format; BLAS blocks from ``blas_min_tokens`` tokens."""
    kw = _kernel_weight(w)
    xk = _kernel_x(kw, x)
    if xk.shape[0] >= blas_min_tokens(kernel_format(w)):
        return host_matmul_blocked(w, x, out=out)
    y = _out(out, (xk.shape[0], kw.rows))
    serial = _serial(kw.rows, kw, xk.shape[0])
    if kw.int8_x:  # int4 rows against int8 activations (integer dots, `ops.host_q8`)
        kernel = host_q8._matvec_q4q8_kernel_serial if serial else host_q8._matvec_q4q8_kernel
        kernel(kw.data, kw.scale, *host_q8.quantize_x(xk), y)
    elif kw.code == _I4:
        half, groups = kw.cols // 2, kw.cols // GROUP
        xsum = (xk[:, :half] + xk[:, half:]).reshape(xk.shape[0], groups, GROUP // 2).sum(-1, dtype=np.float32)
        kernel = _matvec_q4_kernel_serial if serial else _matvec_q4_kernel
        kernel(kw.data, kw.scale, xk, xsum, y, np.empty((_MV_CHUNKS, groups), np.float32))
    elif xk.shape[0] == 1 and kw.code == _BF16 and BF16_PAIRS and kw.cols % 2 == 0:
        kernel = _bf16_pair_matvec_kernel_serial if serial else _bf16_pair_matvec_kernel
        x_pairs = np.ascontiguousarray(xk[0].reshape(-1, 2).T)  # [2, K/2]: x's even entries, then its odd ones
        kernel(kw.data.view(np.uint32), x_pairs[0], x_pairs[1], y)
    elif xk.shape[0] == 1 and (kw.code in (_BF16, _F16) or kw.code == _I8 and kw.cols < I8_ONE_ROW_BELOW_COLS):
        # one token in half precision or over short int8 rows: one stream a thread
        (_one_row_matvec_kernel_serial if serial else _one_row_matvec_kernel)(kw.code, kw.data, kw.scale, xk, y)
    else:
        kernel = _matvec_kernel_serial if serial else _matvec_kernel
        kernel(kw.code, kw.data, kw.scale, xk, y)
    if out is not None:
        return out
    return y[0] if np.ndim(x) == 1 else y


def _count_live(h: np.ndarray, live, first: int, offset: int = 0) -> None:
    """Adds to live[0] the listed neurons (columns of h, list positions offset...) with a non-zero h for some
    token, and to live[1] (when present) those of them at list positions below `first`."""
    nz = np.any(h != 0, axis=0)
    live[0] += np.count_nonzero(nz)
    if len(live) > 1:
        live[1] += np.count_nonzero(nz[: max(0, first - offset)])


def _blas_ffn(family, kg, ku, kd, x2, idx, count, bu, out, act_threshold=None, live=None, live_first=0):
    """Many tokens: GEMMs over blocks of the selected rows, each widened to f32 (or, for
    contiguous f32 rows, used in place), so temporaries stay ``BLAS_BLOCK_ROWS`` rows."""
    xk = _kernel_x(ku, x2)
    y = np.zeros((x2.shape[0], kd.cols), np.float32)  # in w_down_t's kernel order
    scratch = np.empty(BLAS_BLOCK_ROWS * max(ku.cols, kd.cols), np.float32)  # one block at a time
    with one_blas_thread():
        for i0 in range(0, count, BLAS_BLOCK_ROWS):
            i1 = min(count, i0 + BLAS_BLOCK_ROWS)
            u = xk @ _f32_rows(ku, idx, i0, i1, scratch).T
            if family == "relu":
                h = np.maximum(u + bu[idx[i0:i1]], 0) if bu is not None else np.maximum(u, 0)
            else:
                g = xk @ _f32_rows(kg, idx, i0, i1, scratch).T
                h = _np_glu(family, g, u)
                if act_threshold is not None:
                    h = np.where(np.abs(_np_act(family, g)) > act_threshold, h, np.float32(0))
            if live is not None:
                _count_live(h, live, live_first, i0)
            y += h @ _f32_rows(kd, idx, i0, i1, scratch)
    out[...] = _natural_order(kd.code, y)


def host_sparse_ffn(family, w_gate, w_up, w_down_t, x, idx, count, b_up=None, out=None, act_threshold=None,
                    live=None, live_first=0, skip_zero_rows=True):
    """Cold FFN part over rows idx[:count] (no down bias): [d] or [B, d] f32, any format.

    numba kernels for decode-sized batches (gate/up and down in one parallel region, `_ffn_kernel`); blocked
    BLAS GEMMs for prompts. ``act_threshold``: neurons with |act(gate x)| <= it contribute nothing for that
    token (CATS); ``live``: an int array whose live[0] gets the number of neurons computed for some token
    (their h is non-zero) and, when it has a second entry, live[1] those among the first ``live_first`` listed
    (e.g. a layer's hot ones). ``skip_zero_rows``: the down rows of neurons whose h is zero for every token are
    not read (False: every listed row is, the dense FFN)."""
    x2 = np.atleast_2d(x)
    if live is not None:
        live[:] = 0
    if x2.shape[0] >= blas_min_tokens(kernel_format(w_up), "ffn"):
        kg, ku = _gate_up(family, w_gate, w_up)
        kd = _kernel_weight(w_down_t)
        _expect(kd.rows == ku.rows, "w_down_t and w_up disagree on the number of neurons")
        idx, count = _rows(idx, count, ku.rows)
        bu = None if b_up is None else _arg(b_up, np.float32)
        y = _out(out, (x2.shape[0], kd.cols))
        _blas_ffn(family, kg, ku, kd, _arg(x2, np.float32), idx, count, bu, y, act_threshold, live, live_first)
    elif act_threshold is None:
        y = _fused_ffn(family, w_gate, w_up, w_down_t, x, idx, count, b_up, out, live, live_first, skip_zero_rows)
    else:
        h = host_sparse_h(family, w_gate, w_up, x, idx, count, b_up, act_threshold=act_threshold)
        if live is not None:
            _count_live(h, live, live_first)
        y = host_axpy_down(w_down_t, idx, count, h, out=out, skip_zero_rows=skip_zero_rows)
    if out is not None:
        return out
    return y[0] if np.ndim(x) == 1 else y


def _fused_ffn(family, w_gate, w_up, w_down_t, x, idx, count, b_up, out, live, live_first, skip_zero_rows):
    """`host_sparse_ffn` for decode-sized batches without a threshold: `_ffn_kernel` (serial twin for small work)."""
    kg, ku, x2, idx, count, bu = _gated_args(family, w_gate, w_up, x, idx, count, b_up)
    kd = _kernel_weight(w_down_t)
    _expect(kd.rows == ku.rows, "w_down_t and w_up disagree on the number of neurons")
    h = np.empty((x2.shape[0], count), np.float32)
    y = _out(out, (x2.shape[0], kd.cols))
    gated = family != "relu"
    row_bytes = ku.row_bytes * (2 if gated else 1) + kd.row_bytes
    serial = _serial_bytes(count * row_bytes, x2.shape[0])
    down = (kd.code, kd.data, kd.scale, bool(skip_zero_rows))
    if ku.int8_x and gated:  # int4 gate/up rows against int8 activations (integer dots, `ops.host_q8`)
        kernel = host_q8._ffn_q4q8_kernel_serial if serial else host_q8._ffn_q4q8_kernel
        kernel(_FAMILY_CODE[family], kg.data, kg.scale, ku.data, ku.scale, *host_q8.quantize_x(x2), idx, count,
               *down, GATED_FOUR_TOKENS, h, y, *_down_buffers(kd, x2.shape[0]))
    else:
        kernel = _ffn_kernel_serial if serial else _ffn_kernel
        kernel(_FAMILY_CODE[family], ku.code, kg.data, kg.scale, ku.data, ku.scale, bu, b_up is not None,
               GATED_FOUR_TOKENS, x2, idx, count, *down, h, y, *_down_buffers(kd, x2.shape[0]))
    if live is not None:
        _count_live(h, live, live_first)
    return y


@njit(cache=True)
def _select_union_kernel(scores, rows, thr, hot_ids, cold_ids, ids):
    n = scores.shape[1]
    on = np.zeros(n, np.bool_)
    for b in range(scores.shape[0]):  # row by row: each pass reads one contiguous row of scores
        if rows[b]:
            for j in range(n):
                if scores[b, j] >= thr:
                    on[j] = True
    n_hot, count, hot = hot_ids.shape[0], 0, 0
    for j in range(n):
        if on[j]:
            ids[count] = hot_ids[j] if j < n_hot else cold_ids[j - n_hot]
            count += 1
            if j < n_hot:
                hot += 1
    return count, hot


def host_select_union(scores, rows, threshold, hot_ids, cold_ids):
    """Neurons that some marked row scores >= threshold: (ids [n] int32 whose first `count` are them,
    count, hot count). Position j of ``scores [B, n]`` is neuron ``hot_ids[j]`` for j < H, else
    ``cold_ids[j - H]``; ids keep that order (hot first, then cold), ``rows [B]`` marks the rows that
    take part (batch padding does not)."""
    scores = _arg(np.atleast_2d(scores), np.float32)
    rows = _arg(rows, np.bool_)
    hot_ids, cold_ids = _arg(hot_ids, np.int32), _arg(cold_ids, np.int32)
    n = scores.shape[1]
    _expect(hot_ids.shape[0] + cold_ids.shape[0] == n, f"{hot_ids.shape[0]} hot + {cold_ids.shape[0]} cold ids "
            f"for {n} scores")
    _expect(rows.shape == (scores.shape[0],), f"rows has shape {rows.shape}, scores {scores.shape}")
    ids = np.empty(n, np.int32)
    count, hot = _select_union_kernel(scores, rows, np.float32(threshold), hot_ids, cold_ids, ids)
    return ids, int(count), int(hot)


def host_select_union_ref(scores, rows, threshold, hot_ids, cold_ids):
    """numpy reference of ``host_select_union``: (ids of the selected neurons, hot count)."""
    scores = np.atleast_2d(np.asarray(scores, np.float32))[np.asarray(rows, bool)]
    pos = np.flatnonzero(np.any(scores >= np.float32(threshold), axis=0))
    order = np.concatenate([np.asarray(hot_ids, np.int32), np.asarray(cold_ids, np.int32)])
    return order[pos], int(np.count_nonzero(pos < len(hot_ids)))


_WARM: set = set()


def warm(formats, gated: bool = False) -> float:
    """Runs every kernel once per weight format (`kernel_format`: "int4-a8" loads the int8-activation kernels) on
    small zero weights (serial and parallel variants,
    prompt and decode sizes), so numba loads their machine code from its on-disk cache (or compiles it)
    now and not inside the first tokens. Once per format and process; returns the seconds it took."""
    t0 = time.perf_counter()
    cols = 1024
    for fmt in formats:
        if (fmt, gated) in _WARM:
            continue
        for rows in (8, None):  # serial, then parallel (a call reading more than SERIAL_MAX_BYTES)
            if rows is None:
                rows = 2 * SERIAL_MAX_BYTES // _kernel_weight(_zero_weight(8, cols, fmt)).row_bytes + 8
            w = _zero_weight(rows, cols, fmt)
            idx = np.arange(rows, dtype=np.int32)
            for n_tok in (1, 2, _WARM_BLAS_TOKENS):  # the mat-vec kernels (one row, eight streams), then BLAS
                x = np.ones((n_tok, cols), np.float32)
                host_matvec(w, x)
                if fmt == "bfloat16" and n_tok == 1:  # odd-length rows (predictors of odd rank): the one-row kernel
                    host_matvec(_zero_weight(rows, cols + 1, fmt), np.ones((1, cols + 1), np.float32))
                host_sparse_ffn("reglu", w, w, w, x, idx, rows)
                host_axpy_down(w, idx, rows, np.ones((n_tok, rows), np.float32), skip_zero_rows=False)
                if gated:
                    host_sparse_ffn("swiglu", w, w, w, x, idx, rows, act_threshold=0.5)
        del w  # a large weight held into the next format's warm-up would add to the load's peak memory
        _WARM.add((fmt, gated))
    host_select_union(np.zeros((1, 4), np.float32), np.ones(1, bool), 0.0, np.arange(2, dtype=np.int32),
                      np.arange(2, 4, dtype=np.int32))
    return time.perf_counter() - t0


def _zero_weight(rows: int, cols: int, fmt: str) -> Weight:
    """A zero Weight of `fmt` ([rows, cols]; a `kernel_format`, so "int4-a8" too) in the layout the kernels take."""
    if fmt == "int4-a8":
        return dataclasses.replace(_zero_weight(rows, cols, "int4"), act="int8")
    if fmt == "float32":
        return Weight(np.zeros((rows, cols), np.float32), None, fmt, cols)
    if fmt in ("bfloat16", "float16"):
        return Weight(np.zeros((rows, cols), np.uint16), None, fmt, cols)
    if fmt == "int8":
        return Weight(np.zeros((rows, cols), np.int8), np.ones(rows, np.float32), fmt, cols)
    return Weight(np.zeros((rows, cols // 2), np.uint8), np.zeros((rows, cols // GROUP), np.uint16), fmt, cols)


# ---------------------------------------------------------------- calling from jit
def _host_array(a):
    """A weight (array or Weight) as contiguous numpy, captured by a host callback."""
    if a is None:
        return None
    if isinstance(a, Weight):
        return Weight(np.ascontiguousarray(a.data),
                      None if a.scale is None else np.ascontiguousarray(a.scale), a.fmt, a.cols, a.act)
    return np.ascontiguousarray(a)


def host_ffn_callback(family, w_gate, w_up, w_down_t, x, idx, count, b_up=None, *,
                      method="auto", after=None, act_threshold=None):
    """Inside jit: cold FFN part on the host (numba) for x [d]/[B, d], idx [C], count scalar.

    The weights are host numpy arrays or numpy-backed Weights captured by the callback (never
    passed through XLA). ``method``: "buffer" (buffer_callback, zero-copy, CPU backend only),
    "pure" (pure_callback) or "auto" (buffer when available and the default backend is CPU; on
    GPU buffer_callback hands over device buffers, which numpy cannot read).
    ``act_threshold``: CATS zeroing of the listed neurons (`host_sparse_ffn`).
    ``after``: an array the callback waits for (an input it ignores). XLA:CPU runs independent
    ops at once; two numba callbacks of one layer running together oversubscribe the cores
    (each brings its own thread team), so the engine orders its CPU callbacks with this.
    """
    check_family(family, w_gate)
    host = [_host_array(a) for a in (w_gate, w_up, w_down_t, b_up)]
    d = host[2].cols if isinstance(host[2], Weight) else host[2].shape[1]
    x = jnp.asarray(x).astype(jnp.float32)
    idx = jnp.asarray(idx).astype(jnp.int32)
    count = jnp.asarray(count).astype(jnp.int32)
    out_shape = jax.ShapeDtypeStruct(x.shape[:-1] + (d,), jnp.float32)
    deps = () if after is None else (after,)
    if method == "auto":
        method = "buffer" if _buffer_callback is not None and jax.default_backend() == "cpu" else "pure"

    def compute(xa, idxa, counta, out=None):
        n = min(int(counta), idxa.shape[0])  # overflowed lists hold only C entries
        return host_sparse_ffn(family, host[0], host[1], host[2], xa, idxa, n, host[3], out=out,
                               act_threshold=act_threshold)

    if method == "buffer":
        if _buffer_callback is None:
            raise RuntimeError("this jax has no jax.experimental.buffer_callback")
        if jax.default_backend() != "cpu":
            raise ValueError("method='buffer' needs the CPU backend (on GPU its buffers live on "
                             "the device and numpy cannot read them); use 'pure'")

        def cb(ctx, out, xb, idxb, countb, *_after):
            del ctx
            o = np.asarray(out)
            # numba writes the result straight into XLA's output buffer (no copy back).
            compute(np.asarray(xb), np.asarray(idxb), np.asarray(countb), out=o.reshape(-1, d))

        return _buffer_callback(cb, out_shape)(x, idx, count, *deps)
    if method == "pure":
        def cb(xa, idxa, counta, *_after):
            return np.asarray(compute(np.asarray(xa), np.asarray(idxa), np.asarray(counta)),
                              np.float32)

        return jax.pure_callback(cb, out_shape, x, idx, count, *deps, vmap_method="sequential")
    raise ValueError(f"unknown callback method {method!r}")

"""Weight storage formats for the CPU kernels, with plain numpy/jnp references.

A ``Weight`` is a row matrix ``[rows, cols]`` (``y = W x`` reads row r for output r) stored in one
of ``FORMATS``; the host kernels (``ops.host_kernels``) read it in that precision and widen it to
float32 in registers, because XLA:CPU upcasts half-precision dots of one row (10x slower than f32;
several rows of bf16 meet XLA's own bf16 dot where the CPU has one, see ``ops.linear``).

  float32    data f32 [R, K]
  bfloat16   data bfloat16 [R, K] (ml_dtypes on the host; uint16 bit patterns are accepted and viewed
             as bfloat16: a bf16-typed device array is what XLA's own bf16 dot reads without a copy)
  float16    data uint16 [R, K] (f16 bit patterns)
  int8       data int8 [R, K], scale f32 [R]: w = q * scale[r] (symmetric, per row)
  int4       data uint8 [R, K//2], scale uint16 [R, K//32] (f16 bits), llama.cpp's Q4_0:
             per group of 32 columns w = d * (q - 8), q in 0..15; the group's 16 bytes hold
             element t in the low nibble and element t + 16 in the high nibble.

Quantizers are numba (parallel over rows): a 7B matrix quantizes in well under a second.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from numba import njit, prange

FORMATS = ("float32", "bfloat16", "float16", "int8", "int4")
GROUP = 32  # int4 group size along the row (columns)
BF16 = np.dtype(ml_dtypes.bfloat16)
_FLOAT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": BF16, "float16": np.dtype(np.float16)}


@dataclasses.dataclass
class Weight:
    """A row matrix [rows, cols] in a stored format: y = W x reads row r for output r."""
    data: Any    # f32 [R, K] | bf16 [R, K] | uint16 [R, K] (f16 bits) | int8 [R, K] | uint8 [R, K//2] (int4)
    scale: Any   # None (float formats) | f32 [R] (int8) | uint16 f16 bits [R, K//32] (int4)
    fmt: str     # one of FORMATS (static)
    cols: int    # logical K (static)
    # How the host kernels meet this weight's rows (static): "float32" activations (exact: dequantize, then f32
    # math), or "int8" (int4 weights only: activations rounded to int8 per group of 32, integer dots; `ops.host_q8`).
    act: str = "float32"

    def __post_init__(self):
        # bf16 bit patterns from files, zeros or older code become bf16 views (no copy)
        if self.fmt == "bfloat16" and isinstance(self.data, np.ndarray) and self.data.dtype == np.uint16:
            self.data = self.data.view(BF16)

    @property
    def rows(self) -> int:
        return int(self.data.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def nbytes(self) -> int:
        """Bytes of data + scale (what one full pass over the matrix reads)."""
        return int(self.data.nbytes) + (0 if self.scale is None else int(self.scale.nbytes))


jax.tree_util.register_dataclass(Weight, data_fields=["data", "scale"], meta_fields=["fmt", "cols", "act"])


def check_format(fmt: str, cols: int | None = None) -> None:
    """Raise ValueError for an unknown format, or int4 columns that do not fill whole groups."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; expected one of {FORMATS}")
    if fmt == "int4" and cols is not None and cols % GROUP:
        raise ValueError(f"int4 needs cols % {GROUP} == 0, got cols={cols}")


def format_bytes_per_row(fmt: str, cols: int) -> int:
    """Bytes (data + scale) one row of ``cols`` columns takes in ``fmt``."""
    check_format(fmt, cols)
    return {"float32": 4 * cols, "bfloat16": 2 * cols, "float16": 2 * cols, "int8": cols + 4,
            "int4": cols // 2 + 2 * (cols // GROUP)}[fmt]


def storage_format(np_dtype) -> str:
    """The float format whose storage is ``np_dtype`` (float32, bfloat16 or float16)."""
    dt = np.dtype(np_dtype)
    for fmt, d in _FLOAT_DTYPES.items():
        if dt == d:
            return fmt
    raise ValueError(f"no weight format stores {dt}; float formats store {list(_FLOAT_DTYPES)}")


# ---------------------------------------------------------------- quantizers (numba)
@njit(inline="always")
def f16_bits_to_f32_trick(h):
    """Exact f16 bits -> f32 with integer ops (numba has no float16 on CPU): every value
    including subnormals, infinities and NaN payloads (Giesen's half_to_float). No float
    arithmetic on denormals, which costs ~25x in microcode assists."""
    h = np.uint32(h)
    o = np.uint32((h & np.uint32(0x7FFF)) << np.uint32(13))  # exponent + mantissa, in place
    e = np.uint32(o & np.uint32(0x0F800000))
    o = np.uint32(o + np.uint32(112 << 23))  # rebias the exponent 15 -> 127
    o = np.uint32(o + np.uint32(112 << 23)) if e == np.uint32(0x0F800000) else o  # inf/nan
    # subnormal: the mantissa with an implicit 1 at 2^-14, minus that 2^-14 (exact, normal operands)
    sub = np.float32(np.uint32(o + np.uint32(1 << 23)).view(np.float32) - np.float32(2.0 ** -14))
    o = sub.view(np.uint32) if e == 0 else o
    return np.uint32(o | np.uint32((h & np.uint32(0x8000)) << np.uint32(16))).view(np.float32)


@njit(parallel=True, cache=True)
def _quantize_int8(w, q, scale):
    for r in prange(w.shape[0]):
        row = w[r]
        m = np.float32(0.0)
        for k in range(row.shape[0]):
            m = max(m, abs(row[k]))
        s = np.float32(m / np.float32(127.0))
        scale[r] = s
        for k in range(row.shape[0]):
            # q = rint(w / s): the same float32 division numpy's reference does
            q[r, k] = 0 if s == 0 else np.int8(min(max(np.rint(np.float32(row[k] / s)), -127.0), 127.0))


@njit(parallel=True, cache=True)
def _int4_group_max(w, m):
    """m[r, g]: the value of largest magnitude (signed; the first one on ties) in each group."""
    for r in prange(w.shape[0]):
        row = w[r]
        for g in range(m.shape[1]):
            best = np.float32(0.0)
            for t in range(32):
                v = row[g * 32 + t]
                if abs(v) > abs(best):
                    best = v
            m[r, g] = best


@njit(parallel=True, cache=True)
def _quantize_int4(w, dbits, q):
    for r in prange(w.shape[0]):
        row = w[r]
        for g in range(dbits.shape[1]):
            d = f16_bits_to_f32_trick(dbits[r, g])
            for t in range(16):
                lo = np.uint8(8)
                hi = np.uint8(8)
                if d != 0:
                    lo = np.uint8(min(max(np.rint(np.float32(row[g * 32 + t] / d)) + 8.0, 0.0), 15.0))
                    hi = np.uint8(min(max(np.rint(np.float32(row[g * 32 + 16 + t] / d)) + 8.0, 0.0), 15.0))
                q[r, g * 16 + t] = lo | np.uint8(hi << np.uint8(4))


def _as_f32_matrix(w) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"a weight is a 2-D row matrix, got shape {w.shape}")
    if w.dtype.kind != "f" and w.dtype != BF16:
        raise ValueError(f"quantize a float matrix, got {w.dtype}")
    return np.ascontiguousarray(w, dtype=np.float32)


def to_weight(w, fmt: str) -> Weight:
    """Store the float matrix ``w [R, K]`` (any float dtype) in ``fmt`` (numpy in, numpy out)."""
    w = np.asarray(w)
    check_format(fmt, w.shape[-1] if w.ndim == 2 else None)
    if w.ndim != 2:
        raise ValueError(f"a weight is a 2-D row matrix, got shape {w.shape}")
    rows, cols = w.shape
    if fmt in _FLOAT_DTYPES:
        want = _FLOAT_DTYPES[fmt]
        if w.dtype.kind != "f" and w.dtype != BF16:
            raise ValueError(f"quantize a float matrix, got {w.dtype}")
        # astype rounds to nearest even (from any float dtype, no double rounding); a matrix
        # already in `want` is kept as is: data is a view of w
        data = w if w.dtype == want else w.astype(want)
        return Weight(data if fmt != "float16" else data.view(np.uint16), None, fmt, cols)
    wf = _as_f32_matrix(w)
    if fmt == "int8":
        q = np.empty((rows, cols), np.int8)
        scale = np.empty(rows, np.float32)
        _quantize_int8(wf, q, scale)
        return Weight(q, scale, fmt, cols)
    # int4 (Q4_0): d = m / -8 with m the group's largest-magnitude value, stored as f16; q is
    # rounded against the stored (f16) d, so dequantize(q) is within |d|/2 wherever q is not clipped.
    m = np.empty((rows, cols // GROUP), np.float32)
    _int4_group_max(wf, m)
    d = m / np.float32(-8.0)
    d[d == 0] = 0  # an all-zero group: +0, not the -0 of 0 / -8
    dbits = d.astype(np.float16).view(np.uint16)
    q = np.empty((rows, cols // 2), np.uint8)
    _quantize_int4(wf, dbits, q)
    return Weight(q, dbits, fmt, cols)


# ---------------------------------------------------------------- references
def _int4_nibbles(data: np.ndarray, cols: int) -> np.ndarray:
    """uint8 [R, K//2] packed -> q uint8 [R, K] in column order."""
    packed = data.reshape(data.shape[0], cols // GROUP, GROUP // 2)
    return np.concatenate([packed & 15, packed >> 4], axis=-1).reshape(data.shape[0], cols)


def dequantize(w: Weight) -> np.ndarray:
    """numpy reference: the float32 matrix [R, K] that ``w`` stores."""
    check_format(w.fmt, w.cols)
    data = np.asarray(w.data)
    if w.fmt in _FLOAT_DTYPES:
        return data.view(_FLOAT_DTYPES[w.fmt]).astype(np.float32)
    if w.fmt == "int8":
        return data.astype(np.float32) * np.asarray(w.scale, np.float32)[:, None]
    d = np.asarray(w.scale).view(np.float16).astype(np.float32)  # [R, G]
    q = _int4_nibbles(data, w.cols).astype(np.float32) - 8.0
    return (q.reshape(q.shape[0], -1, GROUP) * d[:, :, None]).reshape(q.shape[0], w.cols)


def float_data_jnp(w: Weight) -> jax.Array:
    """jnp: a bfloat16/float16 Weight's data in its own dtype (bit patterns reinterpreted; a bf16-typed
    array as it is: XLA:CPU copies the array to reinterpret it)."""
    data = jnp.asarray(w.data)
    dt = jnp.dtype(w.fmt)
    return data if data.dtype == dt else jax.lax.bitcast_convert_type(data, dt)


def dequantize_jnp(w: Weight) -> jax.Array:
    """jnp: the float32 matrix [R, K] that ``w`` stores (for XLA/GPU paths; traceable)."""
    check_format(w.fmt, w.cols)
    data = jnp.asarray(w.data)
    if w.fmt == "float32":
        return data.astype(jnp.float32)
    if w.fmt in ("bfloat16", "float16"):
        return float_data_jnp(w).astype(jnp.float32)
    if w.fmt == "int8":
        return data.astype(jnp.float32) * jnp.asarray(w.scale, jnp.float32)[:, None]
    rows = data.shape[0]
    packed = data.reshape(rows, w.cols // GROUP, GROUP // 2)
    q = jnp.concatenate([packed & 15, packed >> 4], axis=-1).astype(jnp.float32) - 8.0
    d = jax.lax.bitcast_convert_type(jnp.asarray(w.scale), jnp.float16).astype(jnp.float32)
    return (q * d[:, :, None]).reshape(rows, w.cols)


def dequantize_rows_jnp(w: Weight, idx) -> jax.Array:
    """jnp: rows ``idx`` of ``w`` as float32 [len(idx), K] (gathers stored rows, then widens)."""
    idx = jnp.asarray(idx)
    scale = None if w.scale is None else jnp.asarray(w.scale)[idx]
    return dequantize_jnp(Weight(jnp.asarray(w.data)[idx], scale, w.fmt, w.cols))

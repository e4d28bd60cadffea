"""Every weight-reading projection of the model, in every stored format, on every backend.

Weights are row matrices ``w [R, K]`` (HF's ``weight`` layout: row r produces output r), either
plain float arrays (training, tests) or ``ops.quant.Weight`` (the engine: stored precision or
int8/int4). Two products cover the model:
  * ``linear(x, w)``    = x @ w.T   (q/k/v/o, lm_head, gate/up, OPT projections)
  * ``linear_t(h, w)``  = h @ w     (the transposed down projection ``w_down_t [n_ff, d]``)
Activations and accumulation are float32 whatever the storage (an opt-in for prompt rows against a bf16
weight on a bf16-dot CPU: see below).

Per backend:
  * float32 storage, any backend: XLA dots (XLA:CPU reads f32 at bandwidth).
  * CPU backend, half or integer storage: XLA:CPU would convert the whole weight to f32 before
    every dot (a materialised f32 copy per call: 10x slower than f32, FIELD-NOTES section 4), so
    the numba kernels of ``ops.host_kernels`` read the stored bytes through ``buffer_callback``
    (zero-copy: the weight is an operand, the kernel writes XLA's output buffer). Prompts
    (from ``host_kernels.blas_min_tokens`` rows) go through blocked dequantize + BLAS inside the same callback.
  * CPU backend, bfloat16 storage, several rows (a batch, a prompt), where the CPU has bf16 dot
    instructions: XLA's own bf16 dot, the f32 activations split into bf16 parts (``native_bf16_dot``,
    ``_bf16_split_dot``): two by default (16 of an f32's 24 bits, ~2e-6 relative), three (exact up to
    summation order) for `exact=True`, which activation-threshold models (SwiGLU/GeGLU) use throughout.
    Prompt tokens (the rows from `prompt_from` on) may take fewer (``PROMPT_BF16_PARTS``, opt-in): one part
    rounds their activations to bf16 where they meet a bf16 weight, as GPU engines run a bf16 checkpoint,
    for 1.4-1.5x faster prompt chunks on a 7B shape; decode rows, every other format and the GPU keep f32.
  * GPU: the weight is dequantized inside the jitted function, where XLA fuses the convert into
    the dot's operand read (bf16/f16 natively; int8/int4 unpacked in registers).
The plain references beside them are ``linear_ref``/``linear_t_ref`` (dequantize, then f32 math).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from ops.quant import Weight, dequantize, dequantize_jnp, dequantize_rows_jnp, float_data_jnp

try:
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:  # older jax: no zero-copy callback, the XLA path is used
    _buffer_callback = None

f32 = jnp.float32
# False sends every format through the XLA path (what runs on a GPU): tests use it to check that
# path, and its CUDA lowering, on a CPU-only machine.
USE_HOST_KERNELS = True


# From this many activation rows a bfloat16 weight meets XLA:CPU's own bf16 dot where the CPU has bf16
# dot instructions (AMX / AVX512-BF16). `linear` (x @ w.T, the weight's rows contracted along their
# length): from 2 rows (7B up-projection at 16 rows 2.8 ms, vs 12.7 ms in f32 and ~4 ms for one row
# through the host kernel); one row stays on the host kernel, XLA's one-row bf16 product being a
# converting path (43 ms). `linear_t` (h @ w, contracted across rows, which XLA repacks every call):
# from 8 rows (7B down projection at 16 rows 8.6 ms vs 16 ms for the host kernel's axpy; at 4 rows
# the host kernel wins, 4.6 vs 6.4 ms). BENCHMARKS.md, "bf16 at batch > 1".
NATIVE_BF16_MIN_ROWS = 2
NATIVE_BF16_T_MIN_ROWS = 8
# Without AMX (AVX512-BF16 only: AMD Zen 4, Cooper Lake) the split bf16 dot is compute-bound: a large
# weight at a few rows reads faster through the host kernel (AMD EPYC, one process, three-part split / host: 7B
# up-projection [11008, 4096] 1.49x at 4 rows, 1.07x at 8, 1.01x at 16; [4096, 4096] 1.21x at 4, 1.08x at 8;
# two-part split / host, 15 alternating calls: 2.1x at 4 rows, 1.28x at 8, 0.79x at 16), while small weights
# keep the bf16 dot (bundled [1536, 384] 0.72x at 4 rows). BENCHMARKS.md, "Serving". Since the host mat-vec widens
# each element once for four tokens (ops.host_elements._dot4x4), the kernel alone beats the split dot up to 48 rows
# (9 alternating calls: [11008, 4096] 2.45x at 4 rows, 2.10x at 8, 1.53x at 16, 1.25x at 48), but moving `linear`'s
# limit to 48 made the 7B-shaped engine's decode steps that carry a prompt chunk (20-36 rows) slower (4 clients:
# inter-token p99 574 / 696 ms against 486 / 452, two alternating process pairs), so the limit stays at 8.
NO_AMX_HOST_MAX_ROWS = 8
NO_AMX_HOST_MIN_BYTES = 8 << 20


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset:
    """The CPU feature flags of /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


def _forced_bf16_dot() -> str:
    """POWERINFER_BF16_DOT=xla|host, or "" (detect from the CPU's flags)."""
    forced = os.environ.get("POWERINFER_BF16_DOT", "").strip().lower()
    return forced if forced in ("xla", "host") else ""


BF16_SPLIT_PARTS = 2  # bf16 parts of each f32 activation in `_bf16_split_dot` (POWERINFER_BF16_SPLIT_PARTS overrides)
# bf16 parts of a prompt token's activation (the rows from `prompt_from` on; POWERINFER_PROMPT_BF16_PARTS, or
# `--prompt_activations=bfloat16` of the bin/ programs, overrides). None: as many as the decode rows
# (BF16_SPLIT_PARTS). One part rounds a prompt's activations to bf16 where they meet a bf16 weight, as GPU engines
# compute bf16 checkpoints: prompt chunks of the 7B shape 1.4-1.5x faster, prompt logits within ~1e-3 of f32
# instead of ~1e-5 (rounding also magnifies the batched/alone summation-order differences to ~1e-4). Opt-in.
PROMPT_BF16_PARTS: int | None = None


def _parts_from_env(name: str) -> int | None:
    """A bf16 part count (1-3) from environment variable `name`, or None where it is unset or empty."""
    forced = os.environ.get(name, "").strip()
    if not forced:
        return None
    if forced not in ("1", "2", "3"):
        raise ValueError(f"{name}={forced!r}: expected 1, 2 or 3")
    return int(forced)


def bf16_split_parts() -> int:
    """How many bf16 parts `_bf16_split_dot` splits f32 activations into: POWERINFER_BF16_SPLIT_PARTS (1-3),
    else BF16_SPLIT_PARTS. Read when a function is traced: set it before the first call."""
    return _parts_from_env("POWERINFER_BF16_SPLIT_PARTS") or BF16_SPLIT_PARTS


# An engine's own setting (Engine(prompt_activations=...)), entered while its programs are traced: 1 part,
# 0 (as many as the decode rows), or None (the process setting below).
_ENGINE_PROMPT_PARTS: contextvars.ContextVar[int | None] = contextvars.ContextVar("prompt_parts", default=None)


@contextlib.contextmanager
def prompt_parts_scope(parts: int | None):
    """Within it, `prompt_bf16_parts()` returns `parts` (0: the decode rows' `bf16_split_parts()`; None: the
    process setting). Engines enter it inside their jitted bodies, so each engine's programs trace with its own."""
    token = _ENGINE_PROMPT_PARTS.set(parts)
    try:
        yield
    finally:
        _ENGINE_PROMPT_PARTS.reset(token)


def prompt_bf16_parts() -> int:
    """How many bf16 parts a prompt token's f32 activation is split into where it meets a bf16 weight in
    XLA's bf16 dot: the tracing engine's setting (`prompt_parts_scope`), else POWERINFER_PROMPT_BF16_PARTS (1-3),
    else PROMPT_BF16_PARTS, else the decode rows' `bf16_split_parts()`. Read when a function is traced."""
    scoped = _ENGINE_PROMPT_PARTS.get()
    if scoped is not None:
        return scoped or bf16_split_parts()
    return _parts_from_env("POWERINFER_PROMPT_BF16_PARTS") or PROMPT_BF16_PARTS or bf16_split_parts()


def cpu_has_bf16_dot() -> bool:
    """Whether this CPU multiplies bf16 natively (amx_bf16 or avx512_bf16 in /proc/cpuinfo); the
    environment variable POWERINFER_BF16_DOT=xla|host overrides the detection."""
    if _forced_bf16_dot():
        return _forced_bf16_dot() == "xla"
    return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles for bf16 (amx_bf16); POWERINFER_BF16_DOT=xla counts as AMX (XLA's
    dot at every row count from NATIVE_BF16_MIN_ROWS)."""
    return _forced_bf16_dot() == "xla" or "amx_bf16" in _cpu_flags()


def native_bf16_dot(w, n_rows: int, transposed: bool = False) -> bool:
    """Whether `n_rows` activation rows against the bfloat16 Weight `w` (in `linear_t`'s product with
    `transposed`) go through XLA's own bf16 dot on the CPU backend (`_bf16_split_dot`) instead of
    the host kernels."""
    least = NATIVE_BF16_T_MIN_ROWS if transposed else NATIVE_BF16_MIN_ROWS
    native = (USE_HOST_KERNELS and isinstance(w, Weight) and w.fmt == "bfloat16" and n_rows >= least
              and jax.default_backend() == "cpu" and cpu_has_bf16_dot())
    if native and n_rows <= NO_AMX_HOST_MAX_ROWS and not cpu_has_amx():
        return w.data.nbytes < NO_AMX_HOST_MIN_BYTES  # a large weight at a few rows: the host kernel
    return native


def uses_host_kernel(w, n_rows: int | None = None) -> bool:
    """Whether `w` is read by the numba host kernels here (a half/int Weight on the CPU backend; for
    `n_rows` activation rows, not a bf16 weight that XLA's own bf16 dot takes, see `native_bf16_dot`)."""
    if n_rows is not None and native_bf16_dot(w, n_rows):
        return False
    return (USE_HOST_KERNELS and isinstance(w, Weight) and w.fmt != "float32" and _buffer_callback is not None
            and jax.default_backend() == "cpu")


def _bf16_split_dot(x2: jax.Array, w: Weight, transposed: bool = False, parts: int | None = None,
                    prompt_from: int | None = None) -> jax.Array:
    """x2 [N, K] (f32) @ w.T (`transposed`: x2 [N, R] @ w) for a bfloat16 Weight through XLA's bf16 dot
    with f32 accumulation, the f32 activations split into `parts` bf16 parts (default `bf16_split_parts()`),
    each part's product with a bf16 weight exact in f32. The parts are one [rows, K] dot: the weight
    is read once. Three parts hold all 24 bits of an f32 activation (x = a + b + c exactly for normal
    values): the f32 product up to summation order; two parts hold 16 bits (~2e-6 relative, f32 GEMM's
    own rounding is ~5e-7), at two thirds of the arithmetic. Rows from `prompt_from` on (prompt tokens)
    get only `prompt_bf16_parts()` of them (at most `parts`)."""
    parts = parts or bf16_split_parts()
    n = x2.shape[0]
    # rows_in[k]: how many leading rows part k covers (every row, or only the decode rows before `prompt_from`)
    prompt_parts = parts if prompt_from is None else min(parts, prompt_bf16_parts())
    rows_in = [n if k < prompt_parts else min(prompt_from, n) for k in range(parts)]
    rows_in = [m for m in rows_in if m > 0]
    pieces, rest = [], x2
    for m in rows_in:
        piece = rest[:m].astype(jnp.bfloat16)
        pieces.append(piece)
        rest = rest[:m] - piece.astype(f32)
    y = jax.lax.dot_general(jnp.concatenate(pieces), float_data_jnp(w), (((1,), (0 if transposed else 1,)), ((), ())),
                            preferred_element_type=f32)
    out, at = y[:n], n
    for m in rows_in[1:]:
        part = y[at:at + m]
        out = out + part if m == n else jnp.concatenate([out[:m] + part, out[m:]])
        at += m
    return out


def _dense(w) -> jax.Array:
    """A plain array or a float32 Weight's data as f32; other Weights dequantized (XLA path)."""
    if isinstance(w, Weight):
        return w.data if w.fmt == "float32" else dequantize_jnp(w)
    return jnp.asarray(w).astype(f32)


def _rows_dot(x2: jax.Array, w: jax.Array) -> jax.Array:
    # One token: `w @ x`, not `x @ w.T` (XLA:CPU materialises the transpose for the latter:
    # 180 ms vs 9.5 ms on a 7B up-projection; ops.reference.rows_dot).
    if x2.shape[0] == 1:
        return (w @ x2[0])[None]
    return x2 @ w.T


def _host_weight(w: Weight, data, scale) -> Weight:
    """The operand buffers of a callback as a numpy-backed Weight of the same format."""
    return Weight(np.asarray(data), None if scale is None else np.asarray(scale), w.fmt, w.cols, w.act)


def _callback(kernel, w: Weight, x2: jax.Array, out_cols: int) -> jax.Array:
    """Runs ``kernel(host_weight, x [N, ·], out [N, out_cols])`` on the host, zero-copy."""
    operands = (x2, w.data) + (() if w.scale is None else (w.scale,))

    def cb(ctx, out, xb, data, *scale):
        del ctx
        kernel(_host_weight(w, data, scale[0] if scale else None), np.asarray(xb), np.asarray(out))

    shape = jax.ShapeDtypeStruct((x2.shape[0], out_cols), f32)
    return _buffer_callback(cb, shape)(*operands)


def _host_linear(hw: Weight, x: np.ndarray, out: np.ndarray) -> None:
    from ops.host_kernels import host_matvec

    host_matvec(hw, x, out=out)


def _host_linear_t(hw: Weight, h: np.ndarray, out: np.ndarray, skip_zero: bool = False) -> None:
    from ops.host_kernels import blas_min_tokens, host_axpy_down, host_matmul_t_blocked

    rows = hw.data.shape[0]
    if h.shape[0] < blas_min_tokens(hw.fmt, "axpy"):
        host_axpy_down(hw, _all_rows(rows), rows, h, out=out, skip_zero_rows=skip_zero)
    else:  # prompts: f32 blocks through BLAS, never the whole matrix
        host_matmul_t_blocked(hw, h, out=out)


@functools.lru_cache(maxsize=16)
def _all_rows(n: int) -> np.ndarray:
    a = np.arange(n, dtype=np.int32)
    a.flags.writeable = False
    return a


def slice_rows(w: Weight, r0: int, r1: int) -> Weight:
    """Rows r0:r1 of a Weight (views: per-row scales slice with their rows)."""
    return Weight(w.data[r0:r1], None if w.scale is None else w.scale[r0:r1], w.fmt, w.cols, w.act)


def linear(x: jax.Array, w, b: jax.Array | None = None, exact: bool = False,
           prompt_from: int | None = None) -> jax.Array:
    """x [..., K] @ w.T (+ b) in float32; ``w [R, K]`` a float array or a ``Weight``. `exact`: the f32
    product up to summation order on every path (a bf16 split dot in three parts), for outputs that a
    threshold decides on (CATS gates), where 2e-6 can flip a decision. `prompt_from`: the rows of x (flattened)
    from there on are prompt tokens, which XLA's bf16 dot may take in fewer parts (`prompt_bf16_parts`)."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K).astype(f32)
    if native_bf16_dot(w, x2.shape[0]):
        y = _bf16_split_dot(x2, w, parts=3 if exact else None, prompt_from=None if exact else prompt_from)
    elif uses_host_kernel(w):
        y = _callback(_host_linear, w, x2, w.rows)
    else:
        y = _rows_dot(x2, _dense(w))
    y = y.reshape(lead + (y.shape[-1],))
    return y if b is None else y + b.astype(f32)


def linear_t(h: jax.Array, w, skip_zero: bool = False, exact: bool = False,
             prompt_from: int | None = None) -> jax.Array:
    """h [..., R] @ w in float32 (``w [R, K]``: the transposed down projection's axpy form). With
    `skip_zero`, the host kernel never reads the rows of w whose h entry is zero for every token
    (input sparsity: TEAL's attention projections); `exact` and `prompt_from` as in `linear`."""
    lead, R = h.shape[:-1], h.shape[-1]
    h2 = h.reshape(-1, R).astype(f32)
    if native_bf16_dot(w, h2.shape[0], transposed=True):
        y = _bf16_split_dot(h2, w, transposed=True, parts=3 if exact else None,
                            prompt_from=None if exact else prompt_from)
    elif uses_host_kernel(w):
        kernel = functools.partial(_host_linear_t, skip_zero=True) if skip_zero else _host_linear_t
        y = _callback(kernel, w, h2, w.cols)
    else:
        y = h2 @ _dense(w)  # `h @ rows`, not `rows.T @ h` (3 ms vs 20 ms on XLA:CPU)
    return y.reshape(lead + (y.shape[-1],))


def linear_relu_linear(x: jax.Array, w1, w2) -> jax.Array:
    """relu(x @ w1.T) @ w2.T in float32 (the predictors' fc2(relu(fc1 x))). When the host kernels
    read both weights, one callback runs both mat-vecs: a small model's decode step is dominated
    by per-call overheads (~50 us a callback on 2 cores), not by the predictor's bytes."""
    lead, K = x.shape[:-1], x.shape[-1]
    n_rows = x.size // K
    if not (uses_host_kernel(w1, n_rows) and uses_host_kernel(w2, n_rows)):
        return linear(jax.nn.relu(linear(x, w1)), w2)
    x2 = x.reshape(-1, K).astype(f32)
    operands = (x2, w1.data) + (() if w1.scale is None else (w1.scale,)) + (w2.data,) + \
        (() if w2.scale is None else (w2.scale,))

    def cb(ctx, out, xb, *bufs):
        del ctx
        bufs = list(bufs)
        h1 = _host_weight(w1, bufs.pop(0), bufs.pop(0) if w1.scale is not None else None)
        h2 = _host_weight(w2, bufs.pop(0), bufs.pop(0) if w2.scale is not None else None)
        host_relu_linear2(np.asarray(xb), h1, h2, out=np.asarray(out))

    y = _buffer_callback(cb, jax.ShapeDtypeStruct((x2.shape[0], w2.rows), f32))(*operands)
    return y.reshape(lead + (w2.rows,))


def host_relu_linear2(x: np.ndarray, w1: Weight, w2: Weight, out: np.ndarray | None = None) -> np.ndarray:
    """On the host (numpy-backed Weights, numba kernels): relu(x @ w1.T) @ w2.T, x [B, K] -> [B, w2 rows]."""
    from ops.host_kernels import host_matvec

    mid = host_matvec(w1, x)
    np.maximum(mid, 0.0, out=mid)
    return host_matvec(w2, mid, out=out)


def linear_relu_linear_ref(x, w1, w2) -> np.ndarray:
    """numpy reference of ``linear_relu_linear``."""
    return linear_ref(np.maximum(linear_ref(x, w1), 0.0), w2)


def take_rows(w, ids: jax.Array) -> jax.Array:
    """Rows ``w[ids]`` as float32 (embedding lookups), for any storage."""
    flat = ids.reshape(-1)
    if isinstance(w, Weight):
        rows = dequantize_rows_jnp(w, flat)
    else:
        rows = jnp.asarray(w)[flat].astype(f32)
    return rows.reshape(ids.shape + (rows.shape[-1],))


def linear_ref(x, w, b=None) -> np.ndarray:
    """numpy reference of ``linear``: dequantize, then float32 math."""
    dense = dequantize(w) if isinstance(w, Weight) else np.asarray(w, np.float32)
    y = np.asarray(x, np.float32) @ dense.T
    return y if b is None else y + np.asarray(b, np.float32)


def linear_t_ref(h, w) -> np.ndarray:
    """numpy reference of ``linear_t``."""
    dense = dequantize(w) if isinstance(w, Weight) else np.asarray(w, np.float32)
    return np.asarray(h, np.float32) @ dense

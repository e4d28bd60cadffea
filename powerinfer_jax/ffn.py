"""The dense FFN of every supported family (the sparse variants live in `sparse_ffn.py`).

All weights are neuron-major (`[n_ff, d]`, down projection transposed), so the dense
form here and the sparse form, which gathers the rows of active neurons, read alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ops.host_kernels import blas_min_tokens, kernel_format
from ops.linear import linear, linear_t, native_bf16_dot, uses_host_kernel
from powerinfer_jax.config import SPARSE_FFN_KINDS, THRESHOLD_FFN_KINDS
from powerinfer_jax.params import FFNParams

f32 = jnp.float32


def _rows_dot(x: jax.Array, w, exact: bool = False, prompt_from: int | None = None) -> jax.Array:
    """x [..., d] against neuron rows w [n, d] -> [..., n] (any storage format; `exact`, `prompt_from`: see
    `linear`)."""
    return linear(x, w, exact=exact, prompt_from=prompt_from)


def ffn_activation(p: FFNParams, kind: str, x: jax.Array,
                   prompt_from: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Returns (h, a): the down projection's input h [..., n_ff] and the ReLU output a whose
    zeros define sparsity (relu(gate x) for ReGLU/dReLU, relu(fc1 x + b) for OPT).

    For SwiGLU/GeGLU `a` is silu/gelu(gate x), never exactly zero: their sparsity is
    |a| above a per-layer threshold. `prompt_from`: the rows of x (flattened) from there on are prompt
    tokens (`ops.linear.linear`).
    """
    if kind == "relu":
        a = jax.nn.relu(_rows_dot(x, p.w_up, prompt_from=prompt_from) + p.b_up.astype(f32))
        return a, a
    exact = kind in THRESHOLD_FFN_KINDS  # see `ffn_output`
    gate = _rows_dot(x, p.w_gate, exact, prompt_from)
    up = _rows_dot(x, p.w_up, exact, prompt_from)
    if kind == "reglu":
        a = jax.nn.relu(gate)
        return a * up, a
    if kind == "drelu":
        a = jax.nn.relu(gate)
        return a * jax.nn.relu(up), a
    if kind == "swiglu":
        a = jax.nn.silu(gate)
        return a * up, a
    if kind == "geglu":
        a = jax.nn.gelu(gate, approximate=True)  # Gemma's gelu_pytorch_tanh
        return a * up, a
    raise ValueError(f"unknown FFN kind {kind!r}")


def ffn_output(p: FFNParams, h: jax.Array, exact: bool = False, prompt_from: int | None = None) -> jax.Array:
    """Down projection: sum_i h_i * w_down_t[i] (+ bias). `exact` (`ops.linear.linear`): for activation-
    threshold models (SwiGLU/GeGLU), whose later layers decide |a| > threshold, a discontinuous test that
    batched and alone runs must decide alike, so every projection feeding it is exact. `prompt_from`: see
    `ffn_activation`."""
    y = linear_t(h, p.w_down_t, exact=exact, prompt_from=prompt_from)
    return y if p.b_down is None else y + p.b_down.astype(f32)


def dense_ffn(p: FFNParams, kind: str, x: jax.Array, prompt_from: int | None = None) -> jax.Array:
    """Dense FFN: every neuron computed (`prompt_from`: see `ffn_activation`)."""
    n_rows = x.size // x.shape[-1]
    if (kind in SPARSE_FFN_KINDS and uses_host_kernel(p.w_up, n_rows) and uses_host_kernel(p.w_down_t)
            and not native_bf16_dot(p.w_down_t, n_rows, transposed=True)
            and n_rows < blas_min_tokens(kernel_format(p.w_up))):
        # Decode on the CPU backend: the whole FFN in one host call (gate and up rows read in one pass, the
        # down rows of each chunk of neurons right after them): one callback and one thread wake, not two.
        from ops.cpu_sparse import dense_ffn_rows

        y = dense_ffn_rows(kind, p.w_gate, p.w_up, p.w_down_t, p.b_up, x.reshape(-1, x.shape[-1]))
        y = y.reshape(x.shape[:-1] + (y.shape[-1],))
        return y if p.b_down is None else y + p.b_down.astype(f32)
    h, _ = ffn_activation(p, kind, x, prompt_from)
    return ffn_output(p, h, kind in THRESHOLD_FFN_KINDS, prompt_from)


def thresholded_dense_ffn(p: FFNParams, kind: str, x: jax.Array, act_threshold: float) -> jax.Array:
    """Dense FFN with every activation at or below `act_threshold` in magnitude zeroed: the model that
    threshold sparsity (SwiGLU/GeGLU) defines, and the reference its sparse modes are checked against."""
    h, a = ffn_activation(p, kind, x)
    return ffn_output(p, jnp.where(jnp.abs(a) > act_threshold, h, 0.0), kind in THRESHOLD_FFN_KINDS)


def thresholded_ffn_fn(cfg, act_thresholds):
    """A `forward` FFN hook running `thresholded_dense_ffn` with layer i's threshold."""
    def ffn_fn(i, p, x_norm, x_resid, rows=None):
        del x_resid, rows
        return thresholded_dense_ffn(p, cfg.ffn_kind, x_norm, float(act_thresholds[i])), {}

    return ffn_fn

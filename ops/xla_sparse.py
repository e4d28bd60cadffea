"""Sparse FFN as plain XLA ops (gather + dot): the path for the CPU backend.

Measured on a 2-core CPU (FIELD-NOTES section 2):
  * rows are gathered with ``mode='promise_in_bounds'`` (no clamping/fill code); ``idx`` must
    hold valid row numbers everywhere, padding included (``ops.select`` pads with row 0);
  * gathered rows are cast to float32 *after* the gather: XLA:CPU bf16 dots are 7-10x slower;
  * the down projection is ``h @ rows(w_down_t)``, not ``rows.T @ h`` (3 ms vs 20 ms), and
    for one token gate/up are ``rows @ x``, not ``x @ rows.T`` (5 ms vs 37 ms: XLA:CPU
    materialises the transpose; see ``reference.rows_dot``);
  * unchunked, the gathers need [C, d] temporaries, which XLA:CPU allocates as one block per
    call (52 MB for LLaMA-7B at C=1101). That is above glibc's largest mmap threshold (32 MiB;
    MALLOC_MMAP_THRESHOLD_ cannot raise it further), so it is mmapped and page-faulted on
    every call (13k faults, ~3x slower) whatever the MALLOC_* settings. ``sparse_ffn_xla``
    therefore scans over chunks of 256 rows on CPU: temporaries stay ~12 MB, the gathered rows
    stay in cache for their dot, and all-padding chunks are skipped
    (LLaMA-7B layer, 1101 active: 25-39 -> ~10 ms at C=1101, 40-57 -> ~9 ms at C=2048;
    medians on a contended 2-core CPU).
Padded entries inside a chunk that has valid ones still cost bandwidth (shapes are static);
they are zeroed via ``valid``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ops.quant import Weight, dequantize_rows_jnp
from ops.reference import activation, check_family, rows_dot


def gather_rows(w, idx):
    """Rows ``w[idx]`` as float32 ([C, d], or [C] for a vector); idx must be in bounds. A
    ``Weight`` is gathered in its stored format and dequantized after the gather."""
    if isinstance(w, Weight):
        return dequantize_rows_jnp(w, idx)
    return jnp.asarray(w).at[idx].get(mode="promise_in_bounds").astype(jnp.float32)


def gather_matvec_xla(w, idx, valid, x):
    """``w[idx] @ x`` zeroed where not valid: [C] or [B, C]."""
    return jnp.where(valid, rows_dot(gather_rows(w, idx), jnp.asarray(x, jnp.float32)), 0.0)


def axpy_down_xla(w_down_t, idx, valid, h):
    """y = sum_i valid_i * h_i * w_down_t[idx_i] as ``h @ rows``: [d] or [B, d]."""
    h = jnp.where(valid, jnp.asarray(h, jnp.float32), 0.0)
    return h @ gather_rows(w_down_t, idx)


def sparse_h_xla(family, w_gate, w_up, x, idx, valid, b_up=None):
    """Activations of neurons idx (zero where not valid): [C] or [B, C]."""
    check_family(family, w_gate)
    x = jnp.asarray(x, jnp.float32)
    u = rows_dot(gather_rows(w_up, idx), x)
    g = None if w_gate is None else rows_dot(gather_rows(w_gate, idx), x)
    bu = None if b_up is None else gather_rows(b_up, idx)
    return jnp.where(valid, activation(family, g, u, bu), 0.0)


def _ffn_block(family, w_gate, w_up, w_down_t, x, idx, valid, b_up):
    h = sparse_h_xla(family, w_gate, w_up, x, idx, valid, b_up)
    return h @ gather_rows(w_down_t, idx)


def sparse_ffn_xla(family, w_gate, w_up, w_down_t, x, idx, valid, b_up=None, *, chunk=None):
    """Sparse FFN over neurons idx[valid] with XLA gather + dot (no down bias): [d] or [B, d].

    ``chunk`` > 0 processes the index list ``chunk`` rows at a time in a ``lax.scan`` (chunks
    with no valid entry are skipped); None means 256 on the CPU backend and unchunked
    elsewhere (on GPU one wide gather keeps the device busy).
    """
    if chunk is None:
        chunk = 256 if jax.default_backend() == "cpu" else 0
    cap = idx.shape[0]
    if not chunk or cap <= chunk:
        return _ffn_block(family, w_gate, w_up, w_down_t, x, idx, valid, b_up)
    n_chunks = -(-cap // chunk)
    pad = n_chunks * chunk - cap  # padded entries: row 0, invalid
    idx_c = jnp.pad(idx, (0, pad)).reshape(n_chunks, chunk)
    valid_c = jnp.pad(valid, (0, pad)).reshape(n_chunks, chunk)
    x = jnp.asarray(x, jnp.float32)

    def step(y, iv):
        i, v = iv
        y = lax.cond(jnp.any(v),
                     lambda y: y + _ffn_block(family, w_gate, w_up, w_down_t, x, i, v, b_up),
                     lambda y: y, y)
        return y, None

    y, _ = lax.scan(step, jnp.zeros(x.shape[:-1] + (w_down_t.shape[1],), jnp.float32),
                    (idx_c, valid_c))
    return y

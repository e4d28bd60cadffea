"""Roofline for decode: weight bytes touched per token, and the machine's measured read bandwidth.

Decoding one token at batch 1 reads every weight it uses once, so its time cannot be below
(bytes touched) / (memory bandwidth). Bytes are counted from shapes and the engine's measured
per-token counts of computed FFN neurons; bandwidth is measured here, on this machine, by two
streaming reads of a large array (a numba parallel sum on the host, a jitted XLA sum on the JAX
device) and the larger of what each memory showed is used.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numba
import numpy as np

from powerinfer_jax import memory
from powerinfer_jax.config import ModelConfig


@numba.njit(parallel=True, fastmath=True)  # fastmath: vectorised sums, not a latency chain
def _row_dots(a, x):
    out = np.zeros(a.shape[0], np.float32)
    for r in numba.prange(a.shape[0]):
        s = np.float32(0.0)
        for c in range(a.shape[1]):
            s += a[r, c] * x[c]
        out[r] = s
    return out


def host_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 7) -> float:
    """Best-of-`repeats` host read bandwidth in bytes/s (numba parallel row dots over `nbytes`,
    the access pattern of the host FFN kernels)."""
    a = np.ones((nbytes // 4 // 4096, 4096), np.float32)
    x = np.ones(4096, np.float32)
    _row_dots(a[:8], x)  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _row_dots(a, x)
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best


def device_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 7) -> float:
    """Best-of-`repeats` JAX-device read bandwidth in bytes/s (jitted sum over `nbytes`)."""
    a = jnp.ones((nbytes // 4 // 4096, 4096), jnp.float32)
    v = jnp.ones((a.shape[0],), jnp.float32)
    f = jax.jit(lambda v, x: v @ x)  # a mat-vec, the decode step's own access pattern: every byte once
    f(v, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(v, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return a.size * 4 / best


def predictor_bytes(shapes, fmt: str) -> int:
    """Bytes the engine reads per token for predictors of (d, rank, n_ff) shapes stored in `fmt`
    (the engine stores them like the weights: `sparse_ffn.predictor_format`)."""
    from powerinfer_jax.sparse_ffn import predictor_format

    pf = predictor_format(fmt)
    return int(sum(memory.matrix_bytes(pf, r, d) + memory.matrix_bytes(pf, n, r) for d, r, n in shapes))


def decode_bytes(cfg: ModelConfig, dtype: str, *, ffn_neurons_per_token: float, predictor_bytes: int = 0,
                 attend_len: int = 0, ffn_index: bool = False, table_dtype: str | None = None,
                 kv_dtype: str = "float32") -> int:
    """Bytes read per decode token: attention, norms, head, one embedding row, KV cache over
    `attend_len` slots, predictors, and `ffn_neurons_per_token` FFN neurons (all layers together).
    `dtype`: the matrices' format (float, int8, int4); `table_dtype`: the embedding table's."""
    groups = dict(memory.fixed_groups(cfg, dtype, 0, max_context=attend_len, table_dtype=table_dtype,
                                      kv_dtype=kv_dtype))
    embed_row = memory.matrix_bytes(table_dtype or (dtype if dtype in memory.DTYPE_BYTES else "float32"), 1,
                                    cfg.word_embed_proj_dim or cfg.hidden_size)
    head = groups["output_head"] if not cfg.tie_word_embeddings else groups["embeddings"]
    total = groups["attention"] + groups["norms"] + head + embed_row + groups["kv_cache"] + predictor_bytes
    if ffn_index:  # sparse paths read each layer's int32 hot/cold id maps
        total += groups["ffn_index"]
    return int(total + ffn_neurons_per_token * memory.neuron_bytes(cfg, dtype))

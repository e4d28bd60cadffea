"""The decoder forward pass for every supported family, as one pure function.

LLaMA family: pre-RMSNorm blocks, rotary positions, gated FFN (Qwen2: q/k/v biases; Gemma:
embeddings scaled by sqrt(d), RMSNorm by (1 + w), GeGLU).
OPT: LayerNorm blocks (pre- or post-LN), learned positions offset by 2, biases, ReLU FFN,
optional project_in/project_out around the decoder (OPT-350m).
The FFN is a parameter (`ffn_fn`) so the hybrid sparse engine swaps only that block.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ops.linear import linear, take_rows
from ops.quant import Weight
from powerinfer_jax import layers
from powerinfer_jax.config import ModelConfig
from powerinfer_jax.ffn import dense_ffn, ffn_activation, ffn_output
from powerinfer_jax.params import FFNParams, ModelParams

f32 = jnp.float32
OPT_POSITION_OFFSET = 2  # OPT's learned position table starts at index 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer key/value caches, each [batch, n_kv_heads, max_len, head_dim]: float32, or a half precision
    stored as its bit patterns (`KV_STORAGE`); attention widens what it reads to float32 (`layers.kv_read`)."""

    k: list[jax.Array]
    v: list[jax.Array]

    @property
    def max_len(self) -> int:
        """Number of preallocated positions."""
        return self.k[0].shape[2]


KV_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
KV_STORAGE = layers.KV_STORAGE  # how each of them is stored (half precisions as their bit patterns)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=f32) -> KVCache:
    """A zeroed KV cache for `batch` sequences of up to `max_len` tokens (`dtype`: a jnp dtype or a
    name in KV_DTYPES; stored as KV_STORAGE says)."""
    dtype = KV_STORAGE[dtype if isinstance(dtype, str) else jnp.dtype(dtype).name]
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    return KVCache(
        k=[jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
        v=[jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
    )


# ffn_fn(layer_index, ffn_params, normed_input, residual_before_norm, rows) -> (output [B, T, d], aux)
# `rows` is forward's `rows` (None, or [B] bool: the rows holding a sequence); `aux` is a (possibly
# empty) dict of per-layer statistics, returned in extras["ffn_aux"].
FFNFn = Callable[[int, FFNParams, jax.Array, jax.Array, jax.Array | None], tuple[jax.Array, dict]]


def embed_normalizer(cfg: ModelConfig, table) -> float:
    """Gemma's embedding multiplier sqrt(hidden_size), as transformers computes it: a float32 scalar
    cast to the embedding table's dtype (bf16 turns sqrt(3072) = 55.43 into 55.5), then widened."""
    fmt = table.fmt if isinstance(table, Weight) else np.dtype(table.dtype).name
    dtype = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}.get(fmt, np.float32)
    return float(np.float32(cfg.hidden_size ** 0.5).astype(dtype).astype(np.float32))


def embed(params: ModelParams, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """Token (and, for OPT, learned position) embeddings -> [B, T, d] float32 (Gemma: scaled)."""
    x = take_rows(params.embed, tokens)
    if cfg.embed_scale:
        x = x * jnp.float32(embed_normalizer(cfg, params.embed))
    if params.project_in is not None:
        x = linear(x, params.project_in)
    if params.pos_embed is not None:
        x = x + take_rows(params.pos_embed, positions + OPT_POSITION_OFFSET)
    return x


def lm_head(params: ModelParams, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """Final norm, optional project_out, and the (possibly tied) output projection."""
    if params.final_norm is not None:
        x = layers.norm(x, params.final_norm, cfg)
    if params.project_out is not None:
        x = linear(x, params.project_out)
    return linear(x, params.embed if params.lm_head is None else params.lm_head)


def forward(
    params: ModelParams,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache | None = None,
    attend_len: int = 0,
    ffn_fn: FFNFn | None = None,
    logits_at: jax.Array | None = None,
    collect: bool = False,
    rows: jax.Array | None = None,
) -> tuple[jax.Array, KVCache | None, dict]:
    """Runs the decoder on tokens [B, T] at positions [B, T].

    With a cache, keys/values are written at `positions` and attention spans the first
    `attend_len` slots; without one, the sequence attends within itself (training).
    `logits_at` [B] picks one position per row for the head (prefill needs only the last).
    `collect=True` also returns, per layer, the FFN input before its norm (`ffn_in`, the
    predictor's input) and the ReLU activation (`ffn_act`), for profiling and training, and the
    attention projections' inputs (`attn_in`: q/k/v's, `attn_o_in`: o's), for TEAL's thresholds.
    `rows` [B] bool marks the rows that hold a sequence (continuous batching pads the batch to a
    static size); a sparse FFN leaves the others out of the batch's union of active neurons.
    """
    if not collect:
        group = RowGroup(tokens, positions, cache, rows=rows, logits_at=logits_at)
        logits, new_cache, ffn_aux = forward_groups(params, cfg, [group], attend_len, ffn_fn)[0]
        return logits, new_cache, {"ffn_aux": ffn_aux}
    # Profiling and training: the dense model, each layer's inputs and activations kept.
    x = embed(params, cfg, tokens, positions)
    new_k, new_v, ffn_in, ffn_act, attn_in, attn_o_in = [], [], [], [], [], []
    pre = cfg.pre_layer_norm
    for i, lp in enumerate(params.layers):
        h_in = layers.norm(x, lp.attn_norm, cfg) if pre else x
        a, kc, vc = layers.attention(h_in, lp.attn, cfg, positions, None if cache is None else cache.k[i],
                                     None if cache is None else cache.v[i], attend_len, sink=attn_o_in)
        attn_in.append(h_in)
        new_k.append(kc)
        new_v.append(vc)
        x = x + a if pre else layers.norm(x + a, lp.attn_norm, cfg)
        f_in = layers.norm(x, lp.ffn_norm, cfg) if pre else x
        h, act = ffn_activation(lp.ffn, cfg.ffn_kind, f_in)
        ffn_in.append(x)
        ffn_act.append(act)
        y = ffn_output(lp.ffn, h, cfg.needs_act_threshold)
        x = x + y if pre else layers.norm(x + y, lp.ffn_norm, cfg)
    if logits_at is not None:
        x = x[jnp.arange(x.shape[0]), logits_at][:, None, :]
    logits = lm_head(params, cfg, x)
    new_cache = None if cache is None else KVCache(k=new_k, v=new_v)
    return logits, new_cache, {"ffn_in": ffn_in, "ffn_act": ffn_act, "attn_in": attn_in, "attn_o_in": attn_o_in}


@dataclasses.dataclass(frozen=True)
class RowGroup:
    """One group of rows for `forward_groups`: tokens and positions [B, T] over its own `cache` (None: the
    rows attend within themselves); `rows` [B] marks the rows holding a sequence (as `forward`'s),
    `logits_at` [B] picks one position a row. `cache_rows` [1, T]: a packed group (one row of tokens from
    several prompts), token t writing and attending row cache_rows[0, t] of `cache`; `row_set` [R] lists the
    rows its prompts own (default: every row of `cache`), and its `logits_at` [R] picks one position per prompt
    (row_set[r]'s), giving logits [R, 1, vocab]. `shares_cache`: the group writes and reads the previous
    group's cache (its own `cache` is None), after that group (continuous batching prefills a prompt straight
    into the batch row it will decode in)."""

    tokens: jax.Array
    positions: jax.Array
    cache: KVCache | None
    rows: jax.Array | None = None
    logits_at: jax.Array | None = None
    cache_rows: jax.Array | None = None
    row_set: jax.Array | None = None
    shares_cache: bool = False


def forward_groups(params: ModelParams, cfg: ModelConfig, groups: list[RowGroup], attend_len: int,
                   ffn_fn: FFNFn | None = None) -> list[tuple[jax.Array, KVCache, list]]:
    """`forward` over several groups of rows at once (continuous batching: the running sequences' decode
    rows and a new prompt's chunk), each over its own cache and attending its first `attend_len` slots.
    Every projection (q/k/v, o, the dense FFN, lm_head) runs over all the groups' rows together, so each
    weight is read once for all of them; attention, and a sparse `ffn_fn` (which chooses its neurons for
    the rows it gets: a prompt's all, a decode batch's union), run per group, unless the hook's runtime
    has `ffn_groups` (`sparse_ffn.HybridRuntime`), which sees every group at once.
    Returns (logits, new cache, per-layer ffn aux) per group (`forward` is the one-group case)."""
    xs = [embed(params, cfg, g.tokens, g.positions) for g in groups]
    n_layers = len(params.layers)
    owners: list[int] = []  # the group whose cache each group reads and writes
    for j, g in enumerate(groups):
        owners.append(owners[j - 1] if g.shares_cache and j > 0 else j)
    ks = [[None] * n_layers if g.cache is None else list(g.cache.k) for g in groups]
    vs = [[None] * n_layers if g.cache is None else list(g.cache.v) for g in groups]
    aux: list[list] = [[] for _ in groups]
    # A hook bound to a runtime with `ffn_groups` (sparse_ffn.HybridRuntime) may run all groups at once.
    groups_fn = getattr(getattr(ffn_fn, "__self__", None), "ffn_groups", None)
    pre = cfg.pre_layer_norm
    for i, lp in enumerate(params.layers):
        h_in = [layers.norm(x, lp.attn_norm, cfg) if pre else x for x in xs]
        outs, kv = layers.attention_groups(h_in, lp.attn, cfg, [g.positions for g in groups],
                                           [(ks[o][i], vs[o][i]) for o in owners], attend_len,
                                           [g.cache_rows for g in groups], owners, [g.row_set for g in groups])
        for o, (kc, vc) in zip(owners, kv):
            ks[o][i], vs[o][i] = kc, vc
        xs = [x + a if pre else layers.norm(x + a, lp.attn_norm, cfg) for x, a in zip(xs, outs)]
        f_in = [layers.norm(x, lp.ffn_norm, cfg) if pre else x for x in xs]
        if ffn_fn is None:
            ys = layers.split_rows(dense_ffn(lp.ffn, cfg.ffn_kind, layers.concat_rows(f_in),
                                             layers.prompt_rows_from(f_in)), f_in)
        elif groups_fn is not None and len(groups) > 1:
            ys, layer_auxes = groups_fn(i, lp.ffn, f_in, xs, [g.rows for g in groups])
            for a, layer_aux in zip(aux, layer_auxes):
                a.append(layer_aux)
        else:
            ys = []
            for g, f, x, a in zip(groups, f_in, xs, aux):
                y, layer_aux = ffn_fn(i, lp.ffn, f, x, g.rows)
                ys.append(y)
                a.append(layer_aux)
        xs = [x + y if pre else layers.norm(x + y, lp.ffn_norm, cfg) for x, y in zip(xs, ys)]
    heads = [x if g.logits_at is None else _pick(x, g) for g, x in zip(groups, xs)]
    logits = layers.split_rows(lm_head(params, cfg, layers.concat_rows(heads)), heads)
    return [(lg, None if ks[o][0] is None else KVCache(k=ks[o], v=vs[o]), a)
            for lg, o, a in zip(logits, owners, aux)]


def _pick(x: jax.Array, g: RowGroup) -> jax.Array:
    """The hidden states [n, 1, d] at g.logits_at: one per row, or in a packed group one per cache row."""
    if g.cache_rows is not None:
        return x[0, g.logits_at][:, None, :]
    return x[jnp.arange(x.shape[0]), g.logits_at][:, None, :]

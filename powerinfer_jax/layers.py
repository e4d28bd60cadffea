"""Pure functions for the non-FFN blocks: norms, rotary embeddings, attention with a KV cache.

Everything computes in float32; projections go through `ops.linear.linear`, which reads each
weight in its stored format (bf16/f16/int8/int4 through host kernels on the CPU backend, where
XLA would convert the whole weight before every dot).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ops.host_attention import decode_attention, uses_host_attention
from ops.linear import linear, linear_t
from powerinfer_jax.config import ModelConfig
from powerinfer_jax.params import AttentionParams, NormParams

f32 = jnp.float32


def rms_norm(x: jax.Array, p: NormParams, eps: float, unit_offset: bool = False) -> jax.Array:
    """LLaMA RMSNorm; `unit_offset`: Gemma's, which scales by (1 + weight)."""
    var = jnp.mean(x * x, axis=-1, keepdims=True)
    scale = p.scale.astype(f32)
    if unit_offset:
        scale = 1.0 + scale
    return x * jax.lax.rsqrt(var + eps) * scale


def layer_norm(x: jax.Array, p: NormParams, eps: float) -> jax.Array:
    """OPT LayerNorm."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p.scale.astype(f32) + p.bias.astype(f32)


def norm(x: jax.Array, p: NormParams, cfg: ModelConfig) -> jax.Array:
    """The family's normalisation."""
    if cfg.family == "llama":
        return rms_norm(x, p, cfg.norm_eps, cfg.norm_unit_offset)
    return layer_norm(x, p, cfg.norm_eps)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Rotary inverse frequencies, with HF's `linear` and `llama3` scaling."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=f32) / hd))
    s = cfg.rope_scaling_dict
    kind = None if s is None else s.get("rope_type", s.get("type"))
    if kind == "linear":
        return inv / s["factor"]
    if kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old_len / lo, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return jnp.where(medium, smoothed, scaled)
    return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates x [B, T, H, hd] by its positions [B, T] (HF's rotate-half convention)."""
    angles = positions[..., None].astype(f32) * inv_freq  # [B, T, hd/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _attend(q, keys, values, key_pos, positions, cfg: ModelConfig) -> jax.Array:
    """Softmax attention of q [B, T, hq, hd] over keys/values [B, hkv, S, hd] at slots key_pos [B, S]
    (causal, and windowed under a sliding window): [B, T, hq * hd]."""
    B, T, hq, hd = q.shape
    hkv = keys.shape[1]
    qg = q.reshape(B, T, hkv, hq // hkv, hd)
    scores = jnp.einsum("btkgh,bksh->bkgts", qg, keys) / math.sqrt(hd)
    allowed = key_pos[:, None, :] <= positions[:, :, None]  # [B, T, S]
    if cfg.sliding_window:
        allowed &= positions[:, :, None] - key_pos[:, None, :] < cfg.sliding_window
    scores = jnp.where(allowed[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bkgts,bksh->btkgh", probs, values).reshape(B, T, hq * hd)


def attention(
    x: jax.Array,
    p: AttentionParams,
    cfg: ModelConfig,
    positions: jax.Array,
    k_cache: jax.Array | None,
    v_cache: jax.Array | None,
    attend_len: int = 0,
    sink: list | None = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Causal self-attention of x [B, T, d] at `positions` [B, T] over a KV cache.

    Writes this step's keys/values into the caches [B, n_kv, S, hd] at `positions` and
    attends over the first `attend_len` cache slots (a static bucket >= max position + 1,
    so short contexts do not pay for the whole preallocated cache). Slots beyond a query's
    position are masked, so stale or padded entries never leak in. With no cache
    (training), x attends within itself. `sink`: a list that gets the o projection's input (profiling).
    In the input-sparse layout (`params.input_sparse_attention`) a decode step (T == 1) zeroes the
    projections' input entries at or below `p.in_threshold` and reads only the other rows (TEAL).
    """
    B, T, _ = x.shape
    sparse = T == 1
    q, k, v = _project_qkv(x, p, cfg, sparse)
    out, k_cache, v_cache = _attend_cached(q, k, v, positions, k_cache, v_cache, attend_len, cfg)
    return _project_out(out, p, sink, sparse, cfg.needs_act_threshold), k_cache, v_cache


def attention_groups(xs: list[jax.Array], p: AttentionParams, cfg: ModelConfig, positions: list[jax.Array],
                     caches: list[tuple[jax.Array, jax.Array]], attend_len: int,
                     cache_rows: list[jax.Array | None] | None = None, owners: list[int] | None = None,
                     row_sets: list[jax.Array | None] | None = None) -> tuple[list[jax.Array], list]:
    """`attention` for several groups of rows at once (a decode batch and a prompt chunk): group g is
    xs[g] [B_g, T_g, d] at positions[g] over its own cache caches[g] = (k, v). The q/k/v and o projections
    run over every group's rows together, so each weight is read once; attention runs per group.
    `cache_rows[g]` [1, T_g] (or None): group g is one packed row whose token t belongs to cache row
    cache_rows[g][0, t] (pieces of several prompts in one chunk; see `_attend_packed`), `row_sets[g]` [R]
    the rows they own. `owners[g]`: the group whose cache group g uses (groups sharing one cache write it in
    order, each after the one before). Returns each group's output and (k, v) caches (a shared cache's final
    state for each group sharing it). Input sparsity (TEAL) applies only when every group is one token a row."""
    sparse = all(x.shape[1] == 1 for x in xs)
    prompt_from = prompt_rows_from(xs)
    q, k, v = _project_qkv(concat_rows(xs)[None], p, cfg, sparse, prompt_from)  # over [1, N, d]
    n = len(xs)
    cache_rows, row_sets = cache_rows or [None] * n, row_sets or [None] * n
    owners = owners or list(range(n))
    # Every group writes its keys and values first, then every group attends: groups sharing a cache (a decode
    # batch and a prompt chunk prefilled into its free rows) then never write a buffer an attention (a host
    # kernel's callback among them) has read, which XLA would answer with a copy of the whole cache per layer.
    qs, ks, vs = (split_rows(a[0], xs) for a in (q, k, v))
    rotated, latest = [], {}  # rotated queries of the cached groups; each cache owner's cache after the writes
    for qg, kg, vg, pos, cache, rows, owner in zip(qs, ks, vs, positions, caches, cache_rows, owners):
        if cache[0] is None:  # no cache: attends within the group below
            rotated.append(None)
            continue
        qg, kg = _rotate(qg, kg, pos, cfg)
        rotated.append(qg)
        latest[owner] = _write_kv(kg, vg, pos, *latest.get(owner, cache), rows)
    outs = [_attend_cached(qg, kg, vg, pos, None, None, attend_len, cfg)[0] if qr is None else
            _read_kv(qr, pos, *latest[owner], attend_len, cfg, rows, row_set)
            for qg, kg, vg, qr, pos, rows, row_set, owner in zip(qs, ks, vs, rotated, positions, cache_rows,
                                                                  row_sets, owners)]
    out = _project_out(concat_rows(outs)[None], p, None, sparse, cfg.needs_act_threshold, prompt_from)
    return split_rows(out[0], xs), [latest.get(o, (None, None)) for o in owners]


def prompt_rows_from(xs: list[jax.Array]) -> int | None:
    """Where the prompt rows start in `concat_rows(xs)`: the first row of the trailing groups of several tokens
    a row (prompt chunks, after the decode groups of one token a row), or None (no prompt rows, or a layout
    that is not decode-then-prompt). `ops.linear.linear`'s `prompt_from`."""
    start, n = None, 0
    for x in xs:
        if x.shape[1] > 1:
            start = n if start is None else start
        elif start is not None:
            return None
        n += x.shape[0] * x.shape[1]
    return start


def concat_rows(xs: list[jax.Array]) -> jax.Array:
    """Groups' [B, T, ...] arrays as one [N, ...] (N the sum of B * T)."""
    return jnp.concatenate([x.reshape((-1,) + x.shape[2:]) for x in xs])


def split_rows(y: jax.Array, like: list[jax.Array]) -> list[jax.Array]:
    """[N, ...] back into the groups' [B, T, ...] (the inverse of concat_rows; `like`: the groups' arrays)."""
    bounds = np.cumsum([x.shape[0] * x.shape[1] for x in like])[:-1].tolist()
    return [part.reshape(x.shape[:2] + part.shape[1:]) for part, x in zip(jnp.split(y, bounds), like)]


def _project_qkv(x: jax.Array, p: AttentionParams, cfg: ModelConfig, sparse: bool, prompt_from: int | None = None):
    """q [B, T, hq, hd], k and v [B, T, hkv, hd] of x [B, T, d] (`sparse`: TEAL's input sparsity applies;
    `prompt_from`: see `ops.linear.linear`)."""
    B, T, _ = x.shape
    hq, hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    exact = cfg.needs_act_threshold  # activation-threshold models decide on values downstream: exact dots
    if p.wqkv_t is not None or p.wqkv is not None:  # the engine's fused layout (params.fuse_qkv)
        if p.wqkv_t is not None:
            qkv = _input_sparse(x, p.wqkv_t, p.in_threshold[0], sparse, p.bqkv, prompt_from)
        else:
            qkv = linear(x, p.wqkv, p.bqkv, exact=exact, prompt_from=prompt_from)
        q = qkv[..., : hq * hd].reshape(B, T, hq, hd)
        k = qkv[..., hq * hd : (hq + hkv) * hd].reshape(B, T, hkv, hd)
        v = qkv[..., (hq + hkv) * hd :].reshape(B, T, hkv, hd)
    else:
        q = linear(x, p.wq, p.bq, exact=exact, prompt_from=prompt_from).reshape(B, T, hq, hd)
        k = linear(x, p.wk, p.bk, exact=exact, prompt_from=prompt_from).reshape(B, T, hkv, hd)
        v = linear(x, p.wv, p.bv, exact=exact, prompt_from=prompt_from).reshape(B, T, hkv, hd)
    return q, k, v


def _attend_cached(q, k, v, positions, k_cache, v_cache, attend_len: int, cfg: ModelConfig, cache_rows=None,
                   row_set=None):
    """Rotary positions, the cache write and the attention of q [B, T, hq, hd] (k, v: this step's keys and
    values) over the cache (or, without one, within the sequence): [B, T, hq * hd] and the caches.
    `cache_rows` [1, T]: a packed chunk, token t in cache row cache_rows[0, t], its prompts' rows `row_set`
    (`_attend_packed`)."""
    q, k = _rotate(q, k, positions, cfg)
    if k_cache is None:  # training / cache-free forward: attend within this sequence
        keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        return _attend(q, keys, values, positions, positions, cfg), None, None
    k_cache, v_cache = _write_kv(k, v, positions, k_cache, v_cache, cache_rows)
    return _read_kv(q, positions, k_cache, v_cache, attend_len, cfg, cache_rows, row_set), k_cache, v_cache


def _rotate(q, k, positions, cfg: ModelConfig):
    """q and k with rotary positions applied (LLaMA family; OPT's are learned, added at the embedding)."""
    if cfg.family != "llama":
        return q, k
    inv_freq = rope_inv_freq(cfg)
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)


def _write_kv(k, v, positions, k_cache, v_cache, cache_rows=None):
    """The caches with this step's (rotated) keys and values [B, T, hkv, hd] written at `positions` of their
    rows (row b, or a packed chunk's token t into row cache_rows[0, t]; positions past the cache: nothing).
    The cache is [B, n_kv, S, hd]: each (row, head) one contiguous [S, hd] block, so attention reads it as it
    lies (the [B, S, n_kv, hd] layout made XLA:CPU transpose the attended span every step: 2.2x slower)."""
    B, _, hkv, _ = k.shape
    if cache_rows is not None:
        at, k, v = (cache_rows[0][:, None], jnp.arange(hkv)[None, :], positions[0][:, None]), k[0], v[0]
    else:
        at = (jnp.arange(B)[:, None, None], jnp.arange(hkv)[None, None, :], positions[:, :, None])
    return _cache_write(k_cache, at, k), _cache_write(v_cache, at, v)


def _read_kv(q, positions, k_cache, v_cache, attend_len: int, cfg: ModelConfig, cache_rows=None, row_set=None):
    """The attention [B, T, hq * hd] of the rotated q [B, T, hq, hd] over the (written) caches' first
    `attend_len` slots of its rows (a packed chunk: `_attend_packed`)."""
    if cache_rows is not None:
        return _attend_packed(q, positions, cache_rows, k_cache, v_cache, attend_len, cfg, row_set)
    B, T, hq, hd = q.shape
    hkv = k_cache.shape[1]
    span_bytes = 2 * B * hkv * attend_len * hd * k_cache.dtype.itemsize
    if uses_host_attention(B, T, k_cache.dtype, span_bytes):
        # A batched or long-span decode step on the CPU backend: each row over its own slots, the cache
        # read in place (XLA would copy the strided span below before its dots).
        out = decode_attention(q[:, 0], k_cache, v_cache, positions[:, 0], cfg.sliding_window)
        return out.reshape(B, T, hq * hd)
    # A cache may hold more rows than x (continuous batching runs its first B rows).
    keys = kv_read(k_cache[:B, :, :attend_len])
    values = kv_read(v_cache[:B, :, :attend_len])
    key_pos = jnp.broadcast_to(jnp.arange(attend_len), (B, attend_len))
    return _attend(q, keys, values, key_pos, positions, cfg)


# How each KV-cache precision is stored. Half precisions hold their bit patterns as 16-bit integers (bf16 as uint16,
# f16 as int16, so the array's dtype still names the precision): XLA:CPU scatters half-precision floats by
# converting the whole operand to f32 and back, so writing one token a row into a 16-row, 1024-slot bf16 cache
# of the bundled model cost ~110 ms a step (6.5 ms in f32); integers it scatters in place.
KV_STORAGE = {"float32": jnp.float32, "bfloat16": jnp.uint16, "float16": jnp.int16}
_KV_BITS = {jnp.dtype(stored): jnp.dtype(name) for name, stored in KV_STORAGE.items() if name != "float32"}


def kv_read(stored: jax.Array) -> jax.Array:
    """Cache entries (float32, or half-precision bit patterns: `KV_STORAGE`) as float32."""
    half = _KV_BITS.get(stored.dtype)
    return (stored if half is None else jax.lax.bitcast_convert_type(stored, half)).astype(f32)


def _cache_write(cache: jax.Array, at: tuple, values: jax.Array) -> jax.Array:
    """cache.at[at].set(values) in the cache's stored form (indices past the cache: dropped)."""
    half = _KV_BITS.get(cache.dtype)
    stored = values.astype(cache.dtype) if half is None else \
        jax.lax.bitcast_convert_type(values.astype(half), cache.dtype)
    return cache.at[at].set(stored, mode="drop")


def _project_out(out: jax.Array, p: AttentionParams, sink: list | None, sparse: bool,
                 exact: bool = False, prompt_from: int | None = None) -> jax.Array:
    """The o projection of the heads' output [B, T, hq * hd] (`sink` gets its input when profiling;
    `sparse`: TEAL's input sparsity applies; `exact`, `prompt_from`: see `ops.linear.linear`)."""
    if sink is not None:
        sink.append(out)
    if p.wo_t is not None:
        return _input_sparse(out, p.wo_t, p.in_threshold[1], sparse, p.bo, prompt_from)
    return linear(out, p.wo, p.bo, exact=exact, prompt_from=prompt_from)


def _input_sparse(x: jax.Array, w_t, threshold: jax.Array, sparse: bool, b=None,
                  prompt_from: int | None = None) -> jax.Array:
    """x @ w_t (+ b) for a transposed weight; when `sparse`, the entries of x with |x| <= threshold are
    zeroed first and their rows of w_t are never read (TEAL). Prompts (sparse=False) keep every entry."""
    if sparse:
        x = jnp.where(jnp.abs(x) > threshold, x, 0.0)
    y = linear_t(x, w_t, skip_zero=sparse, prompt_from=prompt_from)
    return y if b is None else y + b.astype(f32)


def _attend_packed(q, positions, cache_rows, k_cache, v_cache, attend_len: int, cfg: ModelConfig, row_set=None):
    """Attention of a packed chunk q [1, W, hq, hd] (rotated; its keys and values written by `_write_kv`):
    token t attends only row cache_rows[0, t]'s slots up to its position positions[0, t]. Continuous batching
    packs the next pieces of several waiting prompts into one fixed-width chunk this way, each prompt in the
    batch row it will decode in (`row_set` [R]: the prompts' rows; default every row of the cache). On the CPU
    backend each token is one query of the host attention kernel, reading its own row's slots in place.
    Elsewhere every token is scored against each of the R rows' span and keeps its own row's result: R times the
    attention arithmetic of one row (on the CPU, bundled model, 16 rows + 32 tokens at span 128, R = 4: ~5 ms
    of a ~20 ms step, which the host kernel removes; see BENCHMARKS.md)."""
    _, W, hq, hd = q.shape
    hkv = k_cache.shape[1]
    rows, pos = cache_rows[0], positions[0]
    if row_set is None:
        row_set = jnp.arange(k_cache.shape[0], dtype=rows.dtype)
    R = row_set.shape[0]
    span_bytes = 2 * R * hkv * attend_len * hd * k_cache.dtype.itemsize
    if uses_host_attention(W, 1, k_cache.dtype, span_bytes):  # W one-token queries, each over its own row
        out = decode_attention(q[0], k_cache, v_cache, pos, cfg.sliding_window, cache_rows=rows)
        return out.reshape(1, W, hq * hd)
    # Every token against every prompt's row, as a batch of R rows (one set of ops, whatever R); a token keeps
    # its own row's result. Against another row it sees that row's first slot only (finite, and discarded).
    mine = rows[None, :] == row_set[:, None]  # [R, W]
    slot = jnp.argmax(mine, axis=0)  # each token's prompt (the first of equal rows)
    seen = jnp.where(jnp.arange(R)[:, None] == slot[None, :], pos[None, :], 0)  # [R, W]
    key_pos = jnp.broadcast_to(jnp.arange(attend_len), (R, attend_len))
    every = _attend(jnp.broadcast_to(q, (R,) + q.shape[1:]), kv_read(k_cache[row_set, :, :attend_len]),
                    kv_read(v_cache[row_set, :, :attend_len]), key_pos, seen, cfg)  # [R, W, hq * hd]
    return jnp.take_along_axis(every, slot[None, :, None], axis=0)

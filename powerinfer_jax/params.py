"""Parameter pytrees: registered dataclasses of arrays, one per block.

Layout: every matrix is a row matrix `[out, in]`, exactly HF's `weight` layout, so a checkpoint
maps into the tree without a transpose or a copy, and a mat-vec reads row r for output r
(`ops.linear.linear`). The one exception is the FFN down projection (OPT: fc2), stored
*transposed*, `w_down_t [n_ff, d]`, so neuron i owns row i of every FFN matrix, as PowerInfer
does (`ops.linear.linear_t` reads it in axpy form).
A matrix is a plain float array (training, tests) or an `ops.quant.Weight` (the engine: the
checkpoint's stored precision, or int8/int4, with its scales). Vectors (norms, biases) are
float32 arrays. Optional tensors (biases, OPT's projections) are `None`, an empty pytree.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ops.linear import slice_rows
from ops.quant import Weight
from powerinfer_jax.tensor_file import aligned_empty
from powerinfer_jax.config import ModelConfig


def _pytree(cls):
    return jax.tree_util.register_dataclass(dataclasses.dataclass(cls))


@_pytree
class NormParams:
    scale: jax.Array  # [d]
    bias: jax.Array | None = None  # LayerNorm only; RMSNorm has none


@_pytree
class AttentionParams:
    wq: jax.Array | None  # [n_heads * head_dim, d]   (None once fused into wqkv)
    wk: jax.Array | None  # [n_kv_heads * head_dim, d]
    wv: jax.Array | None  # [n_kv_heads * head_dim, d]
    wo: jax.Array | None  # [d, n_heads * head_dim]  (None once transposed into wo_t)
    bq: jax.Array | None = None
    bk: jax.Array | None = None
    bv: jax.Array | None = None
    bo: jax.Array | None = None
    # The engine's layout: q, k and v projections side by side, one mat-vec instead of three
    # (1.2x faster on XLA:CPU for 4096-wide layers: 6.2 vs 7.4 ms). See `fuse_qkv`.
    wqkv: jax.Array | None = None  # [(n_heads + 2 * n_kv_heads) * head_dim, d]
    bqkv: jax.Array | None = None
    # Input-sparse layout (TEAL, `input_sparse_attention`): q/k/v and o stored transposed [in, out], so a
    # decode step reads only the rows of the inputs above `in_threshold` ([2]: q/k/v input, o input).
    wqkv_t: jax.Array | None = None  # [d, (n_heads + 2 * n_kv_heads) * head_dim]
    wo_t: jax.Array | None = None  # [n_heads * head_dim, d]
    in_threshold: jax.Array | None = None  # [2] float32


@_pytree
class FFNParams:
    """Dense FFN weights; row i of every matrix belongs to neuron i."""

    w_up: jax.Array  # [n_ff, d]  (OPT: fc1.weight)
    w_down_t: jax.Array  # [n_ff, d]  (down_proj.weight.T; OPT: fc2.weight.T)
    w_gate: jax.Array | None = None  # [n_ff, d]  gated families only
    b_up: jax.Array | None = None  # [n_ff]  OPT only
    b_down: jax.Array | None = None  # [d]  OPT only


@_pytree
class LayerParams:
    attn_norm: NormParams
    attn: AttentionParams
    ffn_norm: NormParams
    ffn: FFNParams


@_pytree
class ModelParams:
    embed: jax.Array  # [vocab, e]  (e = word_embed_proj_dim for OPT, else d)
    layers: list[LayerParams]
    final_norm: NormParams | None
    lm_head: jax.Array | None = None  # [vocab, e]; None when tied to `embed`
    pos_embed: jax.Array | None = None  # [max_pos + 2, d]  OPT learned positions
    project_in: jax.Array | None = None  # [d, e]  OPT-350m style
    project_out: jax.Array | None = None  # [e, d]


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> ModelParams:
    """Random parameters for a LLaMA-family config (used to train the bundled model)."""
    if cfg.family != "llama":
        raise NotImplementedError("init_params is only needed for LLaMA-family training")
    d, n, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    keys = iter(jax.random.split(key, 2 + 7 * cfg.num_layers))

    def normal(shape, scale=std):
        return (scale * jax.random.normal(next(keys), shape)).astype(dtype)

    # GPT-2 style: residual-output projections scaled down with depth for stable training.
    out_std = std / (2 * cfg.num_layers) ** 0.5
    ones = lambda: jnp.ones((d,), dtype)  # noqa: E731
    layers = [
        LayerParams(
            attn_norm=NormParams(ones()),
            attn=AttentionParams(
                wq=normal((cfg.num_heads * hd, d)),
                wk=normal((cfg.num_kv_heads * hd, d)),
                wv=normal((cfg.num_kv_heads * hd, d)),
                wo=normal((d, cfg.num_heads * hd), out_std),
            ),
            ffn_norm=NormParams(ones()),
            ffn=FFNParams(w_up=normal((n, d)), w_down_t=normal((n, d), out_std), w_gate=normal((n, d))),
        )
        for _ in range(cfg.num_layers)
    ]
    lm_head = None if cfg.tie_word_embeddings else normal((cfg.vocab_size, d))
    return ModelParams(embed=normal((cfg.vocab_size, d)), layers=layers, final_norm=NormParams(ones()), lm_head=lm_head)


def param_bytes(tree) -> int:
    """Total bytes of all arrays in a pytree (a Weight counts its data and scales)."""
    return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree)))


def _cat(parts):
    """Arrays stacked along axis 0; host arrays into one new 64-byte-aligned buffer (JAX can alias it)."""
    if not isinstance(parts[0], np.ndarray):
        return jnp.concatenate(parts, axis=0)
    out = aligned_empty((sum(p.shape[0] for p in parts),) + parts[0].shape[1:], parts[0].dtype)
    return np.concatenate(parts, axis=0, out=out)


def concat_rows(*ws):
    """Row matrices stacked along their rows (Weights of one format, or plain arrays)."""
    if ws[0] is None:
        return None
    if isinstance(ws[0], Weight):
        if len({(w.fmt, w.cols, w.act) for w in ws}) != 1:
            raise ValueError(f"cannot fuse weights of formats {[w.fmt for w in ws]}")
        scale = None if ws[0].scale is None else _cat([w.scale for w in ws])
        return Weight(_cat([w.data for w in ws]), scale, ws[0].fmt, ws[0].cols, ws[0].act)
    return _cat(list(ws))


def _split_rows(w, bounds):
    if w is None:
        return (None,) * (len(bounds) - 1)
    pairs = zip(bounds[:-1], bounds[1:])
    if isinstance(w, Weight):
        return tuple(slice_rows(w, a, b) for a, b in pairs)
    return tuple(w[a:b] for a, b in pairs)


def with_int4_activations(params: ModelParams, mode: str) -> tuple[ModelParams, int]:
    """`params` with every int4 Weight whose rows the int8-activation kernels take (`ops.host_q8.usable`) set to
    meet `mode` activations ("float32" or "int8", `Weight.act`); returns them and how many weights were set."""
    from ops import host_q8

    marked = 0

    def mark(w):
        nonlocal marked
        if isinstance(w, Weight) and w.fmt == "int4" and (mode == "float32" or host_q8.usable(w.cols)):
            marked += 1
            return dataclasses.replace(w, act=mode)
        return w

    out = jax.tree_util.tree_map(mark, params, is_leaf=lambda a: isinstance(a, Weight))
    return out, marked


def fuse_qkv(params: ModelParams) -> ModelParams:
    """The same model with each layer's q/k/v projections (and biases) stacked into
    `wqkv`/`bqkv` (one mat-vec instead of three); the separate arrays are dropped. Idempotent."""
    layers = []
    for lp in params.layers:
        a = lp.attn
        if a.wq is not None:
            a = dataclasses.replace(a, wqkv=concat_rows(a.wq, a.wk, a.wv), bqkv=concat_rows(a.bq, a.bk, a.bv),
                                    wq=None, wk=None, wv=None, bq=None, bk=None, bv=None)
        layers.append(dataclasses.replace(lp, attn=a))
    return dataclasses.replace(params, layers=layers)


def unfuse_qkv(params: ModelParams, cfg: ModelConfig) -> ModelParams:
    """Inverse of `fuse_qkv` (checkpoint export needs the separate q/k/v tensors)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    bounds = (0, q, q + kv, q + 2 * kv)
    layers = []
    for lp in params.layers:
        a = lp.attn
        if a.wqkv is not None:
            (wq, wk, wv), (bq, bk, bv) = _split_rows(a.wqkv, bounds), _split_rows(a.bqkv, bounds)
            a = dataclasses.replace(a, wq=wq, wk=wk, wv=wv, bq=bq, bk=bk, bv=bv, wqkv=None, bqkv=None)
        layers.append(dataclasses.replace(lp, attn=a))
    return dataclasses.replace(params, layers=layers)


def transpose_weight(w):
    """A row matrix [R, K] as its transpose [K, R], in the same storage format: half and float words
    are transposed as stored; int8/int4 (scaled along rows) are dequantized and quantized again."""
    from ops.quant import dequantize, to_weight
    from powerinfer_jax.tensor_file import aligned, to_jax

    on_device = isinstance(w.data if isinstance(w, Weight) else w, jax.Array)
    if not isinstance(w, Weight):
        out = aligned(np.ascontiguousarray(np.asarray(w).T))
        return to_jax(out) if on_device else out
    if w.fmt in ("int8", "int4"):
        host = Weight(np.asarray(w.data), np.asarray(w.scale), w.fmt, w.cols)
        t = to_weight(np.ascontiguousarray(dequantize(host).T), w.fmt)
    else:
        data = np.asarray(w.data)
        t = Weight(aligned(np.ascontiguousarray(data.T)), None, w.fmt, data.shape[0])
    return jax.tree.map(to_jax, t) if on_device else t


def input_sparse_attention(params: ModelParams, thresholds) -> ModelParams:
    """The engine's params with every layer's fused q/k/v and o projections stored transposed
    (`wqkv_t`, `wo_t`) and their input thresholds `thresholds[l] = (q/k/v input, o input)`: decode steps
    then read only the weight rows of inputs above them (TEAL). Needs the fused layout (`fuse_qkv`)."""
    thresholds = np.asarray(thresholds, np.float32)
    layers = []
    for lp, thr in zip(params.layers, thresholds):
        a = lp.attn
        if a.wqkv is None:
            raise ValueError("input-sparse attention needs the fused q/k/v layout (params.fuse_qkv)")
        on_device = isinstance(a.wqkv.data if isinstance(a.wqkv, Weight) else a.wqkv, jax.Array)
        a = dataclasses.replace(a, wqkv_t=transpose_weight(a.wqkv), wo_t=transpose_weight(a.wo), wqkv=None, wo=None,
                                in_threshold=jnp.asarray(thr) if on_device else np.array(thr))
        layers.append(dataclasses.replace(lp, attn=a))
    return dataclasses.replace(params, layers=layers)

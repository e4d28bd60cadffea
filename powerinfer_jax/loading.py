"""Reads HF safetensors checkpoints (single file or sharded) into a `ModelParams` pytree.

One name table per family maps each HF tensor to a slot in our tree, with the transpose
our layout needs and the shape it must have. Every missing, unexpected or mis-shaped
tensor is reported by name, all at once.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from powerinfer_jax.config import ModelConfig
from powerinfer_jax.params import AttentionParams, FFNParams, LayerParams, ModelParams, NormParams

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Buffers some checkpoints carry that are recomputed here.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, truncated, or not matching its config."""


def _spec(cfg: ModelConfig) -> dict[str, tuple[str, bool, tuple[int, ...]]]:
    """HF tensor name -> (our flat name, transpose?, shape in our layout)."""
    d, n, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    spec: dict[str, tuple[str, bool, tuple[int, ...]]] = {}
    if cfg.family == "llama":
        spec["model.embed_tokens.weight"] = ("embed", False, (V, d))
        spec["model.norm.weight"] = ("final_norm.scale", False, (d,))
        if not cfg.tie_word_embeddings:
            spec["lm_head.weight"] = ("lm_head", True, (d, V))
        for i in range(cfg.num_layers):
            hf, us = f"model.layers.{i}.", f"layers.{i}."
            spec[hf + "input_layernorm.weight"] = (us + "attn_norm.scale", False, (d,))
            spec[hf + "post_attention_layernorm.weight"] = (us + "ffn_norm.scale", False, (d,))
            for proj, ours, out in (("q", "q", q_out), ("k", "k", kv_out), ("v", "v", kv_out)):
                spec[hf + f"self_attn.{proj}_proj.weight"] = (us + f"attn.w{ours}", True, (d, out))
                if cfg.attention_bias:
                    spec[hf + f"self_attn.{proj}_proj.bias"] = (us + f"attn.b{ours}", False, (out,))
            spec[hf + "self_attn.o_proj.weight"] = (us + "attn.wo", True, (q_out, d))
            if cfg.attention_bias:
                spec[hf + "self_attn.o_proj.bias"] = (us + "attn.bo", False, (d,))
            spec[hf + "mlp.gate_proj.weight"] = (us + "ffn.w_gate", False, (n, d))
            spec[hf + "mlp.up_proj.weight"] = (us + "ffn.w_up", False, (n, d))
            spec[hf + "mlp.down_proj.weight"] = (us + "ffn.w_down_t", True, (n, d))
        return spec
    e = cfg.word_embed_proj_dim or d
    pre = "model.decoder."
    spec[pre + "embed_tokens.weight"] = ("embed", False, (V, e))
    spec[pre + "embed_positions.weight"] = ("pos_embed", False, (cfg.max_position_embeddings + 2, d))
    if e != d:
        spec[pre + "project_in.weight"] = ("project_in", True, (e, d))
        spec[pre + "project_out.weight"] = ("project_out", True, (d, e))
    if cfg.final_layer_norm:
        spec[pre + "final_layer_norm.weight"] = ("final_norm.scale", False, (d,))
        spec[pre + "final_layer_norm.bias"] = ("final_norm.bias", False, (d,))
    if not cfg.tie_word_embeddings:
        spec["lm_head.weight"] = ("lm_head", True, (e, V))
    for i in range(cfg.num_layers):
        hf, us = f"{pre}layers.{i}.", f"layers.{i}."
        for proj, ours in (("q", "q"), ("k", "k"), ("v", "v"), ("out", "o")):
            spec[hf + f"self_attn.{proj}_proj.weight"] = (us + f"attn.w{ours}", True, (d, d))
            spec[hf + f"self_attn.{proj}_proj.bias"] = (us + f"attn.b{ours}", False, (d,))
        for ln, ours in (("self_attn_layer_norm", "attn_norm"), ("final_layer_norm", "ffn_norm")):
            spec[hf + f"{ln}.weight"] = (us + f"{ours}.scale", False, (d,))
            spec[hf + f"{ln}.bias"] = (us + f"{ours}.bias", False, (d,))
        spec[hf + "fc1.weight"] = (us + "ffn.w_up", False, (n, d))
        spec[hf + "fc1.bias"] = (us + "ffn.b_up", False, (n,))
        spec[hf + "fc2.weight"] = (us + "ffn.w_down_t", True, (n, d))
        spec[hf + "fc2.bias"] = (us + "ffn.b_down", False, (d,))
    return spec


def _normalise_name(name: str, cfg: ModelConfig) -> str:
    """Maps the prefix variants checkpoints use onto the names in `_spec`."""
    if cfg.family == "opt":
        if name.startswith("decoder."):
            return "model." + name
        if name.startswith("model.") and not name.startswith("model.decoder."):
            return "model.decoder." + name[len("model.") :]
    return name


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's safetensors files: the single file or every shard of the index."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(model_dir, f))]
        if missing:
            raise CheckpointError(f"shards listed in {index} are missing: {', '.join(missing)}")
        return [os.path.join(model_dir, f) for f in files]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise CheckpointError(
        f"no model.safetensors or model.safetensors.index.json in {model_dir} "
        "(only safetensors checkpoints are supported; convert .bin files with transformers first)"
    )


def iter_tensors(model_dir: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, numpy array) for every tensor of the checkpoint, shard by shard."""
    for path in safetensors_files(model_dir):
        _check_not_truncated(path)
        try:
            with safe_open(path, framework="numpy") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {path}: {err}") from err


def _check_not_truncated(path: str) -> None:
    """Fails clearly when the file is shorter than its header says (an interrupted download)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as err:
            raise CheckpointError(f"{path} is truncated or corrupt: unreadable header ({err})") from err
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{path} is truncated: its header needs {8 + header_len + end} bytes, the file has {size}"
        )


def load_params(model_dir: str, cfg: ModelConfig, dtype: str = "float32", on_host: bool = False) -> ModelParams:
    """Loads and checks every tensor of an HF checkpoint into our parameter tree.

    `on_host=True` keeps numpy arrays (the hybrid engine then moves only what the placement
    puts on the device); otherwise every array goes to the default JAX device.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    jdtype = DTYPES[dtype]
    convert = (lambda a: np.ascontiguousarray(a).astype(jdtype)) if on_host else (
        lambda a: jnp.asarray(np.ascontiguousarray(a), dtype=jdtype))
    spec = _spec(cfg)
    flat: dict[str, jnp.ndarray] = {}
    unexpected, bad_shape = [], []
    for raw_name, array in iter_tensors(model_dir):
        name = _normalise_name(raw_name, cfg)
        if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        if name not in spec:
            unexpected.append(raw_name)
            continue
        ours, transpose, shape = spec[name]
        if transpose:
            array = array.T
        if tuple(array.shape) != shape:
            bad_shape.append(f"{raw_name}: expected {shape[::-1] if transpose else shape}, got {array.T.shape if transpose else array.shape}")
            continue
        flat[ours] = convert(array)
    missing = [hf for hf, (ours, _, _) in spec.items() if ours not in flat]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if bad_shape:
        problems.append(f"wrong shapes: {'; '.join(bad_shape)}")
    if problems:
        raise CheckpointError(f"checkpoint in {model_dir} does not match its config: " + " | ".join(problems))
    return _build_tree(flat, cfg)


def _build_tree(flat: dict[str, jnp.ndarray], cfg: ModelConfig) -> ModelParams:
    get = flat.get

    def norm(prefix: str) -> NormParams:
        return NormParams(scale=flat[prefix + ".scale"], bias=get(prefix + ".bias"))

    layers = []
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        attn = AttentionParams(
            **{k: get(p + "attn." + k) for k in ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo")}
        )
        ffn = FFNParams(**{k: get(p + "ffn." + k) for k in ("w_up", "w_down_t", "w_gate", "b_up", "b_down")})
        layers.append(LayerParams(norm(p + "attn_norm"), attn, norm(p + "ffn_norm"), ffn))
    return ModelParams(
        embed=flat["embed"],
        layers=layers,
        final_norm=norm("final_norm") if "final_norm.scale" in flat else None,
        lm_head=get("lm_head"),
        pos_embed=get("pos_embed"),
        project_in=get("project_in"),
        project_out=get("project_out"),
    )

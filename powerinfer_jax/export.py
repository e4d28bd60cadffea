"""Writes a parameter tree back out as an HF checkpoint folder (config.json + model.safetensors).

The inverse of `loading.py`: the same name table, walked the other way, so a round trip
through `pij.load` is exact by construction (and tested).
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from ops.quant import Weight, dequantize
from powerinfer_jax.config import ModelConfig
from powerinfer_jax.loading import _spec, flat_leaves
from powerinfer_jax.params import ModelParams, unfuse_qkv

NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def flatten_params(params: ModelParams) -> dict[str, np.ndarray]:
    """Our flat names ("layers.3.ffn.w_up", ...) -> numpy arrays (Weights dequantized to float32)."""
    return {name: dequantize(leaf) if isinstance(leaf, Weight) else np.asarray(leaf)
            for name, leaf in flat_leaves(params)}


# transformers (config class, model class) by architecture; the other LLaMA-family ones run as LLaMA.
_HF_CLASSES = {"Qwen2ForCausalLM": ("Qwen2Config", "Qwen2ForCausalLM"),
               "GemmaForCausalLM": ("GemmaConfig", "GemmaForCausalLM")}


def llama_hf_config(cfg: ModelConfig) -> dict:
    """The `config.json` contents for a LLaMA-family `ModelConfig` (Qwen2 and Gemma in their own terms)."""
    if cfg.family != "llama":
        raise NotImplementedError("export is implemented for LLaMA-family models")
    hidden_act = {"reglu": "relu", "drelu": "relu", "swiglu": "silu", "geglu": "gelu_pytorch_tanh"}[cfg.ffn_kind]
    out = {
        "architectures": [cfg.architecture],
        "model_type": "llama",
        "hidden_act": hidden_act,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": False,
        "vocab_size": cfg.vocab_size,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else list(cfg.eos_token_ids),
        "pad_token_id": cfg.pad_token_id,
    }
    if cfg.ffn_kind == "drelu":
        out["powerinfer_ffn"] = "drelu"
    if cfg.architecture in _HF_CLASSES:
        _own_terms(out, cfg)
    return out


def _own_terms(out: dict, cfg: ModelConfig) -> None:
    """Rewrites a LLaMA-style config dict in Qwen2's or Gemma's own keys (what their loaders read)."""
    del out["mlp_bias"]
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = cfg.rope_scaling_dict
    if cfg.architecture == "Qwen2ForCausalLM":
        del out["attention_bias"]  # Qwen2: q/k/v biases always, o_proj none
        out.update(model_type="qwen2", use_sliding_window=cfg.sliding_window is not None,
                   sliding_window=cfg.sliding_window, max_window_layers=0)
    else:  # Gemma: transformers 4.x reads hidden_activation, 5.x hidden_act
        out.update(model_type="gemma", hidden_activation=out["hidden_act"])


def hf_layout_arrays(params: ModelParams, cfg: ModelConfig):
    """(HF tensor name, our array, whether HF stores it transposed) for every tensor."""
    flat = flatten_params(unfuse_qkv(params, cfg))  # an engine's params carry q/k/v fused
    for hf_name, (ours, transpose, _) in _spec(cfg).items():
        yield hf_name, flat[ours], transpose


def save_hf_checkpoint(params: ModelParams, cfg: ModelConfig, out_dir: str, dtype: str = "bfloat16") -> None:
    """Writes `config.json` and `model.safetensors` for a LLaMA-family model."""
    os.makedirs(out_dir, exist_ok=True)
    np_dtype = NUMPY_DTYPES[dtype]
    tensors = {}
    for hf_name, arr, transpose in hf_layout_arrays(params, cfg):
        arr = arr.astype(np.float32)
        tensors[hf_name] = np.ascontiguousarray(arr.T if transpose else arr).astype(np_dtype)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    hf_cfg = llama_hf_config(cfg)
    hf_cfg["torch_dtype"] = dtype
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)


def to_transformers(params: ModelParams, cfg: ModelConfig):
    """A transformers LlamaForCausalLM (Qwen2ForCausalLM, GemmaForCausalLM for those; float32, eval mode)
    over the same weights, without a disk round trip.

    Host (numpy) float32 tensors in HF's layout are shared, not copied; the ones stored transposed
    here are copied into HF's contiguous layout, so torch runs exactly what `from_pretrained` would
    give it. Used to benchmark transformers on in-memory models, like the synthetic 7B-shaped one.
    """
    import torch
    import transformers

    hf_cfg = llama_hf_config(cfg)
    config_cls, model_cls = (getattr(transformers, n) for n in
                             _HF_CLASSES.get(cfg.architecture, ("LlamaConfig", "LlamaForCausalLM")))
    with torch.device("meta"):  # no random init of weights that are replaced right away
        model = model_cls(config_cls(**hf_cfg))
    state = {}
    for hf_name, arr, transpose in hf_layout_arrays(params, cfg):
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        t = torch.from_numpy(arr)
        state[hf_name] = t.T.contiguous() if transpose else t
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=False, assign=True)
    # Non-persistent buffers (rotary frequencies) are not in the state dict: rebuild them on the CPU.
    rotary = type(model.model.rotary_emb)
    model.model.rotary_emb = rotary(config=model.config)
    emb = model.model.embed_tokens
    if hasattr(emb, "scalar_embed_scale"):  # Gemma's sqrt(hidden_size) multiplier, also a buffer
        emb.embed_scale = torch.tensor(emb.scalar_embed_scale)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
    if left:
        raise ValueError(f"parameters not set from ours: {left}")
    return model.eval()

"""Tiny random HF checkpoints built with transformers' `save_pretrained`, for parity tests."""

from __future__ import annotations

import json
import os

import torch

VOCAB = 160


def _relu_mlp_forward(mlp):
    """transformers has no dReLU: this replaces a LlamaMLP's forward with down(relu(g)*relu(u))."""

    def fwd(x):
        return mlp.down_proj(torch.relu(mlp.gate_proj(x)) * torch.relu(mlp.up_proj(x)))

    return fwd


def make_llama(path: str, *, act: str = "relu", drelu: bool = False, seed: int = 0, **overrides):
    """Saves a tiny LlamaForCausalLM to `path` and returns the torch model (eval, float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        hidden_act=act, initializer_range=0.1, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False,
    )
    kw.update(overrides)
    if drelu:
        kw["powerinfer_ffn"] = "drelu"
    model = _build_and_save(LlamaForCausalLM, LlamaConfig, kw, path)
    if drelu:
        for layer in model.model.layers:
            layer.mlp.forward = _relu_mlp_forward(layer.mlp)
        with open(os.path.join(path, "config.json")) as f:
            assert json.load(f)["powerinfer_ffn"] == "drelu"
    return model


def make_opt(path: str, *, seed: int = 0, **overrides):
    """Saves a tiny OPTForCausalLM to `path` and returns the torch model (eval, float32)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, word_embed_proj_dim=64, do_layer_norm_before=True,
        init_std=0.1, bos_token_id=2, eos_token_id=2, pad_token_id=1, dropout=0.0,
    )
    return _build_and_save(OPTForCausalLM, OPTConfig, {**kw, **overrides}, path)


def make_qwen2(path: str, *, seed: int = 0, **overrides):
    """Saves a tiny Qwen2ForCausalLM (q/k/v biases, SwiGLU) to `path`; returns the torch model (eval, float32)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        hidden_act="silu", initializer_range=0.1, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False, rope_theta=1000000.0,
    )
    return _build_and_save(Qwen2ForCausalLM, Qwen2Config, {**kw, **overrides}, path)


def make_gemma(path: str, *, seed: int = 0, **overrides):
    """Saves a tiny GemmaForCausalLM (GeGLU, scaled embeddings, (1 + w) RMSNorm, tied head, head_dim !=
    hidden/heads) to `path`; returns the torch model (eval, float32)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=256,
        hidden_act="gelu_pytorch_tanh", initializer_range=0.1, rms_norm_eps=1e-6, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
    )
    return _build_and_save(GemmaForCausalLM, GemmaConfig, {**kw, **overrides}, path)


def _build_and_save(model_cls, config_cls, kw: dict, path: str):
    """model_cls(config_cls(**kw)) in float32 eval mode, norms perturbed, saved to `path` as safetensors."""
    model = model_cls(config_cls(**kw)).float().eval()
    _perturb_norms(model)
    model.save_pretrained(path, safe_serialization=True)
    return model


def _perturb_norms(model):
    """Random norm scales/biases and attention biases, so a swapped tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))

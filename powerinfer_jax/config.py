"""Frozen model configuration built from a Hugging Face `config.json`.

One `ModelConfig` describes every decoder we run: the LLaMA family (LLaMA, Mistral,
ReluLLaMA, ProSparse, TurboSparse-style dReLU) and OPT. The forward pass reads only
this dataclass, never the raw JSON, so every supported variant is visible here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "OPTForCausalLM")

# FFN kinds. The sparse engine needs a ReLU in the FFN; "swiglu" runs dense only.
#   reglu : down(relu(gate x) * up x)          ReluLLaMA, ProSparse (hidden_act "relu")
#   drelu : down(relu(gate x) * relu(up x))    TurboSparse/Bamboo
#   swiglu: down(silu(gate x) * up x)          stock LLaMA/Mistral (hidden_act "silu")
#   relu  : down(relu(fc1 x + b1)) + b2        OPT
FFN_KINDS = ("reglu", "drelu", "swiglu", "relu")
SPARSE_FFN_KINDS = ("reglu", "drelu", "relu")

# How a config marks dReLU: transformers has no dReLU activation, so a checkpoint says
# `"hidden_act": "drelu"` or keeps `"hidden_act": "relu"` and adds
# `"powerinfer_ffn": "drelu"` (the latter still loads in transformers' LlamaForCausalLM).
DRELU_CONFIG_KEY = "powerinfer_ffn"


class UnsupportedModelError(ValueError):
    """Raised for an architecture, activation or option this engine does not run."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a decoder-only transformer (hashable, safe as a jit static arg)."""

    architecture: str
    family: str  # "llama" or "opt"
    ffn_kind: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of the HF dict
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    # OPT-only layout switches.
    pre_layer_norm: bool = True
    word_embed_proj_dim: int | None = None
    final_layer_norm: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str | None = None

    @property
    def is_sparse_capable(self) -> bool:
        """Whether the FFN has a ReLU, so inactive neurons contribute exactly zero."""
        return self.ffn_kind in SPARSE_FFN_KINDS

    @property
    def has_gate(self) -> bool:
        """Whether the FFN is gated (LLaMA family) rather than a plain fc1/fc2 (OPT)."""
        return self.ffn_kind != "relu"

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        """The rope_scaling options as a dict (stored as a tuple to stay hashable)."""
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Builds a config from the parsed contents of an HF `config.json`."""
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else _arch_from_model_type(raw.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {arch!r} (model_type={raw.get('model_type')!r}); "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        common = dict(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=int(raw["num_attention_heads"]),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=raw.get("pad_token_id"),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )
        if arch == "OPTForCausalLM":
            return cls._opt(raw, common)
        return cls._llama(raw, common)

    @classmethod
    def _llama(cls, raw: dict[str, Any], common: dict[str, Any]) -> "ModelConfig":
        act = raw.get("hidden_act", "silu")
        marker = raw.get(DRELU_CONFIG_KEY)
        if act == "drelu" or (act == "relu" and marker == "drelu"):
            ffn_kind = "drelu"
        elif act == "relu":
            ffn_kind = "reglu"
        elif act == "silu":
            ffn_kind = "swiglu"
        else:
            raise UnsupportedModelError(
                f"unsupported activation hidden_act={act!r} for {common['architecture']}; "
                "supported: 'relu' (ReGLU), 'drelu' (or 'relu' with "
                f"{DRELU_CONFIG_KEY}='drelu'), 'silu' (SwiGLU, dense only)"
            )
        if raw.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=True is not supported for LLaMA-family models")
        # transformers < 5 writes `rope_theta` + `rope_scaling`; 5.x writes one `rope_parameters`
        # dict holding rope_theta and the scaling options.
        rope_params = dict(raw.get("rope_parameters") or {})
        rope_theta = float(rope_params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
        scaling = raw.get("rope_scaling") or rope_params or None
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise UnsupportedModelError(
                    f"unsupported rope_scaling type {kind!r}; supported: llama3, linear, default"
                )
            scaling = tuple(sorted((k, v) for k, v in scaling.items() if not isinstance(v, (list, dict))))
        heads = common["num_heads"]
        head_dim = raw.get("head_dim") or common["hidden_size"] // heads
        window = raw.get("sliding_window") if common["architecture"] == "MistralForCausalLM" else None
        return cls(
            family="llama",
            ffn_kind=ffn_kind,
            intermediate_size=int(raw["intermediate_size"]),
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            sliding_window=int(window) if window else None,
            **common,
        )

    @classmethod
    def _opt(cls, raw: dict[str, Any], common: dict[str, Any]) -> "ModelConfig":
        act = raw.get("activation_function", "relu")
        if act != "relu":
            raise UnsupportedModelError(
                f"unsupported activation activation_function={act!r} for OPTForCausalLM; supported: 'relu'"
            )
        if not raw.get("enable_bias", True):
            raise UnsupportedModelError("OPT with enable_bias=False is not supported")
        heads = common["num_heads"]
        proj = raw.get("word_embed_proj_dim") or common["hidden_size"]
        pre_ln = bool(raw.get("do_layer_norm_before", True))
        return cls(
            family="opt",
            ffn_kind="relu",
            intermediate_size=int(raw["ffn_dim"]),
            num_kv_heads=heads,
            head_dim=common["hidden_size"] // heads,
            norm_eps=1e-5,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
            attention_bias=True,
            pre_layer_norm=pre_ln,
            word_embed_proj_dim=int(proj),
            final_layer_norm=pre_ln and not raw.get("_remove_final_layer_norm", False),
            **common,
        )


def _arch_from_model_type(model_type: str | None) -> str | None:
    return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "opt": "OPTForCausalLM"}.get(
        model_type or ""
    )


def load_config(model_dir: str | os.PathLike) -> ModelConfig:
    """Reads `config.json` from an HF model folder."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model folder not found: {model_dir}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {model_dir}: not a Hugging Face model folder")
    with open(path) as f:
        raw = json.load(f)
    return ModelConfig.from_hf_dict(raw)

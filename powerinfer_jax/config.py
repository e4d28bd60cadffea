"""Frozen model configuration built from a Hugging Face `config.json`.

One `ModelConfig` describes every decoder we run: the LLaMA family (LLaMA, Mistral,
ReluLLaMA, ProSparse, TurboSparse-style dReLU; Qwen2 with its q/k/v biases; Gemma 1 with its
GeGLU, scaled embeddings and (1 + w) RMSNorm) and OPT. The forward pass reads only this
dataclass, never the raw JSON, so every supported variant is visible here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from powerinfer_jax.errors import CheckpointError, PathNotFoundError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GemmaForCausalLM",
                           "OPTForCausalLM")

# FFN kinds. ReLU kinds are sparse by nature (inactive neurons contribute exactly zero);
# SwiGLU/GeGLU are made sparse by per-layer activation-magnitude thresholds (CATS-style,
# calibrated offline by `bin/prepare --target_sparsity`, stored in the bundle).
#   reglu : down(relu(gate x) * up x)          ReluLLaMA, ProSparse (hidden_act "relu")
#   drelu : down(relu(gate x) * relu(up x))    TurboSparse/Bamboo
#   swiglu: down(silu(gate x) * up x)          stock LLaMA/Mistral/Qwen2 (hidden_act "silu")
#   geglu : down(gelu_tanh(gate x) * up x)     Gemma (hidden_activation "gelu_pytorch_tanh")
#   relu  : down(relu(fc1 x + b1)) + b2        OPT
FFN_KINDS = ("reglu", "drelu", "swiglu", "geglu", "relu")
SPARSE_FFN_KINDS = ("reglu", "drelu", "relu")  # exact zeros: sparse with no threshold
THRESHOLD_FFN_KINDS = ("swiglu", "geglu")  # sparse through |act(gate x)| > per-layer threshold

# How a config marks dReLU: transformers has no dReLU activation, so a checkpoint says
# `"hidden_act": "drelu"` or keeps `"hidden_act": "relu"` and adds
# `"powerinfer_ffn": "drelu"` (the latter still loads in transformers' LlamaForCausalLM).
DRELU_CONFIG_KEY = "powerinfer_ffn"


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
    # q/k/v projections carry biases and o_proj none (Qwen2); `attention_bias` means all four do.
    qkv_bias: bool = False
    # Gemma: embeddings times sqrt(hidden_size) (rounded to the embedding table's dtype, as
    # transformers does), and RMSNorm scaling by (1 + weight) instead of weight.
    embed_scale: bool = False
    norm_unit_offset: bool = False

    @property
    def is_sparse_capable(self) -> bool:
        """Whether the sparse engine runs this FFN: a ReLU kind (exact zeros) or a threshold kind."""
        return self.ffn_kind in SPARSE_FFN_KINDS or self.ffn_kind in THRESHOLD_FFN_KINDS

    @property
    def needs_act_threshold(self) -> bool:
        """Whether sparsity needs per-layer activation thresholds (SwiGLU/GeGLU: never exactly zero)."""
        return self.ffn_kind in THRESHOLD_FFN_KINDS

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
        """Builds a config from the parsed contents of an HF `config.json`.

        A missing key, a value of the wrong type or out of range is a `CheckpointError` naming it
        (`UnsupportedModelError` for a well-formed option we do not run)."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"config.json must hold a JSON object, got {type(raw).__name__}")
        try:
            cfg = cls._from_hf_dict(raw)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as err:
            if isinstance(err, (UnsupportedModelError, CheckpointError)):
                raise
            detail = f"has no {err}" if isinstance(err, KeyError) else f"has a bad value ({err})"
            raise CheckpointError(f"config.json {detail}; restore it from the model's source") from None
        cfg._check()
        return cfg

    def _check(self) -> None:
        """Values that would divide by zero, index out of range, or make shapes contradict."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if v < 1 or v > 1 << 31:
                raise CheckpointError(f"config.json: {name} must be in [1, 2**31], got {v}")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(f"config.json: num_attention_heads ({self.num_heads}) must be a multiple of "
                                  f"num_key_value_heads ({self.num_kv_heads})")
        if self.family == "opt" and self.hidden_size % self.num_heads:
            raise CheckpointError(f"config.json: hidden_size ({self.hidden_size}) must be a multiple of "
                                  f"num_attention_heads ({self.num_heads})")
        if self.family == "llama" and self.head_dim % 2:
            raise CheckpointError(f"config.json: head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("norm_eps", "rope_theta"):
            v = getattr(self, name)
            if not (0 < v < float("inf")):
                raise CheckpointError(f"config.json: {name} must be a positive finite number, got {v}")
        if self.word_embed_proj_dim is not None and not 1 <= self.word_embed_proj_dim <= 1 << 31:
            raise CheckpointError(f"config.json: word_embed_proj_dim must be >= 1, got {self.word_embed_proj_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise CheckpointError(f"config.json: sliding_window must be >= 1, got {self.sliding_window}")
        for name, ids in (("bos_token_id", [] if self.bos_token_id is None else [self.bos_token_id]),
                          ("eos_token_id", list(self.eos_token_ids)),
                          ("pad_token_id", [] if self.pad_token_id is None else [self.pad_token_id])):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad and name != "pad_token_id":  # some checkpoints carry pad = -1; padding never reaches the model
                raise CheckpointError(f"config.json: {name} {bad[0]} is outside the vocabulary [0, {self.vocab_size})")

    @classmethod
    def _from_hf_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        archs = raw.get("architectures") or []
        if not isinstance(archs, list):
            raise CheckpointError(f"config.json: architectures must be a list, got {archs!r:.60}")
        arch = archs[0] if archs else _arch_from_model_type(raw.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {arch!r} (model_type={raw.get('model_type')!r}); "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        eos = raw.get("eos_token_id")
        eos_ids = tuple(_int(raw, "eos_token_id", e) for e in eos) if isinstance(eos, list) else (
            () if eos is None else (_int(raw, "eos_token_id"),))
        dtype = raw.get("torch_dtype") or raw.get("dtype")
        common = dict(
            architecture=arch,
            vocab_size=_int(raw, "vocab_size"),
            hidden_size=_int(raw, "hidden_size"),
            num_layers=_int(raw, "num_hidden_layers"),
            num_heads=_int(raw, "num_attention_heads"),
            max_position_embeddings=_int(raw, "max_position_embeddings", raw.get("max_position_embeddings", 2048)),
            bos_token_id=None if raw.get("bos_token_id") is None else _int(raw, "bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=None if raw.get("pad_token_id") is None else _int(raw, "pad_token_id"),
            torch_dtype=dtype if isinstance(dtype, str) else None,
        )
        if arch == "OPTForCausalLM":
            return cls._opt(raw, common)
        return cls._llama(raw, common)

    @classmethod
    def _llama(cls, raw: dict[str, Any], common: dict[str, Any]) -> "ModelConfig":
        arch = common["architecture"]
        gemma = arch == "GemmaForCausalLM"
        act = raw.get("hidden_act", "silu")
        marker = raw.get(DRELU_CONFIG_KEY)
        if gemma:
            ffn_kind = _gemma_ffn_kind(raw)
        elif act == "drelu" or (act == "relu" and marker == "drelu"):
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
        if scaling is not None and not isinstance(scaling, dict):
            raise CheckpointError(f"config.json: rope_scaling must be an object or null, got {scaling!r:.60}")
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise UnsupportedModelError(
                    f"unsupported rope_scaling type {kind!r}; supported: llama3, linear, default"
                )
            needs = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                       "original_max_position_embeddings")}.get(kind, ())
            for key in needs:  # positive numbers the rotary frequencies divide by
                if not 0 < _float(scaling, key) < float("inf"):
                    raise CheckpointError(f"config.json: rope_scaling {key} must be a positive number, "
                                          f"got {scaling[key]!r:.60}")
            if kind == "llama3" and scaling["low_freq_factor"] == scaling["high_freq_factor"]:
                raise CheckpointError("config.json: rope_scaling low_freq_factor equals high_freq_factor")
            scaling = tuple(sorted((k, v) for k, v in scaling.items() if not isinstance(v, (list, dict))))
        heads = common["num_heads"]
        # Gemma's config class defaults head_dim to 256 (not hidden_size / heads) when the key is absent.
        head_dim = raw.get("head_dim") or (256 if gemma else common["hidden_size"] // heads)
        window = raw.get("sliding_window") if arch == "MistralForCausalLM" else None
        if arch == "Qwen2ForCausalLM":
            window = _qwen2_window(raw, common)
        if gemma and raw.get("use_bidirectional_attention"):
            raise UnsupportedModelError("use_bidirectional_attention=True is not supported (causal decoders only)")
        qwen2 = arch == "Qwen2ForCausalLM"  # q/k/v always carry biases, o_proj never
        return cls(
            family="llama",
            ffn_kind=ffn_kind,
            intermediate_size=_int(raw, "intermediate_size"),
            num_kv_heads=_int(raw, "num_key_value_heads", raw.get("num_key_value_heads") or heads),
            head_dim=_int(raw, "head_dim", head_dim),
            norm_eps=_float(raw, "rms_norm_eps", raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", gemma)),  # Gemma's default: tied
            attention_bias=False if qwen2 else bool(raw.get("attention_bias", False)),
            sliding_window=_int(raw, "sliding_window", window) if window else None,
            qkv_bias=qwen2,
            embed_scale=gemma,
            norm_unit_offset=gemma,
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
            intermediate_size=_int(raw, "ffn_dim"),
            num_kv_heads=heads,
            head_dim=common["hidden_size"] // heads,
            norm_eps=1e-5,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
            attention_bias=True,
            pre_layer_norm=pre_ln,
            word_embed_proj_dim=_int(raw, "word_embed_proj_dim", proj),
            final_layer_norm=pre_ln and not raw.get("_remove_final_layer_norm", False),
            **common,
        )


_MISSING = object()


def _int(raw: dict, key: str, value=_MISSING) -> int:
    """raw[key] (or `value`) as an int: a JSON integer (or an integral float), never a bool or string."""
    v = raw[key] if value is _MISSING else value
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**63:
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise CheckpointError(f"config.json: {key} must be an integer, got {v!r:.60}")
    return v


def _float(raw: dict, key: str, value=_MISSING) -> float:
    """raw[key] (or `value`) as a float: a JSON number, never a bool or string."""
    v = raw[key] if value is _MISSING else value
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise CheckpointError(f"config.json: {key} must be a number, got {v!r:.60}")
    return float(v)


def _arch_from_model_type(model_type: str | None) -> str | None:
    return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "opt": "OPTForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM"}.get(model_type or "")


# Activations that are GELU's tanh approximation (`jax.nn.gelu(approximate=True)`), the FFN kind "geglu".
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_python_tanh", "gelu_new")


def _gemma_ffn_kind(raw: dict) -> str:
    """Gemma's FFN: GeGLU with tanh-GELU. transformers 4.x reads `hidden_activation` (absent: tanh GELU)
    and ignores `hidden_act`; 5.x reads `hidden_act` and maps its legacy value "gelu" to tanh GELU. So:
    `hidden_activation` when set, else `hidden_act`, where "gelu" means the tanh approximation."""
    act = raw.get("hidden_activation")
    key = "hidden_activation"
    if act is None:
        act, key = raw.get("hidden_act", "gelu_pytorch_tanh"), "hidden_act"
        if act == "gelu":  # the official releases' legacy value, meant as the tanh approximation
            act = "gelu_pytorch_tanh"
    if act not in _GELU_TANH:
        raise UnsupportedModelError(
            f"unsupported activation {key}={act!r:.60} for GemmaForCausalLM; supported: "
            f"{', '.join(repr(a) for a in _GELU_TANH)} (GeGLU with tanh GELU)")
    return "geglu"


def _qwen2_window(raw: dict, common: dict) -> int | None:
    """Qwen2's sliding window, when it can bite: on with `use_sliding_window`, for the layers from
    `max_window_layers` on (or those `layer_types` marks "sliding_attention"). Every layer sliding
    runs as Mistral's window does; a window covering every position is no window; a mix of sliding
    and full layers is refused."""
    window = raw.get("sliding_window")
    if not raw.get("use_sliding_window") or window is None:
        return None
    window = _int(raw, "sliding_window")
    n = common["num_layers"]
    types = raw.get("layer_types")
    if types is None:
        first = _int(raw, "max_window_layers", raw.get("max_window_layers", 28))
        sliding = [i >= first for i in range(n)]
    else:
        if not isinstance(types, list) or len(types) != n:
            raise CheckpointError(f"config.json: layer_types must be a list of {n} layer types, got {types!r:.60}")
        sliding = [t == "sliding_attention" for t in types]
    if not any(sliding) or window >= common["max_position_embeddings"]:
        return None
    if not all(sliding):
        raise UnsupportedModelError(
            f"Qwen2 with use_sliding_window=True on {sum(sliding)} of {n} layers (max_window_layers / layer_types) "
            f"and sliding_window={window} < max_position_embeddings is not supported: only a window on every "
            "layer (max_window_layers=0) or none")
    return window


def load_config(model_dir: str | os.PathLike) -> ModelConfig:
    """Reads `config.json` from an HF model folder."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise PathNotFoundError(f"model folder not found: {model_dir}")
    if not os.path.isfile(path):
        raise PathNotFoundError(f"no config.json in {model_dir}: not a Hugging Face model folder")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError
        msg = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is not valid JSON ({msg}); restore it from the model's source") from None
    try:
        return ModelConfig.from_hf_dict(raw)
    except CheckpointError as err:
        if str(err).startswith("config.json"):  # name the file the user has to fix
            raise CheckpointError(path + str(err)[len("config.json"):]) from None
        raise

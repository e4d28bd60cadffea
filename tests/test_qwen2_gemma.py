"""Qwen2 and Gemma (v1) beyond float32 parity (which `tests/test_parity_hf.py` covers): config parsing,
stored-precision and int8 loads, export back to HF, the engine-layout weights file, and loading errors.

Tolerances: max|ours - ref| / max|ref| over the logits of a 48-token sequence:
  * stored bf16 checkpoint vs transformers computing in float32 on the same stored weights: 1e-4;
  * int8 vs the float32 engine on its dequantized weights, and vs transformers on an export of them: 1e-4;
  * int8 vs the unquantized model: 3e-2 (quantization error itself; a sanity bound).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import powerinfer_jax as pij
from hf_models import VOCAB, make_gemma, make_qwen2
from ops.quant import Weight
from powerinfer_jax.config import ModelConfig
from powerinfer_jax.engine import Engine
from powerinfer_jax.loading import engine_params, load_engine_weights, load_params, save_engine_weights, to_device

SEQ = 48
MODELS = {"qwen2": make_qwen2, "gemma": make_gemma}


def _ids(seed=0, n=SEQ):
    return [1] + np.random.default_rng(seed).integers(3, VOCAB, n - 1).tolist()


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (float32 folder, bfloat16 folder), saved by transformers."""
    out = {}
    for name, make in MODELS.items():
        base = str(tmp_path_factory.mktemp(name))
        model = make(base)
        half = str(tmp_path_factory.mktemp(name + "_bf16"))
        model.to(torch.bfloat16).save_pretrained(half, safe_serialization=True)
        out[name] = (base, half)
    return out


# ---- config parsing ----

def _qwen2_raw(**kw):
    raw = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 100, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 1024, "hidden_act": "silu", "rope_theta": 1e6}
    raw.update(kw)
    return raw


def _gemma_raw(**kw):
    raw = {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "vocab_size": 100, "hidden_size": 48,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
           "max_position_embeddings": 1024}
    raw.update(kw)
    return raw


def test_qwen2_config():
    cfg = ModelConfig.from_hf_dict(_qwen2_raw())
    assert (cfg.family, cfg.ffn_kind, cfg.qkv_bias, cfg.attention_bias) == ("llama", "swiglu", True, False)
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.rope_theta, cfg.tie_word_embeddings) == (16, 2, 1e6, False)
    assert not (cfg.embed_scale or cfg.norm_unit_offset) and cfg.sliding_window is None
    # model_type alone names the architecture
    raw = _qwen2_raw()
    del raw["architectures"]
    assert ModelConfig.from_hf_dict(raw).architecture == "Qwen2ForCausalLM"


def test_qwen2_sliding_window():
    parse = lambda **kw: ModelConfig.from_hf_dict(_qwen2_raw(**kw)).sliding_window  # noqa: E731
    assert parse(use_sliding_window=False, sliding_window=16) is None  # off unless use_sliding_window
    assert parse(use_sliding_window=True, sliding_window=16, max_window_layers=0) == 16  # every layer: as Mistral
    assert parse(use_sliding_window=True, sliding_window=16, max_window_layers=4) is None  # no layer slides
    assert parse(use_sliding_window=True, sliding_window=4096, max_window_layers=2) is None  # covers every position
    assert parse(use_sliding_window=True, sliding_window=16, layer_types=["sliding_attention"] * 4) == 16
    with pytest.raises(pij.UnsupportedModelError, match="use_sliding_window=True on 2 of 4 layers"):
        parse(use_sliding_window=True, sliding_window=16, max_window_layers=2)
    with pytest.raises(pij.UnsupportedModelError, match="sliding_window=16"):
        parse(use_sliding_window=True, sliding_window=16, layer_types=["full_attention", "sliding_attention"] * 2)
    with pytest.raises(pij.CheckpointError, match="layer_types"):
        parse(use_sliding_window=True, sliding_window=16, layer_types=["sliding_attention"])


def test_gemma_config():
    cfg = ModelConfig.from_hf_dict(_gemma_raw())
    # GemmaConfig's defaults: head_dim 256 (not hidden/heads), tied head, tanh-GELU GeGLU
    assert (cfg.ffn_kind, cfg.head_dim, cfg.tie_word_embeddings, cfg.num_kv_heads) == ("geglu", 256, True, 1)
    assert cfg.embed_scale and cfg.norm_unit_offset and not cfg.qkv_bias
    # the official releases' legacy hidden_act "gelu" means the tanh approximation (transformers maps it)
    assert ModelConfig.from_hf_dict(_gemma_raw(hidden_act="gelu", head_dim=12)).ffn_kind == "geglu"
    assert ModelConfig.from_hf_dict(_gemma_raw(hidden_act="gelu", hidden_activation="gelu_pytorch_tanh",
                                               tie_word_embeddings=False)).ffn_kind == "geglu"
    # hidden_activation wins over hidden_act; the exact (erf) GELU is not what geglu computes
    with pytest.raises(pij.UnsupportedModelError, match="hidden_activation='gelu'.*gelu_pytorch_tanh"):
        ModelConfig.from_hf_dict(_gemma_raw(hidden_activation="gelu"))
    with pytest.raises(pij.UnsupportedModelError, match="hidden_act='silu'"):
        ModelConfig.from_hf_dict(_gemma_raw(hidden_act="silu"))
    with pytest.raises(pij.UnsupportedModelError, match="use_bidirectional_attention"):
        ModelConfig.from_hf_dict(_gemma_raw(use_bidirectional_attention=True))


def test_unsupported_architecture_lists_qwen2_and_gemma():
    with pytest.raises(pij.UnsupportedModelError,
                       match=r"unsupported architecture 'Gemma2ForCausalLM'.*Qwen2ForCausalLM.*GemmaForCausalLM"):
        ModelConfig.from_hf_dict(_gemma_raw(architectures=["Gemma2ForCausalLM"], model_type="gemma2"))


def test_embed_normalizer_is_rounded_to_the_table_dtype():
    """transformers multiplies by torch.tensor(sqrt(d)).to(weight dtype): bf16 sqrt(3072) is 55.5."""
    import jax.numpy as jnp

    from powerinfer_jax.model import embed_normalizer

    cfg = ModelConfig.from_hf_dict(_gemma_raw(hidden_size=3072, num_attention_heads=16))
    assert embed_normalizer(cfg, np.zeros((2, 2), np.float32)) == float(np.float32(3072 ** 0.5))
    assert embed_normalizer(cfg, jnp.zeros((2, 2), jnp.bfloat16)) == 55.5
    assert embed_normalizer(cfg, Weight(np.zeros((2, 2), np.uint16), None, "float16", 2)) == float(
        np.float16(np.float32(3072 ** 0.5)))


# ---- precision, quantization, export ----

@pytest.mark.parametrize("name", sorted(MODELS))
def test_stored_bf16_matches_transformers(checkpoints, name):
    path = checkpoints[name][1]
    engine = pij.load(path, kv_dtype="float32")  # an exact cache: the weights' precision alone
    assert engine.params.layers[0].attn.wqkv.fmt == "bfloat16"
    if name == "qwen2":
        assert engine.params.layers[0].attn.bqkv.shape == ((4 + 2 * 2) * 16,)
    ids = _ids()
    assert _rel(engine.logits(ids), _hf_logits(_hf(path), ids)) <= 1e-4


def test_gemma_bf16_table_scales_embeddings_as_transformers_in_bf16(tmp_path):
    """hidden 72: sqrt(72) = 8.485 is 8.5 in bf16. A bf16 table gets bf16's multiplier (what transformers
    running the checkpoint in bf16 uses); transformers in float32 on the same weights uses 8.485."""
    make_gemma(str(tmp_path / "f32"), hidden_size=72, head_dim=16)
    hf = _hf(str(tmp_path / "f32"))
    hf.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"), safe_serialization=True)
    hf = _hf(str(tmp_path / "bf16"))
    ids = _ids(4)
    ours = pij.load(str(tmp_path / "bf16"), kv_dtype="float32").logits(ids)
    hf.model.embed_tokens.embed_scale = torch.tensor(8.5)
    assert _rel(ours, _hf_logits(hf, ids)) <= 1e-4
    as_f32 = pij.load(str(tmp_path / "bf16"), dtype="float32").logits(ids)  # float32 table: 8.485
    hf.model.embed_tokens.embed_scale = torch.tensor(72 ** 0.5)
    assert _rel(as_f32, _hf_logits(hf, ids)) <= 1e-4


@pytest.mark.parametrize("name", sorted(MODELS))
def test_int8_load_export_and_generate(checkpoints, tmp_path, name):
    from powerinfer_jax.export import save_hf_checkpoint

    base = checkpoints[name][0]
    engine = pij.load(base, quantize="int8")
    assert engine.params.layers[0].attn.wqkv.fmt == "int8" and engine.params.layers[0].ffn.w_gate.fmt == "int8"
    ids = _ids(1)
    ours = engine.logits(ids)
    ref = Engine(engine.cfg, to_device(engine_params(engine.params, dtype="float32")))
    assert _rel(ours, ref.logits(ids)) <= 1e-4
    assert _rel(ours, pij.load(base).logits(ids)) <= 3e-2
    # the dequantized weights exported as an HF checkpoint: transformers computes what we compute
    out = str(tmp_path / "export")
    save_hf_checkpoint(engine.params, engine.cfg, out, dtype="float32")
    hf = _hf(out)
    assert type(hf).__name__ == engine.cfg.architecture
    assert _rel(ours, _hf_logits(hf, ids)) <= 1e-4
    reloaded = pij.load(out)
    assert reloaded.cfg == dataclasses.replace(engine.cfg, torch_dtype="float32")
    np.testing.assert_allclose(reloaded.logits(ids), ref.logits(ids), rtol=0, atol=1e-5 * np.abs(ours).max())
    prompt = _ids(3, 8)
    greedy = engine.generate(prompt, max_new_tokens=12, temperature=0.0, stop_at_eos=False).token_ids
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                             min_new_tokens=12, pad_token_id=0)
    assert greedy == theirs[0, len(prompt):].tolist()


def test_qwen2_sliding_window_exports(checkpoints, tmp_path):
    from powerinfer_jax.export import llama_hf_config

    cfg = ModelConfig.from_hf_dict(_qwen2_raw(use_sliding_window=True, sliding_window=16, max_window_layers=0,
                                              rope_scaling={"rope_type": "linear", "factor": 2.0}))
    raw = llama_hf_config(cfg)
    assert raw["model_type"] == "qwen2" and "attention_bias" not in raw
    assert ModelConfig.from_hf_dict(raw) == cfg


@pytest.mark.parametrize("name", sorted(MODELS))
def test_to_transformers_on_shared_weights(checkpoints, name):
    from powerinfer_jax.export import to_transformers

    base = checkpoints[name][0]
    engine = pij.load(base)
    ids = _ids(2)
    model = to_transformers(engine.params, engine.cfg)
    assert _rel(engine.logits(ids), _hf_logits(model, ids)) <= 1e-4


@pytest.mark.parametrize("name", sorted(MODELS))
def test_engine_weights_file_round_trip(checkpoints, tmp_path, name):
    base = checkpoints[name][1]
    cfg = pij.load_config(base)
    host = load_params(base, cfg, quantize="int8", on_host=True)
    path = str(tmp_path / "weights_int8.safetensors")
    save_engine_weights(host, path)
    mapped = load_engine_weights(path, cfg)
    ids = _ids(5)
    np.testing.assert_array_equal(Engine(cfg, mapped).logits(ids), Engine(cfg, to_device(host)).logits(ids))


def test_qwen2_missing_qkv_bias_is_named(checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file

    base = checkpoints["qwen2"][0]
    out = tmp_path / "broken"
    out.mkdir()
    tensors = load_file(os.path.join(base, "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
    save_file(tensors, str(out / "model.safetensors"))
    with open(os.path.join(base, "config.json")) as f:
        (out / "config.json").write_text(json.dumps(json.load(f)))
    with pytest.raises(pij.CheckpointError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_proj\.bias.*"
                                                   r"unexpected tensors: model\.layers\.0\.self_attn\.o_proj\.bias"):
        pij.load(str(out))

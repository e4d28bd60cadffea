"""Sharded checkpoints, the export round trip, and clear errors for bad inputs."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import powerinfer_jax as pij
from hf_models import make_llama, make_opt


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    make_llama(path)
    return path


def _copy(src, tmp_path, name="m"):
    dst = os.path.join(tmp_path, name)
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def test_sharded_checkpoint_loads_identically(tmp_path, llama_dir):
    from transformers import LlamaForCausalLM

    sharded = os.path.join(tmp_path, "sharded")
    LlamaForCausalLM.from_pretrained(llama_dir).save_pretrained(sharded, max_shard_size="100KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    ids = list(range(1, 30))
    np.testing.assert_array_equal(pij.load(sharded).logits(ids), pij.load(llama_dir).logits(ids))


def test_missing_model_folder():
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        pij.load("/nonexistent/model")


def test_missing_config(tmp_path, llama_dir):
    path = _copy(llama_dir, tmp_path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        pij.load(path)


def test_unknown_architecture(tmp_path, llama_dir):
    path = _copy(llama_dir, tmp_path)
    _edit_config(path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(pij.UnsupportedModelError, match=r"unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"):
        pij.load(path)


def test_unsupported_activation(tmp_path, llama_dir):
    path = _copy(llama_dir, tmp_path)
    _edit_config(path, hidden_act="gelu")
    with pytest.raises(pij.UnsupportedModelError, match=r"unsupported activation hidden_act='gelu'.*'relu'"):
        pij.load(path)


def test_unsupported_opt_activation(tmp_path):
    path = str(tmp_path / "opt")
    make_opt(path)
    _edit_config(path, activation_function="gelu")
    with pytest.raises(pij.UnsupportedModelError, match="activation_function='gelu'"):
        pij.load(path)


def test_truncated_safetensors(tmp_path, llama_dir):
    path = _copy(llama_dir, tmp_path)
    f = os.path.join(path, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(pij.CheckpointError, match="truncated"):
        pij.load(path)


def test_missing_tensor_is_named(tmp_path, llama_dir):
    from safetensors.numpy import load_file, save_file

    path = _copy(llama_dir, tmp_path)
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(pij.CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        pij.load(path)


def test_unexpected_and_misshaped_tensors_are_named(tmp_path, llama_dir):
    from safetensors.numpy import load_file, save_file

    path = _copy(llama_dir, tmp_path)
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
    tensors["model.norm.weight"] = np.zeros((3,), np.float32)
    save_file(tensors, f)
    with pytest.raises(pij.CheckpointError) as err:
        pij.load(path)
    assert "unexpected tensors: model.layers.0.mlp.extra.weight" in str(err.value)
    assert "model.norm.weight: expected (64,), got (3,)" in str(err.value)


def test_no_safetensors(tmp_path, llama_dir):
    path = _copy(llama_dir, tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(pij.CheckpointError, match="no model.safetensors"):
        pij.load(path)


def test_bad_dtype(llama_dir):
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        pij.load(llama_dir, dtype="int8")


def test_bfloat16_storage_close_to_float32(llama_dir):
    ids = list(range(1, 40))
    ref = pij.load(llama_dir).logits(ids)
    bf = pij.load(llama_dir, dtype="bfloat16").logits(ids)
    assert np.abs(bf - ref).max() / np.abs(ref).max() < 3e-2


def test_export_round_trip_is_exact(tmp_path, llama_dir):
    from powerinfer_jax.export import save_hf_checkpoint

    engine = pij.load(llama_dir)
    out = str(tmp_path / "exported")
    save_hf_checkpoint(engine.params, engine.cfg, out, dtype="float32")
    ids = list(range(1, 30))
    np.testing.assert_array_equal(pij.load(out).logits(ids), engine.logits(ids))


def test_generation_input_errors(llama_dir):
    engine = pij.load(llama_dir, max_seq_len=64)
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        engine.generate([1, 2, 3], max_new_tokens=100)
    with pytest.raises(ValueError, match="out of range"):
        engine.generate([1, 100000], max_new_tokens=2)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([], max_new_tokens=2)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        engine.generate("text without a tokenizer", max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p must be"):
        engine.generate([1, 2], max_new_tokens=2, top_p=0.0)

"""The offline pipeline end to end on a tiny model: prepare -> load(predicted, budget) -> generate,
budget accounting, re-use on a new budget, and clear errors for bad inputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import powerinfer_jax as pij
from hf_models import make_llama
from offline import bundle, memory, predictors, profiler
from offline.train_model import train_tokenizer
from offline.pipeline import DEFAULT_CORPUS

PROFILE = profiler.ProfileSettings(window=64, batch=8, max_tokens=4096, max_samples=3000, min_tokens=512)
PRED = predictors.TrainSettings(max_epochs=3, max_attempts=1, try_halve=False, initial_rank=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random ReGLU LLaMA with a real BPE tokenizer, and a small corpus file."""
    root = tmp_path_factory.mktemp("pipeline")
    text = DEFAULT_CORPUS.read_text(encoding="utf-8")[:60000]
    tok = train_tokenizer(text, 300)
    model_dir = str(root / "model")
    make_llama(model_dir, vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=256)
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    corpus = root / "corpus.txt"
    corpus.write_text(text)
    return model_dir, str(corpus), root


def _budget(cfg, fraction, pred_bytes, max_context=64):
    fixed = sum(b for _, b in memory.fixed_groups(cfg, "float32", pred_bytes, max_context))
    return fixed + int(fraction * memory.ffn_total_bytes(cfg, "float32"))


@pytest.fixture(scope="module")
def prepared(tiny):
    model_dir, corpus, root = tiny
    out = str(root / "prepared")
    logs = []
    manifest = bundle.prepare(model_dir, [corpus], out, None, PROFILE, PRED, log=logs.append)
    return out, manifest, logs


def test_prepare_writes_a_complete_bundle(prepared, tiny):
    out, manifest, logs = prepared
    assert manifest["format_version"] == bundle.FORMAT_VERSION
    assert set(manifest["model"]["sha256"]) == {"config.json", "model.safetensors"}
    assert manifest["tools"]["jax"] and manifest["predictor_bytes"] > 0
    b = bundle.load_bundle(out)
    assert b.counts.shape == (2, 256) and b.tokens > 0
    assert len(b.predictors) == 2
    assert os.path.isfile(os.path.join(out, "profile", "frequency_curves.png"))


def test_new_budget_only_resolves_placement(prepared, tiny):
    out, manifest, _ = prepared
    model_dir, corpus, _ = tiny
    from powerinfer_jax.config import load_config

    cfg = load_config(model_dir)
    logs = []
    budget = _budget(cfg, 0.3, manifest["predictor_bytes"], 1024)
    m2 = bundle.prepare(model_dir, [corpus], out, bundle.PlacementSettings(budget_bytes=budget, batch=16),
                        PROFILE, PRED, log=logs.append)
    assert "profile: up to date, re-used" in logs and "predictors: up to date, re-used" in logs
    rec = bundle.load_bundle(out).placement()
    hot = sum(len(h) for h in rec["placement"]["hot_indices"])
    assert 0 < hot < 2 * 256
    assert rec["device_plan"]["ffn_budget"] >= hot * memory.neuron_bytes(cfg, "float32")
    assert m2["current_placement"] in m2["placements"]


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_predicted_engine_respects_the_budget(prepared, fraction):
    out, manifest, _ = prepared
    from powerinfer_jax.config import load_config

    cfg = load_config(bundle.load_bundle(out).model_dir)
    budget = _budget(cfg, fraction, manifest["predictor_bytes"])
    eng = pij.load(out, sparsity="predicted", device_memory_budget=budget, max_seq_len=64)
    rep = eng.memory_report()
    planned = rep["placement"]["device_plan"]
    accounted = planned["budget"] - planned["ffn_budget"] + sum(rep["hot_neurons_per_layer"]) * planned["neuron_bytes"]
    assert rep["device_total"] <= budget
    assert abs(rep["device_total"] - accounted) <= 0.01 * accounted
    res = eng.generate("To be", max_new_tokens=8, stop_at_eos=False)
    assert len(res.token_ids) == 8
    assert 0 < res.stats["ffn_computed"] <= res.stats["ffn_total"]


def test_budget_too_small_is_explained(prepared):
    out, _, _ = prepared
    with pytest.raises(memory.BudgetTooSmallError, match=r"too small: the parts that must sit on the device need"):
        pij.load(out, sparsity="predicted", device_memory_budget="10KB", max_seq_len=64)


def test_bundle_not_matching_its_model(tmp_path, prepared, tiny):
    import shutil

    out, _, _ = prepared
    model_dir, _, _ = tiny
    copy_model = tmp_path / "model"
    shutil.copytree(model_dir, copy_model)
    copy_bundle = tmp_path / "prepared"
    shutil.copytree(out, copy_bundle)
    manifest = json.loads((copy_bundle / "manifest.json").read_text())
    manifest["model"]["path"] = str(copy_model)
    (copy_bundle / "manifest.json").write_text(json.dumps(manifest))
    with open(copy_model / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(bundle.BundleError, match="does not match its model"):
        pij.load(str(copy_bundle))


def test_empty_and_short_corpus(tmp_path, tiny):
    model_dir, _, _ = tiny
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(profiler.CorpusError, match="corpus is empty"):
        bundle.prepare(model_dir, [str(empty)], str(tmp_path / "b1"), None, PROFILE, PRED, log=lambda m: None)
    short = tmp_path / "short.txt"
    short.write_text("To be or not to be.")
    with pytest.raises(profiler.CorpusError, match="corpus too short"):
        bundle.prepare(model_dir, [str(short)], str(tmp_path / "b2"), None, PROFILE, PRED, log=lambda m: None)
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        bundle.prepare(model_dir, [str(tmp_path / "nope.txt")], str(tmp_path / "b3"), None, PROFILE, PRED)


def test_non_relu_model_is_refused(tmp_path):
    path = str(tmp_path / "swiglu")
    make_llama(path, act="silu")
    with pytest.raises(ValueError, match=r"has no ReLU.*supported families"):
        bundle.prepare(path, None, str(tmp_path / "b"), None, PROFILE, PRED)


def test_predicted_needs_a_bundle(tiny):
    model_dir, _, _ = tiny
    with pytest.raises(ValueError, match="needs a prepared bundle"):
        pij.load(model_dir, sparsity="predicted")
    with pytest.raises(ValueError, match="device_memory_budget needs activation statistics"):
        pij.load(model_dir, sparsity="oracle", device_memory_budget="1MB")


def test_parse_bytes():
    assert memory.parse_bytes("1.5GiB") == int(1.5 * 2**30)
    assert memory.parse_bytes("800MB") == 800 * 10**6
    assert memory.parse_bytes(1234) == 1234
    with pytest.raises(ValueError, match="cannot parse a byte size"):
        memory.parse_bytes("lots")

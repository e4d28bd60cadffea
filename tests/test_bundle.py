"""The offline pipeline end to end on a tiny model: prepare -> load(predicted, budget) -> generate,
budget accounting, re-use on a new budget, and clear errors for bad inputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import powerinfer_jax as pij
from hf_models import make_llama
from offline import bundle, predictors, profiler
from powerinfer_jax.bundle import BundleError, load_bundle
from powerinfer_jax import memory
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
    b = load_bundle(out)
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
    rec = load_bundle(out).placement()
    hot = sum(len(h) for h in rec["placement"]["hot_indices"])
    assert 0 < hot < 2 * 256
    assert rec["device_plan"]["ffn_budget"] >= hot * memory.neuron_bytes(cfg, "float32")
    assert m2["current_placement"] in m2["placements"]


def test_changed_corpus_drops_old_placements(prepared, tiny, tmp_path):
    """Placements solved from another corpus's profile are deleted, so a load cannot find one by its name."""
    import shutil

    out, manifest, _ = prepared
    model_dir, corpus, _ = tiny
    from powerinfer_jax.config import load_config

    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    ps = bundle.PlacementSettings(budget_bytes=_budget(load_config(model_dir), 0.3, manifest["predictor_bytes"], 1024),
                                  batch=16)
    bundle.prepare(model_dir, [corpus], copy, ps, PROFILE, PRED, log=lambda m: None)
    assert load_bundle(copy).stored_placement(ps) is not None
    other = tmp_path / "other.txt"
    other.write_text(open(corpus, encoding="utf-8").read()[::-1])
    m = bundle.prepare(model_dir, [str(other)], copy, None, PROFILE, PRED, log=lambda m: None)
    assert m["placements"] == [] and load_bundle(copy).stored_placement(ps) is None


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_predicted_engine_respects_the_budget(prepared, fraction):
    out, manifest, _ = prepared
    from powerinfer_jax.config import load_config

    cfg = load_config(load_bundle(out).model_dir)
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


@pytest.mark.parametrize("old_manifest", [False, True])
def test_bundle_not_matching_its_model(tmp_path, prepared, tiny, old_manifest):
    """Caught by the fingerprint, and by the full hash for a manifest written before fingerprints."""
    import shutil

    out, _, _ = prepared
    model_dir, _, _ = tiny
    copy_model = tmp_path / "model"
    shutil.copytree(model_dir, copy_model)
    copy_bundle = tmp_path / "prepared"
    shutil.copytree(out, copy_bundle)
    manifest = json.loads((copy_bundle / "manifest.json").read_text())
    manifest["model"]["path"] = str(copy_model)
    assert set(manifest["model"].pop("fingerprint") if old_manifest else manifest["model"]["fingerprint"]) == \
        {"config.json", "model.safetensors"}
    (copy_bundle / "manifest.json").write_text(json.dumps(manifest))
    with open(copy_model / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match="does not match its model"):
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


def test_swiglu_model_needs_a_target_sparsity(tmp_path):
    """A SwiGLU FFN is never exactly zero: preparing it without --target_sparsity is refused up front."""
    path = str(tmp_path / "swiglu")
    make_llama(path, act="silu")
    with pytest.raises(ValueError, match=r"swiglu model .* give --target_sparsity"):
        bundle.prepare(path, None, str(tmp_path / "b"), None, PROFILE, PRED)
    assert not os.path.exists(str(tmp_path / "b" / "profile"))


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


def test_fingerprint_samples_blocks_and_full_verification_reads_all(tmp_path):
    """The cheap check sees the header, the ends and sampled blocks; a byte between them needs
    verify="full" (documented in powerinfer_jax/bundle.py)."""
    from powerinfer_jax.bundle import file_fingerprint, sha256_file

    path = tmp_path / "w.safetensors"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes())
    path.write_bytes(bytes(data))
    fp, full = file_fingerprint(str(path)), sha256_file(str(path))
    for offset, seen_by_fingerprint in ((10, True), ((8 << 20) - 5, True), ((3 << 20) + 100, False)):
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        path.write_bytes(bytes(changed))
        assert (file_fingerprint(str(path)) != fp) == seen_by_fingerprint
        assert sha256_file(str(path)) != full
    path.write_bytes(bytes(data[:-1]))  # truncated by one byte
    assert file_fingerprint(str(path)) != fp


def test_loading_at_a_new_budget_solves_in_memory_and_writes_nothing(prepared):
    """A budget without a stored placement is solved at load; the bundle folder is left as it was
    (bin/prepare --budget is what stores placements)."""
    out, _, _ = prepared
    cfg = pij.load_config(load_bundle(out).model_dir)

    def snapshot():
        return sorted((os.path.relpath(os.path.join(d, f), out), os.stat(os.path.join(d, f)).st_mtime_ns)
                      for d, _, files in os.walk(out) for f in files)

    before = snapshot()
    budget = _budget(cfg, 0.37, load_bundle(out).predictors.nbytes)
    eng = pij.load(out, sparsity="predicted", device_memory_budget=budget, max_seq_len=64)
    assert eng.placement_info["kind"] == "milp"
    assert snapshot() == before


def test_the_library_imports_the_offline_pipeline_only_to_solve_a_placement():
    """No import cycle: powerinfer_jax never imports offline/ at module level; the one lazy import is
    the MILP solver, for a budget whose placement the bundle does not store."""
    import ast
    import pathlib

    class Imports(ast.NodeVisitor):
        def __init__(self, name):
            self.name, self.stack, self.found = name, [], set()

        def visit_FunctionDef(self, node):
            self.stack.append(node.name)
            self.generic_visit(node)
            self.stack.pop()

        def visit_Import(self, node):
            for a in node.names:
                if a.name.split(".")[0] == "offline":
                    self.found.add((self.name, self.stack[-1] if self.stack else None, a.name))

        def visit_ImportFrom(self, node):
            if (node.module or "").split(".")[0] == "offline":
                for a in node.names:
                    self.found.add((self.name, self.stack[-1] if self.stack else None, f"{node.module}.{a.name}"))

    found = set()
    for path in sorted(pathlib.Path(pij.__file__).parent.glob("*.py")):
        v = Imports(path.name)
        v.visit(ast.parse(path.read_text()))
        found |= v.found
    assert found == {("hybrid.py", "load_hybrid", "offline.bundle.solve_placement")}

"""Precision policy, weight-only quantization and copy-free loading, end to end on tiny random
checkpoints of every family.

Tolerances: max|ours - ref| / max|ref| over the logits of a 48-token sequence.
  * stored bf16 / f16 checkpoint vs transformers on the same stored weights, computed in float32: 1e-4
    (only float32 rounding differs: both widen the same 16-bit values exactly);
  * int8 / int4 engine vs the float32 engine on its dequantized weights, and (LLaMA family) vs
    transformers on an export of those weights: 1e-4 (the integer kernels match dequantize-then-f32);
  * int8 vs the unquantized model: 3e-2, int4: 3e-1 (quantization error itself; a sanity bound);
  * oracle sparsity vs dense in every format: 1e-4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import powerinfer_jax as pij
from hf_models import VOCAB, make_llama, make_opt
from ops.quant import Weight
from powerinfer_jax.engine import Engine
from powerinfer_jax.loading import (CheckpointError, engine_params, load_engine_weights, load_params,
                                    save_engine_weights, to_device)

SEQ = 48
FAMILIES = {
    "llama_reglu": lambda p: make_llama(p, act="relu"),
    "llama_swiglu_gqa_tied": lambda p: make_llama(p, act="silu", num_key_value_heads=2, tie_word_embeddings=True),
    "llama_drelu": lambda p: make_llama(p, act="relu", drelu=True),
    "opt_post_ln_project_in_out": lambda p: make_opt(p, do_layer_norm_before=False, word_embed_proj_dim=32),
}
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _ids(seed=0, n=SEQ):
    return [1] + np.random.default_rng(seed).integers(3, VOCAB, n - 1).tolist()


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (float32 folder, {bfloat16, float16} folders), saved by transformers."""
    out = {}
    for name, make in FAMILIES.items():
        base = str(tmp_path_factory.mktemp(name))
        model = make(base)
        halves = {}
        for dt, tdt in TORCH_DTYPES.items():
            path = str(tmp_path_factory.mktemp(f"{name}_{dt}"))
            model.to(tdt).save_pretrained(path, safe_serialization=True)
            model.float()
            with open(os.path.join(base, "config.json")) as f:  # keep our config keys (dReLU marker)
                cfg = json.load(f)
            cfg["torch_dtype"] = dt
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump(cfg, f)
            halves[dt] = path
        out[name] = (base, halves)
    return out


def _hf_float32(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with open(os.path.join(path, "config.json")) as f:
        if json.load(f).get("powerinfer_ffn") == "drelu":
            from hf_models import _relu_mlp_forward

            for layer in model.model.layers:
                layer.mlp.forward = _relu_mlp_forward(layer.mlp)
    return model


@pytest.mark.parametrize("dtype", sorted(TORCH_DTYPES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stored_precision_matches_transformers(checkpoints, family, dtype):
    path = checkpoints[family][1][dtype]
    engine = pij.load(path, kv_dtype="float32")  # dtype="auto": the stored precision (an exact cache: weights alone)
    w = engine.params.layers[0].ffn.w_up
    assert isinstance(w, Weight) and w.fmt == dtype
    ids = _ids()
    with torch.no_grad():
        theirs = _hf_float32(path)(torch.tensor([ids])).logits[0].numpy()
    assert _rel(engine.logits(ids), theirs) <= 1e-4


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantized_matches_its_dequantized_reference(checkpoints, family, quantize):
    base = checkpoints[family][0]
    engine = pij.load(base, quantize=quantize)
    assert engine.params.layers[0].ffn.w_down_t.fmt == quantize
    assert engine.params.embed.fmt == "float32"  # row tables are never quantized
    ref = Engine(engine.cfg, to_device(engine_params(engine.params, dtype="float32")))
    ids = _ids(1)
    ours = engine.logits(ids)
    assert _rel(ours, ref.logits(ids)) <= 1e-4
    full = pij.load(base).logits(ids)
    assert _rel(ours, full) <= {"int8": 3e-2, "int4": 3e-1}[quantize]


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_matches_transformers_on_the_same_weights(checkpoints, tmp_path, quantize):
    from powerinfer_jax.export import save_hf_checkpoint

    engine = pij.load(checkpoints["llama_reglu"][0], quantize=quantize)
    out = str(tmp_path / "dequantized")
    save_hf_checkpoint(engine.params, engine.cfg, out, dtype="float32")
    ids = _ids(2)
    with torch.no_grad():
        theirs = _hf_float32(out)(torch.tensor([ids])).logits[0].numpy()
    assert _rel(engine.logits(ids), theirs) <= 1e-4
    prompt = _ids(3, 8)
    greedy = engine.generate(prompt, max_new_tokens=12, temperature=0.0, stop_at_eos=False).token_ids
    with torch.no_grad():
        hf_out = _hf_float32(out).generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                           eos_token_id=None, min_new_tokens=12, pad_token_id=0)
    assert greedy == hf_out[0, len(prompt):].tolist()


@pytest.mark.parametrize("fmt", ["bfloat16", "float16", "int8", "int4"])
@pytest.mark.parametrize("family", ["llama_reglu", "opt_post_ln_project_in_out"])
def test_oracle_sparsity_equals_dense_in_every_format(checkpoints, family, fmt):
    from powerinfer_jax.config import load_config
    from powerinfer_jax.hybrid import build_hybrid_engine

    base = checkpoints[family][0]
    quantize = fmt if fmt.startswith("int") else None
    dtype = "auto" if quantize else fmt
    cfg = load_config(base)
    host = load_params(base, cfg, dtype=dtype, quantize=quantize, on_host=True)
    dense = Engine(cfg, to_device(host))
    hot = [np.arange(0, cfg.intermediate_size, 2, dtype=np.int32)] * cfg.num_layers
    eng = build_hybrid_engine(cfg, host, mode="oracle", hot_indices=hot, max_seq_len=64)
    ids = _ids(4, 24)
    assert _rel(eng.logits(ids), dense.logits(ids)) <= 1e-4
    # One memory on the CPU backend: the hybrid engine holds each FFN matrix once.
    rep = eng.memory_report()
    assert rep["shared_memory"]
    ffn_once = sum(lp.ffn.w_up.nbytes + lp.ffn.w_down_t.nbytes + (lp.ffn.w_gate.nbytes if lp.ffn.w_gate else 0)
                   + (lp.ffn.b_up.nbytes if lp.ffn.b_up is not None else 0) for lp in host.layers)
    idx_bytes = cfg.num_layers * cfg.intermediate_size * 4
    b_down = sum(lp.ffn.b_down.nbytes for lp in host.layers if lp.ffn.b_down is not None)
    assert rep["resident"]["ffn"] == ffn_once + idx_bytes + b_down


def test_engine_weights_file_is_mapped_without_transforms(checkpoints, tmp_path):
    base = checkpoints["llama_reglu"][1]["bfloat16"]
    cfg = pij.load_config(base)
    host = load_params(base, cfg, quantize="int4", on_host=True)
    path = str(tmp_path / "weights_int4.safetensors")
    save_engine_weights(host, path)
    mapped = load_engine_weights(path, cfg)
    assert mapped.layers[0].attn.wqkv.fmt == "int4"
    ids = _ids(5)
    np.testing.assert_array_equal(Engine(cfg, mapped).logits(ids), Engine(cfg, to_device(host)).logits(ids))
    # The FFN matrices are views of the file: their buffers lie in its mapping.
    ptr = mapped.layers[1].ffn.w_down_t.data.unsafe_buffer_pointer()
    assert _mapped_file_of(ptr) == os.path.realpath(path)


def _mapped_file_of(ptr: int) -> str | None:
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            if lo <= ptr < hi:
                return os.path.realpath(parts[5]) if len(parts) > 5 else None
    return None


def test_aligned_bf16_checkpoint_loads_without_a_copy(tmp_path):
    from benchmarks.realsize import _tensor_specs, hf_config
    from powerinfer_jax.tensor_file import write_streaming

    path = _write_small_checkpoint(tmp_path, write_streaming, _tensor_specs, hf_config)
    engine = pij.load(path)
    w = engine.params.layers[0].ffn.w_gate
    assert w.fmt == "bfloat16" and w.data.dtype == jax.numpy.bfloat16  # bf16-typed: XLA's bf16 dot reads it as is
    assert _mapped_file_of(w.data.unsafe_buffer_pointer()) == os.path.realpath(os.path.join(path, "model.safetensors"))
    assert np.isfinite(engine.logits([1, 5, 9])).all()


def _write_small_checkpoint(tmp_path, write_streaming, specs_fn, config_fn, layers=2, hidden=256, ffn=768, heads=4,
                            vocab=512):
    import ml_dtypes

    c = config_fn(layers, vocab, hidden=hidden, ffn=ffn, heads=heads)
    rng = np.random.default_rng(0)
    specs = specs_fn(c)
    shapes = {k: s for k, _, s in specs}

    def produce(name):
        if name.endswith("norm.weight"):
            return np.ones(shapes[name], ml_dtypes.bfloat16)
        return (rng.standard_normal(shapes[name], dtype=np.float32) * 0.05).astype(ml_dtypes.bfloat16)

    out = tmp_path / "ckpt"
    out.mkdir()
    write_streaming(str(out / "model.safetensors"), specs, produce, metadata={"format": "pt"})
    with open(out / "config.json", "w") as f:
        json.dump(c, f)
    return str(out)


_RSS_SCRIPT = r"""
import json, os, sys
import jax, jax.numpy as jnp, numpy as np
import powerinfer_jax as pij
from powerinfer_jax.hybrid import resident_bytes
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def peak():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
jnp.ones(4).block_until_ready()  # the backend exists before the baseline
from ops.quant import to_weight  # so do the numba quantizers (a fixed ~60 MB runtime, not per weight)
to_weight(np.ones((64, 64), np.float32), "int8"), to_weight(np.ones((64, 64), np.float32), "int4")
from ops import host_kernels  # and the host kernels' machine code, which the load warms (a fixed cost too)
host_kernels.warm(["bfloat16", "int8"])
base = rss()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current RSS
eng = pij.load(sys.argv[1], quantize=None if sys.argv[2] == "none" else sys.argv[2], max_seq_len=16)
for leaf in jax.tree.leaves(eng.params):  # touch every page: mapped weights count once read
    int(np.asarray(leaf).reshape(-1).view(np.uint8)[::4096].sum())
print(json.dumps({"grown": peak() - base, "weights": sum(resident_bytes(eng.params).values())}))
"""


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_load_holds_one_copy_of_the_weights(tmp_path, quantize):
    """Peak RSS during a load grows by at most 1.15x the weights in their chosen format (+ 16 MiB), once
    the runtimes are up (JAX's backend, numba's compiled quantizers and host kernels: fixed costs): the mapped file
    pages of a kept tensor are the weight itself; a transformed tensor's source pages are released."""
    from benchmarks.realsize import _tensor_specs, hf_config
    from powerinfer_jax.tensor_file import write_streaming

    big = _write_small_checkpoint(tmp_path, write_streaming, _tensor_specs, hf_config, layers=4, hidden=1024,
                                  ffn=2816, heads=8, vocab=4096)
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, big, quantize], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["weights"] > 50e6 if quantize == "none" else r["weights"] > 25e6
    assert r["grown"] <= 1.15 * r["weights"] + 16 * 2**20, r


def test_precision_choices_are_checked(checkpoints):
    base = checkpoints["llama_reglu"][0]
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        pij.load(base, dtype="int8")
    with pytest.raises(ValueError, match="unsupported quantize 'int3'"):
        pij.load(base, quantize="int3")
    with pytest.raises(ValueError, match="unsupported kv_dtype"):
        pij.load(base, kv_dtype="int8")


def test_int4_needs_whole_groups(tmp_path):
    path = str(tmp_path / "odd")
    make_llama(path, hidden_size=48, num_attention_heads=3, num_key_value_heads=3)
    with pytest.raises(CheckpointError, match="as int4"):
        pij.load(path, quantize="int4")
    assert np.isfinite(pij.load(path, quantize="int8").logits([1, 2, 3])).all()


def test_half_precision_kv_cache_close_to_float32(checkpoints):
    base = checkpoints["llama_reglu"][0]
    ids = _ids(6, 24)
    ref = pij.load(base, max_seq_len=64)
    half = pij.load(base, max_seq_len=64, kv_dtype="bfloat16")
    assert _rel(half.logits_stepwise(ids), ref.logits_stepwise(ids)) <= 3e-2
    assert ref.generate(ids[:8], max_new_tokens=8, temperature=0.0).token_ids is not None
    assert len(half.generate(ids[:8], max_new_tokens=8, temperature=0.0, stop_at_eos=False).token_ids) == 8


def test_kv_cache_follows_the_weights_by_default(checkpoints):
    base, halves = checkpoints["llama_reglu"]
    assert pij.load(base, max_seq_len=16).kv_dtype == "float32"
    for dt, path in halves.items():
        assert pij.load(path, max_seq_len=16).kv_dtype == dt  # kv_dtype="auto": the stored half precision
        assert pij.load(path, max_seq_len=16, quantize="int8").kv_dtype == dt
        assert pij.load(path, max_seq_len=16, dtype="float32").kv_dtype == "float32"
        assert pij.load(path, max_seq_len=16, kv_dtype="float32").kv_dtype == "float32"
    assert pij.load(base, max_seq_len=16, dtype="bfloat16").kv_dtype == "bfloat16"


def test_every_matrix_of_a_quantized_load_is_quantized(checkpoints):
    engine = pij.load(checkpoints["opt_post_ln_project_in_out"][0], quantize="int8")
    p = engine.params
    mats = [p.lm_head, p.project_in, p.project_out] + [m for lp in p.layers
                                                        for m in (lp.attn.wqkv, lp.attn.wo, lp.ffn.w_up, lp.ffn.w_down_t)]
    assert all(isinstance(m, Weight) and m.fmt == "int8" for m in mats if m is not None)
    assert isinstance(p.pos_embed, Weight) and p.pos_embed.fmt == "float32"
    assert jax.tree.leaves(p.layers[0].attn_norm)[0].dtype == np.float32


@pytest.mark.parametrize("fmt", ["bfloat16", "int8"])
def test_engine_predictors_match_their_dequantized_reference(fmt):
    """Predictors stored like the weights (row Weights read by ops.linear) compute the reference
    fc2(relu(fc1 x)) on their dequantized values within f32 rounding."""
    from ops.quant import dequantize
    from powerinfer_jax.sparse_ffn import PredictorParams, engine_predictor, predict_logits, predictor_format

    assert predictor_format("int4") == "int8" and predictor_format("bfloat16") == "bfloat16"
    rng = np.random.default_rng(0)
    fc1 = rng.standard_normal((64, 40), dtype=np.float32) / 8
    fc2 = rng.standard_normal((40, 256), dtype=np.float32) / 6
    x = rng.standard_normal((1, 64), dtype=np.float32)
    p = engine_predictor(fc1, fc2, fmt)
    ref = PredictorParams(fc1=dequantize(p.fc1).T, fc2=dequantize(p.fc2).T)
    got = np.asarray(jax.jit(predict_logits)(p, x))
    want = np.asarray(predict_logits(ref, x))
    assert _rel(got, want) <= 1e-5
    assert _rel(got, np.asarray(predict_logits(PredictorParams(fc1, fc2), x))) <= 3e-2

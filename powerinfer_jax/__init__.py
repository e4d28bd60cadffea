"""PowerInfer-JAX: activation-sparse LLM inference on one accelerator plus the host.

    import powerinfer_jax as pij
    engine = pij.load("path/to/hf_model_dir")       # or pij.load() for the bundled model
    engine.generate("ROMEO:", max_new_tokens=64).text
"""

from __future__ import annotations

import os
from pathlib import Path

# numba's OpenMP workers spin while idle by default; on a machine whose cores are shared with
# XLA's own threads that made the host kernels 3x slower (16-24 ms vs 5-6 ms per 7B layer).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from powerinfer_jax.config import ModelConfig, UnsupportedModelError, load_config
from powerinfer_jax.engine import INT4_ACTIVATIONS, PROMPT_ACTIVATIONS, Engine, GenerationResult
from powerinfer_jax import checks
from powerinfer_jax.errors import (ArgumentError, BundleError, CheckpointError, NonFiniteError, PathNotFoundError,
                                   PowerInferError)
from powerinfer_jax.loading import check_finite_weights, kv_format, load_model_params, load_params
from powerinfer_jax.sampling import SamplingParams

__all__ = [
    "ArgumentError",
    "BundleError",
    "CheckpointError",
    "NonFiniteError",
    "PathNotFoundError",
    "PowerInferError",
    "Engine",
    "GenerationResult",
    "ModelConfig",
    "SamplingParams",
    "UnsupportedModelError",
    "default_model_dir",
    "load",
    "load_params",
]

# The small ReLU-LLaMA trained on Tiny Shakespeare that ships with the repo.
DEFAULT_MODEL_NAME = "shakespeare-relu-llama"


def default_model_dir() -> str:
    """Folder of the bundled default model ($POWERINFER_JAX_DEFAULT_MODEL overrides it)."""
    env = os.environ.get("POWERINFER_JAX_DEFAULT_MODEL")
    if env:
        return env
    return str(Path(__file__).resolve().parent.parent / "models" / DEFAULT_MODEL_NAME)


def load(
    model_dir: str | os.PathLike | None = None,
    dtype: str = "auto",
    max_seq_len: int | None = None,
    quantize: str | None = None,
    kv_dtype: str = "auto",
    sparsity: str | None = None,
    device_memory_budget: int | str | None = None,
    threshold: float | None = None,
    offload_layers: int | None = None,
    placement_batch: int = 64,
    min_hot_per_split_layer: int = 0,
    device_kernel: str = "auto",
    verify_bundle: str = "fast",
    check_finite: bool | str = "auto",
    bundle_model_dir: str | os.PathLike | None = None,
    devices=None,
    act_thresholds=None,
    attention_sparsity: bool = False,
    attn_input_thresholds=None,
    prompt_activations: str | None = None,
    int4_activations: str = "float32",
) -> Engine:
    """Loads an HF model folder or a prepared bundle (from bin/prepare) into an Engine.

    dtype: weight storage; "auto" keeps the checkpoint's precision (bf16/f16/f32), or
      "float32"/"bfloat16"/"float16" converts. Compute is float32 whatever the storage
      (opt-in exception: `prompt_activations`).
    quantize: None, "int8" (one scale per row) or "int4" (groups of 32, f16 scales) for every
      matrix but the embedding table; FFN matrices are quantized per neuron row.
    prompt_activations: how a prompt's activations meet bf16 weights where XLA's bf16 dot takes them (a CPU
      with bf16 dot instructions, from 2 rows): "float32" (two bf16 parts, ~2e-6 of f32, as decode rows),
      "bfloat16" (rounded to bf16 as GPU engines compute bf16 checkpoints: 7B prompt chunks ~1.5x faster, prompt
      logits within ~1e-3 of f32), or None (the process setting, POWERINFER_PROMPT_BF16_PARTS; float32 when unset).
    int4_activations: how the CPU host kernels meet int4 weights (`quantize="int4"`): "float32" (exact, the
      default) or "int8" (activations rounded to int8 per group of 32, integer dot products as llama.cpp's
      Q4_0 x Q8_0: 2-2.5x faster int4 mat-vecs on AVX2; x86-64 with AVX2 only; `Engine.set_int4_activations`).
    kv_dtype: KV-cache precision: "auto" (the weights' half precision for bf16/f16 checkpoints, float32 for
      float32 ones), "float32" (exact), "bfloat16" or "float16" (half the memory, as fast on every backend).
    sparsity: None/"dense" (reference), "oracle" (true ReLU mask drives the sparse path) or
      "predicted" (the bundle's predictors pick neurons; PowerInfer's mode).
    device_memory_budget: bytes or "1.5GiB"-style string; hot neurons go to the device by a
      placement solved from the bundle's statistics, the rest stay on the host. None: all on device.
    threshold: overrides the predictors' calibrated per-layer thresholds.
    act_thresholds: SwiGLU/GeGLU models only: per-layer thresholds on |act(gate x)| that define an
      active neuron (default: the bundle's, calibrated by `bin/prepare --target_sparsity`). Sparse
      modes on such a model need them; "oracle" then computes exactly the neurons above them.
    attention_sparsity: TEAL-style input sparsity of the attention projections at decode: entries of the
      q/k/v and o inputs at or below per-layer thresholds are zeroed and their weight rows never read
      (q/k/v/o are stored transposed for it). Thresholds: `attn_input_thresholds` ([L][2]), else the
      bundle's (`bin/prepare --attention_sparsity`). Prompts stay exact.
    offload_layers: llama.cpp-style baseline: the last N layers on the device, the other
      layers' dense FFNs on the host (ignores the budget).
    devices: an int (the first N of jax.devices()) or a list of devices: a 1-D mesh; each device
      holds and computes its share of every layer's hot neurons (the budget is per device),
      everything else is replicated. None: one device.
    verify_bundle: how a bundle is checked against its model's files: "fast" (size and sampled
      blocks, milliseconds), "full" (sha256 of every byte, as bin/prepare records) or "none".
    check_finite: scan the weights for NaN/Inf before loading them: True, False, or "auto" (weight
      files up to `loading.FINITE_SCAN_AUTO_BYTES`, 2 GiB). Each generated token's logits are checked anyway.
    bundle_model_dir: the model folder of a bundle that moved apart from its model (checked against
      the bundle's record of it like the recorded one).
    Bad arguments or files raise a `PowerInferError` subclass (see `powerinfer_jax.errors`).
    """
    from powerinfer_jax.tokenizer import Tokenizer

    checks.load_arguments(model_dir, dtype, max_seq_len, quantize, kv_dtype, sparsity, device_memory_budget,
                          threshold, offload_layers, placement_batch, min_hot_per_split_layer, device_kernel,
                          verify_bundle, check_finite, bundle_model_dir, devices)
    if prompt_activations is not None:
        checks.choice("prompt_activations", prompt_activations, PROMPT_ACTIVATIONS)
    checks.choice("int4_activations", int4_activations, INT4_ACTIVATIONS)
    path = str(model_dir) if model_dir is not None else default_model_dir()
    bundle = None
    from powerinfer_jax import bundle as bundle_lib

    if bundle_lib.is_bundle(path):
        bundle = bundle_lib.load_bundle(path, verify=verify_bundle,
                                        model_dir=None if bundle_model_dir is None else os.fspath(bundle_model_dir))
        path = bundle.model_dir
    cfg = load_config(path)
    kv_dtype = kv_format(path, cfg, dtype, kv_dtype)
    checks.hybrid_arguments(cfg, bundle, sparsity, device_memory_budget, offload_layers)
    act_thresholds = checks.act_thresholds(cfg, bundle, sparsity, act_thresholds)
    attn_thr = checks.attn_input_thresholds(cfg, bundle, attention_sparsity, attn_input_thresholds)
    check_finite_weights(path, cfg, check_finite, dtype, quantize, bundle.path if bundle is not None else None)
    tokenizer = None
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        tokenizer = Tokenizer(path, cfg.bos_token_id, cfg.eos_token_ids)
    hybrid = (sparsity not in (None, "dense") or device_memory_budget is not None or offload_layers is not None
              or devices is not None)
    if not hybrid:
        params = load_model_params(path, cfg, dtype=dtype, quantize=quantize,
                                   bundle_dir=bundle.path if bundle is not None else None)
        if attn_thr is not None:
            from powerinfer_jax.params import input_sparse_attention

            params = input_sparse_attention(params, attn_thr)
        engine = Engine(cfg, params, tokenizer, max_seq_len=max_seq_len, model_dir=path, kv_dtype=kv_dtype,
                        prompt_activations=prompt_activations)
    else:
        from powerinfer_jax import hybrid as hybrid_lib

        engine = hybrid_lib.load_hybrid(
            cfg, path, bundle, tokenizer, mode=sparsity or "dense", dtype=dtype, quantize=quantize,
            kv_dtype=kv_dtype, max_seq_len=max_seq_len, budget=device_memory_budget, threshold=threshold,
            offload_layers=offload_layers, placement_batch=placement_batch, min_hot=min_hot_per_split_layer,
            device_kernel=device_kernel, devices=devices, act_thresholds=act_thresholds,
            attn_input_thresholds=attn_thr, prompt_activations=prompt_activations)
    if int4_activations != "float32":
        engine.set_int4_activations(int4_activations)
    return engine

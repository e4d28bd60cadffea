"""The precision flags every `bin/` program shares (same names, same defaults as `pij.load`)."""

from __future__ import annotations

from powerinfer_jax.engine import INT4_ACTIVATIONS, PROMPT_ACTIVATIONS
from powerinfer_jax.loading import DTYPES
from powerinfer_jax.model import KV_DTYPES


def define_precision_flags(flags) -> None:
    """Defines --dtype, --quantize, --kv_dtype, --prompt_activations and --int4_activations on an absl `flags`
    module."""
    flags.DEFINE_enum("dtype", "auto", list(DTYPES),
                      "Weight storage: auto keeps the checkpoint's precision (bf16/f16/f32); the others convert. "
                      "Activations, accumulation, norms and softmax are float32 whatever the storage (but see "
                      "--prompt_activations).")
    flags.DEFINE_enum("quantize", None, ["int8", "int4"],
                      "Weight-only quantization of every matrix but the embedding table: int8 (symmetric, one "
                      "scale per row) or int4 (groups of 32 with an f16 scale, the layout of Q4_0). Default: none.")
    flags.DEFINE_enum("kv_dtype", "auto", ["auto", *KV_DTYPES],
                      "KV-cache precision. auto: the weights' half precision for a bf16/f16 checkpoint (quantized "
                      "too), float32 for a float32 one. float32 is exact; bfloat16/float16 halve the cache's memory "
                      "(a 7B model: 1 MB a token in float32) at float32's speed or better (BENCHMARKS.md).")
    flags.DEFINE_enum("prompt_activations", "float32", list(PROMPT_ACTIVATIONS),
                      "How a prompt's activations meet bf16 weights on a CPU with bf16 dot instructions (XLA's bf16 "
                      "dot, from 2 rows): float32 (split in two bf16 parts, ~2e-6 of f32, like decode rows) or "
                      "bfloat16 (rounded to bf16, as GPU engines compute bf16 checkpoints: prompt chunks and the "
                      "decode steps that carry them ~1.4x faster on a 7B shape, prompt logits within ~1e-3 of "
                      "f32). Decode rows, other formats and GPUs are unaffected. Without the flag: "
                      "POWERINFER_PROMPT_BF16_PARTS (1 = bfloat16), else float32.")
    flags.DEFINE_enum("int4_activations", "float32", list(INT4_ACTIVATIONS),
                      "How the CPU host kernels meet int4 weights (--quantize int4): float32 (exact: dequantize, then "
                      "f32 math) or int8 (each token's activations rounded to int8 per group of 32 values, integer dot "
                      "products as llama.cpp's Q4_0 x Q8_0: 2-2.5x faster int4 mat-vecs on AVX2, outputs within "
                      "~0.5% of their largest; x86-64 CPUs with AVX2 only). Prompts through BLAS and the down "
                      "projection stay exact.")


def precision_kwargs(FLAGS) -> dict:
    """The `pij.load` keyword arguments the precision flags ask for (--prompt_activations only where given, so
    that POWERINFER_PROMPT_BF16_PARTS still applies without it)."""
    prompt = FLAGS.prompt_activations if FLAGS["prompt_activations"].present else None
    return {"dtype": FLAGS.dtype, "quantize": FLAGS.quantize, "kv_dtype": FLAGS.kv_dtype, "prompt_activations": prompt,
            "int4_activations": FLAGS.int4_activations}

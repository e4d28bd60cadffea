"""The precision flags every `bin/` program shares (same names, same defaults as `pij.load`)."""

from __future__ import annotations

from powerinfer_jax.loading import DTYPES
from powerinfer_jax.model import KV_DTYPES


def define_precision_flags(flags) -> None:
    """Defines --dtype, --quantize and --kv_dtype on an absl `flags` module."""
    flags.DEFINE_enum("dtype", "auto", list(DTYPES),
                      "Weight storage: auto keeps the checkpoint's precision (bf16/f16/f32); the others convert. "
                      "Activations, accumulation, norms and softmax are float32 whatever the storage.")
    flags.DEFINE_enum("quantize", None, ["int8", "int4"],
                      "Weight-only quantization of every matrix but the embedding table: int8 (symmetric, one "
                      "scale per row) or int4 (groups of 32 with an f16 scale, the layout of Q4_0). Default: none.")
    flags.DEFINE_enum("kv_dtype", "auto", ["auto", *KV_DTYPES],
                      "KV-cache precision. auto: the weights' half precision for a bf16/f16 checkpoint (quantized "
                      "too), float32 for a float32 one. float32 is exact; bfloat16/float16 halve the cache's memory "
                      "(a 7B model: 1 MB a token in float32) at float32's speed or better (BENCHMARKS.md).")


def precision_kwargs(FLAGS) -> dict:
    """The `pij.load` keyword arguments the precision flags ask for."""
    return {"dtype": FLAGS.dtype, "quantize": FLAGS.quantize, "kv_dtype": FLAGS.kv_dtype}

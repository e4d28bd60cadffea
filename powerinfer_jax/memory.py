"""Exact device-memory accounting: what must sit on the device before any FFN neuron.

Priority order (PowerInfer's): embeddings -> attention -> norms -> output head -> predictors
-> KV cache for the stated max context -> the int32 neuron-id maps of the split -> FFN hot
neurons (the placement solver gets what is left). Every number is computed from shapes and dtypes, so the engine can check its
real allocation against it.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ops.quant import FORMATS, format_bytes_per_row
from powerinfer_jax.config import ModelConfig
from powerinfer_jax.errors import ArgumentError, PowerInferError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # vectors and KV-cache element sizes


def matrix_bytes(fmt: str, rows: int, cols: int) -> int:
    """Bytes of a [rows, cols] row matrix stored in `fmt` (a float dtype, int8 or int4), scales included."""
    if fmt not in FORMATS:
        raise ArgumentError(f"unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return rows * format_bytes_per_row(fmt, cols)


class BudgetTooSmallError(PowerInferError):
    """The device budget cannot even hold the parts that must live on the device."""


def parse_bytes(value: int | float | str | None) -> int | None:
    """Bytes from an int or a string like "1.5GiB", "800MB", "512KiB"."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else int(value)
    s = value.strip().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6,
             "GB": 10**9, "TB": 10**12, "B": 1}
    for unit, mult in units.items():
        if s.upper().endswith(unit):
            num = s[: -len(unit)]
            try:
                return int(float(num) * mult)
            except ValueError:
                break
    try:
        return int(float(s))
    except ValueError:
        raise ArgumentError(f"cannot parse a byte size from {value!r} (use e.g. 1.5GiB, 800MB, 1000000)") from None


def neuron_bytes(cfg: ModelConfig, dtype: str) -> int:
    """Device bytes of one FFN neuron: its gate/up rows and its row of the transposed down matrix
    (in weight format `dtype`, scales included), plus its float32 fc1 bias entry (OPT)."""
    rows = 3 if cfg.has_gate else 2
    bias = 4 if cfg.family == "opt" else 0
    return rows * matrix_bytes(dtype, 1, cfg.hidden_size) + bias


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    """Bytes by group, in priority order, and what is left for hot FFN neurons."""

    budget: int
    groups: tuple[tuple[str, int], ...]
    neuron_bytes: int

    @property
    def fixed(self) -> int:
        """Bytes that must be on the device before any FFN neuron."""
        return sum(b for _, b in self.groups)

    @property
    def ffn_budget(self) -> int:
        """Bytes left for hot FFN neurons."""
        return self.budget - self.fixed

    def as_dict(self) -> dict:
        """JSON-friendly view."""
        return {"budget": self.budget, **dict(self.groups), "ffn_budget": self.ffn_budget,
                "neuron_bytes": self.neuron_bytes}


def fixed_groups(cfg: ModelConfig, dtype: str, predictor_bytes: int, max_context: int, batch: int = 1,
                 kv_dtype: str = "float32", table_dtype: str | None = None) -> tuple[tuple[str, int], ...]:
    """(group, bytes) for everything but FFN neurons, in placement priority order.

    `dtype`: the matrices' format (float dtype, int8 or int4); `table_dtype`: the embedding
    tables' (never quantized; default `dtype` for float formats, float32 -- an upper bound -- for
    int8/int4). Norms and biases are float32."""
    if table_dtype is None:
        table_dtype = dtype if dtype in DTYPE_BYTES else "float32"
    d, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
    e = cfg.word_embed_proj_dim or d
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    embed = matrix_bytes(table_dtype, V, e)
    if cfg.family == "opt":
        embed += matrix_bytes(table_dtype, cfg.max_position_embeddings + 2, d)
        if e != d:
            embed += matrix_bytes(dtype, d, e) + matrix_bytes(dtype, e, d)
    attn = matrix_bytes(dtype, q_out + 2 * kv_out, d) + matrix_bytes(dtype, d, q_out)
    if cfg.attention_bias or cfg.qkv_bias:  # float32 vectors: q/k/v biases (Qwen2), and o_proj's when all four
        attn += 4 * (q_out + 2 * kv_out + (d if cfg.attention_bias else 0))
    norm_vecs = 2 if cfg.family == "opt" else 1  # LayerNorm has a bias
    norms = (2 * L + (1 if cfg.final_layer_norm or cfg.family == "llama" else 0)) * d * norm_vecs
    if cfg.family == "opt":
        norms += L * d  # fc2 bias: added once per layer, kept with the always-on vectors
    head = 0 if cfg.tie_word_embeddings else matrix_bytes(dtype, V, e)
    kv = kv_cache_bytes(cfg, batch, max_context, kv_dtype)
    index = L * cfg.intermediate_size * 4  # int32 hot/cold neuron-id maps, one entry per neuron
    return (("embeddings", embed), ("attention", L * attn), ("norms", norms * 4),
            ("output_head", head), ("predictors", int(predictor_bytes)), ("kv_cache", kv),
            ("ffn_index", index))


def plan_device_memory(cfg: ModelConfig, budget_bytes: int, dtype: str, predictor_bytes: int,
                       max_context: int, batch: int = 1, kv_dtype: str = "float32") -> DevicePlan:
    """Accounts for the fixed parts and fails clearly when the budget cannot hold them."""
    groups = fixed_groups(cfg, dtype, predictor_bytes, max_context, batch, kv_dtype)
    plan = DevicePlan(int(budget_bytes), groups, neuron_bytes(cfg, dtype))
    if plan.ffn_budget < 0:
        detail = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in groups)
        raise BudgetTooSmallError(
            f"device budget {budget_bytes / 2**20:.2f} MiB is too small: the parts that must sit on the "
            f"device need {plan.fixed / 2**20:.2f} MiB ({plan.fixed} bytes: {detail}) before any FFN neuron; "
            f"raise the budget or lower max_context ({max_context})")
    return plan


def ffn_total_bytes(cfg: ModelConfig, dtype: str) -> int:
    """Bytes of all FFN neurons of all layers."""
    return cfg.num_layers * cfg.intermediate_size * neuron_bytes(cfg, dtype)


def kv_cache_bytes(cfg: ModelConfig, batch: int, max_len: int, kv_dtype: str) -> int:
    """Bytes of a KV cache of `batch` rows x `max_len` slots in `kv_dtype` (model.init_cache's arrays)."""
    return 2 * cfg.num_layers * batch * max_len * cfg.num_kv_heads * cfg.head_dim * DTYPE_BYTES[kv_dtype]


def buffer_address(a) -> int | None:
    """The address of a JAX or numpy array's first byte (None for an array without one, e.g. sharded)."""
    try:
        return a.unsafe_buffer_pointer() if isinstance(a, jax.Array) else np.asarray(a).ctypes.data
    except Exception:  # noqa: BLE001
        return None


def _mapped_safetensors() -> list[tuple[int, int]]:
    """(start, end) addresses of this process's mappings of safetensors files (Linux /proc/self/maps)."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n").endswith(".safetensors"):
                    lo, hi = parts[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except (OSError, ValueError):
        return []
    return ranges


def file_backed_bytes(arrays) -> int:
    """Bytes of `arrays` (JAX or numpy) that lie in mapped safetensors files (the weights `pij.load` reads in
    place), overlapping views counted once."""
    ranges = _mapped_safetensors()
    spans = []
    for a in arrays:
        ptr = buffer_address(a)
        if ptr is None:  # a sharded array: its shards are their own memory
            continue
        for lo, hi in ranges:
            if lo <= ptr < hi:
                spans.append((ptr, min(ptr + a.size * a.dtype.itemsize, hi)))
                break
    total, end = 0, 0
    for lo, hi in sorted(spans):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def host_memory_free(model_arrays=()) -> int | None:
    """Bytes this process can still allocate beside its model: Linux's MemAvailable less the model's arrays that
    lie in mapped files (`file_backed_bytes`: the pages read so far count as reclaimable page cache in
    MemAvailable and the rest are not in memory yet, but every decode step reads all of them; taking them back
    would re-read them from disk each step). None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return max(available - file_backed_bytes(model_arrays), 0)


HOST_RESERVE_BYTES = 512 << 20  # room kept free beside a host KV cache: activations, compiles, the server


def check_host_kv_cache(cfg: ModelConfig, rows: int, max_len: int, kv_dtype: str, staging_rows: int = 0,
                        model_arrays=(), free: int | None = None) -> int:
    """Raises ArgumentError when a host KV cache of `rows` (+ `staging_rows`) x `max_len` slots would not fit in
    the memory left beside the loaded model (`free`, default `host_memory_free(model_arrays)`; unknown: no
    check); returns its bytes."""
    per_row = kv_cache_bytes(cfg, 1, max_len, kv_dtype)
    need = (rows + staging_rows) * per_row
    free = host_memory_free(model_arrays) if free is None else free
    if free is not None and need + HOST_RESERVE_BYTES > free:
        fit = max((free - HOST_RESERVE_BYTES) // per_row - staging_rows, 0)
        staging = f" (and {staging_rows} staging)" if staging_rows else ""
        half = " or kv_dtype bfloat16 (half the bytes)" if kv_dtype == "float32" else ""
        raise ArgumentError(
            f"the KV cache of {rows} rows{staging} x {max_len} slots ({kv_dtype}) needs {need / 2**30:.2f} GiB, but "
            f"only {free / 2**30:.2f} GiB of memory is free beside the loaded model (less {HOST_RESERVE_BYTES >> 20} "
            f"MiB kept for the rest): lower max_batch ({fit} rows of {max_len} slots fit) or max_seq_len{half}")
    return need

"""Reads HF safetensors checkpoints (single file or sharded) into a `ModelParams` pytree.

One name table per family maps each HF tensor to a slot in our tree, with the transpose
our layout needs and the shape it must have. Every missing, unexpected or mis-shaped
tensor is reported by name, all at once, from the headers, before any weight is read.

Precision comes from the checkpoint: `dtype="auto"` keeps every matrix in its stored format
(bf16, f16 or f32; `ops.quant.Weight`), `quantize="int8"|"int4"` quantizes the matrices per row
as they are read. Files are mapped, not read (`tensor_file`): a matrix kept as stored is a view
of the mapping (no copy at all when 64-byte aligned); one that is transposed (the FFN down
projection), fused (q/k/v), quantized, converted or realigned gets one new buffer and its source
pages are released. Vectors (norms, biases) become float32.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from ops.quant import Weight, dequantize, storage_format, to_weight
from powerinfer_jax import tensor_file
from powerinfer_jax.config import ModelConfig
from powerinfer_jax.errors import CheckpointError, NonFiniteError  # CheckpointError: importable from here
from powerinfer_jax.params import (AttentionParams, FFNParams, LayerParams, ModelParams, NormParams, concat_rows,
                                   fuse_qkv)

# Weight storage choices: "auto" keeps the checkpoint's precision; the others convert.
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = (None, "int8", "int4")
# Row tables read one row per token (a gather, not a mat-vec): kept in stored precision, never quantized.
_ROW_TABLES = ("embed", "pos_embed")
# Buffers some checkpoints carry that are recomputed here.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _spec(cfg: ModelConfig) -> dict[str, tuple[str, bool, tuple[int, ...]]]:
    """HF tensor name -> (our flat name, transpose?, shape in our layout).

    Our layout is HF's (`[out, in]` rows) except the FFN down projection, stored transposed."""
    d, n, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    spec: dict[str, tuple[str, bool, tuple[int, ...]]] = {}
    if cfg.family == "llama":
        spec["model.embed_tokens.weight"] = ("embed", False, (V, d))
        spec["model.norm.weight"] = ("final_norm.scale", False, (d,))
        if not cfg.tie_word_embeddings:
            spec["lm_head.weight"] = ("lm_head", False, (V, d))
        for i in range(cfg.num_layers):
            hf, us = f"model.layers.{i}.", f"layers.{i}."
            spec[hf + "input_layernorm.weight"] = (us + "attn_norm.scale", False, (d,))
            spec[hf + "post_attention_layernorm.weight"] = (us + "ffn_norm.scale", False, (d,))
            for proj, ours, out in (("q", "q", q_out), ("k", "k", kv_out), ("v", "v", kv_out)):
                spec[hf + f"self_attn.{proj}_proj.weight"] = (us + f"attn.w{ours}", False, (out, d))
                if cfg.attention_bias or cfg.qkv_bias:
                    spec[hf + f"self_attn.{proj}_proj.bias"] = (us + f"attn.b{ours}", False, (out,))
            spec[hf + "self_attn.o_proj.weight"] = (us + "attn.wo", False, (d, q_out))
            if cfg.attention_bias:
                spec[hf + "self_attn.o_proj.bias"] = (us + "attn.bo", False, (d,))
            spec[hf + "mlp.gate_proj.weight"] = (us + "ffn.w_gate", False, (n, d))
            spec[hf + "mlp.up_proj.weight"] = (us + "ffn.w_up", False, (n, d))
            spec[hf + "mlp.down_proj.weight"] = (us + "ffn.w_down_t", True, (n, d))
        return spec
    e = cfg.word_embed_proj_dim or d
    pre = "model.decoder."
    spec[pre + "embed_tokens.weight"] = ("embed", False, (V, e))
    spec[pre + "embed_positions.weight"] = ("pos_embed", False, (cfg.max_position_embeddings + 2, d))
    if e != d:
        spec[pre + "project_in.weight"] = ("project_in", False, (d, e))
        spec[pre + "project_out.weight"] = ("project_out", False, (e, d))
    if cfg.final_layer_norm:
        spec[pre + "final_layer_norm.weight"] = ("final_norm.scale", False, (d,))
        spec[pre + "final_layer_norm.bias"] = ("final_norm.bias", False, (d,))
    if not cfg.tie_word_embeddings:
        spec["lm_head.weight"] = ("lm_head", False, (V, e))
    for i in range(cfg.num_layers):
        hf, us = f"{pre}layers.{i}.", f"layers.{i}."
        for proj, ours in (("q", "q"), ("k", "k"), ("v", "v"), ("out", "o")):
            spec[hf + f"self_attn.{proj}_proj.weight"] = (us + f"attn.w{ours}", False, (d, d))
            spec[hf + f"self_attn.{proj}_proj.bias"] = (us + f"attn.b{ours}", False, (d,))
        for ln, ours in (("self_attn_layer_norm", "attn_norm"), ("final_layer_norm", "ffn_norm")):
            spec[hf + f"{ln}.weight"] = (us + f"{ours}.scale", False, (d,))
            spec[hf + f"{ln}.bias"] = (us + f"{ours}.bias", False, (d,))
        spec[hf + "fc1.weight"] = (us + "ffn.w_up", False, (n, d))
        spec[hf + "fc1.bias"] = (us + "ffn.b_up", False, (n,))
        spec[hf + "fc2.weight"] = (us + "ffn.w_down_t", True, (n, d))
        spec[hf + "fc2.bias"] = (us + "ffn.b_down", False, (d,))
    return spec


def _normalise_name(name: str, cfg: ModelConfig) -> str:
    """Maps the prefix variants checkpoints use onto the names in `_spec`."""
    if cfg.family == "opt":
        if name.startswith("decoder."):
            return "model." + name
        if name.startswith("model.") and not name.startswith("model.decoder."):
            return "model.decoder." + name[len("model.") :]
    return name


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's safetensors files: the single file or every shard of the index."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            if not all(isinstance(x, str) and x and os.path.basename(x) == x for x in files):
                raise ValueError("shard names must be plain file names")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
            raise CheckpointError(f"{index} is corrupt ({type(err).__name__}: {str(err)[:80]}); restore it "
                                  "from the model's source") from None
        missing = [f for f in files if not os.path.isfile(os.path.join(model_dir, f))]
        if missing:
            raise CheckpointError(f"shards listed in {index} are missing: {', '.join(missing)}")
        return [os.path.join(model_dir, f) for f in files]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise CheckpointError(
        f"no model.safetensors or model.safetensors.index.json in {model_dir} "
        "(only safetensors checkpoints are supported; convert .bin files with transformers first)"
    )


def open_checkpoint(model_dir: str) -> list[tensor_file.MappedSafetensors]:
    """Every safetensors file of the checkpoint, mapped (headers checked, no tensor read)."""
    try:
        return [tensor_file.MappedSafetensors(p) for p in safetensors_files(model_dir)]
    except tensor_file.TensorFileError as err:
        raise CheckpointError(str(err)) from err


def check_choices(dtype: str, quantize: str | None) -> None:
    """Fails with one line naming what is supported."""
    from powerinfer_jax import checks

    checks.choice("dtype", dtype, DTYPES)
    checks.choice("quantize", quantize, QUANTIZATIONS)


def _transposed(a: np.ndarray) -> np.ndarray:
    """A new aligned buffer holding a.T (2-byte types copied as integers: numpy's fast path)."""
    src = a.view(np.uint16) if a.dtype.itemsize == 2 else a
    out = tensor_file.aligned_empty(src.shape[::-1], src.dtype)
    out[...] = src.T
    return out.view(a.dtype)


_QUANT_BLOCK_BYTES = 8 << 20  # source bytes quantized at a time: bounds the float32 temporaries of a load


def _matrix(a: np.ndarray, transpose: bool, dtype: str, quantize: str | None, name: str) -> Weight:
    """One checkpoint matrix in the engine's layout and format (a view of `a` when nothing changes)."""
    if transpose:
        a = _transposed(a)
    fmt = quantize if quantize and name.split(".")[-1] not in _ROW_TABLES else (
        storage_format(a.dtype) if dtype == "auto" else dtype)
    try:
        if fmt in ("int8", "int4"):
            return _quantized(a, fmt)
        return _aligned_weight(to_weight(a, fmt))
    except ValueError as err:
        raise CheckpointError(f"cannot store {name} {tuple(a.shape)} as {fmt}: {err}") from err


def _quantized(a: np.ndarray, fmt: str) -> Weight:
    """`a` quantized block of rows by block into aligned buffers (no whole-matrix float32 copy)."""
    step = max(1, _QUANT_BLOCK_BYTES // max(1, a.shape[1] * a.dtype.itemsize))
    first = to_weight(a[:step], fmt)
    data = tensor_file.aligned_empty((a.shape[0],) + first.data.shape[1:], first.data.dtype)
    scale = tensor_file.aligned_empty((a.shape[0],) + first.scale.shape[1:], first.scale.dtype)
    data[:step], scale[:step] = first.data, first.scale
    for r0 in range(step, a.shape[0], step):
        blk = to_weight(a[r0:r0 + step], fmt)
        data[r0:r0 + step], scale[r0:r0 + step] = blk.data, blk.scale
    return Weight(data, scale, fmt, first.cols)


def _aligned_weight(w: Weight) -> Weight:
    """`w` with buffers JAX can alias (copies only what is misaligned)."""
    scale = None if w.scale is None else tensor_file.aligned(w.scale)
    return Weight(tensor_file.aligned(w.data), scale, w.fmt, w.cols)


def _shares(w: Weight, src: np.ndarray) -> bool:
    return np.shares_memory(w.data, src)


def load_params(model_dir: str, cfg: ModelConfig, dtype: str = "auto", quantize: str | None = None,
                on_host: bool = False) -> ModelParams:
    """Loads and checks every tensor of an HF checkpoint into our parameter tree.

    Matrices become `Weight`s in the stored precision (`dtype="auto"`), a chosen float format, or
    int8/int4 (`quantize`); q/k/v are fused. `on_host=True` keeps numpy arrays (the hybrid engine
    then decides what goes where); otherwise every array goes to the default JAX device
    (zero-copy on the CPU backend).
    """
    check_choices(dtype, quantize)
    files = open_checkpoint(model_dir)
    spec = _spec(cfg)
    where: dict[str, tuple[tensor_file.MappedSafetensors, str]] = {}
    unexpected, bad_shape = [], []
    for f in files:
        for raw_name in f.keys():
            name = _normalise_name(raw_name, cfg)
            if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                continue
            if name not in spec:
                unexpected.append(raw_name)
                continue
            _, transpose, shape = spec[name]
            got = f.shape(raw_name)
            if (got[::-1] if transpose else got) != shape:
                bad_shape.append(f"{raw_name}: expected {shape[::-1] if transpose else shape}, got {got}")
                continue
            where[name] = (f, raw_name)
    missing = [hf for hf in spec if hf not in where]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if bad_shape:
        problems.append(f"wrong shapes: {'; '.join(bad_shape)}")
    if problems:
        raise CheckpointError(f"checkpoint in {model_dir} does not match its config: " + " | ".join(problems))

    flat: dict = {}
    sources: dict[str, list[tuple[tensor_file.MappedSafetensors, str]]] = {}
    for hf_name, (ours, transpose, _) in spec.items():
        f, raw = where[hf_name]
        try:
            src = f.view(raw)
        except tensor_file.TensorFileError as err:
            raise CheckpointError(str(err)) from err
        if src.ndim == 1:
            flat[ours] = tensor_file.aligned(np.array(src, np.float32))
            continue
        w = _matrix(src, transpose, dtype, quantize, ours)
        flat[ours] = w
        if _shares(w, src):
            sources[ours] = [(f, raw)]  # still mapped: released only if transformed later (fusing)
        else:
            f.release(raw)  # a new buffer holds it: drop the source pages now (peak RSS ~ 1x)
    for i in range(cfg.num_layers):  # fuse q/k/v into one row matrix, then drop the sources
        p = f"layers.{i}.attn."
        try:  # one new aligned buffer, no intermediate copy
            flat[p + "wqkv"] = concat_rows(*(flat.pop(p + k) for k in ("wq", "wk", "wv")))
        except ValueError as err:
            raise CheckpointError(f"cannot fuse layer {i}'s q/k/v: {err}") from err
        if p + "bq" in flat:
            flat[p + "bqkv"] = concat_rows(*(flat.pop(p + k) for k in ("bq", "bk", "bv")))
        for k in ("wq", "wk", "wv"):
            for f, raw in sources.pop(p + k, []):
                f.release(raw)
    for f in files:
        f.close()
    _return_freed_memory()
    tree = _build_tree(flat, cfg.num_layers)
    return tree if on_host else to_device(tree)


def _return_freed_memory() -> None:
    """Gives the load's freed temporaries back to the OS (glibc keeps freed heap pages otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def engine_params(params: ModelParams, dtype: str = "auto", quantize: str | None = None) -> ModelParams:
    """An in-memory parameter tree of plain arrays (our layout) in the engine's form: matrices as
    aligned host `Weight`s of the chosen format, vectors float32, q/k/v fused (benchmarks, tests)."""
    check_choices(dtype, quantize)
    flat = {}
    for name, leaf in flat_leaves(fuse_qkv(params)):
        a = (leaf.data if leaf.fmt == "float32" else dequantize(leaf)) if isinstance(leaf, Weight) else np.asarray(leaf)
        flat[name] = tensor_file.aligned(a.astype(np.float32)) if a.ndim == 1 else \
            _matrix(a, False, dtype, quantize, name)
    return _build_tree(flat, len(params.layers))


def flat_leaves(tree):
    """(flat name like "layers.3.ffn.w_up", leaf) pairs; a Weight is one leaf."""
    is_weight = lambda a: isinstance(a, Weight)  # noqa: E731
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_weight)[0]:
        yield ".".join(str(getattr(k, "name", getattr(k, "idx", getattr(k, "key", k)))) for k in keypath), leaf


def to_device(tree):
    """Host arrays of a pytree as JAX arrays on the default device (zero-copy on the CPU backend)."""
    return jax.tree.map(tensor_file.to_jax, tree)


def _build_tree(flat: dict, num_layers: int) -> ModelParams:
    get = flat.get

    def norm(prefix: str) -> NormParams:
        return NormParams(scale=flat[prefix + ".scale"], bias=get(prefix + ".bias"))

    layers = []
    for i in range(num_layers):
        p = f"layers.{i}."
        attn = AttentionParams(
            **{k: get(p + "attn." + k) for k in ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "wqkv", "bqkv")}
        )
        ffn = FFNParams(**{k: get(p + "ffn." + k) for k in ("w_up", "w_down_t", "w_gate", "b_up", "b_down")})
        layers.append(LayerParams(norm(p + "attn_norm"), attn, norm(p + "ffn_norm"), ffn))
    return ModelParams(
        embed=flat["embed"],
        layers=layers,
        final_norm=norm("final_norm") if "final_norm.scale" in flat else None,
        lm_head=get("lm_head"),
        pos_embed=get("pos_embed"),
        project_in=get("project_in"),
        project_out=get("project_out"),
    )


# ---- engine-layout weight files (written once into a prepared bundle, mapped from there) ----
ENGINE_FORMAT_VERSION = 1


def matrix_format(model_dir: str, cfg: ModelConfig, dtype: str = "auto", quantize: str | None = None) -> str:
    """The format the model's matrices get for these choices ("auto": the first FFN matrix's stored dtype)."""
    check_choices(dtype, quantize)
    if quantize:
        return quantize
    if dtype != "auto":
        return dtype
    probe = {v[0]: k for k, v in _spec(cfg).items()}["layers.0.ffn.w_up"]
    for f in open_checkpoint(model_dir):
        for raw in f.keys():
            if _normalise_name(raw, cfg) == probe:
                f.close()
                try:
                    return storage_format(f.dtype(raw))
                except ValueError as err:
                    raise CheckpointError(f"{model_dir}: {probe}: {err}") from None
        f.close()
    raise CheckpointError(f"{model_dir}: no {probe} in the checkpoint")


def kv_format(model_dir: str, cfg: ModelConfig, dtype: str = "auto", kv_dtype: str = "auto") -> str:
    """The KV-cache precision `kv_dtype` names; "auto": the weights' float precision when it is a half one (bf16,
    f16; a quantized model's stored one), else float32. A half cache takes half the memory, as fast or faster on
    every backend measured (BENCHMARKS.md), and is what the checkpoint's own framework keeps at that precision."""
    return kv_dtype if kv_dtype != "auto" else kv_dtype_for(matrix_format(model_dir, cfg, dtype, None))


def kv_dtype_for(weights_fmt: str) -> str:
    """What `kv_dtype="auto"` gives weights stored as `weights_fmt`: its half precision, else float32."""
    return weights_fmt if weights_fmt in ("bfloat16", "float16") else "float32"


def engine_weights_name(fmt: str) -> str:
    """File name of the engine-layout weights in matrix format `fmt` (inside a prepared bundle)."""
    return f"weights_{fmt}.safetensors"


def _engine_file(model_dir: str, cfg: ModelConfig, dtype: str, quantize: str | None, bundle_dir: str | None):
    """The bundle's engine-layout weights file for this format, if `bin/prepare` wrote one."""
    if bundle_dir is None:
        return None
    path = os.path.join(bundle_dir, engine_weights_name(matrix_format(model_dir, cfg, dtype, quantize)))
    return path if os.path.isfile(path) else None


def weight_files(model_dir: str, cfg: ModelConfig, dtype: str = "auto", quantize: str | None = None,
                 bundle_dir: str | None = None) -> list[str]:
    """The safetensors files `load_model_params` reads for these choices."""
    engine_file = _engine_file(model_dir, cfg, dtype, quantize, bundle_dir)
    return [engine_file] if engine_file else safetensors_files(model_dir)


def load_model_params(model_dir: str, cfg: ModelConfig, dtype: str = "auto", quantize: str | None = None,
                      on_host: bool = False, bundle_dir: str | None = None) -> ModelParams:
    """The parameter tree for these precision choices: mapped from the bundle's engine-layout file
    when `bin/prepare` wrote one for this format (no transform at load), else built from the checkpoint."""
    engine_file = _engine_file(model_dir, cfg, dtype, quantize, bundle_dir)
    if engine_file:
        return load_engine_weights(engine_file, cfg, on_host=on_host)
    return load_params(model_dir, cfg, dtype=dtype, quantize=quantize, on_host=on_host)


# ---- the load-time scan for NaN/Inf ----
# `check_finite="auto"` scans weight files up to this size. Measured on this 2-core machine (see
# WORKSPACE.md, Reliability): the scan reads ~5 GB/s once the pages are cached, so 2 GiB adds about
# half a second to a load that maps them anyway; larger models opt in with check_finite=True.
FINITE_SCAN_AUTO_BYTES = 2 << 30
_SCAN_BLOCK = 1 << 22  # elements tested at a time: bounds the boolean temporaries
# Float formats as (unsigned view, exponent mask): all exponent bits set means Inf or NaN.
_EXPONENT_MASKS = {np.dtype(np.float32): (np.uint32, 0x7F800000), np.dtype(np.float64): (np.uint64, 0x7FF0000000000000),
                   np.dtype(np.float16): (np.uint16, 0x7C00), tensor_file.DTYPES["BF16"]: (np.uint16, 0x7F80)}


def first_nonfinite(a: np.ndarray) -> int | None:
    """Flat index of the first NaN/Inf in a float array (any of f32/f64/f16/bf16), else None."""
    if a.dtype not in _EXPONENT_MASKS:
        return None
    utype, mask = _EXPONENT_MASKS[a.dtype]
    bits, mask = np.ascontiguousarray(a).reshape(-1).view(utype), utype(mask)
    for s in range(0, bits.size, _SCAN_BLOCK):
        hit = (bits[s:s + _SCAN_BLOCK] & mask) == mask
        if hit.any():
            return s + int(np.argmax(hit))
    return None


def scan_finite(paths: list[str]) -> None:
    """Fails with a `NonFiniteError` naming the first tensor of these safetensors files that holds a
    NaN or Inf (pages are released as they are scanned, so memory stays flat)."""
    for path in paths:
        f = tensor_file.MappedSafetensors(path)
        try:
            for name in f.keys():
                if f.dtype(name) not in _EXPONENT_MASKS:
                    continue
                v = f.view(name)
                bad = first_nonfinite(v)
                f.release(name)
                if bad is not None:
                    value = v.reshape(-1)[bad]
                    raise NonFiniteError(
                        f"{path}: tensor {name} holds {value} at flat index {bad}: the checkpoint is corrupt; "
                        "re-download or re-export it (check_finite=False / --nocheck_finite runs it anyway)")
        finally:
            f.close()


def check_finite_weights(model_dir: str, cfg: ModelConfig, check_finite: bool | str = "auto", dtype: str = "auto",
                         quantize: str | None = None, bundle_dir: str | None = None) -> bool:
    """Scans the weight files a load will read for NaN/Inf: always (True), never (False), or "auto"
    (files up to FINITE_SCAN_AUTO_BYTES in total). Returns whether it scanned."""
    if check_finite is False:
        return False
    paths = weight_files(model_dir, cfg, dtype, quantize, bundle_dir)
    if check_finite == "auto" and sum(os.path.getsize(p) for p in paths) > FINITE_SCAN_AUTO_BYTES:
        return False
    scan_finite(paths)
    return True


def save_engine_weights(params: ModelParams, path: str, source: dict | None = None) -> None:
    """Writes a host parameter tree in the engine's layout (fused q/k/v, transposed down matrix,
    stored or quantized formats), 64-byte aligned, so a later load maps it with no transform."""
    tensors, formats = {}, {}
    for name, leaf in flat_leaves(params):
        if isinstance(leaf, Weight):
            tensors[name + ".data"] = np.asarray(leaf.data)
            if leaf.scale is not None:
                tensors[name + ".scale"] = np.asarray(leaf.scale)
            formats[name] = [leaf.fmt, leaf.cols]
        else:
            tensors[name] = np.asarray(leaf)
    meta = {"powerinfer_jax_engine_weights": str(ENGINE_FORMAT_VERSION), "formats": json.dumps(formats),
            "source": json.dumps(source or {})}
    tensor_file.save_aligned(tensors, path, metadata=meta)


def _check_engine_tensors(flat: dict, cfg: ModelConfig, path: str) -> None:
    """Every tensor the config needs, in the engine layout's shape and a consistent format (a bundle's
    weights file from another model, or edited, would otherwise run into shape errors inside jit)."""
    from ops.quant import FORMATS, format_bytes_per_row

    want = {ours: shape for ours, _, shape in _spec(cfg).values()}
    for i in range(cfg.num_layers):
        p = f"layers.{i}.attn."
        rows = [want.pop(p + k) for k in ("wq", "wk", "wv")]
        want[p + "wqkv"] = (sum(r[0] for r in rows), rows[0][1])
        if p + "bq" in want:
            want[p + "bqkv"] = (sum(want.pop(p + k)[0] for k in ("bq", "bk", "bv")),)
    problems = sorted(set(want) ^ set(flat))
    for name in set(want) & set(flat):
        leaf, shape = flat[name], want[name]
        if isinstance(leaf, Weight):
            try:
                ok = (len(shape) == 2 and leaf.fmt in FORMATS and leaf.shape == shape and
                      leaf.nbytes == shape[0] * format_bytes_per_row(leaf.fmt, shape[1]))
            except ValueError:  # int4 columns that do not fill whole groups
                ok = False
        else:
            ok = tuple(leaf.shape) == shape and leaf.dtype == np.float32
        if not ok:
            problems.append(name)
    if problems:
        raise CheckpointError(f"{path} does not match the model's config (missing, extra or mis-shaped: "
                              f"{', '.join(problems[:4])}{' ...' if len(problems) > 4 else ''}); re-run bin/prepare")


def load_engine_weights(path: str, cfg: ModelConfig, on_host: bool = False) -> ModelParams:
    """Maps an engine-layout weights file (`save_engine_weights`): every array a view of the file."""
    f = tensor_file.MappedSafetensors(path)
    if f.metadata.get("powerinfer_jax_engine_weights") != str(ENGINE_FORMAT_VERSION):
        raise CheckpointError(f"{path} is not an engine weights file of format {ENGINE_FORMAT_VERSION}; "
                              "re-run bin/prepare")
    try:
        formats = json.loads(f.metadata["formats"])
        flat: dict = {}
        for name in f.keys():
            if name.rsplit(".", 1)[-1] in ("data", "scale") and name.rsplit(".", 1)[0] in formats:
                continue
            flat[name] = f.view(name)
        for name, (fmt, cols) in formats.items():
            scale = f.view(name + ".scale") if name + ".scale" in f.entries else None
            flat[name] = Weight(f.view(name + ".data"), scale, fmt, int(cols))
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path} is corrupt ({type(err).__name__}: {str(err)[:80]}); re-run bin/prepare") from None
    finally:
        f.close()
    _check_engine_tensors(flat, cfg, path)
    # Our flat names use the tree's field names: norms end in ".scale"/".bias", which _build_tree reads.
    tree = _build_tree(flat, cfg.num_layers)
    return tree if on_host else to_device(tree)

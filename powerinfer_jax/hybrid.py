"""Builds the hybrid engine: device/host split of every FFN from a placement, plus the
llama.cpp-style dense layer offload baseline, and the device-memory report."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from powerinfer_jax.config import ModelConfig
from powerinfer_jax.engine import Engine
from ops.quant import Weight
from powerinfer_jax.loading import to_device
from powerinfer_jax.memory import buffer_address, kv_cache_bytes
from powerinfer_jax.tensor_file import to_global
from powerinfer_jax.params import LayerParams, ModelParams, param_bytes
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from powerinfer_jax.errors import ArgumentError
from powerinfer_jax.sparse_ffn import (MESH_AXIS, HybridRuntime, LayerPlan, PredictorParams,
                                       engine_predictor, predictor_format, split_ffn)


def offload_hot_indices(cfg: ModelConfig, offload_layers: int) -> list[np.ndarray]:
    """llama.cpp `-ngl N`: the last N layers wholly on the device, the others' FFNs on the host."""
    if not 0 <= offload_layers <= cfg.num_layers:
        raise ArgumentError(f"offload_layers must be in [0, {cfg.num_layers}], got {offload_layers}")
    first_on_device = cfg.num_layers - offload_layers
    n = cfg.intermediate_size
    return [np.arange(n, dtype=np.int32) if l >= first_on_device else np.zeros(0, np.int32)
            for l in range(cfg.num_layers)]


class HybridEngine(Engine):
    """An Engine whose FFNs are split between device (hot rows) and host (cold rows)."""

    def __init__(self, cfg, params, runtime: HybridRuntime, tokenizer=None, max_seq_len=None, model_dir=None,
                 placement_info: dict | None = None, kv_dtype: str = "float32", prompt_activations: str | None = None):
        super().__init__(cfg, params, tokenizer, max_seq_len=max_seq_len, ffn_fn=runtime.ffn_fn,
                         model_dir=model_dir, kv_dtype=kv_dtype, prompt_activations=prompt_activations)
        self.runtime = runtime
        self.mode = runtime.mode
        self.placement_info = placement_info or {}
        # Sparse modes must score sequences through the decode path (token by token), or the
        # prompt path (always dense) would hide what the sparse machinery does.
        self.stepwise_logits = self.stepwise_logits or runtime.mode != "dense"

    def memory_report(self) -> dict:
        """Bytes by group: what the device holds (on the CPU backend, where both sides share one
        memory, what a device would hold: the hot rows), what the host holds, and what is resident."""
        p = self.params
        layers = p.layers
        kv = kv_cache_bytes(self.cfg, 1, self.max_seq_len, self.kv_dtype)
        hot_bytes, cold_bytes = 0, 0
        for lp in layers:
            pl = lp.ffn.plan
            per_neuron = ffn_row_bytes(lp.ffn.shared if lp.ffn.shared is not None else lp.ffn.hot)
            hot_bytes += pl.n_hot * per_neuron
            cold_bytes += pl.n_cold * per_neuron
        dev = {
            "embeddings": param_bytes([p.embed, p.pos_embed, p.project_in, p.project_out]),
            "attention": param_bytes([lp.attn for lp in layers]),
            "norms": param_bytes([[lp.attn_norm, lp.ffn_norm] for lp in layers] + [p.final_norm]
                                 + [lp.ffn.b_down for lp in layers]),
            "output_head": param_bytes(p.lm_head),
            "predictors": param_bytes([lp.ffn.predictor for lp in layers]),
            "kv_cache": kv,
            "ffn_index": param_bytes([[lp.ffn.hot_ids, lp.ffn.cold_ids] for lp in layers]),
            "ffn_hot": hot_bytes,
        }
        hot = [lp.ffn.plan.n_hot for lp in layers]
        resident = resident_bytes(p, [lp.ffn.host.arrays() for lp in layers if lp.ffn.host is not None])
        per_device = None
        if self.runtime.mesh is not None:  # what each device of the mesh really holds (+ its KV cache replica)
            per_device = {str(d): b + kv for d, b in device_bytes(p).items()}
        return {"device": dev, "device_total": int(sum(dev.values())), "per_device": per_device,
                "host": {"ffn_cold": cold_bytes},
                "host_total": cold_bytes, "hot_neurons_per_layer": hot, "placement": self.placement_info,
                "shared_memory": layers[0].ffn.shared is not None if layers else False,
                "resident": resident, "resident_total": int(sum(resident.values()))}


def device_bytes(params) -> dict:
    """Bytes of the arrays' shards on each device (a replicated array counts on every device)."""
    out: dict = {}
    for a in jax.tree.leaves(params):
        if isinstance(a, jax.Array):
            for shard in a.addressable_shards:
                out[shard.device] = out.get(shard.device, 0) + shard.data.size * shard.data.dtype.itemsize
    return out


def ffn_row_bytes(ffn) -> int:
    """Bytes one neuron owns across its FFN matrices (its rows and their scales, its fc1 bias)."""
    if ffn is None:
        return 0
    total = 0
    for w in (ffn.w_gate, ffn.w_up, ffn.w_down_t, ffn.b_up):
        if w is not None:
            rows = w.data.shape[0] if isinstance(w, Weight) else w.shape[0]
            total += param_bytes(w) // max(rows, 1)
    return total


def resident_bytes(params, host_ffn=()) -> dict:
    """Bytes of memory the model's arrays occupy, by group, each buffer counted once (shared
    storage and views are not double counted)."""
    seen: set = set()

    def count(tree) -> int:
        total = 0
        for a in jax.tree.leaves(tree):
            key = _buffer_key(a)
            if key not in seen:
                seen.add(key)
                total += a.size * a.dtype.itemsize
        return total

    layers = params.layers
    return {"embeddings": count([params.embed, params.pos_embed, params.project_in, params.project_out]),
            "attention": count([lp.attn for lp in layers]),
            "norms": count([[lp.attn_norm, lp.ffn_norm] for lp in layers] + [params.final_norm]),
            "output_head": count(params.lm_head),
            "predictors": count([getattr(lp.ffn, "predictor", None) for lp in layers]),
            "ffn": count([dataclasses.replace(lp.ffn, predictor=None) if hasattr(lp.ffn, "predictor") else lp.ffn
                          for lp in layers] + list(host_ffn))}


def _buffer_key(a):
    """(address, bytes): a JAX array and a numpy view of the same memory count once."""
    ptr = buffer_address(a)
    return ("id", id(a)) if ptr is None else (ptr, a.size * a.dtype.itemsize)  # pointer-less (sharded): by identity


def build_hybrid_engine(
    cfg: ModelConfig,
    host_params: ModelParams,
    *,
    mode: str,
    hot_indices: Sequence[np.ndarray],
    predictors: Sequence[PredictorParams] | None = None,
    thresholds: Sequence[float] | None = None,
    capacities: Sequence[tuple[int, int]] | None = None,
    tokenizer=None,
    max_seq_len: int | None = None,
    model_dir: str | None = None,
    device_kernel: str = "auto",
    placement_info: dict | None = None,
    kv_dtype: str = "float32",
    overlap: bool = True,
    devices=None,
    rates: np.ndarray | None = None,
    act_thresholds: Sequence[float] | None = None,
    prompt_activations: str | None = None,
) -> HybridEngine:
    """Moves the non-FFN weights and each layer's hot rows to the device; cold rows stay on the host.

    `host_params` holds numpy arrays/Weights in their stored format (`load_params(on_host=True)`).
    On the CPU backend with the default numba kernel, FFN matrices are shared by both sides (no
    copy). `capacities[l] = (hot, cold)` bounds the active-set sizes per token (default: the
    partition sizes, which never drop a neuron). `overlap` (accelerator layout): the host computes
    a layer's cold neurons while the device computes its hot ones (False: one after the other).
    `devices` (an int: the first N of `jax.devices()`, or a list of devices): a 1-D mesh; each
    device holds and computes its share of every layer's hot neurons (dealt by firing rate,
    `rates [L, n_ff]`, so the shares carry equal activation mass; a layer's hot count is rounded
    down to a multiple of the device count), everything else is replicated. `act_thresholds[l]`
    (SwiGLU/GeGLU): the layer's threshold on |act(gate x)| that defines an active neuron.
    """
    if mode == "predicted" and predictors is None:
        raise ArgumentError("sparsity='predicted' needs predictors: load a prepared bundle (bin/prepare)")
    backend = jax.default_backend()
    if device_kernel == "auto":
        device_kernel = "pallas" if backend == "gpu" else ("numba" if backend == "cpu" else "xla")
    if device_kernel not in DEVICE_KERNELS:
        raise ArgumentError(f"unknown device_kernel {device_kernel!r}; choose one of auto, {', '.join(DEVICE_KERNELS)}")
    if device_kernel == "numba" and backend != "cpu":
        raise ArgumentError("device_kernel='numba' reads device arrays from host memory: CPU backend only")
    mesh = make_mesh(devices)
    n_dev = mesh.size if mesh is not None else 1
    if n_dev > 1 and device_kernel == "numba":
        device_kernel = "xla"  # a mesh means separate device memories: the accelerator layout
    shared = device_kernel == "numba"
    cold_indices = [None] * cfg.num_layers
    if n_dev > 1:  # each device gets an equal share of every layer's hot and cold rows, dealt by firing rate
        if cfg.intermediate_size % n_dev:
            raise ArgumentError(f"{n_dev} devices cannot share {cfg.intermediate_size} FFN neurons a layer evenly: "
                                "use a device count that divides intermediate_size")
        hot_indices = [deal_to_devices(h, None if rates is None else rates[l], n_dev)
                       for l, h in enumerate(hot_indices)]
        cold_indices = [deal_to_devices(np.setdiff1d(np.arange(cfg.intermediate_size, dtype=np.int32), h),
                                        None if rates is None else rates[l], n_dev) for l, h in enumerate(hot_indices)]
    pred_fmt = predictor_format(_ffn_format(host_params))
    layers = []
    for l, lp in enumerate(host_params.layers):
        pred = None
        if mode == "predicted":
            if isinstance(predictors[l].fc1, Weight):  # already in the engine's form
                pred = predictors[l]
            else:  # read every token like the weights: row matrices in their precision, by the same kernels
                pred = engine_predictor(predictors[l].fc1, predictors[l].fc2, pred_fmt)
        n_hot = len(hot_indices[l])
        n_cold = cfg.intermediate_size - n_hot
        cap_hot, cap_cold = capacities[l] if capacities is not None else (n_hot, n_cold)
        thr = float(thresholds[l]) if thresholds is not None else 0.0
        act_thr = float(act_thresholds[l]) if act_thresholds is not None else None
        plan = LayerPlan(n_hot, n_cold, max(min(cap_hot, n_hot), 0), max(min(cap_cold, n_cold), 0), thr, act_thr)
        ffn = split_ffn(cfg.ffn_kind, lp.ffn, hot_indices[l], pred, shared, plan, cold_indices[l], mesh)
        put = to_device if mesh is None else (lambda t: replicate(t, mesh))  # noqa: E731
        layers.append(LayerParams(put(lp.attn_norm), put(lp.attn), put(lp.ffn_norm), ffn))
    put = to_device if mesh is None else (lambda t: replicate(t, mesh))  # noqa: E731
    params = dataclasses.replace(
        host_params, embed=put(host_params.embed), layers=layers, final_norm=put(host_params.final_norm),
        lm_head=put(host_params.lm_head), pos_embed=put(host_params.pos_embed),
        project_in=put(host_params.project_in), project_out=put(host_params.project_out))
    runtime = HybridRuntime(cfg, mode, device_kernel=device_kernel, overlap=overlap, mesh=mesh)
    return HybridEngine(cfg, params, runtime, tokenizer, max_seq_len=max_seq_len, model_dir=model_dir,
                        placement_info=placement_info, kv_dtype=kv_dtype, prompt_activations=prompt_activations)


DEVICE_KERNELS = ("numba", "xla", "pallas")


def make_mesh(devices) -> Mesh | None:
    """A 1-D mesh (axis `MESH_AXIS`) over the first `devices` of `jax.devices()` (an int) or the
    given devices (a list); None for None."""
    if devices is None:
        return None
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        available = jax.devices()
        if not 1 <= devices <= len(available):
            raise ArgumentError(f"devices={devices}: this process sees {len(available)} device(s) "
                                f"({available[0].platform}); use 1..{len(available)} or a list of devices")
        devices = available[:devices]
    devices = list(devices)
    if not devices or len(set(devices)) != len(devices):
        raise ArgumentError("devices must be a non-empty list of distinct jax devices, or a count")
    return Mesh(np.array(devices), (MESH_AXIS,))


def deal_to_devices(hot: np.ndarray, rates: np.ndarray | None, n_dev: int) -> np.ndarray:
    """A layer's hot neuron ids rearranged device-major for `n_dev` devices: neurons sorted by
    firing rate (hottest first; by id without rates) are dealt round-robin, so every device gets
    the same count and about the same activation mass. The count is rounded down to a multiple
    of `n_dev` (the coldest of the hot neurons stay on the host)."""
    hot = np.asarray(hot, np.int32)
    order = hot if rates is None else hot[np.argsort(-np.asarray(rates)[hot], kind="stable")]
    per = len(order) // n_dev
    order = order[: per * n_dev]
    return np.concatenate([np.sort(order[k::n_dev]) for k in range(n_dev)]).astype(np.int32) if per else \
        np.zeros(0, np.int32)


def replicate(tree, mesh: Mesh):
    """Arrays of a pytree replicated on every device of the mesh."""
    every = NamedSharding(mesh, P())
    return jax.tree.map(lambda a: None if a is None else to_global(a, every), tree)


def _ffn_format(params: ModelParams) -> str:
    w = params.layers[0].ffn.w_up if params.layers else None
    return w.fmt if isinstance(w, Weight) else "float32"


def load_hybrid(cfg: ModelConfig, model_dir: str, bundle, tokenizer, *, mode: str, dtype: str,
                quantize: str | None, kv_dtype: str, max_seq_len: int | None, budget, threshold: float | None, offload_layers: int | None,
                placement_batch: int, min_hot: int, device_kernel: str, devices=None,
                act_thresholds=None, attn_input_thresholds=None, prompt_activations=None) -> HybridEngine:
    """`pij.load` for sparse modes, budgets and the offload baseline (see its docstring)."""
    from powerinfer_jax import memory
    from powerinfer_jax.loading import load_model_params

    if mode == "predicted" and (bundle is None or bundle.predictors is None):
        raise ArgumentError("sparsity='predicted' needs a prepared bundle with predictors: run bin/prepare on "
                         f"{model_dir} and load the bundle folder")
    max_seq_len = min(max_seq_len or 2048, cfg.max_position_embeddings)
    mesh = make_mesh(devices)  # checked before the weights are read
    n_dev = mesh.size if mesh is not None else 1
    host = load_model_params(model_dir, cfg, dtype=dtype, quantize=quantize, on_host=True,
                             bundle_dir=bundle.path if bundle is not None else None)
    fmt = _ffn_format(host)
    if attn_input_thresholds is not None:
        from powerinfer_jax.params import input_sparse_attention

        host = input_sparse_attention(host, attn_input_thresholds)
    preds = bundle.predictors if bundle is not None else None
    info: dict = {}
    n = cfg.intermediate_size
    if offload_layers is not None:
        hot = offload_hot_indices(cfg, offload_layers)
        info = {"kind": "layer_offload", "offload_layers": offload_layers}
    elif budget is None:
        hot = [np.arange(n, dtype=np.int32)] * cfg.num_layers
        info = {"kind": "all_on_device"}
    else:
        if bundle is None:
            raise ArgumentError("device_memory_budget needs activation statistics: run bin/prepare on "
                             f"{model_dir} and load the bundle folder")
        from powerinfer_jax.bundle import PlacementSettings

        ps = PlacementSettings(budget_bytes=memory.parse_bytes(budget), dtype=fmt, max_context=max_seq_len,
                               batch=placement_batch, min_hot_per_split_layer=min_hot,
                               reserve_predictors=mode == "predicted", devices=n_dev)
        stored = bundle.stored_placement(ps)
        if stored is not None:  # solved by bin/prepare for exactly these settings: no MILP at load time
            hot = [np.asarray(h, np.int32) for h in stored["placement"]["hot_indices"]]
            info = {"kind": "milp (stored)", "budget": ps.budget_bytes, "device_plan": stored["device_plan"],
                    "status": stored["placement"].get("status")}
        else:
            # Solved here, in memory: loading never writes into a bundle (`bin/prepare --budget`
            # stores a placement). The solver is the offline pipeline's, imported only now.
            from offline.bundle import solve_placement

            from powerinfer_jax.distributed import same_on_every_process

            p, plan = solve_placement(cfg, bundle.counts, bundle.tokens, preds.nbytes if preds else 0, ps)
            hot = same_on_every_process([np.asarray(h) for h in p.hot_indices], n)
            info = {"kind": "milp", "budget": ps.budget_bytes, "device_plan": plan.as_dict(), "status": p.status,
                    "objective_share": p.objective / max(p.total_mass, 1e-30), "solve_time_s": p.solve_time_s}
    thresholds = capacities = pred_params = None
    if mode == "predicted":
        pred_params = preds.params
        thresholds = [threshold] * cfg.num_layers if threshold is not None else list(preds.thresholds)
        ratios = [lp.metrics.get("ratio") or 1.5 for lp in preds.layers]
        if threshold is not None:
            # Below a layer's calibrated threshold more neurons fire than its measured ratio says:
            # size that layer's lists to its partitions, so no active neuron is dropped.
            ratios = [r if threshold >= t else float(n) for r, t in zip(ratios, preds.thresholds)]
        capacities = predicted_capacities(bundle.counts / max(bundle.tokens, 1), hot, ratios)
    return build_hybrid_engine(cfg, host, mode=mode, hot_indices=hot, predictors=pred_params,
                               thresholds=thresholds, capacities=capacities, tokenizer=tokenizer,
                               max_seq_len=max_seq_len, model_dir=model_dir, device_kernel=device_kernel,
                               placement_info=info, kv_dtype=kv_dtype, devices=mesh.devices.tolist() if mesh else None,
                               rates=bundle.counts / max(bundle.tokens, 1) if bundle is not None else None,
                               act_thresholds=act_thresholds, prompt_activations=prompt_activations)


def predicted_capacities(rates: np.ndarray, hot: Sequence[np.ndarray], ratios: Sequence[float],
                         margin: float = 4.0, min_capacity: int = 64) -> list[tuple[int, int]]:
    """Fixed active-set capacities per layer and partition, from profiled firing rates [L, n_ff].

    Cold (host) lists hold their whole partition. For the hot (device) part, whose kernels
    work over the capacity: the expected number of predicted-active neurons is its activation mass
    (sum of the neurons' firing rates) times the predictor's predicted/true ratio; the
    capacity is `margin` times that, rounded up to a power of two (few compiled shapes).
    """
    from ops.select import capacity_bucket

    caps = []
    n = rates.shape[1]
    for l, row in enumerate(rates):
        ratio = max(1.0, float(ratios[l]))
        in_hot = np.zeros(n, bool)
        in_hot[np.asarray(hot[l], np.int64)] = True
        exp_hot = row[in_hot].sum() * ratio * margin
        # Cold lists hold the whole partition: the host kernels loop over the active count, not the
        # capacity, so room costs nothing there, and bursty tokens dropped up to 1.6 active neurons
        # a token on the bundled model with capacities from the expected count.
        caps.append((capacity_bucket(int(np.ceil(exp_hot)), max(int(in_hot.sum()), 1), min_capacity),
                     max(int((~in_hot).sum()), 1)))
    return caps

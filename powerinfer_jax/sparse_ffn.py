"""The hybrid sparse FFN (PowerInfer's runtime half), beside the dense one in `ffn.py`.

Per layer the neurons are split by the placement into *hot* (device) and *cold* (host) ids
(`hot_ids`, `cold_ids`). Where the device and the host share one memory (the CPU backend) each
FFN matrix is kept whole, once (`HybridFFN.shared`), and both parts run the numba kernels over
it with their own neuron ids, as the reference engine does on the CPU. On an accelerator the hot
rows are copied to the device as compact arrays (`HybridFFN.hot`); the cold part reads the whole
host matrices (`HybridRuntime.host_ffn`) through a host callback. Partial outputs are summed on
the device. Weights may be in any stored format (`ops.quant.Weight`).

Which neurons are computed for a decode token:
  dense      all of them (device part dense over hot rows, host part dense over cold rows)
  oracle     exactly those whose ReLU output is non-zero (the true mask, from the gate);
             equals dense up to float rounding, which proves the sparse machinery exact
  predicted  those the layer's predictor scores >= threshold (PowerInfer's mode)
Prompts (T > 1 tokens) always run the dense split, as PowerInfer does for large batches.
Active sets are compacted into fixed-capacity index lists (static shapes); a token whose
active count exceeds the capacity drops the overflow, and the engine reports it.
Device kernels: "pallas" (GPU, Triton; dequantizes in registers), "xla" (gather + dequantize + dot), or
"numba" (CPU backend only: the shared whole matrices read in place; the default there).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ops.cpu_sparse import sparse_ffn_rows
from ops.host_kernels import host_ffn_callback
from ops.linear import linear
from ops.quant import Weight, to_weight
from powerinfer_jax import tensor_file
from ops.select import compact_mask
from ops.xla_sparse import sparse_ffn_xla
from powerinfer_jax.config import ModelConfig
from powerinfer_jax.ffn import dense_ffn
from powerinfer_jax.params import FFNParams
from powerinfer_jax.tensor_file import to_jax

f32 = jnp.float32
MODES = ("dense", "oracle", "predicted")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PredictorParams:
    """fc2(relu(fc1 x)), no biases: fc1 [d, r], fc2 [r, n_ff] as float arrays (training, bundles); or,
    in the engine, row `Weight`s fc1 [r, d] and fc2 [n_ff, r] (torch's layout) in a stored format,
    read by the same kernels as the model's weights (`engine_predictor`)."""

    fc1: jax.Array
    fc2: jax.Array


def predict_logits(p: PredictorParams, x: jax.Array) -> jax.Array:
    """Per-neuron activation logits [..., n_ff] from the residual stream x [..., d]."""
    if isinstance(p.fc1, Weight):
        return linear(jax.nn.relu(linear(x, p.fc1)), p.fc2)
    return jax.nn.relu(x.astype(f32) @ p.fc1.astype(f32)) @ p.fc2.astype(f32)


def predictor_format(weight_format: str) -> str:
    """The format the engine stores predictors in: the model's weights' (they are read every token,
    like the weights), but int8 for an int4 model (predictor errors decide which neurons run at all)."""
    return "int8" if weight_format == "int4" else weight_format


def engine_predictor(fc1, fc2, fmt: str) -> PredictorParams:
    """Host predictor matrices (fc1 [d, r], fc2 [r, n_ff]) as device row Weights of `fmt`."""
    def rows(a):
        return jax.tree.map(to_jax, to_weight(tensor_file.aligned(np.ascontiguousarray(np.asarray(a, np.float32).T)), fmt))

    return PredictorParams(fc1=rows(fc1), fc2=rows(fc2))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class HybridFFN:
    """Device-side state of one layer's hybrid FFN.

    Either `shared` (CPU backend: the whole matrices, read in place by both parts with neuron ids)
    or `hot` (an accelerator: compact copies of the hot rows on the device; the cold part reads the
    runtime's host matrices) is set."""

    shared: FFNParams | None  # whole FFN matrices (no b_down), CPU backend
    hot: FFNParams | None  # compact hot rows [H, d]; None when shared or H == 0
    hot_ids: jax.Array  # [H] int32 neuron ids of the hot rows
    cold_ids: jax.Array  # [C] int32 neuron ids of the host rows
    b_down: jax.Array | None  # OPT fc2 bias, added once on the device
    predictor: PredictorParams | None


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Static per-layer settings: partition sizes, capacities, predictor threshold."""

    n_hot: int
    n_cold: int
    hot_capacity: int
    cold_capacity: int
    threshold: float = 0.0


def take_rows(w, ids: np.ndarray):
    """Host rows w[ids] (a Weight keeps its per-row scales), or None."""
    if w is None:
        return None
    if isinstance(w, Weight):
        return Weight(np.ascontiguousarray(w.data[ids]), None if w.scale is None else np.ascontiguousarray(w.scale[ids]),
                      w.fmt, w.cols)
    return np.ascontiguousarray(np.asarray(w)[ids])


def split_ffn(ffn: FFNParams, hot_ids: np.ndarray, predictor: PredictorParams | None,
              shared: bool) -> HybridFFN:
    """One layer's device state from host FFN matrices: shared whole matrices, or hot-row copies."""
    n = ffn.w_up.shape[0]
    hot_ids = np.asarray(hot_ids, np.int32)
    cold_ids = np.setdiff1d(np.arange(n, dtype=np.int32), hot_ids)
    put = lambda tree: None if tree is None else jax.tree.map(to_jax, tree)  # noqa: E731
    whole = dataclasses.replace(ffn, b_down=None)
    hot = None
    if not shared and len(hot_ids):
        hot = FFNParams(**{k: take_rows(getattr(ffn, k), hot_ids) for k in ("w_up", "w_down_t", "w_gate", "b_up")})
    return HybridFFN(shared=put(whole) if shared else None, hot=put(hot), hot_ids=jnp.asarray(hot_ids),
                     cold_ids=jnp.asarray(cold_ids), b_down=put(ffn.b_down), predictor=predictor)


def _true_scores(family: str, w: FFNParams, x: jax.Array) -> jax.Array:
    """The pre-activation whose ReLU defines the true mask (gate, or fc1 + bias for OPT)."""
    if family == "relu":
        return linear(x, w.w_up, w.b_up)
    return linear(x, w.w_gate)


class HybridRuntime:
    """Provides the `ffn_fn` the model calls per layer; owns the host FFN matrices the cold part
    reads when they are not shared with the device (an accelerator)."""

    def __init__(self, cfg: ModelConfig, mode: str, plans: Sequence[LayerPlan], host_ffn: Sequence[FFNParams | None],
                 device_kernel: str = "xla", callback_method: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"unknown sparsity mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode != "dense" and not cfg.is_sparse_capable:
            raise ValueError(f"sparsity={mode!r} needs a ReLU FFN; this model's FFN is {cfg.ffn_kind!r}")
        self.cfg, self.mode, self.plans, self.host_ffn = cfg, mode, list(plans), list(host_ffn)
        self.device_kernel = device_kernel
        self.callback_method = callback_method

    def _part(self, i: int, p: HybridFFN, x, idx, valid, count, part: str, after=None):
        """FFN over one partition's ("hot" or "cold") active neurons, given as positions `idx` in
        that partition's id list."""
        family = self.cfg.ffn_kind
        neurons = jnp.take(p.hot_ids if part == "hot" else p.cold_ids, idx)
        if p.shared is not None:  # CPU backend: both parts read the whole matrices in place
            w = p.shared
            # The two numba calls of a layer run one after the other (`after`): together they
            # oversubscribe the cores (profile_decode, 2 layers: 4.8 -> 4.1 ms a layer).
            return sparse_ffn_rows(family, w.w_gate, w.w_up, w.w_down_t, w.b_up, x, neurons, count, after=after)
        if part == "cold":  # accelerator: the cold part runs on the host over its own matrices
            w = self.host_ffn[i]
            return host_ffn_callback(family, w.w_gate, w.w_up, w.w_down_t, x, neurons, count, w.b_up,
                                     method=self.callback_method)
        hot = p.hot
        if self.device_kernel == "pallas":
            from ops.pallas_gpu import sparse_ffn_pallas

            # Interpret mode off the GPU: lets CPU tests run the exact kernels the GPU runs.
            return sparse_ffn_pallas(family, hot.w_gate, hot.w_up, hot.w_down_t, x, idx, valid, hot.b_up,
                                     interpret=jax.default_backend() != "gpu")
        return sparse_ffn_xla(family, hot.w_gate, hot.w_up, hot.w_down_t, x, idx, valid, hot.b_up)

    def ffn_fn(self, i: int, p: HybridFFN, x_norm: jax.Array, x_resid: jax.Array):
        """The model's FFN hook: returns (output [B, T, d], per-layer counters)."""
        B, T, d = x_norm.shape
        x = x_norm.reshape(B * T, d)
        plan = self.plans[i]
        family = self.cfg.ffn_kind
        y = jnp.zeros((B * T, d), f32)
        aux: dict = {}
        if T > 1 or self.mode == "dense":
            # Dense split: every hot row on the device, every cold row on the host.
            if p.shared is not None:
                y = dense_ffn(p.shared, family, x)  # one memory: the whole FFN at once
            else:
                if plan.n_hot:
                    y = y + dense_ffn(p.hot, family, x)  # p.hot carries no down bias: added once below
                if plan.n_cold:
                    every = jnp.arange(plan.n_cold, dtype=jnp.int32)
                    y = y + self._part(i, p, x, every, None, jnp.int32(plan.n_cold), "cold")
            if T == 1:
                aux = {"ffn_computed": B * (plan.n_hot + plan.n_cold), "ffn_hot": B * plan.n_hot,
                       "ffn_total": B * (plan.n_hot + plan.n_cold), "ffn_overflow": jnp.int32(0)}
        else:
            if self.mode == "predicted":
                logits = predict_logits(p.predictor, x_resid.reshape(B * T, d))
                hot_mask = jnp.any(logits[:, p.hot_ids] >= plan.threshold, axis=0)
                cold_mask = jnp.any(logits[:, p.cold_ids] >= plan.threshold, axis=0)
            else:  # oracle: the true mask; the host part gets every cold row and its ReLU zeros
                hot_mask = None
                if plan.n_hot:
                    scores = _true_scores(family, p.shared if p.shared is not None else p.hot, x)
                    if p.shared is not None:
                        scores = scores[:, p.hot_ids]
                    hot_mask = jnp.any(scores > 0, axis=0)
                cold_mask = None
            computed, hot_done, overflow = jnp.int32(0), jnp.int32(0), jnp.int32(0)
            if plan.n_hot:
                idx, valid, count = compact_mask(hot_mask, plan.hot_capacity)
                hot_done = jnp.minimum(count, plan.hot_capacity)
                y = y + self._part(i, p, x, idx, valid, hot_done, "hot")
                overflow += count - hot_done
            if plan.n_cold:
                if cold_mask is None:
                    idx = jnp.arange(plan.n_cold, dtype=jnp.int32)
                    cold_done = jnp.int32(plan.n_cold)
                else:
                    idx, _, count = compact_mask(cold_mask, plan.cold_capacity)
                    cold_done = jnp.minimum(count, plan.cold_capacity)
                    overflow += count - cold_done
                y = y + self._part(i, p, x, idx, None, cold_done, "cold", after=y)
                computed += cold_done
            computed += hot_done
            aux = {"ffn_computed": computed, "ffn_hot": hot_done, "ffn_total": plan.n_hot + plan.n_cold,
                   "ffn_overflow": overflow}
        if p.b_down is not None:
            y = y + p.b_down.astype(f32)
        return y.reshape(B, T, d), aux

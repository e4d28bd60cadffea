"""The hybrid sparse FFN (PowerInfer's runtime half), beside the dense one in `ffn.py`.

Per layer the neurons are split by the placement: *hot* rows of gate/up/down_t sit on the
device as compact arrays (`HybridFFN.hot`, with `hot_ids` mapping compact row -> neuron id);
*cold* rows stay in host numpy arrays owned by `HybridRuntime` and are computed by numba
kernels through a host callback. Partial outputs are summed on the device.

Which neurons are computed for a decode token:
  dense      all of them (device part dense over hot rows, host part dense over cold rows)
  oracle     exactly those whose ReLU output is non-zero (the true mask, from the gate);
             equals dense up to float rounding, which proves the sparse machinery exact
  predicted  those the layer's predictor scores >= threshold (PowerInfer's mode)
Prompts (T > 1 tokens) always run the dense split, as PowerInfer does for large batches.
Active sets are compacted into fixed-capacity index lists (static shapes); a token whose
active count exceeds the capacity drops the overflow, and the engine reports it.
Device kernels: "pallas" (GPU, Triton), "xla" (gather + dot), or "numba" (CPU backend only:
the fused host kernel over zero-copy views of the device arrays; the default there).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ops.host_kernels import host_ffn_callback
from ops.select import compact_mask
from ops.xla_sparse import sparse_ffn_xla
from powerinfer_jax.config import ModelConfig
from powerinfer_jax.ffn import dense_ffn
from powerinfer_jax.params import FFNParams

f32 = jnp.float32
MODES = ("dense", "oracle", "predicted")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PredictorParams:
    """fc2(relu(fc1 x)), no biases: fc1 [d, r], fc2 [r, n_ff]."""

    fc1: jax.Array
    fc2: jax.Array


def predict_logits(p: PredictorParams, x: jax.Array) -> jax.Array:
    """Per-neuron activation logits [..., n_ff] from the residual stream x [..., d]."""
    return jax.nn.relu(x.astype(f32) @ p.fc1.astype(f32)) @ p.fc2.astype(f32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class HybridFFN:
    """Device-side state of one layer's hybrid FFN."""

    hot: FFNParams | None  # compact hot rows [H, d]; None when H == 0
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


def _rows(w: np.ndarray | None, ids: np.ndarray) -> np.ndarray | None:
    return None if w is None else np.ascontiguousarray(np.asarray(w)[ids])


def split_ffn(ffn: FFNParams, hot_ids: np.ndarray, predictor: PredictorParams | None,
              device_dtype) -> tuple[HybridFFN, dict]:
    """Splits a host (numpy) FFN into device hot rows and host cold rows."""
    n = np.asarray(ffn.w_up).shape[0]
    hot_ids = np.asarray(hot_ids, np.int32)
    cold_ids = np.setdiff1d(np.arange(n, dtype=np.int32), hot_ids)
    put = lambda a: None if a is None else jnp.asarray(a, dtype=device_dtype)  # noqa: E731
    hot = None
    if len(hot_ids):
        hot = FFNParams(w_up=put(_rows(ffn.w_up, hot_ids)), w_down_t=put(_rows(ffn.w_down_t, hot_ids)),
                        w_gate=put(_rows(ffn.w_gate, hot_ids)), b_up=put(_rows(ffn.b_up, hot_ids)))
    cold = {"w_gate": _rows(ffn.w_gate, cold_ids), "w_up": _rows(ffn.w_up, cold_ids),
            "w_down_t": _rows(ffn.w_down_t, cold_ids), "b_up": _rows(ffn.b_up, cold_ids)}
    layer = HybridFFN(hot=hot, hot_ids=jnp.asarray(hot_ids), cold_ids=jnp.asarray(cold_ids),
                      b_down=put(ffn.b_down), predictor=predictor)
    return layer, cold


def _true_scores(family: str, w_gate, w_up, b_up, x: jax.Array) -> jax.Array:
    """The pre-activation whose ReLU defines the true mask (gate, or fc1 + bias for OPT)."""
    if family == "relu":
        s = x @ w_up.astype(f32).T
        return s if b_up is None else s + b_up.astype(f32)
    return x @ w_gate.astype(f32).T


class HybridRuntime:
    """Owns the host-side cold weights and provides the `ffn_fn` the model calls per layer."""

    def __init__(self, cfg: ModelConfig, mode: str, plans: Sequence[LayerPlan], cold: Sequence[dict],
                 device_kernel: str = "xla", callback_method: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"unknown sparsity mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode != "dense" and not cfg.is_sparse_capable:
            raise ValueError(f"sparsity={mode!r} needs a ReLU FFN; this model's FFN is {cfg.ffn_kind!r}")
        self.cfg, self.mode, self.plans, self.cold = cfg, mode, list(plans), list(cold)
        self.device_kernel = device_kernel
        self.callback_method = callback_method
        self.hot_views: list[dict] = []  # numpy views of the hot rows, for device_kernel="numba"

    def _device_sparse(self, i: int, hot: FFNParams, x, idx, valid, count):
        if self.device_kernel == "numba":
            # CPU backend only: the device arrays live in this process's memory, so the fused numba
            # kernel reads zero-copy views of them (4.3x dense on a 7B layer vs 2.6x for XLA's
            # gather + dot, benchmarks/bench_hybrid_layer.py).
            v = self.hot_views[i]
            return host_ffn_callback(self.cfg.ffn_kind, v["w_gate"], v["w_up"], v["w_down_t"], x, idx, count,
                                     v["b_up"], method=self.callback_method)
        if self.device_kernel == "pallas":
            from ops.pallas_gpu import sparse_ffn_pallas

            # Interpret mode off the GPU: lets CPU tests run the exact kernels the GPU runs.
            return sparse_ffn_pallas(self.cfg.ffn_kind, hot.w_gate, hot.w_up, hot.w_down_t, x, idx, valid, hot.b_up,
                                     interpret=jax.default_backend() != "gpu")
        return sparse_ffn_xla(self.cfg.ffn_kind, hot.w_gate, hot.w_up, hot.w_down_t, x, idx, valid, hot.b_up)

    def _host(self, i: int, x, idx, count, after=None):
        c = self.cold[i]
        # With the numba device kernel both parts are CPU callbacks: run them one after the other
        # (`after`), since together they oversubscribe the cores (profile_decode, 2 layers: 4.8 -> 4.1 ms a layer).
        after = after if self.device_kernel == "numba" else None
        return host_ffn_callback(self.cfg.ffn_kind, c["w_gate"], c["w_up"], c["w_down_t"], x, idx, count,
                                 c["b_up"], method=self.callback_method, after=after)

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
            if plan.n_hot:
                y = y + dense_ffn(p.hot, family, x)  # p.hot carries no down bias: added once below
            if plan.n_cold:
                y = y + self._host(i, x, jnp.arange(plan.n_cold, dtype=jnp.int32), jnp.int32(plan.n_cold), after=y)
            if T == 1:
                aux = {"ffn_computed": B * (plan.n_hot + plan.n_cold), "ffn_hot": B * plan.n_hot,
                       "ffn_total": B * (plan.n_hot + plan.n_cold), "ffn_overflow": jnp.int32(0)}
        else:
            if self.mode == "predicted":
                logits = predict_logits(p.predictor, x_resid.reshape(B * T, d))
                hot_mask = jnp.any(logits[:, p.hot_ids] >= plan.threshold, axis=0)
                cold_mask = jnp.any(logits[:, p.cold_ids] >= plan.threshold, axis=0)
            else:  # oracle: the true mask; the host part gets every cold row and its ReLU zeros
                hot_mask = (jnp.any(_true_scores(family, p.hot.w_gate, p.hot.w_up, p.hot.b_up, x) > 0, axis=0)
                            if plan.n_hot else None)
                cold_mask = None
            computed, hot_done, overflow = jnp.int32(0), jnp.int32(0), jnp.int32(0)
            if plan.n_hot:
                idx, valid, count = compact_mask(hot_mask, plan.hot_capacity)
                hot_done = jnp.minimum(count, plan.hot_capacity)
                y = y + self._device_sparse(i, p.hot, x, idx, valid, hot_done)
                overflow += count - hot_done
            if plan.n_cold:
                if cold_mask is None:
                    idx = jnp.arange(plan.n_cold, dtype=jnp.int32)
                    count = jnp.int32(plan.n_cold)
                    cold_done = count
                else:
                    idx, _, count = compact_mask(cold_mask, plan.cold_capacity)
                    cold_done = jnp.minimum(count, plan.cold_capacity)
                    overflow += count - cold_done
                y = y + self._host(i, x, idx, cold_done, after=y)
                computed += cold_done
            computed += hot_done
            aux = {"ffn_computed": computed, "ffn_hot": hot_done, "ffn_total": plan.n_hot + plan.n_cold,
                   "ffn_overflow": overflow}
        if p.b_down is not None:
            y = y + p.b_down.astype(f32)
        return y.reshape(B, T, d), aux

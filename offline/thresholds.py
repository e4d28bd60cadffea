"""Threshold sparsity for SwiGLU/GeGLU models: per-layer thresholds on |act(gate x)| calibrated to a
target sparsity on a corpus (CATS, arXiv 2404.08763; TEAL does the same for projection inputs).

A SwiGLU neuron is never exactly inactive; calling it inactive when |silu(gate x)| is at most the
layer's threshold t_l, with t_l the `target_sparsity` quantile of |silu(gate x)| over the corpus's
tokens and the layer's neurons, makes the FFN `target_sparsity` sparse on that text. From there the
ReLU pipeline applies unchanged: the profiler counts |a| > t_l, predictors learn that mask, the
placement places its hot neurons, and the engine's oracle mode computes exactly those neurons.
Calibration runs the dense model (as CATS does) and streams a fine log-scale histogram of |a| per
layer, so memory stays bounded at any corpus size; the quantile is exact to the bin width (0.5%).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from powerinfer_jax.config import ModelConfig
from powerinfer_jax.errors import ArgumentError
from powerinfer_jax.model import forward
from powerinfer_jax.params import ModelParams

LOG10_LO, LOG10_HI, BINS = -12.0, 4.0, 8192  # |a| from 1e-12 to 1e4; bin width 0.002 decades (0.45%)


def _device_histograms(per_layer: list[jax.Array]) -> jax.Array:
    """Inside jit: the log-scale histogram [L, BINS] of |v| for each layer's array (bins as `_bin_of`), so a
    batch's activations ([L, B, T, n_ff]: 2.9 GB at LLaMA-7B size) never leave the device."""
    def one(v):
        pos = (jnp.log10(jnp.abs(v).ravel()) - LOG10_LO) * (BINS / (LOG10_HI - LOG10_LO))
        idx = jnp.clip(jnp.nan_to_num(pos, neginf=0.0), 0, BINS - 1).astype(jnp.int32)
        return jnp.bincount(idx, length=BINS)

    return jnp.stack([one(v) for v in per_layer])


@functools.partial(jax.jit, static_argnames=("cfg", "groups"))
def _histogram_batch(params: ModelParams, cfg: ModelConfig, tokens: jax.Array, groups: tuple[str, ...]) -> jax.Array:
    """[L, len(groups), BINS] histograms of the collected arrays named by `groups` (`forward(collect=True)`)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    _, _, ex = forward(params, cfg, tokens, positions, collect=True)
    return jnp.stack([_device_histograms(ex[g]) for g in groups], axis=1)


def _bin_of(a: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        pos = (np.log10(a) - LOG10_LO) * (BINS / (LOG10_HI - LOG10_LO))
    return np.clip(np.nan_to_num(pos, neginf=0.0), 0, BINS - 1).astype(np.int64)


def _histograms(params: ModelParams, cfg: ModelConfig, groups: tuple[str, ...], windows: np.ndarray, batch: int,
                progress=None) -> np.ndarray:
    """Log-scale histograms [L, len(groups), BINS] of |collected arrays| over `windows`, a batch at a time."""
    hist = np.zeros((cfg.num_layers, len(groups), BINS), np.int64)
    for i in range(0, len(windows), batch):
        chunk = np.asarray(windows[i : i + batch])
        hist += np.asarray(_histogram_batch(params, cfg, jnp.asarray(chunk), groups), np.int64)
        if progress is not None:
            progress.update(chunk.size)
    return hist


def quantile_from_histogram(hist: np.ndarray, q: float) -> float:
    """The value below which a share q of the histogram's mass lies (log-linear inside a bin)."""
    cum = np.cumsum(hist) / max(hist.sum(), 1)
    k = int(np.searchsorted(cum, q))
    k = min(k, BINS - 1)
    before = cum[k - 1] if k else 0.0
    frac = (q - before) / max(cum[k] - before, 1e-30)
    width = (LOG10_HI - LOG10_LO) / BINS
    return float(10.0 ** (LOG10_LO + (k + min(max(frac, 0.0), 1.0)) * width))


def calibrate(params: ModelParams, cfg: ModelConfig, windows: np.ndarray, target_sparsity: float,
              batch: int = 8, progress=None, allow_relu: bool = False) -> dict:
    """Per-layer thresholds making each layer `target_sparsity` sparse on `windows` [N, T] (token ids).

    Returns {"values": [L] thresholds, "target_sparsity", "tokens", "achieved": [L] measured sparsity
    at those thresholds on the same tokens}. `allow_relu`: also for a ReLU model (a threshold above its
    zeros, for sparsity beyond its own: the sparsity/perplexity curve)."""
    if not cfg.needs_act_threshold and not allow_relu:
        raise ArgumentError(f"activation thresholds are for SwiGLU/GeGLU models; this model's FFN is {cfg.ffn_kind!r} "
                            "(sparse by its ReLU)")
    if not 0.0 < target_sparsity < 1.0:
        raise ArgumentError(f"target_sparsity must be in (0, 1), got {target_sparsity}")
    L = cfg.num_layers
    hist = _histograms(params, cfg, ("ffn_act",), windows, batch, progress)[:, 0]
    values = [quantile_from_histogram(hist[l], target_sparsity) for l in range(L)]
    # Measured share at or below each threshold: the mass of the bins up to the threshold's (exact zeros of a
    # ReLU layer all sit in bin 0; otherwise one bin's mass, 0.45% of the values' range, bounds the error).
    achieved = [float(hist[l][: _bin_of(np.array([v]))[0] + 1].sum() / max(hist[l].sum(), 1))
                for l, v in enumerate(values)]
    return {"values": values, "target_sparsity": float(target_sparsity), "tokens": int(windows.size),
            "achieved": achieved}


def calibrate_attention_inputs(params: ModelParams, cfg: ModelConfig, windows: np.ndarray, target_sparsity: float,
                               batch: int = 8, progress=None) -> dict:
    """TEAL: per-layer thresholds on |x| of the q/k/v input and of the o input making each `target_sparsity`
    sparse on `windows`. Returns {"values": [L][2], "target_sparsity", "tokens"}."""
    if not 0.0 < target_sparsity < 1.0:
        raise ArgumentError(f"attention input sparsity must be in (0, 1), got {target_sparsity}")
    L = cfg.num_layers
    hist = _histograms(params, cfg, ("attn_in", "attn_o_in"), windows, batch, progress)
    values = [[quantile_from_histogram(hist[l, j], target_sparsity) for j in range(2)] for l in range(L)]
    return {"values": values, "target_sparsity": float(target_sparsity), "tokens": int(windows.size)}

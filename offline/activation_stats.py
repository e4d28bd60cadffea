"""FFN firing statistics: how often each neuron is active, and how skewed that is.

Shared by the bundled model's card (issue: default model) and the offline profiler.
A neuron is active on a token when its ReLU output is > 0 (relu(gate x) for ReGLU/dReLU,
relu(fc1 x + b) for OPT).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from powerinfer_jax.config import ModelConfig
from powerinfer_jax.model import forward
from powerinfer_jax.params import ModelParams


@functools.partial(jax.jit, static_argnames=("cfg",))
def _fires(params: ModelParams, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    _, _, extras = forward(params, cfg, tokens, positions, collect=True)
    return jnp.stack([(a > 0).sum(axis=(0, 1), dtype=jnp.int32) for a in extras["ffn_act"]])


def firing_counts(params: ModelParams, cfg: ModelConfig, windows: np.ndarray, batch: int = 8,
                  progress=None) -> tuple[np.ndarray, int]:
    """Per-layer, per-neuron firing counts [L, n_ff] over token windows [N, T], and the token count."""
    counts = np.zeros((cfg.num_layers, cfg.intermediate_size), np.int64)
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        counts += np.asarray(_fires(params, cfg, jnp.asarray(chunk)))
        if progress is not None:
            progress.update(len(chunk))
    return counts, int(windows.size)


def hot_share(counts_row: np.ndarray, fraction: float) -> float:
    """Share of all activations carried by the hottest `fraction` of a layer's neurons."""
    total = counts_row.sum()
    if total == 0:
        return 0.0
    k = max(1, int(round(fraction * counts_row.size)))
    return float(np.sort(counts_row)[::-1][:k].sum() / total)


def summarize(counts: np.ndarray, tokens: int) -> dict:
    """Per-layer and mean sparsity, skew (hot 10/20/50% shares) and dead-neuron fractions."""
    layers = []
    for l, row in enumerate(counts):
        layers.append({
            "layer": l,
            "active_frac": float(row.sum() / (tokens * row.size)),
            "zero_frac": float(1 - row.sum() / (tokens * row.size)),
            "hot10_share": hot_share(row, 0.10),
            "hot20_share": hot_share(row, 0.20),
            "hot50_share": hot_share(row, 0.50),
            "dead_frac": float((row == 0).mean()),
        })
    mean = {k: float(np.mean([x[k] for x in layers])) for k in layers[0] if k != "layer"}
    return {"tokens": tokens, "layers": layers, "mean": mean}


def plot_frequency_curves(counts: np.ndarray, tokens: int, path: str, title: str = "",
                          designed: np.ndarray | None = None) -> None:
    """PNG of each layer's sorted activation-frequency curve (log scale): the power law.

    `designed` (rates [n_ff], e.g. a synthetic model's target law) is drawn dashed for comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for l, row in enumerate(counts):
        freq = np.sort(row)[::-1] / tokens
        ax.plot(np.arange(1, len(freq) + 1) / len(freq), np.maximum(freq, 1e-6), label=f"layer {l}", lw=1.2)
    if designed is not None:
        f = np.sort(np.asarray(designed))[::-1]
        ax.plot(np.arange(1, len(f) + 1) / len(f), f, "k--", lw=1.5, label="designed")
    ax.set_yscale("log")
    ax.set_xlabel("neuron rank (fraction of layer, hottest first)")
    ax.set_ylabel("activation frequency (share of tokens)")
    ax.set_title(title or "FFN neuron activation frequency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

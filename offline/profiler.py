"""Activation profiler: runs the dense model over a corpus and records FFN firing statistics.

Output folder (all arrays in numeric layer order):
  counts.npy            int64 [L, n_ff]  how many tokens each neuron fired on
  histograms.npy        int64 [L, H]     per layer, histogram of "neurons active per token"
  samples/x_{l:03d}.npy float16 [N, d]   predictor inputs: the residual stream before the FFN norm
  samples/mask_{l:03d}.npy uint8 [N, ceil(n_ff/8)]  packed active masks (np.packbits, bit order big)
  summary.json          tokens, samples, per-layer sparsity and skew (hot 10/20/50% shares)
  frequency_curves.png  each layer's sorted activation-frequency curve, log scale
Samples are written into preallocated memory-mapped files, so memory stays bounded by one
batch whatever the corpus size.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from offline import activation_stats
from powerinfer_jax.bundle import load_counts  # noqa: F401  (the library reads profiles; re-exported here)
from powerinfer_jax.config import ModelConfig
from powerinfer_jax.errors import PathNotFoundError, PowerInferError, UnsupportedModelError
from powerinfer_jax.model import forward
from powerinfer_jax.params import ModelParams

HIST_BINS = 64


class CorpusError(PowerInferError):
    """An empty corpus, or one too short for what was asked."""


@dataclasses.dataclass(frozen=True)
class ProfileSettings:
    """How much of the corpus to profile and how many predictor samples to keep."""

    window: int = 256  # tokens per forward (BOS + window - 1 corpus tokens)
    batch: int = 8  # windows per forward
    max_tokens: int = 200_000  # profile at most this many tokens
    max_samples: int = 60_000  # (input, mask) rows kept per layer for predictor training
    min_tokens: int = 2048  # refuse corpora shorter than this
    seed: int = 0


@functools.partial(jax.jit, static_argnames=("cfg",))
def _profile_batch(params: ModelParams, cfg: ModelConfig, tokens: jax.Array, act_thresholds: jax.Array):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    _, _, ex = forward(params, cfg, tokens, positions, collect=True)
    xs = jnp.stack(ex["ffn_in"])  # [L, B, T, d]
    # Active: a ReLU output above 0, or |act(gate x)| above the layer's threshold (SwiGLU/GeGLU).
    masks = jnp.abs(jnp.stack(ex["ffn_act"])) > act_thresholds[:, None, None, None]  # [L, B, T, n_ff]
    return xs, masks


def read_corpus(paths: list[str]) -> str:
    """Concatenates text files; clear errors for missing or empty ones."""
    texts = []
    for p in paths:
        if not os.path.isfile(p):
            raise PathNotFoundError(f"corpus file not found: {p}")
        try:
            with open(p, encoding="utf-8") as f:
                texts.append(f.read())
        except UnicodeDecodeError as err:
            raise CorpusError(f"corpus file {p} is not UTF-8 text (byte {err.start}); convert it to UTF-8") from None
    text = "\n\n".join(texts)
    if not text.strip():
        raise CorpusError(f"the corpus is empty: {', '.join(paths)}")
    return text


def make_windows(ids: np.ndarray, window: int, bos: int | None) -> np.ndarray:
    """Non-overlapping token windows [N, window], each starting with BOS when given."""
    body = window - (1 if bos is not None else 0)
    n = len(ids) // body
    w = ids[: n * body].reshape(n, body)
    if bos is not None:
        w = np.concatenate([np.full((n, 1), bos, w.dtype), w], axis=1)
    return w.astype(np.int32)


def profile(params: ModelParams, cfg: ModelConfig, token_ids: np.ndarray, out_dir: str,
            s: ProfileSettings = ProfileSettings(), bos: int | None = None, progress=None,
            act_thresholds=None) -> dict:
    """Profiles the model over `token_ids` and writes the output folder; returns the summary.
    `act_thresholds` [L] (SwiGLU/GeGLU, from `offline.thresholds.calibrate`): a neuron is active when
    |act(gate x)| is above its layer's."""
    if not cfg.is_sparse_capable:
        raise UnsupportedModelError(f"cannot profile a {cfg.ffn_kind!r} FFN")
    if cfg.needs_act_threshold and act_thresholds is None:
        raise UnsupportedModelError(f"a {cfg.ffn_kind} FFN is never exactly zero: profiling it needs activation "
                                    "thresholds (bin/prepare --target_sparsity calibrates them)")
    thr = jnp.asarray(np.zeros(cfg.num_layers) if act_thresholds is None else act_thresholds, jnp.float32)
    if len(token_ids) < s.min_tokens:
        raise CorpusError(f"corpus too short: {len(token_ids)} tokens, need at least {s.min_tokens}")
    windows = make_windows(np.asarray(token_ids), s.window, bos)[: max(1, s.max_tokens // s.window)]
    L, n, d = cfg.num_layers, cfg.intermediate_size, cfg.hidden_size
    total_tokens = windows.size
    n_samples = min(s.max_samples, total_tokens)
    # Keep a uniform random subset of token positions as predictor samples.
    rng = np.random.default_rng(s.seed)
    keep = np.zeros(total_tokens, bool)
    keep[rng.choice(total_tokens, n_samples, replace=False)] = True

    os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
    open_mm = np.lib.format.open_memmap
    xs_mm = [open_mm(os.path.join(out_dir, "samples", f"x_{l:03d}.npy"), "w+", np.float16, (n_samples, d))
             for l in range(L)]
    mk_mm = [open_mm(os.path.join(out_dir, "samples", f"mask_{l:03d}.npy"), "w+", np.uint8,
                     (n_samples, (n + 7) // 8)) for l in range(L)]
    counts = np.zeros((L, n), np.int64)
    hist = np.zeros((L, HIST_BINS), np.int64)
    row, flat_pos = 0, 0
    for i in range(0, len(windows), s.batch):
        chunk = windows[i : i + s.batch]
        xs, masks = _profile_batch(params, cfg, jnp.asarray(chunk), thr)
        xs = np.asarray(xs).reshape(L, -1, d)
        masks = np.asarray(masks).reshape(L, -1, n)
        counts += masks.sum(axis=1)
        per_tok = masks.sum(axis=2)  # [L, tokens]
        bins = np.minimum(per_tok * HIST_BINS // (n + 1), HIST_BINS - 1)
        for l in range(L):
            hist[l] += np.bincount(bins[l], minlength=HIST_BINS)
        sel = keep[flat_pos : flat_pos + masks.shape[1]]
        k = int(sel.sum())
        for l in range(L):
            xs_mm[l][row : row + k] = xs[l, sel].astype(np.float16)
            mk_mm[l][row : row + k] = np.packbits(masks[l, sel], axis=1)
        row += k
        flat_pos += masks.shape[1]
        if progress is not None:
            progress.update(chunk.size)
    for mm in xs_mm + mk_mm:
        mm.flush()
    np.save(os.path.join(out_dir, "counts.npy"), counts)
    np.save(os.path.join(out_dir, "histograms.npy"), hist)
    summary = activation_stats.summarize(counts, total_tokens)
    summary.update(samples=n_samples, n_ff=n, hidden=d, layers=L, window=s.window,
                   settings=dataclasses.asdict(s))
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    activation_stats.plot_frequency_curves(counts, total_tokens, os.path.join(out_dir, "frequency_curves.png"))
    return summary


def load_samples(profile_dir: str, layer: int, n_ff: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs float32 [N, d], active masks bool [N, n_ff]) of one layer from a profile folder."""
    x = np.load(os.path.join(profile_dir, "samples", f"x_{layer:03d}.npy"), mmap_mode="r")
    m = np.load(os.path.join(profile_dir, "samples", f"mask_{layer:03d}.npy"), mmap_mode="r")
    return np.asarray(x, np.float32), np.unpackbits(m, axis=1, count=n_ff).astype(bool)


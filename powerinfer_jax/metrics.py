"""Quality metrics computed with the engine: held-out perplexity."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-position negative log-likelihood of `targets` under float logits [T, V]."""
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
    return logz - logits[np.arange(len(targets)), targets]


def perplexity(scorer, token_ids: Sequence[int], window: int = 256, bos: int | None = None,
               max_windows: int | None = None) -> dict:
    """Perplexity over non-overlapping windows; each window starts with BOS when given.

    `scorer` is an Engine or any function ids -> logits [T, V] (e.g. a transformers model).
    Returns {"perplexity", "nll", "tokens", "windows"}.
    """
    logits_fn = scorer.logits if hasattr(scorer, "logits") else scorer
    ids = np.asarray(token_ids, dtype=np.int64)
    step = window - (1 if bos is not None else 0)
    total, count, windows = 0.0, 0, 0
    for start in range(0, len(ids) - 1, step):
        chunk = ids[start : start + step + 1]
        if len(chunk) < 2:
            break
        seq = np.concatenate([[bos], chunk]) if bos is not None else chunk
        logits = logits_fn(seq[:-1])
        nll = token_nll(logits, seq[1:])
        if bos is not None:
            nll = nll[1:]  # the BOS -> first-token prediction is not scored
        total += float(nll.sum())
        count += len(nll)
        windows += 1
        if max_windows is not None and windows >= max_windows:
            break
    mean = total / max(count, 1)
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count, "windows": windows}

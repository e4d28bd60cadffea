"""Glue for the offline steps run by `bin/`: load a model, read and tokenize a corpus, profile."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from offline import profiler
from powerinfer_jax.config import load_config
from powerinfer_jax.errors import PathNotFoundError, UnsupportedModelError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO / "data" / "tinyshakespeare.txt"
HOLDOUT_FRACTION = 0.1  # the bundled model's held-out tail, never profiled


def default_corpus_text() -> str:
    """The training split (first 90%) of the repo's Tiny Shakespeare, as the bundled model used."""
    text = DEFAULT_CORPUS.read_text(encoding="utf-8")
    return text[: int(len(text) * (1 - HOLDOUT_FRACTION))]


def corpus_text(paths: list[str] | None) -> str:
    """Text of the given corpus files, or the default training split."""
    return profiler.read_corpus(list(paths)) if paths else default_corpus_text()


def tokenize(engine, text: str) -> np.ndarray:
    """Token ids of a corpus (no BOS; windows add their own)."""
    if engine.tokenizer is None:
        raise PathNotFoundError(f"{engine.model_dir} has no tokenizer.json: cannot tokenize a text corpus")
    ids = engine.tokenizer.encode(text, add_bos=False)
    return np.asarray(ids, np.int32)


def check_sparse_model(model_dir: str) -> None:
    """Fails clearly for models whose FFN the sparse engine cannot run."""
    cfg = load_config(model_dir)
    if not cfg.is_sparse_capable:
        raise UnsupportedModelError(
            f"{model_dir}: FFN kind {cfg.ffn_kind!r} is not supported for sparsity; supported: ReLU kinds (ReGLU, "
            "dReLU, OPT) and, through calibrated thresholds (--target_sparsity), SwiGLU/GeGLU")


def run_calibration(model_dir: str, corpus: list[str] | None, target_sparsity: float,
                    settings: profiler.ProfileSettings, dtype: str = "float32", max_tokens: int = 32768,
                    attention: bool = False) -> dict:
    """SwiGLU/GeGLU: per-layer activation thresholds for `target_sparsity` on (the first `max_tokens`
    tokens of) the corpus, with a progress bar (`offline.thresholds.calibrate`); `attention`: TEAL's
    attention input thresholds instead (`calibrate_attention_inputs`)."""
    import powerinfer_jax as pij
    from tqdm import tqdm

    from offline import thresholds

    engine = pij.load(model_dir, dtype=dtype)
    ids = tokenize(engine, corpus_text(corpus))
    windows = profiler.make_windows(ids, settings.window, engine.tokenizer.bos_token_id)
    windows = windows[: max(1, min(max_tokens, settings.max_tokens) // settings.window)]
    with tqdm(total=windows.size, desc="calibrating thresholds", unit="tok") as bar:
        if attention:
            return thresholds.calibrate_attention_inputs(engine.params, engine.cfg, windows, target_sparsity,
                                                         settings.batch, bar)
        return thresholds.calibrate(engine.params, engine.cfg, windows, target_sparsity, settings.batch, bar)


def run_profile(model_dir: str | None, corpus: list[str] | None, out_dir: str,
                settings: profiler.ProfileSettings, dtype: str = "float32", act_thresholds=None) -> dict:
    """Loads the model, tokenizes the corpus and writes a profile folder, with a progress bar
    (`act_thresholds`: a SwiGLU/GeGLU model's calibrated thresholds)."""
    import powerinfer_jax as pij
    from tqdm import tqdm

    model_dir = model_dir or pij.default_model_dir()
    check_sparse_model(model_dir)
    engine = pij.load(model_dir, dtype=dtype)
    ids = tokenize(engine, corpus_text(corpus))
    total = min(len(ids), settings.max_tokens)
    with tqdm(total=total, desc="profiling", unit="tok") as bar:
        return profiler.profile(engine.params, engine.cfg, ids, out_dir, settings,
                                bos=engine.tokenizer.bos_token_id, progress=bar, act_thresholds=act_thresholds)


def print_profile_table(summary: dict) -> None:
    """Markdown table of per-layer sparsity and skew."""
    print(f"\nprofiled {summary['tokens']:,} tokens, kept {summary['samples']:,} predictor samples per layer\n")
    print("| layer | active % | hot10 share | hot20 share | hot50 share | dead % |\n|---|---|---|---|---|---|")
    for x in summary["layers"]:
        print(f"| {x['layer']} | {100 * x['active_frac']:.2f} | {x['hot10_share']:.3f} | {x['hot20_share']:.3f} | "
              f"{x['hot50_share']:.3f} | {100 * x['dead_frac']:.2f} |")
    m = summary["mean"]
    print(f"| mean | {100 * m['active_frac']:.2f} | {m['hot10_share']:.3f} | {m['hot20_share']:.3f} | "
          f"{m['hot50_share']:.3f} | {100 * m['dead_frac']:.2f} |")

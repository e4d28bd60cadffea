"""Writes the bundled model folder: HF checkpoint, tokenizer files, evaluation, and model card."""

from __future__ import annotations

import dataclasses
import json
import os
import platform

import numpy as np

from offline import activation_stats
from offline.profiler import make_windows
from offline.train_model import BOS_ID, EOS_ID
from powerinfer_jax.export import save_hf_checkpoint

# The fast test re-measures perplexity on this many held-out windows and compares with the card.
SLICE_WINDOWS = 8
EVAL_WINDOW = 256


def unigram_perplexity(train_ids: np.ndarray, eval_ids: np.ndarray, vocab: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on the training tokens."""
    counts = np.bincount(train_ids, minlength=vocab)
    p = (counts + 1) / (counts.sum() + vocab)
    return float(np.exp(-np.log(p[eval_ids]).mean()))


def transformers_perplexity(model_dir: str, eval_ids: np.ndarray, window: int, max_windows=None) -> float | None:
    """Held-out perplexity by transformers' LlamaForCausalLM on the same windows (None if absent)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    from powerinfer_jax.metrics import perplexity

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def logits(ids):
        with torch.no_grad():
            return model(torch.tensor(np.asarray(ids)[None])).logits[0].numpy()

    return perplexity(logits, eval_ids, window=window, bos=BOS_ID, max_windows=max_windows)["perplexity"]


def write_model_folder(out, params, cfg, tok, settings, history, summary, eval_ids, dtype, corpus_path):
    """Exports the model and writes tokenizer, generation config, stats, plot and model card."""
    import powerinfer_jax as pij
    from powerinfer_jax.metrics import perplexity

    save_hf_checkpoint(params, cfg, out, dtype=dtype)
    tok.save(os.path.join(out, "tokenizer.json"))
    _dump(os.path.join(out, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "model_max_length": cfg.max_position_embeddings,
    })
    _dump(os.path.join(out, "generation_config.json"), {
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": 0, "do_sample": False,
    })
    _dump(os.path.join(out, "training_log.json"), {
        "settings": dataclasses.asdict(settings), "history": history, "summary": summary,
    })

    # Evaluate the exported (storage-dtype) weights exactly as users will load them.
    engine = pij.load(out)
    ours = perplexity(engine, eval_ids, window=EVAL_WINDOW, bos=BOS_ID)
    sliced = perplexity(engine, eval_ids, window=EVAL_WINDOW, bos=BOS_ID, max_windows=SLICE_WINDOWS)
    theirs = transformers_perplexity(out, eval_ids, EVAL_WINDOW)
    with open(corpus_path, encoding="utf-8") as f:
        text = f.read()
    train_text = text[: int(len(text) * (1 - settings.holdout_fraction))]
    train_ids = np.array(tok.encode(train_text).ids, np.int64)
    unigram = unigram_perplexity(train_ids, eval_ids, cfg.vocab_size)
    stats = None  # SwiGLU: silu(gate x) is never zero; its sparsity is the prepared bundle's thresholds
    if not cfg.needs_act_threshold:
        counts, n_tok = activation_stats.firing_counts(engine.params, cfg, make_windows(eval_ids, EVAL_WINDOW, BOS_ID))
        stats = activation_stats.summarize(counts, n_tok)
        activation_stats.plot_frequency_curves(
            counts, n_tok, os.path.join(out, "activation_frequency.png"),
            title="Bundled model: FFN activation frequency on held-out text")
    evaluation = {
        "heldout_tokens": int(len(eval_ids)), "window": EVAL_WINDOW,
        "perplexity_ours": ours["perplexity"], "perplexity_transformers": theirs,
        "perplexity_unigram": unigram,
        "slice": {"windows": SLICE_WINDOWS, "perplexity": sliced["perplexity"], "tokens": sliced["tokens"]},
        "sparsity": stats,
    }
    _dump(os.path.join(out, "eval.json"), evaluation)
    (_write_card if stats is not None else _write_silu_card)(out, cfg, settings, summary, evaluation, dtype)


def _dump(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _write_card(out, cfg, s, summary, ev, dtype):
    n_params = sum(
        int(np.prod(v)) for v in _shapes(cfg)
    )
    sp = ev["sparsity"]
    rows = "\n".join(
        f"| {x['layer']} | {x['zero_frac']:.3f} | {x['hot10_share']:.3f} | {x['hot20_share']:.3f} | "
        f"{x['hot50_share']:.3f} | {x['dead_frac']:.3f} |" for x in sp["layers"])
    m = sp["mean"]
    theirs = ev["perplexity_transformers"]
    theirs_s = f"{theirs:.3f}" if theirs is not None else "n/a (transformers not installed)"
    card = f"""# shakespeare-relu-llama

A small LLaMA-architecture causal LM with a **ReGLU FFN** (`hidden_act: relu`, i.e.
`down(relu(gate x) * up x)`, as in ReluLLaMA / ProSparse), trained from scratch by
`bin/train_default_model` for PowerInfer-JAX. It exists so the engine has a real model with
*genuine* activation sparsity that ships in the repo. It writes Shakespeare-flavoured text;
it knows nothing else.

## Data and licence
Tiny Shakespeare (`data/tinyshakespeare.txt`, {ev['heldout_tokens']:,} held-out tokens): the works of
William Shakespeare, public domain. The first {100 * (1 - s.holdout_fraction):.0f}% of the text trains the model and
the tokenizer; the last {100 * s.holdout_fraction:.0f}% is held out for every number below. The weights are released
under Apache-2.0 like the rest of the repo.

{_model_table(cfg, 'ReGLU', n_params, dtype)}
## Training
{_optimizer(s)}. A ProSparse-style L1 penalty on `relu(gate x)`, whose per-layer weight a feedback controller sets
each step (start {s.l1_init}, gain {s.l1_gain}, cap {s.l1_max_weight}) so each layer's zero fraction on the
batch follows a target ramped from
{s.target_zero_start} to {s.target_zero} over the first {100 * s.l1_ramp_fraction:.0f}% of steps; the checkpoint kept is the one
with the best held-out loss after the ramp. Each neuron's share of the penalty is weighted by
`(mean firing rate / its firing rate) ** {s.skew_strength}` (clipped to [0.25, 4]; rates are running averages),
which presses rarely-firing neurons harder so the frequent ones form a hot set.
Took **{summary['train_minutes']:.1f} minutes** of training ({summary['total_minutes_with_tokenizer']:.1f} with the tokenizer) on
{platform.machine()} CPU, 2 cores, {summary['steps_run']} steps run.
Reproduce: `bin/train_default_model --seed {s.seed}` (all settings are flags; defaults are the ones above).

## Held-out quality
| metric | value |
|---|---|
| perplexity, PowerInfer-JAX engine | {ev['perplexity_ours']:.3f} |
| perplexity, transformers LlamaForCausalLM | {theirs_s} |
| perplexity, unigram baseline (add-one) | {ev['perplexity_unigram']:.1f} |
| perplexity on the first {ev['slice']['windows']} windows (checked by a test) | {ev['slice']['perplexity']:.4f} |

Windows of {ev['window']} tokens (BOS + {ev['window'] - 1}), each token scored once.

## Activation sparsity (held-out text, {sp['tokens']:,} tokens)
A neuron is active on a token when `relu(gate x) > 0`.

| layer | zero fraction | hottest 10% share | hottest 20% share | hottest 50% share | dead (never fire) |
|---|---|---|---|---|---|
{rows}
| **mean** | **{m['zero_frac']:.3f}** | {m['hot10_share']:.3f} | **{m['hot20_share']:.3f}** | {m['hot50_share']:.3f} | {m['dead_frac']:.3f} |

![activation frequency](activation_frequency.png)
"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(card)


def _write_silu_card(out, cfg, s, summary, ev, dtype):
    """The card of the SwiGLU model (no penalty, so no zeros to report: sparsity is calibrated later)."""
    theirs = ev["perplexity_transformers"]
    theirs_s = f"{theirs:.3f}" if theirs is not None else "n/a (transformers not installed)"
    n_params = sum(int(np.prod(v)) for v in _shapes(cfg))
    card = f"""# {os.path.basename(os.path.normpath(out))}

A small LLaMA-architecture causal LM with a **SwiGLU FFN** (`hidden_act: silu`, i.e.
`down(silu(gate x) * up x)`, as in LLaMA-2/3, Mistral, Qwen2), trained from scratch by
`bin/train_default_model --ffn_kind swiglu` with the recipe of the bundled ReGLU model minus its sparsity
penalty. Its activations are never exactly zero: it exists so PowerInfer-JAX's *threshold sparsity*
(per-layer magnitude thresholds on `silu(gate x)`, calibrated by `bin/prepare --target_sparsity`) is measured
on a real trained model, as users' LLaMA/Mistral/Qwen2 checkpoints would be. It writes Shakespeare-flavoured
text; it knows nothing else.

## Data and licence
Tiny Shakespeare (`data/tinyshakespeare.txt`, {ev['heldout_tokens']:,} held-out tokens), public domain; the first
{100 * (1 - s.holdout_fraction):.0f}% trains the model and the tokenizer, the last {100 * s.holdout_fraction:.0f}% is held out.
The weights are released under Apache-2.0 like the rest of the repo.

{_model_table(cfg, 'SwiGLU', n_params, dtype)}
## Training
{_optimizer(s)}, no sparsity penalty; the checkpoint kept is the one with the best held-out loss.
Took **{summary['train_minutes']:.1f} minutes** ({summary['total_minutes_with_tokenizer']:.1f} with the tokenizer) on
{platform.machine()} CPU, 2 cores, {summary['steps_run']} steps run.
Reproduce: `bin/train_default_model --ffn_kind swiglu --seed {s.seed}`.

## Held-out quality (dense)
| metric | value |
|---|---|
| perplexity, PowerInfer-JAX engine | {ev['perplexity_ours']:.3f} |
| perplexity, transformers LlamaForCausalLM | {theirs_s} |
| perplexity, unigram baseline (add-one) | {ev['perplexity_unigram']:.1f} |
| perplexity on the first {ev['slice']['windows']} windows (checked by a test) | {ev['slice']['perplexity']:.4f} |

Windows of {ev['window']} tokens (BOS + {ev['window'] - 1}), each token scored once. Perplexity at each
threshold sparsity, dense-thresholded, oracle and predicted, is in `BENCHMARKS.md` and the prepared bundle's
`eval/` results.
"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(card)


def _model_table(cfg, ffn: str, n_params: int, dtype: str) -> str:
    """The card's model section (both bundled models)."""
    return f"""## Model
| | |
|---|---|
| architecture | LlamaForCausalLM, {ffn} FFN |
| layers / hidden / FFN / heads | {cfg.num_layers} / {cfg.hidden_size} / {cfg.intermediate_size} / {cfg.num_heads} |
| vocabulary | {cfg.vocab_size} (byte-level BPE trained on the training split) |
| parameters | {n_params:,} |
| storage dtype | {dtype} |
"""


def _optimizer(s) -> str:
    """The card's optimizer sentence (both bundled models)."""
    return (f"AdamW (b1 0.9, b2 0.95, weight decay {s.weight_decay} on matrices), peak lr {s.learning_rate} with\n"
            f"{s.warmup_steps} warmup steps and cosine decay to {s.min_learning_rate}, {s.steps} steps of "
            f"{s.batch_size} x {s.seq_len}\ntokens, seed {s.seed}")


def _shapes(cfg):
    d, n, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    per_layer = [(d, d)] * 4 + [(n, d)] * 3 + [(d,), (d,)]
    return [(V, d), (d, V), (d,)] + per_layer * cfg.num_layers

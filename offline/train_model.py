"""Trains the bundled models: small LLaMAs on Tiny Shakespeare, with a ReGLU FFN (the default model)
or a SwiGLU FFN (`ffn_kind="swiglu"`: the same recipe without the sparsity penalty, the model that
threshold sparsity is measured on).

ReLU alone leaves ~70% of FFN activations at zero with no strong hot/cold structure; a
ProSparse-style L1 penalty on relu(gate x), ramped up over the first two thirds of
training, pushes sparsity past 85-90% without hurting perplexity. Rather than guess the
penalty's weight (its effect depends on model size and on Adam's normalisation), a
feedback controller adjusts it each step so the batch's zero fraction follows a target
that ramps from `target_zero_start` to `target_zero`. Too strong a penalty kills neurons
(they never fire again), so evaluations report the dead-neuron fraction as training goes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from offline.profiler import make_windows
from powerinfer_jax.config import ModelConfig
from powerinfer_jax.model import forward
from powerinfer_jax.params import ModelParams, init_params

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
BOS_ID, EOS_ID = 1, 2


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Every knob of a training run (recorded in the model card)."""

    ffn_kind: str = "reglu"  # "reglu" (sparsity penalty below) or "swiglu" (no penalty: silu is never zero)
    vocab_size: int = 2048
    hidden_size: int = 384
    intermediate_size: int = 1536
    num_layers: int = 6
    num_heads: int = 6
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 400
    learning_rate: float = 1e-3
    min_learning_rate: float = 1e-4
    warmup_steps: int = 40
    weight_decay: float = 0.1
    target_zero: float = 0.90  # zero fraction of relu(gate x) the penalty steers to
    target_zero_start: float = 0.55  # the target ramps up from here ...
    l1_ramp_fraction: float = 0.67  # ... over this share of steps
    l1_init: float = 1e-3  # initial weight of the mean relu(gate x) penalty
    l1_gain: float = 0.5  # controller gain: weight *= exp(gain * (target - zero_frac)) per step
    l1_max_weight: float = 3.0  # cap on each layer's penalty weight
    skew_strength: float = 1.0  # frequency-aware L1 (see skew_weights); 0 = plain L1
    eval_every: int = 50
    eval_tokens: int = 16384
    holdout_fraction: float = 0.1
    seed: int = 0
    max_minutes: float = 60.0


def split_corpus(text: str, holdout_fraction: float) -> tuple[str, str]:
    """The first (1 - f) of the text trains; the last f is held out."""
    cut = int(len(text) * (1 - holdout_fraction))
    return text[:cut], text[cut:]


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on `text`."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n"), trainer)
    return tok


def model_config(s: TrainSettings) -> ModelConfig:
    """The LLaMA config (ReGLU or SwiGLU FFN) the settings describe."""
    return ModelConfig(
        architecture="LlamaForCausalLM", family="llama", ffn_kind=s.ffn_kind, vocab_size=s.vocab_size,
        hidden_size=s.hidden_size, intermediate_size=s.intermediate_size, num_layers=s.num_layers,
        num_heads=s.num_heads, num_kv_heads=s.num_heads, head_dim=s.hidden_size // s.num_heads,
        max_position_embeddings=1024, norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=BOS_ID, eos_token_ids=(EOS_ID,), pad_token_id=0,
    )


def loss_fn(params: ModelParams, cfg: ModelConfig, batch: jax.Array, l1_weight: jax.Array,
            neuron_weight: jax.Array):
    """Next-token cross entropy + sum_l l1_weight[l] * mean(neuron_weight[l] * relu(gate x)) / L."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    logits, _, extras = forward(params, cfg, inputs, positions, collect=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    acts = extras["ffn_act"]
    l1_per_layer = jnp.stack([(a * w).mean() for a, w in zip(acts, neuron_weight)])
    zero_per_layer = jnp.stack([(a == 0).mean() for a in acts])
    fire_rate = jnp.stack([(a > 0).mean(axis=(0, 1)) for a in acts])  # [L, n_ff]
    penalty = jnp.sum(l1_weight * l1_per_layer) / len(acts)
    return ce + penalty, {"ce": ce, "l1": l1_per_layer.mean(), "zero_frac": zero_per_layer.mean(),
                          "zero_per_layer": zero_per_layer, "fire_rate": fire_rate}


def make_train_step(cfg: ModelConfig, optimizer):
    """A jitted AdamW step."""

    @jax.jit
    def step(params, opt_state, batch, l1_weight, neuron_weight):
        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, cfg, batch, l1_weight, neuron_weight)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, aux

    return step


def make_eval(cfg: ModelConfig):
    """Jitted held-out loss and per-neuron firing counts."""

    @jax.jit
    def evaluate(params, batch):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
        logits, _, extras = forward(params, cfg, inputs, positions, collect=True)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        fires = jnp.stack([(a > 0).sum(axis=(0, 1)) for a in extras["ffn_act"]])  # [L, n_ff]
        return ce, fires

    return evaluate


def zero_target(step: int, s: TrainSettings) -> float:
    """Target zero fraction: linear ramp from target_zero_start to target_zero."""
    ramp = max(1, int(s.steps * s.l1_ramp_fraction))
    return s.target_zero_start + (s.target_zero - s.target_zero_start) * min(1.0, step / ramp)


def skew_weights(rates: np.ndarray, strength: float) -> np.ndarray:
    """Per-neuron L1 weights that press rarely-firing neurons harder than frequent ones.

    w = (mean rate / rate) ** strength, clipped to [0.25, 4] and normalised to mean 1 per layer.
    Real ReLU LLMs learn a power law of firing frequencies over long training; this short run
    does not on its own (the hottest 20% carried ~47% of activations), and a frequency-aware
    penalty lets the frequent neurons specialise as the hot set while the rest grow sparser.
    """
    w = (rates.mean(axis=1, keepdims=True) / (rates + 1e-4)) ** strength
    w = np.clip(w, 0.25, 4.0)
    return (w / w.mean(axis=1, keepdims=True)).astype(np.float32)


def update_l1_weight(weight: np.ndarray, zero_frac: np.ndarray, target: float, s: TrainSettings) -> np.ndarray:
    """Per-layer multiplicative feedback: raise a layer's penalty while it is too dense, lower it
    while too sparse. Per layer, because one shared weight let the deep layers go very sparse while
    the first layers stayed dense and barely skewed."""
    return np.clip(weight * np.exp(s.l1_gain * (target - zero_frac)), 1e-6, s.l1_max_weight).astype(np.float32)


def without_penalty(s: TrainSettings) -> TrainSettings:
    """The settings with the sparsity penalty off (SwiGLU: an L1 on silu(gate x) would not make zeros)."""
    return dataclasses.replace(s, target_zero=0.0, target_zero_start=0.0, skew_strength=0.0, l1_init=0.0)


def train(s: TrainSettings, train_ids: np.ndarray, eval_ids: np.ndarray, progress=None, log=print):
    """Runs training; returns (best params by held-out loss, config, history, summary)."""
    if s.ffn_kind not in ("reglu", "swiglu"):
        raise ValueError(f"ffn_kind must be 'reglu' or 'swiglu', got {s.ffn_kind!r}")
    if s.ffn_kind == "swiglu":
        s = without_penalty(s)
    cfg = model_config(s)
    params = init_params(cfg, jax.random.PRNGKey(s.seed))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, s.learning_rate, s.warmup_steps, s.steps, end_value=s.min_learning_rate
    )
    # Norm scales are not decayed (standard practice); matrices are.
    decay_mask = jax.tree.map(lambda a: a.ndim >= 2, params)
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=s.weight_decay, mask=decay_mask),
    )
    opt_state = optimizer.init(params)
    step_fn = make_train_step(cfg, optimizer)
    eval_fn = make_eval(cfg)
    rng = np.random.default_rng(s.seed)
    eval_batch = make_windows(eval_ids, s.seq_len + 1, BOS_ID)[: max(1, s.eval_tokens // s.seq_len)]

    history, best, best_loss = [], params, float("inf")
    l1w = np.full(cfg.num_layers, s.l1_init if s.target_zero > 0 else 0.0, np.float32)
    neuron_w = np.ones((cfg.num_layers, cfg.intermediate_size), np.float32)
    rate_ema = np.full((cfg.num_layers, cfg.intermediate_size), 0.5, np.float32)
    ramp_steps = int(s.steps * s.l1_ramp_fraction) if s.target_zero > 0 else 0  # no penalty: any step may be best
    t0 = time.time()
    for step in range(1, s.steps + 1):
        starts = rng.integers(0, len(train_ids) - s.seq_len, s.batch_size)
        body = np.stack([train_ids[i : i + s.seq_len] for i in starts])
        batch = np.concatenate([np.full((s.batch_size, 1), BOS_ID, body.dtype), body], axis=1)
        params, opt_state, aux = step_fn(params, opt_state, jnp.asarray(batch), jnp.asarray(l1w),
                                         jnp.asarray(neuron_w))
        target = zero_target(step, s)
        if s.target_zero > 0:
            l1w = update_l1_weight(l1w, np.asarray(aux["zero_per_layer"]), target, s)
        if s.skew_strength > 0:
            rate_ema = 0.95 * rate_ema + 0.05 * np.asarray(aux["fire_rate"])
            neuron_w = skew_weights(rate_ema, s.skew_strength)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(ce=f"{float(aux['ce']):.3f}", zero=f"{float(aux['zero_frac']):.3f}")
        timed_out = (time.time() - t0) / 60 > s.max_minutes
        if step % s.eval_every == 0 or step == s.steps or timed_out:
            ce, fires = eval_fn(params, jnp.asarray(eval_batch))
            fires = np.asarray(fires)
            n_tok = eval_batch.shape[0] * s.seq_len
            rec = {
                "step": step, "minutes": (time.time() - t0) / 60, "train_ce": float(aux["ce"]),
                "eval_ce": float(ce), "eval_ppl": float(np.exp(ce)), "l1_weight": [round(float(w), 5) for w in l1w], "zero_target": target,
                "zero_frac": float(1 - fires.sum() / (n_tok * fires.size)),
                "dead_frac_max_layer": float((fires == 0).mean(axis=1).max()),
            }
            history.append(rec)
            log(json.dumps(rec))
            # Keep the best model once the penalty has reached full strength (earlier
            # checkpoints are denser, so "best" would just pick a non-sparse model).
            if step >= ramp_steps and float(ce) < best_loss:
                best, best_loss = params, float(ce)
        if timed_out:
            log(f"stopping at step {step}: max_minutes={s.max_minutes} reached")
            break
    if best_loss == float("inf"):
        best = params
    summary = {"train_minutes": (time.time() - t0) / 60, "steps_run": step, "best_eval_ce": best_loss}
    return best, cfg, history, summary

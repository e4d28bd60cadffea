"""A synthetic model with LLaMA-7B layer shapes whose FFN activity follows a power law.

For speed measurements only: its weights are random, so its text means nothing, but every
matrix has the real size and the set of neurons the hybrid engine computes per token has the
published statistics of ReLU-LLaMA (about 10% of neurons active per token; the hottest quarter
of neurons carrying about 80% of all activations, PowerInfer section 2).

How the activity is controlled without training: residual dimension 0 is a constant feature
(every embedding row has the value `BIAS_FEATURE` there and no attention or FFN output writes to
it), so each predictor gets an exact per-neuron bias through one hidden unit that reads only that
dimension. The bias of neuron i is set so that its logit (bias + a random-feature term that
varies per token) is >= 0 on a fraction p_i of tokens, p_i drawn from the power law. Which
neurons the engine computes is therefore decided per token by a real predictor of the real cost.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.special import ndtri

from powerinfer_jax.config import ModelConfig
from powerinfer_jax.params import AttentionParams, FFNParams, LayerParams, ModelParams, NormParams
from powerinfer_jax.sparse_ffn import PredictorParams

BIAS_FEATURE = 1.0  # value of residual dimension 0 on every token, in every layer


def synthetic_config(layers: int = 4, hidden: int = 4096, ffn: int = 11008, heads: int = 32, vocab: int = 4096,
                     max_positions: int = 2048, ffn_kind: str = "reglu", kv_heads: int | None = None) -> ModelConfig:
    """A LLaMA ReGLU (or `ffn_kind="swiglu"`) config (defaults: LLaMA-7B layer dimensions, 4 layers, small
    vocabulary; `kv_heads` below `heads`: grouped-query attention, as Llama-3's 8 kv heads for 32)."""
    return ModelConfig.from_hf_dict({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_act": {"reglu": "relu", "swiglu": "silu"}[ffn_kind],
        "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads or heads, "vocab_size": vocab,
        "max_position_embeddings": max_positions, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": False})


def power_law_rates(n: int, mean_active: float = 0.10, top_frac: float = 0.26, top_share: float = 0.80,
                    p_max: float = 0.95) -> np.ndarray:
    """Firing rates sorted hottest first: p_k = min(p_max, c (k+1)^-a), mean `mean_active`,
    the hottest `top_frac` of neurons carrying `top_share` of activations (c, a by bisection)."""
    k = np.arange(1, n + 1, dtype=np.float64)

    def rates(a: float) -> np.ndarray:
        lo, hi = 1e-12, 1e6  # scale c so that the mean is right (mean grows with c)
        for _ in range(200):
            c = np.sqrt(lo * hi)
            if np.minimum(p_max, c * k ** -a).mean() < mean_active:
                lo = c
            else:
                hi = c
        return np.minimum(p_max, np.sqrt(lo * hi) * k ** -a)

    top = int(round(top_frac * n))
    lo_a, hi_a = 0.0, 4.0  # the share of the top grows with the exponent
    for _ in range(60):
        a = (lo_a + hi_a) / 2
        r = rates(a)
        if r[:top].sum() / r.sum() < top_share:
            lo_a = a
        else:
            hi_a = a
    return rates((lo_a + hi_a) / 2)


@dataclasses.dataclass
class SyntheticModel:
    """Host (numpy) parameters, predictors with their thresholds, and the designed firing rates."""

    cfg: ModelConfig
    params: ModelParams
    predictors: list[PredictorParams]
    rates: np.ndarray  # [L, n_ff] designed firing rate of every neuron (in neuron-id order)
    predictor_rank: int

    @property
    def predictor_bytes(self) -> int:
        """Bytes of all predictors (float32)."""
        return int(sum(p.fc1.nbytes + p.fc2.nbytes for p in self.predictors))


def build_synthetic(cfg: ModelConfig, predictor_rank: int = 1024, seed: int = 0, **rate_kw) -> SyntheticModel:
    """Random float32 weights with the constant bias feature; predictor biases still zero
    (call `calibrate_predictors` with residual-stream samples to set them)."""
    rng = np.random.default_rng(seed)
    d, n, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    q_out = cfg.num_heads * cfg.head_dim
    kv_out = cfg.num_kv_heads * cfg.head_dim

    def normal(shape, std):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    def no_write_to_bias_feature(w: np.ndarray, rows: bool) -> np.ndarray:
        # Outputs never touch residual dim 0, so it stays exactly BIAS_FEATURE: row 0 of a row
        # matrix [d, in] (o_proj), column 0 of the transposed down matrix [n_ff, d].
        if rows:
            w[0] = 0.0
        else:
            w[..., 0] = 0.0
        return w

    layers, preds = [], []
    base = power_law_rates(n, **rate_kw)
    rates = np.stack([base[rng.permutation(n)] for _ in range(L)])  # hot neurons scattered over ids
    for _ in range(L):
        attn = AttentionParams(wq=normal((q_out, d), d ** -0.5), wk=normal((kv_out, d), d ** -0.5),
                               wv=normal((kv_out, d), d ** -0.5),
                               wo=no_write_to_bias_feature(normal((d, q_out), 0.5 * q_out ** -0.5), rows=True))
        ffn = FFNParams(w_up=normal((n, d), d ** -0.5), w_gate=normal((n, d), d ** -0.5),
                        w_down_t=no_write_to_bias_feature(normal((n, d), 0.5 * n ** -0.5), rows=False))
        ones = np.ones(d, np.float32)
        layers.append(LayerParams(NormParams(ones), attn, NormParams(ones.copy()), ffn))
        fc1 = normal((d, predictor_rank), d ** -0.5)
        fc1[:, 0] = 0.0
        fc1[0, 0] = 1.0 / BIAS_FEATURE  # hidden unit 0 == 1 on every token: the bias channel
        fc2 = normal((predictor_rank, n), predictor_rank ** -0.5)
        fc2[0] = 0.0
        preds.append(PredictorParams(fc1=fc1, fc2=fc2))
    embed = normal((cfg.vocab_size, d), 1.0)
    embed[:, 0] = BIAS_FEATURE
    params = ModelParams(embed=embed, layers=layers, final_norm=NormParams(np.ones(d, np.float32)),
                         lm_head=normal((cfg.vocab_size, d), d ** -0.5))
    return SyntheticModel(cfg, params, preds, rates, predictor_rank)


def calibrate_predictors(model: SyntheticModel, resid_samples: list[np.ndarray]) -> None:
    """Sets each predictor's bias row so neuron i fires on a fraction rates[l, i] of tokens.

    `resid_samples[l]` [N, d] are residual-stream inputs of layer l's FFN. The random-feature
    logit of a neuron is modelled as Gaussian over tokens (mean m, std s from the samples):
    bias = -(m + s * Phi^-1(1 - p)) gives P(logit >= 0) = p.
    """
    for p, x, r in zip(model.predictors, resid_samples, model.rates):
        h = np.maximum(x.astype(np.float32) @ p.fc1, 0.0)
        h[:, 0] = 0.0  # the bias channel itself is what we are setting
        z = h @ p.fc2
        m, s = z.mean(0), z.std(0) + 1e-6
        p.fc2[0] = -(m + s * ndtri(1.0 - np.clip(r, 1e-6, 1 - 1e-6))).astype(np.float32)


def predicted_rates(model: SyntheticModel, resid_samples: list[np.ndarray]) -> np.ndarray:
    """Measured firing rates [L, n_ff] of the (calibrated) predictors on residual samples."""
    out = []
    for p, x in zip(model.predictors, resid_samples):
        logits = np.maximum(x.astype(np.float32) @ p.fc1, 0.0) @ p.fc2
        out.append((logits >= 0).mean(0))
    return np.stack(out)

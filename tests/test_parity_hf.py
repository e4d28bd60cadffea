"""Our engine against HF transformers (torch, CPU) on tiny random checkpoints of every family.

Tolerance: float32 logits of a 64-token sequence, max|ours - theirs| / max|theirs| <= 1e-4;
greedy generation of 32 tokens must match `generate(do_sample=False)` token for token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import powerinfer_jax as pij
from hf_models import VOCAB, make_gemma, make_llama, make_opt, make_qwen2

SEQ = 64
CASES = {
    "llama_reglu": lambda p: make_llama(p, act="relu"),
    "llama_swiglu_gqa_llama3_rope_tied": lambda p: make_llama(
        p, act="silu", num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    ),
    "llama_drelu": lambda p: make_llama(p, act="relu", drelu=True),
    "qwen2_gqa_qkv_bias": lambda p: make_qwen2(p),
    "qwen2_tied_linear_rope_sliding_window": lambda p: make_qwen2(
        p, tie_word_embeddings=True, use_sliding_window=True, sliding_window=16, max_window_layers=0,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    "gemma_geglu_tied_head_dim_24_gqa": lambda p: make_gemma(p),
    "opt_pre_ln": lambda p: make_opt(p),
    "opt_post_ln_project_in_out": lambda p: make_opt(
        p, do_layer_norm_before=False, word_embed_proj_dim=32
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    hf = CASES[request.param](path)
    return request.param, hf, pij.load(path)


def _tokens(seed=0, n=SEQ):
    rng = np.random.default_rng(seed)
    return [1] + rng.integers(3, VOCAB, n - 1).tolist()


def test_logits_match_transformers(pair):
    name, hf, engine = pair
    ids = _tokens()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    ours = engine.logits(ids)
    assert ours.shape == theirs.shape == (SEQ, VOCAB)
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert rel <= 1e-4, f"{name}: relative error {rel:.2e}"


def test_greedy_generation_matches_transformers(pair):
    name, hf, engine = pair
    prompt = _tokens(seed=1, n=12)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                          min_new_tokens=32, pad_token_id=0)
    theirs = out[0, len(prompt):].tolist()
    ours = engine.generate(prompt, max_new_tokens=32, temperature=0.0, stop_at_eos=False).token_ids
    assert ours == theirs, name


def test_cached_decode_matches_full_forward(pair):
    """Prefill + step-by-step decode logits equal the full causal forward at every position."""
    _, _, engine = pair
    ids = _tokens(seed=2, n=40)
    full = engine.logits(ids)
    import jax.numpy as jnp
    from powerinfer_jax.model import forward, init_cache

    cfg = engine.cfg
    cache = init_cache(cfg, 1, 64)
    prefix = 8
    tok = jnp.asarray([ids[:prefix]])
    pos = jnp.arange(prefix)[None]
    logits, cache, _ = forward(engine.params, cfg, tok, pos, cache, attend_len=64)
    got = [np.asarray(logits[0])]
    for t in range(prefix, len(ids)):
        logits, cache, _ = forward(engine.params, cfg, jnp.asarray([[ids[t]]]), jnp.asarray([[t]]), cache,
                                   attend_len=64)
        got.append(np.asarray(logits[0]))
    got = np.concatenate(got)
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())

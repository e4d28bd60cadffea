"""Sampling rules and the generation loop: greedy, top-k, top-p, seeds, batches, streaming."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import powerinfer_jax as pij
from hf_models import make_llama
from powerinfer_jax.sampling import SamplingParams, cut_rows, cut_rows_ref, row_mode, sample, sample_rows


def _rows_sampler(logits, key, sp):
    """`sample_rows` (the engine's sampler) with every row on `sp`'s settings."""
    B = logits.shape[0]
    full = lambda v, dt: jnp.full(B, v, dt)  # noqa: E731
    mode = row_mode([sp.temperature], [sp.top_k], [sp.top_p])
    return sample_rows(logits, jax.random.split(key, B), full(sp.temperature, jnp.float32), full(sp.top_k, jnp.int32),
                       full(sp.top_p, jnp.float32), mode)


SAMPLERS = pytest.mark.parametrize("sampler", [sample, _rows_sampler], ids=["reference", "rows"])


def _draws(logits, sp, sampler, n=400):
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    return np.asarray(jax.vmap(lambda k: sampler(jnp.asarray(logits)[None], k, sp)[0])(keys))


@SAMPLERS
def test_greedy_is_argmax(sampler):
    logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32)
    got = sampler(jnp.asarray(logits), jax.random.PRNGKey(0), SamplingParams())
    np.testing.assert_array_equal(np.asarray(got), logits.argmax(-1))


@SAMPLERS
def test_top_k_keeps_only_k_tokens(sampler):
    logits = np.linspace(0, 1, 20).astype(np.float32)
    draws = _draws(logits, SamplingParams(temperature=5.0, top_k=3), sampler)
    assert set(draws.tolist()) <= {17, 18, 19}
    assert len(set(draws.tolist())) == 3


@SAMPLERS
def test_top_p_keeps_the_nucleus(sampler):
    probs = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
    draws = _draws(np.log(probs), SamplingParams(temperature=1.0, top_p=0.7), sampler)
    assert set(draws.tolist()) == {0, 1}  # 0.5 < 0.7 needs the second token, not the third


@SAMPLERS
def test_temperature_sampling_follows_the_distribution(sampler):
    probs = np.array([0.6, 0.3, 0.1], np.float32)
    draws = _draws(np.log(probs), SamplingParams(temperature=1.0), sampler, n=4000)
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, probs, atol=0.03)


@pytest.mark.parametrize("V", [7, 300, 4096])
def test_bisection_cut_equals_the_sorted_cut(V):
    """cut_rows (bisection over the logits' bits) keeps exactly the logits the sort-based reference keeps:
    random rows, ties, -inf entries, k past V, p = 1 and tiny p."""
    r = np.random.default_rng(V)
    z = r.standard_normal((48, V)).astype(np.float32) * r.uniform(0.1, 8.0, (48, 1)).astype(np.float32)
    z[0, : V // 2] = 0.5  # ties at the cut
    z[1, 1:] = -np.inf  # one finite logit
    z[2, ::2] = -np.inf
    top_k = r.integers(0, V + 5, 48).astype(np.int32)
    top_k[:6] = 0
    top_p = r.uniform(1e-4, 1.0, 48).astype(np.float32)
    top_p[6:12] = 1.0
    args = (jnp.asarray(z), jnp.asarray(top_k), jnp.asarray(top_p))
    got, want = np.asarray(jax.jit(cut_rows)(*args)), np.asarray(jax.jit(cut_rows_ref)(*args))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_array_equal(got[np.isfinite(got)], want[np.isfinite(want)])


def test_rows_keep_their_own_settings_and_never_draw_a_cut_token():
    """One batch, four settings: greedy, top-k 2, top-p, plain temperature; 300 draws each."""
    V = 64
    r = np.random.default_rng(1)
    logits = jnp.asarray(np.tile(r.standard_normal(V).astype(np.float32) * 2, (4, 1)))
    temps = jnp.asarray([0.0, 1.0, 1.0, 1.0], jnp.float32)
    top_k = jnp.asarray([0, 2, 0, 0], jnp.int32)
    top_p = jnp.asarray([1.0, 1.0, 0.5, 1.0], jnp.float32)
    draw = jax.jit(lambda keys: sample_rows(logits, keys, temps, top_k, top_p, "cut"))
    keys = jax.random.key_data(jax.random.split(jax.random.PRNGKey(0), 300 * 4)).reshape(300, 4, 2)
    out = np.stack([np.asarray(draw(k)) for k in keys])
    order = np.argsort(-np.asarray(logits[0]))
    assert set(out[:, 0]) == {order[0]}
    assert set(out[:, 1]) == set(order[:2].tolist())
    allowed = np.isfinite(np.asarray(cut_rows_ref(logits[2:3], top_k[2:3], top_p[2:3]))[0])
    assert allowed[out[:, 2]].all() and 1 < len(set(out[:, 2])) < allowed.sum() + 1
    assert len(set(out[:, 3])) > len(set(out[:, 2]))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    make_llama(path)
    return pij.load(path, max_seq_len=128)


def test_seeded_sampling_is_reproducible(engine):
    a = engine.generate([1, 5, 9], max_new_tokens=12, temperature=1.0, seed=3, stop_at_eos=False)
    b = engine.generate([1, 5, 9], max_new_tokens=12, temperature=1.0, seed=3, stop_at_eos=False)
    c = engine.generate([1, 5, 9], max_new_tokens=12, temperature=1.0, seed=4, stop_at_eos=False)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert len(a.token_ids) == 12
    assert a.stats["decode_steps"] == 11 and a.stats["decode_tokens_per_s"] > 0


def test_batch_of_different_lengths_matches_single_rows(engine):
    prompts = [[1, 5, 9, 11, 40], [1, 7], [1, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 90]]
    batch = engine.generate_batch(prompts, max_new_tokens=10, stop_at_eos=False)
    for p, res in zip(prompts, batch):
        assert res.token_ids == engine.generate(p, max_new_tokens=10, stop_at_eos=False).token_ids


def test_stops_at_eos_and_streams(engine):
    greedy = engine.generate([1, 5, 9], max_new_tokens=20, stop_at_eos=False).token_ids
    seen = []
    engine.tokenizer = None
    res = engine.generate([1, 5, 9], max_new_tokens=20, on_token=lambda t, _: seen.append(t))
    assert seen == res.token_ids + ([2] if len(res.token_ids) < 20 else [])
    if 2 in greedy:  # EOS id of the tiny model: generation must stop right there
        assert res.token_ids == greedy[: greedy.index(2)]
    else:
        assert res.token_ids == greedy


def test_a_row_that_stops_early_leaves_the_others_untouched(engine, monkeypatch):
    """generate_batch through the batcher's loop: a row that meets EOS retires (its cache row refilled by
    another) while the others run on; each row equals its single-prompt generation."""
    prompts = [[1, 5, 9], [1, 7, 7, 30], [1, 3]]
    free = [engine.generate(p, max_new_tokens=12, stop_at_eos=False).token_ids for p in prompts]
    stop = free[0][3]  # row 0 stops at its fourth token
    monkeypatch.setattr(engine, "_eos_ids", lambda: (stop,))
    alone = [engine.generate(p, max_new_tokens=12).token_ids for p in prompts]
    assert alone[0] == free[0][:free[0].index(stop)]
    batch = engine.generate_batch(prompts, max_new_tokens=12)
    assert [r.token_ids for r in batch] == alone
    # a row that kept n < 12 tokens sampled EOS at decode step n; a full row took 11 steps
    assert batch[0].stats["decode_steps"] == max(len(a) if len(a) < 12 else 11 for a in alone)
    # The row programs ran through their ahead-of-time executables (compiled before the first token), never
    # through a jit call compiling inside the loop.
    from powerinfer_jax.loop_programs import programs

    progs = programs(engine)
    names = {sig[0] for sig in progs.executables}
    assert {"insert", "move"} <= names
    assert progs.insert._cache_size() == 0 and progs.move._cache_size() == 0

"""Continuous batching (powerinfer_jax.batching): a sequence's tokens do not depend on its batch."""

import threading
import time

import numpy as np
import pytest

import powerinfer_jax as pij
from powerinfer_jax.batching import ContinuousBatcher, RequestParams
from powerinfer_jax.errors import ArgumentError

PROMPTS = ["ROMEO:", "JULIET: O Romeo, Romeo", "First Citizen:\nBefore we proceed any further, hear me speak.",
           "KING HENRY:", "MENENIUS:\nWhy, masters", "All:"]


@pytest.fixture(scope="module")
def engine():
    return pij.load(max_seq_len=256)


@pytest.fixture(scope="module")
def batcher(engine):
    with ContinuousBatcher(engine, max_batch=4, prefill_chunk=16, mixed_chunk=16) as b:
        yield b


def _together(batcher, ids, params):
    """Submits every prompt at once from threads; returns their done events in prompt order."""
    out = [None] * len(ids)

    def go(k):
        out[k] = batcher.generate(ids[k], params[k], timeout=120)

    threads = [threading.Thread(target=go, args=(k,)) for k in range(len(ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    return out


def test_batched_greedy_equals_alone_and_generate(engine, batcher):
    ids = [engine.encode(p) for p in PROMPTS]  # 6 requests > max_batch 4: some wait for a free row
    params = [RequestParams(max_tokens=10 + k) for k in range(len(ids))]  # they finish at different steps
    alone = [batcher.generate(i, p, timeout=120) for i, p in zip(ids, params)]
    together = _together(batcher, ids, params)
    for k, (a, t) in enumerate(zip(alone, together)):
        assert t.text == a.text, PROMPTS[k]
        assert t.completion_tokens == a.completion_tokens == params[k].max_tokens
        assert t.finish_reason == "length" and t.prompt_tokens == len(ids[k])
        assert a.text == engine.generate(ids[k], max_new_tokens=params[k].max_tokens).text
    stats = batcher.stats()
    assert stats["active"] == 0 and stats["waiting"] == 0
    assert stats["rows_computed"] < stats["steps"] * 4  # batches shrink as sequences finish
    assert stats["mixed_steps"] > 0  # prompts that arrived while others ran were prefilled inside decode steps
    assert stats["packed_pieces"] > stats["mixed_steps"]  # some steps carried pieces of several prompts


def test_prompts_carried_in_decode_steps_equal_separate_chunks(engine):
    """mixed_chunk=None (every prompt chunk its own program) gives the same greedy tokens as prompt chunks
    carried inside the decode steps, sampled requests included; only the mixed batcher runs mixed steps."""
    ids = [engine.encode(p) for p in PROMPTS]
    params = [RequestParams(max_tokens=9, temperature=0.8 if k % 2 else 0.0, top_p=0.9, seed=k)
              for k in range(len(ids))]
    texts, mixed = {}, {}
    for chunk in (None, 4):
        with ContinuousBatcher(engine, max_batch=4, prefill_chunk=16, mixed_chunk=chunk) as b:
            texts[chunk] = [ev.text for ev in _together(b, ids, params)]
            mixed[chunk] = b.stats().get("mixed_steps", 0)
    assert texts[None] == texts[4]
    assert mixed[None] == 0 and mixed[4] > 0


def test_bf16_prompt_activations_per_engine(monkeypatch):
    """pij.load(prompt_activations="bfloat16") (the bin/ programs' --prompt_activations; XLA's bf16 dot forced, as on
    a CPU with bf16 dot instructions): that engine's prompt logits stay within 5e-3 of the logits' scale of a default
    engine's in the same process, and differ from them (each engine's programs trace with its own setting); an
    explicit "float32" wins over POWERINFER_PROMPT_BF16_PARTS=1, the default follows it; the batcher's greedy texts,
    prompts carried in decode steps, equal each request alone and `generate`'s; a bad value is refused."""
    from powerinfer_jax.errors import ArgumentError

    monkeypatch.setenv("POWERINFER_BF16_DOT", "xla")
    monkeypatch.setenv("POWERINFER_PROMPT_BF16_PARTS", "")
    default, eng = pij.load(max_seq_len=128), pij.load(max_seq_len=128, prompt_activations="bfloat16")
    assert (default.prompt_activations, eng.prompt_activations) == (None, "bfloat16")
    ids = np.random.default_rng(3).integers(3, eng.cfg.vocab_size, 24).tolist()
    two, one = default.logits(ids), eng.logits(ids)
    err = np.abs(one - two).max() / np.abs(two).max()
    assert 1e-6 < err < 5e-3, err
    monkeypatch.setenv("POWERINFER_PROMPT_BF16_PARTS", "1")
    np.testing.assert_array_equal(pij.load(max_seq_len=128, prompt_activations="float32").logits(ids), two)
    np.testing.assert_array_equal(pij.load(max_seq_len=128).logits(ids), one)
    monkeypatch.setenv("POWERINFER_PROMPT_BF16_PARTS", "")
    with pytest.raises(ArgumentError, match="prompt_activations"):
        pij.load(max_seq_len=128, prompt_activations="bf16")
    prompts = [eng.encode(p) for p in PROMPTS[:4]]
    params = [RequestParams(max_tokens=8) for _ in prompts]
    with ContinuousBatcher(eng, max_batch=4, prefill_chunk=16, mixed_chunk=16) as b:
        alone = [b.generate(i, p, timeout=120).text for i, p in zip(prompts, params)]
        together = [ev.text for ev in _together(b, prompts, params)]
        assert b.stats()["mixed_steps"] > 0
    assert together == alone == [eng.generate(i, max_new_tokens=8).text for i in prompts]


@pytest.mark.parametrize("sparsity", [None, "oracle"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_groups_equals_forward_per_group(sparsity, dtype):
    """A decode batch and a prompt chunk through forward_groups (one pass, shared projections) give each
    group's logits and caches of its own forward (dense and hybrid oracle; 1e-5 of the logits' scale)."""
    import jax.numpy as jnp

    from powerinfer_jax.model import RowGroup, forward, forward_groups, init_cache

    eng = pij.load(max_seq_len=128, dtype=dtype, sparsity=sparsity)
    cfg, params, ffn = eng.cfg, eng.params, eng._ffn_fn
    rng = np.random.default_rng(0)
    cache = init_cache(cfg, 4, 128)
    prompt = jnp.asarray(rng.integers(3, cfg.vocab_size, (4, 10)), jnp.int32)
    _, cache, _ = forward(params, cfg, prompt, jnp.broadcast_to(jnp.arange(10), (4, 10)), cache, 128, ffn_fn=ffn)
    rows = jnp.asarray(rng.integers(3, cfg.vocab_size, (4, 1)), jnp.int32)
    rows_at = jnp.asarray([[10], [10], [10], [128]], jnp.int32)  # the last row is padding: writes nothing
    holds = rows_at[:, 0] < 128
    chunk = jnp.asarray(rng.integers(3, cfg.vocab_size, (1, 16)), jnp.int32)
    chunk_at = jnp.where(jnp.arange(16) < 12, jnp.arange(16), 128)[None]  # 12 tokens, 4 padding
    stage = init_cache(cfg, 1, 128)
    want_rows = forward(params, cfg, rows, rows_at, cache, 128, ffn_fn=ffn, rows=holds)
    want_chunk = forward(params, cfg, chunk, chunk_at, stage, 128, ffn_fn=ffn, logits_at=jnp.asarray([11]))
    got = forward_groups(params, cfg, [RowGroup(rows, rows_at, cache, rows=holds),
                                       RowGroup(chunk, chunk_at, stage, logits_at=jnp.asarray([11]))], 128, ffn)
    for (logits, new_cache, _), (want, want_cache, _) in zip(got, (want_rows, want_chunk)):
        scale = float(np.abs(np.asarray(want)).max())
        np.testing.assert_allclose(np.asarray(logits)[:3], np.asarray(want)[:3], rtol=0, atol=1e-5 * scale)
        for a, b in zip(new_cache.k + new_cache.v, want_cache.k + want_cache.v):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale)


def test_prompt_rows_start_after_the_decode_groups():
    """`layers.prompt_rows_from`: the first row of the trailing groups of several tokens a row (what
    `ops.linear` takes in fewer bf16 parts), None without prompt rows or when a decode group follows one."""
    from powerinfer_jax.layers import prompt_rows_from

    decode, chunk = np.zeros((16, 1, 4)), np.zeros((1, 32, 4))
    assert prompt_rows_from([decode, chunk]) == 16 and prompt_rows_from([chunk]) == 0
    assert prompt_rows_from([decode, decode, chunk, chunk]) == 32
    assert prompt_rows_from([decode]) is None and prompt_rows_from([chunk, decode]) is None


@pytest.mark.parametrize("host_attention", [True, False])
def test_decode_rows_and_packed_prompts_share_one_cache(host_attention, monkeypatch):
    """The batcher's carrying step: decode rows and a packed chunk whose prompts are prefilled straight into
    free rows of the same cache (`shares_cache`, `row_set`). Each decode row's logits and written slot equal
    its own step's, each prompt's last-token logits and row equal the prompt run alone (1e-5 of the logits'
    scale), the idle row stays untouched; with the chunk's attention in the host kernel and in XLA."""
    import jax
    import jax.numpy as jnp

    from ops import host_attention as HA
    from powerinfer_jax.model import RowGroup, forward, forward_groups, init_cache

    monkeypatch.setattr(HA, "USE_HOST_ATTENTION", host_attention)
    eng = pij.load(max_seq_len=128, kv_dtype="float32")
    cfg, params = eng.cfg, eng.params
    rng = np.random.default_rng(2)
    seqs, a, b = rng.integers(3, cfg.vocab_size, (2, 10)), rng.integers(3, cfg.vocab_size, 10), \
        rng.integers(3, cfg.vocab_size, 5)
    _, two, _ = forward(params, cfg, jnp.asarray(seqs), jnp.broadcast_to(jnp.arange(10), (2, 10)),
                        init_cache(cfg, 2, 128), 128)
    _, first_six, _ = forward(params, cfg, jnp.asarray(a[None, :6]), jnp.arange(6)[None], init_cache(cfg, 1, 128), 128)
    # rows 0 and 1 decode, row 2 is free, a's first 6 tokens sit in row 3, b goes into row 4
    cache = jax.tree.map(lambda c, t, f: c.at[:2].set(t).at[3].set(f[0]), init_cache(cfg, 5, 128), two, first_six)
    nxt = jnp.asarray(rng.integers(3, cfg.vocab_size, (3, 1)), jnp.int32)
    at = jnp.asarray([[10], [10], [128]], jnp.int32)  # row 2 idle: writes nothing
    tokens, positions, rows = np.zeros((1, 12), np.int32), np.full((1, 12), 128, np.int32), np.zeros((1, 12), np.int32)
    tokens[0, :4], positions[0, :4], rows[0, :4] = a[6:], np.arange(6, 10), 3
    tokens[0, 4:9], positions[0, 4:9], rows[0, 4:9] = b, np.arange(5), 4
    groups = [RowGroup(nxt, at, cache, rows=at[:, 0] < 128),
              RowGroup(jnp.asarray(tokens), jnp.asarray(positions), None, logits_at=jnp.asarray([3, 8, 0]),
                       cache_rows=jnp.asarray(rows), row_set=jnp.asarray([3, 4, 0], jnp.int32), shares_cache=True)]
    (row_logits, _, _), (chunk_logits, shared, _) = forward_groups(params, cfg, groups, 128)
    want_rows, want_cache, _ = forward(params, cfg, nxt[:2], at[:2], jax.tree.map(lambda c: c[:2], cache), 128)
    scale = float(np.abs(np.asarray(want_rows)).max())
    np.testing.assert_allclose(np.asarray(row_logits)[:2], np.asarray(want_rows), rtol=0, atol=1e-5 * scale)
    for got, ref in zip(shared.k + shared.v, want_cache.k + want_cache.v):
        np.testing.assert_allclose(np.asarray(got)[:2], np.asarray(ref), rtol=0, atol=1e-5 * scale)
    for slot, row, p in ((0, 3, a), (1, 4, b)):
        want, want_row, _ = forward(params, cfg, jnp.asarray(p[None]), jnp.arange(len(p))[None],
                                    init_cache(cfg, 1, 128), 128, logits_at=jnp.asarray([len(p) - 1]))
        scale = float(np.abs(np.asarray(want)).max())
        np.testing.assert_allclose(np.asarray(chunk_logits[slot]), np.asarray(want[0]), rtol=0, atol=1e-5 * scale)
        for got, ref in zip(shared.k + shared.v, want_row.k + want_row.v):
            np.testing.assert_allclose(np.asarray(got)[row, :, :len(p)], np.asarray(ref)[0, :, :len(p)], rtol=0,
                                       atol=1e-5 * scale)
    for got in shared.k + shared.v:
        assert not np.asarray(got)[2].any() and not np.asarray(got)[4, :, 5:].any()


@pytest.mark.parametrize("host_attention", [True, False])
@pytest.mark.parametrize("sparsity", [None, "oracle"])
def test_packed_chunk_equals_each_prompt_alone(sparsity, host_attention, monkeypatch):
    """A packed chunk (pieces of two prompts, each into its own staging row; one prompt half prefilled
    already) gives each prompt's last-token logits and staging row of the prompt run alone (1e-5 of the
    logits' scale), leaves the unused row untouched, and writes nothing at padding positions; with the
    chunk's attention in the host kernel (CPU) and in XLA (every other backend)."""
    import jax
    import jax.numpy as jnp

    from ops import host_attention as HA
    from powerinfer_jax.model import RowGroup, forward, forward_groups, init_cache

    monkeypatch.setattr(HA, "USE_HOST_ATTENTION", host_attention)

    eng = pij.load(max_seq_len=128, sparsity=sparsity)
    cfg, params, ffn = eng.cfg, eng.params, eng._ffn_fn
    rng = np.random.default_rng(1)
    a, b = rng.integers(3, cfg.vocab_size, 10), rng.integers(3, cfg.vocab_size, 5)
    alone = [forward(params, cfg, jnp.asarray(p[None]), jnp.arange(len(p))[None], init_cache(cfg, 1, 128), 128,
                     ffn_fn=ffn, logits_at=jnp.asarray([len(p) - 1])) for p in (a, b)]
    _, first_six, _ = forward(params, cfg, jnp.asarray(a[None, :6]), jnp.arange(6)[None], init_cache(cfg, 1, 128),
                              128, ffn_fn=ffn)
    stage = jax.tree.map(lambda s, part: s.at[2].set(part[0]), init_cache(cfg, 3, 128), first_six)  # a in row 2
    tokens, positions, rows = np.zeros((1, 12), np.int32), np.full((1, 12), 128, np.int32), np.zeros((1, 12), np.int32)
    tokens[0, :4], positions[0, :4], rows[0, :4] = a[6:], np.arange(6, 10), 2  # a's last 4 tokens
    tokens[0, 4:9], positions[0, 4:9], rows[0, 4:9] = b, np.arange(5), 0  # b whole, into row 0; 3 padding
    group = RowGroup(jnp.asarray(tokens), jnp.asarray(positions), stage, logits_at=jnp.asarray([8, 0, 3]),
                     cache_rows=jnp.asarray(rows))
    calls = []
    choose = HA._attention_kernel  # serial or parallel by size: record the queries of either
    monkeypatch.setattr(HA, "_attention_kernel", lambda *a: lambda *b: calls.append(b[1].shape) or choose(*a)(*b))
    (logits, packed, _), = forward_groups(params, cfg, [group], 128, ffn)
    assert bool(calls) == (host_attention and jax.default_backend() == "cpu")  # one call a layer, 12 queries
    assert all(shape[0] == 12 for shape in calls)
    for got_row, (want, want_cache, _), n in ((2, alone[0], 10), (0, alone[1], 5)):
        scale = float(np.abs(np.asarray(want)).max())
        np.testing.assert_allclose(np.asarray(logits[got_row]), np.asarray(want[0]), rtol=0, atol=1e-5 * scale)
        for got, ref in zip(packed.k + packed.v, want_cache.k + want_cache.v):
            np.testing.assert_allclose(np.asarray(got)[got_row, :, :n], np.asarray(ref)[0, :, :n], rtol=0,
                                       atol=1e-5 * scale)
    for got in packed.k + packed.v:
        assert not np.asarray(got)[1].any() and not np.asarray(got)[0, :, 5:].any()  # row 1, b's padding: unwritten


def test_packed_chunk_takes_the_oldest_prompts_pieces_into_free_batch_rows(engine):
    """_fill_packed gives waiting prompts free packing slots and free batch rows (neither decoding nor taken)
    while the batch has room; _packed_chunk fills the chunk oldest first, one piece a prompt, into its batch
    row, marks where each completed prompt's last token sits, and pads with positions past the cache (written
    nowhere); a joined prompt decodes in its row, and its slot is reused."""
    from powerinfer_jax.batching import Request

    loop = ContinuousBatcher(engine, max_batch=5, mixed_chunk=8, stage_rows=3)
    reqs = [Request(k, list(range(3, 3 + n)), RequestParams(), lambda ev: None) for k, n in enumerate((5, 6, 2, 4))]
    loop._rows = [reqs[3]]  # one running sequence: room for 4 more, but only 3 staging rows
    loop._waiting.extend(reqs[:3])
    loop._fill_packed()
    assert loop._packed == reqs[:3] and [r.stage_row for r in reqs[:3]] == [0, 1, 2]
    assert [r.cache_row for r in reqs[:3]] == [1, 2, 3]  # row 0 decodes request 3
    pieces, tokens, positions, rows, row_set, last = loop._packed_chunk()
    assert [(r.id, n) for r, n in pieces] == [(0, 5), (1, 3)]  # the oldest whole, the next's first 3 tokens
    np.testing.assert_array_equal(tokens[0], [3, 4, 5, 6, 7, 3, 4, 5])
    np.testing.assert_array_equal(positions[0], [0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(rows[0], [1, 1, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(row_set, [1, 2, 0])  # slot 2's prompt has no piece yet
    assert last[0] == 4  # request 0 completes at its 5th token; rows 1 and 2 complete nothing
    assert [loop._prefilled(req, n) for req, n in pieces] == [True, False]
    loop._packed.remove(reqs[0])  # request 0 joins the batch in its row (what _decode_step does); its slot is free
    loop._join(reqs[0], 5)
    assert loop._rows == [reqs[3], reqs[0]]
    loop._waiting.extend([Request(9, [7, 8], RequestParams(), lambda ev: None),
                          Request(10, [7], RequestParams(), lambda ev: None)])
    loop._fill_packed()  # 2 running + 2 packed: room for one more, in the free slot 0 and batch row 4
    assert [r.id for r in loop._packed] == [1, 2, 9] and loop._packed[-1].stage_row == 0
    assert loop._packed[-1].cache_row == 4
    assert [r.id for r in loop._waiting] == [10]
    pieces, tokens, positions, rows, row_set, last = loop._packed_chunk()
    assert [(r.id, n) for r, n in pieces] == [(1, 3), (2, 2), (9, 2)]  # 7 tokens, 1 padding
    np.testing.assert_array_equal(positions[0], [3, 4, 5, 0, 1, 0, 1, engine.max_seq_len])
    np.testing.assert_array_equal(rows[0, :7], [2, 2, 2, 3, 3, 4, 4])
    np.testing.assert_array_equal(row_set, [4, 2, 3])
    assert list(last) == [6, 2, 4]  # every staged prompt completes in this chunk


def test_a_finished_row_is_refilled_in_place_and_rows_move_only_to_shrink_the_batch(engine, batcher):
    """A finished request frees its row without moving another row into it; the next request joins in that
    row; rows move only when the rows in use fit a smaller batch size. Every request's greedy tokens equal
    its run alone."""
    from powerinfer_jax.batching import Request

    loop = ContinuousBatcher(engine, max_batch=4, mixed_chunk=16)  # sizes 1 and 4; driven in this thread
    moves = []
    call = loop._call
    loop._call = lambda name, *a, **kw: (moves.append(name) if name == "move" else None) or call(name, *a, **kw)
    lengths = {"ROMEO:": 6, "JULIET: O Romeo, Romeo": 14, "KING HENRY:": 14, "All:": 14, "MENENIUS:\nWhy, masters": 4}
    got = {}

    def submit(text):
        got[text] = []
        on_event = lambda ev: got[text].append(ev.token_id) if ev.kind == "token" else None  # noqa: E731
        req = Request(len(got), engine.encode(text), RequestParams(max_tokens=lengths[text], stop_at_eos=False), on_event)
        loop._waiting.append(req)  # what submit() does, for a loop that runs in this thread
        return req

    first = [submit(text) for text in list(lengths)[:4]]
    for _ in range(200):  # until the short request is done and its row is free
        loop._step_once()
        if len(got["ROMEO:"]) == 6 and first[0] not in loop._rows:
            break
    free = loop._rows.index(None)
    assert len(loop._running()) == 3 and moves == []
    late = submit("MENENIUS:\nWhy, masters")
    for _ in range(200):
        loop._step_once()
        if late in loop._rows:
            break
    assert loop._rows.index(late) == free and moves == []
    while loop._rows or loop._waiting or loop._prefilling():
        loop._step_once()
        running = loop._running()
        assert len(loop._rows) <= loop._size(len(running))  # a smaller size is used as soon as the rows fit it
    alone = {text: batcher.generate(engine.encode(text), RequestParams(max_tokens=n, stop_at_eos=False),
                                    timeout=60).token_ids for text, n in lengths.items()}
    assert got == alone


@pytest.mark.parametrize("x64", [False, True])
def test_request_keys_equal_jax_prngkey(x64):
    """A request's key, made in numpy, is jax.random.PRNGKey(seed)'s key data for any seed the server takes."""
    import jax

    from powerinfer_jax.batching import seed_key

    seeds = [0, 1, -1, 7, 2**31 - 1, -2**31, 2**31, 2**32, 2**32 + 5, 2**63 - 1, -2**63, -12345678901]
    seeds += [int(v) for v in np.random.default_rng(3).integers(-2**63, 2**63 - 1, 50)]
    with jax.enable_x64(x64):
        for seed in seeds:
            want = np.asarray(jax.random.key_data(jax.random.PRNGKey(seed)), np.uint32)
            np.testing.assert_array_equal(seed_key(seed), want, err_msg=str(seed))


def test_sampled_tokens_do_not_depend_on_the_batch(engine, batcher):
    ids = [engine.encode(p) for p in PROMPTS[:4]]
    params = [RequestParams(max_tokens=8, temperature=0.9, top_p=0.9, top_k=k * 10, seed=k) for k in range(4)]
    alone = [batcher.generate(i, p, timeout=120).text for i, p in zip(ids, params)]
    together = [e.text for e in _together(batcher, ids, params)]
    assert together == alone
    others = {batcher.generate(ids[0], RequestParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=s),
                               timeout=120).text for s in (11, 12, 13)}
    assert others != {alone[0]}  # the seed matters: other seeds draw other texts
    # Engine.generate runs the same loop: the same seed draws the same text; generate_batch row b uses seed + b.
    sampled = dict(max_new_tokens=8, temperature=0.9, top_p=0.9, top_k=0)
    assert engine.generate(ids[0], seed=0, **sampled).text == alone[0]
    pair = engine.generate_batch([ids[0], ids[0]], seed=12, **sampled)
    assert [r.text for r in pair] == [engine.generate(ids[0], seed=s, **sampled).text for s in (12, 13)]


def test_streamed_pieces_join_to_the_text(engine, batcher):
    pieces, done = [], threading.Event()
    result = []

    def on_event(ev):
        if ev.kind == "token":
            pieces.append(ev.text)
        else:
            result.append(ev)
            done.set()

    batcher.submit(engine.encode("ROMEO:"), RequestParams(max_tokens=12), on_event)
    assert done.wait(120)
    assert result[0].kind == "done" and "".join(pieces) == result[0].text and len(pieces) == 12


def test_cancel_frees_the_row(engine, batcher):
    events, first = [], threading.Event()

    def on_event(ev):
        events.append(ev)
        first.set()

    req = batcher.submit(engine.encode("ROMEO:"), RequestParams(max_tokens=200, stop_at_eos=False), on_event)
    assert first.wait(120)
    req.cancel()
    deadline = time.monotonic() + 60
    while not (events and events[-1].kind == "done") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert events[-1].finish_reason == "cancelled" and events[-1].completion_tokens < 200
    assert batcher.stats()["active"] == 0
    assert batcher.generate(engine.encode("ROMEO:"), RequestParams(max_tokens=3), timeout=60).completion_tokens == 3


def test_cancelling_a_prompt_mid_prefill_frees_its_staging_row(engine, batcher):
    """A request cancelled while its long prompt is being packed into decode steps ends "cancelled" with no
    tokens; the next request is admitted and gives the tokens it gives alone."""
    started, running_done = threading.Event(), threading.Event()

    def on_running(ev):
        started.set()
        if ev.kind != "token":
            running_done.set()

    running = batcher.submit(engine.encode("ROMEO:"), RequestParams(max_tokens=200, stop_at_eos=False), on_running)
    assert started.wait(60)
    long_ids = (engine.encode(" ".join(PROMPTS * 6)) * 3)[:200]
    got, done = [], threading.Event()

    def on_long(ev):
        got.append(ev)
        if ev.kind != "token":
            done.set()

    req = batcher.submit(long_ids, RequestParams(max_tokens=2), on_long)
    deadline = time.monotonic() + 60
    while req.prefilled == 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    req.cancel()
    assert done.wait(60)
    assert got[-1].finish_reason == "cancelled" and got[-1].completion_tokens == 0 and 0 < req.prefilled < 200
    ids = engine.encode(PROMPTS[1])
    batched = batcher.generate(ids, RequestParams(max_tokens=5), timeout=60).text
    assert not running_done.is_set()  # the new request was packed into the running batch's steps
    running.cancel()
    assert running_done.wait(60)
    assert batched == engine.generate(ids, max_new_tokens=5).text


def test_a_long_prompt_is_prefilled_between_decode_steps(engine, batcher):
    """While a 200-token prompt is prefilled in 16-token chunks, a running sequence keeps decoding."""
    order, lock = [], threading.Lock()
    done = threading.Event()

    def log(name):
        def on_event(ev):
            with lock:
                order.append((name, ev.kind))
            if name == "long" and ev.kind == "done":
                done.set()
        return on_event

    batcher.submit(engine.encode("ROMEO:"), RequestParams(max_tokens=40, stop_at_eos=False), log("running"))
    deadline = time.monotonic() + 60
    while not order and time.monotonic() < deadline:
        time.sleep(0.005)
    long_ids = (engine.encode(" ".join(PROMPTS * 6)) * 3)[:200]
    batcher.submit(long_ids, RequestParams(max_tokens=2), log("long"))
    assert done.wait(120)
    first_long = order.index(("long", "token"))
    running_before = sum(1 for name, kind in order[:first_long] if name == "running" and kind == "token")
    assert running_before >= 10  # 13 chunks: the running sequence decoded between them


def test_bad_requests_are_refused_up_front(engine, batcher):
    with pytest.raises(ArgumentError, match="exceeds the context"):
        batcher.submit([1] * 250, RequestParams(max_tokens=10), lambda ev: None)
    with pytest.raises(ArgumentError):
        batcher.submit([], RequestParams(), lambda ev: None)
    with pytest.raises(ArgumentError):
        batcher.submit([1, engine.cfg.vocab_size], RequestParams(), lambda ev: None)
    with pytest.raises(ArgumentError):
        batcher.submit([1, 2], RequestParams(temperature=-1.0), lambda ev: None)
    assert batcher.generate([1, 2], RequestParams(max_tokens=2), timeout=60).completion_tokens == 2


def test_oracle_sparsity_batched_equals_dense(engine):
    """Sparse at batch > 1: the oracle mask (the union over the batch's rows per layer) gives the
    dense tokens, and counts what it computed; also with prompt chunks carried in its decode steps."""
    oracle = pij.load(max_seq_len=256, sparsity="oracle")
    ids = [engine.encode(p) for p in PROMPTS[:4]]
    params = [RequestParams(max_tokens=8)] * 4
    with ContinuousBatcher(engine, max_batch=4) as dense_b, \
            ContinuousBatcher(oracle, max_batch=4, mixed_chunk=4) as sparse_b:
        dense = [e.text for e in _together(dense_b, ids, params)]
        sparse = [e.text for e in _together(sparse_b, ids, params)]
        stats = sparse_b.stats()
    assert sparse == dense
    assert stats["mixed_steps"] > 0
    assert 0 < stats["ffn_computed"] < stats["ffn_total"]
    assert np.isfinite(stats["ffn_computed"] / stats["ffn_total"])


def test_padding_rows_choose_no_neurons():
    """A step padded to a static batch size: the padding rows' predicted neurons stay out of the union,
    so a real row computes exactly what it computes alone."""
    import jax
    import jax.numpy as jnp

    engine = pij.load("models/shakespeare-relu-llama-prepared", sparsity="predicted", max_seq_len=64)
    layer = engine.params.layers[0].ffn
    d = engine.cfg.hidden_size
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 1, d)).astype(np.float32))
    resid = jnp.asarray(rng.normal(size=(4, 1, d)).astype(np.float32))
    fn = jax.jit(engine._ffn_fn, static_argnums=0)
    alone, aux_alone = fn(0, layer, x[:1], resid[:1])
    rows = jnp.asarray([True, False, False, False])
    padded, aux_padded = fn(0, layer, x, resid, rows=rows)
    _, aux_all = fn(0, layer, x, resid)
    assert int(aux_padded["ffn_computed"]) == int(aux_alone["ffn_computed"]) < int(aux_all["ffn_computed"])
    np.testing.assert_allclose(np.asarray(padded[0]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bf16_dot", [True, False])
def test_a_wide_bf16_step_computes_the_whole_ffn_where_the_dot_is_native(bf16_dot, monkeypatch):
    """Predicted mode, bf16 matrices, 16 rows: where XLA's bf16 dot runs the FFN (sparse_ffn.DENSE_FFN_MIN_ROWS)
    every neuron is computed (the dense FFN's output, all neurons counted); elsewhere the union's rows."""
    import jax
    import jax.numpy as jnp

    from ops import linear
    from powerinfer_jax import sparse_ffn
    from powerinfer_jax.ffn import dense_ffn

    monkeypatch.setattr(linear, "cpu_has_bf16_dot", lambda: bf16_dot)
    engine = pij.load("models/shakespeare-relu-llama-prepared", sparsity="predicted", max_seq_len=64)
    layer = engine.params.layers[0].ffn
    assert layer.shared is not None and layer.shared.w_up.fmt == "bfloat16"
    rows, d = sparse_ffn.DENSE_FFN_MIN_ROWS, engine.cfg.hidden_size
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(rows, 1, d)).astype(np.float32))
    resid = jnp.asarray(rng.normal(size=(rows, 1, d)).astype(np.float32))
    held = jnp.arange(rows) < 2  # two rows hold sequences: random inputs in all 16 would fire every neuron
    y, aux = jax.jit(lambda p, a, b, r: engine._ffn_fn(0, p, a, b, rows=r))(layer, x, resid, held)  # traced anew
    if bf16_dot:
        assert int(aux["ffn_computed"]) == int(aux["ffn_total"])
        want = jax.jit(lambda p, a: dense_ffn(p, engine.cfg.ffn_kind, a))(layer.shared, x[:, 0])
        np.testing.assert_allclose(np.asarray(y[:, 0]), np.asarray(want), rtol=1e-5, atol=1e-5)
    else:
        assert 0 < int(aux["ffn_computed"]) < int(aux["ffn_total"])


@pytest.mark.parametrize("bf16_dot", [True, False])
def test_groups_that_all_compute_every_neuron_share_one_ffn(bf16_dot, monkeypatch):
    """A 16-row decode group and a carried prompt chunk (model.forward_groups) on the bf16 hybrid: where both
    compute every neuron (XLA's bf16 dot at 16 rows) one dense FFN runs over all their rows; elsewhere each
    group runs its own hook. Either way each group's output and counters equal its hook's alone (1e-5)."""
    import jax
    import jax.numpy as jnp

    from ops import linear

    monkeypatch.setattr(linear, "cpu_has_bf16_dot", lambda: bf16_dot)
    engine = pij.load("models/shakespeare-relu-llama-prepared", sparsity="predicted", max_seq_len=64)
    runtime, layer, d = engine._ffn_fn.__self__, engine.params.layers[0].ffn, engine.cfg.hidden_size
    rng = np.random.default_rng(1)
    xs = [jnp.asarray(rng.normal(size=shape + (d,)).astype(np.float32)) for shape in ((16, 1), (1, 8))]
    resid = [jnp.asarray(rng.normal(size=x.shape).astype(np.float32)) for x in xs]
    held = [jnp.arange(16) < 2, None]
    ys, auxes = jax.jit(lambda p, a, b: runtime.ffn_groups(0, p, a, b, held))(layer, xs, resid)
    hlo = jax.jit(lambda p, a, b: runtime.ffn_groups(0, p, a, b, held)).lower(layer, xs, resid).as_text()
    merged = f"tensor<{2 * (16 + 8)}x{d}xbf16>"  # the two groups' 24 rows, split in two bf16 parts, in one dot
    assert (merged in hlo) == bf16_dot
    for x, r, g, y, aux in zip(xs, resid, held, ys, auxes):
        want, want_aux = jax.jit(lambda p, a, b: engine._ffn_fn(0, p, a, b, rows=g))(layer, x, r)
        np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5 * np.abs(want).max())
        assert {k: int(v) for k, v in aux.items()} == {k: int(v) for k, v in want_aux.items()}


def test_warmup_leaves_nothing_to_compile_and_a_stopped_batcher_refuses(engine):
    b = ContinuousBatcher(engine, max_batch=4, prefill_chunk=16)
    b.warmup()
    compiled = len(b._executables)
    ids = [engine.encode(p) for p in PROMPTS[:4]]  # prompts of 2-12 tokens, together: sizes 1 and 4
    with b:
        _together(b, ids, [RequestParams(max_tokens=6)] * 4)
        b.generate(ids[2], RequestParams(max_tokens=3), timeout=60)
    assert len(b._executables) == compiled
    with pytest.raises(ArgumentError, match="not running"):
        b.submit(ids[0], RequestParams(), lambda ev: None)


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_the_batched_decode_step_and_prompt_chunk_lower_for_cuda(engine, monkeypatch, kv_dtype):
    """What a GPU runs: the batcher's three programs (decode step, prompt chunk, both in one) export for CUDA
    (XLA path for every weight), over an f32 cache and over a bf16 one (stored as its bits)."""
    import functools

    import jax
    import jax.numpy as jnp

    from ops import linear
    from powerinfer_jax import loop_programs
    from powerinfer_jax.model import init_cache

    monkeypatch.setattr(linear, "USE_HOST_KERNELS", False)
    sds = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
    params = jax.tree.map(sds, engine.params)
    cfg, rows = engine.cfg, 4
    cache = jax.tree.map(sds, init_cache(cfg, 16, engine.max_seq_len, kv_dtype))
    settings = [sds(a) for a in loop_programs.row_settings([], rows)[1:]]
    programs = loop_programs
    step = jax.jit(functools.partial(programs._decode_rows, cfg=cfg, ffn_fn=None, attend_len=128, mode="cut"))
    i32 = jax.ShapeDtypeStruct((rows,), jnp.int32)
    exp = jax.export.export(step, platforms=["cuda"])(params, i32, i32, cache, *settings)
    assert "stablehlo.dot_general" in exp.mlir_module()
    chunk = jax.jit(functools.partial(programs._prefill_chunk, cfg=cfg, ffn_fn=None, attend_len=128, mode="greedy"))
    tok = jax.ShapeDtypeStruct((1, 32), jnp.int32)
    one = [sds(a) for a in loop_programs.row_settings([], 1)[1:]]
    one_row = jax.tree.map(sds, init_cache(cfg, 1, 256, kv_dtype))
    exp = jax.export.export(chunk, platforms=["cuda"])(params, tok, tok, one_row,
                                                       jax.ShapeDtypeStruct((1,), jnp.int32), *one)
    assert "stablehlo.dot_general" in exp.mlir_module()
    mixed = jax.jit(functools.partial(programs._decode_and_pack, cfg=cfg, ffn_fn=None, attend_len=128, mode="greedy"))
    carried = [sds(a) for a in loop_programs.row_settings([], rows + 4)[1:]]
    slots = jax.ShapeDtypeStruct((4,), jnp.int32)
    exp = jax.export.export(mixed, platforms=["cuda"])(params, i32, i32, cache, tok, tok, tok, slots, slots,
                                                       *carried)
    assert "stablehlo.dot_general" in exp.mlir_module()
    assert "callback" not in exp.mlir_module()  # the packed chunk's attention too stays in XLA off the CPU


def test_bench_serve_header_names_the_bf16_path():
    """bench_serve's markdown header names the split-dot setting only where XLA's bf16 dot runs; on a CPU without
    bf16 dot instructions it says the host kernels take every bf16 product."""
    from benchmarks import bench_serve
    res = {"machine": "m", "jax": "j", "date": "d", "command": "c", "models": [], "bf16_split_parts": 2}
    assert "split dot in 2 parts" in bench_serve.to_markdown(dict(res, bf16_dot="xla"))
    host = bench_serve.to_markdown(dict(res, bf16_dot="host"))
    assert "host kernels" in host and "split dot" not in host


def test_bench_serve_round_counts_every_token(engine, batcher):
    """benchmarks/bench_serve.py's measuring round: every token of every client is timed once."""
    from benchmarks import bench_serve

    prompts = [engine.encode(p) for p in PROMPTS[:3]]
    r = bench_serve.run_round(batcher, prompts, clients=3, per_client=2, max_tokens=4)
    assert r["tokens"] == 3 * 2 * 4 and r["tok_s"] > 0 and r["itl_p50_ms"] > 0
    assert len(r["texts"]) == 6 and all(len(ids) == 4 for ids in r["texts"].values())
    rows = [{"engine": "dense", "clients": c, "tok_s": t, "itl_p50_ms": 5.0, "itl_p99_ms": 9.0, "ttft_p50_ms": 1.0,
             "mean_batch": float(c)} for c, t in ((1, 100.0), (16, 400.0))]
    assert bench_serve._goals(rows)["dense_throughput_x16_over_x1"] == 4.0
    bf16 = [dict(r, engine="dense_bfloat16") for r in rows] + [dict(r, engine="hybrid", tok_s=2 * r["tok_s"])
                                                               for r in rows]
    goals = bench_serve._goals(bf16)  # hybrid against the dense engine that ran: here the bf16 one
    assert goals["hybrid_over_dense_bfloat16_throughput_x16"] == goals["hybrid_over_dense_bfloat16_throughput_x1"] == 2


def test_bench_serve_carry_settings_name_each_batcher():
    """benchmarks/bench_serve.py --carry: one batcher per mixed_chunk x stage_rows, named by it; a bad item fails."""
    from benchmarks import bench_serve

    assert bench_serve.carry_settings([], 32, 4) == [("", (32, 4))]
    assert bench_serve.carry_settings(["32x1", "24X4"], 32, 4) == [("@32x1", (32, 1)), ("@24x4", (24, 4))]
    with pytest.raises(ArgumentError, match="24-4"):
        bench_serve.carry_settings(["24-4"], 32, 4)


def test_fast_call_dispatches_in_cpp_and_gives_the_same_result(monkeypatch):
    """An AOT program holding a host callback runs through JAX's C++ dispatch (no Python-side
    ExecuteReplicated call once warm) and returns what the plain compiled call returns."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax._src.interpreters import pxla

    from ops import linear
    from ops.quant import to_weight
    from powerinfer_jax.loop_programs import fast_call

    w = to_weight(np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32), "bfloat16")
    assert linear.uses_host_kernel(w)
    x = jnp.ones((1, 32), jnp.float32)
    compiled = jax.jit(lambda x, w: linear.linear(x, w) * 2.0).lower(x, w).compile()
    want = np.asarray(compiled(x, w))
    fast = fast_call(compiled)
    np.testing.assert_array_equal(np.asarray(fast(x, w)), want)  # the first call fills the C++ cache
    if fast is compiled:  # only after a jax upgrade: fast_call fell back (and logged why)
        pytest.skip(f"jax {jax.__version__} changed the internals fast_call uses: the plain (slower) call is in use")
    calls = []
    original = pxla.ExecuteReplicated.__call__
    monkeypatch.setattr(pxla.ExecuteReplicated, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(fast(x, w)), want)
    assert not calls
    compiled(x, w)
    assert calls  # the plain call of a program with host callbacks goes through Python


def test_staging_rows_are_full_length_for_the_server_and_prompt_sized_for_generate(engine, batcher):
    """The server prefills a prompt on its own (nothing running) into one max_seq_len row (the warmed chunk
    programs fit every prompt), packed ones straight into their batch rows; generate's loop into a row of the
    prompt's span, so a 1-row generate holds no second full-length row."""
    ids = engine.encode("ROMEO:")
    batcher.generate(ids, RequestParams(max_tokens=2), timeout=60)
    assert set(batcher._stage_caches) == {(1, engine.max_seq_len)} == {(1, 256)}
    loop = ContinuousBatcher(engine, max_batch=1)
    loop._admit_all = True  # what batching.generate_rows sets
    assert loop._stage_key(len(ids)) == (1, 128) and loop._stage_key(200) == (1, 256)


def test_row_programs_copy_only_the_span():
    """Joining and refilling rows copy a row's first `span` slots (what its sequence wrote; the later ones
    are masked until overwritten), not the whole max_seq_len row, and leave every other row as it was."""
    import jax.numpy as jnp

    from powerinfer_jax.loop_programs import _insert_row, _move_row
    from powerinfer_jax.model import KVCache

    rng = np.random.default_rng(0)
    shape = (3, 2, 8, 4)
    cache = KVCache(k=[jnp.asarray(rng.standard_normal(shape), jnp.float32)],
                    v=[jnp.asarray(rng.standard_normal(shape), jnp.float32)])
    stage = KVCache(k=[jnp.asarray(rng.standard_normal((2,) + shape[1:]), jnp.float32)],
                    v=[jnp.asarray(rng.standard_normal((2,) + shape[1:]), jnp.float32)])
    before = np.asarray(cache.k[0]), np.asarray(cache.v[0])
    got = _insert_row(cache, stage, jnp.int32(1), jnp.int32(1), span=5)  # staging row 1 -> batch row 1
    for a, old, s in zip((got.k[0], got.v[0]), before, (stage.k[0], stage.v[0])):
        want = old.copy()
        want[1, :, :5] = np.asarray(s)[1, :, :5]
        np.testing.assert_array_equal(np.asarray(a), want)
    moved = _move_row(got, jnp.int32(2), jnp.int32(0), span=3)
    for a, old in zip((moved.k[0], moved.v[0]), (np.asarray(got.k[0]), np.asarray(got.v[0]))):
        want = old.copy()
        want[0, :, :3] = old[2, :, :3]
        np.testing.assert_array_equal(np.asarray(a), want)


def test_kv_cache_bytes_match_the_allocated_cache(engine):
    from powerinfer_jax import memory
    from powerinfer_jax.model import init_cache

    for kv in ("float32", "bfloat16"):
        cache = init_cache(engine.cfg, 3, 40, kv)
        assert memory.kv_cache_bytes(engine.cfg, 3, 40, kv) == sum(a.nbytes for a in cache.k + cache.v)
    free = memory.host_memory_free()
    assert free is None or free > 0  # Linux: MemAvailable less this process's mapped pages


def test_a_kv_cache_that_cannot_fit_in_host_memory_is_refused_with_the_numbers(engine, monkeypatch):
    from powerinfer_jax import memory

    row = memory.kv_cache_bytes(engine.cfg, 1, engine.max_seq_len, engine.kv_dtype)
    roomy = memory.HOST_RESERVE_BYTES + 10 * row
    assert memory.check_host_kv_cache(engine.cfg, 9, engine.max_seq_len, engine.kv_dtype, free=roomy) == 9 * row
    with pytest.raises(ArgumentError, match=r"11 rows x .* lower max_batch \(10 rows of"):
        memory.check_host_kv_cache(engine.cfg, 11, engine.max_seq_len, engine.kv_dtype, free=roomy)
    with pytest.raises(ArgumentError, match=r"10 rows \(and 1 staging\) x .* lower max_batch \(9 rows of"):
        memory.check_host_kv_cache(engine.cfg, 10, engine.max_seq_len, engine.kv_dtype, staging_rows=1, free=roomy)
    # the batcher checks its batch cache (max_batch rows and a staging row) before allocating it
    monkeypatch.setattr(memory, "host_memory_free", lambda arrays=(): roomy)
    ContinuousBatcher(engine, max_batch=8)
    with pytest.raises(ArgumentError, match="max_batch"):
        ContinuousBatcher(engine, max_batch=16)


def test_file_backed_bytes_count_mapped_weights_once(tmp_path):
    """The model's arrays that lie in a mapped safetensors file are what MemAvailable over-counts; views that
    overlap count once, and arrays in anonymous memory not at all."""
    from powerinfer_jax import memory
    from powerinfer_jax.tensor_file import MappedSafetensors, save_aligned

    path = str(tmp_path / "w.safetensors")
    save_aligned({"a": np.ones((256, 64), np.float32), "b": np.zeros((128, 32), np.float32)}, path)
    z = MappedSafetensors(path)
    a, b = z.view("a"), z.view("b")
    assert memory.file_backed_bytes([a, b]) == a.nbytes + b.nbytes
    assert memory.file_backed_bytes([a, a[:10], a[100:], b]) == a.nbytes + b.nbytes  # views inside a: once
    assert memory.file_backed_bytes([np.ones(1000, np.float32), a[:10]]) == a[:10].nbytes
    free = memory.host_memory_free([a])
    assert free is None or free >= 0

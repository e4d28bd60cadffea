"""Incremental detokenization (tokenizer.IncrementalDecoder): the streamed pieces add up to the full
decode, each step decodes a short window (O(n) for a stream, not O(n^2)), and generate's stream equals
its final text."""

from __future__ import annotations

import numpy as np
import pytest

import powerinfer_jax as pij
from powerinfer_jax.tokenizer import IncrementalDecoder


@pytest.fixture(scope="module")
def engine():
    return pij.load(max_seq_len=256)


def test_pieces_add_up_to_the_full_decode_and_windows_stay_short(engine):
    tok = engine.tokenizer
    rng = np.random.default_rng(0)
    for _ in range(100):
        ids = rng.integers(0, tok.vocab_size, int(rng.integers(1, 80))).tolist()
        d = IncrementalDecoder(tok)
        widest = 0
        pieces = []
        for t in ids:
            pieces.append(d.push(t))
            widest = max(widest, len(d.ids) - d.prefix)
        want = tok.decode(ids)
        if not want.endswith("\ufffd"):  # a stream that ends mid-character holds its last bytes back
            assert "".join(p for p in pieces if p) == want
        assert widest <= 8  # the window decoded per step, not the whole text


def test_skipped_ids_give_empty_pieces(engine):
    tok = engine.tokenizer
    d = IncrementalDecoder(tok, skip_ids=tok.eos_token_ids)
    assert d.push(tok.eos_token_ids[0]) == "" and d.ids == []


def test_generate_streams_exactly_its_text(engine):
    pieces = []
    res = engine.generate("ROMEO:", max_new_tokens=48, temperature=0.8, seed=5,
                          on_token=lambda _id, text: pieces.append(text))
    assert "".join(pieces) == res.text and len(pieces) <= len(res.token_ids) + 1


def test_an_exception_in_on_token_reaches_the_caller(engine):
    """generate runs the batcher's loop in the caller's thread: the caller's own callback error is raised
    there (the server's loop logs its callbacks' errors instead), and the engine still works afterwards."""
    seen = []

    def on_token(_id, _text):
        seen.append(_id)
        if len(seen) == 3:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        engine.generate("ROMEO:", max_new_tokens=20, stop_at_eos=False, on_token=on_token)
    assert len(seen) == 3
    assert len(engine.generate("ROMEO:", max_new_tokens=5, stop_at_eos=False).token_ids) == 5

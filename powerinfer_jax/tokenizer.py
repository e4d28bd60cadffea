"""`tokenizer.json` through the `tokenizers` library, with BOS/EOS from the model's config files."""

from __future__ import annotations

import json
import os
from typing import Sequence

from tokenizers import Tokenizer as _HFTokenizer

from powerinfer_jax.errors import CheckpointError, PathNotFoundError


class IncrementalDecoder:
    """The text of a growing token list, one piece per token, decoding a short window each time (a
    stream of n tokens costs O(n), not the O(n^2) of re-decoding everything). Two windows are decoded:
    the tokens already shown since `prefix` and the same plus the new ones; the new piece is their
    difference, so a tokenizer that drops a leading space at the start of a decode drops it from both.
    A piece that would end in half a UTF-8 character is held back until its bytes are complete."""

    def __init__(self, tokenizer: "Tokenizer", skip_ids: Sequence[int] = ()):
        self.tokenizer, self.skip = tokenizer, frozenset(skip_ids)
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] were shown; ids[read:] are not yet

    def push(self, token_id: int) -> str | None:
        """Adds a token; returns its new text ("" for a skipped token), or None while held back."""
        if token_id in self.skip:
            return ""
        self.ids.append(int(token_id))
        shown = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd"):
            return None
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(shown):]


class Tokenizer:
    """Encodes prompts (adding BOS as the checkpoint expects) and decodes token ids."""

    def __init__(self, model_dir: str, bos_token_id: int | None = None, eos_token_ids: Sequence[int] = ()):
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise PathNotFoundError(f"no tokenizer.json in {model_dir}; pass token ids instead of text")
        try:
            self._tok = _HFTokenizer.from_file(path)
        except BaseException as err:  # noqa: BLE001  (the Rust side raises Exception or a PanicException)
            _reraise_interrupts(err)
            raise CheckpointError(f"{path} is unreadable ({_first_line(err)}); restore it from the model's "
                                  "source") from None
        extra = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
        gen = _read_json(os.path.join(model_dir, "generation_config.json"))
        self.bos_token_id = _token_id(gen, "bos_token_id", bos_token_id, model_dir)
        eos = gen.get("eos_token_id", list(eos_token_ids))
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_token_ids = tuple(_token_id({"eos_token_id": e}, "eos_token_id", None, model_dir) for e in eos
                                   if e is not None)
        # LLaMA and OPT tokenizers prepend BOS unless their config says otherwise.
        self.add_bos = bool(extra.get("add_bos_token", True)) and self.bos_token_id is not None
        self.path = path

    @property
    def vocab_size(self) -> int:
        """Size of the tokenizer's vocabulary (may be below the model's embedding rows)."""
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Text -> ids, with exactly one leading BOS when the model expects one (and add_bos)."""
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except BaseException as err:  # noqa: BLE001  (a corrupt tokenizer.json can panic in Rust)
            _reraise_interrupts(err)
            raise CheckpointError(f"{self.path} failed to encode the text ({_first_line(err)}); the tokenizer "
                                  "file is corrupt or not for this model") from None
        if add_bos and self.add_bos:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, special tokens dropped."""
        try:
            return self._tok.decode(list(ids), skip_special_tokens=True)
        except BaseException as err:  # noqa: BLE001
            _reraise_interrupts(err)
            raise CheckpointError(f"{self.path} failed to decode ids ({_first_line(err)}); the tokenizer "
                                  "file is corrupt or not for this model") from None


def _reraise_interrupts(err: BaseException) -> None:
    """Ctrl-C, exits and alarms pass through; only the tokenizer's own failures (exceptions, or the Rust
    side's PanicException, a BaseException) become CheckpointErrors."""
    if not isinstance(err, Exception) and type(err).__name__ != "PanicException":
        raise err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0][:120] if text else type(err).__name__)


def _token_id(src: dict, key: str, default, model_dir: str) -> int | None:
    v = src.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise CheckpointError(f"{model_dir}: {key} must be a token id (an integer >= 0), got {v!r:.60}")
    return v


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({_first_line(err)}); restore it from the model's "
                              "source") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(out).__name__}")
    return out

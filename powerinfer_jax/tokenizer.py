"""`tokenizer.json` through the `tokenizers` library, with BOS/EOS from the model's config files."""

from __future__ import annotations

import json
import os
from typing import Sequence

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    """Encodes prompts (adding BOS as the checkpoint expects) and decodes token ids."""

    def __init__(self, model_dir: str, bos_token_id: int | None = None, eos_token_ids: Sequence[int] = ()):
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json in {model_dir}; pass token ids instead of text")
        self._tok = _HFTokenizer.from_file(path)
        extra = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
        gen = _read_json(os.path.join(model_dir, "generation_config.json"))
        self.bos_token_id = gen.get("bos_token_id", bos_token_id)
        eos = gen.get("eos_token_id", list(eos_token_ids))
        self.eos_token_ids = tuple(eos) if isinstance(eos, list) else (eos,)
        # LLaMA and OPT tokenizers prepend BOS unless their config says otherwise.
        self.add_bos = bool(extra.get("add_bos_token", True)) and self.bos_token_id is not None

    @property
    def vocab_size(self) -> int:
        """Size of the tokenizer's vocabulary (may be below the model's embedding rows)."""
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Text -> ids, with exactly one leading BOS when the model expects one (and add_bos)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.add_bos:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, special tokens dropped."""
        return self._tok.decode(list(ids), skip_special_tokens=True)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)

"""Chat messages -> prompt token ids: the model's own chat template when it ships one, else a plain one.

A model's template is the `chat_template` of its `tokenizer_config.json` (a string, or HF's list of
named templates, of which "default" is used) or a `chat_template.jinja` file beside it. It is rendered
as transformers does (jinja2, sandboxed, `trim_blocks`/`lstrip_blocks`) with `messages`,
`add_generation_prompt=True`, `bos_token`, `eos_token` and `raise_exception`, and the text is
tokenized without adding BOS (a template writes its own special tokens).

Without a template (the bundled model has none) the plain template is, with BOS added:

    System: <system message>

    User: <user message>

    Assistant: <assistant message>

    User: <user message>

    Assistant:

one block per message ("developer" is shown as "System"), blocks separated by a blank line, ending
with "Assistant:" so the model writes the reply.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from powerinfer_jax.errors import ArgumentError, CheckpointError

ROLES = ("system", "developer", "user", "assistant")
_PLAIN_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


class ChatFormatter:
    """Turns OpenAI-style messages ({"role", "content"}) into prompt token ids for one model."""

    def __init__(self, tokenizer, model_dir: str | None):
        self.tokenizer = tokenizer
        config = _read_config(model_dir)
        self.template_source = _template_source(model_dir, config)
        self.bos_token, self.eos_token = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        self._template = _compile(self.template_source, model_dir) if self.template_source else None

    @property
    def kind(self) -> str:
        """"model" when the model's own chat template is used, "plain" for the documented fallback."""
        return "model" if self._template is not None else "plain"

    def render(self, messages: Sequence[dict]) -> str:
        """The prompt text for messages (each a dict with "role" and "content" as a string)."""
        for m in messages:
            if m.get("role") not in ROLES:
                raise ArgumentError(f"message role {m.get('role')!r:.40} is not supported: use one of {', '.join(ROLES)}")
        if self._template is None:
            blocks = [f"{_PLAIN_NAMES[m['role']]}: {m['content']}" for m in messages]
            return "\n\n".join(blocks + ["Assistant:"])
        try:
            return self._template.render(messages=[dict(m) for m in messages], add_generation_prompt=True,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except _TemplateRefusal as err:  # the template's own check of the conversation (roles, order)
            raise ArgumentError(f"the model's chat template refused the messages: {err}") from None
        except Exception as err:  # noqa: BLE001  (the template is data: whatever it trips on is about these messages)
            raise ArgumentError(f"the model's chat template failed on these messages ({type(err).__name__}: "
                                f"{err})") from None

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """The token ids of the rendered prompt."""
        if self.tokenizer is None:
            raise ArgumentError("this model has no tokenizer.json: chat needs one")
        text = self.render(messages)
        # A model's template writes BOS itself (as transformers' apply_chat_template assumes); the plain one does not.
        return self.tokenizer.encode(text, add_bos=self._template is None)


class _TemplateRefusal(Exception):
    """raise_exception(...) called by a chat template."""


def _raise_exception(message):
    raise _TemplateRefusal(str(message))


def _compile(source: str, model_dir: str | None):
    # The sandbox because a template is data from a model folder, not trusted code.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateError as err:
        raise CheckpointError(f"the chat template of {model_dir} does not parse ({err}); fix or remove it") from None


def _read_config(model_dir: str | None) -> dict:
    path = os.path.join(model_dir, "tokenizer_config.json") if model_dir else ""
    if not path or not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, OSError) as err:
        raise CheckpointError(f"{path} is unreadable ({err}); restore it from the model's source") from None
    return config if isinstance(config, dict) else {}


def _template_source(model_dir: str | None, config: dict) -> str | None:
    tpl = config.get("chat_template")
    if isinstance(tpl, list):  # HF's named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    if isinstance(tpl, str) and tpl.strip():
        return tpl
    path = os.path.join(model_dir, "chat_template.jinja") if model_dir else ""
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return None


def _token_text(value) -> str:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""

"""Chat templates: the model's own Jinja template, rendered with jinja2.

GGUF files carry the chat template of the original model (``tokenizer.chat_template``)
as Jinja source. It is rendered here in a sandboxed jinja2 environment set up the way
the Hugging Face tokenizers render it (``trim_blocks``, ``lstrip_blocks``, loop
controls, ``raise_exception``, a ``tojson`` that keeps non-ASCII text). llama.cpp's
built-in formatter is used only when the model has no template and a built-in one is
named explicitly.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from llamabind.errors import ChatTemplateError, InvalidArgumentError

__all__ = ["ChatMessage", "ChatTemplate", "validate_messages"]


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn."""

    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def validate_messages(messages: object) -> list[dict[str, Any]]:
    """Check and copy chat messages: each a mapping (or ChatMessage) with str ``role``
    and str ``content``. The caller's objects are never modified."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise InvalidArgumentError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
            f"{type(messages).__name__}")
    if not messages:
        raise InvalidArgumentError("messages is empty")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if isinstance(m, ChatMessage):
            m = m.as_dict()
        if not isinstance(m, Mapping):
            raise InvalidArgumentError(f"messages[{i}] must be a dict, got {m!r}")
        for key in ("role", "content"):
            if key not in m:
                raise InvalidArgumentError(f"messages[{i}] has no {key!r}: {dict(m)!r}")
            if not isinstance(m[key], str):
                raise InvalidArgumentError(
                    f"messages[{i}][{key!r}] must be a str, got {m[key]!r}")
            try:
                m[key].encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidArgumentError(
                    f"messages[{i}][{key!r}] contains a lone surrogate") from None
            if "\0" in m[key]:
                raise InvalidArgumentError(f"messages[{i}][{key!r}] contains a NUL character")
        if not m["role"]:
            raise InvalidArgumentError(f"messages[{i}]['role'] is empty")
        out.append(dict(m))
    return out


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the chat template refused the messages: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False,
            sort_keys: bool = False, separators: Any = None) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys,
                      separators=separators)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(source: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}") from None


class ChatTemplate:
    """A Jinja chat template with the special-token texts it may use."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        if not isinstance(source, str) or not source.strip():
            raise InvalidArgumentError("chat template source must be a non-empty str")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = _compile(source)

    def render(self, messages: object, *, add_generation_prompt: bool = True,
               **extra: Any) -> str:
        """Render ``messages``; ``extra`` become template variables (e.g. ``tools``)."""
        from jinja2 import TemplateError

        msgs = validate_messages(messages)
        try:
            text: str = self._template.render(
                messages=msgs, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except ChatTemplateError:
            raise
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template failed to render: {exc}") from None
        except Exception as exc:  # errors raised by template code on odd input
            raise ChatTemplateError(
                f"the chat template failed to render: {type(exc).__name__}: {exc}") from None
        return text

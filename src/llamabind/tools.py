"""Tool calling, OpenAI-shaped, with the model's own chat template.

Tools are OpenAI function tools::

    {"type": "function", "function": {"name": "get_weather", "description": "...",
                                      "parameters": {JSON schema of the arguments}}}

``tool_choice`` is "auto" (the model decides; free text stays free: the grammar applies
only once the model starts a tool call), "required" (at least one call), "none" (no
call; the tools are still shown to the model) or ``{"type": "function", "function":
{"name": ...}}`` (that tool). The assistant's reply carries ``tool_calls`` (id, type,
function.name, function.arguments as JSON text); the results go back as
``{"role": "tool", "tool_call_id": ..., "content": ...}`` messages.

The prompt, the grammar and the parsing of the reply come from llama.cpp's
``common/chat`` (the handlers llama-server uses), through :mod:`llamabind.structured`;
this module checks and normalizes what the caller passes.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llamabind.errors import InvalidArgumentError

__all__ = [
    "ToolSpec",
    "normalize_tool_choice",
    "normalize_tools",
    "tool_result",
    "validate_tool_messages",
]

# OpenAI's rule for function names.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class ToolSpec:
    """One function tool: its name, description and the JSON schema of its arguments
    (None: no arguments)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None

    def as_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name, "description": self.description}
        if self.parameters is not None:
            function["parameters"] = copy.deepcopy(self.parameters)
        return {"type": "function", "function": function}


def normalize_tools(tools: Any) -> list[ToolSpec]:
    """Check OpenAI function tools (a list of dicts) and copy them."""
    from llamabind.structured import _schema_value

    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise InvalidArgumentError(
            "tools must be a list of {'type': 'function', 'function': {...}} dicts, got "
            f"{type(tools).__name__}")
    out: list[ToolSpec] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise InvalidArgumentError(f"{where} must be a dict, got {tool!r:.80}")
        if tool.get("type") != "function":
            raise InvalidArgumentError(
                f"{where}['type'] must be 'function', got {tool.get('type')!r}")
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            raise InvalidArgumentError(f"{where}['function'] must be a dict, got {fn!r:.80}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidArgumentError(
                f"{where}['function']['name'] must be 1 to 64 letters, digits, '_' or '-', "
                f"got {name!r}")
        if name in seen:
            raise InvalidArgumentError(f"{where}: two tools are named {name!r}")
        seen.add(name)
        description = fn.get("description", "")
        if description is None:
            description = ""
        if not isinstance(description, str):
            raise InvalidArgumentError(
                f"{where}['function']['description'] must be a str, got {description!r:.80}")
        params = fn.get("parameters")
        parameters = None
        if params is not None:
            parameters = _schema_value(params, f"{where}['function']['parameters']")
            if parameters == {}:
                parameters = None
        out.append(ToolSpec(name, description, parameters))
    return out


def normalize_tool_choice(choice: Any, tools: Sequence[ToolSpec]) -> str | dict[str, Any]:
    """"auto" (the default), "required", "none", or {"type": "function", "function":
    {"name": NAME}} naming one of ``tools``."""
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        if choice not in ("auto", "required", "none"):
            raise InvalidArgumentError(
                f"tool_choice must be 'auto', 'required', 'none' or "
                f"{{'type': 'function', 'function': {{'name': ...}}}}, got {choice!r}")
        return choice
    if isinstance(choice, Mapping) and choice.get("type") == "function":
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        names = [t.name for t in tools]
        if name not in names:
            raise InvalidArgumentError(
                f"tool_choice names function {name!r}, which is not among the tools "
                f"{names}")
        return {"type": "function", "function": {"name": name}}
    raise InvalidArgumentError(
        f"tool_choice must be 'auto', 'required', 'none' or "
        f"{{'type': 'function', 'function': {{'name': ...}}}}, got {choice!r:.100}")


def validate_tool_messages(messages: Any) -> list[dict[str, Any]]:
    """Check and copy OpenAI chat messages, tool calls and tool results included:
    ``content`` is a str, None (an assistant message with tool calls) or a list of
    text parts; an assistant's ``tool_calls`` have a function name and arguments (JSON
    text, or a dict); a "tool" message has ``tool_call_id`` or ``name``. The caller's
    objects are never modified."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise InvalidArgumentError(
            f"messages must be a list of message dicts, got {type(messages).__name__}")
    if not messages:
        raise InvalidArgumentError("messages is empty")
    out = []
    for i, message in enumerate(messages):
        if hasattr(message, "as_dict"):
            message = message.as_dict()
        if not isinstance(message, Mapping):
            raise InvalidArgumentError(f"messages[{i}] must be a dict, got {message!r:.80}")
        out.append(_message(message, f"messages[{i}]"))
    return out


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{where} must be a str, got {value!r:.80}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgumentError(f"{where} contains a lone surrogate") from None
    if "\0" in value:
        raise InvalidArgumentError(f"{where} contains a NUL character")
    return value


def _message(message: Mapping[str, Any], where: str) -> dict[str, Any]:
    role = message.get("role")
    if role not in _ROLES:
        raise InvalidArgumentError(f"{where}['role'] must be one of {_ROLES}, got {role!r}")
    msg: dict[str, Any] = {"role": role}
    content = message.get("content")
    calls = message.get("tool_calls")
    if content is None:
        if role != "assistant" or not calls:
            raise InvalidArgumentError(
                f"{where} has no 'content' (only an assistant message with tool_calls may "
                "leave it out)")
        msg["content"] = None
    elif isinstance(content, str):
        msg["content"] = _text(content, f"{where}['content']")
    elif isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise InvalidArgumentError(
                    f"{where}['content'][{j}] must be a {{'type': 'text', 'text': ...}} "
                    f"part, got {part!r:.80}")
            parts.append({"type": "text",
                          "text": _text(part.get("text"), f"{where}['content'][{j}]['text']")})
        msg["content"] = parts
    else:
        raise InvalidArgumentError(
            f"{where}['content'] must be a str, a list of text parts or None, got "
            f"{content!r:.80}")
    if calls is not None:
        if role != "assistant":
            raise InvalidArgumentError(f"{where}: only assistant messages have tool_calls")
        msg["tool_calls"] = [_tool_call(c, f"{where}['tool_calls'][{j}]")
                             for j, c in enumerate(_list(calls, f"{where}['tool_calls']"))]
    for key in ("tool_call_id", "name", "reasoning_content"):
        if message.get(key) is not None:
            msg[key] = _text(message[key], f"{where}[{key!r}]")
    if role == "tool" and "tool_call_id" not in msg and "name" not in msg:
        raise InvalidArgumentError(
            f"{where}: a tool message needs the 'tool_call_id' of the call it answers")
    return msg


def _list(value: Any, where: str) -> Sequence[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise InvalidArgumentError(f"{where} must be a list, got {value!r:.80}")
    return value


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise InvalidArgumentError(f"{where} must be a dict, got {call!r:.80}")
    if call.get("type", "function") != "function":
        raise InvalidArgumentError(f"{where}['type'] must be 'function'")
    fn = call.get("function")
    if not isinstance(fn, Mapping):
        raise InvalidArgumentError(f"{where}['function'] must be a dict, got {fn!r:.80}")
    name = _text(fn.get("name"), f"{where}['function']['name']")
    args = fn.get("arguments", "{}")
    if isinstance(args, Mapping):
        args = json.dumps(args, ensure_ascii=False)
    args = _text(args, f"{where}['function']['arguments']")
    out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
    if call.get("id") is not None:
        out["id"] = _text(call["id"], f"{where}['id']")
    return out


def tool_result(call: Mapping[str, Any], result: Any) -> dict[str, Any]:
    """The message that answers a tool call: ``{"role": "tool", "tool_call_id": ...,
    "content": ...}``; ``result`` is sent as is when it is a str, else as JSON."""
    if not isinstance(call, Mapping) or not isinstance(call.get("id"), str):
        raise InvalidArgumentError(f"call must be a tool call with an 'id', got {call!r:.80}")
    content = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
    return {"role": "tool", "tool_call_id": call["id"], "content": content}

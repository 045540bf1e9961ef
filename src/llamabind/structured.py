"""Structured output: JSON schemas, Pydantic models, ``response_format`` and tool calls,
valid by construction.

Every constraint becomes a GBNF grammar written by llama.cpp itself: JSON schemas by its
converter (``common/json-schema-to-grammar``), tool calls and chat ``response_format`` by
the chat-template handlers llama-server uses (``common/chat``), with their output
parsers. llamabind adds a strict check in front of the converter: a schema keyword the
converter would skip is refused (:class:`~llamabind.errors.UnsupportedSchemaError`, naming
the keyword and where it is) unless the caller passes ``schema_best_effort=True``.

The generation API calls one hook, :meth:`Planner.plan`, with the request's options and
gets a :class:`GenerationPlan` (or None when there is nothing to constrain): the prompt to
use instead of the caller's (chat templates render tools into it), the grammar with its
lazy triggers, extra stop strings, and ``parse``/``stream_parser`` to read the output.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from llamabind import _llama
from llamabind._schema_check import Finding, find_unsupported, iter_patterns
from llamabind.errors import (
    InvalidArgumentError,
    OutputParseError,
    SchemaError,
    UnsupportedSchemaError,
)

if TYPE_CHECKING:
    from llamabind.tools import ToolSpec

__all__ = [
    "GenerationPlan",
    "ParsedOutput",
    "Planner",
    "StreamParser",
    "check_schema",
    "json_schema_to_grammar",
    "schema_of",
]

# How deep a schema (or any JSON value handed to llama.cpp) may nest. llama.cpp's
# schema reader and converter recurse once per level; far below any stack limit.
MAX_DEPTH = 64

# llama-server's reasoning format: a model's thinking goes to "reasoning_content".
REASONING_FORMAT = "deepseek"

STRUCTURED_OPTIONS = ("json_schema", "response_format", "schema", "schema_best_effort",
                      "tools", "tool_choice", "parallel_tool_calls")


# --- schemas ---------------------------------------------------------------------------


def _depth_check(value: Any, what: str) -> None:
    """Refuse values nested deeper than MAX_DEPTH (without recursing in Python)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > MAX_DEPTH:
            raise SchemaError(f"{what} is nested more than {MAX_DEPTH} levels deep")
        stack.extend((c, depth + 1) for c in children)


def _plain_json(value: Any, what: str) -> Any:
    """A JSON value as plain dicts/lists (a copy), checked to be JSON: str keys, no NaN."""
    _depth_check(value, what)
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"{what} is not JSON: {exc}") from None
    return json.loads(text)


def _schema_value(schema: Any, what: str = "json_schema") -> dict[str, Any]:
    """A JSON schema given as a dict or as JSON text, as a plain dict (a copy)."""
    if isinstance(schema, (str, bytes, bytearray)):
        try:
            value = json.loads(schema)
        except (ValueError, RecursionError) as exc:
            raise SchemaError(f"{what} is not valid JSON: {exc}") from None
    elif isinstance(schema, Mapping):
        value = schema
    else:
        raise InvalidArgumentError(
            f"{what} must be a dict or JSON text, got {type(schema).__name__}")
    value = _plain_json(value, what)
    if not isinstance(value, dict):
        raise SchemaError(f"{what} must be a JSON object, got {value!r:.80}")
    return value


def schema_of(model_type: Any) -> tuple[dict[str, Any], Callable[[str], Any]]:
    """The JSON schema of a Pydantic model (or any type Pydantic can validate, e.g.
    ``list[Invoice]``) and the function that validates JSON text into it."""
    try:
        import pydantic
    except ImportError:
        raise InvalidArgumentError(
            "schema= takes a Pydantic model and needs pydantic installed "
            "(pip install 'llamabind[structured]'); pass a JSON schema as json_schema=") \
            from None
    if isinstance(model_type, type) and issubclass(model_type, pydantic.BaseModel):
        return model_type.model_json_schema(), model_type.model_validate_json
    if isinstance(model_type, (Mapping, str, bytes)):
        raise InvalidArgumentError(
            "schema= takes a Pydantic model (a class); pass a JSON schema as json_schema=")
    try:
        adapter = pydantic.TypeAdapter(model_type)
        return adapter.json_schema(), adapter.validate_json
    except pydantic.PydanticUserError as exc:
        raise InvalidArgumentError(
            f"schema= must be a Pydantic model or a type Pydantic can describe, got "
            f"{model_type!r}: {exc}") from None


def check_schema(schema: Any, *, best_effort: bool = False) -> list[Finding]:
    """What llama.cpp's converter would not enforce in ``schema`` (a dict or JSON text).

    Raises :class:`~llamabind.errors.UnsupportedSchemaError` for the first such finding,
    unless ``best_effort``: then returns them all (empty when the grammar enforces the
    whole schema). Patterns are tried on the converter itself.
    """
    value = _schema_value(schema)
    findings = find_unsupported(value)
    for path, pattern in iter_patterns(value):
        _, warnings = _llama._schema_to_grammar(
            json.dumps({"type": "string", "pattern": pattern}))
        if warnings:
            findings.append(Finding(path, "pattern", _pattern_reason(pattern, warnings)))
    if findings and not best_effort:
        first = findings[0]
        more = f" (and {len(findings) - 1} more)" if len(findings) > 1 else ""
        raise UnsupportedSchemaError(
            f"JSON schema keyword {first.keyword!r} at {first.path} would not be enforced: "
            f"{first.reason}{more}. llama.cpp's converter skips it, so the output could "
            "break it; change the schema, or pass schema_best_effort=True to constrain "
            "only what the converter supports", first.keyword, first.path)
    return findings


def _pattern_reason(pattern: str, warnings: str) -> str:
    detail = warnings.split("(", 1)[1].rsplit(")", 1)[0] if "(" in warnings else warnings
    return (f"llama.cpp cannot translate the regular expression {pattern!r} ({detail}); "
            "it would accept any string")


def json_schema_to_grammar(schema: Any, *, best_effort: bool = False) -> str:
    """The GBNF grammar (root rule ``root``) llama.cpp's converter writes for a JSON
    schema (a dict or JSON text), after :func:`check_schema`."""
    value = _schema_value(schema)
    check_schema(value, best_effort=best_effort)
    grammar, _ = _llama._schema_to_grammar(json.dumps(value))
    if not grammar.strip():
        raise SchemaError("llama.cpp's converter wrote an empty grammar for this schema")
    return str(grammar)


def _response_format_schema(response_format: Any) -> tuple[dict[str, Any] | None, Any]:
    """The JSON schema an OpenAI ``response_format`` asks for (None for "text"), and a
    Pydantic type to validate with when one was given instead of a dict."""
    if isinstance(response_format, type):
        return None, response_format
    if not isinstance(response_format, Mapping):
        raise InvalidArgumentError(
            "response_format must be a dict like {'type': 'json_object'} or "
            f"{{'type': 'json_schema', 'json_schema': {{'schema': ...}}}}, got "
            f"{response_format!r:.100}")
    kind = response_format.get("type")
    if kind == "text":
        return None, None
    if kind == "json_object":
        schema = response_format.get("schema")
        return (_schema_value(schema, "response_format['schema']") if schema is not None
                else {"type": "object"}), None
    if kind == "json_schema":
        wrapper = response_format.get("json_schema")
        if not isinstance(wrapper, Mapping) or "schema" not in wrapper:
            raise InvalidArgumentError(
                "response_format of type 'json_schema' needs "
                "{'json_schema': {'name': ..., 'schema': {...}}}")
        schema = _schema_value(wrapper["schema"], "response_format['json_schema']['schema']")
        return schema or {"type": "object"}, None
    raise InvalidArgumentError(
        f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


# --- the output ------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedOutput:
    """What the output says: ``content`` (text; for a schema, the JSON text),
    ``reasoning_content`` (a thinking model's reasoning, split off), ``tool_calls``
    (OpenAI-shaped dicts: id, type, function.name, function.arguments as JSON text) and
    ``value`` (the parsed JSON, or the Pydantic object; None when the output was cut
    short or no schema was asked for)."""

    content: str | None
    reasoning_content: str | None = None
    tool_calls: tuple[dict[str, Any], ...] = ()
    value: Any = None

    @property
    def message(self) -> dict[str, Any]:
        """The assistant message, OpenAI-shaped (``content`` None when it is only
        tool calls)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning_content:
            msg["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            msg["tool_calls"] = [json.loads(json.dumps(tc)) for tc in self.tool_calls]
            if not self.content:
                msg["content"] = None
        return msg


def _tool_calls_of(message: Mapping[str, Any], partial: bool = False
                   ) -> tuple[dict[str, Any], ...]:
    """The message's tool calls, OpenAI-shaped. In output cut short, a call whose
    arguments are not complete JSON yet is left out."""
    calls = []
    for call in message.get("tool_calls") or ():
        fn = call.get("function", {})
        if partial:
            try:
                json.loads(fn.get("arguments", ""))
            except ValueError:
                continue
        calls.append({"id": call.get("id", ""), "type": "function",
                      "function": {"name": fn.get("name", ""),
                                   "arguments": fn.get("arguments", "")}})
    return tuple(calls)


# --- the plan --------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationPlan:
    """How to run one structured request. A plain object: the engine reads the fields.

    * ``prompt``: the prompt text to generate from instead of the caller's (a chat
      rendered by the model's template through llama.cpp, tools included), or None to
      keep the caller's. Tokenize it with ``add_special=True, parse_special=True``.
    * ``grammar``: GBNF for the sampler (root rule ``grammar_root``), or None.
    * ``grammar_lazy``: the grammar applies only from a trigger on
      (``trigger_patterns``: regexes matched on the output so far;
      ``trigger_tokens``: token ids). Before the trigger, output is free.
    * ``grammar_prefill``: token ids the grammar must accept before the first
      generated token (the assistant header the chat grammar starts with, already in
      the prompt). :meth:`add_to_sampler` does both.
    * ``preserved_tokens``: special tokens the output parser needs to see: render
      them as text (``special=True``) when they are generated.
    * ``stop``: extra stop strings (end-of-turn markers of the template).
    * ``output_prefix``: text the assistant's turn was made to start with (already at
      the end of ``prompt``): for ``tool_choice="required"`` or a named tool, the
      template's tool-call marker, so that the model calls a tool at once. It is part
      of the output: ``parse`` and the stream parser read it before the generated text.
    * ``kind``: "json" (a schema), "tools" or "chat" (a chat rendered by llama.cpp's
      template with nothing to parse but its content).
    * ``parse(text, partial=...)`` and ``stream_parser()`` read the output.
    """

    kind: Literal["json", "tools", "chat"]
    prompt: str | None = None
    grammar: str | None = None
    grammar_root: str = "root"
    grammar_lazy: bool = False
    trigger_patterns: tuple[str, ...] = ()
    trigger_tokens: tuple[int, ...] = ()
    grammar_prefill: tuple[int, ...] = ()
    preserved_tokens: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    output_prefix: str = ""
    # how to read the output (llama.cpp's parser, for chat plans)
    parser: str | None = field(default=None, repr=False)
    parser_format: int = 0
    generation_prompt: str = field(default="", repr=False)
    validate: Callable[[str], Any] | None = field(default=None, repr=False)

    def add_to_sampler(self, sampler: _llama.Sampler, model: _llama.Model) -> None:
        """Add the grammar to ``sampler`` (at the point of the chain where the grammar
        goes) and feed it the prefill; nothing when there is no grammar."""
        if self.grammar is None:
            return
        if self.grammar_lazy:
            sampler.add_grammar(model, self.grammar, self.grammar_root,
                                trigger_patterns=list(self.trigger_patterns),
                                trigger_tokens=list(self.trigger_tokens))
        else:
            sampler.add_grammar(model, self.grammar, self.grammar_root)
        if self.grammar_prefill:
            sampler.accept_grammar(list(self.grammar_prefill))

    def parse(self, text: str, *, partial: bool = False) -> ParsedOutput:
        """Read the output ``text``. ``partial``: it was cut short (max_tokens, a stop
        string, cancelled): read what is there, and ``value`` is None unless it is
        complete. Output that cannot be read raises OutputParseError (never when
        partial)."""
        content: str | None = text
        reasoning: str | None = None
        calls: tuple[dict[str, Any], ...] = ()
        if self.parser is not None:
            try:
                msg = json.loads(self._parser().parse(self.output_prefix + text, partial))
            except OutputParseError:
                if not partial:
                    raise
                msg = {"content": self.output_prefix + text}
            content = msg.get("content") or ""
            reasoning = msg.get("reasoning_content") or None
            calls = _tool_calls_of(msg, partial)
        value = None
        if self.kind == "json" and content is not None:
            value = self._value(content, partial)
        return ParsedOutput(content=content, reasoning_content=reasoning, tool_calls=calls,
                            value=value)

    def _value(self, content: str, partial: bool) -> Any:
        try:
            if self.validate is not None:
                return self.validate(content)
            return json.loads(content)
        except Exception as exc:
            if partial:
                return None
            raise OutputParseError(
                f"the output is not a valid value of the schema: {exc}", content) from exc

    def _parser(self) -> _llama.ChatParser:
        assert self.parser is not None
        return _llama.ChatParser(self.parser, self.parser_format, self.generation_prompt,
                                 REASONING_FORMAT)

    def stream_parser(self) -> StreamParser:
        """A parser for the output as it streams, turning text pieces into
        OpenAI-shaped deltas (content, reasoning_content, tool_calls)."""
        return StreamParser(self)


class StreamParser:
    """Turns streamed output text into OpenAI-shaped deltas, as llama-server does::

        parser = plan.stream_parser()
        for piece in pieces:
            for delta in parser.feed(piece):
                ...   # {"content": "..."} or {"tool_calls": [{"index": 0, ...}]}
        for delta in parser.finish():
            ...
        parser.result   # the ParsedOutput of the whole output

    A tool call's first delta carries its ``index``, ``id``, ``type`` and
    ``function.name``; later ones add to ``function.arguments``. Joined, the deltas
    rebuild the message ``plan.parse`` gives for the whole text.
    """

    def __init__(self, plan: GenerationPlan) -> None:
        self._plan = plan
        self._text: list[str] = []
        self._native = plan._parser() if plan.parser is not None else None
        self._message: dict[str, Any] = {}
        self.result: ParsedOutput | None = None
        # the forced start of the turn is output too: its deltas come with the first feed
        self._pending = self._step(plan.output_prefix, partial=True) if plan.output_prefix \
            else []

    def feed(self, text: str) -> list[dict[str, Any]]:
        """The deltas that ``text`` (the next piece of output) completes."""
        if self.result is not None:
            raise InvalidArgumentError("the stream parser has finished")
        if not isinstance(text, str):
            raise InvalidArgumentError(f"text must be a str, got {type(text).__name__}")
        self._text.append(text)
        deltas, self._pending = self._pending + self._step(text, partial=True), []
        return deltas

    def finish(self, *, partial: bool = False) -> list[dict[str, Any]]:
        """End of output (``partial``: it was cut short): the last deltas. Sets
        ``result``."""
        if self.result is not None:
            return []
        deltas, self._pending = self._pending + self._step("", partial=partial), []
        self.result = self._result(partial)
        return deltas

    def _step(self, text: str, partial: bool) -> list[dict[str, Any]]:
        if self._native is None:
            return [{"content": text}] if text else []
        try:
            diffs_text, message_text = self._native.feed(text, partial)
        except OutputParseError:
            if partial:
                return []  # not readable yet: wait for more text
            raise
        self._message = json.loads(message_text)
        return [_delta(d) for d in json.loads(diffs_text)]

    def _result(self, partial: bool) -> ParsedOutput:
        text = "".join(self._text)
        if self._native is None:
            value = self._plan._value(text, partial) if self._plan.kind == "json" else None
            return ParsedOutput(content=text, value=value)
        msg = self._message
        content = msg.get("content") or ""
        value = (self._plan._value(content, partial) if self._plan.kind == "json" else None)
        return ParsedOutput(content=content, reasoning_content=msg.get("reasoning_content")
                            or None, tool_calls=_tool_calls_of(msg, partial), value=value)


def _delta(diff: Mapping[str, Any]) -> dict[str, Any]:
    if "index" not in diff:
        return dict(diff)
    call: dict[str, Any] = {"index": diff["index"]}
    function: dict[str, Any] = {}
    if "id" in diff:
        call["id"] = diff["id"]
        call["type"] = "function"
    if "name" in diff:
        function["name"] = diff["name"]
    function["arguments"] = diff.get("arguments", "")
    call["function"] = function
    return {"tool_calls": [call]}


# --- the hook --------------------------------------------------------------------------


class Planner:
    """Turns a request's structured-output options into a :class:`GenerationPlan`.

    One per loaded model (it caches the model's chat templates as llama.cpp reads
    them); thread-safe. The generation API calls :meth:`plan` with the options the
    caller passed (see :data:`STRUCTURED_OPTIONS`) and, for chat, the messages.
    """

    def __init__(self, model: _llama.Model) -> None:
        self._model = model
        self._templates: _llama.ChatTemplates | None = None
        self._caps: dict[str, bool] | None = None
        self._lock = threading.Lock()

    def templates(self) -> _llama.ChatTemplates:
        with self._lock:
            if self._templates is None:
                self._templates = _llama.ChatTemplates(self._model)
            return self._templates

    def caps(self) -> dict[str, bool]:
        """The chat template's capabilities (supports_tools, supports_parallel_tool_calls...)."""
        templates = self.templates()
        with self._lock:
            if self._caps is None:
                self._caps = {k: bool(v) for k, v in json.loads(templates.caps()).items()}
            return dict(self._caps)

    def plan(self, *, messages: Sequence[Any] | None = None, json_schema: Any = None,
             response_format: Any = None, schema: Any = None, tools: Any = None,
             tool_choice: Any = None, parallel_tool_calls: bool | None = None,
             schema_best_effort: bool = False, grammar: str | None = None
             ) -> GenerationPlan | None:
        """The plan for a request, or None when no structured option is set.

        ``messages`` is None for a completion (generate/stream: only a schema can be
        asked for) and the chat for chat/stream_chat. ``grammar`` is the request's own
        GBNF grammar, if any (it cannot be combined with a schema or tools).
        """
        from llamabind.tools import normalize_tool_choice, normalize_tools

        if not isinstance(schema_best_effort, bool):
            raise InvalidArgumentError(
                f"schema_best_effort must be a bool, got {schema_best_effort!r}")
        if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
            raise InvalidArgumentError(
                f"parallel_tool_calls must be a bool or None, got {parallel_tool_calls!r}")
        schema_value, validate = self._schema_option(json_schema, response_format, schema)
        tool_list = normalize_tools(tools) if tools is not None else None
        if tool_list == []:
            tool_list = None
        if tool_list is None and (tool_choice is not None or parallel_tool_calls is not None):
            raise InvalidArgumentError("tool_choice and parallel_tool_calls need tools=")
        choice = normalize_tool_choice(tool_choice, tool_list or [])
        if schema_value is not None and grammar is not None:
            raise InvalidArgumentError(
                "grammar cannot be combined with json_schema, response_format or schema")
        if tool_list is not None and choice != "none":
            if schema_value is not None:
                raise InvalidArgumentError(
                    "tools cannot be combined with json_schema, response_format or schema "
                    "(llama.cpp's chat handlers constrain one or the other)")
            if grammar is not None:
                raise InvalidArgumentError("grammar cannot be combined with tools")
        if schema_value is None and tool_list is None:
            return None

        if schema_value is not None:
            check_schema(schema_value, best_effort=schema_best_effort)
        for tool in tool_list or ():
            if tool.parameters is not None:
                try:
                    check_schema(tool.parameters, best_effort=schema_best_effort)
                except UnsupportedSchemaError as exc:
                    raise UnsupportedSchemaError(
                        f"tool {tool.name!r}: {exc}", exc.keyword, exc.path) from None

        if messages is None:
            if tool_list is not None:
                raise InvalidArgumentError("tools= needs a chat (chat/stream_chat), not a "
                                           "plain prompt")
            assert schema_value is not None
            grammar_text, _ = _llama._schema_to_grammar(json.dumps(schema_value))
            return GenerationPlan(kind="json", grammar=grammar_text, validate=validate)
        return self._chat_plan(messages, schema_value, validate, tool_list, choice,
                               parallel_tool_calls)

    @staticmethod
    def _schema_option(json_schema: Any, response_format: Any, schema: Any
                       ) -> tuple[dict[str, Any] | None, Callable[[str], Any] | None]:
        given = [name for name, v in (("json_schema", json_schema),
                                      ("response_format", response_format),
                                      ("schema", schema)) if v is not None]
        if len(given) > 1:
            raise InvalidArgumentError(f"pass only one of {' and '.join(given)}")
        if json_schema is not None:
            return _schema_value(json_schema), None
        if response_format is not None:
            value, model_type = _response_format_schema(response_format)
            if model_type is None:
                return value, None
            schema = model_type
        if schema is not None:
            value, validate = schema_of(schema)
            return _schema_value(value, "the Pydantic model's schema"), validate
        return None, None

    def _chat_plan(self, messages: Sequence[Any], schema_value: dict[str, Any] | None,
                   validate: Callable[[str], Any] | None, tool_list: list[ToolSpec] | None,
                   choice: str | dict[str, Any], parallel: bool | None) -> GenerationPlan:
        from llamabind.tools import validate_tool_messages

        msgs = validate_tool_messages(messages)
        templates = self.templates()
        if parallel is None:
            parallel = self.caps().get("supports_parallel_tool_calls", False)
        request: dict[str, Any] = {
            "messages": msgs,
            "parallel_tool_calls": parallel,
            "reasoning_format": REASONING_FORMAT,
            "add_generation_prompt": True,
        }
        if schema_value is not None:
            request["json_schema"] = schema_value
        kind: Literal["json", "tools", "chat"] = (
            "json" if schema_value is not None else
            "tools" if tool_list is not None and choice != "none" else "chat")
        if tool_list is None:
            result = json.loads(templates.apply(json.dumps(request)))
            return self._finish_plan(kind, result["prompt"], result, validate)
        request["tools"] = [t.as_openai() for t in tool_list]
        if choice in ("auto", "none"):
            request["tool_choice"] = choice
            result = json.loads(templates.apply(json.dumps(request)))
            return self._finish_plan(kind, result["prompt"], result, validate)

        # "required" or a named tool: the prompt lists every tool, the grammar and the
        # parser know the tools that may be called (only the named one), and the turn
        # starts with the template's tool-call marker. llama.cpp's own "required"
        # grammar lets free text come first and a call whenever the model starts one:
        # a small model may never start one, and run to max_tokens.
        request["tool_choice"] = "required"
        prompt = json.loads(templates.apply(json.dumps(request)))["prompt"]
        if isinstance(choice, dict):
            name = choice["function"]["name"]
            request["tools"] = [t.as_openai() for t in tool_list if t.name == name]
        result = json.loads(templates.apply(json.dumps(request)))
        marker = self._call_marker(request)
        return self._finish_plan(kind, prompt + marker, result, validate, marker)

    def _call_marker(self, request: dict[str, Any]) -> str:
        """The text a tool call starts with for this template: the word the "auto"
        handler's lazy grammar triggers on ("" when it has none)."""
        auto = json.loads(self.templates().apply(json.dumps({**request, "tool_choice": "auto"})))
        if not auto["grammar_lazy"]:
            return ""
        words = [t["value"] for t in auto["grammar_triggers"] if t["type"] == "word"]
        return str(words[0]) if words else ""

    def _finish_plan(self, kind: Literal["json", "tools", "chat"], prompt: str,
                     result: Mapping[str, Any], validate: Callable[[str], Any] | None,
                     output_prefix: str = "") -> GenerationPlan:
        vocab = self._model.vocab
        preserved: list[int] = []
        for text in result["preserved_tokens"]:
            ids = list(vocab.tokenize(text, add_special=False, parse_special=True))
            if len(ids) == 1:
                preserved.append(ids[0])
        grammar = result["grammar"] or None
        lazy = bool(result["grammar_lazy"]) and grammar is not None
        patterns: list[str] = []
        trigger_tokens: list[int] = []
        if lazy:
            for trigger in result["grammar_triggers"]:
                _add_trigger(trigger, vocab, preserved, patterns, trigger_tokens)
            if not patterns and not trigger_tokens:
                raise InvalidArgumentError("llama.cpp's chat handler gave a lazy grammar "
                                           "without triggers")
        prefill: list[int] = []
        if grammar is not None and not lazy and result["generation_prompt"] + output_prefix:
            prefill = _prefill_tokens(vocab, result["generation_prompt"] + output_prefix)
        return GenerationPlan(
            kind=kind, prompt=prompt, grammar=grammar, grammar_lazy=lazy,
            trigger_patterns=tuple(patterns), trigger_tokens=tuple(trigger_tokens),
            grammar_prefill=tuple(prefill), preserved_tokens=tuple(preserved),
            stop=tuple(s for s in result["additional_stops"] if s),
            output_prefix=output_prefix, parser=result["parser"] or None,
            parser_format=int(result["format"]), generation_prompt=result["generation_prompt"],
            validate=validate)


def _add_trigger(trigger: Mapping[str, Any], vocab: Any, preserved: list[int],
                 patterns: list[str], tokens: list[int]) -> None:
    """A chat handler's trigger as the sampler takes it, as llama-server converts it: a
    word that is one preserved token triggers on that token, other words on their
    escaped text; patterns as they are ("pattern_full" anchored at both ends)."""
    kind, value = trigger["type"], trigger["value"]
    if kind == "word":
        ids = list(vocab.tokenize(value, add_special=False, parse_special=True))
        if len(ids) == 1 and ids[0] in preserved:
            tokens.append(ids[0])
        else:
            patterns.append(_regex_escape(value))
    elif kind == "pattern":
        patterns.append(value)
    elif kind == "pattern_full":
        patterns.append(("" if value.startswith("^") else "^") + value
                        + ("" if value.endswith("$") else "$"))
    elif kind == "token":
        tokens.append(int(trigger["token"]))
    else:
        raise InvalidArgumentError(f"unknown grammar trigger type {kind!r}")


_REGEX_SPECIAL = re.compile(r"[.^$|()*+?\[\]{}\\]")


def _regex_escape(text: str) -> str:
    """Escape for the ECMAScript regexes of llama.cpp's lazy grammar (only the
    characters that are special there: Python's re.escape also escapes others, which
    ECMAScript may refuse)."""
    return _REGEX_SPECIAL.sub(lambda m: "\\" + m.group(0), text)


def _prefill_tokens(vocab: Any, generation_prompt: str) -> list[int]:
    """The generation prompt's tokens, which a chat grammar starts with: fed to the
    grammar so that it stands where the prompt ends (as llama.cpp's common sampler
    does, dropping a first token that is only a space some tokenizers add)."""
    ids = list(vocab.tokenize(generation_prompt, add_special=False, parse_special=True))
    if ids and not generation_prompt[:1].isspace():
        first = vocab.token_to_piece(ids[0], special=True)
        if first[:1].isspace():
            ids = ids[1:]
    return ids

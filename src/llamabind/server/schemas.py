"""Request bodies of the OpenAI-compatible endpoints, validated with pydantic.

Each model parses the JSON body strictly (a string is not a number, a float is not an
int) and checks every range; a failure becomes a 400 whose error object names the field
(``param``) and the value. Fields the server does not implement (``functions``,
``suffix``...) are declared so that a request using them is refused by name instead of
being silently ignored; other unknown fields are ignored, as OpenAI's and llama-server's
servers do.

``tools`` and ``response_format`` are checked here for their shape; their JSON schemas
are compiled by llama.cpp's converter (:func:`llamabind.structured.json_schema_to_grammar`)
before the request is queued, so a schema it cannot enforce is a 400 naming the field,
the keyword and where it is. The rest (tool names, ``tool_choice`` naming a tool, the
tool messages) is checked by the library, whose errors name the field too.
"""

from __future__ import annotations

import math
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from llamabind.errors import SchemaError, UnsupportedSchemaError

__all__ = [
    "ChatRequest",
    "CompletionRequest",
    "DetokenizeRequest",
    "EmbeddingRequest",
    "RequestError",
    "TokenizeRequest",
    "parse_body",
]

MAX_STOP = 16
MAX_PROMPTS = 64


class RequestError(Exception):
    """A request the server refuses: HTTP status, OpenAI error type, param and code."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type
        self.headers = headers or {}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        # OpenAI's clients send null for "not given"; it means the default here too
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


_B = TypeVar("_B", bound=_Body)


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None      # always: the grammar enforces the schema


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    # json_object with a schema: llama-server's extension
    schema_: dict[str, Any] | None = Field(None, alias="schema")

    def library_form(self, best_effort: bool) -> dict[str, Any] | None:
        """``response_format`` as the library takes it (None for text), its schema
        compiled first: a schema llama.cpp cannot enforce is a 400 naming the field."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            if self.schema_ is None:
                return {"type": "json_object"}
            check_schema(self.schema_, "response_format.schema", best_effort)
            return {"type": "json_object", "schema": self.schema_}
        if self.json_schema is None:
            raise RequestError("missing required parameter 'response_format.json_schema' "
                               "(type 'json_schema' needs {\"name\": ..., \"schema\": {...}})",
                               param="response_format.json_schema")
        # no schema: any JSON object, as an empty schema means to the library
        schema = self.json_schema.schema_ or {}
        check_schema(schema, "response_format.json_schema.schema", best_effort)
        return {"type": "json_schema", "json_schema": {"schema": schema}}


class FunctionDefinition(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None      # always: the grammar enforces the parameters


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


def check_schema(schema: dict[str, Any], param: str, best_effort: bool) -> None:
    """Compile ``schema`` with llama.cpp's converter (after llamabind's check of the
    keywords it would skip); a 400 naming ``param`` when it cannot."""
    from llamabind.structured import json_schema_to_grammar

    try:
        json_schema_to_grammar(schema, best_effort=best_effort)
    except UnsupportedSchemaError as exc:
        # the message names the keyword and where it is in the schema
        raise RequestError(f"'{param}': {exc}".replace(
            "schema_best_effort=True", '"schema_best_effort": true'), param=param,
            code="unsupported_schema") from None
    except SchemaError as exc:
        raise RequestError(f"'{param}' is not a JSON schema llama.cpp can use: {exc}",
                           param=param, code="invalid_schema") from None


class _Sampling(_Body):
    """What chat and text completions share."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=0, le=1 << 24)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1 << 24)
    seed: int | None = Field(None, ge=-1, le=0xFFFFFFFE)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)
    logit_bias: dict[str, float] | None = None
    n: int = Field(1, ge=1, le=128)
    stop: Any = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # llamabind's: constrain only what llama.cpp's converter supports of a schema
    # instead of refusing one with keywords it would skip
    schema_best_effort: bool = False
    # OpenAI's deprecated function calling: refused by name (use tools)
    functions: Any = None
    function_call: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Any) -> tuple[str, ...] | None:
        if value is None:
            return None
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ValueError("must be a string or a list of strings")
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(items)}")
        if any(not s for s in items):
            raise ValueError("stop strings must not be empty")
        return tuple(items)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        for key, bias in value.items():
            if not key.isdigit() or len(key) > 9:
                raise ValueError(f"keys must be token ids (non-negative integers), got {key!r}")
            if not math.isfinite(bias) or not -100.0 <= bias <= 100.0:
                raise ValueError(f"biases must be in [-100, 100], got {bias!r} for {key}")
        return value

    def refuse_unsupported(self) -> None:
        """400 for fields whose feature is not implemented."""
        for name in ("functions", "function_call"):
            if getattr(self, name) is not None:
                raise RequestError(f"'{name}' (OpenAI's deprecated function calling) is not "
                                   "supported; use 'tools' and 'tool_choice'", param=name,
                                   code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise RequestError("'stream_options' is only allowed when 'stream' is true",
                               param="stream_options")

    def engine_options(self, n_ctx: int) -> dict[str, Any]:
        """The engine's options for this request (llama.cpp's names); what the
        request leaves out keeps the engine's defaults, as llama-server does."""
        opts: dict[str, Any] = {}
        for name in ("temperature", "min_p", "top_k", "presence_penalty",
                     "frequency_penalty", "repeat_penalty"):
            value = getattr(self, name)
            if value is not None:
                opts[name] = value
        if self.top_p is not None:
            if self.top_p == 0.0:
                opts["top_k"] = 1  # only the most likely token is left: what top_p 0 means
            else:
                opts["top_p"] = self.top_p
        if self.seed is not None and self.seed >= 0:
            opts["seed"] = self.seed
        if self.logit_bias:
            opts["logit_bias"] = {int(k): float(v) for k, v in self.logit_bias.items()}
        opts["max_tokens"] = self.max_new_tokens(n_ctx)
        if self.stop:
            opts["stop"] = self.stop
        return opts

    def max_new_tokens(self, n_ctx: int) -> int:
        # unset: until the end of the context (llama-server's n_predict -1)
        return self.max_tokens if self.max_tokens is not None else n_ctx

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def structured_options(self) -> dict[str, Any]:
        """The library's structured-output options of this request (none for plain
        text). Compiles the schemas: run it off the event loop."""
        rf = self.response_format
        form = rf.library_form(self.schema_best_effort) if rf is not None else None
        if form is None:
            return {}
        return {"response_format": form, "schema_best_effort": self.schema_best_effort}


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0, le=1 << 24)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value: Any) -> Any:
        if value in ("auto", "none", "required"):
            return value
        if (isinstance(value, dict) and value.get("type") == "function"
                and isinstance(value.get("function"), dict)
                and isinstance(value["function"].get("name"), str)):
            return {"type": "function", "function": {"name": value["function"]["name"]}}
        raise ValueError("must be 'auto', 'none', 'required' or {\"type\": \"function\", "
                         "\"function\": {\"name\": ...}}")

    @property
    def structured(self) -> bool:
        """Whether the chat goes through llama.cpp's template handlers (tools, or a
        JSON response_format), which also read tool calls and results in the messages."""
        return bool(self.tools) or (self.response_format is not None
                                    and self.response_format.type != "text")

    def structured_options(self) -> dict[str, Any]:
        opts = super().structured_options()
        if self.tools:
            for i, tool in enumerate(self.tools):
                if tool.function.parameters is not None:
                    check_schema(tool.function.parameters, f"tools[{i}].function.parameters",
                                 self.schema_best_effort)
            opts["tools"] = [tool.model_dump(exclude_none=True) for tool in self.tools]
            opts["schema_best_effort"] = self.schema_best_effort
            if self.tool_choice is not None:
                opts["tool_choice"] = self.tool_choice
            if self.parallel_tool_calls is not None:
                opts["parallel_tool_calls"] = self.parallel_tool_calls
        elif self.tool_choice not in (None, "none"):
            # as OpenAI: nothing to choose from ("none" and parallel_tool_calls are moot)
            raise RequestError("'tool_choice' is only allowed when 'tools' are given",
                               param="tool_choice")
        return opts

    def max_new_tokens(self, n_ctx: int) -> int:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return super().max_new_tokens(n_ctx)

    def logprobs_k(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("'top_logprobs' needs 'logprobs' set to true",
                               param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def engine_messages(self) -> list[dict[str, Any]]:
        """The messages for the chat template: ``{"role", "content"}`` with the content
        as text; for a structured chat also the assistant's ``tool_calls`` (content
        None when it has only calls) and the tool results' ``tool_call_id``/``name``,
        which llama.cpp's template handlers render (the library checks them)."""
        structured = self.structured
        roles = ("system", "developer", "user", "assistant", "tool")
        out: list[dict[str, Any]] = []
        for i, m in enumerate(self.messages):
            role = m.get("role")
            if role not in roles:
                hint = " ('function' is OpenAI's deprecated form of 'tool')" \
                    if role == "function" else ""
                raise RequestError(f"messages[{i}].role must be 'system', 'developer', 'user', "
                                   f"'assistant' or 'tool', got {role!r}{hint}",
                                   param=f"messages[{i}].role")
            calls = m.get("tool_calls")
            if not structured and (role == "tool" or calls):
                # the plain template path renders text turns only; llama.cpp's handlers
                # (which a request with tools goes through) render calls and results
                what = "a tool result" if role == "tool" else "tool calls"
                raise RequestError(f"messages[{i}] carries {what}: send the conversation's "
                                   "'tools' with it", param=f"messages[{i}]")
            msg: dict[str, Any] = {"role": "system" if role == "developer" else role}
            content = m.get("content")
            if content is None and role == "assistant" and calls:
                msg["content"] = None
            else:
                msg["content"] = _content_text(content, i)
            if structured:
                for key in ("tool_calls", "tool_call_id", "name"):
                    if m.get(key) is not None and (key != "name" or role == "tool"):
                        msg[key] = m[key]
            out.append(msg)
        return out


def _content_text(content: Any, i: int) -> str:
    where = f"messages[{i}].content"
    if isinstance(content, str):
        return content
    if content is None:
        raise RequestError(f"{where} is missing", param=where)
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise RequestError(f"{where}[{j}] must be an object, got {part!r}",
                                   param=f"{where}[{j}]")
            kind = part.get("type")
            if kind != "text":
                raise RequestError(f"{where}[{j}].type {kind!r} is not supported (text only)",
                                   param=f"{where}[{j}].type")
            text = part.get("text")
            if not isinstance(text, str):
                raise RequestError(f"{where}[{j}].text must be a string, got {text!r}",
                                   param=f"{where}[{j}].text")
            parts.append(text)
        return "".join(parts)
    raise RequestError(f"{where} must be a string or a list of content parts, got "
                       f"{type(content).__name__}", param=where)


class CompletionRequest(_Sampling):
    prompt: Any
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=128)
    suffix: str | None = None
    # chat only: refused by name here
    tools: Any = None
    tool_choice: Any = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> list[str | list[int]]:
        """A list of prompts, each a string or a list of token ids."""
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value:
            if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
                return [list(value)]
            prompts: list[str | list[int]] = []
            for p in value:
                if isinstance(p, str):
                    prompts.append(p)
                elif (isinstance(p, list) and p and all(
                        isinstance(t, int) and not isinstance(t, bool) for t in p)):
                    prompts.append(list(p))
                else:
                    raise ValueError("must be a string, a list of strings, a list of token "
                                     "ids or a list of lists of token ids")
            if len(prompts) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts in one request, got "
                                 f"{len(prompts)}")
            return prompts
        raise ValueError("must be a non-empty string, a list of strings, a list of token "
                         "ids or a list of lists of token ids")

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name in ("tools", "tool_choice"):
            if getattr(self, name) is not None:
                raise RequestError(f"'{name}' needs a chat: use /v1/chat/completions",
                                   param=name, code="unsupported_parameter")
        if self.suffix:
            raise RequestError("'suffix' (insertion) is not supported", param="suffix",
                               code="unsupported_parameter")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError("'best_of' other than 'n' is not supported", param="best_of",
                               code="unsupported_parameter")
        if self.echo and self.logprobs is not None:
            raise RequestError("'echo' with 'logprobs' (prompt log-probabilities) is not "
                               "supported", param="echo", code="unsupported_parameter")

    @property
    def prompts(self) -> list[str | list[int]]:
        value: list[str | list[int]] = self.prompt
        return value


class EmbeddingRequest(_Body):
    input: Any
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, value: Any) -> list[str]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise ValueError("must be a non-empty string or list of strings")
        if not all(isinstance(s, str) for s in value):
            raise ValueError("token-id input is not supported: send text (a string or a "
                             "list of strings)")
        if any(not s for s in value):
            raise ValueError("input strings must not be empty")
        if len(value) > 2048:
            raise ValueError(f"at most 2048 inputs in one request, got {len(value)}")
        return list(value)

    @property
    def texts(self) -> list[str]:
        value: list[str] = self.input
        return value


class TokenizeRequest(_Body):
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int]


def _param(loc: tuple[int | str, ...]) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or None


def parse_body(model: type[_B], body: bytes) -> _B:
    """Parse and check a JSON body; any problem is a RequestError naming the field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise _request_error(exc) from None


def _request_error(exc: ValidationError) -> RequestError:
    err = exc.errors(include_url=False)[0]
    kind = err.get("type", "")
    loc = tuple(err.get("loc", ()))
    msg = str(err.get("msg", "invalid value"))
    if kind == "json_invalid":
        return RequestError(f"the request body is not valid JSON: {msg}")
    if not loc:
        return RequestError(f"the request body must be a JSON object ({msg})")
    param = _param(loc)
    if kind == "missing":
        return RequestError(f"missing required parameter '{param}'", param=param)
    value = err.get("input")
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    msg = msg.removeprefix("Value error, ")
    return RequestError(f"invalid value for '{param}': {msg} (got {shown})", param=param)

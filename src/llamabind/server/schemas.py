"""Request bodies of the OpenAI-compatible endpoints, validated with pydantic.

Each model parses the JSON body strictly (a string is not a number, a float is not an
int) and checks every range; a failure becomes a 400 whose error object names the field
(``param``) and the value. Fields the server does not implement yet (``tools``,
``response_format``...) are declared so that a request using them is refused by name
instead of being silently ignored; other unknown fields are ignored, as OpenAI's and
llama-server's servers do.
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
    # not implemented yet: a request that uses them is refused by name
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
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
        """400 for fields whose feature is not implemented (structured output, tools)."""
        rf = self.response_format
        if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
            raise RequestError("'response_format' is not supported by this server yet "
                               "(structured output)", param="response_format",
                               code="unsupported_parameter")
        for name in ("tools", "functions", "function_call"):
            if getattr(self, name) not in (None, []):
                raise RequestError(f"'{name}' is not supported by this server yet "
                                   "(tool calling)", param=name, code="unsupported_parameter")
        if self.tool_choice not in (None, "none"):
            raise RequestError("'tool_choice' is not supported by this server yet "
                               "(tool calling)", param="tool_choice",
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


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0, le=1 << 24)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def max_new_tokens(self, n_ctx: int) -> int:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return super().max_new_tokens(n_ctx)

    def logprobs_k(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("'top_logprobs' needs 'logprobs' set to true",
                               param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def engine_messages(self) -> list[dict[str, str]]:
        """The messages as ``{"role", "content"}`` text dicts for the chat template."""
        out: list[dict[str, str]] = []
        for i, m in enumerate(self.messages):
            role = m.get("role")
            if role not in ("system", "developer", "user", "assistant"):
                if role in ("tool", "function"):
                    raise RequestError(f"messages[{i}].role {role!r} needs tool calling, which "
                                       "this server does not support yet",
                                       param=f"messages[{i}].role")
                raise RequestError(f"messages[{i}].role must be 'system', 'developer', 'user' "
                                   f"or 'assistant', got {role!r}", param=f"messages[{i}].role")
            if m.get("tool_calls"):
                raise RequestError(f"messages[{i}].tool_calls needs tool calling, which this "
                                   "server does not support yet",
                                   param=f"messages[{i}].tool_calls")
            out.append({"role": "system" if role == "developer" else role,
                        "content": _content_text(m.get("content"), i)})
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

"""What a generation gives back: its result, its events, its tokens' log-probabilities,
and the structured-output reading of its text."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from llamabind import _llama
    from llamabind.structured import GenerationPlan

__all__ = ["Event", "FinishReason", "GenerationResult", "TokenLogprob", "is_partial",
           "read_structured", "token_logprobs"]

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log-probability under the model (before sampling), and the
    ``top`` most likely tokens at that place as (token, text, logprob)."""

    token: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...]


@dataclass(frozen=True, slots=True)
class Event:
    """What one choice of a request produced since the last event: new text (stop
    strings never included, UTF-8 held back until complete), the new token ids, their
    log-probabilities when asked for, and on the choice's last event its
    finish_reason."""

    index: int
    text: str
    tokens: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: FinishReason | None


def token_logprobs(vocab: _llama.Vocab, records: list[Any] | None
                   ) -> tuple[TokenLogprob, ...] | None:
    """Generation.logprobs records (token, logprob, ((token, logprob), ...)) with the
    tokens' text."""
    if records is None:
        return None
    return tuple(TokenLogprob(t, vocab.detokenize([t]), float(lp),
                              tuple((u, vocab.detokenize([u]), float(v)) for u, v in top))
                 for t, lp, top in records)


@dataclass(frozen=True)
class GenerationResult:
    """The outcome of one generation.

    ``prompt_tokens`` is the number of prompt tokens (exactly ``len(tokenize(prompt))``);
    ``completion_tokens`` the number of tokens generated into ``text`` (``tokens`` holds
    their ids; an end-of-generation token is not counted). ``finish_reason`` is "stop"
    (end-of-generation token or stop string), "length" (max_tokens or a full context)
    or "cancelled". ``cached_prompt_tokens`` of the prompt's tokens reused KV cells of
    an earlier request instead of being computed. ``logprobs``: when asked for, each
    token's log-probability and the most likely alternatives. With speculative
    decoding, ``draft_tokens`` were drafted and ``draft_tokens_accepted`` of them
    taken (the output is the same as without drafts).
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    tokens: tuple[int, ...]
    prompt_eval_ms: float
    generation_ms: float
    cached_prompt_tokens: int = 0
    stop_sequence: str | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    queue_ms: float = 0.0
    draft_tokens: int = 0
    draft_tokens_accepted: int = 0
    # structured output (json_schema/response_format/schema, tools): the parsed value
    # (the JSON value, or the Pydantic object), and the parsed assistant message
    parsed: Any = field(default=None, compare=False)
    chat_message: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def tokens_per_second(self) -> float:
        """Generation speed (tokens after the first, over the time they took)."""
        if self.generation_ms <= 0:
            return 0.0
        return self.completion_tokens / (self.generation_ms / 1000.0)

    @property
    def prompt_tokens_per_second(self) -> float:
        evaluated = self.prompt_tokens - self.cached_prompt_tokens
        if self.prompt_eval_ms <= 0:
            return 0.0
        return evaluated / (self.prompt_eval_ms / 1000.0)

    @property
    def message(self) -> dict[str, Any]:
        """The result as an assistant chat message (with ``tool_calls`` when the model
        called tools: OpenAI-shaped, ``content`` None when there is no text)."""
        if self.chat_message is not None:
            message: dict[str, Any] = json.loads(json.dumps(self.chat_message))  # a copy
            return message
        return {"role": "assistant", "content": self.text}


def is_partial(result: GenerationResult, plan: GenerationPlan) -> bool:
    """Whether the output was cut short: by max_tokens, cancelling, or a stop string
    of the caller's (a template's own end-of-turn stop is a normal end)."""
    return result.finish_reason != "stop" or (
        result.stop_sequence is not None and result.stop_sequence not in plan.stop)


def read_structured(result: GenerationResult, plan: GenerationPlan | None) -> GenerationResult:
    """The result with its output read by the plan: ``parsed`` and, for chat plans,
    the parsed message. Output cut short (max_tokens, a caller's stop string,
    cancelled) is read as partial."""
    if plan is None:
        return result
    out = plan.parse(result.text, partial=is_partial(result, plan))
    return replace(result, parsed=out.value,
                   chat_message=out.message if plan.parser is not None else None)


# --- options -------------------------------------------------------------------------

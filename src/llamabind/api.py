"""The high-level API: load a model once, generate and stream text, chat, embed.

    model = LoadedModel.load("model.gguf", n_ctx=4096)
    result = model.generate("The capital of France is", max_tokens=16, temperature=0)
    for piece in model.stream("Once upon a time", seed=1):
        print(piece, end="")

A :class:`LoadedModel` is safe to share between threads and asyncio tasks: its
``generate``/``stream``/``chat`` (and their async forms) go through the model's batching
engine (:mod:`llamabind.engine`), which decodes every running request together in one
context. ``create_session()`` gives a context of your own instead.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, cast

from llamabind import _llama
from llamabind.chat import ChatTemplate, validate_messages
from llamabind.config import (
    ContextConfig,
    EngineConfig,
    GenerationConfig,
    ModelConfig,
    SamplingConfig,
)
from llamabind.engine import Engine, Event, Request, TokenLogprob
from llamabind.errors import (
    ChatTemplateError,
    ClosedError,
    ConcurrentUseError,
    ContextLengthExceededError,
    GenerationCancelled,
    InvalidArgumentError,
)
from llamabind.structured import STRUCTURED_OPTIONS, GenerationPlan, Planner

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["GenerationResult", "LoadedModel", "Session", "build_sampler",
           "default_model_path"]

FinishReason = Literal["stop", "length", "cancelled"]

_SAMPLING = SamplingConfig.names()
_GENERATION = GenerationConfig.names()


def default_model_path() -> str:
    """The default small model: ``$LLAMABIND_MODEL``, else the project's fetched
    SmolLM2-135M-Instruct (``models/gguf/`` of a source checkout)."""
    env = os.environ.get("LLAMABIND_MODEL")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [
        os.path.join(os.getcwd(), "models", "gguf", "SmolLM2-135M-Instruct-Q4_1.gguf"),
        os.path.join(here, "..", "..", "models", "gguf", "SmolLM2-135M-Instruct-Q4_1.gguf"),
    ]
    for c in candidates:
        if os.path.exists(c):
            return os.path.normpath(c)
    return os.path.normpath(candidates[0])


@dataclass(frozen=True)
class GenerationResult:
    """The outcome of one generation.

    ``prompt_tokens`` is the number of prompt tokens (exactly ``len(tokenize(prompt))``);
    ``completion_tokens`` the number of tokens generated into ``text`` (``tokens`` holds
    their ids; an end-of-generation token is not counted). ``finish_reason`` is "stop"
    (end-of-generation token or stop string), "length" (max_tokens or a full context)
    or "cancelled". ``cached_prompt_tokens`` of the prompt's tokens reused KV cells of
    an earlier request instead of being computed. ``logprobs``: when asked for, each
    token's log-probability and the most likely alternatives.
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


def _is_partial(result: GenerationResult, plan: GenerationPlan) -> bool:
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
    out = plan.parse(result.text, partial=_is_partial(result, plan))
    return replace(result, parsed=out.value,
                   chat_message=out.message if plan.parser is not None else None)


# --- options -------------------------------------------------------------------------

def _configs(options: dict[str, Any]) -> tuple[SamplingConfig, GenerationConfig]:
    """SamplingConfig and GenerationConfig from keyword options: their fields by name,
    and/or whole configs as ``sampling=``/``generation=``."""
    sampling = options.pop("sampling", None)
    generation = options.pop("generation", None)
    if sampling is not None and not isinstance(sampling, SamplingConfig):
        raise InvalidArgumentError(f"sampling must be a SamplingConfig, got {sampling!r}")
    if generation is not None and not isinstance(generation, GenerationConfig):
        raise InvalidArgumentError(f"generation must be a GenerationConfig, got {generation!r}")
    unknown = sorted(set(options) - _SAMPLING - _GENERATION)
    if unknown:
        raise InvalidArgumentError(
            f"unknown generation option {unknown[0]!r}; options: "
            f"{sorted(_SAMPLING | _GENERATION)}")
    s_over = {k: v for k, v in options.items() if k in _SAMPLING}
    g_over = {k: v for k, v in options.items() if k in _GENERATION}
    s = sampling or SamplingConfig()
    g = generation or GenerationConfig()
    if s_over:
        s = s.with_(**s_over)
    if g_over:
        g = g.with_(**g_over)
    return s, g


def _split_structured(options: dict[str, Any]) -> dict[str, Any]:
    """Take the structured-output options (llamabind.structured.STRUCTURED_OPTIONS:
    json_schema, response_format, schema, tools, tool_choice...) out of ``options``."""
    return {k: options.pop(k) for k in STRUCTURED_OPTIONS if k in options}


def build_sampler(model: _llama.Model, s: SamplingConfig, n_ctx: int,
                  plan: GenerationPlan | None = None) -> _llama.Sampler | None:
    """The llama.cpp sampler chain for ``s`` (and the grammar of a structured-output
    ``plan``), in llama.cpp's own order (its common_sampler): logit bias, grammar,
    penalties, DRY, top-n-sigma, top-k, typical-p, top-p, min-p, XTC, temperature, then
    the draw (or mirostat). None means plain greedy decoding (argmax in C)."""
    bias = dict(s.logit_bias)
    if s.ignore_eos and not s.greedy:
        for tok in _eog_tokens(model):
            bias[tok] = float("-inf")
    planned = plan is not None and plan.grammar is not None
    if (s.greedy and not bias and s.grammar is None and not s.has_penalties
            and s.dry_multiplier == 0.0 and not planned):
        return None
    chain = _llama.Sampler()
    try:
        if bias:
            chain.add_logit_bias(model, bias)
        if s.grammar is not None:
            chain.add_grammar(model, s.grammar)
        elif plan is not None:
            plan.add_to_sampler(chain, model)
        if s.has_penalties:
            chain.add_penalties(model.n_vocab, s.penalty_last_n, s.repeat_penalty,
                                s.frequency_penalty, s.presence_penalty, n_ctx=n_ctx)
        if s.dry_multiplier != 0.0:
            chain.add_dry(model, s.dry_multiplier, s.dry_base, s.dry_allowed_length,
                          s.dry_penalty_last_n, s.dry_sequence_breakers, n_ctx=n_ctx)
        if s.greedy:
            chain.add_greedy()
            return chain
        if s.mirostat == 1:
            chain.add_temperature(s.temperature)
            chain.add_mirostat(model.n_vocab, s.mirostat_tau, s.mirostat_eta, seed=s.seed)
            return chain
        if s.mirostat == 2:
            chain.add_temperature(s.temperature)
            chain.add_mirostat_v2(s.mirostat_tau, s.mirostat_eta, seed=s.seed)
            return chain
        if s.top_n_sigma > 0:
            chain.add_top_n_sigma(s.top_n_sigma)
        if s.top_k > 0:
            chain.add_top_k(s.top_k)
        if s.typical_p < 1.0:
            chain.add_typical(s.typical_p, s.min_keep)
        if s.top_p < 1.0:
            chain.add_top_p(s.top_p, s.min_keep)
        if s.min_p > 0.0:
            chain.add_min_p(s.min_p, s.min_keep)
        if s.xtc_probability > 0.0:
            chain.add_xtc(s.xtc_probability, s.xtc_threshold, s.min_keep, seed=s.seed)
        if s.dynatemp_range > 0.0:
            chain.add_temperature_ext(s.temperature, s.dynatemp_range, s.dynatemp_exponent)
        else:
            chain.add_temperature(s.temperature)
        chain.add_dist(s.seed)
        return chain
    except BaseException:
        chain.close()
        raise


def _eog_tokens(model: _llama.Model) -> list[int]:
    vocab = model.vocab
    return [t for t in range(model.n_vocab) if vocab.is_eog(t)]


# --- a context of your own -------------------------------------------------------------

class Session:
    """One llama.cpp context on a loaded model, for one thread at a time.

    It remembers which tokens its KV cache holds, so a prompt that starts like the
    previous one (the next turn of a chat) evaluates only the new part. Generation runs
    the same token loop as the engine (:class:`llamabind.Generation`).
    """

    def __init__(self, model: LoadedModel, config: ContextConfig | None = None) -> None:
        config = config or model.context_config
        if not isinstance(config, ContextConfig):
            raise InvalidArgumentError(f"config must be a ContextConfig, got {config!r}")
        self.model = model
        self.config = config
        self._ctx = _llama.Context(model.native, config)
        self._cached: list[int] = []
        self._lock = threading.Lock()

    # --- lifetime ----------------------------------------------------------------

    @property
    def context(self) -> _llama.Context:
        """The core :class:`llamabind.Context` (for direct use of llama.cpp)."""
        return self._ctx

    @property
    def n_ctx(self) -> int:
        """The context length: as configured (llama.cpp may allocate a little more)."""
        n = self.config.n_ctx or int(self.model.native.n_ctx_train)
        return min(n, int(self._ctx.n_ctx))

    @property
    def cached_tokens(self) -> list[int]:
        """The tokens whose KV cache this session holds (sequence 0)."""
        return list(self._cached)

    def close(self) -> None:
        self._ctx.close()
        self._cached = []

    @property
    def closed(self) -> bool:
        return bool(self._ctx.closed)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def cancel(self) -> None:
        """Stop the running generation (from any thread) within one decode step; it
        ends with finish_reason "cancelled". The session stays usable."""
        self._ctx.cancel()

    def reset(self) -> None:
        """Forget the KV cache."""
        with self._claim():
            self._ctx.memory_clear(False)
            self._cached = []

    def _claim(self) -> _Claim:
        return _Claim(self._lock)

    # --- generation --------------------------------------------------------------

    def generate(self, prompt: str, *, reuse_prefix: bool = False,
                 **options: Any) -> GenerationResult:
        """Generate a completion of ``prompt``; ``options`` are fields of
        SamplingConfig/GenerationConfig (``temperature=0``, ``max_tokens=16``...) and
        the structured-output options (``json_schema``, ``response_format``,
        ``schema``)."""
        return self._finish(self._start(*self.model._request(prompt, options, chat=False),
                                         reuse_prefix))

    def stream(self, prompt: str, *, reuse_prefix: bool = False,
               **options: Any) -> Iterator[str]:
        """Yield the completion as text pieces (stop strings never included); joined
        they equal ``generate(...)``'s text for the same seed."""
        return iter(self._start(*self.model._request(prompt, options, chat=False),
                                reuse_prefix, streaming=True))

    def chat(self, messages: Sequence[Any], **options: Any) -> GenerationResult:
        """Answer a chat with the model's own template (tools and schemas too); the KV
        cache of the common prefix with the previous call (the earlier turns) is
        reused."""
        return self._finish(self._start(*self.model._request(messages, options, chat=True),
                                         True))

    def stream_chat(self, messages: Sequence[Any], **options: Any) -> Iterator[str]:
        return iter(self._start(*self.model._request(messages, options, chat=True), True,
                                streaming=True))

    @staticmethod
    def _finish(run: _SessionRun) -> GenerationResult:
        for _ in run:
            pass
        assert run.result is not None
        return run.result

    def _start(self, prompt: list[int], s: SamplingConfig, g: GenerationConfig,
               plan: GenerationPlan | None, reuse_prefix: bool,
               streaming: bool = False) -> _SessionRun:
        n_prompt = len(prompt)
        if n_prompt == 0:
            raise InvalidArgumentError("the prompt is empty (it produced no tokens)")
        n_ctx = self.n_ctx
        if n_prompt >= n_ctx:
            raise ContextLengthExceededError(
                f"the prompt has {n_prompt} token{'' if n_prompt == 1 else 's'}; with at "
                f"least one generated token it needs {n_prompt + 1}, but the context holds "
                f"{n_ctx}", n_prompt, n_ctx)
        if self._ctx.closed:
            raise ClosedError("session is closed")
        sampler = build_sampler(self.model.native, s, n_ctx, plan)
        try:
            gen = _llama.Generation(
                self.model.native, n_prompt, sampler, max_tokens=g.max_tokens,
                stop=list(g.stop), ignore_eos=s.ignore_eos, logprobs=g.logprobs, n_ctx=n_ctx,
                preserved_tokens=plan.preserved_tokens if plan is not None else ())
        except BaseException:
            if sampler is not None:
                sampler.close()
            raise
        return _SessionRun(self, prompt, gen, sampler, reuse_prefix, streaming, plan)


class _SessionRun:
    """One generation on a Session: iterating it runs it (yielding text pieces when
    streaming); ``result`` is set at the end."""

    def __init__(self, session: Session, prompt: list[int], gen: _llama.Generation,
                 sampler: _llama.Sampler | None, reuse_prefix: bool, streaming: bool,
                 plan: GenerationPlan | None = None) -> None:
        self.plan = plan
        self.session = session
        self.prompt = prompt
        self.gen = gen
        self.sampler = sampler
        self.reuse_prefix = reuse_prefix
        self.streaming = streaming
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        session = self.session
        ctx = session._ctx
        gen = self.gen
        prompt = self.prompt
        n_prompt = len(prompt)
        kept = 0
        t0 = time.perf_counter()
        t_prompt = t_gen = 0.0
        with session._claim():
            try:
                ctx.reset_cancel()
                if self.reuse_prefix:
                    kept = _llama.common_prefix(session._cached, prompt)
                    if kept == n_prompt:
                        kept -= 1  # the last prompt token must run again for its logits
                if kept == 0:
                    # Empty the cells, not the buffers (as llama.cpp's tools do): zeroing
                    # the buffers costs milliseconds and changes nothing.
                    ctx.memory_clear(False)
                else:
                    ctx.seq_rm(0, kept, -1)
                session._cached = prompt[:kept]
                ctx.eval(prompt[kept:], pos0=kept)
                session._cached = list(prompt)
                t1 = time.perf_counter()
                t_prompt = t1 - t0
                gen.accept(ctx)
                if not self.streaming:
                    gen.run(ctx)
                else:
                    while True:
                        text = gen.take_text()
                        if text:
                            yield text
                        if gen.finished:
                            break
                        gen.step(ctx)
                t_gen = time.perf_counter() - t1
            except GenerationCancelled:
                gen.finish("cancelled")
                t_gen = time.perf_counter() - t0 - t_prompt
            finally:
                # what the KV cache holds now: the prompt and the decoded tokens
                decoded = max(0, gen.pos - n_prompt)
                if not ctx.closed and len(session._cached) == n_prompt:
                    session._cached = prompt + list(gen.tokens[:decoded])
                if self.sampler is not None:
                    self.sampler.close()
        self.result = read_structured(GenerationResult(
            text=gen.text, prompt_tokens=n_prompt, completion_tokens=gen.n_generated,
            finish_reason=cast("FinishReason", gen.finish_reason), tokens=tuple(gen.tokens),
            prompt_eval_ms=t_prompt * 1000, generation_ms=t_gen * 1000,
            cached_prompt_tokens=kept, stop_sequence=gen.stop_sequence,
            logprobs=_session_logprobs(session.model, gen.logprobs)), self.plan)


def _session_logprobs(model: LoadedModel,
                      records: list[Any] | None) -> tuple[TokenLogprob, ...] | None:
    if records is None:
        return None
    vocab = model.vocab
    return tuple(TokenLogprob(t, vocab.detokenize([t]), float(lp),
                              tuple((u, vocab.detokenize([u]), float(v)) for u, v in top))
                 for t, lp, top in records)


class _Claim:
    __slots__ = ("_lock",)

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise ConcurrentUseError(
                "this session is being used by another thread (or by an unfinished "
                "stream); use one session per thread")

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()


class _ProgressBar:
    """Model-load progress on a terminal's stderr (nothing when not a terminal)."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._last = -1

    def __call__(self, fraction: float) -> bool:
        pct = int(fraction * 100)
        if pct != self._last:
            self._last = pct
            bar = "#" * (pct // 4)
            sys.stderr.write(f"\rloading {self._label} [{bar:<25}] {pct:3d}%")
            if pct >= 100:
                sys.stderr.write("\n")
            sys.stderr.flush()
        return True


# --- the shared model ---------------------------------------------------------------------

class LoadedModel:
    """A GGUF model loaded once and shared by threads, tasks and requests.

    ``LoadedModel.load(path, n_ctx=4096, n_parallel=8, n_threads=4, ...)`` loads it (the
    GIL is released while llama.cpp reads the file); every option of ModelConfig,
    ContextConfig and EngineConfig can be passed by name. ``generate``/``stream``/
    ``chat`` and their async forms go through the model's batching engine: any number
    of threads and tasks may call them at once, and they are decoded together.
    ``create_session()`` gives a context of your own.
    """

    def __init__(self, native: _llama.Model, config: ModelConfig,
                 context_config: ContextConfig,
                 engine_config: EngineConfig | None = None) -> None:
        self.native = native
        self.config = config
        self.context_config = context_config
        self.engine_config = engine_config or EngineConfig()
        self.vocab = native.vocab
        self._engine = Engine(native, context_config, self.engine_config)
        self._embedders: dict[Any, Any] = {}   # pooling -> embed._Embedder
        self._embed_lock = threading.Lock()
        self._template: ChatTemplate | None = None
        self._planner = Planner(native)
        self._closed = False

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, *,
             config: ModelConfig | None = None, context: ContextConfig | None = None,
             engine: EngineConfig | None = None,
             progress: bool | Callable[[float], bool | None] | None = None,
             **options: Any) -> LoadedModel:
        """Load a model. ``path=None`` is the default small model. ``options``: any
        field of ModelConfig (n_gpu_layers, use_mmap...), ContextConfig (n_ctx,
        n_threads, n_batch...) or EngineConfig (n_parallel, max_queue...) by name; or
        whole configs as ``config=``/``context=``/``engine=``. ``progress=True`` draws a
        progress bar on a terminal's stderr."""
        groups: dict[type, dict[str, Any]] = {ModelConfig: {}, ContextConfig: {},
                                              EngineConfig: {}}
        for name, value in options.items():
            for owner in groups:
                if name in owner.names():  # type: ignore[attr-defined]
                    groups[owner][name] = value
                    break
            else:
                raise InvalidArgumentError(
                    f"unknown option {name!r}; options: "
                    f"{sorted(ModelConfig.names() | ContextConfig.names() | EngineConfig.names())}")
        m_opts = groups[ModelConfig]
        if config is None:
            config = ModelConfig(path=os.fspath(path) if path is not None
                                 else default_model_path(), **m_opts)
        elif path is not None or m_opts:
            raise InvalidArgumentError("pass either config= or a path and model options")
        context = _merge(ContextConfig, context, groups[ContextConfig], "context")
        engine = _merge(EngineConfig, engine, groups[EngineConfig], "engine")
        callback: Callable[[float], bool | None] | None
        if progress is True:
            callback = _ProgressBar(os.path.basename(config.path)) if sys.stderr.isatty() \
                else None
        elif progress is False or progress is None:
            callback = None
        else:
            callback = progress
        native = _llama.Model(config, progress=callback)
        return cls(native, config, context, engine)

    # --- lifetime ----------------------------------------------------------------

    def close(self) -> None:
        """Close the model: queued and running requests end with ClosedError; sessions
        still open keep the native model alive until they close."""
        self._closed = True
        self._engine.close()
        with self._embed_lock:
            embedders, self._embedders = self._embedders, {}
        for emb in embedders.values():
            emb.ctx.close()
        self.native.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LoadedModel {self.config.path!r}{' closed' if self._closed else ''}>"

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"model {self.config.path!r} is closed")

    # --- sessions ----------------------------------------------------------------

    def create_session(self, config: ContextConfig | None = None, **options: Any) -> Session:
        """A new context of your own (``options``: ContextConfig fields)."""
        self._check_open()
        if options:
            config = (config or self.context_config).with_(**options)
        return Session(self, config)

    # --- text --------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        """The context length of one request."""
        return self._engine.n_ctx

    @property
    def n_parallel(self) -> int:
        return self._engine.n_parallel

    @property
    def engine(self) -> Engine:
        return self._engine

    def stats(self) -> dict[str, Any]:
        """The engine's counters: requests queued/running/total, tokens, KV cells."""
        return self._engine.stats()

    def tokenize(self, text: str, *, add_special: bool = True,
                 parse_special: bool = False) -> list[int]:
        return list(self.vocab.tokenize(text, add_special=add_special,
                                        parse_special=parse_special))

    def detokenize(self, tokens: Sequence[int], *, remove_special: bool = False,
                   unparse_special: bool = False) -> str:
        return str(self.vocab.detokenize(tokens, remove_special=remove_special,
                                         unparse_special=unparse_special))

    def tokenize_prompt(self, prompt: str | Sequence[int], g: GenerationConfig) -> list[int]:
        """A prompt's tokens: a str is tokenized with ``g``'s add_special and
        parse_special; a sequence of token ids is checked and taken as it is."""
        if isinstance(prompt, str):
            return self.tokenize(prompt, add_special=g.add_special,
                                 parse_special=g.parse_special)
        if isinstance(prompt, (bytes, bytearray)):
            raise InvalidArgumentError(
                f"the prompt must be a str or a list of token ids, not {type(prompt).__name__}")
        n_vocab = self.native.n_vocab
        tokens = []
        for i, t in enumerate(prompt):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_vocab:
                raise InvalidArgumentError(
                    f"prompt[{i}] = {t!r} is not a valid token id (the vocabulary has "
                    f"{n_vocab} tokens)")
            tokens.append(t)
        return tokens

    # --- requests ----------------------------------------------------------------

    def _request(self, prompt: Any, options: dict[str, Any], *, chat: bool
                 ) -> tuple[list[int], SamplingConfig, GenerationConfig,
                            GenerationPlan | None]:
        """A request's prompt tokens, configs and structured-output plan. A chat with
        tools or a schema is rendered by llama.cpp's template handler (tools included);
        the plan's stop strings join the caller's."""
        options = dict(options)
        structured = _split_structured(options)
        s, g = _configs(options)
        plan = None
        if structured:
            plan = self._planner.plan(messages=prompt if chat else None, grammar=s.grammar,
                                      **structured)
        if chat and plan is not None and plan.prompt is not None:
            tokens = list(self.vocab.tokenize(plan.prompt, add_special=True,
                                              parse_special=True))
        elif chat:
            tokens = self.chat_prompt_tokens(prompt)
        else:
            tokens = self.tokenize_prompt(prompt, g)
        if plan is not None and plan.stop:
            g = g.with_(stop=g.stop + tuple(x for x in plan.stop if x not in g.stop))
        return tokens, s, g, plan

    def submit(self, prompt: str | Sequence[int], *, n: int = 1,
               queue_timeout: float | None = None, stream: bool = True,
               **options: Any) -> Request:
        """Queue a generation; returns a :class:`~llamabind.engine.Request` to iterate
        for events or wait on (see the engine's docs). ``n`` completions share the
        prompt's KV cells. Refused at once: bad options, a prompt that does not fit
        (ContextLengthExceededError), a full queue (QueueFullError, when the queue
        stays full for ``queue_timeout`` seconds; None waits)."""
        self._check_open()
        tokens, s, g, plan = self._request(prompt, options, chat=False)
        return self._engine.submit(tokens, s, g, n=n, queue_timeout=queue_timeout,
                                   stream=stream, plan=plan)

    def submit_chat(self, messages: Sequence[Any], *, n: int = 1,
                    queue_timeout: float | None = None, stream: bool = True,
                    **options: Any) -> Request:
        """``submit`` for a chat rendered with the model's own template (with
        ``tools``/``tool_choice`` or a schema, by llama.cpp's template handlers; the
        request's ``plan`` reads the output)."""
        self._check_open()
        tokens, s, g, plan = self._request(messages, options, chat=True)
        return self._engine.submit(tokens, s, g, n=n, queue_timeout=queue_timeout,
                                   stream=stream, plan=plan)

    def generate(self, prompt: str | Sequence[int], **options: Any) -> GenerationResult:
        """Generate a completion; ``options`` are SamplingConfig/GenerationConfig
        fields (``temperature=0``, ``max_tokens=16``, ``stop=[...]``...)."""
        return self.submit(prompt, stream=False, **options).result()[0]

    def stream(self, prompt: str | Sequence[int], **options: Any) -> Iterator[str]:
        """Stream a completion as text pieces (stop strings never included). Leaving
        the loop early cancels the generation."""
        return _texts(self.submit(prompt, **options))

    def chat(self, messages: Sequence[Any], **options: Any) -> GenerationResult:
        """Answer a chat; ``result.message`` is the assistant message. The KV cells of
        the earlier turns are reused when a slot or the prompt cache still has them."""
        return self.submit_chat(messages, stream=False, **options).result()[0]

    def stream_chat(self, messages: Sequence[Any], **options: Any) -> Iterator[str]:
        """Stream a chat answer as text pieces (the raw output: with tools, the
        template's tool-call markup too; ``stream_chat_deltas`` parses it)."""
        return _texts(self.submit_chat(messages, **options))

    def stream_chat_deltas(self, messages: Sequence[Any],
                           **options: Any) -> Iterator[dict[str, Any]]:
        """Stream a chat answer as OpenAI-shaped deltas: ``{"content": ...}``,
        ``{"reasoning_content": ...}``, ``{"tool_calls": [{"index", "id", "type",
        "function": {"name", "arguments"}}]}`` (a call's first delta has its id and
        name, later ones add to its arguments); the last item is ``{"finish_reason":
        "stop" | "tool_calls" | "length" | "cancelled"}``. Joined, the deltas give
        ``chat(...)``'s message for the same seed."""
        request = self.submit_chat(messages, **options)
        try:
            yield from _deltas(request, iter(request))
        finally:
            if not request.done:
                request.cancel()

    async def astream_chat_deltas(self, messages: Sequence[Any],
                                  **options: Any) -> AsyncIterator[dict[str, Any]]:
        """``stream_chat_deltas`` for asyncio."""
        request = self.submit_chat(messages, **options)
        parser = request.plan.stream_parser() if request.plan is not None else None
        try:
            async for event in request:
                for delta in _feed(parser, event.text):
                    yield delta
            result = (await request.aresult())[0]
            for delta in _end_deltas(parser, request.plan, result):
                yield delta
        finally:
            if not request.done:
                request.cancel()

    def generate_many(self, prompts: Sequence[str | Sequence[int]],
                      **options: Any) -> list[GenerationResult]:
        """Generate a completion of each prompt (decoded together); results in order.
        Bad options or a prompt that does not fit are refused before anything runs."""
        if isinstance(prompts, (str, bytes)):
            raise InvalidArgumentError("prompts must be a list of prompts, not a str")
        self._check_open()
        planned = [self._request(p, options, chat=False) for p in prompts]
        token_lists = [p[0] for p in planned]
        for i, tokens in enumerate(token_lists):
            if len(tokens) >= self.n_ctx:
                raise ContextLengthExceededError(
                    f"prompts[{i}] has {len(tokens)} tokens; the context holds {self.n_ctx}",
                    len(tokens), self.n_ctx)
        requests: list[Request] = []
        try:
            for tokens, s, g, plan in planned:
                requests.append(self._engine.submit(tokens, s, g, stream=False, plan=plan))
            return [r.result()[0] for r in requests]
        except BaseException:
            for r in requests:
                r.cancel()
            raise

    # --- asyncio -----------------------------------------------------------------

    async def agenerate(self, prompt: str | Sequence[int], **options: Any) -> GenerationResult:
        """``generate`` without blocking the event loop; cancelling the task cancels
        the generation."""
        return (await self.submit(prompt, stream=False, **options).aresult())[0]

    async def achat(self, messages: Sequence[Any], **options: Any) -> GenerationResult:
        return (await self.submit_chat(messages, stream=False, **options).aresult())[0]

    def astream(self, prompt: str | Sequence[int], **options: Any) -> AsyncIterator[str]:
        """``stream`` for asyncio: pieces arrive as they are generated."""
        return _atexts(self.submit(prompt, **options))

    def astream_chat(self, messages: Sequence[Any], **options: Any) -> AsyncIterator[str]:
        return _atexts(self.submit_chat(messages, **options))

    async def agenerate_many(self, prompts: Sequence[str | Sequence[int]],
                             **options: Any) -> list[GenerationResult]:
        import asyncio

        if isinstance(prompts, (str, bytes)):
            raise InvalidArgumentError("prompts must be a list of prompts, not a str")
        planned = [self._request(p, options, chat=False) for p in prompts]
        loop = asyncio.get_running_loop()
        requests: list[Request] = []
        try:
            for tokens, s, g, plan in planned:
                # a full queue makes submit wait: not on the event loop
                requests.append(await loop.run_in_executor(
                    None, functools.partial(self._engine.submit, tokens, s, g, stream=False,
                                            plan=plan)))
            results = [(await r.aresult())[0] for r in requests]
        except BaseException:
            for r in requests:
                r.cancel()
            raise
        return results

    # --- embeddings ----------------------------------------------------------------

    def embed(self, texts: str | Sequence[str], *, pooling: str | None = None,
              normalize: bool = True, truncate: bool = False) -> npt.NDArray[np.float32]:
        """Embeddings of ``texts`` as a NumPy (n, d) float32 array, many texts per
        decode. ``pooling``: "mean", "cls", "last" (None: the model's own, else
        "mean"); ``normalize`` scales each row to unit length; a text longer than the
        context is refused, or cut to fit with ``truncate=True``."""
        from llamabind.embed import embed_texts

        self._check_open()
        return embed_texts(self, texts, pooling=pooling, normalize=normalize,
                           truncate=truncate)

    async def aembed(self, texts: str | Sequence[str], **options: Any) -> Any:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.embed(texts, **options))

    # --- chat --------------------------------------------------------------------

    def chat_template(self) -> ChatTemplate:
        """The model's own chat template (from GGUF metadata)."""
        if self._template is None:
            source = self.native.chat_template()
            if source is None:
                raise ChatTemplateError(
                    f"model {self.config.path!r} has no chat template in its metadata; "
                    "render the prompt yourself or use "
                    "llamabind.apply_builtin_chat_template(name, messages)")
            vocab = self.vocab
            bos = vocab.token_text(vocab.bos) if vocab.bos >= 0 else ""
            eos = vocab.token_text(vocab.eos) if vocab.eos >= 0 else ""
            self._template = ChatTemplate(source, bos_token=bos, eos_token=eos)
        return self._template

    def render_chat(self, messages: Sequence[Any], *, add_generation_prompt: bool = True,
                    **extra: Any) -> str:
        """The prompt text the model's template makes of ``messages``."""
        return self.chat_template().render(messages, add_generation_prompt=add_generation_prompt,
                                           **extra)

    def chat_prompt_tokens(self, messages: Sequence[Any]) -> list[int]:
        template = self.chat_template()
        text = template.render(validate_messages(messages))
        # The template writes special tokens as text; BOS is added only when the
        # model wants one and the template did not already write it.
        add_bos = bool(self.vocab.add_bos) and not (
            template.bos_token and text.startswith(template.bos_token))
        return list(self.vocab.tokenize(text, add_special=add_bos, parse_special=True))


def _merge(cls: Any, given: Any, options: dict[str, Any], name: str) -> Any:
    if given is None:
        return cls(**options)
    if not isinstance(given, cls):
        raise InvalidArgumentError(f"{name} must be a {cls.__name__}, got {given!r}")
    return given.with_(**options) if options else given


def _feed(parser: Any, text: str) -> list[dict[str, Any]]:
    if not text:
        return []
    if parser is None:
        return [{"content": text}]
    deltas: list[dict[str, Any]] = parser.feed(text)
    return deltas


def _end_deltas(parser: Any, plan: GenerationPlan | None,
                result: GenerationResult) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if parser is not None and plan is not None:
        out += parser.finish(partial=_is_partial(result, plan))
    finish: str = result.finish_reason
    if finish == "stop" and result.message.get("tool_calls"):
        finish = "tool_calls"
    out.append({"finish_reason": finish})
    return out


def _deltas(request: Request, events: Iterator[Event]) -> Iterator[dict[str, Any]]:
    parser = request.plan.stream_parser() if request.plan is not None else None
    for event in events:
        yield from _feed(parser, event.text)
    yield from _end_deltas(parser, request.plan, request.result()[0])


def _texts(request: Request) -> Iterator[str]:
    try:
        for event in request:
            if event.text:
                yield event.text
    finally:
        if not request.done:
            request.cancel()


async def _atexts(request: Request) -> AsyncIterator[str]:
    try:
        async for event in request:
            if event.text:
                yield event.text
    finally:
        if not request.done:
            request.cancel()


__all__ += ["Event", "Request", "TokenLogprob"]

"""The high-level API: load a model once, generate and stream text, chat.

    model = LoadedModel.load("model.gguf")
    result = model.generate("The capital of France is", max_tokens=16, temperature=0)
    for piece in model.stream("Once upon a time", seed=1):
        print(piece, end="")

A :class:`LoadedModel` is safe to share between threads. Each generation runs on a
:class:`Session` (one llama.cpp context); ``LoadedModel.generate`` borrows one from a
pool, so contexts are reused (KV cache cleared) instead of recreated per request.
"""

from __future__ import annotations

import codecs
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

from llamabind import _llama
from llamabind.chat import ChatTemplate, validate_messages
from llamabind.config import ContextConfig, GenerationConfig, ModelConfig, SamplingConfig
from llamabind.errors import (
    ChatTemplateError,
    ClosedError,
    ConcurrentUseError,
    ContextLengthExceededError,
    GenerationCancelled,
    InvalidArgumentError,
)

if TYPE_CHECKING:
    import asyncio

__all__ = ["GenerationResult", "LoadedModel", "Session", "default_model_path"]

FinishReason = Literal["stop", "length", "cancelled"]

_SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingConfig))
_GENERATION_FIELDS = frozenset(f.name for f in fields(GenerationConfig))


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
    or "cancelled".
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
    def message(self) -> dict[str, str]:
        """The result as an assistant chat message."""
        return {"role": "assistant", "content": self.text}


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    sampling = {k: v for k, v in overrides.items() if k in _SAMPLING_FIELDS}
    generation = {k: v for k, v in overrides.items() if k in _GENERATION_FIELDS}
    unknown = sorted(set(overrides) - _SAMPLING_FIELDS - _GENERATION_FIELDS)
    if unknown:
        raise InvalidArgumentError(
            f"unknown generation option {unknown[0]!r}; options: "
            f"{sorted(_SAMPLING_FIELDS | _GENERATION_FIELDS)}")
    return sampling, generation


def _configs(sampling: SamplingConfig | None, generation: GenerationConfig | None,
             overrides: dict[str, Any]) -> tuple[SamplingConfig, GenerationConfig]:
    if sampling is not None and not isinstance(sampling, SamplingConfig):
        raise InvalidArgumentError(f"sampling must be a SamplingConfig, got {sampling!r}")
    if generation is not None and not isinstance(generation, GenerationConfig):
        raise InvalidArgumentError(f"generation must be a GenerationConfig, got {generation!r}")
    s_over, g_over = _split_overrides(overrides)
    s = sampling or SamplingConfig()
    g = generation or GenerationConfig()
    if s_over:
        s = s.with_(**s_over)
    if g_over:
        g = g.with_(**g_over)
    return s, g


def _configs_from(options: dict[str, Any]) -> tuple[SamplingConfig, GenerationConfig]:
    """Configs from keyword options that may include ``sampling=``/``generation=``."""
    return _configs(options.pop("sampling", None), options.pop("generation", None), options)


def build_sampler(model: _llama.Model, s: SamplingConfig) -> _llama.Sampler | None:
    """The llama.cpp sampler chain for ``s``; None means plain greedy (argmax in C)."""
    if s.greedy and not s.logit_bias and s.grammar is None and not s.has_penalties:
        return None
    chain = _llama.Sampler()
    try:
        if s.logit_bias:
            chain.add_logit_bias(model, dict(s.logit_bias))
        if s.grammar is not None:
            chain.add_grammar(model, s.grammar)
        if s.has_penalties:
            chain.add_penalties(model.n_vocab, s.penalty_last_n, s.repeat_penalty,
                                s.frequency_penalty, s.presence_penalty)
        if s.greedy:
            chain.add_greedy()
            return chain
        if s.top_k > 0:
            chain.add_top_k(s.top_k)
        if s.typical_p < 1.0:
            chain.add_typical(s.typical_p)
        if s.top_p < 1.0:
            chain.add_top_p(s.top_p)
        if s.min_p > 0.0:
            chain.add_min_p(s.min_p)
        chain.add_temperature(s.temperature)
        chain.add_dist(s.seed)
        return chain
    except BaseException:
        chain.close()
        raise


class _Run:
    """Filled in by a generation as it goes; ``result`` is set when it ends."""

    __slots__ = ("cancel_event", "result")

    def __init__(self, cancel_event: threading.Event | None = None) -> None:
        self.result: GenerationResult | None = None
        self.cancel_event = cancel_event


class Session:
    """One llama.cpp context on a loaded model, for one thread at a time.

    It remembers which tokens its KV cache holds, so a prompt that starts like the
    previous one (the next turn of a chat) evaluates only the new part.
    """

    def __init__(self, model: LoadedModel, config: ContextConfig | None = None) -> None:
        config = config or model.context_config
        if not isinstance(config, ContextConfig):
            raise InvalidArgumentError(f"config must be a ContextConfig, got {config!r}")
        self.model = model
        self.config = config
        self._ctx = _llama.Context(
            model.native, n_ctx=config.context_length, n_batch=config.batch_size,
            n_ubatch=config.ubatch_size, n_threads=config.threads,
            n_threads_batch=config.threads_batch, flash_attn=config.flash_attention,
            type_k=config.kv_cache_type, type_v=config.kv_cache_type,
            embeddings=config.embeddings)
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
        return min(self.config.context_length, int(self._ctx.n_ctx))

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

    def tokenize_prompt(self, prompt: str, generation: GenerationConfig) -> list[int]:
        return list(self.model.vocab.tokenize(prompt, add_special=generation.add_bos,
                                              parse_special=generation.parse_special))

    def generate(self, prompt: str, *, sampling: SamplingConfig | None = None,
                 generation: GenerationConfig | None = None, reuse_prefix: bool = False,
                 **options: Any) -> GenerationResult:
        """Generate a completion of ``prompt``; ``options`` are fields of
        SamplingConfig/GenerationConfig (``temperature=0``, ``max_tokens=16``...)."""
        s, g = _configs(sampling, generation, options)
        run = _Run()
        return self._run_to_end(self.tokenize_prompt(prompt, g), s, g, reuse_prefix, run)

    def stream(self, prompt: str, *, sampling: SamplingConfig | None = None,
               generation: GenerationConfig | None = None, reuse_prefix: bool = False,
               **options: Any) -> Iterator[str]:
        """Yield the completion as text pieces (each valid UTF-8 text, stop strings
        never included); joined they equal ``generate(...)``'s text for the same seed."""
        s, g = _configs(sampling, generation, options)
        tokens = self.tokenize_prompt(prompt, g)
        return self._stream_tokens(tokens, s, g, reuse_prefix, _Run())

    def chat(self, messages: Sequence[Any], *, sampling: SamplingConfig | None = None,
             generation: GenerationConfig | None = None, **options: Any) -> GenerationResult:
        """Answer a chat with the model's own template; the KV cache of the common
        prefix with the previous call (the earlier turns) is reused."""
        s, g = _configs(sampling, generation, options)
        run = _Run()
        return self._run_to_end(self.model.chat_prompt_tokens(messages), s, g, True, run)

    def stream_chat(self, messages: Sequence[Any], *, sampling: SamplingConfig | None = None,
                    generation: GenerationConfig | None = None,
                    **options: Any) -> Iterator[str]:
        s, g = _configs(sampling, generation, options)
        tokens = self.model.chat_prompt_tokens(messages)
        return self._stream_tokens(tokens, s, g, True, _Run())

    def _run_to_end(self, prompt: list[int], s: SamplingConfig, g: GenerationConfig,
                    reuse_prefix: bool, run: _Run) -> GenerationResult:
        for _ in self._stream_tokens(prompt, s, g, reuse_prefix, run, streaming=False):
            pass
        assert run.result is not None
        return run.result

    def _stream_tokens(self, prompt: list[int], s: SamplingConfig, g: GenerationConfig,
                       reuse_prefix: bool, run: _Run, streaming: bool = True) -> Iterator[str]:
        """Validate now, then return the generator that does the work (with
        ``streaming=False`` it yields nothing and leaves the result in ``run``)."""
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
        sampler = build_sampler(self.model.native, s)
        return self._generate(prompt, sampler, g, reuse_prefix, run, streaming)

    def _generate(self, prompt: list[int], sampler: _llama.Sampler | None,
                  g: GenerationConfig, reuse_prefix: bool, run: _Run,
                  streaming: bool) -> Iterator[str]:
        ctx = self._ctx
        n_prompt = len(prompt)
        completion: list[int] = []
        pieces: list[str] = []
        finish: FinishReason = "length"
        stop_hit: str | None = None
        matcher = _llama.StopMatcher(g.stop)
        t_gen = t_prompt = 0.0
        kept = 0
        gen: _llama.TokenGenerator | None = None
        with self._claim():
            try:
                ctx.reset_cancel()
                if run.cancel_event is not None and run.cancel_event.is_set():
                    raise GenerationCancelled("cancelled before start")
                t0 = time.perf_counter()
                if reuse_prefix:
                    kept = _common_prefix(self._cached, prompt)
                    if kept == n_prompt:
                        kept -= 1  # the last prompt token must run again for its logits
                if kept == 0:
                    # Empty the cells, not the buffers (as llama.cpp's tools do): zeroing
                    # the buffers costs milliseconds (47 MB for SmolLM2 at n_ctx 2048) and
                    # changes nothing, as empty cells are masked out.
                    ctx.memory_clear(False)
                else:
                    ctx.seq_rm(0, kept, -1)
                self._cached = prompt[:kept]
                ctx.eval(prompt[kept:], pos0=kept)
                self._cached = list(prompt)
                t1 = time.perf_counter()
                t_prompt = t1 - t0
                room = self.n_ctx - n_prompt
                gen = _llama.TokenGenerator(ctx, n_prompt, sampler,
                                            max_tokens=min(g.max_tokens, room))
                if not streaming and matcher.byte_stops is not None:
                    # The whole loop in C; the text is decoded once at the end. The
                    # same text, tokens and stop as TextStream's token-by-token text
                    # below: a stop string (with no U+FFFD in it) occurs in the decoded
                    # text exactly when its UTF-8 bytes occur in the generated bytes.
                    decoder = codecs.getincrementaldecoder("utf-8")("replace")
                    data = bytearray()
                    try:
                        gen.run(completion, data, matcher.byte_stops)
                    finally:
                        out, stop_hit = matcher.feed(decoder.decode(bytes(data)))
                        if out:
                            pieces.append(out)
                    if stop_hit is not None:
                        finish = "stop"
                    else:
                        finish = "stop" if gen.finish_reason == "stop" else "length"
                        out = matcher.feed(decoder.decode(b"", final=True))[0] + matcher.flush()
                        if out:
                            pieces.append(out)
                else:
                    texts = _llama.TextStream(gen, completion, matcher)
                    for out in texts:
                        pieces.append(out)
                        yield out
                    stop_hit = texts.stop_hit
                    finish = ("stop" if stop_hit is not None or gen.finish_reason == "stop"
                              else "length")
                t_gen = time.perf_counter() - t1
            except GenerationCancelled:
                finish = "cancelled"
                t_gen = time.perf_counter() - t0 - t_prompt
            finally:
                # What the KV cache holds now: the prompt, and every generated token
                # except the last (decoded only when the next one is asked for).
                in_cache = ctx.seq_pos_max(0) + 1 if not ctx.closed else 0
                self._cached = (prompt + completion)[:in_cache]
                if sampler is not None:
                    sampler.close()
        run.result = GenerationResult(
            text="".join(pieces), prompt_tokens=n_prompt, completion_tokens=len(completion),
            finish_reason=finish, tokens=tuple(completion), prompt_eval_ms=t_prompt * 1000,
            generation_ms=t_gen * 1000, cached_prompt_tokens=kept, stop_sequence=stop_hit)


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


def _has_gpu() -> bool:
    return any(d["type"] in ("gpu", "igpu") for d in _llama.devices())


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


class LoadedModel:
    """A GGUF model loaded once and shared: by threads, sessions and requests.

    ``LoadedModel.load(path, n_gpu_layers=..., n_ctx=2048)`` loads it (the GIL is
    released while llama.cpp reads the file). ``generate``/``stream``/``chat`` borrow
    a pooled :class:`Session` (context) per call, so any number of threads can call
    them at once; ``create_session()`` gives a session of your own.
    """

    def __init__(self, native: _llama.Model, config: ModelConfig,
                 context_config: ContextConfig) -> None:
        self.native = native
        self.config = config
        self.context_config = context_config
        self.vocab = native.vocab
        self._pool: list[Session] = []
        self._pool_lock = threading.Lock()
        self._max_idle = max(2, os.cpu_count() or 2)
        self._template: ChatTemplate | None = None
        self._closed = False

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, *,
             n_gpu_layers: int | None = None, n_ctx: int = 2048,
             config: ModelConfig | None = None, context: ContextConfig | None = None,
             progress: bool | Callable[[float], bool | None] | None = None,
             **model_options: Any) -> LoadedModel:
        """Load a model. ``path=None`` is the default small model. ``n_ctx`` is the
        default context length of sessions (``context`` gives every context setting);
        ``model_options`` are other ModelConfig fields (use_mmap, main_gpu, ...).
        ``progress=True`` draws a progress bar on a terminal's stderr."""
        if config is None:
            config = ModelConfig(path=os.fspath(path) if path is not None
                                 else default_model_path(),
                                 n_gpu_layers=n_gpu_layers, **model_options)
        elif path is not None or n_gpu_layers is not None or model_options:
            raise InvalidArgumentError("pass either config= or path/n_gpu_layers/options")
        if context is None:
            context = ContextConfig(context_length=n_ctx)
        elif n_ctx != 2048 and n_ctx != context.context_length:
            raise InvalidArgumentError("pass either context= or n_ctx")
        if not isinstance(context, ContextConfig):
            raise InvalidArgumentError(f"context must be a ContextConfig, got {context!r}")
        layers = config.n_gpu_layers
        if layers is None:
            # RPC workers' devices count as GPUs (ggml gives them that type)
            layers = -1 if config.rpc_servers or _has_gpu() else 0
        callback: Callable[[float], bool | None] | None
        if progress is True:
            callback = _ProgressBar(os.path.basename(config.path)) if sys.stderr.isatty() \
                else None
        elif progress is False or progress is None:
            callback = None
        else:
            callback = progress
        native = _llama.Model(
            config.path, n_gpu_layers=layers, main_gpu=config.main_gpu,
            split_mode=config.split_mode, tensor_split=config.tensor_split,
            use_mmap=config.use_mmap, use_mlock=config.use_mlock,
            vocab_only=config.vocab_only, progress=callback,
            rpc_servers=config.rpc_servers or None)
        return cls(native, config, context)

    # --- lifetime ----------------------------------------------------------------

    def close(self) -> None:
        """Close the model: idle sessions are freed now; sessions in use finish their
        work and free the model when they are done."""
        with self._pool_lock:
            # set under the lock: _release() checks it under the same lock
            self._closed = True
            idle, self._pool = self._pool, []
        for session in idle:
            session.close()
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

    # --- sessions ----------------------------------------------------------------

    def create_session(self, config: ContextConfig | None = None, **options: Any) -> Session:
        """A new context of your own (``options``: ContextConfig fields)."""
        if self._closed:
            raise ClosedError(f"model {self.config.path!r} is closed")
        if options:
            config = (config or self.context_config).with_(**options)
        return Session(self, config)

    create_context = create_session

    def _acquire(self, prefer: Sequence[int] | None = None) -> Session:
        if self._closed:
            raise ClosedError(f"model {self.config.path!r} is closed")
        with self._pool_lock:
            if self._pool:
                index = len(self._pool) - 1
                if prefer:
                    best = -1
                    for i, sess in enumerate(self._pool):
                        n = _common_prefix(sess._cached, prefer)
                        if n > best:
                            best, index = n, i
                return self._pool.pop(index)
        return Session(self)

    def _acquire_for(self, prompt: str, g: GenerationConfig) -> tuple[Session, list[int]]:
        """A pooled session and the prompt's tokens (the session goes back on failure)."""
        session = self._acquire()
        try:
            return session, session.tokenize_prompt(prompt, g)
        except BaseException:
            self._release(session)
            raise

    def _release(self, session: Session) -> None:
        if not session.closed:
            with self._pool_lock:
                # _closed is checked under the lock: a close() running at the same time
                # must not miss a session put back after it emptied the pool
                if not self._closed and len(self._pool) < self._max_idle:
                    self._pool.append(session)
                    return
        session.close()

    # --- text --------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self.context_config.context_length

    def tokenize(self, text: str, *, add_bos: bool = True,
                 parse_special: bool = False) -> list[int]:
        return list(self.vocab.tokenize(text, add_special=add_bos,
                                        parse_special=parse_special))

    def detokenize(self, tokens: Sequence[int], *, remove_special: bool = False,
                   unparse_special: bool = False) -> str:
        return str(self.vocab.detokenize(tokens, remove_special=remove_special,
                                         unparse_special=unparse_special))

    def generate(self, prompt: str, *, sampling: SamplingConfig | None = None,
                 generation: GenerationConfig | None = None,
                 **options: Any) -> GenerationResult:
        """Generate a completion (see :meth:`Session.generate`) on a pooled context."""
        session = self._acquire()
        try:
            return session.generate(prompt, sampling=sampling, generation=generation,
                                    **options)
        finally:
            self._release(session)

    def stream(self, prompt: str, *, sampling: SamplingConfig | None = None,
               generation: GenerationConfig | None = None, **options: Any) -> Iterator[str]:
        """Stream a completion as text pieces (see :meth:`Session.stream`)."""
        session = self._acquire()
        try:
            inner = session.stream(prompt, sampling=sampling, generation=generation,
                                   **options)
        except BaseException:
            self._release(session)
            raise
        return self._pooled(session, inner)

    def _pooled(self, session: Session, inner: Iterator[str]) -> Iterator[str]:
        try:
            yield from inner
        finally:
            self._release(session)

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

    def chat(self, messages: Sequence[Any], *, sampling: SamplingConfig | None = None,
             generation: GenerationConfig | None = None, **options: Any) -> GenerationResult:
        """Answer a chat; ``result.message`` is the assistant message. A pooled session
        holding the earlier turns is preferred, so their KV cache is reused."""
        tokens = self.chat_prompt_tokens(messages)
        session = self._acquire(prefer=tokens)
        try:
            s, g = _configs(sampling, generation, options)
            return session._run_to_end(tokens, s, g, True, _Run())
        finally:
            self._release(session)

    def stream_chat(self, messages: Sequence[Any], *, sampling: SamplingConfig | None = None,
                    generation: GenerationConfig | None = None,
                    **options: Any) -> Iterator[str]:
        tokens = self.chat_prompt_tokens(messages)
        session = self._acquire(prefer=tokens)
        try:
            s, g = _configs(sampling, generation, options)
            inner = session._stream_tokens(tokens, s, g, True, _Run())
        except BaseException:
            self._release(session)
            raise
        return self._pooled(session, inner)

    # --- asyncio -----------------------------------------------------------------

    async def agenerate(self, prompt: str, **options: Any) -> GenerationResult:
        """``generate`` in a worker thread; the event loop keeps running, and
        cancelling the task stops the generation."""
        s, g = _configs_from(options)
        session, tokens = self._acquire_for(prompt, g)
        return await self._arun(session, tokens, s, g, False)

    async def achat(self, messages: Sequence[Any], **options: Any) -> GenerationResult:
        s, g = _configs_from(options)
        tokens = self.chat_prompt_tokens(messages)
        session = self._acquire(prefer=tokens)
        return await self._arun(session, tokens, s, g, True)

    async def _arun(self, session: Session, tokens: list[int], s: SamplingConfig,
                    g: GenerationConfig, reuse: bool) -> GenerationResult:
        import asyncio

        run = _Run(threading.Event())

        def work() -> GenerationResult:
            try:
                return session._run_to_end(tokens, s, g, reuse, run)
            finally:
                self._release(session)

        future = asyncio.get_running_loop().run_in_executor(None, work)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            assert run.cancel_event is not None
            run.cancel_event.set()
            session.cancel()
            raise

    async def astream(self, prompt: str, **options: Any) -> AsyncIterator[str]:
        """``stream`` without blocking the event loop; pieces arrive as generated."""
        s, g = _configs_from(options)
        session, tokens = self._acquire_for(prompt, g)
        async for piece in self._astream_run(session, tokens, s, g, False):
            yield piece

    async def astream_chat(self, messages: Sequence[Any], **options: Any) -> AsyncIterator[str]:
        s, g = _configs_from(options)
        tokens = self.chat_prompt_tokens(messages)
        session = self._acquire(prefer=tokens)
        async for piece in self._astream_run(session, tokens, s, g, True):
            yield piece

    async def _astream_run(self, session: Session, tokens: list[int], s: SamplingConfig,
                           g: GenerationConfig, reuse: bool) -> AsyncIterator[str]:
        import asyncio

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        run = _Run(threading.Event())

        def put(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        def work() -> None:
            try:
                for piece in session._stream_tokens(tokens, s, g, reuse, run):
                    put("piece", piece)
                put("done", None)
            except BaseException as exc:
                put("error", exc)
            finally:
                self._release(session)

        future = loop.run_in_executor(None, work)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "piece":
                    yield value
                elif kind == "done":
                    break
                else:
                    raise value
        finally:
            if not future.done():
                assert run.cancel_event is not None
                run.cancel_event.set()
                session.cancel()

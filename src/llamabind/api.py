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

import contextlib
import functools
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from llamabind import _llama
from llamabind.chat import ChatTemplate, validate_messages
from llamabind.config import (
    LOAD_CONFIGS,
    SPECULATIVE_OPTIONS,
    ContextConfig,
    EngineConfig,
    GenerationConfig,
    ModelConfig,
    SamplingConfig,
    route_options,
)
from llamabind.engine import Engine
from llamabind.errors import (
    ChatTemplateError,
    ClosedError,
    ContextLengthExceededError,
    InvalidArgumentError,
)
from llamabind.requests import Request
from llamabind.results import Event, GenerationResult, TokenLogprob, is_partial
from llamabind.sampling import build_sampler, configs_from, split_structured
from llamabind.session import Session
from llamabind.structured import GenerationPlan, Planner

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["Event", "GenerationResult", "LoadedModel", "Request", "Session", "TokenLogprob",
           "build_sampler", "default_model_path"]



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


# --- a context of your own -------------------------------------------------------------

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
                 engine_config: EngineConfig | None = None, *,
                 draft: _llama.Model | None = None, owns_draft: bool = False,
                 speculative: dict[str, Any] | None = None) -> None:
        self.native = native
        self.config = config
        self.context_config = context_config
        self.engine_config = engine_config or EngineConfig()
        self.vocab = native.vocab
        # speculative decoding: the draft model (checked against this vocabulary), and
        # the speculative options every request gets unless it gives its own
        self.draft_model = draft
        self._owns_draft = owns_draft
        self._speculative = dict(speculative or {})
        self._engine = Engine(native, context_config, self.engine_config, draft=draft)
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
             draft: LoadedModel | str | os.PathLike[str] | None = None,
             **options: Any) -> LoadedModel:
        """Load a model. ``path=None`` is the default small model. ``options``: any
        field of ModelConfig (n_gpu_layers, use_mmap...), ContextConfig (n_ctx,
        n_threads, n_batch...) or EngineConfig (n_parallel, max_queue...) by name; or
        whole configs as ``config=``/``context=``/``engine=``. ``progress=True`` draws a
        progress bar on a terminal's stderr.

        Speculative decoding: ``draft`` is a draft model (a LoadedModel, or a path loaded
        with this model's n_gpu_layers and devices) whose vocabulary must match this
        one's (InvalidArgumentError if not); with it, requests use
        ``spec_type="draft-simple"`` unless they say otherwise. The speculative options
        (spec_type, draft_max, draft_min, draft_p_min, spec_ngram_size_n,
        spec_ngram_size_min) given here are the defaults of every request."""
        groups, given = route_options(options, LOAD_CONFIGS, apart=SPECULATIVE_OPTIONS)
        # the speculative options by their rules, between them too (draft_min <= draft_max)
        checked = GenerationConfig(**given)
        speculative = {name: getattr(checked, name) for name in given}
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
        draft_native, owns_draft = _draft_model(draft, config)
        try:
            native = _llama.Model(config, progress=callback)
        except BaseException:
            if owns_draft and draft_native is not None:
                draft_native.close()
            raise
        if draft_native is not None:
            try:
                _llama.check_draft_vocab(native, draft_native)
            except BaseException:
                native.close()
                if owns_draft:
                    draft_native.close()
                raise
            speculative.setdefault("spec_type", "draft-simple")
        elif speculative.get("spec_type") == "draft-simple":
            native.close()
            raise InvalidArgumentError(
                "spec_type='draft-simple' needs a draft model: load(path, draft=...)")
        return cls(native, config, context, engine, draft=draft_native,
                   owns_draft=owns_draft, speculative=speculative)

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
        if self._owns_draft and self.draft_model is not None:
            self.draft_model.close()

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

    def arriving(self) -> contextlib.AbstractContextManager[None]:
        """For front ends (an HTTP server): hold this while a request is read and
        submitted. An idle engine waits for announced requests (at most 30 ms) before
        its first step, so requests that arrive together are prefilled together."""
        return self._engine.arriving()

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
        if self._speculative and "generation" not in options:
            for name, value in self._speculative.items():
                options.setdefault(name, value)
        structured = split_structured(options)
        s, g = configs_from(options)
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


def _draft_model(draft: Any, config: ModelConfig) -> tuple[_llama.Model | None, bool]:
    """The native draft model of ``load(draft=...)`` and whether the LoadedModel owns
    it (it was loaded from a path)."""
    if draft is None:
        return None, False
    if isinstance(draft, LoadedModel):
        draft._check_open()
        return draft.native, False
    if isinstance(draft, (str, os.PathLike)):
        return _llama.Model(ModelConfig(path=os.fspath(draft), n_gpu_layers=config.n_gpu_layers,
                                        devices=config.devices)), True
    raise InvalidArgumentError(
        f"draft must be a LoadedModel or the path of a GGUF file, got {draft!r}")


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
        out += parser.finish(partial=is_partial(result, plan))
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


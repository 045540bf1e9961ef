"""TEMPORARY stand-in for the batching engine (issue 12): never merged into main.

The server is written against the engine's request-level API (tools/ENGINE_API.md:
``model.submit``/``submit_chat`` returning a request that yields events, ``req.cancel()``,
``QueueFullError``, ``model.stats()``, ``model.embed``, ``model.tokenize``/``detokenize``).
Until the engine lands on main, this module gives that surface on the current
``LoadedModel``, well enough for the server's tests:

* ``n_parallel`` slots, each a worker thread with a llama.cpp context of its own (no
  shared KV cache, no batched decoding: the real engine decodes every sequence in one
  batch, and its ``n`` choices share the prompt's KV cells; here each choice evaluates
  the prompt again);
* a bounded wait queue (``max_queue``): ``submit(queue_timeout=0)`` raises
  ``QueueFullError`` when it is full;
* events per token: text (UTF-8 and stop strings held back as ``stream()`` does),
  token ids, log-probabilities with the top alternatives (from the raw logits), the
  finish reason; the token loop is llamabind's own ``TokenGenerator``, so greedy output
  equals ``LoadedModel.generate``;
* ``cancel()``: the running choices stop at their next decode (``Context.cancel``),
  queued ones never start; KV cells are freed when a choice ends;
* ``stats()`` with the engine's keys (KV cells counted as the positions the running
  choices hold); ``embed`` on a context of its own (mean pooling when the model
  has none).
"""

from __future__ import annotations

import asyncio
import codecs
import itertools
import math
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np

from llamabind import _llama
from llamabind.api import LoadedModel, build_sampler
from llamabind.config import GenerationConfig, SamplingConfig
from llamabind.errors import (
    ClosedError,
    ContextLengthExceededError,
    GenerationCancelled,
    InvalidArgumentError,
    QueueFullError,
)

__all__ = ["Event", "ShimEngine", "ShimRequest", "TokenLogprob"]


class TokenLogprob(NamedTuple):
    token: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...]


@dataclass(frozen=True)
class Event:
    index: int
    text: str
    tokens: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None


_SAMPLING = {"temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty",
             "frequency_penalty", "presence_penalty", "penalty_last_n", "seed", "logit_bias",
             "grammar"}
_GENERATION = {"max_tokens", "stop", "add_special", "parse_special"}
_ids = itertools.count(1)
Pooling = Literal["none", "mean", "cls", "last", "rank"]


class ShimRequest:
    """One submitted request: its choices' events, in the order they were made."""

    def __init__(self, engine: ShimEngine, prompt: list[int], n: int,
                 logprobs: int | None, sampling: SamplingConfig,
                 generation: GenerationConfig) -> None:
        self.id = f"req-{next(_ids)}"
        self.prompt_tokens = len(prompt)
        self.n = n
        self._engine = engine
        self._prompt = prompt
        self._logprobs = logprobs
        self._sampling = sampling
        self._generation = generation
        self._events: list[Event] = []
        self._finished = 0
        self._error: BaseException | None = None
        self._cancelled = False
        self._started = False
        self._ended = 0
        self._contexts: dict[int, _llama.Context] = {}
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # --- control -------------------------------------------------------------------

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            running = list(self._contexts.values())
        for ctx in running:
            ctx.cancel()

    @property
    def done(self) -> bool:
        return self._finished == self.n or self._error is not None

    # --- worker side ---------------------------------------------------------------

    def _push(self, event: Event) -> None:
        with self._cond:
            self._events.append(event)
            if event.finish_reason is not None:
                self._finished += 1
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, flag in waiters:
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # that loop is closed
                pass

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc
        self._push(Event(-1, "", (), None, None))  # wakes the readers; never yielded

    # --- reading -------------------------------------------------------------------

    def __iter__(self) -> Iterator[Event]:
        i = 0
        while True:
            with self._cond:
                while i >= len(self._events) and not self.done:
                    self._cond.wait()
                batch = self._events[i:]
                i = len(self._events)
                done = self.done
                error = self._error
            for ev in batch:
                if ev.index >= 0:
                    yield ev
            if done and i >= len(self._events):
                if error is not None:
                    raise error
                return

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        flag = asyncio.Event()
        entry = (loop, flag)
        with self._cond:
            self._waiters.append(entry)
        try:
            i = 0
            while True:
                with self._cond:
                    batch = self._events[i:]
                    i = len(self._events)
                    done = self.done
                    error = self._error
                    if not batch and not done:
                        flag.clear()
                for ev in batch:
                    if ev.index >= 0:
                        yield ev
                if done and i >= len(self._events):
                    if error is not None:
                        raise error
                    return
                if not batch:
                    await flag.wait()
        finally:
            with self._cond:
                self._waiters.remove(entry)


class _Slot(threading.local):
    ctx: _llama.Context | None = None


class ShimEngine:
    """The engine's request-level surface over a LoadedModel (see the module doc)."""

    def __init__(self, model: LoadedModel, *, n_parallel: int = 4, max_queue: int = 64,
                 n_threads: int | None = None) -> None:
        if n_parallel < 1 or max_queue < 0:
            raise InvalidArgumentError(f"n_parallel {n_parallel}, max_queue {max_queue}")
        self.model = model
        self.n_parallel = n_parallel
        self.max_queue = max_queue
        self.n_ctx = model.n_ctx
        self._n_threads = n_threads or model.context_config.threads or 1
        self._pool = ThreadPoolExecutor(max_workers=n_parallel,
                                        thread_name_prefix="llamabind-shim")
        self._slot = _Slot()
        self._contexts: list[_llama.Context] = []
        self._lock = threading.Condition()
        self._queued = 0      # requests none of whose choices has started
        self._running = 0     # requests with a choice started and not all ended
        self._active = 0      # choices submitted and not ended
        self._positions: dict[tuple[str, int], int] = {}
        self._live: set[ShimRequest] = set()
        self._totals = {"requests_total": 0, "prompt_tokens_total": 0,
                        "completion_tokens_total": 0}
        self._embed_ctx: _llama.Context | None = None
        self._embed_lock = threading.Lock()
        self._closed = False

    @classmethod
    def load(cls, path: str | None = None, *, n_ctx: int = 2048, n_parallel: int = 4,
             n_threads: int | None = None, n_gpu_layers: int | None = None,
             max_queue: int = 64) -> ShimEngine:
        model = LoadedModel.load(path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers)
        return cls(model, n_parallel=n_parallel, max_queue=max_queue, n_threads=n_threads)

    @property
    def config(self) -> Any:
        return self.model.config

    # --- text ----------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True,
                 parse_special: bool = False) -> list[int]:
        return self.model.tokenize(text, add_bos=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.model.detokenize(tokens)

    def render_chat(self, messages: Sequence[Any], add_generation_prompt: bool = True) -> str:
        return self.model.render_chat(messages, add_generation_prompt=add_generation_prompt)

    # --- requests ------------------------------------------------------------------

    def submit(self, prompt: str | Sequence[int], *, n: int = 1, logprobs: int | None = None,
               queue_timeout: float | None = None, **options: Any) -> ShimRequest:
        s, g = self._configs(options)
        if isinstance(prompt, str):
            tokens = self.tokenize(prompt, add_special=options.get("add_special", True),
                                   parse_special=options.get("parse_special", False))
        else:
            tokens = [int(t) for t in prompt]
            n_vocab = self.model.native.n_vocab
            for t in tokens:
                if not 0 <= t < n_vocab:
                    raise InvalidArgumentError(f"token id {t} is outside [0, {n_vocab})")
        return self._submit(tokens, n, logprobs, queue_timeout, s, g)

    def submit_chat(self, messages: Sequence[Any], *, n: int = 1, logprobs: int | None = None,
                    queue_timeout: float | None = None, **options: Any) -> ShimRequest:
        s, g = self._configs(options)
        tokens = self.model.chat_prompt_tokens(messages)
        return self._submit(tokens, n, logprobs, queue_timeout, s, g)

    def _configs(self, options: dict[str, Any]) -> tuple[SamplingConfig, GenerationConfig]:
        unknown = set(options) - _SAMPLING - _GENERATION
        if unknown:
            raise InvalidArgumentError(f"unknown generation option {sorted(unknown)[0]!r}")
        s = SamplingConfig(**{k: v for k, v in options.items() if k in _SAMPLING})
        g_opts = {k: v for k, v in options.items() if k in _GENERATION}
        if "add_special" in g_opts:
            g_opts["add_bos"] = g_opts.pop("add_special")
        return s, GenerationConfig(**g_opts)

    def _submit(self, tokens: list[int], n: int, logprobs: int | None,
                queue_timeout: float | None, s: SamplingConfig,
                g: GenerationConfig) -> ShimRequest:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.n_parallel:
            raise InvalidArgumentError(f"n must be an int in [1, {self.n_parallel}], got {n!r}")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= 20):
            raise InvalidArgumentError(f"logprobs must be None or an int in [0, 20], "
                                       f"got {logprobs!r}")
        if not tokens:
            raise InvalidArgumentError("the prompt is empty (it produced no tokens)")
        if len(tokens) + 1 > self.n_ctx:
            raise ContextLengthExceededError(
                f"the prompt has {len(tokens)} tokens; with at least one generated token "
                f"it needs {len(tokens) + 1}, but the context holds {self.n_ctx}",
                len(tokens), self.n_ctx)
        req = ShimRequest(self, tokens, n, logprobs, s, g)
        with self._lock:
            if self._closed:
                raise ClosedError("the model is closed")
            if (self._active + n > self.n_parallel and self._queued >= self.max_queue):
                if queue_timeout == 0 or not self._lock.wait_for(
                        lambda: self._queued < self.max_queue or self._closed,
                        timeout=queue_timeout):
                    raise QueueFullError(
                        f"the request queue is full ({self._queued} waiting, limit "
                        f"{self.max_queue})", self._queued, self.max_queue)
                if self._closed:
                    raise ClosedError("the model is closed")
            self._queued += 1
            self._active += n
            self._live.add(req)
            self._totals["requests_total"] += 1
            self._totals["prompt_tokens_total"] += len(tokens)
        for i in range(n):
            self._pool.submit(self._run_choice, req, i)
        return req

    def _context(self) -> _llama.Context:
        if self._slot.ctx is None:
            ctx = _llama.Context(self.model.native, n_ctx=self.n_ctx,
                                 n_batch=self.model.context_config.batch_size,
                                 n_threads=self._n_threads)
            self._slot.ctx = ctx
            with self._lock:
                self._contexts.append(ctx)
        return self._slot.ctx

    def _run_choice(self, req: ShimRequest, index: int) -> None:
        key = (req.id, index)
        with self._lock:
            if not req._started:
                req._started = True
                self._queued -= 1
                self._running += 1
                self._lock.notify_all()
        try:
            ctx = self._context()
            ctx.reset_cancel()
            with req._cond:
                cancelled = req._cancelled or self._closed
                if not cancelled:
                    req._contexts[index] = ctx
            if cancelled:
                req._push(Event(index, "", (), None, "cancelled"))
                return
            self._generate(req, index, ctx, key)
        except GenerationCancelled:
            req._push(Event(index, "", (), None, "cancelled"))
        except BaseException as exc:
            req._fail(exc)
            req.cancel()
        finally:
            with req._cond:
                req._contexts.pop(index, None)
            try:
                slot_ctx = self._slot.ctx
                if slot_ctx is not None and not slot_ctx.closed:
                    slot_ctx.memory_clear(False)
            finally:
                with self._lock:
                    self._positions.pop(key, None)
                    self._active -= 1
                    req._ended += 1
                    if req._ended == req.n:
                        self._running -= 1
                        self._live.discard(req)
                        self._lock.notify_all()

    def _generate(self, req: ShimRequest, index: int, ctx: _llama.Context,
                  key: tuple[str, int]) -> None:
        prompt = req._prompt
        n_prompt = len(prompt)
        s = req._sampling
        if s.seed is not None and index:
            s = s.with_(seed=(s.seed + index) % 0xFFFFFFFF)
        g = req._generation
        ctx.memory_clear(False)
        ctx.eval(prompt)
        with self._lock:
            self._positions[key] = n_prompt
        sampler = build_sampler(self.model.native, s)
        try:
            gen = _llama.TokenGenerator(ctx, n_prompt, sampler,
                                        max_tokens=min(g.max_tokens, self.n_ctx - n_prompt))
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            matcher = _llama.StopMatcher(g.stop)
            vocab = self.model.vocab
            k = req._logprobs
            for tok, piece in gen:
                with self._lock:
                    self._positions[key] = gen.pos + 1
                    self._totals["completion_tokens_total"] += 1
                lp = None
                if k is not None:
                    lp = (self._logprob(ctx, vocab, tok, k),)
                out, hit = matcher.feed(decoder.decode(piece))
                if hit is not None:
                    req._push(Event(index, out, (tok,), lp, "stop"))
                    return
                req._push(Event(index, out, (tok,), lp, None))
            tail = matcher.feed(decoder.decode(b"", final=True))[0] + matcher.flush()
            req._push(Event(index, tail, (), None, gen.finish_reason or "length"))
        finally:
            if sampler is not None:
                sampler.close()

    @staticmethod
    def _logprob(ctx: _llama.Context, vocab: _llama.Vocab, tok: int, k: int) -> TokenLogprob:
        logits = ctx.logits(-1).astype(np.float64)
        top = float(logits.max())
        logz = top + math.log(float(np.exp(logits - top).sum()))
        best: list[tuple[int, str, float]] = []
        if k:
            idx = np.argpartition(-logits, k - 1)[:k]
            idx = idx[np.argsort(-logits[idx], kind="stable")]
            best = [(int(i), vocab.detokenize([int(i)]), float(logits[i] - logz)) for i in idx]
        return TokenLogprob(tok, vocab.detokenize([tok]), float(logits[tok] - logz),
                            tuple(best))

    # --- embeddings ----------------------------------------------------------------

    def embed(self, texts: str | Sequence[str], *, pooling: Pooling | None = None,
              normalize: bool = True, truncate: bool = False) -> np.ndarray:
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items:
            raise InvalidArgumentError("texts is empty")
        out = []
        with self._embed_lock:
            if self._closed:
                raise ClosedError("the model is closed")
            if self._embed_ctx is None:
                self._embed_ctx = _llama.Context(
                    self.model.native, n_ctx=self.n_ctx, n_batch=self.n_ctx,
                    n_ubatch=self.n_ctx, n_threads=self._n_threads, embeddings=True,
                    pooling=pooling or "mean")
            ctx = self._embed_ctx
            for i, text in enumerate(items):
                if not isinstance(text, str):
                    raise InvalidArgumentError(f"texts[{i}] must be a str, got {text!r}")
                tokens = self.tokenize(text)
                if not tokens:
                    raise InvalidArgumentError(f"texts[{i}] is empty")
                if len(tokens) > self.n_ctx:
                    if not truncate:
                        raise ContextLengthExceededError(
                            f"texts[{i}] has {len(tokens)} tokens, the context holds "
                            f"{self.n_ctx}", len(tokens), self.n_ctx)
                    tokens = tokens[:self.n_ctx]
                ctx.memory_clear(False)
                ctx.eval(tokens, logits="all")
                vec = np.array(ctx.sequence_embeddings(0), dtype=np.float32)
                if normalize:
                    norm = float(np.linalg.norm(vec))
                    if norm > 0:
                        vec /= norm
                out.append(vec)
            ctx.memory_clear(False)
        return np.stack(out)

    async def aembed(self, texts: str | Sequence[str], **options: Any) -> np.ndarray:
        return await asyncio.to_thread(self.embed, texts, **options)

    # --- stats and lifetime --------------------------------------------------------

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "requests_queued": self._queued,
                "requests_running": self._running,
                **self._totals,
                "kv_cells_used": sum(self._positions.values()),
                "kv_cells_total": self.n_ctx * self.n_parallel,
                "n_parallel": self.n_parallel,
                "max_queue": self.max_queue,
            }

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live = list(self._live)
            self._lock.notify_all()
        for req in live:
            req.cancel()
        self._pool.shutdown(wait=True)
        for req in live:
            if not req.done:
                req._fail(ClosedError("the model was closed"))
        with self._lock:
            contexts, self._contexts = self._contexts, []
        for ctx in contexts:
            ctx.close()
        with self._embed_lock:
            if self._embed_ctx is not None:
                self._embed_ctx.close()
                self._embed_ctx = None
        self.model.close()

    @property
    def closed(self) -> bool:
        return self._closed

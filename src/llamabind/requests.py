"""A request submitted to the batching engine, as its caller sees it: events to
iterate (threads or asyncio), results to wait for, cancel()."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import numpy as np

from llamabind import _llama
from llamabind.config import GenerationConfig, SamplingConfig
from llamabind.results import Event, GenerationResult

if TYPE_CHECKING:
    from llamabind.cells import PrefillJob, Slot
    from llamabind.engine import Engine
    from llamabind.structured import GenerationPlan

__all__ = ["Request"]

_request_ids = itertools.count(1)


class Request:
    """A submitted generation: iterate it for :class:`Event` objects (``for`` or
    ``async for``), or wait for ``result()`` / ``await aresult()``; ``cancel()`` from
    any thread. Made by :meth:`LoadedModel.submit`."""

    def __init__(self, engine: Engine, prompt: list[int], sampling: SamplingConfig,
                 generation: GenerationConfig, n: int, stream: bool,
                 plan: GenerationPlan | None = None) -> None:
        self.id = f"req-{next(_request_ids)}"
        # structured output: how the output is constrained and read (None: plain text)
        self.plan = plan
        self.prompt = prompt
        self.prompt_tokens = len(prompt)
        self.n = n
        self.sampling = sampling
        self.generation = generation
        self._engine = engine
        self._stream = stream
        self._cond = threading.Condition(threading.Lock())
        self._events: collections.deque[Event] = collections.deque()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._done = False
        self._error: BaseException | None = None
        self._results: list[GenerationResult] | None = None
        self._cancelled = False
        # engine-side state (touched by the scheduler thread only)
        self.gens: list[_llama.Generation] = []
        self.samplers: list[_llama.Sampler | None] = []
        self.slots: list[Slot | None] = []   # each choice's slot (None: finished, preempted)
        self.jobs: list[PrefillJob] = []
        self.resume: list[tuple[np.ndarray, int]] | None = None  # (tokens, choice) to redo
        self.rids: list[int] = []         # each choice's id in a recorded schedule
        self.paused = False               # preempted, waiting to come back
        self.paused_at = 0                # requests ended when it was paused
        self.cached_tokens = 0
        self.reported: list[int] = []     # tokens of each choice already sent as events
        self.t_submit = time.perf_counter()
        self.t_admit = 0.0
        self.t_first = 0.0
        self.t_done = 0.0
        self.admitted_at = 0

    # --- the caller's side ---------------------------------------------------------

    def cancel(self) -> None:
        """Stop the request: its choices end within one engine step with
        finish_reason "cancelled", and their KV cells are freed."""
        if not self._cancelled and not self._done:
            self._cancelled = True
            self._engine._cancel(self)

    @property
    def done(self) -> bool:
        return self._done

    def __iter__(self) -> Iterator[Event]:
        while True:
            with self._cond:
                while not self._events and not self._done:
                    self._cond.wait()
                if self._events:
                    event = self._events.popleft()
                elif self._error is not None:
                    raise self._error
                else:
                    return
            yield event

    async def _wait_async(self) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._cond:
            if self._events or self._done:
                return
            self._async_waiters.append((loop, future))
        await future

    async def _aiter(self) -> AsyncIterator[Event]:
        while True:
            with self._cond:
                if self._events:
                    event: Event | None = self._events.popleft()
                elif self._done:
                    if self._error is not None:
                        raise self._error
                    return
                else:
                    event = None
            if event is None:
                await self._wait_async()
                continue
            yield event

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._aiter()

    def result(self, timeout: float | None = None) -> list[GenerationResult]:
        """The results, one per choice (by index), when the request is done. A
        KeyboardInterrupt while waiting cancels the request."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cancelled_if_left(), self._cond:
            while not self._done:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"request {self.id} did not finish in {timeout} s")
                self._cond.wait(remaining)
        return self._outcome()

    async def aresult(self) -> list[GenerationResult]:
        """``result()`` for asyncio: cancelling the awaiting task cancels the request."""
        with self._cancelled_if_left():
            while not self._done:
                await self._wait_async()
        return self._outcome()

    @contextlib.contextmanager
    def _cancelled_if_left(self) -> Iterator[None]:
        """A wait for the results that ends by an exception (a timeout, Ctrl+C, a
        cancelled task) cancels the request."""
        try:
            yield
        except BaseException:
            if not self._done:
                self.cancel()
            raise

    def _outcome(self) -> list[GenerationResult]:
        if self._error is not None:
            raise self._error
        assert self._results is not None
        return self._results

    # --- the engine's side -----------------------------------------------------------

    def _push(self, events: list[Event], done: bool = False,
              results: list[GenerationResult] | None = None,
              error: BaseException | None = None) -> None:
        with self._cond:
            if self._stream:
                self._events.extend(events)
            if done:
                self._done = True
                self._results = results
                self._error = error
            self._cond.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def __repr__(self) -> str:
        state = "done" if self._done else ("cancelled" if self._cancelled else "pending")
        return (f"<llamabind.Request {self.id} {state} prompt_tokens={self.prompt_tokens} "
                f"n={self.n}>")


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def close_samplers(request: Request) -> None:
    for sampler in request.samplers:
        if sampler is not None and not sampler.closed:
            sampler.close()

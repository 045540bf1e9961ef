"""The batching engine: one llama.cpp context, many sequences, continuous batching.

Every :class:`~llamabind.LoadedModel` has one engine (started on first use). Requests
from any number of threads and asyncio tasks wait in one queue; a scheduler thread
admits them into free sequence slots and runs steps: each step is one ``llama_decode``
of one batch holding the next token of every generating sequence plus chunks of the
prompts of newly admitted ones (at most ``n_batch`` tokens in all, generating
sequences first, so running streams keep their pace while a long prompt enters). The
weights are read once per step for all of them, which is where the throughput of
many requests at once comes from (llama.cpp's own server works the same way).

Each request has its own sampler chain, stop strings, max_tokens, seed and logit
bias; ``n`` completions of one prompt decode the prompt once and copy its KV cells.
A slot keeps the KV cells of its last request, so a request that starts like it
(the next turn of a chat, a shared system prompt) reuses them; cells a slot gives up
go to a prompt cache in RAM (LRU, limited in bytes) that later requests draw on.

A request with speculative decoding (``spec_type``) brings a draft after its pending
token into the step (prompt lookup, or the draft model's, drafted on a context of the
draft model with one sequence per slot); its sampler takes as much of it as it would
have picked anyway, and the cells of the rest are removed.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from llamabind import _llama
from llamabind.cells import PrefillJob, PromptCache, Slot, cells_held, cells_needed
from llamabind.config import ContextConfig, EngineConfig, GenerationConfig, SamplingConfig
from llamabind.drafting import Drafters, check_speculative
from llamabind.errors import (
    ClosedError,
    ContextLengthExceededError,
    ForkError,
    GenerationCancelled,
    InvalidArgumentError,
    LlamaError,
    OutputParseError,
    QueueFullError,
)
from llamabind.requests import Request, close_samplers
from llamabind.results import (
    Event,
    FinishReason,
    GenerationResult,
    read_structured,
    token_logprobs,
)
from llamabind.sampling import build_sampler

if TYPE_CHECKING:
    from llamabind.structured import GenerationPlan

__all__ = ["Engine"]


# A slot's cells are saved to the prompt cache when it gives up at least this many.
_MIN_CACHED_TOKENS = 32
# A cached prefix is restored when it reuses at least this many more tokens than the
# best slot: copying a sequence's cells back costs far less than decoding even a few
# prompt tokens (SmolLM2 on 2 CPU cores: 0.3 ms to load 50 tokens' cells, ~3 ms to decode one
# prompt token).
_MIN_RESTORE_GAIN = 4
# An idle scheduler thread ends after this long.
_IDLE_EXIT_S = 5.0
# An idle engine waits at most this long for requests a front end has announced
# (``arriving()``) before it starts the first step of those already queued.
_GATHER_S = 0.03


class Engine:
    """The batching engine of one loaded model (see the module's docstring)."""

    def __init__(self, native: _llama.Model, context: ContextConfig,
                 config: EngineConfig, draft: _llama.Model | None = None) -> None:
        self.native = native
        # the draft model of spec_type="draft-simple" (its context is made on first use)
        self.draft_model = draft
        self.context_config = context
        self.config = config
        self.n_parallel = config.n_parallel
        self.n_ctx = context.n_ctx if context.n_ctx > 0 else int(native.n_ctx_train)
        # the slots share one KV buffer unless told otherwise: cells go where they are
        # needed, and flash attention skips the cells of other sequences
        self.unified = context.kv_unified is not False
        if config.kv_size is not None:
            self.kv_size = config.kv_size
        elif self.unified:
            self.kv_size = self.n_ctx * min(self.n_parallel, 4)
        else:
            self.kv_size = self.n_ctx * self.n_parallel
        if self.kv_size < self.n_ctx:
            raise InvalidArgumentError(
                f"kv_size={self.kv_size} must hold at least one context (n_ctx={self.n_ctx})")
        if not self.unified and self.kv_size < self.n_ctx * self.n_parallel:
            raise InvalidArgumentError(
                f"kv_size={self.kv_size} is less than n_ctx x n_parallel = "
                f"{self.n_ctx * self.n_parallel}: with kv_unified=False each slot has "
                "kv_size / n_parallel cells, too few for one context")
        # the engine's context (made on first use): one sequence per slot; the draft
        # model's context has the same size, sequences and batch
        self._context_config = context.with_(
            n_ctx=self.kv_size, n_seq_max=self.n_parallel, kv_unified=self.unified,
            n_batch=max(context.n_batch, self.n_parallel))
        self._drafters = Drafters(native, draft, self._context_config)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._room = threading.Condition(self._lock)
        self._queue: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._cancelled: list[Request] = []
        self._arriving = 0       # requests announced by arriving(), not yet submitted
        self._closed = False
        self._thread: threading.Thread | None = None
        self._ctx: _llama.Context | None = None
        self._core: _llama.EngineCore | None = None
        self._slots: list[Slot] = []
        self._cache = PromptCache(config.cache_ram_mib * 1024 * 1024)
        self._in_flight: set[Request] = set()
        self._admissions = 0
        self._choices = 0
        self._ended = 0
        self._record: list[Any] | None = None
        self._pid = os.getpid()
        self._stats = {"requests_total": 0, "requests_cancelled": 0, "requests_failed": 0,
                       "prompt_tokens_total": 0, "prompt_tokens_cached": 0,
                       "prompt_tokens_decoded": 0,
                       "completion_tokens_total": 0, "steps": 0, "preemptions": 0,
                       "draft_tokens_total": 0, "draft_tokens_accepted_total": 0}

    # --- submitting --------------------------------------------------------------------

    def submit(self, prompt: list[int], sampling: SamplingConfig,
               generation: GenerationConfig, *, n: int = 1,
               queue_timeout: float | None = None, stream: bool = True,
               plan: GenerationPlan | None = None) -> Request:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.n_parallel:
            raise InvalidArgumentError(
                f"n must be an int in [1, n_parallel={self.n_parallel}], got {n!r}")
        if queue_timeout is not None and (
                isinstance(queue_timeout, bool) or not isinstance(queue_timeout, (int, float))
                or not queue_timeout >= 0):
            raise InvalidArgumentError(
                f"queue_timeout must be None or a number >= 0, got {queue_timeout!r}")
        n_prompt = len(prompt)
        if n_prompt == 0:
            raise InvalidArgumentError("the prompt is empty (it produced no tokens)")
        if n_prompt >= self.n_ctx:
            raise ContextLengthExceededError(
                f"the prompt has {n_prompt} token{'' if n_prompt == 1 else 's'}; with at "
                f"least one generated token it needs {n_prompt + 1}, but the context holds "
                f"{self.n_ctx}", n_prompt, self.n_ctx)
        if os.getpid() != self._pid:
            raise ForkError(
                "this model was loaded before os.fork() and cannot be used in the child "
                "process; load the model again in the child (or use the 'spawn' start "
                "method)")
        if generation.speculative:
            check_speculative(self.native, self.draft_model, generation)
        request = Request(self, prompt, sampling, generation, n, stream, plan)
        # the sampler chains are built here, in the caller's thread: a bad grammar or
        # option fails the submit, not the engine
        samplers: list[_llama.Sampler | None] = []
        try:
            for i in range(n):
                s = sampling
                if i and sampling.seed is not None:
                    s = sampling.with_(seed=(sampling.seed + i) % 0xFFFFFFFF)
                samplers.append(build_sampler(self.native, s, self.n_ctx, plan))
        except BaseException:
            for smp in samplers:
                if smp is not None:
                    smp.close()
            raise
        request.samplers = samplers
        deadline = None if queue_timeout is None else time.monotonic() + queue_timeout
        with self._lock:
            while True:
                if self._closed:
                    close_samplers(request)
                    raise ClosedError("the model is closed")
                free = self.n_parallel - sum(r.n for r in self._running)
                if len(self._queue) < self.config.max_queue + max(0, free):
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    close_samplers(request)
                    raise QueueFullError(
                        f"the request queue is full ({len(self._queue)} waiting, limit "
                        f"{self.config.max_queue})", len(self._queue), self.config.max_queue)
                self._room.wait(remaining)
            self._queue.append(request)
            self._stats["requests_total"] += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llamabind-engine",
                                                 daemon=True)
                self._thread.start()
            self._wake.notify()
        return request

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Announce a request that is being prepared (its body parsed, its prompt
        rendered) and will be submitted before the block ends. An idle engine holds
        its first step while announced requests are on their way (at most 30 ms after
        the first queued one, and not once the queue fills the free slots), so a burst
        of requests that arrive together is prefilled in one step instead of the first
        one alone while the others wait a whole prefill."""
        with self._lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._lock:
                self._arriving -= 1
                if self._arriving == 0:
                    self._wake.notify()

    def _gather(self) -> None:
        """Wait (lock held) for announced requests before an idle engine's first step."""
        if self._running or not self._queue:
            return
        deadline = self._queue[0].t_submit + _GATHER_S
        while self._arriving and not self._closed and not self._cancelled \
                and sum(r.n for r in self._queue) < self.n_parallel:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wake.wait(remaining)

    def _cancel(self, request: Request) -> None:
        with self._lock:
            if request in self._queue:
                self._queue.remove(request)
                self._room.notify()
                self._finish_unstarted(request, None)
                return
            self._cancelled.append(request)
            # a decode whose every row belongs to cancelled requests is stopped now
            if self._in_flight and all(r._cancelled for r in self._in_flight) \
                    and self._ctx is not None:
                self._ctx.cancel()
            self._wake.notify()

    # --- state ----------------------------------------------------------------------------

    def _cells_in_use(self) -> tuple[int, int]:
        """(cells of running requests, cells idle slots keep)."""
        running = sum(cells_held(r) for r in self._running)
        idle = sum(len(s.tokens) for s in self._slots if not s.busy)
        return running, idle

    def stats(self) -> dict[str, Any]:
        with self._lock:
            used, cached = self._cells_in_use()
            out = dict(self._stats)
            out.update({
                "requests_queued": len(self._queue),
                "requests_running": len(self._running),
                "n_parallel": self.n_parallel,
                "n_ctx": self.n_ctx,
                "max_queue": self.config.max_queue,
                "kv_cells_used": used,
                "kv_cells_cached": cached,
                "kv_cells_total": self.kv_size,
                "prompt_cache_entries": len(self._cache.entries),
                "prompt_cache_bytes": self._cache.size,
                "prompt_cache_hits": self._cache.hits,
            })
        return out

    def _rec(self, op: dict[str, Any]) -> None:
        if self._record is not None:
            self._record.append(op)

    def _seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> None:
        assert self._ctx is not None
        self._ctx.seq_rm(seq_id, p0, p1)
        self._rec({"op": "rm", "seq": seq_id, "p0": p0, "p1": p1})

    def record_schedule(self, on: bool = True) -> list[Any] | None:
        """Start (or stop) recording what the engine does to its context, in order:
        requests' choices admitted (``admit``: a choice id, its sequence and sampling),
        moved (``bind``), cells removed (``rm``) or copied (``cp``), restored from the
        prompt cache (``load``), and each step's batch and picks (see EngineCore). A
        native program can replay it (native/llamabind_ref.cpp, mode replay). Returns
        the record list."""
        with self._lock:
            self._record = [] if on else None
            if self._core is not None:
                self._core.record = self._record
        return self._record

    def context_params(self) -> dict[str, Any]:
        """The engine context's sizes and threads (after its first request)."""
        ctx = self._ctx
        if ctx is None:
            raise InvalidArgumentError("the engine has no context yet (submit a request)")
        return {"n_ctx": ctx.n_ctx, "n_seq_max": ctx.n_seq_max, "n_batch": ctx.n_batch,
                "n_ubatch": ctx.n_ubatch, "kv_unified": self.unified,
                "n_threads": ctx.n_threads[0]}

    def clear_cache(self) -> None:
        """Free the KV cells idle slots keep and empty the prompt cache."""
        with self._lock:
            self._cache.clear()
            if self._ctx is not None and not self._running:
                for slot in self._slots:
                    if not slot.busy and slot.tokens:
                        self._seq_rm(slot.seq_id)
                        slot.tokens = []

    def close(self) -> None:
        """Cancel queued and running requests (ClosedError) and free the context."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            if self._ctx is not None and self._in_flight:
                self._ctx.cancel()
            self._wake.notify_all()
            self._room.notify_all()
            thread = self._thread
        for request in queued:
            self._finish_unstarted(request, ClosedError("the model was closed"))
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        self._drafters.close()
        self._cache.clear()

    # --- the scheduler thread --------------------------------------------------------------

    def _ensure_context(self) -> None:
        if self._ctx is not None:
            return
        self._ctx = _llama.Context(self.native, self._context_config)
        self._core = _llama.EngineCore(self._ctx)
        self._core.record = self._record
        self._slots = [Slot(i) for i in range(self.n_parallel)]

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the engine itself failed: fail everything
            with self._lock:
                self._closed = True
                pending = list(self._queue) + list(self._running)
                self._queue.clear()
                self._running.clear()
            for request in pending:
                self._finish_unstarted(request, exc if isinstance(exc, LlamaError) else
                                       LlamaError(f"the engine failed: {exc!r}"))

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._queue and not self._running \
                        and not self._cancelled:
                    if not self._wake.wait(_IDLE_EXIT_S) and not self._queue \
                            and not self._running and not self._cancelled:
                        # idle: the thread ends (the next request starts another), so a
                        # model dropped without close() can still be garbage collected
                        self._thread = None
                        return
                if not self._closed:
                    self._gather()
                if self._closed:
                    running = list(self._running)
                    self._running.clear()
                    break
                cancelled, self._cancelled = self._cancelled, []
            for request in cancelled:
                if request in self._running:
                    self._end_request(request, cancelled=True)
            self._admit()
            if not self._running:
                continue
            self._step()
        for request in running:
            self._end_request(request, error=ClosedError("the model was closed"))

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    return
                request = self._queue[0]
                free = [s for s in self._slots if not s.busy] if self._slots else None
                need = request.n if request.resume is None else len(request.resume)
                if free is not None and len(free) < need:
                    return
                if self.unified and self._running:
                    # shared cells: wait until the running requests leave room for it
                    running, _ = self._cells_in_use()
                    if running + cells_needed(request) > self.kv_size:
                        return
                    # a paused request comes back only once another has ended: the
                    # cells it was paused for are really free then
                    if request.paused and self._ended <= request.paused_at:
                        return
                self._queue.popleft()
                # counted as running from now on: a submit waiting for room must not see
                # its slot as free in between
                self._running.append(request)
                self._room.notify()
            request.paused = False
            try:
                self._ensure_context()
                free = [s for s in self._slots if not s.busy]
                if request.resume is not None:
                    self._resume(request, free)
                else:
                    self._start(request, free)
            except BaseException as exc:
                with self._lock:
                    self._running.remove(request)
                self._finish_unstarted(request, exc)

    def _make_room(self, need: int, keep: list[Slot]) -> None:
        """Shared cells: free the cells idle slots keep (to the prompt cache), least
        recently used first, until ``need`` more cells fit."""
        if not self.unified:
            return
        running, idle = self._cells_in_use()
        for slot in sorted((s for s in self._slots if not s.busy and s.tokens
                            and s not in keep), key=lambda s: s.last_used):
            if running + idle + need <= self.kv_size:
                return
            idle -= len(slot.tokens)
            self._give_up(slot, 0)

    def _start(self, request: Request, free: list[Slot]) -> None:
        ctx = self._ctx
        assert ctx is not None
        prompt = request.prompt
        n_prompt = len(prompt)
        g = request.generation
        # the slot whose cells share the longest prefix with the prompt
        best, best_n = free[0], -1
        for slot in free:
            k = _llama.common_prefix(slot.tokens, prompt)
            if k > best_n or (k == best_n and slot.last_used < best.last_used):
                best, best_n = slot, k
        key, cached_n = self._cache.best(prompt)
        if key is not None and cached_n >= best_n + _MIN_RESTORE_GAIN:
            # restoring from RAM beats recomputing: free the slot least worth keeping
            # (taking the cached state first: what that slot gives up goes to the
            # cache, which may drop this entry to stay within its bytes)
            state = self._cache.take(key)
            target = min(free, key=lambda s: (len(s.tokens), s.last_used))
            self._give_up(target, 0)
            ctx.load_state(state, target.seq_id)
            self._rec({"op": "load", "seq": target.seq_id, "n_tokens": len(key)})
            target.tokens = list(key)
            best, best_n = target, cached_n
        kept = min(best_n, n_prompt - 1)
        self._give_up(best, kept)
        self._make_room(n_prompt - kept + request.n, [best])
        slots = [best, *[s for s in free if s is not best][:request.n - 1]]
        for slot in slots[1:]:
            self._give_up(slot, 0)
        gens = []
        drafter = self._drafters.get(g)
        for i, slot in enumerate(slots):
            slot.busy = True
            gens.append(_llama.Generation(
                self.native, n_prompt, request.samplers[i], max_tokens=g.max_tokens,
                stop=list(g.stop), ignore_eos=request.sampling.ignore_eos,
                logprobs=g.logprobs, seq_id=slot.seq_id, n_ctx=self.n_ctx,
                preserved_tokens=request.plan.preserved_tokens if request.plan else (),
                drafter=drafter, prompt=prompt if drafter is not None else None,
                draft_max=g.draft_max, draft_min=g.draft_min, draft_p_min=g.draft_p_min))
        request.rids = []
        for i, slot in enumerate(slots):
            self._choices += 1
            request.rids.append(self._choices)
            self._rec({"op": "admit", "rid": self._choices, "seq": slot.seq_id,
                       "sampling": request.sampling, "choice": i})
        request.gens = gens
        request.slots = list(slots)
        request.reported = [0] * request.n
        request.cached_tokens = kept
        request.t_admit = time.perf_counter()
        self._admissions += 1
        request.admitted_at = self._admissions
        tokens = np.asarray(prompt[kept:], dtype=np.int32)
        request.jobs = [PrefillJob(tokens, kept, best.seq_id, gens)]
        self._stats["prompt_tokens_total"] += n_prompt
        self._stats["prompt_tokens_cached"] += kept

    def _resume(self, request: Request, free: list[Slot]) -> None:
        """Admit a preempted request again: each unfinished choice gets a slot and its
        prompt and tokens decoded anew, then goes on with its pending token."""
        assert request.resume is not None
        free = sorted(free, key=lambda s: (len(s.tokens), s.last_used))
        self._make_room(cells_needed(request), [])
        for (tokens, i), slot in zip(request.resume, free, strict=False):
            self._give_up(slot, 0)
            slot.busy = True
            request.gens[i].seq_id = slot.seq_id
            request.slots[i] = slot
            self._rec({"op": "bind", "rid": request.rids[i], "seq": slot.seq_id})
            request.jobs.append(PrefillJob(tokens, 0, slot.seq_id, None))
        request.resume = None
        self._admissions += 1
        request.admitted_at = self._admissions

    def _give_up(self, slot: Slot, keep: int) -> None:
        """Cut a free slot's cells down to its first ``keep`` tokens, saving what it
        held to the prompt cache first when that is worth it."""
        ctx = self._ctx
        assert ctx is not None
        if len(slot.tokens) <= keep:
            return
        if (self._cache.limit > 0 and len(slot.tokens) - keep >= _MIN_CACHED_TOKENS
                and len(slot.tokens) >= _MIN_CACHED_TOKENS):
            self._cache.put(slot.tokens, ctx.save_state(slot.seq_id))
        if keep == 0:
            self._seq_rm(slot.seq_id)
        else:
            self._seq_rm(slot.seq_id, keep, -1)
        slot.tokens = slot.tokens[:keep]

    def _step(self) -> None:
        core = self._core
        ctx = self._ctx
        assert core is not None and ctx is not None
        budget = core.capacity
        gens: list[_llama.Generation] = []
        chunks: list[tuple[Any, ...]] = []
        in_flight: set[Request] = set()
        for request in self._running:
            if request.jobs:
                continue
            for gen in request.gens:
                if gen.has_next and len(gens) < budget:
                    gens.append(gen)
                    in_flight.add(request)
        budget -= len(gens)
        # while sequences generate, prompts enter at most prefill_budget tokens a step
        prompt_budget = budget if not gens or self.config.prefill_budget is None \
            else min(budget, self.config.prefill_budget)
        budget -= prompt_budget
        taken: list[tuple[PrefillJob, int]] = []
        for request in self._running:
            for job in request.jobs:
                if prompt_budget <= 0:
                    break
                count = min(prompt_budget, len(job.tokens) - job.done)
                last = job.done + count == len(job.tokens)
                chunks.append((job.outputs if last else None, job.tokens, job.done, count,
                               job.start_pos + job.done, (job.seq_id,)))
                taken.append((job, count))
                in_flight.add(request)
                prompt_budget -= count
        budget += prompt_budget  # what the prompts left is for drafts
        if not self.unified:
            # with a KV buffer per sequence llama.cpp splits a step into ubatches of
            # consecutive sequence ids, in batch order: sorted, one ubatch serves them
            gens.sort(key=lambda g: g.seq_id)
            chunks.sort(key=lambda c: c[5][0])
        # the rows left carry drafts after the generated tokens
        drafted = False
        for gen in gens:
            if budget <= 0:
                break
            if gen.speculative:
                n_draft = gen.plan_draft(budget)
                budget -= n_draft
                drafted = drafted or n_draft > 0
        if not gens and not chunks:
            return
        with self._lock:
            # a cancel() meant for an earlier step must not stop this one
            ctx.reset_cancel()
            self._in_flight = in_flight
        try:
            rc = core.step(gens, chunks)
            if rc == 1 and drafted:
                # no room for the drafts' cells: the step without them
                for gen in gens:
                    gen.drop_draft()
                rc = core.step(gens, chunks)
        except GenerationCancelled:
            # every request in the step was cancelled (or the model is closing)
            rc = -1
        except LlamaError as exc:
            for request in in_flight:
                self._end_request(request, error=exc)
            return
        finally:
            with self._lock:
                self._in_flight = set()
        if rc == 1:
            self._preempt()
            return
        if rc == -1:
            for request in in_flight:
                if not request._cancelled:
                    self._end_request(request, error=ClosedError("the model was closed"))
            return
        self._stats["steps"] += 1
        now = time.perf_counter()
        for job, count in taken:
            job.done += count
            self._stats["prompt_tokens_decoded"] += count
        for request in list(self._running):
            self._after_step(request, now)

    def _after_step(self, request: Request, now: float) -> None:
        ctx = self._ctx
        assert ctx is not None
        if request.jobs:
            request.jobs = [job for job in request.jobs if job.done < len(job.tokens)]
            if request.jobs:
                return
            if not request.t_first:
                # the other choices share the prompt's cells (a fresh admission only:
                # resumed choices decoded their own)
                primary = request.slots[0]
                assert primary is not None
                for slot in request.slots[1:]:
                    if slot is not None:
                        ctx.seq_cp(primary.seq_id, slot.seq_id, -1, -1)
                        self._rec({"op": "cp", "src": primary.seq_id, "dst": slot.seq_id})
                request.t_first = now
        events: list[Event] = []
        finished = True
        for i, gen in enumerate(request.gens):
            if gen.error is not None:
                self._end_request(request, error=gen.error)
                return
            if request._stream and request.reported[i] >= 0:
                new_tokens = gen.tokens[request.reported[i]:]
                text = gen.take_text()
                fin = gen.finish_reason
                if text or new_tokens or fin is not None:
                    logprobs = None
                    if gen.logprobs is not None:
                        logprobs = token_logprobs(self.native.vocab,
                                                  gen.logprobs[request.reported[i]:])
                    events.append(Event(i, text, tuple(new_tokens), logprobs,
                                        cast("FinishReason | None", fin)))
                    request.reported[i] = len(gen.tokens) if fin is None else -1
            if gen.finish_reason is None:
                finished = False
        if finished:
            self._end_request(request, events=events)
        elif events:
            request._push(events)

    def _preempt(self) -> None:
        """The KV cache had no room for the step: idle slots give up the cells they
        keep; if there are none, the newest request gives its cells back and waits at
        the head of the queue (its choices continue where they were when it is admitted
        again: their prompt and tokens are decoded anew); a request alone that does not
        fit ends with "length"."""
        idle = [s for s in self._slots if not s.busy and s.tokens]
        if idle:
            # first the cells idle slots keep for reuse (to the prompt cache)
            for slot in idle:
                self._give_up(slot, 0)
            return
        with self._lock:
            running = sorted(self._running, key=lambda r: r.admitted_at)
        if len(running) <= 1:
            for request in running:
                for gen in request.gens:
                    gen.finish("length")
                self._after_step(request, time.perf_counter())
            return
        victim = running[-1]
        self._stats["preemptions"] += 1
        ctx = self._ctx
        assert ctx is not None
        resume: list[tuple[np.ndarray, int]] = []
        for i, (gen, held) in enumerate(zip(victim.gens, victim.slots, strict=True)):
            if held is not None:
                self._seq_rm(held.seq_id)
                held.tokens = []
                held.busy = False
                victim.slots[i] = None
            if gen.finish_reason is None:
                if victim.jobs or not gen.has_next:
                    # preempted before its first token: admitted again from the start
                    resume = []
                    break
                decoded = gen.pos - victim.prompt_tokens
                tokens = np.asarray(victim.prompt + list(gen.tokens[:decoded]), dtype=np.int32)
                resume.append((tokens, i))
        with self._lock:
            self._running.remove(victim)
            victim.paused = True
            victim.paused_at = self._ended
            if resume or not any(g.finish_reason is None for g in victim.gens):
                victim.resume = resume
            else:
                victim.resume = None
                victim.jobs = []
                victim.gens = []
            self._queue.appendleft(victim)

    def _end_request(self, request: Request, *, cancelled: bool = False,
                     error: BaseException | None = None,
                     events: list[Event] | None = None) -> None:
        ctx = self._ctx
        now = time.perf_counter()
        request.t_done = now
        results = None
        if error is None:
            for gen in request.gens:
                if gen.finish_reason is None or cancelled:
                    gen.finish("cancelled")
                self._stats["completion_tokens_total"] += gen.n_generated
                self._stats["draft_tokens_total"] += gen.n_drafted
                self._stats["draft_tokens_accepted_total"] += gen.n_draft_accepted
            try:
                results = [self._result(request, gen) for gen in request.gens]
            except OutputParseError as exc:
                # the output does not read as the plan asks (e.g. a Pydantic validator
                # the grammar cannot express): this request fails, the engine goes on
                results, error = None, exc
                self._stats["requests_failed"] += 1
            if cancelled and request._stream:
                events = [Event(i, gen.take_text(), tuple(gen.tokens[request.reported[i]:]),
                                None, "cancelled")
                          for i, gen in enumerate(request.gens) if request.reported[i] >= 0]
        else:
            self._stats["requests_failed"] += 1
        if cancelled:
            self._stats["requests_cancelled"] += 1
        # the slots keep what their sequences hold, for the next request to reuse
        for gen, slot in zip(request.gens, request.slots, strict=False):
            if slot is None:
                continue
            if ctx is not None and (cancelled or error is not None):
                self._seq_rm(slot.seq_id)
                slot.tokens = []
            else:
                decoded = max(0, gen.pos - request.prompt_tokens)
                slot.tokens = request.prompt + list(gen.tokens[:decoded])
            slot.busy = False
            slot.last_used = now
        close_samplers(request)
        with self._lock:
            if request in self._running:
                self._running.remove(request)
            self._ended += 1
        request._push(events or [], done=True, results=results, error=error)

    def _result(self, request: Request, gen: _llama.Generation) -> GenerationResult:
        t_first = request.t_first or request.t_done
        return read_structured(GenerationResult(
            text=gen.text, prompt_tokens=request.prompt_tokens,
            completion_tokens=gen.n_generated,
            finish_reason=cast("FinishReason", gen.finish_reason),
            tokens=tuple(gen.tokens), prompt_eval_ms=(t_first - request.t_admit) * 1000
            if request.t_admit else 0.0,
            generation_ms=(request.t_done - t_first) * 1000,
            cached_prompt_tokens=request.cached_tokens, stop_sequence=gen.stop_sequence,
            logprobs=token_logprobs(self.native.vocab, gen.logprobs),
            queue_ms=((request.t_admit or request.t_done) - request.t_submit) * 1000,
            draft_tokens=gen.n_drafted, draft_tokens_accepted=gen.n_draft_accepted),
            request.plan)

    def _finish_unstarted(self, request: Request, error: BaseException | None) -> None:
        """End a request that never got a slot (cancelled or refused in the queue)."""
        close_samplers(request)
        results = None
        if error is None:
            results = [GenerationResult(
                text="", prompt_tokens=request.prompt_tokens, completion_tokens=0,
                finish_reason="cancelled", tokens=(), prompt_eval_ms=0.0,
                generation_ms=0.0) for _ in range(request.n)]
            self._stats["requests_cancelled"] += 1
        events = [Event(i, "", (), None, "cancelled") for i in range(request.n)] \
            if error is None else []
        request._push(events, done=True, results=results, error=error)



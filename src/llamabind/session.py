"""A context of your own: one llama.cpp context on a loaded model, for one thread at
a time, running the same token loop as the engine."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from llamabind import _llama
from llamabind.config import ContextConfig, GenerationConfig, SamplingConfig
from llamabind.drafting import check_speculative, ngram_drafter
from llamabind.errors import (
    ClosedError,
    ConcurrentUseError,
    ContextLengthExceededError,
    GenerationCancelled,
    InvalidArgumentError,
)
from llamabind.results import FinishReason, GenerationResult, read_structured, token_logprobs
from llamabind.sampling import build_sampler

if TYPE_CHECKING:
    from llamabind.api import LoadedModel
    from llamabind.structured import GenerationPlan

__all__ = ["Session"]


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
        # the draft model's context of spec_type="draft-simple" (made on first use)
        self._drafter: _llama.ModelDrafter | None = None

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
        if self._drafter is not None:
            self._drafter.close()
            self._drafter = None

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
        drafter = self._drafter_for(g)
        sampler = build_sampler(self.model.native, s, n_ctx, plan)
        try:
            gen = _llama.Generation(
                self.model.native, n_prompt, sampler, max_tokens=g.max_tokens,
                stop=list(g.stop), ignore_eos=s.ignore_eos, logprobs=g.logprobs, n_ctx=n_ctx,
                preserved_tokens=plan.preserved_tokens if plan is not None else (),
                drafter=drafter, prompt=prompt if drafter is not None else None,
                draft_max=g.draft_max, draft_min=g.draft_min, draft_p_min=g.draft_p_min)
        except BaseException:
            if sampler is not None:
                sampler.close()
            raise
        return _SessionRun(self, prompt, gen, sampler, reuse_prefix, streaming, plan)

    def _drafter_for(self, g: GenerationConfig) -> _llama.Drafter | None:
        if not g.speculative:
            return None
        check_speculative(self.model.native, self.model.draft_model, g)
        if g.spec_type == "ngram-simple":
            return ngram_drafter(g)
        if self._drafter is None:
            assert self.model.draft_model is not None
            self._drafter = _llama.ModelDrafter(
                self.model.native, self.model.draft_model, n_ctx=self.n_ctx,
                n_batch=self.config.n_batch, n_threads=self.config.n_threads)
        return self._drafter


@dataclass(eq=False)
class _SessionRun:
    """One generation on a Session: iterating it runs it (yielding text pieces when
    streaming); ``result`` is set at the end."""

    session: Session
    prompt: list[int]
    gen: _llama.Generation
    sampler: _llama.Sampler | None
    reuse_prefix: bool
    streaming: bool
    plan: GenerationPlan | None = None
    result: GenerationResult | None = field(default=None, init=False)

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
            logprobs=token_logprobs(session.model.vocab, gen.logprobs),
            draft_tokens=gen.n_drafted, draft_tokens_accepted=gen.n_draft_accepted), self.plan)


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

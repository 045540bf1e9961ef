"""Threads: one shared model, many sessions; misuse of one context by two threads;
closing a model or a context while another thread is still working on it.

Every multi-threaded test runs its workers as daemon threads under a watchdog: a
deadlock fails the test (with every thread's stack on stderr) instead of hanging CI.
"""

from __future__ import annotations

import faulthandler
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from _subproc import Child, record

import llamabind
from llamabind import (
    ClosedError,
    ConcurrentUseError,
    Context,
    ContextConfig,
    GenerationCancelled,
    LoadedModel,
    TokenGenerator,
)

pytestmark = pytest.mark.model

# Small contexts keep memory low with many sessions alive; one thread per context:
# the workers themselves are the parallelism, and on a busy 2-core machine ggml's
# spinning thread pools would only fight each other.
SMALL = ContextConfig(n_ctx=256, n_batch=64, n_ubatch=64, n_threads=1)
LONG = ContextConfig(n_ctx=4096, n_batch=512, n_ubatch=512, n_threads=1)
MAX_TOKENS = 2

SUBJECTS = ["The sky", "My cat", "Paris", "A good book", "The ocean", "Python code",
            "Winter", "The moon", "Coffee", "A robot", "The train", "Music",
            "An old house", "The river", "Mathematics", "A small bird"]


def _jobs() -> list[tuple[str, dict]]:
    """32 prompts x (greedy, seeded sampling) = 64 distinct generations."""
    jobs = []
    for i in range(32):
        prompt = f"{SUBJECTS[i % len(SUBJECTS)]} is {'very ' * (i // 16)}"
        jobs.append((prompt, {"temperature": 0.0}))
        jobs.append((prompt, {"temperature": 0.9, "seed": 1000 + i}))
    return jobs


JOBS = _jobs()


@pytest.fixture(scope="module")
def shared(smol_path: str) -> Iterator[LoadedModel]:
    model = LoadedModel.load(smol_path, context=SMALL)
    yield model
    model.close()


@pytest.fixture(scope="module")
def reference(shared: LoadedModel) -> list[tuple[tuple[int, ...], str]]:
    """Each job's result, run one after another in one session."""
    out = []
    with shared.create_session() as session:
        for prompt, opts in JOBS:
            r = session.generate(prompt, max_tokens=MAX_TOKENS, **opts)
            assert r.completion_tokens >= 1 or r.finish_reason == "stop"
            out.append((r.tokens, r.text))
    # the jobs really differ: seeded sampling is not greedy, prompts differ
    assert len({text for _, text in out}) > len(out) // 4
    return out


def run_threads(targets: list[Callable[[], None]], timeout: float) -> None:
    """Run each target in a daemon thread; fail (with all stacks) if any is still
    running after ``timeout`` seconds: a deadlock or a livelock."""
    threads = [threading.Thread(target=t, daemon=True, name=f"worker-{i}")
               for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        pytest.fail(f"watchdog: {stuck} still running after {timeout}s (deadlock?)")


def _long_tokens(model: LoadedModel, n: int) -> list[int]:
    text = " ".join(f"Item {i}: the {SUBJECTS[i % len(SUBJECTS)].lower()} number {i}."
                    for i in range(n // 6 + 10))
    tokens = model.tokenize(text)[:n]
    assert len(tokens) == n
    return tokens


def _wait_until_busy(ctx: Context, worker: threading.Thread, timeout: float = 120.0) -> None:
    """Return once another thread is inside ``ctx`` (a harmless probe is refused).

    ``state_size()`` claims the context and releases it without ever releasing the GIL,
    so the probe itself can never make the worker's own claim fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ctx.state_size()
        except ConcurrentUseError:
            return
        if not worker.is_alive():
            pytest.fail("the worker finished before it was seen using the context")
        time.sleep(0.002)
    pytest.fail("the worker never started using the context")


# --- many threads, one model --------------------------------------------------------------

def _threads_generate(shared: LoadedModel, reference: list, n_threads: int,
                      per_thread: int, timeout: float) -> int:
    errors: list[str] = []
    done = [0] * n_threads

    def worker(k: int) -> None:
        order = list(range(len(JOBS))) * (per_thread // len(JOBS) + 1)
        random.Random(k).shuffle(order)
        try:
            with shared.create_session() as session:
                for n, j in enumerate(order[:per_thread]):
                    prompt, opts = JOBS[j]
                    tokens, text = reference[j]
                    if n % 3 == 2:  # some as streams: the same text, piece by piece
                        got = "".join(session.stream(prompt, max_tokens=MAX_TOKENS, **opts))
                        if got != text:
                            errors.append(f"thread {k} job {j} stream: {got!r} != {text!r}")
                    else:
                        r = session.generate(prompt, max_tokens=MAX_TOKENS, **opts)
                        if r.tokens != tokens or r.text != text:
                            errors.append(f"thread {k} job {j}: {r.tokens} != {tokens}")
                    done[k] += 1
        except BaseException as exc:
            errors.append(f"thread {k}: {type(exc).__name__}: {exc}")

    run_threads([lambda k=k: worker(k) for k in range(n_threads)], timeout)
    assert not errors, errors[:10]
    assert done == [per_thread] * n_threads
    return sum(done)


def test_threads_each_with_a_session_match_sequential(shared, reference) -> None:
    total = _threads_generate(shared, reference, n_threads=4, per_thread=16, timeout=300)
    assert total == 64


@pytest.mark.slow
def test_eight_threads_over_a_thousand_generations(shared, reference) -> None:
    t0 = time.perf_counter()
    total = _threads_generate(shared, reference, n_threads=8, per_thread=128, timeout=900)
    elapsed = time.perf_counter() - t0
    assert total >= 1000
    record("concurrency.generations", total, "generations (8 threads, 1 shared model)")
    record("concurrency.wall_s", round(elapsed, 2), "s")


@pytest.fixture(scope="module")
def reference_top(shared: LoadedModel) -> list[tuple[tuple[int, ...], Any]]:
    """Each job alone in a session again, with the 20 most likely tokens at each place."""
    with shared.create_session() as session:
        return [(r.tokens, r.logprobs) for r in
                (session.generate(prompt, max_tokens=MAX_TOKENS, logprobs=20, **opts)
                 for prompt, opts in JOBS)]


def _parts_only_where_batching_may(got: tuple[int, ...], alone: tuple[int, ...],
                                   top: Any, greedy: bool) -> bool:
    """A batched run may pick another token than the run alone only where float noise
    can decide: batches of other shapes sum in another order (llama.cpp does not promise
    bit-equal logits). Greedy: the two best tokens alone were within 0.25 in
    log-probability; sampled: the token picked is among the 20 most likely alone (a
    token of another request, or garbage, is not)."""
    d = next((i for i, (a, b) in enumerate(zip(alone, got, strict=False)) if a != b), None)
    if d is None:
        return len(got) == len(alone)
    ranked = {token: logprob for token, _, logprob in top[d].top}
    if got[d] not in ranked:
        return False
    return not greedy or top[d].logprob - ranked[got[d]] < 0.25


def test_loaded_model_generate_from_many_threads(shared, reference, reference_top) -> None:
    """The engine: LoadedModel.generate/stream from 8 threads at once, decoded together,
    give what each gives alone in a session (but where float noise decides a pick: see
    _parts_only_where_batching_may), and streams join to their results' text."""
    errors: list[str] = []
    parted: list[int] = []
    count = [0]

    def worker(k: int) -> None:
        try:
            for n in range(8):
                j = (k * 8 + n) % len(JOBS)
                prompt, opts = JOBS[j]
                tokens, text = reference[j]
                if n % 4 == 3:
                    events = list(shared.submit(prompt, max_tokens=MAX_TOKENS, **opts))
                    got = tuple(t for ev in events for t in ev.tokens)
                    got_text = "".join(ev.text for ev in events)
                    ok = got_text == shared.detokenize(got) if got != tokens else \
                        got_text == text
                else:
                    r = shared.generate(prompt, max_tokens=MAX_TOKENS, **opts)
                    got = r.tokens
                    ok = r.text == text if got == tokens else True
                if got != tokens:
                    parted.append(j)
                    ok = ok and _parts_only_where_batching_may(
                        got, reference_top[j][0], reference_top[j][1],
                        opts["temperature"] == 0)
                if not ok:
                    errors.append(f"thread {k} job {j}: {got} against {tokens} alone")
                count[0] += 1
        except BaseException as exc:
            errors.append(f"thread {k}: {type(exc).__name__}: {exc}")

    run_threads([lambda k=k: worker(k) for k in range(8)], timeout=300)
    assert not errors, errors[:10]
    assert count[0] == 64
    assert len(parted) < 64 // 4, parted     # noise decides seldom, not as a rule
    r = shared.generate(JOBS[0][0], max_tokens=MAX_TOKENS, **JOBS[0][1])
    assert r.tokens == reference[0][0]
    assert shared.stats()["requests_running"] == 0 and shared.stats()["kv_cells_used"] == 0


def _eval_in_thread(ctx: Context, tokens: list[int]) -> tuple[threading.Thread, list[object]]:
    """Start ``ctx.eval(tokens)`` in another thread; what it returns or raises lands in
    the list."""
    outcome: list[object] = []

    def long_eval() -> None:
        try:
            outcome.append(ctx.eval(tokens))
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=long_eval, daemon=True)
    worker.start()
    return worker, outcome


# --- one context, two threads -------------------------------------------------------------

def test_core_context_used_by_two_threads_raises(shared: LoadedModel) -> None:
    model = shared.native
    tokens = _long_tokens(shared, 3000)
    short = shared.tokenize("The capital of France is")
    kw = {"n_ctx": LONG.n_ctx, "n_batch": LONG.n_batch,
          "n_ubatch": LONG.n_ubatch, "n_threads": 1}
    with Context(model, **kw) as fresh:
        fresh.eval(short)
        expected = fresh.logits().copy()

    ctx = Context(model, **kw)
    worker, outcome = _eval_in_thread(ctx, tokens)
    try:
        _wait_until_busy(ctx, worker)
        # every operation from this thread is refused while the other one decodes
        for attempt in (lambda: ctx.eval(short), ctx.memory_clear, ctx.save_state,
                        lambda: ctx.seq_rm(0)):
            with pytest.raises(ConcurrentUseError, match="another thread"):
                attempt()
        ctx.cancel()
        worker.join(60)
        assert not worker.is_alive(), "cancel() did not stop the decode"
        assert len(outcome) == 1
        # cancelled mid-way (or, on a very fast machine, finished): never another error
        assert isinstance(outcome[0], GenerationCancelled) or outcome[0] == len(tokens), outcome
        # the context is not damaged: a fresh evaluation gives the same logits
        ctx.memory_clear()
        ctx.eval(short)
        np.testing.assert_array_equal(ctx.logits(), expected)
    finally:
        ctx.cancel()
        worker.join(60)
        ctx.close()


def test_session_used_by_two_threads_raises(shared: LoadedModel) -> None:
    prompt = shared.detokenize(_long_tokens(shared, 3000)[1:])
    short = "Once upon a time"
    with shared.create_session(LONG) as fresh:
        expected = fresh.generate(short, max_tokens=6, temperature=0)

    session = shared.create_session(LONG)
    results: list[object] = []

    def long_generate() -> None:
        try:
            results.append(session.generate(prompt, max_tokens=4, temperature=0))
        except BaseException as exc:
            results.append(exc)

    worker = threading.Thread(target=long_generate, daemon=True)
    worker.start()
    try:
        _wait_until_busy(session.context, worker)
        with pytest.raises(ConcurrentUseError):
            session.generate(short, max_tokens=2)
        with pytest.raises(ConcurrentUseError):
            list(session.stream(short, max_tokens=2))
        with pytest.raises(ConcurrentUseError):
            session.reset()
        t0 = time.perf_counter()
        session.cancel()
        worker.join(60)
        latency = time.perf_counter() - t0
        assert not worker.is_alive()
        (result,) = results
        assert isinstance(result, llamabind.GenerationResult), result
        assert result.finish_reason == "cancelled"
        record("concurrency.session_cancel_during_prompt_eval_s", round(latency, 4), "s")
        # usable afterwards, and correct
        again = session.generate(short, max_tokens=6, temperature=0)
        assert again.tokens == expected.tokens and again.finish_reason == expected.finish_reason
    finally:
        session.cancel()
        worker.join(60)
        session.close()


def test_unfinished_stream_holds_its_session(shared: LoadedModel) -> None:
    """A stream that is not exhausted still owns the session: another thread (or this
    one) gets ConcurrentUseError until the stream is closed."""
    with shared.create_session() as session:
        stream = session.stream("The sky is", max_tokens=8, temperature=0)
        first = next(stream)
        assert first
        errors: list[BaseException] = []

        def other() -> None:
            try:
                session.generate("Hello", max_tokens=1)
            except BaseException as exc:
                errors.append(exc)

        run_threads([other], timeout=60)
        assert len(errors) == 1 and isinstance(errors[0], ConcurrentUseError)
        stream.close()
        assert session.generate("Hello", max_tokens=1, temperature=0).completion_tokens == 1


# --- closing while another thread works -----------------------------------------------------

def test_close_context_while_another_thread_decodes(shared: LoadedModel) -> None:
    model = shared.native
    tokens = _long_tokens(shared, 3000)
    ctx = Context(model, n_ctx=4096, n_batch=512, n_threads=1)
    worker, outcome = _eval_in_thread(ctx, tokens)
    _wait_until_busy(ctx, worker)
    t0 = time.perf_counter()
    ctx.close()                 # returns at once; the decode is cancelled
    returned = time.perf_counter() - t0
    worker.join(60)
    stopped = time.perf_counter() - t0
    assert not worker.is_alive()
    assert ctx.closed
    assert len(outcome) == 1
    assert isinstance(outcome[0], GenerationCancelled) or outcome[0] == len(tokens), outcome
    with pytest.raises(ClosedError):
        ctx.eval(tokens[:4])
    with pytest.raises(ClosedError):
        TokenGenerator(ctx, 1)
    ctx.close()  # idempotent
    record("concurrency.context_close_returned_s", round(returned, 4), "s")
    record("concurrency.context_close_decode_stopped_s", round(stopped, 4), "s")


def test_close_model_while_other_threads_generate(smol_path: str) -> None:
    """model.close() while two threads generate (one on its own session, one through
    the engine): close returns, the session's generation finishes correctly, the
    engine's ends with ClosedError, later calls get ClosedError, and the model's memory
    is released once the last session closes."""
    with Child("concurrency", smol_path) as child:
        res = child.expect("result", timeout=300)
        assert child.wait(60) == 0, child.describe()
    kind, text, n = res["results"]["own"]
    assert kind == "finished", (kind, text)
    assert text == res["expected"] and n > 3
    kind, text, n = res["results"]["pooled"]
    assert kind == "ClosedError" and n >= 3, (kind, text)
    assert res["after"] == {"generate": "ClosedError", "create_session": "ClosedError",
                            "own_session": "ClosedError"}
    # the open session kept the model alive; closing it freed the model (unmapped)
    assert res["still_mapped_with_open_session"] is True
    assert res["mapped_after"] is False
    record("concurrency.model_close_while_generating_returned_s", round(res["close_s"], 4), "s")


# --- close() racing with submits ------------------------------------------------------------

def test_close_races_with_submitting_threads(smol_path: str) -> None:
    """Threads submit while another closes the model: each call returns a result or
    raises ClosedError (never hangs, never another error), and nothing is left
    running afterwards."""
    model = LoadedModel.load(smol_path, context=SMALL)
    outcomes: list[str] = []
    go = threading.Event()

    def worker(k: int) -> None:
        go.wait(60)
        for n in range(6):
            try:
                model.generate(JOBS[(k + n) % len(JOBS)][0], max_tokens=8)
                outcomes.append("ok")
            except ClosedError:
                outcomes.append("closed")
            except BaseException as exc:
                outcomes.append(f"{type(exc).__name__}: {exc}")

    def closer() -> None:
        go.wait(60)
        time.sleep(0.5)
        model.close()

    go.set()
    run_threads([lambda k=k: worker(k) for k in range(6)] + [closer], timeout=300)
    assert len(outcomes) == 36
    assert set(outcomes) <= {"ok", "closed"}, outcomes
    assert "closed" in outcomes
    assert model.closed and model.stats()["requests_running"] == 0


def test_agenerate_bad_prompt_queues_nothing(shared: LoadedModel) -> None:
    """agenerate() that fails before starting (the prompt cannot be tokenized) raises
    and leaves no request behind."""
    import asyncio

    before = shared.stats()["requests_total"]
    with pytest.raises(llamabind.InvalidArgumentError):
        asyncio.run(shared.agenerate("a\0b", max_tokens=1))
    assert shared.stats()["requests_total"] == before

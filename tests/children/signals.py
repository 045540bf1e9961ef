"""Children of tests/test_signals.py: ``python -m children.signals SCENARIO MODEL_PATH``.

Each scenario interrupts work (Ctrl+C, Session.cancel() from another thread, asyncio
task cancellation) and then checks that the session still works and is still right.
A ~4000-token prompt and banned EOG tokens make the work run until it is stopped.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
from typing import Any

import llamabind
from children.channel import say
from llamabind import ContextConfig, LoadedModel

LONG_TEXT = " ".join(f"Line {i}: the value of item {i} is {i * 7 % 100}." for i in range(215))
SHORT = "Once upon a time"


class Shared:
    """What every scenario starts from: the model and the reference check."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.model = LoadedModel.load(path, context=ContextConfig(
            n_ctx=1024, n_batch=64, n_ubatch=64, n_threads=1))
        vocab = self.model.vocab
        self.no_eog = {t: float("-inf") for t in range(vocab.n_tokens) if vocab.is_eog(t)}

    def check_usable(self, session: Any, cfg: ContextConfig, tag: str,
                     reuse_first: str) -> None:
        """The session's next generations equal a fresh session's: plain ones, and ones
        that reuse the session's KV cache for a common prefix (``reuse_first`` is the
        prompt whose prefix the interrupted work left in the cache), so the cache
        bookkeeping after the interruption must be exact."""
        prompts = [reuse_first] + [p for p in (LONG_TEXT[:400], SHORT) if p != reuse_first]
        with self.model.create_session(cfg) as fresh:
            want = [fresh.generate(p, max_tokens=6, temperature=0).tokens for p in prompts]
        got = [session.generate(p, max_tokens=6, temperature=0, reuse_prefix=True)
               for p in prompts]
        plain = session.generate(SHORT, max_tokens=6, temperature=0)
        say(tag, same=[g.tokens for g in got] == want
            and plain.tokens == want[prompts.index(SHORT)],
            got=[list(g.tokens) for g in got], want=[list(w) for w in want],
            reused_cached=got[0].cached_prompt_tokens)


def ctrl_c(sh: Shared) -> None:
    """Ctrl+C during a long prompt evaluation, then during generation."""
    # Python's own Ctrl+C handler, as in any interactive program (a test runner started
    # in the background may hand its children SIGINT ignored, which Python then keeps)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # one decode call for the whole prompt (n_batch >= prompt), split in 512-token
    # ubatches, on a 2-thread pool: Ctrl+C must stop llama.cpp inside that call
    cfg = ContextConfig(n_ctx=4608, n_batch=4608, n_ubatch=512, n_threads=1,
                        n_threads_batch=2)
    session = sh.model.create_session(cfg)
    n_prompt = len(sh.model.tokenize(LONG_TEXT))
    say("eval-start", n_prompt=n_prompt)
    t0 = time.monotonic()
    try:
        session.generate(LONG_TEXT, max_tokens=4, temperature=0)
        say("error", what="the prompt evaluation finished without KeyboardInterrupt")
        sys.exit(1)
    except KeyboardInterrupt:
        t = time.monotonic()
        say("eval-interrupted", t=t, after_s=t - t0, cached=len(session.cached_tokens),
            n_prompt=n_prompt)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # From here on one thread: the checks below are many small batches, and two
    # spinning threads on a busy 2-core machine make each of them slow.
    session.context.set_n_threads(1, 1)
    cfg = cfg.with_(n_threads_batch=1)
    sh.check_usable(session, cfg, "eval-check", LONG_TEXT[:400])

    # Ctrl+C while tokens are being generated (one-token decodes)
    pieces = []
    try:
        for piece in session.stream(SHORT, temperature=0, max_tokens=100000,
                                    logit_bias=sh.no_eog):
            pieces.append(piece)
            if len(pieces) == 5:
                say("gen-start")
        say("error", what="the generation ended without KeyboardInterrupt")
        sys.exit(1)
    except KeyboardInterrupt:
        t = time.monotonic()
        say("gen-interrupted", t=t, pieces=len(pieces), cached=len(session.cached_tokens))
    sh.check_usable(session, cfg, "gen-check", SHORT)
    session.close()
    sh.model.close()
    say("end")


def _wait_busy(ctx: Any, worker: threading.Thread) -> None:
    # state_size() is refused while another thread is inside the context
    while worker.is_alive():
        try:
            ctx.state_size()
        except llamabind.ConcurrentUseError:
            return
        time.sleep(0.002)
    raise AssertionError("the worker finished before it was seen working")


def cancel(sh: Shared) -> None:
    """Session.cancel() from another thread: during the prompt evaluation, during a
    stream, during generate()."""
    cfg = ContextConfig(n_ctx=4608, n_batch=512, n_ubatch=512, n_threads=1)
    session = sh.model.create_session(cfg)

    def cancelled_generate(text: str, settle: float, **kw: Any) -> tuple[Any, float]:
        """generate() in another thread, cancelled ``settle`` seconds after it is seen
        working: its result, and how long after cancel() it returned."""
        out: dict[str, Any] = {}

        def run() -> None:
            out["result"] = session.generate(text, **kw)
            out["t"] = time.monotonic()

        w = threading.Thread(target=run, daemon=True)
        w.start()
        _wait_busy(session.context, w)
        time.sleep(settle)
        t0 = time.monotonic()
        session.cancel()
        w.join(60)
        return out["result"], out["t"] - t0

    # 1. cancel() during the prompt evaluation
    r, latency = cancelled_generate(LONG_TEXT, 0.2, max_tokens=4, temperature=0)
    say("eval-cancelled", latency=latency, finish=r.finish_reason,
        completion=r.completion_tokens, cached=len(session.cached_tokens),
        n_prompt=r.prompt_tokens)
    sh.check_usable(session, cfg, "eval-check", LONG_TEXT[:400])

    # 2. cancel() during generation, seen through a stream: it ends early (EOG is
    #    banned and the context is far from full, so nothing else can end it)
    pieces = []
    ended = {}
    started = threading.Event()

    def run_stream() -> None:
        for piece in session.stream(SHORT, temperature=0, max_tokens=100000,
                                    logit_bias=sh.no_eog):
            pieces.append(piece)
            if len(pieces) == 5:
                started.set()
        ended["t"] = time.monotonic()

    w = threading.Thread(target=run_stream, daemon=True)
    w.start()
    assert started.wait(120)
    t0 = time.monotonic()
    session.cancel()
    w.join(60)
    say("gen-cancelled", latency=ended["t"] - t0, pieces=len(pieces),
        cached=len(session.cached_tokens), n_ctx=session.n_ctx)
    sh.check_usable(session, cfg, "gen-check", SHORT)

    # 3. the same through generate(): finish_reason "cancelled"
    r, latency = cancelled_generate(SHORT, 0.3, max_tokens=100000, temperature=0,
                                    logit_bias=sh.no_eog)
    say("generate-cancelled", latency=latency, finish=r.finish_reason,
        completion=r.completion_tokens)
    sh.check_usable(session, cfg, "generate-check", SHORT)
    session.close()
    sh.model.close()
    say("end")


class Ticker:
    """Measures the event loop's responsiveness: the longest gap between ticks of a
    coroutine that asks to run every 5 ms."""

    def __init__(self) -> None:
        self.max_gap = 0.0
        self.ticks = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(0.005)
            now = loop.time()
            self.max_gap = max(self.max_gap, now - last)
            self.ticks += 1
            last = now


async def _asyncio_main(big: LoadedModel, no_eog: dict[int, float]) -> None:
    # reference results, computed synchronously
    want_short = big.generate(SHORT, max_tokens=8, temperature=0)
    want_stream = big.generate(SHORT, max_tokens=40, temperature=0, logit_bias=no_eog).text
    assert big.stats()["requests_running"] == 0

    async def until_pool_has(n: int, timeout: float = 60) -> float:
        # the engine has ended the request (and freed its sequence)
        t0 = time.monotonic()
        while big.stats()["requests_running"] > 0:
            if time.monotonic() - t0 > timeout:
                raise AssertionError("the worker thread did not stop")
            await asyncio.sleep(0.001)
        return time.monotonic()

    ticker = Ticker()
    tick_task = asyncio.create_task(ticker.run())

    async def cancel_agenerate(tag: str, settle: float, text: str, **kw: Any) -> None:
        """Start agenerate, cancel it after ``settle`` seconds: when CancelledError came,
        when the worker thread stopped, and how the event loop ticked meanwhile."""
        ticker.max_gap, ticks0 = 0.0, ticker.ticks
        task = asyncio.create_task(big.agenerate(text, **kw))
        await asyncio.sleep(settle)
        assert not task.done()
        gap, ticks = ticker.max_gap, ticker.ticks - ticks0
        t0 = time.monotonic()
        task.cancel()
        try:
            await task
            raise AssertionError("agenerate was not cancelled")
        except asyncio.CancelledError:
            t_raised = time.monotonic()
        t_stopped = await until_pool_has(1)
        say(tag, raised=t_raised - t0, stopped=t_stopped - t0, max_gap=gap, ticks=ticks)

    # a normal agenerate gives the synchronous result
    got = await big.agenerate(SHORT, max_tokens=8, temperature=0)
    say("agenerate", same=got.tokens == want_short.tokens)

    # cancel agenerate during the long prompt evaluation
    await cancel_agenerate("agenerate-eval-cancelled", 1.0, LONG_TEXT, max_tokens=4,
                           temperature=0)
    # cancel agenerate during generation; the loop keeps ticking meanwhile
    await cancel_agenerate("agenerate-gen-cancelled", 1.5, SHORT, max_tokens=100000,
                           temperature=0, logit_bias=no_eog)

    # astream: pieces arrive while the loop keeps ticking; cancelling the consuming
    # task stops the generation
    pieces = []
    twenty = asyncio.Event()

    async def consume() -> None:
        async for piece in big.astream(SHORT, temperature=0, max_tokens=100000,
                                       logit_bias=no_eog):
            pieces.append(piece)
            if len(pieces) == 20:
                twenty.set()

    ticker.max_gap, ticks0 = 0.0, ticker.ticks
    task = asyncio.create_task(consume())
    await asyncio.wait_for(twenty.wait(), 120)
    await asyncio.sleep(0.3)
    gap_stream, ticks_stream = ticker.max_gap, ticker.ticks - ticks0
    t0 = time.monotonic()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    t_stopped = await until_pool_has(1)
    text = "".join(pieces)
    say("astream-cancelled", stopped=t_stopped - t0, max_gap=gap_stream, ticks=ticks_stream,
        pieces=len(pieces), prefix_ok=text.startswith(want_stream)
        if len(text) >= len(want_stream) else want_stream.startswith(text))

    # leaving an astream loop early (break) also stops the generation
    n = 0
    async for _ in big.astream(SHORT, temperature=0, max_tokens=100000, logit_bias=no_eog):
        n += 1
        if n == 5:
            break
    t0 = time.monotonic()
    t_stopped = await until_pool_has(1)
    say("astream-break", stopped=t_stopped - t0)

    # everything still works, and gives the right answer
    got = await big.agenerate(SHORT, max_tokens=8, temperature=0)
    say("after", same=got.tokens == want_short.tokens)
    tick_task.cancel()


def asyncio_cancel(sh: Shared) -> None:
    """asyncio task cancellation of agenerate/astream, and the event loop's
    responsiveness meanwhile."""
    big = LoadedModel.load(sh.path, context=ContextConfig(
        n_ctx=4608, n_batch=512, n_ubatch=512, n_threads=1))
    asyncio.run(_asyncio_main(big, sh.no_eog))
    big.close()
    sh.model.close()
    say("end")


SCENARIOS = {"ctrl_c": ctrl_c, "cancel": cancel, "asyncio": asyncio_cancel}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]](Shared(sys.argv[2]))

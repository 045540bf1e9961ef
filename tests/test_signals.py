"""Interrupting work: Ctrl+C (SIGINT) during a long prompt evaluation and during
generation, Session.cancel() from another thread, and asyncio task cancellation.

Each scenario runs in a child process (Ctrl+C is delivered to the child alone). After
every interruption the child checks that the session still works and is still right:
its next greedy generation equals one from a fresh session. Measured latencies are
printed (pytest -s) and kept in build/reliability-metrics.json.

Bounds (generous; the measured figures are typically tens of milliseconds):
Ctrl+C and cancel() must take effect within 2 s, and the asyncio event loop must never
go 1 s without running while a generation is in progress.
"""

from __future__ import annotations

import signal
import time

import pytest
from _rel_helpers import Child, record

pytestmark = pytest.mark.model

INTERRUPT_BOUND_S = 2.0
LOOP_GAP_BOUND_S = 1.0

# Shared by the children: a ~4000-token prompt, EOG tokens banned so a generation runs
# until it is stopped, and the reference check.
COMMON = r'''
import signal, threading
import llamabind
from llamabind import ContextConfig, LoadedModel

path = sys.argv[1]
model = LoadedModel.load(path, context=ContextConfig(
    n_ctx=1024, n_batch=64, n_ubatch=64, n_threads=1))
vocab = model.vocab
NO_EOG = {t: float("-inf") for t in range(vocab.n_tokens) if vocab.is_eog(t)}
LONG_TEXT = " ".join(f"Line {i}: the value of item {i} is {i * 7 % 100}." for i in range(215))
SHORT = "Once upon a time"

def check_usable(session, cfg, tag, reuse_first):
    """The session's next generations equal a fresh session's: plain ones, and ones
    that reuse the session's KV cache for a common prefix (``reuse_first`` is the
    prompt whose prefix the interrupted work left in the cache), so the cache
    bookkeeping after the interruption must be exact."""
    prompts = [reuse_first] + [p for p in (LONG_TEXT[:400], SHORT) if p != reuse_first]
    with model.create_session(cfg) as fresh:
        want = [fresh.generate(p, max_tokens=6, temperature=0).tokens for p in prompts]
    got = [session.generate(p, max_tokens=6, temperature=0, reuse_prefix=True)
           for p in prompts]
    plain = session.generate(SHORT, max_tokens=6, temperature=0)
    say(tag, same=[g.tokens for g in got] == want and plain.tokens == want[prompts.index(SHORT)],
        got=[list(g.tokens) for g in got], want=[list(w) for w in want],
        reused_cached=got[0].cached_prompt_tokens)
'''

CTRL_C_CHILD = COMMON + r'''
# Python's own Ctrl+C handler, as in any interactive program (a test runner started in
# the background may hand its children SIGINT ignored, which Python then keeps)
signal.signal(signal.SIGINT, signal.default_int_handler)
# one decode call for the whole prompt (n_batch >= prompt), split in 512-token ubatches,
# on a 2-thread pool: Ctrl+C must stop llama.cpp inside that call
cfg = ContextConfig(n_ctx=4608, n_batch=4608, n_ubatch=512, n_threads=1,
                    threads_batch=2)
session = model.create_session(cfg)
n_prompt = len(model.tokenize(LONG_TEXT))
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
# From here on one thread: the checks below are many small batches, and two spinning
# threads on a busy 2-core machine make each of them slow.
session.context.set_n_threads(1, 1)
cfg = cfg.with_(threads_batch=1)
check_usable(session, cfg, "eval-check", LONG_TEXT[:400])

# Ctrl+C while tokens are being generated (one-token decodes)
opts = dict(temperature=0, max_tokens=100000, logit_bias=NO_EOG)
pieces = []
try:
    for piece in session.stream(SHORT, **opts):
        pieces.append(piece)
        if len(pieces) == 5:
            say("gen-start")
    say("error", what="the generation ended without KeyboardInterrupt")
    sys.exit(1)
except KeyboardInterrupt:
    t = time.monotonic()
    say("gen-interrupted", t=t, pieces=len(pieces), cached=len(session.cached_tokens))
check_usable(session, cfg, "gen-check", SHORT)
session.close()
model.close()
say("end")
'''


def test_ctrl_c_during_prompt_eval_and_generation(smol_path: str) -> None:
    with Child(CTRL_C_CHILD, smol_path) as child:
        start = child.expect("eval-start", timeout=120)
        time.sleep(0.3)  # let the evaluation get well under way
        sent = child.signal(signal.SIGINT)
        got = child.expect("eval-interrupted", timeout=60)
        eval_latency = got["t"] - sent
        # it stopped inside the evaluation: not all the prompt reached the KV cache
        assert got["cached"] < start["n_prompt"], got
        check = child.expect("eval-check", timeout=300)
        assert check["same"], check

        child.expect("gen-start", timeout=120)
        time.sleep(0.2)
        sent = child.signal(signal.SIGINT)
        got = child.expect("gen-interrupted", timeout=60)
        gen_latency = got["t"] - sent
        assert got["pieces"] >= 5
        check = child.expect("gen-check", timeout=300)
        assert check["same"], check
        assert check["reused_cached"] > 0, check  # the prefix really came from the cache
        child.expect("end", timeout=60)
        assert child.wait(60) == 0, child.describe()

    record("signals.ctrl_c_prompt_eval_latency_s", round(eval_latency, 4), "s")
    record("signals.ctrl_c_prompt_eval_prompt_tokens", start["n_prompt"], "tokens")
    record("signals.ctrl_c_generation_latency_s", round(gen_latency, 4), "s")
    assert 0 <= eval_latency < INTERRUPT_BOUND_S
    assert 0 <= gen_latency < INTERRUPT_BOUND_S


CANCEL_CHILD = COMMON + r'''
cfg = ContextConfig(n_ctx=4608, n_batch=512, n_ubatch=512, n_threads=1)
session = model.create_session(cfg)

def wait_busy(ctx, worker):
    # state_size() is refused while another thread is inside the context
    while worker.is_alive():
        try:
            ctx.state_size()
        except llamabind.ConcurrentUseError:
            return
        time.sleep(0.002)
    raise AssertionError("the worker finished before it was seen working")

# 1. cancel() during the prompt evaluation
out = {}
def run_generate(text, **kw):
    out["result"] = session.generate(text, **kw)
    out["t"] = time.monotonic()

w = threading.Thread(target=run_generate, args=(LONG_TEXT,),
                     kwargs=dict(max_tokens=4, temperature=0), daemon=True)
w.start()
wait_busy(session.context, w)
time.sleep(0.2)
t0 = time.monotonic()
session.cancel()
w.join(60)
r = out["result"]
say("eval-cancelled", latency=out["t"] - t0, finish=r.finish_reason,
    completion=r.completion_tokens, cached=len(session.cached_tokens),
    n_prompt=r.prompt_tokens)
check_usable(session, cfg, "eval-check", LONG_TEXT[:400])

# 2. cancel() during generation, seen through a stream: it ends early (EOG is banned
#    and the context is far from full, so nothing else can end it)
pieces = []
ended = {}
started = threading.Event()
def run_stream():
    for piece in session.stream(SHORT, temperature=0, max_tokens=100000, logit_bias=NO_EOG):
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
check_usable(session, cfg, "gen-check", SHORT)

# 3. the same through generate(): finish_reason "cancelled"
w = threading.Thread(target=run_generate, args=(SHORT,),
                     kwargs=dict(max_tokens=100000, temperature=0, logit_bias=NO_EOG),
                     daemon=True)
w.start()
wait_busy(session.context, w)
time.sleep(0.3)
t0 = time.monotonic()
session.cancel()
w.join(60)
r = out["result"]
say("generate-cancelled", latency=out["t"] - t0, finish=r.finish_reason,
    completion=r.completion_tokens)
check_usable(session, cfg, "generate-check", SHORT)
session.close()
model.close()
say("end")
'''


def test_session_cancel_from_another_thread(smol_path: str) -> None:
    with Child(CANCEL_CHILD, smol_path) as child:
        ev = child.expect("eval-cancelled", timeout=180)
        assert ev["finish"] == "cancelled" and ev["completion"] == 0, ev
        assert ev["cached"] < ev["n_prompt"], ev
        check = child.expect("eval-check", timeout=300)
        assert check["same"], check

        gen = child.expect("gen-cancelled", timeout=180)
        assert 5 <= gen["pieces"] < gen["n_ctx"] - 10, gen
        check = child.expect("gen-check", timeout=300)
        assert check["same"], check

        last = child.expect("generate-cancelled", timeout=180)
        assert last["finish"] == "cancelled", last
        check = child.expect("generate-check", timeout=300)
        assert check["same"], check
        child.expect("end", timeout=60)
        assert child.wait(60) == 0, child.describe()

    record("signals.cancel_prompt_eval_latency_s", round(ev["latency"], 4), "s")
    record("signals.cancel_generation_latency_s", round(gen["latency"], 4), "s")
    record("signals.cancel_generate_latency_s", round(last["latency"], 4), "s")
    for fig in (ev, gen, last):
        assert 0 <= fig["latency"] < INTERRUPT_BOUND_S, fig


ASYNC_CHILD = COMMON + r'''
import asyncio

big = LoadedModel.load(path, context=ContextConfig(
    n_ctx=4608, n_batch=512, n_ubatch=512, n_threads=1))
# reference results, computed synchronously
want_short = big.generate(SHORT, max_tokens=8, temperature=0)
want_stream = big.generate(SHORT, max_tokens=40, temperature=0, logit_bias=NO_EOG).text
assert big.stats()["requests_running"] == 0

class Ticker:
    """Measures the event loop's responsiveness: the longest gap between ticks of a
    coroutine that asks to run every 5 ms."""
    def __init__(self):
        self.max_gap = 0.0
        self.ticks = 0
    async def run(self):
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(0.005)
            now = loop.time()
            self.max_gap = max(self.max_gap, now - last)
            self.ticks += 1
            last = now

async def until_pool_has(n, timeout=60):
    # the engine has ended the request (and freed its sequence)
    t0 = time.monotonic()
    while big.stats()["requests_running"] > 0:
        if time.monotonic() - t0 > timeout:
            raise AssertionError("the worker thread did not stop")
        await asyncio.sleep(0.001)
    return time.monotonic()

async def main():
    ticker = Ticker()
    tick_task = asyncio.create_task(ticker.run())

    # a normal agenerate gives the synchronous result
    got = await big.agenerate(SHORT, max_tokens=8, temperature=0)
    say("agenerate", same=got.tokens == want_short.tokens)

    # cancel agenerate during the long prompt evaluation
    ticker.max_gap, ticks0 = 0.0, ticker.ticks
    task = asyncio.create_task(big.agenerate(LONG_TEXT, max_tokens=4, temperature=0))
    await asyncio.sleep(1.0)
    assert not task.done()
    gap_eval, ticks_eval = ticker.max_gap, ticker.ticks - ticks0
    t0 = time.monotonic()
    task.cancel()
    try:
        await task
        raise AssertionError("agenerate was not cancelled")
    except asyncio.CancelledError:
        t_raised = time.monotonic()
    t_stopped = await until_pool_has(1)
    say("agenerate-eval-cancelled", raised=t_raised - t0, stopped=t_stopped - t0,
        max_gap=gap_eval, ticks=ticks_eval)

    # cancel agenerate during generation; the loop keeps ticking meanwhile
    ticker.max_gap, ticks0 = 0.0, ticker.ticks
    task = asyncio.create_task(big.agenerate(SHORT, max_tokens=100000, temperature=0,
                                             logit_bias=NO_EOG))
    await asyncio.sleep(1.5)
    assert not task.done()
    gap_generate, ticks_generate = ticker.max_gap, ticker.ticks - ticks0
    t0 = time.monotonic()
    task.cancel()
    try:
        await task
        raise AssertionError("agenerate was not cancelled")
    except asyncio.CancelledError:
        t_raised = time.monotonic()
    t_stopped = await until_pool_has(1)
    say("agenerate-gen-cancelled", raised=t_raised - t0, stopped=t_stopped - t0,
        max_gap=gap_generate, ticks=ticks_generate)

    # astream: pieces arrive while the loop keeps ticking; cancelling the consuming
    # task stops the generation
    pieces = []
    twenty = asyncio.Event()
    async def consume():
        async for piece in big.astream(SHORT, temperature=0, max_tokens=100000,
                                       logit_bias=NO_EOG):
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
    async for piece in big.astream(SHORT, temperature=0, max_tokens=100000, logit_bias=NO_EOG):
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

asyncio.run(main())
big.close()
model.close()
say("end")
'''


def test_asyncio_cancellation_and_loop_responsiveness(smol_path: str) -> None:
    with Child(ASYNC_CHILD, smol_path) as child:
        assert child.expect("agenerate", timeout=180)["same"]
        ev = child.expect("agenerate-eval-cancelled", timeout=180)
        gen = child.expect("agenerate-gen-cancelled", timeout=180)
        stream = child.expect("astream-cancelled", timeout=180)
        brk = child.expect("astream-break", timeout=180)
        assert child.expect("after", timeout=180)["same"]
        child.expect("end", timeout=60)
        assert child.wait(60) == 0, child.describe()

    assert ev["ticks"] > 10 and gen["ticks"] > 10 and stream["ticks"] > 10
    assert stream["pieces"] >= 20 and stream["prefix_ok"], stream
    record("signals.asyncio_cancel_prompt_eval_raised_s", round(ev["raised"], 4), "s")
    record("signals.asyncio_cancel_prompt_eval_stopped_s", round(ev["stopped"], 4), "s")
    record("signals.asyncio_cancel_generation_stopped_s", round(gen["stopped"], 4), "s")
    record("signals.asyncio_astream_cancel_stopped_s", round(stream["stopped"], 4), "s")
    record("signals.asyncio_astream_break_stopped_s", round(brk["stopped"], 4), "s")
    record("signals.asyncio_loop_max_gap_prompt_eval_s", round(ev["max_gap"], 4), "s")
    record("signals.asyncio_loop_max_gap_generate_s", round(gen["max_gap"], 4), "s")
    record("signals.asyncio_loop_max_gap_astream_s", round(stream["max_gap"], 4), "s")
    for fig in (ev, gen, stream, brk):
        assert 0 <= fig["stopped"] < INTERRUPT_BOUND_S, fig
    assert ev["max_gap"] < LOOP_GAP_BOUND_S, ev
    assert gen["max_gap"] < LOOP_GAP_BOUND_S, gen
    assert stream["max_gap"] < LOOP_GAP_BOUND_S, stream

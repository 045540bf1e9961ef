"""Children of tests/test_resources.py: ``python -m children.resources SCENARIO MODEL_PATH
[MODE]``.

Memory is measured here, in a process that runs nothing else: RSS from
/proc/self/status, and whether the model file is still memory-mapped.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from children.channel import mapped, rss_kb, say
from llamabind import ClosedError, Context, ContextConfig, LoadedModel, Model, Sampler

SMALL = ContextConfig(n_ctx=128, n_batch=32, n_ubatch=32, n_threads=1)


def load_close(path: str) -> None:
    """200 load/close cycles: RSS before and after."""
    def cycle(i: int) -> None:
        # mostly the default (mmap); every 10th without mmap: weights in anonymous memory
        m = LoadedModel.load(path, context=SMALL, use_mmap=(i % 10 != 5))
        if i % 4 == 0:
            with m.create_session() as s:
                s.generate("Hello", max_tokens=1, temperature=0)
        m.close()

    for i in range(20):          # warm-up: allocator arenas, caches, lazy imports
        cycle(i)
    gc.collect()
    base = rss_kb()
    t0 = time.monotonic()
    samples = []
    for i in range(200):
        cycle(i)
        if i % 50 == 49:
            samples.append(rss_kb())
    gc.collect()
    say("result", base=base, end=rss_kb(), samples=samples, seconds=time.monotonic() - t0,
        mapped=mapped(path))


def generations(path: str) -> None:
    """2000 generations of every kind: RSS before and after."""
    model = LoadedModel.load(path, context=SMALL)
    own = model.create_session()
    prompts = ["Hello", "The sky is", "One, two,", "Paris is"]
    messages = [{"role": "user", "content": "Hi"}]

    def one(i: int) -> object:
        p = prompts[i % 4]
        kind = i % 5
        if kind == 0:
            return model.generate(p, max_tokens=1, temperature=0)            # pooled, greedy
        if kind == 1:
            return own.generate(p, max_tokens=2, temperature=0.8, seed=i)   # sampler chain
        if kind == 2:
            return "".join(own.stream(p, max_tokens=2, temperature=0))       # stream
        if kind == 3:
            return own.generate(p, max_tokens=1, temperature=0, reuse_prefix=True,
                                logit_bias={0: -5.0}, repeat_penalty=1.1)     # more samplers
        return model.chat(messages, max_tokens=1, temperature=0)             # chat template

    for i in range(100):         # warm-up
        one(i)
    gc.collect()
    base = rss_kb()
    t0 = time.monotonic()
    for i in range(2000):
        one(i)
    gc.collect()
    say("result", base=base, end=rss_kb(), n=2000, seconds=time.monotonic() - t0)
    own.close()
    model.close()


def close_frees(path: str) -> None:
    """RSS at each step of loading and closing, with the garbage collector off."""
    # warm-up: llama.cpp's one-time global state, and the allocator's arenas
    with Model(path, use_mmap=False) as m, Context(m, n_ctx=4096, n_batch=64,
                                                   n_threads=1) as c:
        c.eval(m.vocab.tokenize("Hello world"))
    gc.collect()
    gc.disable()            # nothing below may depend on the garbage collector
    r0 = rss_kb()
    model = Model(path, use_mmap=False)        # weights in anonymous memory
    r1 = rss_kb()
    ctx = Context(model, n_ctx=4096, n_batch=64, n_ubatch=64, n_threads=1)
    ctx.eval(model.vocab.tokenize("Hello world"))
    r2 = rss_kb()
    ctx.close()
    r3 = rss_kb()
    model.close()
    r4 = rss_kb()

    # the high-level API, and a model loaded with mmap: its file is unmapped at close
    lm = LoadedModel.load(path, context=ContextConfig(n_ctx=4096, n_threads=1))
    lm.generate("Hello", max_tokens=2, temperature=0)        # the engine has its context now
    s = lm.create_session()
    s.generate("Hello", max_tokens=2, temperature=0)
    m1 = mapped(path)
    r5 = rss_kb()
    s.close()
    r6 = rss_kb()
    lm.close()
    r7 = rss_kb()
    say("result", r=[r0, r1, r2, r3, r4, r5, r6, r7], mapped_open=m1,
        mapped_closed=mapped(path), gc_enabled=gc.isenabled())


def _closed_errors(calls: list[Callable[[], object]]) -> list[str]:
    errors = []
    for call in calls:
        try:
            call()
        except ClosedError:
            errors.append("ClosedError")
    return errors


def context_managers(path: str) -> None:
    """``with`` blocks close everything, also when an exception leaves them."""
    with Model(path) as m, Context(m, n_ctx=128, n_threads=1) as c, Sampler() as smp:
        smp.add_greedy()
        c.eval(m.vocab.tokenize("Hello"))
        inside = mapped(path)
    closed = [m.closed, c.closed, smp.closed]
    errors = _closed_errors([lambda: m.vocab, lambda: c.eval([1]), lambda: Context(m)])
    say("core", inside=inside, closed=closed, errors=errors, mapped_after=mapped(path))

    try:
        with LoadedModel.load(path, context=SMALL) as lm:
            with lm.create_session() as s:
                s.generate("Hello", max_tokens=1)
                raise KeyError("boom")
    except KeyError:
        pass
    errors = _closed_errors([lambda: lm.generate("x"), lambda: s.generate("x")])
    say("api", closed=[lm.closed, s.closed], errors=errors, mapped_after=mapped(path))


def unclosed(path: str) -> None:
    """Objects left open and dropped: the ResourceWarnings shown, and whether the
    model file is still mapped afterwards."""
    def run(make: Callable[[], None]) -> tuple[list[str], bool]:
        seen = []

        def show(message: Any, category: type[Warning], *args: Any, **kw: Any) -> None:
            if issubclass(category, ResourceWarning):
                seen.append(str(message).split(" '")[0])

        with warnings.catch_warnings():
            warnings.simplefilter("always", ResourceWarning)
            warnings.showwarning = show
            make()
            # a model's engine thread holds the engine until it has been idle for a few
            # seconds, then ends: only then can a model dropped unclosed be collected
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and any(
                    t.name == "llamabind-engine" for t in threading.enumerate()):
                time.sleep(0.05)
            gc.collect()
        return seen, mapped(path)

    def core() -> None:
        m = Model(path)
        c = Context(m, n_ctx=128, n_threads=1)
        c.eval(m.vocab.tokenize("Hello"))

    def api() -> None:
        lm = LoadedModel.load(path, context=SMALL)
        lm.generate("Hello", max_tokens=1, temperature=0)   # the engine has its context now
        s = lm.create_session()
        s.generate("Hello", max_tokens=1, temperature=0)

    def cycle() -> None:
        # a reference cycle holds the context: only the garbage collector can free it
        m = Model(path)
        c = Context(m, n_ctx=128, n_threads=1)
        holder: dict[str, object] = {"ctx": c}
        holder["self"] = holder

    say("core", result=run(core))
    say("api", result=run(api))
    say("cycle", result=run(cycle))


def unclosed_recorded(path: str) -> None:
    """What pytest (and any code using catch_warnings(record=True)) does: keep the
    warning. A warning raised while an object is being destroyed must not reference
    it: the memory is freed right after, and the recorded warning would point at freed
    memory (touching it, e.g. repr(caught[0].source), crashes)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        m = Model(path)
        del m
    say("recorded", n=len(caught), source_is_none=caught[0].source is None)


def unclosed_strict(path: str) -> None:
    """Run with ``-W error::ResourceWarning``."""
    m = Model(path)
    del m
    say("after")


# What shutdown() leaves open, alive until the interpreter exits.
LEFT_OPEN: dict[str, Any] = {}


def shutdown(path: str, mode: str = "none") -> None:
    """Exit with objects left open and (``mode``) daemon threads still generating or
    evaluating: the process must end cleanly."""
    lm = LEFT_OPEN["lm"] = LoadedModel.load(path, context=SMALL)
    lm.generate("Hello", max_tokens=1, temperature=0)          # the engine left with its context
    s = LEFT_OPEN["s"] = lm.create_session()                    # session left open
    s.generate("Hello", max_tokens=1, temperature=0)
    core_model = LEFT_OPEN["core_model"] = Model(path)          # core objects left open
    core_ctx = LEFT_OPEN["core_ctx"] = Context(core_model, n_ctx=4096, n_batch=4096,
                                               n_threads=1)
    LEFT_OPEN["smp"] = Sampler().add_top_k(5).add_dist(1)
    vocab = lm.vocab
    no_eog = {t: float("-inf") for t in range(vocab.n_tokens) if vocab.is_eog(t)}
    busy = threading.Event()

    def generate_forever() -> None:
        worker = lm.create_session()
        while True:
            for i, _ in enumerate(worker.stream("Tell me a story", temperature=0,
                                                max_tokens=100000, logit_bias=no_eog)):
                if i == 3:
                    busy.set()

    def eval_forever() -> None:
        text = " ".join(f"item {i} costs {i} coins." for i in range(600))
        tokens = core_model.vocab.tokenize(text)[:4000]
        while True:
            core_ctx.memory_clear()
            busy.set()
            core_ctx.eval(tokens)

    if mode in ("generate", "both"):
        threading.Thread(target=generate_forever, daemon=True).start()
    if mode in ("eval", "both"):
        threading.Thread(target=eval_forever, daemon=True).start()
    if mode != "none":
        assert busy.wait(120)
        time.sleep(0.2)
    say("exiting")
    if mode == "both":
        sys.exit(0)


SCENARIOS: dict[str, Callable[..., None]] = {
    "load_close": load_close, "generations": generations, "close_frees": close_frees,
    "context_managers": context_managers, "unclosed": unclosed,
    "unclosed_recorded": unclosed_recorded, "unclosed_strict": unclosed_strict,
    "shutdown": shutdown,
}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]](*sys.argv[2:])

"""Memory and lifetime: no growth over many loads and generations, close() frees
native memory at once (no garbage collection needed), context managers, ResourceWarning
for objects left open, and a clean interpreter exit with objects left open and a
daemon thread still generating.

Everything runs in child processes: RSS (VmRSS from /proc/self/status) is measured
in a process that runs nothing else, and a crash at exit shows as a signal there.
A model loaded with mmap (the default) is freed when its file is no longer mapped
(/proc/self/maps); one loaded without mmap when the RSS drops by its size.
"""

from __future__ import annotations

import pytest
from _rel_helpers import messages_by_tag, record, run_child

pytestmark = pytest.mark.model

GROWTH_LIMIT_KB = 20 * 1024

PRELUDE = r'''
import gc, threading, warnings
import llamabind
from llamabind import ClosedError, Context, ContextConfig, LoadedModel, Model, Sampler
path = sys.argv[1]
SMALL = ContextConfig(n_ctx=128, n_batch=32, n_ubatch=32, n_threads=1)
'''


def _ok(child) -> None:
    rc = child.proc.returncode
    assert rc == 0, f"child exited with {rc} (negative: killed by that signal)\n" + child.describe()
    assert "Fatal Python error" not in child.stderr, child.describe()


# --- no growth ------------------------------------------------------------------------------

LOAD_CLOSE = PRELUDE + r'''
def cycle(i):
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
'''


@pytest.mark.slow
def test_200_load_close_cycles_do_not_grow_rss(smol_path: str) -> None:
    child, msgs = run_child(LOAD_CLOSE, smol_path, timeout=600)
    _ok(child)
    res = messages_by_tag(msgs)["result"]
    growth = res["end"] - res["base"]
    record("resources.load_close_200_rss_growth_kb", growth, "kB")
    record("resources.load_close_200_seconds", round(res["seconds"], 1), "s")
    assert not res["mapped"]
    assert growth < GROWTH_LIMIT_KB, res


GENERATIONS = PRELUDE + r'''
model = LoadedModel.load(path, context=SMALL)
own = model.create_session()
prompts = ["Hello", "The sky is", "One, two,", "Paris is"]
messages = [{"role": "user", "content": "Hi"}]

def one(i):
    p = prompts[i % 4]
    kind = i % 5
    if kind == 0:
        r = model.generate(p, max_tokens=1, temperature=0)               # pooled, greedy
    elif kind == 1:
        r = own.generate(p, max_tokens=2, temperature=0.8, seed=i)      # sampler chain
    elif kind == 2:
        r = "".join(own.stream(p, max_tokens=2, temperature=0))          # stream
    elif kind == 3:
        r = own.generate(p, max_tokens=1, temperature=0, reuse_prefix=True,
                         logit_bias={0: -5.0}, repeat_penalty=1.1)         # more samplers
    else:
        r = model.chat(messages, max_tokens=1, temperature=0)            # chat template
    return r

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
'''


@pytest.mark.slow
def test_2000_generations_do_not_grow_rss(smol_path: str) -> None:
    child, msgs = run_child(GENERATIONS, smol_path, timeout=600)
    _ok(child)
    res = messages_by_tag(msgs)["result"]
    growth = res["end"] - res["base"]
    record("resources.generations_2000_rss_growth_kb", growth, "kB")
    record("resources.generations_2000_seconds", round(res["seconds"], 1), "s")
    assert growth < GROWTH_LIMIT_KB, res


# --- close() frees at once ------------------------------------------------------------------

CLOSE_FREES = PRELUDE + r'''
# warm-up: llama.cpp's one-time global state, and the allocator's arenas
with Model(path, use_mmap=False) as m, Context(m, n_ctx=4096, n_batch=64, n_threads=1) as c:
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
lm.generate("Hello", max_tokens=2, temperature=0)        # leaves a pooled session
s = lm.create_session()
s.generate("Hello", max_tokens=2, temperature=0)
m1 = mapped(path)
r5 = rss_kb()
s.close()
r6 = rss_kb()
lm.close()
r7 = rss_kb()
say("result", r=[r0, r1, r2, r3, r4, r5, r6, r7], mapped_open=m1, mapped_closed=mapped(path),
    gc_enabled=gc.isenabled())
'''


def test_close_frees_native_memory_at_once(smol_path: str) -> None:
    child, msgs = run_child(CLOSE_FREES, smol_path, timeout=180)
    _ok(child)
    res = messages_by_tag(msgs)["result"]
    r0, r1, r2, r3, r4, r5, r6, r7 = res["r"]
    mb = 1024
    # loading put the weights in memory, and close() gave them back
    assert r1 - r0 > 60 * mb, res
    assert r3 - r4 > 0.8 * (r1 - r0), res
    # the context's KV cache (4096 cells) was freed by ctx.close()
    assert r2 - r3 > 20 * mb, res
    assert r4 - r0 < 10 * mb, res
    # LoadedModel: session and pooled session KV caches, then the mapped file
    assert r5 - r6 > 20 * mb, res
    assert r6 - r7 > 20 * mb, res
    assert res["mapped_open"] is True and res["mapped_closed"] is False
    record("resources.close_model_freed_kb", r3 - r4, "kB")
    record("resources.close_context_freed_kb", r2 - r3, "kB")


CONTEXT_MANAGERS = PRELUDE + r'''
with Model(path) as m, Context(m, n_ctx=128, n_threads=1) as c, Sampler() as smp:
    smp.add_greedy()
    c.eval(m.vocab.tokenize("Hello"))
    inside = mapped(path)
closed = [m.closed, c.closed, smp.closed]
errors = []
for call in (lambda: m.vocab, lambda: c.eval([1]), lambda: Context(m)):
    try:
        call()
    except ClosedError:
        errors.append("ClosedError")
say("core", inside=inside, closed=closed, errors=errors, mapped_after=mapped(path))

try:
    with LoadedModel.load(path, context=SMALL) as lm:
        with lm.create_session() as s:
            s.generate("Hello", max_tokens=1)
            raise KeyError("boom")
except KeyError:
    pass
errors = []
for call in (lambda: lm.generate("x"), lambda: s.generate("x")):
    try:
        call()
    except ClosedError:
        errors.append("ClosedError")
say("api", closed=[lm.closed, s.closed], errors=errors, mapped_after=mapped(path))
'''


def test_context_managers_close_everything(smol_path: str) -> None:
    child, msgs = run_child(CONTEXT_MANAGERS, smol_path, timeout=120)
    _ok(child)
    got = messages_by_tag(msgs)
    assert got["core"] == {"inside": True, "closed": [True, True, True],
                           "errors": ["ClosedError"] * 3, "mapped_after": False}
    assert got["api"] == {"closed": [True, True], "errors": ["ClosedError"] * 2,
                          "mapped_after": False}


# --- ResourceWarning ------------------------------------------------------------------------

UNCLOSED = PRELUDE + r'''
def unclosed(make):
    """Run make() (which leaves objects open and drops them); return the
    ResourceWarnings shown, and whether the model file is still mapped."""
    seen = []
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ResourceWarning):
            seen.append(str(message).split(" '")[0])
    with warnings.catch_warnings():
        warnings.simplefilter("always", ResourceWarning)
        warnings.showwarning = show
        make()
        gc.collect()
    return seen, mapped(path)

def core():
    m = Model(path)
    c = Context(m, n_ctx=128, n_threads=1)
    c.eval(m.vocab.tokenize("Hello"))

def api():
    lm = LoadedModel.load(path, context=SMALL)
    lm.generate("Hello", max_tokens=1, temperature=0)   # a pooled session stays open
    s = lm.create_session()
    s.generate("Hello", max_tokens=1, temperature=0)

def cycle():
    # a reference cycle holds the context: only the garbage collector can free it
    m = Model(path)
    c = Context(m, n_ctx=128, n_threads=1)
    holder = {"ctx": c}
    holder["self"] = holder

say("core", result=unclosed(core))
say("api", result=unclosed(api))
say("cycle", result=unclosed(cycle))
'''

CTX_W, MODEL_W = "unclosed llamabind.Context", "unclosed llamabind.Model"


def test_unclosed_objects_warn_and_are_freed(smol_path: str) -> None:
    child, msgs = run_child(UNCLOSED, smol_path, timeout=120)
    _ok(child)
    got = messages_by_tag(msgs)
    # each warned once, and the model's memory is released (the file is unmapped);
    # a context always goes before the model it uses
    assert got["core"]["result"] == [[CTX_W, MODEL_W], False]
    # the session's context, the pooled session's context, the model
    assert got["api"]["result"] == [[CTX_W, CTX_W, MODEL_W], False]
    assert sorted(got["cycle"]["result"][0]) == [CTX_W, MODEL_W]
    assert got["cycle"]["result"][1] is False


def test_context_in_a_reference_cycle_is_freed_before_its_model(smol_path: str) -> None:
    child, msgs = run_child(UNCLOSED, smol_path, timeout=120)
    _ok(child)
    assert messages_by_tag(msgs)["cycle"]["result"] == [[CTX_W, MODEL_W], False]


UNCLOSED_RECORDED = PRELUDE + r'''
# What pytest (and any code using catch_warnings(record=True)) does: keep the warning.
# A warning raised while an object is being destroyed must not reference it: the
# memory is freed right after, and the recorded warning would point at freed memory
# (touching it, e.g. repr(caught[0].source), crashes).
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", ResourceWarning)
    m = Model(path)
    del m
say("recorded", n=len(caught), source_is_none=caught[0].source is None)
'''


def test_recorded_resource_warning_does_not_keep_a_dangling_object(smol_path: str) -> None:
    child, msgs = run_child(UNCLOSED_RECORDED, smol_path, timeout=120)
    _ok(child)
    got = messages_by_tag(msgs)
    assert got["recorded"] == {"n": 1, "source_is_none": True}


UNCLOSED_STRICT = PRELUDE + r'''
m = Model(path)
del m
say("after")
'''


def test_unclosed_model_is_reported_under_w_error(smol_path: str) -> None:
    child, _ = run_child(UNCLOSED_STRICT, smol_path, timeout=120,
                         extra_flags=("-W", "error::ResourceWarning"))
    _ok(child)
    assert "ResourceWarning: unclosed llamabind.Model" in child.stderr


# --- interpreter exit -----------------------------------------------------------------------

SHUTDOWN = PRELUDE + r'''
mode = sys.argv[2]
lm = LoadedModel.load(path, context=SMALL)
lm.generate("Hello", max_tokens=1, temperature=0)          # pooled session left open
s = lm.create_session()                                     # session left open
s.generate("Hello", max_tokens=1, temperature=0)
core_model = Model(path)                                    # core objects left open
core_ctx = Context(core_model, n_ctx=4096, n_batch=4096, n_threads=1)
smp = Sampler().add_top_k(5).add_dist(1)
vocab = lm.vocab
no_eog = {t: float("-inf") for t in range(vocab.n_tokens) if vocab.is_eog(t)}
busy = threading.Event()

def generate_forever():
    worker = lm.create_session()
    while True:
        for i, piece in enumerate(worker.stream("Tell me a story", temperature=0,
                                                max_tokens=100000, logit_bias=no_eog)):
            if i == 3:
                busy.set()

def eval_forever():
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
'''


@pytest.mark.parametrize("mode", ["none", "generate",
                                  "eval", "both"])
def test_exit_with_unclosed_objects_and_busy_daemon_thread(smol_path: str, mode: str) -> None:
    child, msgs = run_child(SHUTDOWN, smol_path, mode, timeout=180)
    assert ("exiting", {}) in msgs, child.describe()
    _ok(child)

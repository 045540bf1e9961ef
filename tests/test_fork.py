"""Fork safety: objects made before os.fork() raise ForkError in the child (never
deadlock, never crash), closing them there is harmless, and a model loaded in the
child works, also while the parent was generating in another thread at fork time and
under multiprocessing's 'fork' start method.

The forking runs in a child Python process (forking pytest itself, with its threads,
is not something to do in a test); every forked process runs under a timeout, so a
deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import pytest
from _rel_helpers import messages_by_tag, run_child

pytestmark = pytest.mark.model

COMMON = r'''
import json, signal, threading
import llamabind
from llamabind import (Context, ContextConfig, ForkError, LoadedModel, Model, Sampler,
                       TokenGenerator)

path = sys.argv[1]
SMALL = ContextConfig(n_ctx=256, n_batch=64, n_ubatch=64, n_threads=1)
lm = LoadedModel.load(path, context=SMALL)
PROMPT = "The sky is"
expected = list(lm.generate(PROMPT, max_tokens=4, temperature=0).tokens)  # leaves a pooled session
own = lm.create_session()
own.generate(PROMPT, max_tokens=2, temperature=0)
core_model = Model(path)
core_ctx = Context(core_model, n_ctx=128, n_batch=64, n_threads=2)     # a 2-thread pool
core_ctx.eval(core_model.vocab.tokenize(PROMPT))
vocab = core_model.vocab
smp = Sampler().add_top_k(5).add_dist(1)

def forked(fn, timeout=120.0):
    """Run fn() in a forked child; returns {"ok": value} or {"exc": name, "msg": ...},
    {"hang": True} if it did not finish in time, {"died": status} if it crashed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = {"ok": fn()}
        except BaseException as exc:
            out = {"exc": type(exc).__name__, "msg": str(exc)}
        os.write(w, json.dumps(out, default=repr).encode())
        os._exit(0)
    os.close(w)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            return {"hang": True}
        time.sleep(0.005)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    if status != 0 or not chunks:
        return {"died": status}
    return json.loads(b"".join(chunks))

def load_new():
    with LoadedModel.load(path, context=SMALL) as m:
        return list(m.generate(PROMPT, max_tokens=4, temperature=0).tokens)

'''

FORK_CHILD = COMMON + r'''
uses = {
    "LoadedModel.generate": lambda: lm.generate(PROMPT, max_tokens=1),
    "LoadedModel.stream": lambda: list(lm.stream(PROMPT, max_tokens=1)),
    "LoadedModel.tokenize": lambda: lm.tokenize(PROMPT),
    "LoadedModel.create_session": lambda: lm.create_session(),
    "Session.generate": lambda: own.generate(PROMPT, max_tokens=1),
    "Model.vocab": lambda: core_model.vocab,
    "Model.n_vocab": lambda: core_model.n_vocab,
    "Vocab.tokenize": lambda: vocab.tokenize(PROMPT),
    "Context(model)": lambda: Context(core_model, n_ctx=64),
    "Context.eval": lambda: core_ctx.eval([1]),
    "Context.logits": lambda: core_ctx.logits(),
    "Context.save_state": lambda: core_ctx.save_state(),
    "TokenGenerator": lambda: next(TokenGenerator(core_ctx, 4)),
    "Sampler.sample": lambda: smp.sample(core_ctx),
}
say("uses", results={name: forked(fn, 60) for name, fn in uses.items()})

def close_everything():
    own.close(); lm.close(); core_ctx.close(); core_model.close(); smp.close()
    return "closed"
say("close", result=forked(close_everything, 60))

say("new-model", result=forked(load_new), expected=expected)

# the parent is unaffected by all the forking
say("parent", tokens=list(lm.generate(PROMPT, max_tokens=4, temperature=0).tokens),
    eval_ok=core_ctx.eval([1]) == 1)
'''

# forked children per run: each loads the model anew and generates (~0.4 s)
BUSY_FORKS = 8

BUSY_FORK_CHILD = COMMON + r'''
FORKS = int(sys.argv[2])
# fork while another thread of the parent is in the middle of decoding (llama.cpp's
# and ggml's locks may be held at that instant); each child loads and generates anew
stop = threading.Event()
busy = threading.Event()
def generate_in_parent():
    with lm.create_session() as s:
        while not stop.is_set():
            for _ in s.stream(PROMPT, max_tokens=64, temperature=0):
                busy.set()
t = threading.Thread(target=generate_in_parent, daemon=True)
t.start()
assert busy.wait(120)
busy_results = []
for i in range(FORKS):
    time.sleep(0.013 * (i % 7))     # fork at different points of the decode loop
    busy_results.append(forked(load_new))
stop.set()
t.join(120)
say("busy-parent", results=busy_results, expected=expected)

# the parent is unaffected by all the forking
say("parent", tokens=list(lm.generate(PROMPT, max_tokens=4, temperature=0).tokens),
    eval_ok=core_ctx.eval([1]) == 1)
'''


def test_fork_child_gets_fork_error_and_can_load_anew(smol_path: str) -> None:
    child, msgs = run_child(FORK_CHILD, smol_path, timeout=600)
    assert child.proc.returncode == 0, child.describe()
    got = messages_by_tag(msgs)

    uses = got["uses"]["results"]
    wrong = {name: res for name, res in uses.items() if res.get("exc") != "ForkError"}
    assert not wrong, f"not ForkError in the forked child: {wrong}"
    assert all("fork" in res["msg"] for res in uses.values())

    assert got["close"]["result"] == {"ok": "closed"}

    new = got["new-model"]
    assert new["result"] == {"ok": new["expected"]}

    assert got["parent"] == {"tokens": new["expected"], "eval_ok": True}


def test_fork_while_another_thread_decodes(smol_path: str) -> None:
    """Forks taken while a parent thread is inside llama_decode/sampling: every child
    loads the model anew and generates the same tokens; none deadlocks on a lock the
    busy thread held at the fork. (scripts/asan_check.sh leaves this test out: GCC 12's
    ASan allocator has no fork handlers, so a child deadlocks in ASan's own malloc lock;
    see the script.)"""
    child, msgs = run_child(BUSY_FORK_CHILD, smol_path, str(BUSY_FORKS), timeout=600)
    assert child.proc.returncode == 0, child.describe()
    got = messages_by_tag(msgs)
    busy = got["busy-parent"]
    assert busy["results"] == [{"ok": busy["expected"]}] * BUSY_FORKS, busy["results"]
    assert got["parent"] == {"tokens": busy["expected"], "eval_ok": True}


MP_CHILD = r'''
import multiprocessing as mp
import llamabind
from llamabind import ContextConfig, LoadedModel

path = sys.argv[1]
SMALL = ContextConfig(n_ctx=256, n_batch=64, n_ubatch=64, n_threads=1)
model = LoadedModel.load(path, context=SMALL)
PROMPT = "The sky is"
expected = list(model.generate(PROMPT, max_tokens=4, temperature=0).tokens)

def use_inherited(_):
    try:
        model.generate(PROMPT, max_tokens=1)
        return "no error"
    except BaseException as exc:
        return type(exc).__name__

def load_own(seed):
    with LoadedModel.load(path, context=SMALL) as m:
        return list(m.generate(PROMPT, max_tokens=4, temperature=0).tokens)

ctx = mp.get_context("fork")
with ctx.Pool(2) as pool:
    inherited = pool.map_async(use_inherited, range(4)).get(120)
    own = pool.map_async(load_own, range(4)).get(300)
q = ctx.Queue()
p = ctx.Process(target=lambda: q.put((use_inherited(0), load_own(0))))
p.start()
single = q.get(timeout=300)
p.join(60)
say("result", inherited=inherited, own=own, expected=expected, single=list(single),
    exitcode=p.exitcode)
model.close()
'''


def test_multiprocessing_fork_start_method(smol_path: str) -> None:
    child, msgs = run_child(MP_CHILD, smol_path, timeout=600)
    assert child.proc.returncode == 0, child.describe()
    res = messages_by_tag(msgs)["result"]
    assert res["inherited"] == ["ForkError"] * 4
    assert res["own"] == [res["expected"]] * 4
    assert res["single"] == ["ForkError", res["expected"]]
    assert res["exitcode"] == 0

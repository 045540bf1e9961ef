"""Children of tests/test_fork.py: ``python -m children.fork SCENARIO MODEL_PATH [FORKS]``.

The forking happens here, not in pytest; every forked process runs under a timeout, so
a deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from test_lifetime import chat_parser, lora_file

from children.channel import say
from llamabind import (
    Batch,
    Context,
    ContextConfig,
    Generation,
    LoadedModel,
    LoraAdapter,
    Model,
    ModelDrafter,
    NgramDrafter,
    Sampler,
    TokenGenerator,
    _gguf,
    _llama,
)

SMALL = ContextConfig(n_ctx=256, n_batch=64, n_ubatch=64, n_threads=1)
PROMPT = "The sky is"


def forked(fn: Callable[[], Any], timeout: float = 120.0) -> dict[str, Any]:
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
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result


class Parent:
    """What the parent has open when it forks: a LoadedModel with its engine running and
    a session of its own, a core model and context (on a 2-thread pool), a sampler, and
    one of every other native object of the core."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lm = LoadedModel.load(path, context=SMALL)
        # the engine has its context now
        self.expected = list(self.lm.generate(PROMPT, max_tokens=4, temperature=0).tokens)
        self.own = self.lm.create_session()
        self.own.generate(PROMPT, max_tokens=2, temperature=0)
        self.core_model = Model(path)
        self.core_ctx = Context(self.core_model, n_ctx=128, n_batch=64, n_threads=2)
        self.core_ctx.eval(self.core_model.vocab.tokenize(PROMPT))
        self.vocab = self.core_model.vocab
        self.smp = Sampler().add_top_k(5).add_dist(1)
        self.batch = Batch(8)
        self.lora = LoraAdapter(self.core_model,
                                lora_file(self.core_model, Path(tempfile.mkdtemp())))
        self.gen = Generation(self.core_model, 2)
        self.ngram = NgramDrafter(2)
        self.drafter = ModelDrafter(self.core_model, self.core_model, n_ctx=64, n_batch=32)
        self.engine_ctx = Context(self.core_model, n_ctx=64, n_batch=32)
        self.engine_core = _llama.EngineCore(self.engine_ctx)
        self.templates = _llama.ChatTemplates(self.core_model)
        self.parser = chat_parser(self.core_model)
        self.gguf = _gguf.read_file(path)

    def load_new(self) -> list[int]:
        with LoadedModel.load(self.path, context=SMALL) as m:
            return list(m.generate(PROMPT, max_tokens=4, temperature=0).tokens)

    def say_parent_unaffected(self) -> None:
        """The parent is unaffected by all the forking."""
        say("parent", tokens=list(self.lm.generate(PROMPT, max_tokens=4, temperature=0).tokens),
            eval_ok=self.core_ctx.eval([1]) == 1)


def fork_uses(path: str) -> None:
    """In a forked child every inherited object raises ForkError, closing them is
    harmless, and a model loaded anew works."""
    p = Parent(path)
    lm, own, core_ctx = p.lm, p.own, p.core_ctx
    uses: dict[str, Callable[[], object]] = {
        "LoadedModel.generate": lambda: lm.generate(PROMPT, max_tokens=1),
        "LoadedModel.stream": lambda: list(lm.stream(PROMPT, max_tokens=1)),
        "LoadedModel.tokenize": lambda: lm.tokenize(PROMPT),
        "LoadedModel.create_session": lambda: lm.create_session(),
        "Session.generate": lambda: own.generate(PROMPT, max_tokens=1),
        "Model.vocab": lambda: p.core_model.vocab,
        "Model.n_vocab": lambda: p.core_model.n_vocab,
        "Vocab.tokenize": lambda: p.vocab.tokenize(PROMPT),
        "Context(model)": lambda: Context(p.core_model, n_ctx=64),
        "Context.eval": lambda: core_ctx.eval([1]),
        "Context.logits": lambda: core_ctx.logits(),
        "Context.save_state": lambda: core_ctx.save_state(),
        "TokenGenerator": lambda: next(TokenGenerator(core_ctx, 4)),
        "Sampler.sample": lambda: p.smp.sample(core_ctx),
        "Batch.add": lambda: p.batch.add(1, 0),
        "LoraAdapter.metadata": lambda: p.lora.metadata,
        "Context.set_lora_adapters": lambda: core_ctx.set_lora_adapters([(p.lora, 1.0)]),
        "Generation.step": lambda: p.gen.step(core_ctx),
        "NgramDrafter.draft": lambda: p.ngram.draft([1, 2, 1], 2),
        "ModelDrafter.draft": lambda: p.drafter.draft([1, 2, 3], 2),
        "EngineCore.step": lambda: p.engine_core.step(
            [], [([p.gen], np.asarray([1, 2], dtype=np.int32), 0, 2, 0, (0,))]),
        "ChatTemplates.apply": lambda: p.templates.apply(json.dumps(
            {"messages": [{"role": "user", "content": "hi"}]})),
        "ChatParser.parse": lambda: p.parser.parse("hello"),
        "GGUFFile.keys": lambda: p.gguf.keys(),
    }
    say("uses", results={name: forked(fn, 60) for name, fn in uses.items()})

    def close_everything() -> str:
        own.close()
        lm.close()
        core_ctx.close()
        p.core_model.close()
        for obj in (p.smp, p.batch, p.lora, p.gen, p.ngram, p.drafter, p.engine_core,
                    p.engine_ctx, p.templates, p.parser, p.gguf):
            obj.close()
        return "closed"

    say("close", result=forked(close_everything, 60))
    say("new-model", result=forked(p.load_new), expected=p.expected)
    p.say_parent_unaffected()


def busy_fork(path: str, forks: str) -> None:
    """Fork while another thread of the parent is in the middle of decoding (llama.cpp's
    and ggml's locks may be held at that instant); each child loads and generates
    anew."""
    p = Parent(path)
    stop = threading.Event()
    busy = threading.Event()

    def generate_in_parent() -> None:
        with p.lm.create_session() as s:
            while not stop.is_set():
                for _ in s.stream(PROMPT, max_tokens=64, temperature=0):
                    busy.set()

    t = threading.Thread(target=generate_in_parent, daemon=True)
    t.start()
    assert busy.wait(120)
    busy_results = []
    for i in range(int(forks)):
        time.sleep(0.013 * (i % 7))     # fork at different points of the decode loop
        busy_results.append(forked(p.load_new))
    stop.set()
    t.join(120)
    say("busy-parent", results=busy_results, expected=p.expected)
    p.say_parent_unaffected()


# multiprocessing's "fork" start method: the pool's workers inherit MODEL
MODEL: LoadedModel | None = None
PATH = ""


def use_inherited(_: object) -> str:
    assert MODEL is not None
    try:
        MODEL.generate(PROMPT, max_tokens=1)
        return "no error"
    except BaseException as exc:
        return type(exc).__name__


def load_own(_: object) -> list[int]:
    with LoadedModel.load(PATH, context=SMALL) as m:
        return list(m.generate(PROMPT, max_tokens=4, temperature=0).tokens)


def multiprocessing_fork(path: str) -> None:
    global MODEL, PATH
    PATH = path
    MODEL = LoadedModel.load(path, context=SMALL)
    expected = list(MODEL.generate(PROMPT, max_tokens=4, temperature=0).tokens)
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        inherited = pool.map_async(use_inherited, range(4)).get(120)
        own = pool.map_async(load_own, range(4)).get(300)
    q = ctx.Queue()
    proc = ctx.Process(target=lambda: q.put((use_inherited(0), load_own(0))))
    proc.start()
    single = q.get(timeout=300)
    proc.join(60)
    say("result", inherited=inherited, own=own, expected=expected, single=list(single),
        exitcode=proc.exitcode)
    MODEL.close()


SCENARIOS: dict[str, Callable[..., None]] = {
    "uses": fork_uses, "busy": busy_fork, "multiprocessing": multiprocessing_fork}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]](*sys.argv[2:])

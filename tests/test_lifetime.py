"""The one lifetime every native object of the core shares (_core/lifetime.pxi), checked
class by class on the real model: use after close() raises ClosedError naming the
object; close() is idempotent and ``with`` closes; close() while a call is inside the
object (in another thread) or while something still uses its memory marks it closed at
once and frees the memory when that ends, never under it; objects the user opens warn
with ResourceWarning when collected open, the library's own helpers do not. The fork
check is in test_fork.py (it forks in a child process).

``_native_held`` says whether an object still holds its native memory. To see a call in
progress the tests probe the object from the main thread (a call that is refused with
ConcurrentUseError while another thread is inside); with a long thread switch interval
nothing runs between that probe and the close() that follows.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_model_files import STR, gguf

from llamabind import (
    Batch,
    ClosedError,
    ConcurrentUseError,
    Context,
    Generation,
    GenerationCancelled,
    LoraAdapter,
    Model,
    ModelDrafter,
    NgramDrafter,
    Sampler,
    _gguf,
    _llama,
)

pytestmark = pytest.mark.model

SMALL = {"n_ctx": 256, "n_batch": 64, "n_ubatch": 64, "n_threads": 1}


def lora_file(model: Model, tmp_path: Path) -> str:
    """A rank-4 LoRA adapter of the first layer's attention query, all zeros."""
    n = model.n_embd
    kvs = [("general.architecture", STR, "llama"), ("general.type", STR, "adapter"),
           ("adapter.type", STR, "lora")]
    tensors = [("blk.0.attn_q.weight.lora_a", (n, 4), 0),
               ("blk.0.attn_q.weight.lora_b", (4, n), 0)]
    path = tmp_path / "lora.gguf"
    path.write_bytes(gguf(kvs, tensors))
    return str(path)


def decoded_context(model: Model, helpers: contextlib.ExitStack) -> Context:
    ctx = helpers.enter_context(Context(model, **SMALL))
    ctx.eval([1])
    return ctx


def chat_parser(model: Model) -> _llama.ChatParser:
    with _llama.ChatTemplates(model) as templates:
        plan = json.loads(templates.apply(json.dumps(
            {"messages": [{"role": "user", "content": "hi"}]})))
    return _llama.ChatParser(plan["parser"], int(plan["format"]), plan["generation_prompt"])


# name -> make(model, path, tmp_path, helpers) -> (object, a use of it); ``helpers`` closes
# what an object needs beside it (a context for an EngineCore)
Maker = Callable[[Model, str, Path, contextlib.ExitStack], tuple[Any, Callable[[Any], object]]]
MAKERS: dict[str, Maker] = {
    "Model": lambda m, path, tmp, h: (Model(path, vocab_only=True), lambda o: o.n_vocab),
    "Context": lambda m, path, tmp, h: (Context(m, **SMALL), lambda o: o.eval([1])),
    "Batch": lambda m, path, tmp, h: (Batch(8), lambda o: o.add(1, 0)),
    "Sampler": lambda m, path, tmp, h: (Sampler(), lambda o: o.add_greedy()),
    "LoraAdapter": lambda m, path, tmp, h: (LoraAdapter(m, lora_file(m, tmp)),
                                            lambda o: o.metadata),
    "NgramDrafter": lambda m, path, tmp, h: (NgramDrafter(2), lambda o: o.draft([1, 2, 1], 2)),
    "ModelDrafter": lambda m, path, tmp, h: (ModelDrafter(m, m, n_ctx=128, n_batch=64),
                                             lambda o: o.draft([1, 2, 3], 2)),
    "Generation": lambda m, path, tmp, h: (Generation(m, 1),
                                           lambda o: o.accept(decoded_context(m, h))),
    "EngineCore": lambda m, path, tmp, h: (_llama.EngineCore(h.enter_context(Context(m, **SMALL))),
                                           lambda o: o.step([], [])),
    "ChatTemplates": lambda m, path, tmp, h: (_llama.ChatTemplates(m), lambda o: o.caps()),
    "ChatParser": lambda m, path, tmp, h: (chat_parser(m), lambda o: o.parse("hello")),
    "GGUFFile": lambda m, path, tmp, h: (_gguf.read_file(path), lambda o: o.keys()),
}
# the objects a user opens and closes warn when collected open; the library's helpers not
WARN = {"Model", "Context", "Batch", "Sampler", "LoraAdapter", "ModelDrafter"}


@pytest.fixture
def helpers() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as stack:
        yield stack


def test_every_native_object_shares_the_lifetime_base() -> None:
    for name in MAKERS:
        cls = getattr(_llama, name)
        assert issubclass(cls, _llama._NativeObject), name
        for attr in ("close", "closed", "__enter__", "__exit__"):
            assert getattr(cls, attr) is getattr(_llama._NativeObject, attr), (name, attr)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_use_after_close_raises_closed_error(name: str, smol: Model, smol_path: str,
                                             tmp_path: Path, helpers: contextlib.ExitStack) -> None:
    obj, use = MAKERS[name](smol, smol_path, tmp_path, helpers)
    assert not obj.closed and obj._native_held
    use(obj)
    obj.close()
    obj.close()
    assert obj.closed and not obj._native_held
    with pytest.raises(ClosedError, match=f"llamabind.{name}\\b.* is closed"):
        use(obj)
    with pytest.raises(ClosedError), obj:
        pass


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_with_block_closes(name: str, smol: Model, smol_path: str, tmp_path: Path,
                           helpers: contextlib.ExitStack) -> None:
    obj, use = MAKERS[name](smol, smol_path, tmp_path, helpers)
    with pytest.raises(KeyError), obj as inside:
        assert inside is obj
        use(inside)
        raise KeyError("leaves the block")
    assert obj.closed and not obj._native_held


def test_left_open_objects_warn_and_helpers_do_not(smol: Model, smol_path: str,
                                                   tmp_path: Path,
                                                   helpers: contextlib.ExitStack) -> None:
    seen = {}
    for name, make in MAKERS.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            obj, use = make(smol, smol_path, tmp_path, helpers)
            use(obj)
            del obj, use
            gc.collect()
        seen[name] = [str(w.message).split(" '")[0] for w in caught
                      if issubclass(w.category, ResourceWarning)]
    # one warning each, for the object itself (a ModelDrafter closes its context)
    assert seen == {name: [f"unclosed llamabind.{name}"] if name in WARN else []
                    for name in MAKERS}


def test_a_never_initialised_object_says_so() -> None:
    s = Sampler.__new__(Sampler)
    assert s.closed and not s._native_held
    with pytest.raises(ClosedError, match="not initialised"):
        s.add_greedy()
    s.close()
    with pytest.raises(ClosedError, match="is closed"):
        s.add_greedy()


# --- close() while something uses the memory ------------------------------------------------

def test_model_close_waits_for_its_contexts(smol_path: str) -> None:
    model = Model(smol_path)
    ctx = Context(model, **SMALL)
    model.close()
    assert model.closed and model._native_held
    with pytest.raises(ClosedError):
        Context(model, **SMALL)
    ctx.eval([1, 2, 3])    # the context keeps the weights it computes with
    ctx.close()
    assert not model._native_held


def test_context_close_waits_for_numpy_views(smol: Model) -> None:
    ctx = Context(smol, **SMALL)
    ctx.eval([1, 2, 3])
    logits = ctx.logits()
    expected = logits.copy()
    ctx.close()
    assert ctx.closed and ctx._native_held
    assert (logits == expected).all()
    del logits
    assert not ctx._native_held


def test_lora_adapter_close_waits_for_the_contexts_using_it(smol: Model, tmp_path: Path) -> None:
    adapter = LoraAdapter(smol, lora_file(smol, tmp_path))
    with Context(smol, **SMALL) as ctx:
        ctx.eval([1, 2, 3])
        plain = ctx.logits().copy()
        ctx.set_lora_adapters([(adapter, 1.0)])
        adapter.close()
        assert adapter.closed and adapter._native_held
        with pytest.raises(ClosedError):
            ctx.set_lora_adapters([(adapter, 1.0)])
        ctx.memory_clear()
        ctx.eval([1, 2, 3])       # the (zero) adapter is still applied, and alive
        assert (ctx.logits() == plain).all()
        ctx.set_lora_adapters(())
        assert not adapter._native_held

    adapter = LoraAdapter(smol, lora_file(smol, tmp_path))
    ctx = Context(smol, **SMALL)
    ctx.set_lora_adapters([(adapter, 0.5)])
    adapter.close()
    ctx.close()                   # the context let go of it
    assert not adapter._native_held


# --- close() while another thread is inside ---------------------------------------------------

class Worker(threading.Thread):
    """Runs ``fn`` repeatedly (or once) in a thread; keeps what it returned or raised."""

    def __init__(self, fn: Callable[[], object], repeat: bool = False) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.repeat = repeat
        self.results: list[object] = []

    def run(self) -> None:
        while True:
            try:
                self.results.append(self.fn())
            except BaseException as exc:
                self.results.append(exc)
                return
            if not self.repeat:
                return


def close_while_busy(obj: Any, probe: Callable[[], object], worker: Worker) -> bool:
    """Wait until ``probe`` is refused (the worker is inside), then at once close ``obj``;
    returns whether the memory was still held right after close()."""
    interval = sys.getswitchinterval()
    deadline = time.monotonic() + 120
    worker.start()
    try:
        while True:
            assert worker.is_alive(), f"the worker ended before it was seen busy: {worker.results}"
            assert time.monotonic() < deadline, "the worker was never seen busy"
            sys.setswitchinterval(30)   # no other thread runs until the next sleep
            try:
                probe()
            except ConcurrentUseError:
                obj.close()
                return bool(obj.closed and obj._native_held)
            finally:
                sys.setswitchinterval(interval)
            time.sleep(0.001)
    finally:
        worker.join(120)
        assert not worker.is_alive()


def long_prompt(model: Model, n: int) -> list[int]:
    text = " ".join(f"item {i} costs {i % 97} coins." for i in range(n // 4))
    return model.vocab.tokenize(text, add_special=False)[:n]


def test_context_close_during_a_decode_cancels_it_and_frees_after(smol: Model) -> None:
    ctx = Context(smol, n_ctx=2048, n_batch=2048, n_threads=1)
    tokens = long_prompt(smol, 2000)
    worker = Worker(lambda: ctx.eval(tokens))
    assert close_while_busy(ctx, ctx.state_size, worker)
    (outcome,) = worker.results
    assert isinstance(outcome, GenerationCancelled) or outcome == len(tokens), outcome
    assert not ctx._native_held
    with pytest.raises(ClosedError):
        ctx.eval([1])


def test_batch_close_during_its_decode_frees_after(smol: Model) -> None:
    tokens = long_prompt(smol, 400)
    with Context(smol, n_ctx=2048, n_batch=2048, n_threads=1) as ctx:
        batch = Batch(len(tokens))
        batch.set_tokens(tokens)
        worker = Worker(lambda: ctx.decode(batch))
        assert close_while_busy(batch, ctx.state_size, worker)
        assert worker.results == [None]          # the decode ran to its end
        assert not batch._native_held
        expected = ctx.logits().copy()
        with pytest.raises(ClosedError):
            batch.tokens()
        ctx.memory_clear()
        ctx.eval(tokens)
        assert (ctx.logits() == expected).all()


def test_sampler_close_while_sampling_frees_after(qwen: Model) -> None:
    with Context(qwen, **SMALL) as ctx:
        ctx.eval(qwen.vocab.tokenize("Once upon a time"))
        # a chain over the whole vocabulary (150k tokens): each sample takes a while
        sampler = Sampler().add_dist(seed=1)

        def probe() -> None:
            sampler.clone().close()

        worker = Worker(lambda: sampler.sample(ctx), repeat=True)
        assert close_while_busy(sampler, probe, worker)
        # the sample in progress ended with a token, the next one was refused
        *tokens, last = worker.results
        assert tokens and all(isinstance(t, int) for t in tokens), worker.results
        assert isinstance(last, ClosedError), last
        assert not sampler._native_held


def test_generation_close_while_it_runs_ends_it(smol: Model) -> None:
    with Context(smol, n_ctx=2048, n_batch=64, n_threads=1) as ctx:
        prompt = smol.vocab.tokenize("Tell me a story.")
        ctx.eval(prompt)
        gen = Generation(smol, len(prompt), max_tokens=1900, ignore_eos=True)
        gen.accept(ctx)
        worker = Worker(lambda: gen.run(ctx))
        assert close_while_busy(gen, ctx.state_size, worker)
        assert worker.results == ["cancelled"]
        assert gen.finish_reason == "cancelled" and 0 < gen.n_generated < 1900
        assert not gen._native_held
        with pytest.raises(ClosedError):
            gen.step(ctx)
        assert gen.text   # what was generated stays readable


def test_model_drafter_close_while_drafting_frees_after(smol: Model) -> None:
    drafter = ModelDrafter(smol, smol, n_ctx=2048, n_batch=2048, n_threads=1)
    history = long_prompt(smol, 400)
    worker = Worker(lambda: drafter.draft(history, 4))
    assert close_while_busy(drafter, drafter.context.state_size, worker)
    (draft,) = worker.results
    assert isinstance(draft, list) and len(draft) <= 4, draft
    assert not drafter._native_held and drafter.context.closed
    with pytest.raises(ClosedError):
        drafter.draft(history, 4)


def test_engine_core_close_during_a_step_frees_after(smol: Model) -> None:
    tokens = long_prompt(smol, 400)
    with Context(smol, n_ctx=2048, n_batch=2048, n_threads=1) as ctx:
        core = _llama.EngineCore(ctx)
        gen = Generation(smol, len(tokens), max_tokens=4)
        chunk = ([gen], np.asarray(tokens, dtype=np.int32), 0, len(tokens), 0, (0,))
        worker = Worker(lambda: core.step([], [chunk]))
        assert close_while_busy(core, ctx.state_size, worker)
        assert worker.results == [0]              # the step ran to its end
        assert gen.n_generated == 1
        assert not core._native_held
        with pytest.raises(ClosedError):
            core.step([gen], [])
        gen.close()

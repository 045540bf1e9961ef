"""A benchmark worker: one binding, one model, driven over stdin/stdout.

    python benchmarks/worker.py llamabind    # this environment's llamabind
    python benchmarks/worker.py llama_cpp    # llama-cpp-python (run with its own venv)

It speaks the same line protocol as ``native_probe`` (see native_probe.cpp): one
command per line (``name key=value ...``), one JSON object per line back. bench.py
starts one worker per binding and model and sends the same commands to each, in turn,
so the runs interleave. Only the standard library is imported before ``load``; the
binding's import time is measured in a fresh process by bench.py, not here.

Commands (``api`` picks the layer of the binding that runs the loop):

    load model=PATH threads=T [n_ctx=2048]
    ctx                                        create and free a context, timed
    pp n=512                                   core: decode n random tokens
    tg n=128                                   core: n single-token decodes, no sampling
    gen api=core|generate|stream mode=greedy|chain n=128 prompt=FILE [seed=S] [ban_eog=0]
    ttft api=core|generate|stream prompt=FILE  time to the first generated token
    scale workers=K n=128 prompt=FILE          K Python threads, a context each (1 thread)
    rss
    quit
"""

from __future__ import annotations

import json
import os
import random
import resource
import sys
import threading
import time
from typing import Any

CHAIN = {"top_k": 40, "top_p": 0.95, "temperature": 0.8, "repeat_penalty": 1.1,
         "penalty_last_n": 64, "min_p": 0.0}


def rss_kb() -> int:
    with open("/proc/self/statm") as fh:
        resident = int(fh.read().split()[1])
    return resident * (os.sysconf("SC_PAGESIZE") // 1024)


def peak_rss_kb() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def read_prompt(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


class Timer:
    """perf_counter in milliseconds."""

    __slots__ = ("t0",)

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1000.0


# --------------------------------------------------------------------------------------
# llamabind


class LlamabindWorker:
    def __init__(self) -> None:
        import llamabind

        self.lb = llamabind
        self.model: Any = None      # LoadedModel
        self.core: Any = None       # a core Context for pp/tg/core generation
        self.threads = 1
        self.n_ctx = 2048
        self.rng = random.Random(1234)
        self.eog: list[int] = []
        self.own_session: Any = None  # cold=1: one Session, as a fresh program has

    def load(self, a: dict[str, str]) -> dict[str, Any]:
        """Load the model; time it and the first context. ``cold=1`` (a fresh process
        measuring start-up): that context is the Session generate runs on, and no core
        context is made, so peak RSS counts one context like the native program."""
        lb = self.lb
        self.threads = int(a["threads"])
        self.n_ctx = int(a.get("n_ctx", 2048))
        t = Timer()
        self.model = lb.LoadedModel.load(a["model"], n_gpu_layers=0, n_ctx=self.n_ctx,
                                         n_threads=self.threads)
        load_ms = t.ms()
        t = Timer()
        if int(a.get("cold", 0)):
            self.own_session = self.model.create_session()
        else:
            self.core = lb.Context(self.model.native, n_ctx=self.n_ctx, n_batch=512,
                                   n_ubatch=512, n_threads=self.threads)
        ctx_ms = t.ms()
        vocab = self.model.vocab
        self.eog = [i for i in range(vocab.n_tokens) if vocab.is_eog(i)]
        return {"load_ms": load_ms, "ctx_ms": ctx_ms, "rss_kb": rss_kb(),
                "peak_rss_kb": peak_rss_kb(), "module": lb._llama.__file__}

    def ctx(self, a: dict[str, str]) -> dict[str, Any]:
        t = Timer()
        c = self.lb.Context(self.model.native, n_ctx=int(a.get("n_ctx", self.n_ctx)),
                            n_batch=512, n_ubatch=512, n_threads=self.threads)
        ctx_ms = t.ms()
        t = Timer()
        c.close()
        return {"ctx_ms": ctx_ms, "free_ms": t.ms()}

    def _random_tokens(self, n: int) -> list[int]:
        vocab = self.model.vocab
        toks = [self.rng.randrange(vocab.n_tokens) for _ in range(n)]
        if vocab.add_bos:
            toks[0] = vocab.bos
        return toks

    def pp(self, a: dict[str, str]) -> dict[str, Any]:
        n = int(a["n"])
        toks = self._random_tokens(n)
        ctx = self.core
        ctx.memory_clear(False)
        ctx.perf_reset()
        t = Timer()
        ctx.eval(toks, pos0=0)
        ctx.logits(-1)  # llama-bench synchronizes at the end of the prompt: so do we
        ms = t.ms()
        return {"ms": ms, "n": n, **ctx.perf()}

    def tg(self, a: dict[str, str]) -> dict[str, Any]:
        n = int(a["n"])
        vocab = self.model.vocab
        n_vocab = vocab.n_tokens
        ctx = self.core
        ctx.memory_clear(False)
        batch = self.lb.Batch(1)
        tok = vocab.bos if vocab.add_bos else self.rng.randrange(n_vocab)
        randrange = self.rng.randrange
        decode = ctx.decode
        logits = ctx.logits
        clear = batch.clear
        add = batch.add
        ctx.perf_reset()
        t = Timer()
        for pos in range(n):
            clear()
            add(tok, pos, (0,), True)
            decode(batch)
            logits(-1)  # llama-bench synchronizes after each token: so do we
            tok = randrange(n_vocab)
        ms = t.ms()
        batch.close()
        return {"ms": ms, "n": n, **ctx.perf()}

    def _options(self, mode: str, a: dict[str, str]) -> dict[str, Any]:
        opts: dict[str, Any] = {"temperature": 0.0} if mode == "greedy" else dict(
            CHAIN, seed=int(a.get("seed", 42)))
        if int(a.get("ban_eog", 0)):
            opts["logit_bias"] = {t: float("-inf") for t in self.eog}
        return opts

    def _core_sampler(self, mode: str, a: dict[str, str]) -> Any:
        lb = self.lb
        ban = int(a.get("ban_eog", 0))
        if mode == "greedy" and not ban:
            return None
        s = lb.Sampler()
        if ban:
            s.add_logit_bias(self.model.native, {t: float("-inf") for t in self.eog})
        if mode == "greedy":
            return s.add_greedy()
        return (s.add_penalties(self.model.native.n_vocab, 64, 1.1, 0.0, 0.0)
                .add_top_k(40).add_top_p(0.95).add_temperature(0.8)
                .add_dist(int(a.get("seed", 42))))

    def _session(self) -> Any:
        """What LoadedModel.generate/stream run on: the engine's context (made by the
        first request). The worker is single-threaded: between its calls the engine is
        idle, so its context's perf counters can be read and reset."""
        engine = self.model.engine
        if engine._ctx is None:
            self.model.generate("warm up", max_tokens=1, temperature=0.0)

        class _EngineContext:
            context = engine._ctx

        return _EngineContext

    def gen(self, a: dict[str, str]) -> dict[str, Any]:
        api, mode, n = a["api"], a["mode"], int(a["n"])
        prompt = read_prompt(a["prompt"])
        if api == "core":
            ctx = self.core
            sampler = self._core_sampler(mode, a)
            ctx.perf_reset()
            t = Timer()
            toks = self.model.vocab.tokenize(prompt, add_special=True, parse_special=False)
            ctx.memory_clear(False)  # as llama.cpp's tools do (and the native probe)
            ctx.eval(toks, pos0=0)
            prompt_ms = t.ms()
            gen = self.lb.TokenGenerator(ctx, len(toks), sampler, max_tokens=n)
            ttft_ms = 0.0
            count = 0
            for _tok, _piece in gen:
                count += 1
                if count == 1:
                    ttft_ms = t.ms()
            wall_ms = t.ms()
            finish = gen.finish_reason
            if sampler is not None:
                sampler.close()
            perf = _synced_perf(ctx)
            return {"wall_ms": wall_ms, "prompt_ms": prompt_ms, "gen_ms": wall_ms - prompt_ms,
                    "ttft_ms": ttft_ms, "n_prompt": len(toks), "n_gen": count,
                    "finish": finish, **perf}
        session = self.own_session or self._session()
        runner = self.own_session or self.model
        session.context.perf_reset()
        opts = self._options(mode, a)
        if api == "generate":
            t = Timer()
            r = runner.generate(prompt, max_tokens=n, **opts)
            wall_ms = t.ms()
            res = {"wall_ms": wall_ms, "prompt_ms": r.prompt_eval_ms, "gen_ms": r.generation_ms,
                   "ttft_ms": None, "n_prompt": r.prompt_tokens, "n_gen": r.completion_tokens,
                   "finish": r.finish_reason}
        else:
            t = Timer()
            it = runner.stream(prompt, max_tokens=n, **opts)
            ttft_ms = 0.0
            pieces = 0
            for _piece in it:
                pieces += 1
                if pieces == 1:
                    ttft_ms = t.ms()
            wall_ms = t.ms()
            n_gen = session.context.perf()["n_eval"] + 1  # see below
            res = {"wall_ms": wall_ms, "prompt_ms": None, "gen_ms": None, "ttft_ms": ttft_ms,
                   "n_prompt": None, "n_gen": n_gen, "pieces": pieces, "finish": None}
        res.update(_synced_perf(session.context))
        return res

    def ttft(self, a: dict[str, str]) -> dict[str, Any]:
        api = a["api"]
        prompt = read_prompt(a["prompt"])
        if api == "core":
            ctx = self.core
            t = Timer()
            toks = self.model.vocab.tokenize(prompt, add_special=True, parse_special=False)
            ctx.memory_clear(False)  # as llama.cpp's tools do (and the native probe)
            ctx.eval(toks, pos0=0)
            gen = self.lb.TokenGenerator(ctx, len(toks), None, max_tokens=1)
            next(gen)
            ms = t.ms()
            return {"ttft_ms": ms, "n_prompt": len(toks)}
        self._session()
        t = Timer()
        it = self.model.stream(prompt, max_tokens=64, temperature=0.0)
        next(it)
        ms = t.ms()
        it.close()
        return {"ttft_ms": ms}

    def scale(self, a: dict[str, str]) -> dict[str, Any]:
        k, n = int(a["workers"]), int(a["n"])
        prompt = read_prompt(a["prompt"])
        sessions = [self.model.create_session(n_threads=1, n_threads_batch=1)
                    for _ in range(k)]
        for s in sessions:  # warm each context once
            s.generate(prompt, max_tokens=2, temperature=0.0)
        return _run_threads(k, lambda i: sessions[i].generate(
            prompt, max_tokens=n, temperature=0.0).completion_tokens,
            lambda: [s.close() for s in sessions])

    def close(self) -> None:
        if self.core is not None:
            self.core.close()
        if self.own_session is not None:
            self.own_session.close()
        if self.model is not None:
            self.model.close()


def _synced_perf(ctx: Any) -> dict[str, Any]:
    """The context's perf counters after a synchronize. llama.cpp adds a decode's time
    to the counters only at the next synchronize (reading logits); a decode nobody read
    the logits of would otherwise be missing here and be charged to the next run."""
    try:
        ctx.logits(-1)
    except Exception:  # no outputs pending: nothing to add
        pass
    return dict(ctx.perf())


def _run_threads(k: int, work: Any, cleanup: Any) -> dict[str, Any]:
    """Run work(i) in k threads released together; aggregate tokens over the span."""
    barrier = threading.Barrier(k + 1)
    spans: list[tuple[float, float, int]] = [(0.0, 0.0, 0)] * k
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait()
            t0 = time.perf_counter()
            count = work(i)
            spans[i] = (t0, time.perf_counter(), count)
        except BaseException as exc:  # reported to bench.py
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(k)]
    for th in threads:
        th.start()
    barrier.wait()
    for th in threads:
        th.join()
    cleanup()
    if errors:
        raise errors[0]
    start = min(s[0] for s in spans)
    end = max(s[1] for s in spans)
    total = sum(s[2] for s in spans)
    return {"wall_ms": (end - start) * 1000.0, "tokens": total,
            "per_worker_tps": [s[2] / (s[1] - s[0]) for s in spans],
            "aggregate_tps": total / (end - start)}


# --------------------------------------------------------------------------------------
# llama-cpp-python


class LlamaCppWorker:
    """The same measurements through llama-cpp-python's Llama class (its high-level
    API) and its eval() (the loop under generate)."""

    def __init__(self) -> None:
        import llama_cpp

        self.lc = llama_cpp
        self.llm: Any = None
        self.path = ""
        self.threads = 1
        self.n_ctx = 2048
        self.rng = random.Random(1234)
        self.eog: list[int] = []

    def _llama(self, threads: int, n_ctx: int) -> Any:
        return self.lc.Llama(
            model_path=self.path, n_gpu_layers=0, n_ctx=n_ctx, n_batch=512, n_ubatch=512,
            n_threads=threads, n_threads_batch=threads, verbose=False,
            # llama.cpp's "auto" (llamabind's and llama-bench's default) resolves to
            # flash attention on for the CPU; llama-cpp-python's default is off
            flash_attn=True)

    def load(self, a: dict[str, str]) -> dict[str, Any]:
        lc = self.lc
        self.path = a["model"]
        self.threads = int(a["threads"])
        self.n_ctx = int(a.get("n_ctx", 2048))
        # the model alone, through the C API (as the others' load_ms), logging as
        # Llama(verbose=False) sets it up
        from llama_cpp import _logger

        _logger.set_verbose(False)
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        params.n_gpu_layers = 0
        t = Timer()
        mdl = lc.llama_model_load_from_file(self.path.encode(), params)
        load_ms = t.ms()
        if not mdl:
            raise RuntimeError(f"cannot load {self.path}")
        lc.llama_model_free(mdl)
        t = Timer()
        self.llm = self._llama(self.threads, self.n_ctx)
        llama_ms = t.ms()
        vocab = lc.llama_model_get_vocab(self.llm.model)
        self.eog = [i for i in range(self.llm.n_vocab()) if lc.llama_vocab_is_eog(vocab, i)]
        return {"load_ms": load_ms, "llama_init_ms": llama_ms, "rss_kb": rss_kb(),
                "peak_rss_kb": peak_rss_kb()}

    def _perf(self) -> dict[str, Any]:
        d = self.lc.llama_perf_context(self.llm.ctx)
        return {"t_p_eval_ms": d.t_p_eval_ms, "t_eval_ms": d.t_eval_ms,
                "n_p_eval": d.n_p_eval, "n_eval": d.n_eval, "t_load_ms": d.t_load_ms}

    def _perf_reset(self) -> None:
        self.lc.llama_perf_context_reset(self.llm.ctx)

    def ctx(self, a: dict[str, str]) -> dict[str, Any]:
        lc = self.lc
        params = lc.llama_context_default_params()
        params.n_ctx = int(a.get("n_ctx", self.n_ctx))
        params.n_batch = 512
        params.n_ubatch = 512
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        t = Timer()
        c = lc.llama_init_from_model(self.llm.model, params)
        ctx_ms = t.ms()
        t = Timer()
        lc.llama_free(c)
        return {"ctx_ms": ctx_ms, "free_ms": t.ms()}

    def _random_tokens(self, n: int) -> list[int]:
        n_vocab = self.llm.n_vocab()
        toks = [self.rng.randrange(n_vocab) for _ in range(n)]
        if self.llm._model.add_bos_token():
            toks[0] = self.llm.token_bos()
        return toks

    def pp(self, a: dict[str, str]) -> dict[str, Any]:
        n = int(a["n"])
        toks = self._random_tokens(n)
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        self._perf_reset()
        t = Timer()
        self.llm.eval(toks)
        self.lc.llama_synchronize(self.llm.ctx)
        ms = t.ms()
        return {"ms": ms, "n": n, **self._perf()}

    def tg(self, a: dict[str, str]) -> dict[str, Any]:
        n = int(a["n"])
        n_vocab = self.llm.n_vocab()
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        tok = self.llm.token_bos()
        randrange = self.rng.randrange
        ev = self.llm.eval
        sync = self.lc.llama_synchronize
        ctx = self.llm.ctx
        self._perf_reset()
        t = Timer()
        for _ in range(n):
            ev([tok])
            sync(ctx)  # llama-bench synchronizes after each token: so do we
            tok = randrange(n_vocab)
        ms = t.ms()
        return {"ms": ms, "n": n, **self._perf()}

    def _options(self, mode: str, a: dict[str, str]) -> dict[str, Any]:
        if mode == "greedy":
            opts: dict[str, Any] = {"temperature": 0.0, "repeat_penalty": 1.0}
        else:
            opts = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.0,
                    "typical_p": 1.0, "repeat_penalty": 1.1, "seed": int(a.get("seed", 42))}
        if int(a.get("ban_eog", 0)):
            opts["logit_bias"] = {t: float("-inf") for t in self.eog}
        return opts

    def gen(self, a: dict[str, str]) -> dict[str, Any]:
        api, mode, n = a["api"], a["mode"], int(a["n"])
        prompt = read_prompt(a["prompt"])
        opts = self._options(mode, a)
        self.llm.reset()
        self._perf_reset()
        if api in ("generate", "core"):
            # create_completion is llama-cpp-python's generate(); it reuses a cached
            # prompt prefix, so reset() above makes every run evaluate the whole prompt
            t = Timer()
            r = self.llm.create_completion(prompt, max_tokens=n, **opts)
            wall_ms = t.ms()
            usage = r["usage"]
            res = {"wall_ms": wall_ms, "ttft_ms": None,
                   "n_prompt": usage["prompt_tokens"], "n_gen": usage["completion_tokens"],
                   "finish": r["choices"][0]["finish_reason"]}
        else:
            t = Timer()
            ttft_ms = 0.0
            chunks = 0
            finish = None
            for chunk in self.llm.create_completion(prompt, max_tokens=n, stream=True, **opts):
                chunks += 1
                if chunks == 1:
                    ttft_ms = t.ms()
                finish = chunk["choices"][0]["finish_reason"] or finish
            wall_ms = t.ms()
            res = {"wall_ms": wall_ms, "ttft_ms": ttft_ms, "n_prompt": None,
                   "n_gen": self._perf()["n_eval"] + 1, "pieces": chunks, "finish": finish}
        res.update(self._perf())
        return res

    def ttft(self, a: dict[str, str]) -> dict[str, Any]:
        prompt = read_prompt(a["prompt"])
        self.llm.reset()
        t = Timer()
        it = self.llm.create_completion(prompt, max_tokens=64, stream=True, temperature=0.0,
                                        repeat_penalty=1.0)
        next(it)
        ms = t.ms()
        it.close()
        return {"ttft_ms": ms}

    def scale(self, a: dict[str, str]) -> dict[str, Any]:
        k, n = int(a["workers"]), int(a["n"])
        prompt = read_prompt(a["prompt"])
        llms = [self._llama(1, self.n_ctx) for _ in range(k)]
        for llm in llms:
            llm.create_completion(prompt, max_tokens=2, temperature=0.0)

        def work(i: int) -> int:
            llms[i].reset()
            r = llms[i].create_completion(prompt, max_tokens=n, temperature=0.0,
                                          repeat_penalty=1.0)
            return int(r["usage"]["completion_tokens"])

        return _run_threads(k, work, lambda: [llm.close() for llm in llms])

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()


# --------------------------------------------------------------------------------------


def parse(line: str) -> tuple[str, dict[str, str]]:
    words = line.split()
    args = {}
    for w in words[1:]:
        key, _, value = w.partition("=")
        args[key] = value
    return words[0], args


def use_package_dir() -> None:
    """With LLAMABIND_BENCH_PKG_DIR set, import llamabind from that directory (say, a
    patched build being evaluated) instead of the installed one: the editable install's
    import hook is taken out of the way first."""
    where = os.environ.get("LLAMABIND_BENCH_PKG_DIR")
    if not where:
        return
    sys.meta_path[:] = [f for f in sys.meta_path
                        if "editable" not in type(f).__module__.lower()
                        and "editable" not in type(f).__name__.lower()]
    sys.path.insert(0, where)


def main(argv: list[str]) -> int:
    impl = argv[1] if len(argv) > 1 else "llamabind"
    if impl == "llamabind":
        use_package_dir()
    out = sys.stdout
    # Keep the protocol channel clean: anything a library prints goes to stderr.
    sys.stdout = sys.stderr
    worker: Any = LlamabindWorker() if impl == "llamabind" else LlamaCppWorker()
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd, args = parse(line)
        if cmd == "quit":
            break
        try:
            if cmd == "rss":
                reply: dict[str, Any] = {"rss_kb": rss_kb(), "peak_rss_kb": peak_rss_kb()}
            else:
                reply = getattr(worker, cmd)(args)
            reply = {"ok": True, **reply}
        except Exception as exc:  # reported to bench.py, which decides
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

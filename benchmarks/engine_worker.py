"""One measurement of bench_engine.py, in a process of its own; prints one JSON line.

    python engine_worker.py '{"mode": "engine", "model": PATH, "batch": 8, "npp": 64,
                              "ntg": 64, ...}'

Modes:
* ``engine``: B threads call ``LoadedModel.generate`` at once (default settings), each
  with a prompt of exactly ``npp`` token ids and ``ntg`` tokens to generate
  (ignore_eos, greedy): the aggregate tokens/s (S) and generation tokens/s (S_TG).
* ``pooled``: the path before the engine: B threads, each on a context of its own
  (default threads), the process-wide CPU budget off.
* ``peer``: llama-cpp-python, one ``Llama`` behind a lock (its server's way).
* ``ttft``: 8 streams generate; a new request with a 64-token prompt arrives: its time
  to first token, the streams' inter-token gaps (median = the step time, p99).
* ``prefix``: time to first token of a request whose 1,000-token prefix is cached (the
  previous request had it), against the same request uncached.
* ``embed``: ``model.embed`` over N texts.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import threading
import time
from typing import Any


def _prompts(n_vocab: int, batch: int, npp: int, seed: int, bos: int | None) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(batch):
        toks = [rng.randrange(100, n_vocab - 100) for _ in range(npp)]
        if bos is not None:
            toks[0] = bos
        out.append(toks)
    return out


def _in_threads(k: int, work: Any) -> tuple[float, list[Any]]:
    barrier = threading.Barrier(k + 1)
    results: list[Any] = [None] * k

    def run(i: int) -> None:
        barrier.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results


def run_engine(a: dict[str, Any], pooled: bool) -> dict[str, Any]:
    import llamabind as lb

    model = lb.LoadedModel.load(a["model"], **a.get("options", {}))
    vocab = model.vocab
    bos = vocab.bos if vocab.add_bos and vocab.bos >= 0 else None
    prompts = _prompts(model.native.n_vocab, a["batch"], a["npp"], a.get("seed", 1), bos)
    opts = {"temperature": 0.0, "max_tokens": a["ntg"], "ignore_eos": True}
    if pooled:
        lb.set_cpu_budget(0)
        sessions = [model.create_session() for _ in range(a["batch"])]
        for s in sessions:
            s.generate([1, 2, 3] if bos is None else [bos, 2, 3], max_tokens=2)

        def work(i: int) -> tuple[float, float, int]:
            r = sessions[i].generate(prompts[i], **opts)
            return r.prompt_eval_ms, r.generation_ms, r.completion_tokens
    else:
        model.generate(prompts[0][:8], max_tokens=2)   # the engine's context, warmed
        model.engine.clear_cache()
        starts: list[float] = []

        def work(i: int) -> tuple[float, float, int]:
            t = time.perf_counter()
            starts.append(t)
            r = model.generate(prompts[i], **opts)
            return t + (r.queue_ms + r.prompt_eval_ms) / 1000, r.generation_ms, \
                r.completion_tokens

    wall, results = _in_threads(a["batch"], work)
    n_gen = sum(r[2] for r in results)
    out: dict[str, Any] = {"wall_s": wall, "n_gen": n_gen,
                           "S": (a["batch"] * a["npp"] + n_gen) / wall}
    if not pooled:
        # generation phase: from the last request's first token to the end
        t_first_last = max(r[0] for r in results)
        t_end = max(r[0] + r[1] / 1000 for r in results)
        out["S_TG"] = a["batch"] * (a["ntg"] - 1) / max(t_end - t_first_last, 1e-9)
        out["stats"] = model.stats()
    model.close()
    return out


def run_peer(a: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp  # type: ignore[import-not-found]

    llm = llama_cpp.Llama(a["model"], n_ctx=2048, verbose=False)
    n_vocab = llm.n_vocab()
    prompts = _prompts(n_vocab, a["batch"], a["npp"], a.get("seed", 1), None)
    lock = threading.Lock()
    eog = [t for t in range(n_vocab) if llm._model.token_is_eog(t)] \
        if hasattr(llm._model, "token_is_eog") else [llm.token_eos()]

    def work(i: int) -> int:
        with lock:   # llama-cpp-python's server serialises requests like this
            r = llm.create_completion(prompts[i], max_tokens=a["ntg"], temperature=0.0,
                                      logit_bias={t: -1e9 for t in eog})
            return int(r["usage"]["completion_tokens"])

    wall, counts = _in_threads(a["batch"], work)
    n_gen = sum(counts)
    return {"wall_s": wall, "n_gen": n_gen, "S": (a["batch"] * a["npp"] + n_gen) / wall}


def run_ttft(a: dict[str, Any]) -> dict[str, Any]:
    import llamabind as lb

    model = lb.LoadedModel.load(a["model"], **a.get("options", {}))
    vocab = model.vocab
    bos = vocab.bos if vocab.add_bos and vocab.bos >= 0 else None
    prompts = _prompts(model.native.n_vocab, 9, 64, a.get("seed", 2), bos)
    model.generate(prompts[0][:8], max_tokens=2)
    model.engine.clear_cache()
    gaps: list[float] = []
    started = threading.Event()
    running = [0]
    lock = threading.Lock()

    def stream(i: int) -> None:
        last = None
        for ev in model.submit(prompts[i], temperature=0.0, max_tokens=a.get("ntg", 160),
                               ignore_eos=True):
            now = time.perf_counter()
            if last is None:
                with lock:
                    running[0] += 1
                    if running[0] == 8:
                        started.set()
            elif ev.tokens:
                gaps.append(now - last)
            last = now

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.3)
    t0 = time.perf_counter()
    req = model.submit(prompts[8], temperature=0.0, max_tokens=4, ignore_eos=True)
    first = next(iter(req))
    ttft = time.perf_counter() - t0
    assert first.tokens
    req.cancel()
    for t in threads:
        t.join()
    gaps.sort()
    step = statistics.median(gaps)
    p99 = gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))]
    model.close()
    return {"ttft_s": ttft, "step_s": step, "gap_p99_s": p99, "gaps": len(gaps)}


def run_prefix(a: dict[str, Any]) -> dict[str, Any]:
    import llamabind as lb

    model = lb.LoadedModel.load(a["model"], **a.get("options", {}))
    words = ("The committee reviewed the quarterly figures and the notes of the last "
             "meeting before it turned to the budget of the coming year. ").split()
    prefix = " ".join(words[i % len(words)] for i in range(760))
    n_prefix = len(model.tokenize(prefix))
    model.generate("warm up", max_tokens=2)

    def ttft(text: str) -> tuple[float, int]:
        t0 = time.perf_counter()
        req = model.submit(text, temperature=0.0, max_tokens=2)
        next(iter(req))
        elapsed = time.perf_counter() - t0
        return elapsed, req.result()[0].cached_prompt_tokens

    out = {"n_prefix": n_prefix}
    model.engine.clear_cache()
    out["uncached_s"], _ = ttft(prefix + "\nQuestion: what was reviewed?")
    out["cached_s"], out["cached_tokens"] = ttft(prefix + "\nQuestion: what comes next?")
    # from the RAM prompt cache: the slot's cells pushed out by other requests first
    model.generate_many([f"Unrelated prompt number {i}, about the sea. " * 8 for i in range(16)],
                        max_tokens=2)
    out["ram_s"], out["ram_cached_tokens"] = ttft(prefix + "\nQuestion: and after that?")
    model.close()
    return out


def run_embed(a: dict[str, Any]) -> dict[str, Any]:
    import llamabind as lb

    model = lb.LoadedModel.load(a["model"], **a.get("options", {}))
    texts = [line for line in a["texts"]]
    model.embed(texts[:4])
    t0 = time.perf_counter()
    e = model.embed(texts)
    wall = time.perf_counter() - t0
    model.close()
    return {"wall_s": wall, "n": len(texts), "d": int(e.shape[1])}


def main() -> int:
    a = json.loads(sys.argv[1])
    mode = a["mode"]
    if mode in ("engine", "pooled"):
        out = run_engine(a, pooled=mode == "pooled")
    elif mode == "peer":
        out = run_peer(a)
    elif mode == "ttft":
        out = run_ttft(a)
    elif mode == "prefix":
        out = run_prefix(a)
    elif mode == "embed":
        out = run_embed(a)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

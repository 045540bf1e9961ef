"""Throughput of llamabind on Ray: Serve replicas and Ray Data actors, 1 against 2.

    python benchmarks/bench_ray.py                  # about 10 minutes on 2 cores
    python benchmarks/bench_ray.py --rounds 1 --requests 4 --rows 4 --max-tokens 4  # smoke

A local Ray cluster of ``--cpus`` CPUs (default: all) runs each configuration in turn,
``RxC``: R replicas (or actors) of C CPUs and C threads each. The default,
``1x1,2x1,1x2``, asks two questions: does a second replica double the throughput of
one (1x1 against 2x1: two cores instead of one), and on the same two cores, are two
1-thread engines faster than one 2-thread engine (2x1 against 1x2)?

* Serve: :func:`llamabind.ray.serve_openai` with ``--parallel`` slots per replica; the
  same ``--clients`` clients (threads, httpx) send ``--requests`` non-streamed
  ``/v1/chat/completions`` in all, one of 8 chat prompts each made unique by a request
  number, greedy, every end-of-generation token banned by ``logit_bias`` so that each
  request generates exactly ``--max-tokens`` tokens. Measured after the replicas are up
  and one warm-up request has been answered: completion tokens per second of the whole
  level (all tokens over its wall time) and the requests' latency p50/p99.
* Data: :func:`llamabind.ray.generate_dataset` over ``--rows`` prompts (the same
  prompts, ``ignore_eos``, ``--max-tokens`` each), ``--batch-size`` rows per batch.
  The wall time is the whole job: the actors' start and model load included, as a job
  pays them (reported too: ``start s``, the time to a 1-row, 1-token job).

Configurations take turns within each round, their order rotated each round; reported:
the median over rounds. Results go to ``benchmarks/results/ray-<timestamp>.json``.
Run it on an idle machine (``uptime`` first): the figures are throughput.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_MODEL = ROOT / "models" / "gguf" / "SmolLM2-135M-Instruct-Q4_1.gguf"
RESULTS = HERE / "results"

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List some uses of baking soda around the house.",
    "What should I pack for a weekend of hiking?",
    "Describe the water cycle to a ten-year-old.",
    "Give me tips for learning to play the guitar.",
    "Why is the sky blue?",
    "Summarize the plot of a detective novel you invent.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def eog_bias(model: Path) -> dict[str, float]:
    """logit_bias banning every end-of-generation token of ``model``."""
    import llamabind

    with llamabind.Model(str(model), vocab_only=True) as m:
        vocab = m.vocab
        return {str(t): -100.0 for t in range(len(vocab)) if vocab.is_eog(t)}


def parse_configs(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        replicas, _, cpus = item.strip().partition("x")
        out.append((int(replicas), int(cpus or 1)))
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- Serve ---------------------------------------------------------------------------------

def drive(url: str, clients: int, requests: int, max_tokens: int,
          bias: dict[str, float]) -> dict[str, Any]:
    """``requests`` chat completions from ``clients`` threads, back to back."""
    import httpx

    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = {"model": "bench", "temperature": 0, "max_tokens": max_tokens,
                        "logit_bias": bias, "messages": [{
                            "role": "user",
                            "content": f"(request {i}) {PROMPTS[i % len(PROMPTS)]}"}]}
                t0 = time.perf_counter()
                try:
                    r = http.post(f"{url}/chat/completions", json=body)
                    r.raise_for_status()
                    n = int(r.json()["usage"]["completion_tokens"])
                except Exception as exc:
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    tokens.append(n)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"wall_s": wall, "tokens": sum(tokens), "tok_per_s": sum(tokens) / wall,
            "latency_p50_s": percentile(latencies, 0.5),
            "latency_p99_s": percentile(latencies, 0.99), "errors": errors}


def run_serve(args: argparse.Namespace, port: int, replicas: int, cpus: int,
              bias: dict[str, float]) -> dict[str, Any]:
    from ray import serve

    import llamabind.ray

    t0 = time.perf_counter()
    llamabind.ray.serve_openai(str(args.model), num_replicas=replicas, num_cpus=cpus,
                               app_name="bench", alias="bench", n_ctx=args.ctx,
                               n_parallel=args.parallel)
    up = time.perf_counter() - t0
    try:
        url = f"http://127.0.0.1:{port}/v1"
        drive(url, 1, 1, 2, bias)   # warm-up
        result = drive(url, args.clients, args.requests, args.max_tokens, bias)
    finally:
        serve.delete("bench")
    result["start_s"] = up
    return result


# --- Data ----------------------------------------------------------------------------------

def run_data(args: argparse.Namespace, actors: int, cpus: int, rows: int,
             max_tokens: int) -> dict[str, Any]:
    import ray

    import llamabind.ray

    items = [{"prompt": f"(row {i}) {PROMPTS[i % len(PROMPTS)]}"} for i in range(rows)]
    t0 = time.perf_counter()
    ds = ray.data.from_items(items)
    out = llamabind.ray.generate_dataset(
        ds, str(args.model), concurrency=actors, num_cpus=cpus, batch_size=args.batch_size,
        n_ctx=args.ctx, n_parallel=args.parallel, temperature=0, ignore_eos=True,
        max_tokens=max_tokens)
    done = out.take_all()
    wall = time.perf_counter() - t0
    tokens = sum(int(r["completion_tokens"]) for r in done)
    return {"wall_s": wall, "tokens": tokens, "tok_per_s": tokens / wall, "rows": len(done)}


# --- report --------------------------------------------------------------------------------

def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def report(runs: dict[str, dict[str, list[dict[str, Any]]]], meta: dict[str, Any]) -> str:
    def f(x: float | None, spec: str = ".1f") -> str:
        return "-" if x is None else format(x, spec)

    lines = [f"llamabind on Ray: {meta['model']}, {meta['parallel']} slots per engine, "
             f"{meta['max_tokens']} tokens per request/row, median of {meta['rounds']} "
             f"round(s); load {meta['load_before']} -> {meta['load_after']}", "",
             f"Serve ({meta['clients']} clients, {meta['requests']} requests):",
             "| config | tok/s | x of 1x1 | latency p50 s | p99 s | replicas up s | errors |",
             "|---|---|---|---|---|---|---|"]
    base = median([r["tok_per_s"] for r in runs["serve"].get("1x1", [])])
    for config, rs in runs["serve"].items():
        tps = median([r["tok_per_s"] for r in rs])
        ratio = tps / base if tps is not None and base else None
        lines.append(
            f"| {config} | {f(tps)} | {f(ratio, '.2f')} "
            f"| {f(median([r['latency_p50_s'] for r in rs]), '.2f')} "
            f"| {f(median([r['latency_p99_s'] for r in rs]), '.2f')} "
            f"| {f(median([r['start_s'] for r in rs]))} "
            f"| {sum(len(r['errors']) for r in rs)} |")
    lines += ["", f"Data ({meta['rows']} rows, batch size {meta['batch_size']}):",
              "| config | tok/s (whole job) | x of 1x1 | job s | start s |",
              "|---|---|---|---|---|"]
    base = median([r["tok_per_s"] for r in runs["data"].get("1x1", [])])
    for config, rs in runs["data"].items():
        tps = median([r["tok_per_s"] for r in rs])
        ratio = tps / base if tps is not None and base else None
        start = median([r["wall_s"] for r in runs["data_start"].get(config, [])])
        lines.append(f"| {config} | {f(tps)} | {f(ratio, '.2f')} "
                     f"| {f(median([r['wall_s'] for r in rs]))} | {f(start)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--configs", default="1x1,2x1,1x2",
                    help="RxC: R replicas/actors of C CPUs and threads each (1x1,2x1,1x2)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2,
                    help="CPUs of the local Ray cluster (default: all)")
    ap.add_argument("--parallel", type=int, default=8, help="slots per engine (8)")
    ap.add_argument("--ctx", type=int, default=1024, help="context per request (1024)")
    ap.add_argument("--clients", type=int, default=16, help="Serve: concurrent clients (16)")
    ap.add_argument("--requests", type=int, default=48, help="Serve: requests per run (48)")
    ap.add_argument("--rows", type=int, default=96, help="Data: prompts per run (96)")
    ap.add_argument("--batch-size", type=int, default=16, help="Data: rows per batch (16)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per request (64)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parts", default="serve,data", help="serve, data or both")
    args = ap.parse_args(argv)
    configs = parse_configs(args.configs)
    parts = {p.strip() for p in args.parts.split(",")}
    if max(r * c for r, c in configs) > args.cpus:
        print(f"bench_ray: a configuration needs more than --cpus {args.cpus}",
              file=sys.stderr)
        return 2
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    import llamabind

    bias = eog_bias(args.model)
    load_before = os.getloadavg()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    port = free_port()
    if "serve" in parts:
        from ray import serve

        # the proxy's port is set once, when Serve starts
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"serve": {}, "data": {},
                                                        "data_start": {}}
    try:
        for rnd in range(args.rounds):
            shift = rnd % len(configs)
            for replicas, cpus in configs[shift:] + configs[:shift]:
                name = f"{replicas}x{cpus}"
                if "serve" in parts:
                    res = run_serve(args, port, replicas, cpus, bias)
                    runs["serve"].setdefault(name, []).append(res)
                    print(f"round {rnd + 1}/{args.rounds} serve {name}: "
                          f"{res['tok_per_s']:.1f} tok/s, errors {len(res['errors'])}",
                          file=sys.stderr)
                if "data" in parts:
                    start = run_data(args, replicas, cpus, 1, 1)
                    res = run_data(args, replicas, cpus, args.rows, args.max_tokens)
                    runs["data_start"].setdefault(name, []).append(start)
                    runs["data"].setdefault(name, []).append(res)
                    print(f"round {rnd + 1}/{args.rounds} data  {name}: "
                          f"{res['tok_per_s']:.1f} tok/s ({res['wall_s']:.1f} s, start "
                          f"{start['wall_s']:.1f} s)", file=sys.stderr)
    finally:
        ray.shutdown()
    meta = {"model": args.model.name, "configs": args.configs, "cpus": args.cpus,
            "parallel": args.parallel, "ctx": args.ctx, "clients": args.clients,
            "requests": args.requests, "rows": args.rows, "batch_size": args.batch_size,
            "max_tokens": args.max_tokens, "rounds": args.rounds,
            "load_before": " ".join(f"{x:.1f}" for x in load_before),
            "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "machine": platform.platform(), "machine_cpus": os.cpu_count(),
            "ray": ray.__version__,
            "llama_cpp_commit": llamabind.build_info()["llama_cpp_commit"]}
    print(report(runs, meta))
    RESULTS.mkdir(exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"ray-{stamp}.json"
    out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    print(f"\nresults: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

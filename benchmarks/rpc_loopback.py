"""Models split across ggml RPC workers on loopback, against the same model run locally.

    python benchmarks/rpc_loopback.py                 # both test models, 3 rounds
    python benchmarks/rpc_loopback.py --models smollm2 --rounds 5

Starts two ``llamabind rpc-server`` workers on free loopback ports and, per model and
round (the configurations in a shuffled order each round), loads the model, evaluates a
prompt and generates greedily:

* ``local``: every layer on this CPU;
* ``split``: two thirds of the layers (and the output layer) on the workers, half each,
  the first third on this CPU (as tests/test_rpc.py does);
* ``workers``: every layer on the workers (this CPU keeps only the input embeddings).

Reported: model load time (``Model(...)``, which for the split ones includes sending
the weights over loopback), prompt evaluation (tokens/s) and generation (tokens/s), as
medians over rounds with the min-max range. The client and each worker use one thread
by default: on a 2-core machine a second thread per process only adds spinning at ggml's
barriers (only one of the three processes computes at a time). Loopback measures the
protocol's overhead (a round trip per graph split and per token), not a network:
between machines, add the link's latency per split per token. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "models"))

import fetch_models  # noqa: E402
from _rpc_workers import Worker  # noqa: E402

import llamabind  # noqa: E402

MODELS = {"smollm2": "smollm2", "qwen": "qwen2.5-0.5b"}
PROMPT = ("Write a short story about a lighthouse keeper who finds a message in a "
          "bottle. ") * 6


def run_once(path: str, config: str, endpoints: list[str], threads: int,
             n_gen: int) -> dict[str, float]:
    kwargs: dict[str, object] = {"use_extra_bufts": False}
    if config != "local":
        with llamabind.Model(path, vocab_only=True) as probe:
            n_layer = int(probe.meta(f"{probe.meta('general.architecture')}.block_count"))
        kwargs.update(rpc_servers=endpoints, tensor_split=[1, 1],
                      n_gpu_layers=-1 if config == "workers" else (n_layer + 1) * 2 // 3)
    t0 = time.perf_counter()
    model = llamabind.Model(path, **kwargs)  # type: ignore[arg-type]
    load_s = time.perf_counter() - t0
    try:
        with llamabind.Context(model, n_ctx=1024, n_threads=threads) as ctx:
            prompt = model.vocab.tokenize(PROMPT)
            t0 = time.perf_counter()
            ctx.eval(prompt)
            pp_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            made = sum(1 for _ in llamabind.TokenGenerator(ctx, len(prompt),
                                                           max_tokens=n_gen))
            tg_s = time.perf_counter() - t0
    finally:
        model.close()
    return {"load_s": load_s, "pp": len(prompt) / pp_s, "tg": made / tg_s,
            "n_prompt": len(prompt), "n_gen": made}


def summary(values: list[float], fmt: str) -> str:
    mid = statistics.median(values)
    return f"{mid:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS),
                        default=["smollm2", "qwen"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="client threads (1)")
    parser.add_argument("--worker-threads", type=int, default=1, help="per worker (1)")
    parser.add_argument("-n", "--n-gen", type=int, default=64, help="tokens to generate")
    args = parser.parse_args(argv)

    workers = [Worker(threads=args.worker_threads), Worker(threads=args.worker_threads)]
    endpoints = [w.endpoint for w in workers]
    configs = ["local", "split", "workers"]
    rows = []
    try:
        for key in args.models:
            path = str(fetch_models.fetch(MODELS[key]))
            samples: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
            for _ in range(args.rounds):
                for config in random.sample(configs, len(configs)):
                    samples[config].append(
                        run_once(path, config, endpoints, args.threads, args.n_gen))
            base = statistics.median(s["tg"] for s in samples["local"])
            for config in configs:
                s = samples[config]
                tg = [x["tg"] for x in s]
                rows.append(
                    f"| {key} | {config} | {summary([x['load_s'] for x in s], '.2f')} | "
                    f"{summary([x['pp'] for x in s], '.0f')} | {summary(tg, '.1f')} | "
                    f"{statistics.median(tg) / base:.2f} |")
    finally:
        for w in workers:
            w.stop()
    print(f"client threads {args.threads}, worker threads {args.worker_threads}, "
          f"{args.rounds} rounds, {args.n_gen} generated tokens, prompt "
          f"{len(PROMPT)} chars")
    print("| model | layers | load s | prompt t/s | generation t/s | tg vs local |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""llama-bench against llamabind with every layer on the GPU: pp and tg as ratios.

    python scripts/gpu_bench.py --native-dir build/native-gpu/bin MODEL.gguf [MODEL ...]
        [--reps 5] [--n-prompt 512] [--n-gen 128] [--threads 4]
        [--out gpu-bench.json] [--table gpu-bench.md]

scripts/test_gpu.sh runs it with the llamabind and llama-bench it built the same way.
For each model, native ``llama-bench -ngl 99`` runs pp (one prompt of n-prompt random
tokens) and tg (n-gen single-token decodes from an empty context), each after one
warm-up, ``--reps`` times; llamabind then does the same in this process with a context
of the same sizes: ``Context.eval`` of random tokens for pp, and one ``Context.eval``
per token for tg. Each figure is the mean of the repetitions in tokens per second, with
its standard deviation; the ratio is llamabind's over llama-bench's.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import llamabind


def native(bench: Path, model: Path, a: argparse.Namespace) -> dict[str, dict[str, float]]:
    cmd = [str(bench), "-m", str(model), "-ngl", "99", "-p", str(a.n_prompt),
           "-n", str(a.n_gen), "-r", str(a.reps), "-t", str(a.threads),
           "-b", "2048", "-ub", "512", "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"gpu_bench: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    out: dict[str, dict[str, float]] = {}
    for row in json.loads(proc.stdout):
        test = "pp" if row["n_gen"] == 0 else "tg"
        out[test] = {"ts": float(row["avg_ts"]), "sd": float(row["stddev_ts"])}
    return out


def _mean_sd(values: list[float]) -> dict[str, float]:
    return {"ts": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def ours(model_path: Path, a: argparse.Namespace) -> dict[str, dict[str, float]]:
    rng = random.Random(1)
    with llamabind.Model(str(model_path), n_gpu_layers=-1) as model, llamabind.Context(
            model, n_ctx=a.n_prompt + a.n_gen, n_batch=2048, n_ubatch=512,
            n_threads=a.threads) as ctx:
        n_vocab = model.vocab.n_tokens

        def pp() -> float:
            tokens = [rng.randrange(n_vocab) for _ in range(a.n_prompt)]
            ctx.memory_clear()
            t0 = time.perf_counter()
            ctx.eval(tokens)
            ctx.logits(-1)  # waits for the device
            return float(a.n_prompt) / (time.perf_counter() - t0)

        def tg() -> float:
            tokens = [rng.randrange(n_vocab) for _ in range(a.n_gen)]
            ctx.memory_clear()
            t0 = time.perf_counter()
            for token in tokens:
                ctx.eval([token])
            ctx.logits(-1)
            return float(a.n_gen) / (time.perf_counter() - t0)

        out = {}
        for name, run in (("pp", pp), ("tg", tg)):
            run()  # warm-up, as llama-bench
            out[name] = _mean_sd([run() for _ in range(a.reps)])
    return out


def gpu_line() -> str:
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--native-dir", type=Path, required=True, help="where llama-bench is")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--out", type=Path, help="JSON results")
    ap.add_argument("--table", type=Path, help="the table, as Markdown")
    a = ap.parse_args(argv)
    bench = a.native_dir / "llama-bench"
    if not bench.is_file():
        ap.error(f"{bench} does not exist")
    info = llamabind.build_info()
    rows: list[dict[str, Any]] = []
    for model in a.models:
        theirs, mine = native(bench, model, a), ours(model, a)
        for test in ("pp", "tg"):
            size = a.n_prompt if test == "pp" else a.n_gen
            rows.append({"model": model.name, "test": f"{test}{size}",
                         "llama_bench_ts": theirs[test]["ts"], "llama_bench_sd": theirs[test]["sd"],
                         "llamabind_ts": mine[test]["ts"], "llamabind_sd": mine[test]["sd"],
                         "ratio": mine[test]["ts"] / theirs[test]["ts"]})
            print(f"gpu_bench: {rows[-1]}", file=sys.stderr)
    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu_line(), "llama_cpp_commit": info["llama_cpp_commit"],
        "backends": info["backends"], "reps": a.reps, "threads": a.threads, "rows": rows,
    }
    lines = [f"GPU: {result['gpu']}; llama.cpp {result['llama_cpp_commit']}; "
             f"{a.reps} reps, mean t/s ± sd", "",
             "| model | test | llama-bench t/s | llamabind t/s | llamabind / llama-bench |",
             "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['model']} | {r['test']} | {r['llama_bench_ts']:.1f} ± "
              f"{r['llama_bench_sd']:.1f} | {r['llamabind_ts']:.1f} ± {r['llamabind_sd']:.1f} "
              f"| {r['ratio']:.3f} |" for r in rows]
    table = "\n".join(lines) + "\n"
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    if a.table:
        a.table.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

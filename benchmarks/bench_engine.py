#!/usr/bin/env python3
"""Many requests at once: llamabind's batching engine against native llama.cpp.

    python benchmarks/bench_engine.py                  # both models, the full table
    python benchmarks/bench_engine.py --quick          # SmolLM2, fewer sizes, 1 round
    python benchmarks/bench_engine.py --update-chart   # also write benchmarks/engine_chart.png

For each model, prompt/generation size and batch size B (concurrent callers), in
interleaved rounds, each run a fresh process:
* native ``llama-batched-bench`` (built from the pinned source with llamabind's options by
  ``scripts/build_native.py --target llama-batched-bench``), B sequences of npp prompt and
  ntg generated tokens: S (all tokens/s) and S_TG (generated tokens/s);
* llamabind's engine: B threads calling ``LoadedModel.generate`` at once with default
  settings (a prompt of exactly npp token ids, ntg tokens, greedy, end tokens ignored);
* the path before the engine ("pooled"): a context per caller, no shared CPU budget;
* llama-cpp-python (one ``Llama`` behind a lock, as its server does), when ``--peer-python``
  names an interpreter that has it.
Then: time to first token of a request arriving while 8 others stream, their inter-token
gaps; a 1,000-token prefix cached against uncached; embeddings of 256 texts against
native ``llama-embedding``. Writes benchmarks/results/engine-<time>.json and prints a
table of ratios (median over rounds, [min, max]).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
MODELS = {
    "SmolLM2-135M Q4_1": ROOT / "models" / "gguf" / "SmolLM2-135M-Instruct-Q4_1.gguf",
    "Qwen2.5-Coder-0.5B Q4_K_M": ROOT / "models" / "gguf" /
    "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
}


def native_bin() -> Path:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_native.py"),
                           "--target", "llama-batched-bench", "--target", "llama-embedding"],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"could not build the native tools:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def batched_bench(bin_dir: Path, model: Path, b: int, npp: int, ntg: int,
                  threads: int) -> dict[str, float]:
    # the engine's defaults: one shared KV buffer (-kvu), n_batch 512, n_ubatch 512
    cmd = [str(bin_dir / "llama-batched-bench"), "-m", str(model), "-c",
           str(max(2048, b * (npp + ntg) + 64)), "-b", "512", "-ub", "512", "-kvu",
           "-npp", str(npp), "-ntg", str(ntg), "-npl", str(b), "-t", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    rows = [line for line in proc.stdout.splitlines() if re.match(r"^\|\s+\d", line)]
    if proc.returncode != 0 or not rows:
        raise RuntimeError(f"llama-batched-bench failed: {proc.stderr[-2000:]}")
    cells = [c.strip() for c in rows[-1].strip("|").split("|")]
    # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    return {"S_PP": float(cells[5]), "S_TG": float(cells[7]), "S": float(cells[9])}


def worker(args: dict[str, Any], python: str = sys.executable) -> dict[str, Any]:
    proc = subprocess.run([python, str(HERE / "engine_worker.py"), json.dumps(args)],
                          capture_output=True, text=True, check=False, cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args['mode']} failed: {proc.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def embed_native(bin_dir: Path, model: Path, texts: list[str], threads: int) -> float:
    """Seconds llama-embedding takes for the texts beyond what it takes for one text:
    its decodes, without the model load and start-up (not on llamabind's side either).
    Not its own perf counter: with several decodes of many sequences its "prompt eval
    time" counted 7.6 s where the decodes took 16 s (its log's timestamps)."""
    def wall(lines: list[str]) -> float:
        path = ROOT / "benchmarks" / "results" / "embed-texts.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines))
        cmd = [str(bin_dir / "llama-embedding"), "-m", str(model), "-f", str(path),
               "--pooling", "mean", "--embd-normalize", "2", "--embd-output-format", "json",
               "-c", "2048", "-b", "2048", "-ub", "2048", "-t", str(threads), "--no-warmup"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"llama-embedding failed: {proc.stderr[-2000:]}")
        return seconds

    return wall(texts) - wall(texts[:1])


def embed_texts(n: int) -> list[str]:
    words = ("river mountain cloud engine garden silver letter window market autumn "
             "music bridge lantern orbit paper stone candle harbor").split()
    return [" ".join(words[(i * 7 + k * 3) % len(words)] for k in range(6 + i % 20))
            for i in range(n)]


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--sizes", default="64x64,128x128", help="NPPxNTG,...")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=0, help="0: llamabind's default")
    ap.add_argument("--no-pooled", action="store_true", help="skip the pre-engine path")
    ap.add_argument("--peer-python", default=None,
                    help="an interpreter with llama-cpp-python installed")
    ap.add_argument("--prefill-budgets", default="none,4",
                    help="the latency probe's prefill_budget settings (none: the default)")
    ap.add_argument("--update-chart", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.batches, args.sizes = 1, "1,4,16", "64x64"
        args.models = next(iter(MODELS))
    import llamabind

    threads = args.threads or llamabind.default_threads()
    batches = [int(x) for x in args.batches.split(",")]
    args.prefill_budgets = [None if x == "none" else int(x)
                            for x in args.prefill_budgets.split(",")]
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    bin_dir = native_bin()
    results: dict[str, Any] = {"machine": list(os.uname()), "threads": threads,
                               "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "rounds": args.rounds, "models": {}}
    for name in args.models.split(","):
        model = MODELS[name]
        runs: dict[str, list[dict[str, Any]]] = {}
        for r in range(args.rounds):
            for npp, ntg in sizes:
                for b in batches:
                    key = f"{npp}x{ntg}/B={b}"
                    order = ["native", "engine", "pooled", "peer"]
                    order = order[r % 4:] + order[:r % 4]   # interleave: rotate the order
                    for impl in order:
                        base = {"model": str(model), "batch": b, "npp": npp, "ntg": ntg,
                                "seed": 100 + b}
                        if impl == "native":
                            out = batched_bench(bin_dir, model, b, npp, ntg, threads)
                        elif impl == "engine":
                            out = worker({**base, "mode": "engine"})
                        elif impl == "pooled" and not args.no_pooled and b <= 8:
                            out = worker({**base, "mode": "pooled"})
                        elif impl == "peer" and args.peer_python:
                            out = worker({**base, "mode": "peer"}, args.peer_python)
                        else:
                            continue
                        runs.setdefault(f"{key}/{impl}", []).append(out)
                        print(f"[{name}] round {r + 1} {key} {impl}: S {out['S']:.1f}"
                              + (f" S_TG {out['S_TG']:.1f}" if "S_TG" in out else ""),
                              flush=True)
            for budget in args.prefill_budgets:
                options = {} if budget is None else {"prefill_budget": budget}
                ttft = worker({"mode": "ttft", "model": str(model), "options": options})
                tag = "ttft" if budget is None else f"ttft/prefill_budget={budget}"
                runs.setdefault(tag, []).append(ttft)
                print(f"[{name}] round {r + 1} {tag} {ttft}", flush=True)
            prefix = worker({"mode": "prefix", "model": str(model)})
            runs.setdefault("prefix", []).append(prefix)
            print(f"[{name}] round {r + 1} prefix {prefix}", flush=True)
            texts = embed_texts(256)
            ours = worker({"mode": "embed", "model": str(model), "texts": texts})
            native_s = embed_native(bin_dir, model, texts, threads)
            runs.setdefault("embed", []).append({"ours_s": ours["wall_s"],
                                                 "native_s": native_s})
            print(f"[{name}] round {r + 1} embed {ours['wall_s']:.2f} s, native "
                  f"{native_s:.2f} s", flush=True)
        results["models"][name] = {"runs": runs, "summary": summarize(runs, sizes, batches)}
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"engine-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\nwrote {path}")
    if args.update_chart:
        print(chart(results, HERE / "engine_chart.png"))
    return 0


def summarize(runs: dict[str, list[dict[str, Any]]], sizes: list[tuple[int, ...]],
              batches: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for npp, ntg in sizes:
        for b in batches:
            key = f"{npp}x{ntg}/B={b}"
            native = runs.get(f"{key}/native", [])
            for impl in ("engine", "pooled", "peer"):
                ours = runs.get(f"{key}/{impl}", [])
                n = min(len(native), len(ours))
                if not n:
                    continue
                entry = {"S": spread([o["S"] / nat["S"] for o, nat in
                                      zip(ours[:n], native[:n], strict=True)]),
                         "S_abs": spread([o["S"] for o in ours])}
                if "S_TG" in ours[0]:
                    entry["S_TG"] = spread([o["S_TG"] / nat["S_TG"] for o, nat in
                                            zip(ours[:n], native[:n], strict=True)])
                out[f"{key}/{impl}"] = entry
            if native:
                out[f"{key}/native"] = {"S_abs": spread([x["S"] for x in native]),
                                        "S_TG_abs": spread([x["S_TG"] for x in native])}
    for tag, t in runs.items():
        if tag.startswith("ttft"):
            out[tag] = {"ttft_over_step": spread([x["ttft_s"] / x["step_s"] for x in t]),
                        "p99_over_step": spread([x["gap_p99_s"] / x["step_s"] for x in t]),
                        "ttft_ms": spread([x["ttft_s"] * 1000 for x in t]),
                        "step_ms": spread([x["step_s"] * 1000 for x in t])}
    if runs.get("prefix"):
        p = runs["prefix"]
        out["prefix"] = {"uncached_ms": spread([x["uncached_s"] * 1000 for x in p]),
                         "cached_ms": spread([x["cached_s"] * 1000 for x in p]),
                         "ram_ms": spread([x["ram_s"] * 1000 for x in p]),
                         "n_prefix": p[0]["n_prefix"]}
    if runs.get("embed"):
        e = runs["embed"]
        out["embed"] = {"ratio": spread([x["native_s"] / x["ours_s"] for x in e])}
    return out


def fmt(s: dict[str, float] | None, digits: int = 3) -> str:
    if not s:
        return "-"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def table(results: dict[str, Any]) -> str:
    lines = []
    for name, m in results["models"].items():
        summ = m["summary"]
        lines += ["", f"### {name}", "",
                  "| size, B | native S / S_TG t/s | engine S | engine S_TG | pooled S |",
                  "|---|---|---|---|---|"]
        for key in sorted({k.rsplit("/", 1)[0] for k in summ if "/B=" in k},
                          key=lambda k: (k.split("/")[0], int(k.split("=")[1]))):
            nat = summ.get(f"{key}/native", {})
            eng = summ.get(f"{key}/engine", {})
            pooled = summ.get(f"{key}/pooled", {})
            lines.append(f"| {key} | {fmt(nat.get('S_abs'), 1)} / "
                         f"{fmt(nat.get('S_TG_abs'), 1)} | {fmt(eng.get('S'))} | "
                         f"{fmt(eng.get('S_TG'))} | {fmt(pooled.get('S'))} |")
        for tag in sorted(k for k in summ if k.startswith("ttft")):
            t = summ[tag]
            how = tag.partition("/")[2] or "default"
            lines.append(f"\nnew request while 8 stream ({how}): TTFT {fmt(t['ttft_ms'], 1)} "
                         f"ms, step {fmt(t['step_ms'], 1)} ms (TTFT/step "
                         f"{fmt(t['ttft_over_step'], 2)}), inter-token p99/step "
                         f"{fmt(t['p99_over_step'], 2)}")
        if "prefix" in summ:
            p = summ["prefix"]
            lines.append(f"{p['n_prefix']}-token prefix: TTFT uncached {fmt(p['uncached_ms'], 1)}"
                         f" ms, cached in a slot {fmt(p['cached_ms'], 1)} ms, from the RAM "
                         f"cache {fmt(p['ram_ms'], 1)} ms")
        if "embed" in summ:
            lines.append(f"embeddings of 256 texts: speed / native llama-embedding "
                         f"{fmt(summ['embed']['ratio'])}")
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib is not installed"
    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False,
                             sharey=True)
    for ax, (name, m) in zip(axes[0], models.items(), strict=False):
        summ = m["summary"]
        keys = sorted({k.rsplit("/", 1)[0] for k in summ if "/B=" in k},
                      key=lambda k: (k.split("/")[0], int(k.split("=")[1])))
        for offset, (impl, metric, color, label) in enumerate((
                ("engine", "S", "#2b6cb0", "engine S / native S"),
                ("engine", "S_TG", "#63b3ed", "engine S_TG / native S_TG"),
                ("pooled", "S", "#c05621", "before the engine: S / native S"))):
            xs, ys, lo, hi = [], [], [], []
            for i, key in enumerate(keys):
                s = summ.get(f"{key}/{impl}", {}).get(metric)
                if s:
                    xs.append(i + (offset - 1) * 0.27)
                    ys.append(s["median"])
                    lo.append(s["median"] - s["min"])
                    hi.append(s["max"] - s["median"])
            if xs:
                ax.bar(xs, ys, width=0.26, color=color, label=label, yerr=[lo, hi],
                       capsize=2)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(0.95, color="black", lw=0.8, ls=":")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys, rotation=60, fontsize=7)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("ratio to native llama-batched-bench (median, min-max)")
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"wrote {path}"


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Speculative decoding: tokens per second with and without drafts, on input-grounded
tasks (rewrite a ~300-token function with a small change; answer by quoting a passage)
and on free text, for both test models.

    python benchmarks/bench_speculative.py                     # both models, 3 rounds
    python benchmarks/bench_speculative.py --quick             # SmolLM2, 1 round: a check
    python scripts/build_native.py --target llama-server && \\
        python benchmarks/bench_speculative.py --native        # also native llama-server

Side by side, in interleaved rounds (every task and mode once per round, so a slow spell
of the machine falls on all of them), each a greedy chat answer of ``--max-tokens``
tokens at most, the prompt decoded anew each time (the engine's prompt cache cleared) and
not timed:

* llamabind (``LoadedModel.chat``, the batching engine, one request at a time):
  ``plain``; ``lookup`` (``spec_type="ngram-simple"``: prompt lookup); ``self-draft``
  (``spec_type="draft-simple"`` with the model as its own draft model). The test models
  share no vocabulary, and there is no smaller model of either family among them: the
  self-draft shows what verifying a draft model's tokens costs and that they are taken,
  not a speed-up (the draft costs as much as the target);
* llama-cpp-python (``--peer-python``, or build/venv-llama-cpp-python; skipped when not
  found): ``plain`` and its prompt lookup (``LlamaPromptLookupDecoding``, its defaults);
  its prompt is evaluated once before the timed run (it keeps the longest common prefix),
  so its time is the generation's (plus one prompt token);
* native ``llama-server`` (``--native``; ``scripts/build_native.py --target
  llama-server``): ``plain``, ``--spec-type ngram-simple`` and the self-draft (``-md``),
  its own ``timings.predicted_per_second``. (The pinned source carries no
  ``llama-lookup`` or ``llama-speculative-simple``: its examples directory holds only
  ``simple`` and ``embedding``; llama-server has the same drafting code.)

Reported per model and task: the median tokens/s of each mode, the ratio to the same
implementation's plain run (median of the per-round ratios [min, max]), the share of
drafted tokens taken, and whether each mode's tokens equal llamabind's plain ones (or
from which token they part: greedy outputs part only where batched rows' float noise
flips a near tie).
Writes benchmarks/results/speculative-<time>.json. Timing figures need a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "smol": ROOT / "models" / "gguf" / "SmolLM2-135M-Instruct-Q4_1.gguf",
    "qwen": ROOT / "models" / "gguf" / "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
}
PEER_VENV_PYTHON = ROOT / "build" / "venv-llama-cpp-python" / "bin" / "python"

FUNCTION = '''def summarize_orders(orders, currency="EUR", include_cancelled=False):
    """Group orders by customer and return per-customer totals, counts and the date of
    the latest order, sorted by total (highest first)."""
    totals = {}
    for order in orders:
        if order.get("status") == "cancelled" and not include_cancelled:
            continue
        customer = order["customer_id"]
        amount = order["amount"]
        if order.get("currency", currency) != currency:
            rate = order.get("exchange_rate")
            if rate is None:
                raise ValueError(f"order {order['id']} has no exchange rate")
            amount = amount * rate
        entry = totals.setdefault(customer, {"total": 0.0, "count": 0, "latest": None})
        entry["total"] += amount
        entry["count"] += 1
        placed = order["placed_at"]
        if entry["latest"] is None or placed > entry["latest"]:
            entry["latest"] = placed
    result = []
    for customer, entry in totals.items():
        result.append({
            "customer_id": customer,
            "total": round(entry["total"], 2),
            "count": entry["count"],
            "latest": entry["latest"],
        })
    result.sort(key=lambda item: item["total"], reverse=True)
    return result
'''

PASSAGE = (
    "The Eddystone Lighthouse stands on the dangerous Eddystone Rocks, nine miles south "
    "of Rame Head in Cornwall. The current structure, designed by James Douglass, is the "
    "fourth lighthouse to be built on the site. The first, an octagonal wooden tower built "
    "by Henry Winstanley, was completed in 1698 and destroyed by the Great Storm of 1703, "
    "which killed Winstanley and the men working with him. The second, built by John "
    "Rudyerd, burned down in 1755. The third, John Smeaton's tower of granite blocks, was "
    "lit in 1759; its design became the model for lighthouses around the world, and when "
    "erosion of the rock beneath it made it unsafe, its upper part was taken down and "
    "rebuilt on Plymouth Hoe, where it stands today as a memorial.")

TASKS: dict[str, tuple[str, str]] = {
    # (kind, user message)
    "rewrite": ("grounded",
                "Rename the parameter include_cancelled to keep_cancelled everywhere in "
                "this function and output the whole function, nothing else.\n\n"
                f"```python\n{FUNCTION}```"),
    "quote": ("grounded",
              f"Read this passage:\n\n{PASSAGE}\n\nQuestion: what happened to each of the "
              "lighthouses built on the Eddystone Rocks? Answer only with sentences quoted "
              "word for word from the passage, each in quotation marks."),
    "story": ("free", "Write a short story about a fox who learns to play the violin."),
    "explain": ("free", "Explain how vaccines train the immune system, in a few paragraphs."),
}

MODES: dict[str, dict[str, Any]] = {
    "plain": {"spec_type": "none"},
    "lookup": {"spec_type": "ngram-simple"},
    "self-draft": {"spec_type": "draft-simple"},
}

PEER_SCRIPT = r'''
import json, sys, time
from llama_cpp import Llama
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
args = json.loads(sys.argv[1])
out = []
llms = {"plain": Llama(args["model"], n_ctx=4096, n_threads=args["threads"],
                       n_threads_batch=args["threads"], verbose=False),
        "lookup": Llama(args["model"], n_ctx=4096, n_threads=args["threads"],
                        n_threads_batch=args["threads"], verbose=False,
                        draft_model=LlamaPromptLookupDecoding())}
for task, messages in args["tasks"]:
    for mode in ("plain", "lookup"):
        llm = llms[mode]
        llm.create_chat_completion(messages, temperature=0, max_tokens=1)  # the prompt
        t0 = time.perf_counter()
        r = llm.create_chat_completion(messages, temperature=0, max_tokens=args["max_tokens"])
        dt = time.perf_counter() - t0
        n = r["usage"]["completion_tokens"]
        out.append({"task": task, "mode": mode, "tokens": n, "seconds": dt,
                    "text": r["choices"][0]["message"]["content"]})
print(json.dumps(out))
'''


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# --- llamabind ---------------------------------------------------------------------------

def run_llamabind(model_path: Path, tasks: list[str], max_tokens: int, threads: int,
                  modes: list[str]) -> list[dict[str, Any]]:
    from llamabind import LoadedModel

    out = []
    with LoadedModel.load(model_path, n_ctx=4096, n_parallel=1, n_threads=threads,
                          draft=model_path if "self-draft" in modes else None,
                          spec_type="none") as model:
        model.generate("warm up", max_tokens=4)
        for task in tasks:
            for mode in modes:
                model.engine.clear_cache()
                r = model.chat(chat(TASKS[task][1]), temperature=0, max_tokens=max_tokens,
                               **MODES[mode])
                out.append({"impl": "llamabind", "task": task, "mode": mode,
                            "tokens": r.completion_tokens,
                            "tps": r.completion_tokens / max(r.generation_ms / 1000, 1e-9),
                            "drafted": r.draft_tokens, "accepted": r.draft_tokens_accepted,
                            "ids": list(r.tokens), "text": r.text})
    return out


# --- llama-cpp-python ------------------------------------------------------------------------

def peer_python(explicit: str | None) -> str | None:
    for exe in [explicit] if explicit else [str(PEER_VENV_PYTHON)]:
        if exe and os.path.exists(exe) and subprocess.run(
                [exe, "-c", "import llama_cpp.llama_speculative"],
                capture_output=True, check=False).returncode == 0:
            return exe
    return None


def run_peer(exe: str, model_path: Path, tasks: list[str], max_tokens: int,
             threads: int) -> list[dict[str, Any]]:
    payload = {"model": str(model_path), "threads": threads, "max_tokens": max_tokens,
               "tasks": [(t, chat(TASKS[t][1])) for t in tasks]}
    proc = subprocess.run([exe, "-c", PEER_SCRIPT, json.dumps(payload)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"llama-cpp-python failed:\n{proc.stderr[-3000:]}")
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return [{"impl": "llama-cpp-python", "task": r["task"], "mode": r["mode"],
             "tokens": r["tokens"], "tps": r["tokens"] / r["seconds"], "text": r["text"]}
            for r in rows]


# --- native llama-server -------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def native_args(mode: str, model_path: Path) -> list[str]:
    if mode == "lookup":
        return ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3",
                "--spec-ngram-simple-size-m", "16", "--spec-draft-n-max", "16"]
    if mode == "self-draft":
        return ["--spec-type", "draft-simple", "-md", str(model_path), "--spec-draft-n-max",
                "16", "--spec-draft-p-min", "0.75"]
    return []


def run_native(model_path: Path, tasks: list[str], max_tokens: int, threads: int,
               modes: list[str]) -> list[dict[str, Any]]:
    exe = ROOT / "build" / "native" / "bin" / "llama-server"
    if not exe.exists():
        raise SystemExit(f"{exe} is missing: python scripts/build_native.py --target "
                         "llama-server")
    out = []
    for mode in modes:
        port = free_port()
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(
                [str(exe), "-m", str(model_path), "-np", "1", "-c", "4096", "-t", str(threads),
                 "-tb", str(threads), "--host", "127.0.0.1", "--port", str(port),
                 *native_args(mode, model_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            try:
                url = f"http://127.0.0.1:{port}"
                deadline = time.monotonic() + 300
                while True:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise SystemExit(f"llama-server ({mode}) did not start:\n"
                                         f"{log.read().decode(errors='replace')[-3000:]}")
                    try:
                        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                            if resp.status == 200:
                                break
                    except OSError:
                        time.sleep(0.3)
                for task in tasks:
                    body = json.dumps({"messages": chat(TASKS[task][1]), "temperature": 0,
                                       "max_tokens": max_tokens, "cache_prompt": False}).encode()
                    req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                                 headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(req, timeout=600) as resp:
                        r = json.loads(resp.read())
                    timings = r.get("timings", {})
                    out.append({"impl": "llama-server", "task": task, "mode": mode,
                                "tokens": r["usage"]["completion_tokens"],
                                "tps": float(timings.get("predicted_per_second", 0.0)),
                                "drafted": timings.get("draft_n", 0),
                                "accepted": timings.get("draft_n_accepted", 0),
                                "text": r["choices"][0]["message"]["content"]})
            finally:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return out


# --- the report -------------------------------------------------------------------------------

def summarize(rows: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """Per implementation, task and mode: median tokens/s, the per-round ratios to the
    same implementation's plain run, drafts taken, and equality with llamabind's plain
    tokens (greedy: they should be equal, but for float-noise near ties)."""
    out = []
    keys = sorted({(r["impl"], r["task"], r["mode"]) for r in rows},
                  key=lambda k: (k[0], list(TASKS).index(k[1]), list(MODES).index(k[2])))
    for impl, task, mode in keys:
        mine = [r for r in rows if (r["impl"], r["task"], r["mode"]) == (impl, task, mode)]
        plain = [r for r in rows if (r["impl"], r["task"], r["mode"]) == (impl, task, "plain")]
        ratios = [a["tps"] / b["tps"] for a, b in zip(mine, plain, strict=False) if b["tps"]]
        ref = [r for r in rows if (r["impl"], r["task"], r["mode"]) ==
               ("llamabind", task, "plain")]
        drafted = sum(r.get("drafted", 0) for r in mine)
        same = None
        if ref:
            key = "ids" if "ids" in mine[0] else "text"
            same = all(r[key] == ref[0][key] for r in mine)
            if not same and key == "ids":
                # where the first run parts from the plain one (a float-noise near tie
                # when batched rows sum in another order)
                ids, plain_ids = mine[0]["ids"], ref[0]["ids"]
                same = next((i for i, (a, b) in enumerate(zip(ids, plain_ids, strict=False))
                             if a != b), min(len(ids), len(plain_ids)))
        out.append({"model": model, "impl": impl, "task": task, "kind": TASKS[task][0],
                    "mode": mode, "tps": statistics.median(r["tps"] for r in mine),
                    "ratio": statistics.median(ratios) if ratios else None,
                    "ratio_min": min(ratios) if ratios else None,
                    "ratio_max": max(ratios) if ratios else None,
                    "tokens": statistics.median(r["tokens"] for r in mine),
                    "taken": (sum(r.get("accepted", 0) for r in mine) / drafted)
                    if drafted else None,
                    "same_as_plain": same})
    return out


def format_table(summary: list[dict[str, Any]]) -> str:
    lines = ["| model | task | impl | mode | tokens | tok/s | x plain [min, max] | drafts "
             "taken | same tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        ratio = "" if s["ratio"] is None or s["mode"] == "plain" else \
            f"{s['ratio']:.2f} [{s['ratio_min']:.2f}, {s['ratio_max']:.2f}]"
        taken = "" if s["taken"] is None else f"{100 * s['taken']:.0f}%"
        same = s["same_as_plain"]
        same = {None: "", True: "yes", False: "no"}[same] if isinstance(same, bool) or \
            same is None else f"from token {same}"
        lines.append(f"| {s['model']} | {s['task']} ({s['kind']}) | {s['impl']} | {s['mode']} "
                     f"| {s['tokens']:.0f} | {s['tps']:.1f} | {ratio} | {taken} | {same} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smol,qwen", help="comma-separated: smol, qwen")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--native", action="store_true", help="also native llama-server")
    ap.add_argument("--peer-python", help="a Python that has llama-cpp-python")
    ap.add_argument("--no-peer", action="store_true", help="skip llama-cpp-python")
    ap.add_argument("--quick", action="store_true", help="SmolLM2, 1 round, 96 tokens")
    ap.add_argument("--json", type=Path, help="where to write the results")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.rounds, args.max_tokens = "smol", 1, 96
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for name, known in (("model", MODELS), ("task", TASKS), ("mode", MODES)):
        chosen = {"model": models, "task": tasks, "mode": modes}[name]
        bad = [x for x in chosen if x not in known]
        if bad:
            ap.error(f"unknown {name} {bad[0]!r} (known: {', '.join(known)})")
    if "plain" not in modes:
        modes.insert(0, "plain")
    peer = None if args.no_peer else peer_python(args.peer_python)
    load = os.getloadavg()[0]
    print(f"load average {load:.2f} on {os.cpu_count()} CPUs"
          + ("  (a busy machine: the timings say little)" if load > 0.5 else ""), flush=True)
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
    for rnd in range(args.rounds):
        for m in models:
            print(f"round {rnd + 1}/{args.rounds}: {m}", flush=True)
            rows[m] += run_llamabind(MODELS[m], tasks, args.max_tokens, args.threads, modes)
            if peer is not None:
                rows[m] += run_peer(peer, MODELS[m], tasks, args.max_tokens, args.threads)
            if args.native:
                rows[m] += run_native(MODELS[m], tasks, args.max_tokens, args.threads, modes)
    summary = [s for m in models for s in summarize(rows[m], m)]
    print(format_table(summary))
    if peer is None and not args.no_peer:
        print("\nllama-cpp-python: not found (build/venv-llama-cpp-python, see BENCHMARKS.md)")
    path = args.json or ROOT / "benchmarks" / "results" / \
        f"speculative-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": {"load_average": load, "rounds": args.rounds,
                                         "max_tokens": args.max_tokens,
                                         "threads": args.threads, "peer": peer},
                                "summary": summary, "rows": rows}, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""llamabind against native llama.cpp, side by side, in one run.

    python benchmarks/bench.py                # both test models, ~10 minutes on 2 cores
    python benchmarks/bench.py --quick        # a few minutes
    llamabind bench --models smollm2 -r 5     # the same through the CLI

For each model, one invocation runs, interleaved and repeated (medians and spread):

* native ``llama-bench`` (pp and tg, JSON) and ``native_probe`` (the same loops as the
  bindings, written against llama.h, built against the same static libraries);
* llamabind's core loop: ``Context.eval`` (pp), single-token ``Context.decode`` without
  sampling (tg, as llama-bench), ``TokenGenerator`` greedy and with the full chain;
* llamabind's ``generate()`` (greedy and full chain) and ``stream()`` (greedy);
* llama-cpp-python's equivalents when it is importable (its own venv, a subprocess).

Then time to first token (short and ~1000-token prompts), model load and context
creation, peak RSS (fresh processes), ``import`` time, and 1 vs 2 threads each with its
own context against one and two native processes. It prints a table, writes
``benchmarks/results/<timestamp>.json`` and a chart of the ratios to native.
Method and latest results: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_procs as procs  # noqa: E402
import bench_report as report  # noqa: E402

ROOT = HERE.parent
MODELS = {
    "smollm2": ROOT / "models" / "gguf" / "SmolLM2-135M-Instruct-Q4_1.gguf",
    "qwen": ROOT / "models" / "gguf" / "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
}
SHORT_PROMPT = "Once upon a time"
SHORT_TTFT_SAMPLES = 5  # short-prompt first-token samples per round
LONG_TEXT = (
    "The history of the lighthouse keepers on the northern coast is a story of patience, "
    "weather and small routines. Every evening the keeper climbed the spiral stairs, "
    "trimmed the wick, polished the great lens and wrote the state of the sea into a "
    "leather logbook. Ships passed in the dark, guided by a beam they would never see "
    "the source of, and the keeper rarely learned their names. In winter the storms "
    "could last for a week, and supplies came by a boat that waited for a calm morning. "
)


# --- the run -----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.tmp = Path(tempfile.mkdtemp(prefix="llamabind-bench-"))
        self.notes: list[str] = []
        self.native_bin: Path | None = None
        self.probe_ok = False
        self.peer_python: str | None = None
        self.t_start = time.monotonic()
        self.variants: dict[str, str] = {}
        for spec in args.variant or ():
            name, _, where = spec.partition("=")
            if not name or not where or not Path(where, "llamabind").is_dir():
                raise SystemExit(f"bench: --variant wants NAME=DIR with DIR/llamabind: {spec!r}")
            self.variants[name] = str(Path(where).resolve())

    def log(self, msg: str) -> None:
        if not self.args.quiet:
            elapsed = time.monotonic() - self.t_start
            print(f"[{elapsed:6.0f}s] {msg}", file=sys.stderr, flush=True)

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        self.log("note: " + msg)

    # --- set-up ------------------------------------------------------------------------

    def setup(self) -> None:
        a = self.args
        if not a.no_native:
            try:
                self.native_bin, how = procs.find_native_bin(a.native_dir, a.build_native)
                if self.native_bin is None:
                    self.note(how)
                else:
                    self.log(f"native tools: {self.native_bin} ({how})")
                    if "not current" in how:
                        self.note(how)
            except procs.BenchError as exc:
                self.note(str(exc))
            try:
                info = procs.build_probe(verbose=not a.quiet)
                self.probe_ok = True
                self.log(f"native probe: {info['binary']} (libraries of {info['lib_tree']})")
                self.probe_info = info
            except procs.BenchError as exc:
                self.note(f"native probe unavailable: {exc}")
        if not a.no_peer:
            self.peer_python, how = procs.peer_python(a.peer_python)
            if self.peer_python is None:
                self.note(how)
                self.peer_version = None
            else:
                self.peer_version = how
                self.log(f"llama-cpp-python {how} ({self.peer_python})")

    def prompt_files(self, name: str, path: Path) -> dict[str, Any]:
        """The short prompt and a ~long_prompt-token prompt for this model's tokenizer."""
        import llamabind

        vocab_model = llamabind.Model(str(path), vocab_only=True)
        try:
            vocab = vocab_model.vocab

            def count(text: str) -> int:
                return len(vocab.tokenize(text, add_special=True, parse_special=False))

            target = self.args.long_prompt
            words: list[str] = []
            k = 1
            while count(" ".join(words)) < target:
                words += f"Part {k}. {LONG_TEXT}".split()
                k += 1
            lo, hi = 1, len(words)
            while lo < hi:  # fewest words reaching the target
                mid = (lo + hi) // 2
                if count(" ".join(words[:mid])) >= target:
                    hi = mid
                else:
                    lo = mid + 1
            long_text = " ".join(words[:lo])
            short = self.tmp / f"{name}-short.txt"
            long = self.tmp / f"{name}-long.txt"
            short.write_text(SHORT_PROMPT, encoding="utf-8")
            long.write_text(long_text, encoding="utf-8")
            return {"short": str(short), "long": str(long),
                    "short_tokens": count(SHORT_PROMPT), "long_tokens": count(long_text),
                    "n_vocab": vocab.n_tokens}
        finally:
            vocab_model.close()

    # --- helpers -----------------------------------------------------------------------

    def impls(self) -> list[str]:
        out = []
        if self.probe_ok:
            out.append("native")
        out.append("llamabind")
        out += [f"llamabind[{name}]" for name in self.variants]
        if self.peer_python:
            out.append("peer")
        return out

    def start(self, impl: str) -> procs.Worker:
        if impl == "native":
            return procs.start_worker("native")
        if impl == "peer":
            return procs.start_worker("llama_cpp", self.peer_python)
        if impl.startswith("llamabind["):
            env = procs.worker_env()
            env["LLAMABIND_BENCH_PKG_DIR"] = self.variants[impl[len("llamabind["):-1]]
            return procs.start_worker("llamabind", env=env)
        return procs.start_worker("llamabind")

    def bindings(self, workers: Any) -> list[str]:
        """The llamabind implementations among ``workers``: installed, then variants."""
        return [impl for impl in workers if impl.startswith("llamabind")]

    def load_line(self, path: Path, threads: int, extra: str = "") -> str:
        return f"load model={path} threads={threads} n_ctx={self.args.n_ctx} {extra}".strip()

    # --- sections ----------------------------------------------------------------------

    def run_model(self, name: str, path: Path, res: dict[str, Any]) -> None:
        """Fill ``res`` as the sections go (an interrupted run keeps what it has)."""
        a = self.args
        res.update({"path": str(path), "size_bytes": path.stat().st_size,
                    "samples": {}, "outside_us": {}, "runs": {}, "errors": []})
        prompts = self.prompt_files(name, path)
        res["prompts"] = {"short_tokens": prompts["short_tokens"],
                          "long_tokens": prompts["long_tokens"],
                          "short_text": SHORT_PROMPT}
        res["n_vocab"] = prompts["n_vocab"]
        sections = set(a.sections)
        if sections & {"speed", "ttft", "ctx"}:
            self.warm_sections(name, path, prompts, res)
        if "startup" in sections:
            self.startup_section(name, path, prompts, res)
        if "scaling" in sections:
            self.scaling_section(name, path, prompts, res)

    def warm_sections(self, name: str, path: Path, prompts: dict[str, Any],
                      res: dict[str, Any]) -> None:
        a = self.args
        workers: dict[str, procs.Worker] = {}
        try:
            for impl in self.impls():
                self.log(f"{name}: starting {impl} worker")
                w = self.start(impl)
                workers[impl] = w
                res["runs"].setdefault("load_warm", {})[impl] = w.call(
                    self.load_line(path, a.threads))
            ban = self.check_full_count(name, workers, prompts, res)
            sections = set(a.sections)
            # warm-up: one of each loop, not recorded
            self.log(f"{name}: warm-up")
            for w in workers.values():
                w.call(f"pp n={min(a.n_prompt, 64)}")
                w.call("tg n=8")
            if "speed" in sections:
                self.speed_section(name, path, prompts, workers, ban, res)
            if "ttft" in sections:
                self.ttft_section(name, prompts, workers, res)
            if "ctx" in sections:
                for _ in range(a.reps):
                    for impl, w in self.shuffled(workers.items()):
                        r = w.call("ctx")
                        self.add(res, f"ctx_warm/{impl}", r["ctx_ms"])
        finally:
            for w in workers.values():
                w.close()

    def check_full_count(self, name: str, workers: dict[str, procs.Worker],
                         prompts: dict[str, Any], res: dict[str, Any]) -> dict[str, int]:
        """Every compared generation must produce the full n_gen tokens. Greedy and the
        seeded chain are deterministic, so one run of each tells; if any implementation
        stops early at an end-of-generation token, EOG tokens are banned (logit bias)
        in that mode for all of them."""
        a = self.args
        ban = {"greedy": int(a.ban_eog), "chain": int(a.ban_eog)}
        checks: dict[str, Any] = {}
        for mode in ("greedy", "chain"):
            for attempt in range(2):
                short = []
                for impl, w in workers.items():
                    api = "" if impl == "native" else "api=generate "
                    r = w.call(f"gen {api}mode={mode} n={a.n_gen} prompt={prompts['short']} "
                               f"seed={a.seed} ban_eog={ban[mode]}")
                    checks[f"{mode}/{impl}"] = {"n_gen": r["n_gen"], "finish": r["finish"],
                                                "ban_eog": ban[mode]}
                    if r["n_gen"] < a.n_gen:
                        short.append(f"{impl} ({r['n_gen']})")
                if not short:
                    break
                if attempt == 0 and not ban[mode]:
                    self.note(f"{name}: {mode} generation stopped early for "
                              f"{', '.join(short)}: banning end-of-generation tokens "
                              f"(logit bias) in {mode} runs of every implementation")
                    ban[mode] = 1
                else:
                    self.note(f"{name}: {mode} generation still short: {', '.join(short)}")
                    break
        res["full_count_check"] = checks
        res["ban_eog"] = ban
        return ban

    def shuffled(self, items: Any) -> list[Any]:
        out = list(items)
        self.rng.shuffle(out)
        return out

    @staticmethod
    def add(res: dict[str, Any], key: str, value: float) -> None:
        res["samples"].setdefault(key, []).append(value)

    def speed_section(self, name: str, path: Path, prompts: dict[str, Any],
                      workers: dict[str, procs.Worker], ban: dict[str, int],
                      res: dict[str, Any]) -> None:
        a = self.args
        n, p = a.n_gen, a.n_prompt
        short = prompts["short"]
        expected = {k: v["n_gen"] for k, v in res["full_count_check"].items()}
        jobs: list[tuple[str, str, str]] = []  # (sample key, impl, command)
        for impl in workers:
            jobs.append((f"pp/{impl}", impl, f"pp n={p}"))
            jobs.append((f"tg/{impl}", impl, f"tg n={n}"))
        gen = f"n={n} prompt={short} seed={a.seed}"
        if "native" in workers:
            for mode in ("greedy", "chain"):
                jobs.append((f"{mode}/native", "native",
                             f"gen mode={mode} {gen} ban_eog={ban[mode]}"))
        for lb in self.bindings(workers):
            for mode in ("greedy", "chain"):
                jobs.append((f"{mode}/{lb}-core", lb,
                             f"gen api=core mode={mode} {gen} ban_eog={ban[mode]}"))
                jobs.append((f"{mode}/{lb}-generate", lb,
                             f"gen api=generate mode={mode} {gen} ban_eog={ban[mode]}"))
            jobs.append((f"greedy/{lb}-stream", lb,
                         f"gen api=stream mode=greedy {gen} ban_eog={ban['greedy']}"))
        if "peer" in workers:
            for mode in ("greedy", "chain"):
                jobs.append((f"{mode}/peer-generate", "peer",
                             f"gen api=generate mode={mode} {gen} ban_eog={ban[mode]}"))
            jobs.append(("greedy/peer-stream", "peer",
                         f"gen api=stream mode=greedy {gen} ban_eog={ban['greedy']}"))
        if self.native_bin is not None:
            jobs.append(("llama-bench", "llama-bench", ""))
        for rep in range(a.reps):
            self.log(f"{name}: speed, round {rep + 1}/{a.reps} ({len(jobs)} runs)")
            for key, impl, cmd in self.shuffled(jobs):
                try:
                    if impl == "llama-bench":
                        assert self.native_bin is not None
                        r = procs.run_llama_bench(self.native_bin, str(path), a.threads, p, n)
                        self.add(res, "pp/llama-bench", r["pp"])
                        self.add(res, "tg/llama-bench", r["tg"])
                        continue
                    r = workers[impl].call(cmd)
                except procs.BenchError as exc:
                    res["errors"].append(f"{key}: {exc}")
                    self.log(f"error: {key}: {exc}")
                    continue
                if key.startswith(("pp/", "tg/")):
                    self.add(res, key, r["n"] / r["ms"] * 1000.0)
                    continue
                mode = key.split("/")[0]
                n_gen = r["n_gen"]
                if key.endswith("-stream"):
                    # stream() does not report a count; greedy is deterministic, so it
                    # is the generate() count of the same prompt (checked above)
                    n_gen = expected.get(f"{mode}/{impl}", n_gen)
                self.add(res, key, n_gen / r["wall_ms"] * 1000.0)
                outside = (r["wall_ms"] - r["t_p_eval_ms"] - r["t_eval_ms"]) / n_gen * 1000.0
                res["outside_us"].setdefault(key, []).append(outside)
                res["runs"].setdefault(key, []).append(r)

    def ttft_section(self, name: str, prompts: dict[str, Any],
                     workers: dict[str, procs.Worker], res: dict[str, Any]) -> None:
        a = self.args
        jobs: list[tuple[str, str, str]] = []
        # a short prompt's first token takes tens of milliseconds and varies by tens of
        # percent on a shared machine: it runs SHORT_TTFT_SAMPLES times per round
        for size, times in (("short", SHORT_TTFT_SAMPLES), ("long", 1)):
            f = prompts[size]
            for _ in range(times):
                if "native" in workers:
                    jobs.append((f"ttft-{size}/native", "native", f"ttft prompt={f}"))
                for lb in self.bindings(workers):
                    jobs.append((f"ttft-{size}/{lb}-stream", lb,
                                 f"ttft api=stream prompt={f}"))
                    jobs.append((f"ttft-{size}/{lb}-core", lb, f"ttft api=core prompt={f}"))
                if "peer" in workers:
                    jobs.append((f"ttft-{size}/peer-stream", "peer",
                                 f"ttft api=stream prompt={f}"))
        for rep in range(a.ttft_reps):
            self.log(f"{name}: time to first token, round {rep + 1}/{a.ttft_reps}")
            for key, impl, cmd in self.shuffled(jobs):
                try:
                    r = workers[impl].call(cmd)
                except procs.BenchError as exc:
                    res["errors"].append(f"{key}: {exc}")
                    continue
                self.add(res, key, r["ttft_ms"])

    def startup_section(self, name: str, path: Path, prompts: dict[str, Any],
                        res: dict[str, Any]) -> None:
        """Fresh processes: model load, context creation, then a short generation and
        the peak resident set size."""
        a = self.args
        impls = self.impls()
        for rep in range(a.startup_reps):
            self.log(f"{name}: start-up in fresh processes, round {rep + 1}/{a.startup_reps}")
            for impl in self.shuffled(impls):
                try:
                    with self.start(impl) as w:
                        extra = "cold=1" if impl.startswith("llamabind") else ""
                        r = w.call(self.load_line(path, a.threads, extra))
                        api = "" if impl == "native" else "api=generate "
                        w.call(f"gen {api}mode=greedy n=16 prompt={prompts['short']}")
                        rss = w.call("rss")
                except procs.BenchError as exc:
                    res["errors"].append(f"startup/{impl}: {exc}")
                    continue
                self.add(res, f"load/{impl}", r["load_ms"])
                if "ctx_ms" in r:
                    self.add(res, f"ctx/{impl}", r["ctx_ms"])
                if "llama_init_ms" in r:
                    self.add(res, f"llama_init/{impl}", r["llama_init_ms"])
                self.add(res, f"rss/{impl}", rss["peak_rss_kb"] / 1024.0)

    def scaling_section(self, name: str, path: Path, prompts: dict[str, Any],
                        res: dict[str, Any]) -> None:
        """One and two workers, each a context with n_threads=1 on one shared model
        (threads of one process) against one and two native llama-bench processes."""
        a = self.args
        n = a.n_gen
        workers: dict[str, procs.Worker] = {}
        jobs: list[tuple[str, int]] = []
        try:
            for impl in self.impls():
                if impl == "native":
                    continue
                w = self.start(impl)
                workers[impl] = w
                w.call(self.load_line(path, 1))
                # one unmeasured round first: the first two-thread round of a fresh
                # process ran up to 15% slower here (llama-bench warms up too)
                w.call(f"scale workers=2 n=16 prompt={prompts['short']}")
                jobs += [(impl, 1), (impl, 2)]
            if self.native_bin is not None:
                jobs += [("llama-bench", 1), ("llama-bench", 2)]
            for rep in range(a.scale_reps):
                self.log(f"{name}: 1 and 2 single-threaded workers, round "
                         f"{rep + 1}/{a.scale_reps}")
                for impl, k in self.shuffled(jobs):
                    try:
                        if impl == "llama-bench":
                            assert self.native_bin is not None
                            started = [procs.start_llama_bench(self.native_bin, str(path), 1, n)
                                       for _ in range(k)]
                            rates = [procs.finish_llama_bench(pr)["tg"] for pr in started]
                            self.add(res, f"scale{k}/llama-bench", sum(rates))
                            continue
                        r = workers[impl].call(f"scale workers={k} n={n} "
                                               f"prompt={prompts['short']}")
                        self.add(res, f"scale{k}/{impl}", r["aggregate_tps"])
                    except procs.BenchError as exc:
                        res["errors"].append(f"scale{k}/{impl}: {exc}")
        finally:
            for w in workers.values():
                w.close()

    def import_section(self) -> dict[str, Any]:
        a = self.args
        runs: list[tuple[str, str, str, dict[str, str]]] = [
            ("llamabind", sys.executable, "llamabind", procs.worker_env())]
        for name, where in self.variants.items():
            env = procs.worker_env()
            env["LLAMABIND_BENCH_PKG_DIR"] = where
            runs.append((f"llamabind[{name}]", sys.executable, "llamabind", env))
        if self.peer_python:
            peer_env = procs.worker_env()
            peer_env.pop("PYTHONPATH", None)
            runs.append(("llama_cpp", self.peer_python, "llama_cpp", peer_env))
        out: dict[str, list[float]] = {label: [] for label, *_ in runs}
        self.log(f"import time, {a.import_reps} fresh interpreters each")
        for _ in range(a.import_reps):
            for label, exe, module, env in self.shuffled(runs):
                try:
                    out[label].append(procs.import_time_ms(exe, module, env))
                except procs.BenchError as exc:
                    self.note(str(exc))
        return out

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# --- metadata ------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": sys.version.split()[0],
                            "cpu_count": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("Model name", "Core(s) per socket", "Socket(s)", "Thread(s) per core",
                       "Hypervisor vendor", "L3 cache"):
                info[key] = value.strip()
    except OSError:
        pass
    return info


def llamabind_info() -> dict[str, Any]:
    import llamabind

    info: dict[str, Any] = {"version": llamabind.__version__}
    try:
        bi = llamabind.build_info()
        info["build"] = {k: bi[k] for k in ("llama_cpp_commit", "llama_cpp_version",
                                            "build_type") if k in bi}
    except Exception as exc:  # informational only
        info["build_error"] = str(exc)
    return info


# --- entry point ---------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    if argv[:1] == ["--"]:  # `llamabind bench -- --quick` passes the separator along
        argv = argv[1:]
    ap = argparse.ArgumentParser(
        prog="bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Method, targets and latest results: BENCHMARKS.md")
    ap.add_argument("--models", nargs="+", default=["smollm2", "qwen"],
                    help="model names (smollm2, qwen) or GGUF paths (default: both)")
    ap.add_argument("-t", "--threads", type=int, default=None,
                    help="threads per context (default: physical cores)")
    ap.add_argument("-r", "--reps", type=int, default=None,
                    help="rounds of the interleaved speed runs (default 4; --quick 2)")
    ap.add_argument("-p", "--n-prompt", type=int, default=512, help="pp size (512)")
    ap.add_argument("-n", "--n-gen", type=int, default=128, help="tokens generated (128)")
    ap.add_argument("--long-prompt", type=int, default=1000,
                    help="tokens in the long time-to-first-token prompt (1000)")
    ap.add_argument("--n-ctx", type=int, default=2048, help="context length (2048)")
    ap.add_argument("--ttft-reps", type=int, default=None, help="default 3 (--quick 2)")
    ap.add_argument("--scale-reps", type=int, default=None, help="default 3 (--quick 1)")
    ap.add_argument("--startup-reps", type=int, default=None,
                    help="fresh-process start-up rounds (default 8, --quick 2): a load "
                         "takes a second, and its spread on a shared machine is wide")
    ap.add_argument("--import-reps", type=int, default=7)
    ap.add_argument("--sections", default="speed,ttft,ctx,startup,scaling,import",
                    help="comma list of: speed, ttft, ctx, startup, scaling, import")
    ap.add_argument("--quick", action="store_true",
                    help="fewer rounds (a few minutes for both models)")
    ap.add_argument("--ban-eog", action="store_true",
                    help="ban end-of-generation tokens in every generation run")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--native-dir", help="directory with llama-bench (default: what "
                    "scripts/build_native.py reports)")
    ap.add_argument("--build-native", action="store_true",
                    help="run scripts/build_native.py first if the native tools are missing")
    ap.add_argument("--no-native", action="store_true", help="skip native runs")
    ap.add_argument("--peer-python", help="a Python that can import llama_cpp (default: "
                    "build/venv-llama-cpp-python/bin/python, else this one)")
    ap.add_argument("--no-peer", action="store_true", help="skip llama-cpp-python")
    ap.add_argument("--variant", action="append", metavar="NAME=DIR",
                    help="also measure the llamabind package in DIR/llamabind (a patched "
                    "build, say) as llamabind[NAME]; repeatable")
    ap.add_argument("--out", help="JSON output (default benchmarks/results/<timestamp>.json)")
    ap.add_argument("--no-chart", action="store_true")
    ap.add_argument("--update-chart", action="store_true",
                    help="also copy the chart to benchmarks/chart.png (what BENCHMARKS.md shows)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = ap.parse_args(argv)
    if args.reps is None:
        args.reps = 2 if args.quick else 4
    if args.ttft_reps is None:
        args.ttft_reps = 2 if args.quick else 3
    if args.scale_reps is None:
        args.scale_reps = 1 if args.quick else 3
    if args.startup_reps is None:
        args.startup_reps = 2 if args.quick else 8
    if args.quick:
        args.import_reps = min(args.import_reps, 5)
    if args.threads is None:
        import llamabind

        args.threads = int(llamabind.default_threads())
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - {"speed", "ttft", "ctx", "startup", "scaling", "import"}
    if unknown:
        ap.error(f"unknown sections: {sorted(unknown)}")
    for v, what in ((args.reps, "--reps"), (args.n_gen, "--n-gen"), (args.n_prompt, "-p")):
        if v < 1:
            ap.error(f"{what} must be >= 1")
    return args


def resolve_models(names: list[str]) -> list[tuple[str, Path]]:
    out = []
    for m in names:
        path = MODELS.get(m.lower(), Path(m))
        if not path.is_file():
            raise SystemExit(f"bench: model not found: {path} (fetch the test models with "
                             "'python models/fetch_models.py')")
        name = m.lower() if m.lower() in MODELS else path.stem
        out.append((name, path))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    models = resolve_models(args.models)
    bench = Bench(args)
    started = _dt.datetime.now().astimezone()
    results: dict[str, Any] = {
        "meta": {
            "date": started.isoformat(timespec="seconds"),
            "machine": machine_info(),
            "llamabind": llamabind_info(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        },
        "models": {},
    }
    try:
        bench.setup()
        results["meta"]["native_bin"] = str(bench.native_bin) if bench.native_bin else None
        results["meta"]["llama_cpp_python"] = getattr(bench, "peer_version", None)
        if "import" in args.sections:
            results["import_ms"] = bench.import_section()
        for name, path in models:
            results["models"][name] = {}
            bench.run_model(name, path, results["models"][name])
    except KeyboardInterrupt:
        bench.note("interrupted: the results are partial")
    finally:
        bench.cleanup()
    results["meta"]["duration_s"] = round(time.monotonic() - bench.t_start, 1)
    results["notes"] = bench.notes
    results["summary"] = report.summarize(results)
    print(report.format_table(results))
    out = Path(args.out) if args.out else (
        HERE / "results" / f"{started.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"\nJSON: {out}")
    if not args.no_chart:
        import bench_chart

        png = out.with_suffix(".png")
        msg = bench_chart.draw(results, png)
        if msg:
            print(msg)
        else:
            print(f"chart: {png}")
            if args.update_chart:
                shutil.copyfile(png, HERE / "chart.png")
                print(f"chart copied to {HERE / 'chart.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""HTTP servers side by side: ``llamabind serve`` against native ``llama-server`` built
from the same pinned llama.cpp, and llama-cpp-python's server where it is installed.

    python scripts/build_native.py --target llama-server     # once (not built by default)
    python benchmarks/bench_server.py                         # ~10 minutes on 2 cores
    python benchmarks/bench_server.py --rounds 1 --max-tokens 8 --levels 1,2   # smoke

Every server gets the same model, threads and slots (``--parallel``; llama-server
``-np`` and a ``-c`` of ``--ctx`` per slot), the same chat prompts and the same
requests: streamed ``/v1/chat/completions`` (one of 8 prompts, made unique by a request
number so no cache holds a whole prompt), greedy, end-of-generation tokens banned with
``logit_bias`` so each request generates exactly ``--max-tokens`` tokens. For each
concurrency level C, C clients (asyncio, httpx) send requests back to back; the servers
take turns level by level, their order rotated each round, so slow spells of the
machine fall on all of them.

Reported per server and level: completion tokens per second (all tokens of the level
over its wall time; median over rounds) and time to first token (request sent ->
first content chunk) p50 and p99 over all rounds' requests; and, per round, llamabind's
throughput and TTFT p99 as ratios to llama-server's, shown as median [min, max].
Results go to ``benchmarks/results/server-<timestamp>.json`` and a chart beside it
(``--update-chart`` copies it to ``benchmarks/server_chart.png``). Run it on an idle
machine: ``uptime`` first.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_MODEL = ROOT / "models" / "gguf" / "SmolLM2-135M-Instruct-Q4_1.gguf"
PEER_VENV_PYTHON = ROOT / "build" / "venv-llama-cpp-python" / "bin" / "python"
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


class BenchError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    """One server process, started once and driven by every round."""

    name: str
    cmd: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300.0) -> None:
        import httpx

        log = tempfile.NamedTemporaryFile(prefix=f"bench-{self.name}-", suffix=".log",
                                          delete=False)
        self.log_path = log.name
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env}, cwd=str(ROOT))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n"
                                 f"{Path(self.log_path).read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise BenchError(f"{self.name} did not come up in {timeout} s")

    def cpu_seconds(self) -> float | None:
        """CPU time the server process has used so far (None where /proc is not there)."""
        if self.proc is None:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def settle(self, quiet: float = 0.3, limit: float = 5.0) -> float:
        """Wait until the server has used no CPU for ``quiet`` seconds (at most
        ``limit``): what it does after its last response (slot and cache bookkeeping,
        compute threads spinning down) must not land on the next server's turn.
        Returns the seconds waited."""
        t0 = time.monotonic()
        last = self.cpu_seconds()
        if last is None:
            time.sleep(quiet)
            return quiet
        while time.monotonic() - t0 < limit:
            time.sleep(quiet)
            now = self.cpu_seconds()
            if now is None or now - last < 0.01:
                break
            last = now
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def eog_bias(model: Path) -> dict[str, float]:
    """logit_bias banning every end-of-generation token of ``model``."""
    import llamabind

    with llamabind.Model(str(model), vocab_only=True) as m:
        vocab = m.vocab
        return {str(t): -100.0 for t in range(len(vocab)) if vocab.is_eog(t)}


def peer_server_python(explicit: str | None) -> tuple[str | None, str]:
    """A Python whose llama-cpp-python has its server (``llama_cpp.server``)."""
    for exe in [explicit] if explicit else [str(PEER_VENV_PYTHON), sys.executable]:
        if not exe or not os.path.exists(exe):
            continue
        proc = subprocess.run(
            [exe, "-c", "import llama_cpp, llama_cpp.server.app, sys; "
                        "sys.stdout.write(llama_cpp.__version__)"],
            capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return exe, proc.stdout.strip()
    return None, ("llama-cpp-python's server is not importable (build/venv-llama-cpp-python "
                  "with 'llama-cpp-python[server]'; see BENCHMARKS.md)")


def make_servers(args: argparse.Namespace) -> tuple[list[Server], dict[str, str]]:
    notes: dict[str, str] = {}
    model, par, ctx, threads = str(args.model), args.parallel, args.ctx, args.threads
    servers: list[Server] = []
    if "llamabind" in args.servers:
        servers.append(Server("llamabind", [
            sys.executable, "-m", "llamabind", "serve", "-m", model, "-np", str(par),
            "-c", str(ctx), "-t", str(threads), "--port", "{port}", "--max-queue", "4096",
            "--log-level", "warning"], 0))
    native = ROOT / "build" / "native" / "bin" / "llama-server"
    if "llama-server" in args.servers:
        if not native.exists():
            raise BenchError(f"{native} is missing: python scripts/build_native.py "
                             "--target llama-server")
        servers.append(Server("llama-server", [
            str(native), "-m", model, "-np", str(par), "-c", str(ctx * par), "-t",
            str(threads), "-tb", str(threads), "--host", "127.0.0.1", "--port", "{port}"], 0))
    if "llama-cpp-python" in args.servers:
        exe, info = peer_server_python(args.peer_python)
        if exe is None:
            notes["llama-cpp-python"] = info
        else:
            notes["llama-cpp-python"] = f"version {info} ({exe})"
            servers.append(Server("llama-cpp-python", [
                exe, "-m", "llama_cpp.server", "--model", model, "--n_ctx", str(ctx),
                "--n_threads", str(threads), "--host", "127.0.0.1", "--port", "{port}"], 0))
    for s in servers:
        s.port = free_port()
        s.cmd = [c.replace("{port}", str(s.port)) for c in s.cmd]
    return servers, notes


@dataclass
class Sample:
    ttft: float | None
    tokens: int
    seconds: float
    error: str | None = None


async def one_request(client: Any, url: str, prompt: str, max_tokens: int,
                      bias: dict[str, float]) -> Sample:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "logit_bias": bias}
    t0 = time.perf_counter()
    ttft = None
    chunks = 0
    usage = None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return Sample(None, 0, time.perf_counter() - t0, f"HTTP {r.status_code}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    return Sample(ttft, chunks, time.perf_counter() - t0, str(data["error"]))
                if data.get("usage"):
                    usage = data["usage"]
                for ch in data.get("choices") or ():
                    if (ch.get("delta") or {}).get("content"):
                        chunks += 1
                        if ttft is None:
                            ttft = time.perf_counter() - t0
    except Exception as exc:
        return Sample(ttft, chunks, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
    tokens = int(usage["completion_tokens"]) if usage else chunks
    return Sample(ttft, tokens, time.perf_counter() - t0)


async def run_level(server: Server, clients: int, per_client: int, max_tokens: int,
                    bias: dict[str, float], tag: str = "") -> dict[str, Any]:
    """``clients`` clients sending ``per_client`` requests each, back to back. ``tag``
    (the round and level) goes into every prompt: no prompt is sent twice to a server,
    so none is answered from its cache whole."""
    import httpx

    # a fresh connection per request: llama-server may close a kept-alive connection
    # just as the client reuses it (seen here: "Server disconnected without sending a
    # response"); on loopback a connection costs ~0.1 ms, the same for every server
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker(k: int) -> list[Sample]:
            out = []
            for j in range(per_client):
                # one of the fixed prompts, made unique by its number: a server's cache
                # may reuse the common prefix (the chat template's), never a whole prompt
                prompt = f"{PROMPTS[(k + j) % len(PROMPTS)]} (request {tag}{k}.{j})"
                out.append(await one_request(client, server.url, prompt, max_tokens, bias))
            return out

        t0 = time.perf_counter()
        per_worker = await asyncio.gather(*(worker(k) for k in range(clients)))
        wall = time.perf_counter() - t0
    samples = [s for w in per_worker for s in w]
    tokens = sum(s.tokens for s in samples)
    return {"wall_s": wall, "tokens": tokens, "tok_per_s": tokens / wall,
            "ttft_s": [s.ttft for s in samples if s.ttft is not None],
            "errors": [s.error for s in samples if s.error],
            "requests": len(samples)}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(runs: dict[str, dict[int, list[dict[str, Any]]]],
              levels: list[int]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for name, by_level in runs.items():
        table[name] = {}
        for c in levels:
            rounds = by_level.get(c, [])
            ttfts = [t for r in rounds for t in r["ttft_s"]]
            table[name][c] = {
                "tok_per_s": statistics.median(r["tok_per_s"] for r in rounds),
                "tok_per_s_rounds": [r["tok_per_s"] for r in rounds],
                "ttft_p50_ms": (percentile(ttfts, 0.5) or 0) * 1000,
                "ttft_p99_ms": (percentile(ttfts, 0.99) or 0) * 1000,
                "errors": sum(len(r["errors"]) for r in rounds),
                "requests": sum(r["requests"] for r in rounds),
            }
    ratios: dict[str, Any] = {}
    if "llamabind" in runs and "llama-server" in runs:
        for c in levels:
            mine, ref = runs["llamabind"].get(c, []), runs["llama-server"].get(c, [])
            tput = [a["tok_per_s"] / b["tok_per_s"] for a, b in zip(mine, ref, strict=True)
                    if b["tok_per_s"] > 0]
            p99 = []
            for a, b in zip(mine, ref, strict=True):
                pa, pb = percentile(a["ttft_s"], 0.99), percentile(b["ttft_s"], 0.99)
                if pa is not None and pb:
                    p99.append(pa / pb)
            ratios[str(c)] = {
                "throughput": _spread(tput), "ttft_p99": _spread(p99)}
    return {"table": table, "ratios": ratios}


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def format_report(summary: dict[str, Any], levels: list[int], meta: dict[str, Any]) -> str:
    lines = [f"model {meta['model']}, {meta['parallel']} slots, n_ctx {meta['ctx']} per "
             f"request, {meta['threads']} threads, {meta['max_tokens']} tokens per request, "
             f"{meta['rounds']} rounds; load average {meta['load_before']} -> "
             f"{meta['load_after']}", ""]
    head = "| server | clients | tokens/s | TTFT p50 ms | TTFT p99 ms | errors |"
    lines += [head, "|---|---:|---:|---:|---:|---:|"]
    for name, by_level in summary["table"].items():
        for c in levels:
            row = by_level[c]
            lines.append(f"| {name} | {c} | {row['tok_per_s']:.1f} | {row['ttft_p50_ms']:.0f} "
                         f"| {row['ttft_p99_ms']:.0f} | {row['errors']}/{row['requests']} |")
    if summary["ratios"]:
        lines += ["", "| clients | throughput llamabind / llama-server | TTFT p99 ratio |",
                  "|---:|---|---|"]
        for c in levels:
            r = summary["ratios"][str(c)]
            lines.append(f"| {c} | {_fmt(r['throughput'])} | {_fmt(r['ttft_p99'])} |")
    for name, note in meta["notes"].items():
        lines.append(f"\n{name}: {note}")
    return "\n".join(lines)


def _fmt(s: dict[str, float] | None) -> str:
    if s is None:
        return "-"
    return f"{s['median']:.2f} [{s['min']:.2f}, {s['max']:.2f}]"


def draw(summary: dict[str, Any], levels: list[int], path: Path, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib is not installed (pip install matplotlib)"
    names = list(summary["table"])
    ratios = summary.get("ratios") or {}
    fig, axes = plt.subplots(1, 3 if ratios else 2, figsize=(18 if ratios else 12, 4.8))
    ax1, ax2 = axes[0], axes[1]
    width = 0.8 / max(1, len(names))
    xs = range(len(levels))
    for i, name in enumerate(names):
        rows = [summary["table"][name][c] for c in levels]
        pos = [x + (i - (len(names) - 1) / 2) * width for x in xs]
        ax1.bar(pos, [r["tok_per_s"] for r in rows], width, label=name)
        ax2.bar(pos, [r["ttft_p99_ms"] for r in rows], width, alpha=0.45,
                color=f"C{i}", label=f"{name} p99")
        ax2.bar(pos, [r["ttft_p50_ms"] for r in rows], width * 0.5, color=f"C{i}",
                label=f"{name} p50")
    for ax, ylabel in ((ax1, "completion tokens / s (higher is better)"),
                       (ax2, "time to first token, ms (lower is better)")):
        ax.set_xticks(list(xs), [f"{c} client{'s' if c > 1 else ''}" for c in levels])
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    ax2.set_yscale("log")
    if ratios:
        ax3 = axes[2]
        for j, (key, label) in enumerate((("throughput", "throughput (target >= 0.9)"),
                                          ("ttft_p99", "TTFT p99 (target <= 1.2)"))):
            pts = [(x + (j - 0.5) * 0.2, ratios[str(c)][key]) for x, c in zip(xs, levels,
                                                                           strict=True)
                   if ratios[str(c)][key] is not None]
            ax3.errorbar([p for p, _ in pts], [r["median"] for _, r in pts],
                         yerr=[[r["median"] - r["min"] for _, r in pts],
                               [r["max"] - r["median"] for _, r in pts]],
                         fmt="o", capsize=4, color=f"C{j + 2}", label=label)
        for y, style in ((1.0, "-"), (0.9, ":"), (1.2, ":")):
            ax3.axhline(y, color="grey", linestyle=style, linewidth=0.8)
        ax3.set_xticks(list(xs), [f"{c} client{'s' if c > 1 else ''}" for c in levels])
        ax3.set_ylabel("llamabind / llama-server: median, min-max over rounds")
        ax3.grid(axis="y", alpha=0.3)
        ax3.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def chart_title(meta: dict[str, Any]) -> str:
    return (f"{meta['model']}: streamed chat, {meta['max_tokens']} tokens per request, "
            f"{meta['parallel']} slots, {meta['threads']} "
            f"thread{'s' if meta['threads'] > 1 else ''}")


def redraw(path: Path, update_chart: bool) -> int:
    """Draw the chart of a saved results file again (``--redraw``)."""
    data = json.loads(path.read_text())
    meta, summary = data["meta"], data["summary"]
    levels = [int(c) for c in meta["levels"]]
    summary["table"] = {name: {int(c): row for c, row in rows.items()}
                        for name, rows in summary["table"].items()}
    chart = path.with_suffix(".png")
    message = draw(summary, levels, chart, chart_title(meta))
    if message:
        print(message, file=sys.stderr)
        return 1
    if update_chart:
        shutil.copyfile(chart, HERE / "server_chart.png")
    print(f"chart: {chart}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--parallel", type=int, default=8, help="slots (-np), default 8")
    ap.add_argument("--ctx", type=int, default=1024, help="context per request (1024)")
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--levels", default="1,8,32", help="concurrent clients (1,8,32)")
    ap.add_argument("--requests", type=int, default=16,
                    help="requests per level and round, at least 1 per client (16)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per request (64)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peer-python", default=None,
                    help="a Python with llama-cpp-python[server] (default: "
                         "build/venv-llama-cpp-python, else this one)")
    ap.add_argument("--servers", default="llamabind,llama-server,llama-cpp-python",
                    help="which servers (default all; llama-cpp-python where installed)")
    ap.add_argument("--update-chart", action="store_true",
                    help="also copy the chart to benchmarks/server_chart.png")
    ap.add_argument("--redraw", type=Path, default=None, metavar="RESULTS_JSON",
                    help="only draw the chart of a saved results file again")
    args = ap.parse_args(argv)
    if args.redraw is not None:
        return redraw(args.redraw, args.update_chart)
    import llamabind

    args.threads = args.threads or llamabind.default_threads()
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    args.servers = {x.strip() for x in args.servers.split(",") if x.strip()}
    bias = eog_bias(args.model)
    try:
        servers, notes = make_servers(args)
    except BenchError as exc:
        print(f"bench_server: {exc}", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {s.name: {} for s in servers}
    try:
        for s in servers:
            print(f"starting {s.name}: {' '.join(s.cmd)}", file=sys.stderr)
            s.start()
            asyncio.run(run_level(s, 1, 1, args.max_tokens, bias, "warm-up "))
            s.settle()
        for r in range(args.rounds):
            order = servers[r % len(servers):] + servers[:r % len(servers)]
            for c in levels:
                per_client = max(1, -(-args.requests // c))
                for s in order:
                    res = asyncio.run(run_level(s, c, per_client, args.max_tokens, bias,
                                                f"{r + 1}.{c}."))
                    res["settle_s"] = round(s.settle(), 2)
                    runs[s.name].setdefault(c, []).append(res)
                    print(f"round {r + 1}/{args.rounds} {s.name:>16} C={c:<3} "
                          f"{res['tok_per_s']:7.1f} tok/s  errors {len(res['errors'])}",
                          file=sys.stderr)
    finally:
        for s in servers:
            s.stop()
    meta = {"model": args.model.name, "parallel": args.parallel, "ctx": args.ctx,
            "threads": args.threads, "max_tokens": args.max_tokens, "rounds": args.rounds,
            "levels": levels, "requests": args.requests, "notes": notes,
            "load_before": " ".join(f"{x:.1f}" for x in load_before),
            "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "machine": platform.platform(), "cpus": os.cpu_count(),
            "llama_cpp_commit": llamabind.build_info()["llama_cpp_commit"],
            "commands": {s.name: s.cmd for s in servers}}
    summary = summarize(runs, levels)
    print(format_report(summary, levels, meta))
    RESULTS.mkdir(exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"server-{stamp}.json"
    out.write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1))
    chart = RESULTS / f"server-{stamp}.png"
    message = draw(summary, levels, chart, chart_title(meta))
    print(f"\nresults: {out}", file=sys.stderr)
    if message:
        print(message, file=sys.stderr)
    elif args.update_chart:
        shutil.copyfile(chart, HERE / "server_chart.png")
        print(f"chart: {chart} (copied to benchmarks/server_chart.png)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

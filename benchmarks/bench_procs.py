"""Processes the benchmark drives: workers (native probe, llamabind, llama-cpp-python)
over a line protocol, native llama-bench runs, and finding or building the native tools.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROBE_SRC = HERE / "native_probe.cpp"
WORKER = HERE / "worker.py"
PROBE_DIR = ROOT / "build" / "bench"
PEER_VENV_PYTHON = ROOT / "build" / "venv-llama-cpp-python" / "bin" / "python"


class BenchError(RuntimeError):
    pass


# --- workers ---------------------------------------------------------------------------


class Worker:
    """A long-lived measuring process: one command per line in, one JSON line out.
    Its stderr goes to a temporary file (never a pipe nobody reads), shown on failure."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self._err = tempfile.TemporaryFile("w+")  # closed in close()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
            text=True, bufsize=1, env=env, cwd=str(ROOT))

    def call(self, line: str) -> dict[str, Any]:
        what = line.split()[0]
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited (code {self.proc.returncode}) before "
                             f"{what!r}{self._stderr_tail()}")
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            self.proc.wait(timeout=10)
            raise BenchError(f"{self.name} died during {what!r} (code "
                             f"{self.proc.returncode}){self._stderr_tail()}")
        data: dict[str, Any] = json.loads(reply)
        if not data.get("ok"):
            raise BenchError(f"{self.name}: {line}: {data.get('error')}")
        return data

    def _stderr_tail(self) -> str:
        try:
            self._err.flush()
            self._err.seek(0)
            tail = self._err.read()[-2000:]
        except (OSError, ValueError):
            return ""
        return f"\n--- its stderr ---\n{tail}" if tail.strip() else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._err.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # llama.cpp's own thread pools must be the only ones competing for the cores
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    return env


def start_worker(impl: str, python: str | None = None,
                 env: dict[str, str] | None = None) -> Worker:
    if impl == "native":
        return Worker("native", [str(probe_path())], env=worker_env())
    exe = python or sys.executable
    env = dict(env) if env is not None else worker_env()
    if impl == "llama_cpp":
        # the peer's venv must not see this project's sources ahead of its own packages
        env.pop("PYTHONPATH", None)
    return Worker(impl, [exe, str(WORKER), impl], env=env)


# --- native tools ----------------------------------------------------------------------


def _static_lib_dirs() -> list[Path]:
    """Build trees holding llama.cpp's static libraries, the native tools' first (it
    built llama-bench), then llamabind's own build tree (the very objects the extension
    links)."""
    dirs = [ROOT / "build" / "native"]
    dirs += sorted(Path(p).parent.parent.parent for p in glob.glob(
        str(ROOT / "build" / "*" / "llama.cpp" / "src" / "libllama.a")))
    out = []
    for d in dirs:
        if (d / "llama.cpp" / "src" / "libllama.a").is_file() and d not in out:
            out.append(d)
    return out


def _libs(tree: Path) -> list[Path]:
    base = tree / "llama.cpp"
    names = ["src/libllama.a", "ggml/src/libggml.a", "ggml/src/libggml-cpu.a",
             "ggml/src/libggml-base.a"]
    libs = [base / n for n in names]
    # the backends built in besides the CPU's (the RPC backend is on by default);
    # libggml.a registers them, so they link before the base library
    extra = sorted((base / "ggml" / "src").glob("ggml-*/libggml-*.a"))
    libs[2:2] = [p for p in extra if p.name != "libggml-cpu.a"]
    missing = [str(p) for p in libs if not p.is_file()]
    if missing:
        raise BenchError(f"missing static libraries: {missing}")
    return libs


def probe_path() -> Path:
    return PROBE_DIR / "native_probe"


def build_probe(verbose: bool = True) -> dict[str, Any]:
    """Compile native_probe.cpp against llama.cpp's static libraries (seconds: linking
    only). Rebuilt when the source or the libraries are newer than the binary."""
    trees = _static_lib_dirs()
    if not trees:
        raise BenchError("no llama.cpp build tree with static libraries under build/ "
                         "(run scripts/build_native.py, or build llamabind)")
    tree = trees[0]
    libs = _libs(tree)
    out = probe_path()
    stamp = out.with_suffix(".json")
    inputs = [PROBE_SRC, *libs]
    info = {"lib_tree": str(tree), "binary": str(out)}
    current = (out.is_file() and stamp.is_file()
               and json.loads(stamp.read_text()).get("lib_tree") == str(tree)
               and out.stat().st_mtime >= max(p.stat().st_mtime for p in inputs))
    if current:
        return info
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise BenchError("no C++ compiler (g++) to build the native probe")
    PROBE_DIR.mkdir(parents=True, exist_ok=True)
    vendor = ROOT / "vendor" / "llama.cpp"
    cmd = [cxx, "-O2", "-std=c++17", str(PROBE_SRC), f"-I{vendor / 'include'}",
           f"-I{vendor / 'ggml' / 'include'}", *map(str, libs), "-lpthread", "-ldl", "-lm",
           "-o", str(out)]
    if verbose:
        print(f"building the native probe against {tree} ...", file=sys.stderr)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"building native_probe failed:\n{proc.stderr[-4000:]}")
    stamp.write_text(json.dumps(info))
    info["seconds"] = round(time.monotonic() - t0, 1)
    return info


def find_native_bin(explicit: str | None, build: bool) -> tuple[Path | None, str]:
    """The directory with llama-bench (and llama-simple): --native-dir, else what
    scripts/build_native.py reports (building when asked to). Returns (dir, note)."""
    if explicit:
        d = Path(explicit)
        if not (d / "llama-bench").is_file():
            raise BenchError(f"no llama-bench in {d}")
        return d, "given with --native-dir"
    script = ROOT / "scripts" / "build_native.py"
    if not script.is_file():
        return None, "scripts/build_native.py is missing"
    cmd = [sys.executable, str(script)] + ([] if build else ["--print-dir"])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=str(ROOT))
    lines = proc.stdout.strip().splitlines()
    d = Path(lines[-1]) if lines else None
    if proc.returncode == 0 and d is not None and (d / "llama-bench").is_file():
        return d, "built by scripts/build_native.py from the same source and options"
    if d is not None and (d / "llama-bench").is_file():
        return d, ("scripts/build_native.py says the native build is not current with the "
                   "installed llamabind (run it, or pass --build-native); used anyway")
    return None, ("native llama-bench is not built: run 'python scripts/build_native.py' "
                  "(or pass --build-native)" + (f"\n{proc.stderr[-1500:]}" if build else ""))


def run_llama_bench(bench_bin: Path, model: str, threads: int, n_prompt: int, n_gen: int,
                    reps: int = 1) -> dict[str, Any]:
    """One llama-bench invocation; returns {"pp": t/s, "tg": t/s, raw}."""
    cmd = [str(bench_bin / "llama-bench"), "-m", model, "-t", str(threads),
           "-p", str(n_prompt), "-n", str(n_gen), "-r", str(reps), "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env=worker_env())
    if proc.returncode != 0:
        raise BenchError(f"llama-bench failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return parse_llama_bench(proc.stdout)


def parse_llama_bench(text: str) -> dict[str, Any]:
    data = json.loads(text)
    out: dict[str, Any] = {"raw": []}
    for test in data:
        entry = {"n_prompt": test["n_prompt"], "n_gen": test["n_gen"],
                 "avg_ts": test["avg_ts"], "samples_ts": test.get("samples_ts", [])}
        out["raw"].append(entry)
        if test["n_gen"] == 0 and test["n_prompt"] > 0:
            out["pp"] = test["avg_ts"]
        elif test["n_prompt"] == 0 and test["n_gen"] > 0:
            out["tg"] = test["avg_ts"]
    return out


def start_llama_bench(bench_bin: Path, model: str, threads: int, n_gen: int,
                      reps: int = 1) -> subprocess.Popen[str]:
    cmd = [str(bench_bin / "llama-bench"), "-m", model, "-t", str(threads), "-p", "0",
           "-n", str(n_gen), "-r", str(reps), "-o", "json"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=worker_env())


def finish_llama_bench(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise BenchError(f"llama-bench failed ({proc.returncode}): {err[-2000:]}")
    return parse_llama_bench(out)


def peer_python(explicit: str | None) -> tuple[str | None, str]:
    """A Python that can import llama_cpp (llama-cpp-python), and how it was found."""
    candidates = [explicit] if explicit else [str(PEER_VENV_PYTHON), sys.executable]
    for exe in candidates:
        if not exe or not os.path.exists(exe):
            continue
        env = worker_env()
        env.pop("PYTHONPATH", None)
        proc = subprocess.run(
            [exe, "-c", "import llama_cpp, sys; sys.stdout.write(llama_cpp.__version__)"],
            capture_output=True, text=True, check=False, env=env)
        if proc.returncode == 0:
            return exe, proc.stdout.strip()
    where = explicit or f"{PEER_VENV_PYTHON} or this Python"
    return None, (f"llama-cpp-python is not importable ({where}); see BENCHMARKS.md for "
                  "building it into build/venv-llama-cpp-python")


def import_time_ms(python: str, module: str, env: dict[str, str] | None = None) -> float:
    """`import module` in a fresh interpreter, timed inside it (interpreter start-up
    excluded)."""
    code = ("import time, sys, os\n"
            "d = os.environ.get('LLAMABIND_BENCH_PKG_DIR')\n"
            "if d:\n"
            "    sys.meta_path[:] = [f for f in sys.meta_path\n"
            "                        if 'editable' not in type(f).__module__.lower()]\n"
            "    sys.path.insert(0, d)\n"
            "t = time.perf_counter()\nimport " + module +
            "\nsys.stdout.write(repr((time.perf_counter() - t) * 1000))")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False,
                          env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        raise BenchError(f"import {module} failed: {proc.stderr[-1500:]}")
    return float(proc.stdout.strip())

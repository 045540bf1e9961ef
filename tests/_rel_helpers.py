"""Helpers for the reliability tests (concurrency, signals, resources, fork).

* :class:`Child` runs a Python snippet in a fresh interpreter and talks to it: the
  child prints protocol lines ``@@<tag> <json>`` on stdout (helper ``say`` in the
  child), the parent waits for them with :meth:`Child.expect`, can send it signals,
  and collects how it ended. Anything else on stdout/stderr (llama.cpp's logs) is kept
  for failure messages only.
* :func:`record` prints a measured figure (visible with ``pytest -s``) and adds it to
  ``build/reliability-metrics.json``.
* :func:`rss_kb` / :func:`mapped` read /proc/self: resident memory, and whether a file
  is still memory-mapped (a freed mmap-loaded model no longer is).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# scripts/asan_check.sh points this elsewhere: its (slower) figures are kept apart
METRICS = Path(os.environ.get("LLAMABIND_METRICS_FILE")
               or ROOT / "build" / "reliability-metrics.json")

# Defined in every child before its snippet.
CHILD_PRELUDE = r'''
import faulthandler, json, os, sys, time
faulthandler.enable()

def say(tag, **fields):
    sys.stdout.write("@@" + tag + " " + json.dumps(fields, default=repr) + "\n")
    sys.stdout.flush()

def rss_kb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")

def mapped(path):
    real = os.path.realpath(path)
    with open("/proc/self/maps") as fh:
        return any(line.rstrip("\n").endswith(real) for line in fh)
'''


def rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def mapped(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/maps") as fh:
        return any(line.rstrip("\n").endswith(real) for line in fh)


def record(name: str, value: Any, unit: str = "") -> None:
    """Print a measured figure and keep it in build/reliability-metrics.json."""
    print(f"\n[reliability] {name} = {value}{(' ' + unit) if unit else ''}", flush=True)
    try:
        METRICS.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(METRICS.read_text()) if METRICS.exists() else {}
        data[name] = {"value": value, "unit": unit,
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        tmp = METRICS.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, METRICS)
    except (OSError, ValueError):
        pass  # the figure is printed; the file is a convenience


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("GGML_NO_BACKTRACE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Child:
    """A Python child process running ``snippet`` (after :data:`CHILD_PRELUDE`).

    ``args`` become ``sys.argv[1:]`` in the child. The child is in its own session, so
    signals the test sends reach it alone; :meth:`close` kills it if still running.
    """

    def __init__(self, snippet: str, *args: str, extra_flags: tuple[str, ...] = ()) -> None:
        code = CHILD_PRELUDE + textwrap.dedent(snippet)
        self.proc = subprocess.Popen(
            [sys.executable, *extra_flags, "-c", code, *args], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(),
            start_new_session=True)
        self.messages: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.stdout_lines: list[str] = []
        self.stderr_chunks: list[bytes] = []
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.stdout_lines.append(line)
            if line.startswith("@@"):
                tag, _, payload = line[2:].partition(" ")
                try:
                    fields = json.loads(payload) if payload else {}
                except ValueError:
                    fields = {"raw": payload}
                self.messages.put((tag, fields))
        self.messages.put(("<eof>", {}))

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for chunk in iter(lambda: self.proc.stderr.read1(65536), b""):  # type: ignore[union-attr]
            self.stderr_chunks.append(chunk)

    @property
    def stderr(self) -> str:
        return b"".join(self.stderr_chunks).decode("utf-8", "replace")

    def describe(self) -> str:
        out = "\n".join(self.stdout_lines[-40:])
        return (f"child rc={self.proc.returncode}\n--- stdout (tail) ---\n{out}\n"
                f"--- stderr (tail) ---\n{self.stderr[-4000:]}")

    def expect(self, tag: str, timeout: float) -> dict[str, Any]:
        """Wait for the child's next ``@@tag`` line; fail on another tag, EOF or timeout.
        An ``@@error`` line from the child fails with its message."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"child sent no @@{tag} within {timeout}s\n"
                                     + self.describe())
            try:
                got, fields = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append((got, fields))
            if got == tag:
                return fields
            if got == "<eof>":
                self.wait(10)
                raise AssertionError(f"child ended before @@{tag}\n" + self.describe())
            raise AssertionError(f"child sent @@{got} {fields} while @@{tag} was expected\n"
                                 + self.describe())

    def signal(self, signum: int = signal.SIGINT) -> float:
        """Send ``signum``; returns the monotonic time it was sent (CLOCK_MONOTONIC is
        system-wide on Linux, so the child's time.monotonic() compares with it)."""
        t = time.monotonic()
        self.proc.send_signal(signum)
        return t

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"child did not exit within {timeout}s (killed)\n"
                                 + self.describe()) from None
        for t in self._readers:
            t.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_child(snippet: str, *args: str, timeout: float = 120.0,
              extra_flags: tuple[str, ...] = ()) -> tuple[Child, list[tuple[str, dict]]]:
    """Run a child to the end; returns it (exit code in ``child.proc.returncode``) and
    every protocol message it sent, in order."""
    child = Child(snippet, *args, extra_flags=extra_flags)
    try:
        child.wait(timeout)
        msgs = []
        while True:
            tag, fields = child.messages.get(timeout=10)
            if tag == "<eof>":
                break
            msgs.append((tag, fields))
        return child, msgs
    finally:
        child.close()


def messages_by_tag(msgs: list[tuple[str, dict]]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for tag, fields in msgs:
        out[tag] = fields
    return out

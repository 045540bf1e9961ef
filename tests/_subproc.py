"""Run llamabind code in child Python processes: the one harness of the test suite.

A crash in native code (a failed GGML_ASSERT, a segfault) would kill pytest itself; in
a child it becomes something a test can assert against. The child code is a module of
``tests/children/`` (``python -m children.NAME``), or for a few lines a snippet
(:func:`run_python`). Children talk to the test over a pipe of their own (``say`` and
``report`` in :mod:`children.channel`), so nothing llama.cpp prints can get in the way:

* :class:`Child` starts a child and lets the test wait for each of its messages
  (:meth:`Child.expect`), send it signals, and see how it ended;
* :func:`run_child` runs a child to the end and returns its messages;
* :func:`run_python` runs a snippet and classifies how it ended (an :class:`Outcome`:
  ``ok``, ``exception``, ``crash`` by a signal, ``hang`` past its time limit, ``died``
  otherwise);
* :func:`run_loads` loads many model files, many per child, and names the one that
  crashes or hangs.

:func:`record` prints a measured figure (visible with ``pytest -s``) and adds it to
``build/reliability-metrics.json``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
# scripts/asan_check.sh points this elsewhere: its (slower) figures are kept apart
METRICS = Path(os.environ.get("LLAMABIND_METRICS_FILE")
               or ROOT / "build" / "reliability-metrics.json")

Message = tuple[str, dict[str, Any]]


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


def _child_env(channel_fd: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    # keep native thread pools small on a shared machine
    env.setdefault("OMP_NUM_THREADS", "1")
    # ggml's abort handler would attach gdb for a backtrace: slow, and noisy
    env.setdefault("GGML_NO_BACKTRACE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    env["LLAMABIND_CHILD_FD"] = str(channel_fd)
    return env


class Child:
    """A child process running ``python -m children.MODULE ARGS...``.

    It is in its own session, so signals the test sends reach it alone; :meth:`close`
    (or leaving a ``with`` block) kills it if it is still running. Its messages arrive
    in :attr:`messages` as ``(tag, fields)``, then ``("<eof>", {})``; its stdout and
    stderr (llama.cpp's logs, tracebacks) are kept for failure messages only.
    """

    def __init__(self, module: str, *args: str, extra_flags: tuple[str, ...] = ()) -> None:
        read_fd, write_fd = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, *extra_flags, "-m", f"children.{module}", *args],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=_child_env(write_fd), pass_fds=(write_fd,), start_new_session=True)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.messages: queue.Queue[Message] = queue.Queue()
        self.seen: list[Message] = []
        self.output: list[bytes] = []
        self._channel = os.fdopen(read_fd, "rb")
        self._readers = [threading.Thread(target=self._read_channel, daemon=True),
                         threading.Thread(target=self._read_output, daemon=True)]
        for t in self._readers:
            t.start()

    def _read_channel(self) -> None:
        for raw in self._channel:
            try:
                msg = json.loads(raw)
                tag = msg.pop("tag")
            except (ValueError, KeyError, AttributeError):
                tag, msg = "<garbled>", {"raw": raw.decode("utf-8", "replace")}
            self.messages.put((tag, msg))
        self.messages.put(("<eof>", {}))

    def _read_output(self) -> None:
        assert self.proc.stdout is not None
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):  # type: ignore[union-attr]
            self.output.append(chunk)

    @property
    def stderr(self) -> str:
        """What the child wrote on stdout and stderr."""
        return b"".join(self.output).decode("utf-8", "replace")

    def describe(self) -> str:
        seen = "\n".join(f"{tag} {fields}"[:300] for tag, fields in self.seen[-20:])
        return (f"child rc={self.proc.returncode}\n--- messages (tail) ---\n{seen}\n"
                f"--- output (tail) ---\n{self.stderr[-4000:]}")

    def expect(self, tag: str, timeout: float) -> dict[str, Any]:
        """Wait for the child's next message; fail if it has another tag, or on EOF or
        timeout. An ``error`` message from the child fails with its fields."""
        try:
            got, fields = self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"child sent no {tag!r} within {timeout}s\n"
                                 + self.describe()) from None
        self.seen.append((got, fields))
        if got == tag:
            return fields
        if got == "<eof>":
            self.wait(10)
            raise AssertionError(f"child ended before {tag!r}\n" + self.describe())
        raise AssertionError(f"child sent {got!r} {fields} while {tag!r} was expected\n"
                             + self.describe())

    def rest(self, timeout: float = 10) -> list[Message]:
        """The messages not taken yet, up to the end of the channel."""
        out = []
        while True:
            try:
                tag, fields = self.messages.get(timeout=timeout)
            except queue.Empty:
                return out
            if tag == "<eof>":
                return out
            self.seen.append((tag, fields))
            out.append((tag, fields))

    def signal(self, signum: int = signal.SIGINT) -> float:
        """Send ``signum``; returns the monotonic time it was sent (CLOCK_MONOTONIC is
        system-wide on Linux, so the child's time.monotonic() compares with it)."""
        t = time.monotonic()
        self.proc.send_signal(signum)
        return t

    def wait(self, timeout: float) -> int:
        """The exit status (negative: killed by that signal); a child still running
        after ``timeout`` seconds is killed and fails the test."""
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
        """Kill the child and whatever it started in its session."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        for t in self._readers:
            t.join(5)
        self._channel.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_child(module: str, *args: str, timeout: float = 120.0,
              extra_flags: tuple[str, ...] = ()) -> tuple[Child, list[Message]]:
    """Run ``children.MODULE`` to the end; returns the child (its exit status in
    ``child.proc.returncode``) and every message it sent, in order."""
    with Child(module, *args, extra_flags=extra_flags) as child:
        child.wait(timeout)
        return child, child.rest()


def messages_by_tag(msgs: list[Message]) -> dict[str, dict[str, Any]]:
    return {tag: fields for tag, fields in msgs}


# --- snippets, and how they ended ---------------------------------------------------------

@dataclass
class Outcome:
    kind: str                       # ok / exception / crash / hang / died
    returncode: int | None = None
    signal: str | None = None
    exc_type: str | None = None
    exc_mro: list[str] = field(default_factory=list)
    message: str = ""
    notes: list[str] = field(default_factory=list)        # the exception's __notes__
    reports: list[dict[str, Any]] = field(default_factory=list)   # what report() sent
    stderr: str = ""
    phase: str = ""   # run_loads: "load" (the Model constructor) or "use" (after it)
    note: str = ""    # run_loads: what the use phase left out

    @property
    def is_llama_error(self) -> bool:
        return self.kind == "exception" and "LlamaError" in self.exc_mro

    def describe(self) -> str:
        if self.kind == "exception":
            notes = "".join(f"\n  {n}" for n in self.notes)
            return f"exception {self.exc_type}: {self.message}{notes}"
        if self.kind == "crash":
            return f"crash by {self.signal}; output tail:\n{self.stderr[-3000:]}"
        if self.kind in ("hang", "died"):
            return f"{self.kind} (rc {self.returncode}); output tail:\n{self.stderr[-3000:]}"
        return "ok"


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _run_module(module: str, *args: str, timeout: float) -> Outcome:
    """Run ``children.MODULE`` (one that ends with a ``done`` or ``uncaught`` message)
    and classify how it ended."""
    with Child(module, *args) as child:
        timed_out = False
        try:
            child.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        except BaseException:
            # e.g. pytest-timeout or Ctrl+C interrupting the wait: leave no orphan
            child.kill()
            raise
        child.kill()
        msgs = child.rest()
        rc = child.proc.returncode
        stderr = child.stderr
    reports = [fields for tag, fields in msgs if tag == "report"]
    ends = [(tag, fields) for tag, fields in msgs if tag in ("done", "uncaught")]
    if timed_out:
        return Outcome("hang", rc, reports=reports, stderr=stderr)
    if rc is not None and rc < 0:
        return Outcome("crash", rc, signal=_signal_name(rc), reports=reports, stderr=stderr)
    if ends and ends[-1][0] == "done" and rc == 0:
        return Outcome("ok", rc, reports=reports, stderr=stderr)
    if ends and ends[-1][0] == "uncaught":
        last = ends[-1][1]
        return Outcome("exception", rc, exc_type=last["exc_type"], exc_mro=last["exc_mro"],
                       message=last["message"], notes=last.get("notes", []),
                       reports=reports, stderr=stderr)
    return Outcome("died", rc, reports=reports, stderr=stderr)


def run_python(snippet: str, *, timeout: float = 120.0) -> Outcome:
    """Run ``snippet`` in a fresh interpreter; classify how it ended.

    The snippet can call ``report(**fields)`` to send JSON-able results back (they are
    in ``Outcome.reports``); an exception escaping it gives kind ``"exception"``.
    """
    with tempfile.TemporaryDirectory(prefix="llamabind-snippet-") as tmp:
        path = os.path.join(tmp, "snippet.py")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(textwrap.dedent(snippet))
        return _run_module("snippet", path, timeout=timeout)


# --- many model loads per process ------------------------------------------------------------

def _run_loader(jobs: list[dict[str, Any]],
                per_job_timeout: float) -> tuple[dict[Any, Outcome], Outcome]:
    """Run ``jobs`` in one child (children/loader.py); returns ({id: Outcome} for the
    jobs that finished, the child's own Outcome)."""
    with tempfile.TemporaryDirectory(prefix="llamabind-loads-") as tmp:
        jobs_file = os.path.join(tmp, "jobs.json")
        with open(jobs_file, "w") as fh:
            json.dump(jobs, fh)
        whole = _run_module("loader", jobs_file, str(per_job_timeout),
                            timeout=per_job_timeout * len(jobs) + 60)
    done = {}
    for rep in whole.reports:
        if rep.get("event") == "ok":
            done[rep["id"]] = Outcome("ok", 0, reports=[rep], note=rep.get("note", ""))
        elif rep.get("event") == "error":
            done[rep["id"]] = Outcome("exception", None, exc_type=rep["exc_type"],
                                      exc_mro=rep["exc_mro"], message=rep["message"],
                                      reports=[rep], phase=rep["phase"])
    return done, whole


def _classify_single(job: dict[str, Any], per_job_timeout: float) -> Outcome:
    done, whole = _run_loader([job], per_job_timeout)
    if job["id"] in done:
        return done[job["id"]]
    # The watchdog printed "Timeout (": the job ran past its limit. Dumping the
    # tracebacks of a thread that is running Python code (not blocked in C) can itself
    # fault, so a crash after that line is still the watchdog's, not the job's.
    if whole.kind in ("died", "crash") and "Timeout (" in whole.stderr:
        whole.kind = "hang"
    return whole


def run_loads(jobs: list[dict[str, Any]], *, per_job_timeout: float = 60.0,
              batch_size: int = 25, workers: int = 2) -> tuple[dict[Any, Outcome], list[str]]:
    """Load each job's model (``{"id", "path", "vocab_only", "exercise"}``) in child
    processes, ``batch_size`` loads per child and ``workers`` children at a time. A
    child that dies has its batch re-run one job per child, which names the culprit.

    Returns ({id: Outcome}, notes) where notes lists the batches that were re-run.
    """
    batches = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]
    results: dict[Any, Outcome] = {}
    notes: list[str] = []

    def run_batch(batch: list[dict[str, Any]]) -> tuple[dict[Any, Outcome], str | None]:
        done, whole = _run_loader(batch, per_job_timeout)
        if len(done) == len(batch) and whole.kind == "ok":
            return done, None
        started = [r["id"] for r in whole.reports if r.get("event") == "start"]
        note = (f"batch of {len(batch)} ended with {whole.kind} "
                f"({whole.signal or whole.returncode}) during job "
                f"{started[-1] if started else '?'}; re-running it one job per process")
        single = {job["id"]: _classify_single(job, per_job_timeout) for job in batch}
        return single, note

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, note in pool.map(run_batch, batches):
            results.update(done)
            if note:
                notes.append(note)
    return results, notes

"""Run llamabind code in a child Python process and classify how it ended.

A crash in native code (a failed GGML_ASSERT, a segfault) would kill pytest itself;
run in a child, it becomes an :class:`Outcome` of kind ``"crash"`` that a test can
assert against. Kinds:

``ok``         the snippet ran to the end
``exception``  the snippet raised; ``exc_type``, ``exc_mro`` and ``message`` say what
``crash``      the process was killed by a signal (``signal`` names it)
``hang``       it ran past its time limit and was killed
``died``       it exited otherwise without reporting (``os._exit``, fatal error...)

The child reports through a results file (JSON lines), not stdout, so llama.cpp's
own output cannot get in the way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

# Code run in the child before the snippet: `report(**fields)` writes one JSON line,
# `exc_fields(exc)` describes an exception.
_PRELUDE = r'''
import faulthandler, json, os, sys
faulthandler.enable()
_RESULTS = open(os.environ["LLAMABIND_TEST_RESULTS"], "a", buffering=1)

def report(**fields):
    _RESULTS.write(json.dumps(fields, default=repr) + "\n")
    _RESULTS.flush()

def exc_fields(exc):
    return {"exc_type": type(exc).__name__, "exc_module": type(exc).__module__,
            "exc_mro": [c.__name__ for c in type(exc).__mro__], "message": str(exc),
            "notes": [str(n) for n in getattr(exc, "__notes__", ())]}
'''

_WRAPPER = r'''
_SNIPPET = {snippet!r}
try:
    exec(compile(_SNIPPET, "<snippet>", "exec"), {{"report": report, "exc_fields": exc_fields,
                                                  "__name__": "__snippet__"}})
except BaseException as _exc:
    report(event="uncaught", **exc_fields(_exc))
    _RESULTS.close()
    os._exit(3)
report(event="done")
_RESULTS.close()
'''


@dataclass
class Outcome:
    kind: str                       # ok / exception / crash / hang / died
    returncode: int | None = None
    signal: str | None = None
    exc_type: str | None = None
    exc_mro: list = field(default_factory=list)
    message: str = ""
    notes: list = field(default_factory=list)    # the exception's __notes__
    reports: list = field(default_factory=list)   # every JSON line the child wrote
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
            return f"crash by {self.signal}; stderr tail:\n{self.stderr[-3000:]}"
        if self.kind in ("hang", "died"):
            return f"{self.kind} (rc {self.returncode}); stderr tail:\n{self.stderr[-3000:]}"
        return "ok"


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    # keep native thread pools small on a shared machine
    env.setdefault("OMP_NUM_THREADS", "1")
    # ggml's abort handler would attach gdb for a backtrace: slow, and noisy
    env.setdefault("GGML_NO_BACKTRACE", "1")
    return env


def run_python(snippet: str, *, timeout: float = 120.0) -> Outcome:
    """Run ``snippet`` in a fresh interpreter; classify how it ended.

    The snippet can call ``report(**fields)`` to send JSON-able results back (they are
    in ``Outcome.reports``); an exception escaping it gives kind ``"exception"``.
    """
    code = _PRELUDE + _WRAPPER.format(snippet=textwrap.dedent(snippet))
    with tempfile.TemporaryDirectory(prefix="llamabind-subproc-") as tmp:
        results = os.path.join(tmp, "results.jsonl")
        open(results, "w").close()
        env = _child_env()
        env["LLAMABIND_TEST_RESULTS"] = results
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
            start_new_session=True)
        timed_out = False
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(proc)
            _, err = proc.communicate()
        except BaseException:
            # e.g. pytest-timeout or Ctrl+C interrupting the wait: leave no orphan
            _kill(proc)
            proc.communicate()
            raise
        with open(results, encoding="utf-8") as fh:
            reports = [json.loads(line) for line in fh if line.strip()]
    stderr = err.decode("utf-8", "replace")
    rc = proc.returncode
    events = [r for r in reports if r.get("event") in ("done", "uncaught")]
    if timed_out:
        return Outcome("hang", rc, reports=reports, stderr=stderr)
    if rc is not None and rc < 0:
        return Outcome("crash", rc, signal=_signal_name(rc), reports=reports, stderr=stderr)
    if events and events[-1]["event"] == "done" and rc == 0:
        return Outcome("ok", rc, reports=reports, stderr=stderr)
    if events and events[-1]["event"] == "uncaught":
        last = events[-1]
        return Outcome("exception", rc, exc_type=last["exc_type"], exc_mro=last["exc_mro"],
                       message=last["message"], notes=last.get("notes", []),
                       reports=reports, stderr=stderr)
    return Outcome("died", rc, reports=reports, stderr=stderr)


# --- many model loads per process ----------------------------------------------------

# Each job: {"id", "path", "vocab_only", "exercise"}. Per job the child reports
# "start", then "ok" or "error" (with the phase: "load" or "use"); a per-job watchdog
# (faulthandler) ends a job that hangs with exit code 1 and "Timeout" on stderr.
_LOADER = r'''
import faulthandler, json, sys
import llamabind

jobs = json.load(open(sys.argv[1]))
per_job = float(sys.argv[2])

def exercise(model, vocab_only):
    """After a successful load: use the vocabulary, and (full models) run one tiny
    decode. Returns a note on what was left out."""
    vocab = model.vocab
    n_vocab = model.n_vocab
    note = ""
    if vocab.type == "none":
        # no tokenizer: llamabind must refuse (llama.cpp would abort), then decode ids
        try:
            vocab.tokenize("Hello")
        except llamabind.TokenizationError:
            note = "vocab type none: tokenize refused"
        else:
            raise AssertionError("tokenize with a vocabulary of type none did not raise")
        toks = [0, 1, 2, 3]
    else:
        toks = vocab.tokenize("Hello world, 123! <s> \u00e9\u4e2d", add_special=True,
                              parse_special=True)
        vocab.detokenize(toks)
        for t in [*toks[:4], 0, n_vocab - 1]:
            if 0 <= t < n_vocab:
                vocab.token_to_piece(t, special=True)
    if vocab_only:
        return note
    ctx = llamabind.Context(model, n_ctx=64, n_batch=16, n_ubatch=16, n_threads=1)
    try:
        ctx.eval([t for t in toks if 0 <= t < n_vocab][:4] or [0])
        ctx.logits()
    finally:
        ctx.close()
    return note

for job in jobs:
    report(event="start", id=job["id"])
    faulthandler.dump_traceback_later(per_job, exit=True)
    phase = "load"
    try:
        model = llamabind.Model(job["path"], vocab_only=job.get("vocab_only", False))
        try:
            info = {"n_vocab": model.n_vocab, "note": ""}
            if job.get("exercise"):
                phase = "use"
                info["note"] = exercise(model, job.get("vocab_only", False))
        finally:
            model.close()
    except BaseException as exc:
        faulthandler.cancel_dump_traceback_later()
        report(event="error", id=job["id"], phase=phase, **exc_fields(exc))
    else:
        faulthandler.cancel_dump_traceback_later()
        report(event="ok", id=job["id"], **info)
'''


def _run_loader(jobs: list, per_job_timeout: float) -> tuple[dict, Outcome]:
    """Run ``jobs`` in one child; returns ({id: Outcome} for the jobs that finished,
    the child's own Outcome)."""
    with tempfile.TemporaryDirectory(prefix="llamabind-loads-") as tmp:
        jobs_file = os.path.join(tmp, "jobs.json")
        with open(jobs_file, "w") as fh:
            json.dump(jobs, fh)
        snippet = (f"import sys\nsys.argv = ['loader', {jobs_file!r}, {str(per_job_timeout)!r}]\n"
                   + _LOADER)
        whole = run_python(snippet, timeout=per_job_timeout * len(jobs) + 60)
    done = {}
    for rep in whole.reports:
        if rep.get("event") == "ok":
            done[rep["id"]] = Outcome("ok", 0, reports=[rep], note=rep.get("note", ""))
        elif rep.get("event") == "error":
            done[rep["id"]] = Outcome("exception", None, exc_type=rep["exc_type"],
                                      exc_mro=rep["exc_mro"], message=rep["message"],
                                      reports=[rep], phase=rep["phase"])
    return done, whole


def _classify_single(job: dict, per_job_timeout: float) -> Outcome:
    done, whole = _run_loader([job], per_job_timeout)
    if job["id"] in done:
        return done[job["id"]]
    # The watchdog printed "Timeout (": the job ran past its limit. Dumping the
    # tracebacks of a thread that is running Python code (not blocked in C) can itself
    # fault, so a crash after that line is still the watchdog's, not the job's.
    if whole.kind in ("died", "crash") and "Timeout (" in whole.stderr:
        whole.kind = "hang"
    return whole


def run_loads(jobs: list, *, per_job_timeout: float = 60.0, batch_size: int = 25,
              workers: int = 2) -> tuple[dict, list]:
    """Load each job's model in child processes, ``batch_size`` loads per child and
    ``workers`` children at a time. A child that dies has its batch re-run one job
    per child, which names the culprit.

    Returns ({id: Outcome}, notes) where notes lists the batches that were re-run.
    """
    batches = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]
    results: dict = {}
    notes: list = []

    def run_batch(batch):
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

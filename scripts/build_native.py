#!/usr/bin/env python3
"""Build the native llama.cpp reference tools the way the installed llamabind was built.

The tools (``llama-bench``, ``llama-simple`` and ``llamabind-ref``, see ``native/``) are
compiled from the same pinned ``vendor/llama.cpp`` with exactly the GGML_*/LLAMA_*
options recorded in the installed package's ``build_config.json``, into
``build/native/`` (Ninja, the package's build type). Only the options that select what
gets built (LLAMA_BUILD_*, LLAMA_OPENSSL, BUILD_SHARED_LIBS) are set by
``native/CMakeLists.txt`` itself.

Idempotent: when the options, the pin and the native sources are unchanged and the
binaries exist, it does nothing. It prints the directory holding the binaries.

    python scripts/build_native.py              # build if needed, print the bin dir
    python scripts/build_native.py --print-dir  # only print it (exit 1 if not built/current)
    python scripts/build_native.py --json       # build if needed, print a JSON summary
    python scripts/build_native.py --build-dir build/native-gpu \
        --define CMAKE_CUDA_ARCHITECTURES=90    # a CMake setting the package config lacks
    python scripts/build_native.py --targets llamabind-ref   # only what the tests run
    python scripts/build_native.py --target llama-server     # also a benchmark's tool

Targets: all of BINARIES by default (the benchmarks use llama-bench and llama-simple);
--targets, or LLAMABIND_NATIVE_TARGETS (comma-separated, so that it reaches the runs the
test suite starts), builds a subset: scripts/test.sh builds only llamabind-ref, sparing
CI llama-common, which llama-bench needs and nothing in the tests does. ``--target``
(repeatable) adds one of the benchmarks' extra tools (EXTRA_TARGETS: llama-server,
llama-batched-bench, llama-embedding), built on request only; it unpacks the parts of the
pinned tree it needs first when an older vendor/llama.cpp lacks them.

A compiler launcher (CMAKE_C_COMPILER_LAUNCHER=ccache, as scripts/test.sh sets) is taken
from the environment: the llama.cpp objects here are compiled exactly as the package's
were (tests/test_fidelity.py checks the flags), so ccache serves them from the package
build's entries and only the tools and llama-common are compiled afresh.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NATIVE_SRC = ROOT / "native"
VENDOR_DIR = ROOT / "vendor" / "llama.cpp"
PIN_FILE = ROOT / "vendor" / "llama-cpp-pin.json"

sys.path.insert(0, str(ROOT / "scripts"))
from fetch_llama_cpp import fetch_source, has_all_parts, source_marker  # noqa: E402
from registry import FetchError  # noqa: E402

DEFAULT_BUILD_DIR = ROOT / "build" / "native"
BINARIES = ("llamabind-ref", "llama-bench", "llama-simple", "llamabind-chat-ref")
# built on request only (benchmarks); each with the part of the source tree it needs
EXTRA_TARGETS = {"llama-server": "tools/server/CMakeLists.txt",
                 "llama-batched-bench": "tools/batched-bench/CMakeLists.txt",
                 "llama-embedding": "examples/embedding/CMakeLists.txt"}
STAMP_NAME = "llamabind-native.stamp.json"

# Set by native/CMakeLists.txt (what to build), never taken from the package's config.
FORCED = frozenset({
    "LLAMA_BUILD_COMMON", "LLAMA_BUILD_TESTS", "LLAMA_BUILD_TOOLS", "LLAMA_BUILD_EXAMPLES",
    "LLAMA_BUILD_SERVER", "LLAMA_BUILD_APP", "LLAMA_OPENSSL", "BUILD_SHARED_LIBS",
    "LLAMA_BUILD_COMMIT", "LLAMA_BUILD_NUMBER", "LLAMA_BUILD_UI", "LLAMA_USE_PREBUILT_UI",
})
_OPTION_NAME = re.compile(r"^(GGML|LLAMA)_[A-Z0-9_]+$")
_DEFINE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class BuildError(RuntimeError):
    pass


def find_build_config() -> Path:
    """build_config.json of the importable llamabind: next to its compiled ``_llama``
    module (an editable install keeps that in site-packages, apart from the sources),
    else in any directory of the ``llamabind`` package."""
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("llamabind._llama")
    except ImportError as exc:
        raise BuildError(f"llamabind is not importable here ({exc}); pass --config") from exc
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "build_config.json")
    pkg = importlib.util.find_spec("llamabind")
    if pkg is not None:
        for loc in pkg.submodule_search_locations or ():
            candidates.append(Path(loc) / "build_config.json")
    for path in candidates:
        if path.is_file():
            return path
    raise BuildError(
        "the installed llamabind has no build_config.json (looked in "
        + ", ".join(str(p) for p in candidates) + "); pass --config")


def load_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise BuildError(f"{path} does not hold a JSON object")
    return data


def cmake_options(config: dict[str, Any]) -> dict[str, str]:
    """The package's GGML_*/LLAMA_* options, less the ones native/ sets itself."""
    options = config.get("options")
    if not isinstance(options, dict) or not options:
        raise BuildError("build_config.json has no 'options' object")
    out: dict[str, str] = {}
    for name, value in sorted(options.items()):
        if not _OPTION_NAME.match(name):
            raise BuildError(f"build_config.json: unexpected option name {name!r}")
        if name in FORCED:
            continue
        out[name] = str(value)
    return out


def check_pin(config: dict[str, Any]) -> dict[str, Any]:
    pin = load_json(PIN_FILE)
    marker = VENDOR_DIR / ".llamabind-pin"
    have = marker.read_text().strip() if marker.is_file() else ""
    if have != source_marker(pin):
        raise BuildError(
            "vendor/llama.cpp is not the pinned, patched tree (missing, another version or "
            "an older patch list); run 'python scripts/fetch_llama_cpp.py'")
    built_from = config.get("llama_cpp_commit")
    if built_from and built_from != pin["llama_cpp_commit"]:
        raise BuildError(
            f"the installed llamabind was built from llama.cpp {built_from}, but the pin is "
            f"{pin['llama_cpp_commit']}: rebuild llamabind first, so both use the same source")
    return pin


def file_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def find_ninja() -> str:
    ninja = shutil.which("ninja")
    if ninja is None:
        raise BuildError("ninja is not on PATH (pip install ninja, or apt-get install ninja-build)")
    return ninja


def package_compilers() -> dict[str, str]:
    """The C and C++ compilers the package build used: CC/CXX when set, else Python's
    sysconfig ones (gcc and g++ here; the package build, through scikit-build-core,
    compiled with those, where CMake alone picks cc and c++). The same programs under
    other names, but ccache hashes the name: only named alike does the native build
    reuse the package build's objects."""
    import sysconfig

    out = {}
    for lang, var in (("C", "CC"), ("CXX", "CXX")):
        value = os.environ.get(var) or str(sysconfig.get_config_var(var) or "")
        name = value.split()[0] if value.split() else ""
        path = shutil.which(name) if name else None
        if path:
            out[f"CMAKE_{lang}_COMPILER"] = path
    return out


def detected_compiler(build_dir: Path) -> str | None:
    """'GNU 12.2.0' from CMake's compiler detection in the build tree, like the package's."""
    for path in sorted((build_dir / "CMakeFiles").glob("*/CMakeCXXCompiler.cmake")):
        text = path.read_text(errors="replace")
        cid = re.search(r'set\(CMAKE_CXX_COMPILER_ID "([^"]*)"\)', text)
        ver = re.search(r'set\(CMAKE_CXX_COMPILER_VERSION "([^"]*)"\)', text)
        if cid and ver:
            return f"{cid.group(1)} {ver.group(1)}"
    return None


@contextlib.contextmanager
def locked(build_dir: Path) -> Iterator[None]:
    """One build at a time in a build dir (parallel test workers may all ask)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with (build_dir / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run(cmd: list[str], quiet: bool) -> None:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    if quiet:
        captured = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, errors="replace", check=False)
        rc = captured.returncode
        if rc != 0:
            sys.stderr.write(captured.stdout[-20000:])
    else:
        rc = subprocess.run(cmd, stdout=sys.stderr, check=False).returncode
    if rc != 0:
        raise BuildError(f"command failed with exit code {rc}: {cmd[0]} ...")


class Plan:
    def __init__(self, config_path: Path, build_dir: Path,
                 defines: dict[str, str] | None = None,
                 targets: tuple[str, ...] = BINARIES) -> None:
        self.config_path = config_path
        self.targets = targets
        self.build_dir = build_dir
        self.bin_dir = build_dir / "bin"
        self.config = load_json(config_path)
        self.pin = check_pin(self.config)
        self.options = cmake_options(self.config)
        self.build_type = str(self.config.get("build_type") or "Release")
        self.vulkan_include_dir = self.config.get("vulkan_include_dir")
        self.defines = dict(sorted((defines or {}).items()))
        self.compilers = {k: v for k, v in package_compilers().items()
                          if k not in self.defines}
        clash = sorted(set(self.defines) & (set(self.options) | FORCED))
        if clash:
            raise BuildError(f"--define {clash[0]}: set by the package's build_config.json "
                             "or by native/CMakeLists.txt, not here")
        # what the configuration depends on; a change means configuring afresh
        self.configure_stamp: dict[str, Any] = {
            "options": self.options,
            "pin_sha256": self.pin["sha256"],
            "llama_cpp_commit": self.pin["llama_cpp_commit"],
            "build_type": self.build_type,
            "vulkan_include_dir": self.vulkan_include_dir,
            "defines": self.defines,
            "compilers": self.compilers,
            "cmakelists": file_digest([NATIVE_SRC / "CMakeLists.txt"]),
            # native/CMakeLists.txt configures the extra tools when their sources exist
            "extra_sources": sorted(name for name, part in EXTRA_TARGETS.items()
                                    if (VENDOR_DIR / part).is_file()),
        }
        # what the binaries depend on beyond that (an edit means an incremental build)
        # (the vendor marker changes when the tree is unpacked again, e.g. new patches)
        self.sources_digest = file_digest([*sorted(NATIVE_SRC.glob("*.cpp")),
                                           VENDOR_DIR / ".llamabind-pin"])

    def binaries(self) -> dict[str, Path]:
        return {name: self.bin_dir / name for name in self.targets}

    def stamp_path(self) -> Path:
        return self.build_dir / STAMP_NAME

    def read_stamp(self) -> dict[str, Any] | None:
        try:
            return load_json(self.stamp_path())
        except (OSError, ValueError, BuildError):
            return None

    def up_to_date(self) -> bool:
        stamp = self.read_stamp()
        return (stamp is not None
                and stamp.get("configure") == self.configure_stamp
                and stamp.get("sources") == self.sources_digest
                and all(p.is_file() and os.access(p, os.X_OK) for p in self.binaries().values()))

    def build(self, jobs: int, quiet: bool) -> float:
        t0 = time.monotonic()
        stamp = self.read_stamp()
        cache = self.build_dir / "CMakeCache.txt"
        needs_configure = (stamp is None or stamp.get("configure") != self.configure_stamp
                           or not cache.is_file())
        if needs_configure:
            # Start the configuration afresh so no option of an earlier build lingers
            # in the cache; compiled objects stay and are reused where flags match.
            self.stamp_path().unlink(missing_ok=True)
            cache.unlink(missing_ok=True)
            cmd = [
                "cmake", "-S", str(NATIVE_SRC), "-B", str(self.build_dir), "-G", "Ninja",
                f"-DCMAKE_MAKE_PROGRAM={find_ninja()}",
                f"-DCMAKE_BUILD_TYPE={self.build_type}",
            ]
            cmd += [f"-D{name}={value}" for name, value in self.options.items()]
            cmd += [f"-D{name}={value}" for name, value in self.defines.items()]
            cmd += [f"-D{name}={value}" for name, value in self.compilers.items()]
            if self.vulkan_include_dir:
                cmd.append(f"-DVulkan_INCLUDE_DIR={self.vulkan_include_dir}")
            run(cmd, quiet)
            compiler = detected_compiler(self.build_dir)
            wanted = self.config.get("compiler")
            if compiler and wanted and compiler != wanted:
                print(f"warning: llamabind was built with {wanted}, the native tools get "
                      f"{compiler}; results may differ", file=sys.stderr)
        run(["cmake", "--build", str(self.build_dir), "--parallel", str(jobs),
             "--target", *self.targets], quiet)
        missing = [str(p) for p in self.binaries().values() if not p.is_file()]
        if missing:
            raise BuildError(f"the build finished but did not produce {missing}")
        self.stamp_path().write_text(json.dumps(
            {"configure": self.configure_stamp, "sources": self.sources_digest,
             "config_path": str(self.config_path)}, indent=1, sort_keys=True) + "\n")
        return time.monotonic() - t0

    def summary(self, built: bool, seconds: float) -> dict[str, Any]:
        return {
            "bin_dir": str(self.bin_dir),
            "binaries": {k: str(v) for k, v in self.binaries().items()},
            "built": built,
            "seconds": round(seconds, 1),
            "build_config": str(self.config_path),
            "build_type": self.build_type,
            "llama_cpp_commit": self.pin["llama_cpp_commit"],
            "options": self.options,
            "defines": self.defines,
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path,
                    help="build_config.json to follow (default: the importable llamabind's)")
    ap.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR,
                    help=f"build directory (default: {DEFAULT_BUILD_DIR.relative_to(ROOT)})")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--print-dir", action="store_true",
                    help="print the binaries' directory without building; exit 1 when they "
                         "are missing or out of date")
    ap.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    ap.add_argument("--define", action="append", default=[], metavar="NAME=VALUE",
                    help="another CMake setting (e.g. CMAKE_CUDA_ARCHITECTURES=90); "
                         "GGML_*/LLAMA_* options come from the package only")
    ap.add_argument("--target", action="append", default=[], choices=sorted(EXTRA_TARGETS),
                    help="also build this benchmark tool (repeatable; never by default)")
    ap.add_argument("--targets", default=os.environ.get("LLAMABIND_NATIVE_TARGETS", ""),
                    help="comma-separated subset of " + ",".join(BINARIES) + " (default: "
                         "$LLAMABIND_NATIVE_TARGETS, else all)")
    ap.add_argument("--force", action="store_true", help="configure and build even if current")
    ap.add_argument("--quiet", action="store_true",
                    help="show the build's output only when it fails")
    args = ap.parse_args(argv)
    try:
        defines = {}
        for item in args.define:
            name, sep, value = item.partition("=")
            if not sep or not _DEFINE_NAME.match(name):
                raise BuildError(f"--define expects NAME=VALUE, got {item!r}")
            defines[name] = value
        targets = tuple(t.strip() for t in args.targets.split(",") if t.strip()) or BINARIES
        targets = tuple(dict.fromkeys((*targets, *args.target)))
        known = (*BINARIES, *EXTRA_TARGETS)
        unknown = sorted(set(targets) - set(known))
        if unknown:
            raise BuildError(f"unknown target {unknown[0]!r} (known: {', '.join(known)})")
        if any(t in EXTRA_TARGETS for t in targets) and not has_all_parts(VENDOR_DIR) \
                and not args.print_dir:
            fetch_source()  # a tree unpacked before the extra tools' sources were kept
        config_path = (args.config or find_build_config()).resolve()
        plan = Plan(config_path, args.build_dir.resolve(), defines, targets)
        if args.print_dir:
            print(plan.bin_dir)
            return 0 if plan.up_to_date() else 1
        with locked(plan.build_dir):
            built = args.force or not plan.up_to_date()
            seconds = plan.build(max(1, args.jobs), args.quiet) if built else 0.0
    except (BuildError, FetchError) as exc:
        print(f"build_native: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.summary(built, seconds), indent=1))
    else:
        if built:
            print(f"built the native tools in {seconds:.1f} s", file=sys.stderr)
        print(plan.bin_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

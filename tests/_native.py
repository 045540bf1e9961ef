"""The native llama.cpp reference tools for the fidelity tests.

``native_tools()`` builds them (once per run, a no-op when current) with
``scripts/build_native.py`` from the same pinned source and the same options as the
installed llamabind, and ``NativeRef`` runs ``llamabind-ref`` and parses its JSON.
Import the fixture into a test module to use it as ``native``::

    from _native import native_fixture  # noqa: F401
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "scripts" / "build_native.py"

# From scratch the build takes several minutes on two cores.
BUILD_TIMEOUT_S = 3600
RUN_TIMEOUT_S = 600


class NativeBuildError(RuntimeError):
    pass


_BUILD: dict[str, Any] = {}


def native_tools() -> dict[str, Any]:
    """Build (if needed) and describe the native tools: {"bin_dir", "binaries", ...}.
    Runs the build script once per test run; a failure is remembered, not retried."""
    if "error" in _BUILD:
        raise NativeBuildError(_BUILD["error"])
    if "info" not in _BUILD:
        try:
            proc = subprocess.run(
                [sys.executable, str(BUILD_SCRIPT), "--json", "--quiet"],
                cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            _BUILD["error"] = f"scripts/build_native.py took more than {BUILD_TIMEOUT_S} s"
            raise NativeBuildError(_BUILD["error"]) from None
        if proc.returncode != 0:
            _BUILD["error"] = (f"scripts/build_native.py failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-6000:]}")
            raise NativeBuildError(_BUILD["error"])
        _BUILD["info"] = json.loads(proc.stdout)
    info: dict[str, Any] = _BUILD["info"]
    return info


def _flag(value: bool) -> str:
    return "1" if value else "0"


class NativeRef:
    """Runs ``llamabind-ref`` (native/llamabind_ref.cpp)."""

    def __init__(self, binary: str) -> None:
        self.binary = binary

    def _run(self, mode: str, model: str, prompt: str, args: list[str]) -> dict[str, Any]:
        with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as fh:
            fh.write(prompt.encode("utf-8"))
            prompt_file = fh.name
        try:
            cmd = [self.binary, mode, "--model", model, "--prompt-file", prompt_file, *args]
            proc = subprocess.run(cmd, capture_output=True, timeout=RUN_TIMEOUT_S, check=False)
        finally:
            Path(prompt_file).unlink(missing_ok=True)
        if proc.returncode != 0:
            raise AssertionError(
                f"llamabind-ref {mode} failed (exit {proc.returncode}): "
                f"{proc.stderr.decode('utf-8', 'replace')[-4000:]}")
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def tokenize(self, model: str, text: str, *, add_special: bool = True,
                 parse_special: bool = False, vocab_only: bool = False) -> list[int]:
        out = self._run("tokenize", model, text, [
            "--add-special", _flag(add_special), "--parse-special", _flag(parse_special),
            "--vocab-only", _flag(vocab_only)])
        tokens: list[int] = out["tokens"]
        return tokens

    def generate(self, model: str, prompt: str, *, n_predict: int, n_ctx: int,
                 n_batch: int, n_ubatch: int, threads: int, add_special: bool = True,
                 parse_special: bool = False, chain: dict[str, Any] | None = None,
                 ) -> dict[str, Any]:
        """Greedy when ``chain`` is None, else penalties -> top_k -> top_p -> temp -> dist
        with ``chain`` = {penalty_last_n, repeat, freq, present, top_k, top_p, temp, seed}."""
        args = ["--n-predict", str(n_predict), "--n-ctx", str(n_ctx),
                "--n-batch", str(n_batch), "--n-ubatch", str(n_ubatch),
                "--threads", str(threads), "--add-special", _flag(add_special),
                "--parse-special", _flag(parse_special)]
        if chain is None:
            args += ["--sampler", "greedy"]
        else:
            args += ["--sampler", "chain",
                     "--penalty-last-n", str(chain["penalty_last_n"]),
                     "--repeat", repr(float(chain["repeat"])),
                     "--freq", repr(float(chain["freq"])),
                     "--present", repr(float(chain["present"])),
                     "--top-k", str(chain["top_k"]),
                     "--top-p", repr(float(chain["top_p"])),
                     "--temp", repr(float(chain["temp"])),
                     "--seed", str(chain["seed"])]
        return self._run("generate", model, prompt, args)

    def embed(self, model: str, prompt: str, *, n_ctx: int, n_batch: int, n_ubatch: int,
              threads: int, add_special: bool = True) -> dict[str, Any]:
        return self._run("embed", model, prompt, [
            "--n-ctx", str(n_ctx), "--n-batch", str(n_batch), "--n-ubatch", str(n_ubatch),
            "--threads", str(threads), "--add-special", _flag(add_special)])


    def replay(self, model: str, record: list[Any],
               context: dict[str, Any]) -> dict[int, list[int]]:
        """Replay a schedule recorded by the batching engine (``record_schedule``):
        returns each choice's picked tokens, by its id. ``context``: the engine's
        ``context_params()``. Only greedy and default-chain seeded sampling can be
        replayed (what the native program builds)."""
        lines = [f"context {context['n_ctx']} {context['n_seq_max']} {context['n_batch']} "
                 f"{context['n_ubatch']} {int(context['kv_unified'])} {context['n_threads']}"]
        for op in record:
            if "rows" in op:
                lines.append(f"step {len(op['rows'])}")
                for seqs, pos, token, kind in op["rows"]:
                    lines.append(f"row {pos} {token} {kind} {len(seqs)} "
                                 + " ".join(str(x) for x in seqs))
                lines.append(f"picks {len(op['picks'])}")
                lines += [f"pick {row} {seq}" for row, seq in op["picks"]]
            elif op["op"] == "admit":
                s = op["sampling"]
                default = type(s)()
                for name in ("repeat_penalty", "frequency_penalty", "presence_penalty",
                             "logit_bias", "grammar", "typical_p", "top_n_sigma",
                             "xtc_probability", "dynatemp_range", "dry_multiplier",
                             "mirostat", "min_keep"):
                    assert getattr(s, name) == getattr(default, name), f"cannot replay {name}"
                if s.temperature == 0:
                    kind = "greedy-no-eog" if s.ignore_eos else "greedy"
                    lines.append(f"admit {op['rid']} {op['seq']} {kind}")
                else:
                    assert not s.ignore_eos, "cannot replay ignore_eos with sampling"
                    assert s.seed is not None, "a random seed cannot be replayed"
                    seed = (s.seed + op["choice"]) % 0xFFFFFFFF
                    lines.append(f"admit {op['rid']} {op['seq']} chain {s.top_k} "
                                 f"{s.top_p!r} {s.min_p!r} {s.temperature!r} {seed}")
            elif op["op"] == "bind":
                lines.append(f"bind {op['rid']} {op['seq']}")
            elif op["op"] == "rm":
                lines.append(f"rm {op['seq']} {op['p0']} {op['p1']}")
            elif op["op"] == "cp":
                lines.append(f"cp {op['src']} {op['dst']}")
            else:
                raise AssertionError(f"cannot replay {op['op']!r} (disable the prompt cache)")
        out = self._run("replay", model, "\n".join(lines) + "\n", [])
        return {int(k): v for k, v in out["choices"].items()}


@pytest.fixture(scope="session", name="native")
def native_fixture() -> NativeRef:
    """The native reference program, built from the pinned source with llamabind's
    own build options. A build failure fails the tests that need it."""
    try:
        info = native_tools()
    except NativeBuildError as exc:
        pytest.fail(f"could not build the native reference tools: {exc}", pytrace=False)
    return NativeRef(info["binaries"]["llamabind-ref"])

"""The ``llamabind`` command (``python -m llamabind``), run as users run it: a child
process with its output in pipes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import llamabind

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llamabind", *args], input=stdin,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.model
def test_run_json_matches_generate(smol_path: str, loaded_smol: llamabind.LoadedModel) -> None:
    proc = _cli("run", PROMPT, "-m", smol_path, "-n", "12", "--temp", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    ref = loaded_smol.generate(PROMPT, temperature=0, max_tokens=12)
    assert (out["text"], out["prompt_tokens"], out["completion_tokens"], out["finish_reason"]) \
        == (ref.text, ref.prompt_tokens, ref.completion_tokens, ref.finish_reason)
    assert out["completion_tokens"] > 0 and out["tokens_per_second"] > 0
    # a pipe gets no progress bar, and llama.cpp's logs go to `logging`, not stderr
    assert proc.stderr == ""


@pytest.mark.model
def test_run_streams_the_same_text(smol_path: str, loaded_smol: llamabind.LoadedModel) -> None:
    proc = _cli("run", PROMPT, "-m", smol_path, "-n", "12", "--temp", "0")
    assert proc.returncode == 0, proc.stderr
    ref = loaded_smol.generate(PROMPT, temperature=0, max_tokens=12)
    assert proc.stdout == ref.text + "\n"
    assert proc.stderr == ""


@pytest.mark.model
def test_run_reads_the_prompt_from_stdin(smol_path: str,
                                         loaded_smol: llamabind.LoadedModel) -> None:
    proc = _cli("run", "-m", smol_path, "-n", "6", "--temp", "0", "--json", stdin=PROMPT)
    assert proc.returncode == 0, proc.stderr
    ref = loaded_smol.generate(PROMPT, temperature=0, max_tokens=6)
    assert json.loads(proc.stdout)["text"] == ref.text


@pytest.mark.model
def test_chat_keeps_history_over_stdin_lines(smol_path: str) -> None:
    proc = _cli("chat", "-m", smol_path, "-n", "16", "--temp", "0", "--system", "Be brief.",
                stdin="Hi!\n\nWhat is the capital of France?\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # not a terminal: no "> " prompts
    assert "Paris" in proc.stdout
    # the empty line is skipped: two answers, each ended by a newline
    assert proc.stdout.endswith("\n") and proc.stdout.strip()


@pytest.mark.model
def test_info_json_reports_the_build_and_the_model(smol_path: str) -> None:
    proc = _cli("info", "-m", smol_path, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    pin = json.loads((ROOT / "vendor" / "llama-cpp-pin.json").read_text())
    build = info["build"]
    assert build == json.loads(json.dumps(llamabind.build_info(), default=str))
    assert str(pin["llama_cpp_commit"]).startswith(build["llama_cpp_commit"])
    assert "CPU" in build["backends"]
    assert any(d["type"] == "cpu" and d["memory_total"] > 0 for d in build["devices"])
    model = info["model"]
    assert (model["path"], model["n_vocab"], model["has_chat_template"]) \
        == (smol_path, 49152, True)


@pytest.mark.model
def test_nothing_reaches_stderr_when_llama_cpp_warns(qwen_path: str) -> None:
    """Loading the Qwen model makes llama.cpp log a warning (a control-looking token);
    it goes to the "llamabind" logger, and a program that configured no logging
    prints nothing (logging's last-resort handler must not take it)."""
    proc = _cli("info", "-m", qwen_path, "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    code = ("import logging, llamabind\n"
            "logging.basicConfig(level=logging.WARNING)\n"
            f"llamabind.Model({qwen_path!r}).close()\n")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert "WARNING:llamabind:" in shown.stderr, shown.stderr


@pytest.mark.model
def test_a_grammar_that_does_not_parse_prints_nothing(smol_path: str) -> None:
    """llama.cpp prints a grammar parse error (and the whole grammar) to stderr itself;
    llamabind's copy of the source logs it instead (vendor/llama-cpp-patches.json), and
    the GrammarError says what the parser expected."""
    code = ("import llamabind\n"
            f"m = llamabind.LoadedModel.load({smol_path!r}, n_gpu_layers=0)\n"
            "try:\n"
            "    m.generate('x', grammar='root ::= (\\n  \"a\"', max_tokens=2)\n"
            "except llamabind.GrammarError as exc:\n"
            "    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "invalid grammar" in proc.stdout and "expecting ')'" in proc.stdout, proc.stdout


def test_info_text_names_backends_and_devices() -> None:
    proc = _cli("info", "--build-only")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("llamabind ")
    assert "backends: " in proc.stdout and "device 0: " in proc.stdout


@pytest.mark.parametrize("args, names", [
    (["-m", "/nonexistent/model.gguf"], ["/nonexistent/model.gguf", "not found"]),
    (["--temp", "-1"], ["temperature", "-1"]),
    (["-n", "-5"], ["max_tokens", "-5"]),
])
def test_bad_input_is_one_line_on_stderr(smol_path: str, args: list[str],
                                        names: list[str]) -> None:
    if "-m" not in args:
        args = [*args, "-m", smol_path]
    proc = _cli("run", PROMPT, *args)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert proc.stderr.startswith("llamabind: ") and "Traceback" not in proc.stderr
    for name in names:
        assert name in proc.stderr, proc.stderr

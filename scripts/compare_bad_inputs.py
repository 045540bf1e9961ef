#!/usr/bin/env python3
"""The same bad inputs thrown at llamabind and at llama-cpp-python, side by side.

    python scripts/compare_bad_inputs.py [--peer-python PATH] [--json OUT]

Every case runs in a fresh interpreter of its own (a crash or a hang of one case is
recorded, not suffered), with llamabind from the interpreter running this script and
llama-cpp-python from ``--peer-python`` (default: build/venv-llama-cpp-python, where
BENCHMARKS.md says how to build it; without it only llamabind's column is filled).
Each outcome is one of:

* ``error``: the call raised; the exception's type and message are shown;
* ``accepted``: the call returned; what it returned is shown (for a value that is out
  of its domain, this is the silent acceptance issue 7 is about);
* ``crash``: the interpreter died of a signal (SIGABRT, SIGSEGV...);
* ``hang``: no answer within the time limit.

The model is the small test model (models/fetch_models.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "gguf" / "SmolLM2-135M-Instruct-Q4_1.gguf"
PEER_VENV = ROOT / "build" / "venv-llama-cpp-python"
TIMEOUT = 120.0

# Run in the child before a case: ``M`` is the model, ``D`` a scratch directory,
# ``report`` prints the outcome as the last line of stdout.
PRELUDE = r'''
import json, os, sys
M, D = sys.argv[1], sys.argv[2]
def report(kind, text):
    sys.stdout.write("\n@@" + json.dumps({"kind": kind, "text": text[:300]}) + "\n")
    sys.stdout.flush()
def run(fn):
    try:
        value = fn()
    except BaseException as exc:
        report("error", type(exc).__name__ + ": " + str(exc))
    else:
        report("accepted", repr(value))
def truncated():
    p = os.path.join(D, "truncated.gguf")
    with open(M, "rb") as src, open(p, "wb") as dst:
        dst.write(src.read(1 << 20))
    return p
def empty():
    p = os.path.join(D, "empty.gguf")
    open(p, "wb").close()
    return p
'''

LLAMABIND = PRELUDE + r'''
import llamabind as lb
def model(**kw):
    return lb.LoadedModel.load(M, n_gpu_layers=0, **kw)
def gen(prompt="The sky is", **kw):
    kw.setdefault("max_tokens", 4)
    return model().generate(prompt, **kw).text
'''

PEER = PRELUDE + r'''
from llama_cpp import Llama, LlamaGrammar
def model(**kw):
    kw.setdefault("n_ctx", 512)
    return Llama(M, n_gpu_layers=0, verbose=False, **kw)
def gen(prompt="The sky is", **kw):
    kw.setdefault("max_tokens", 4)
    return model().create_completion(prompt, **kw)["choices"][0]["text"]
'''

LONG = "'word ' * 300"

# name -> (llamabind call, llama-cpp-python call); each is an expression run by run().
CASES: dict[str, tuple[str, str]] = {
    "missing model file": ("lb.LoadedModel.load(os.path.join(D, 'no.gguf'))",
                           "Llama(os.path.join(D, 'no.gguf'), verbose=False)"),
    "model path is a directory": ("lb.LoadedModel.load(D)", "Llama(D, verbose=False)"),
    "empty model file": ("lb.LoadedModel.load(empty())", "Llama(empty(), verbose=False)"),
    "model file truncated at 1 MiB": ("lb.LoadedModel.load(truncated())",
                                      "Llama(truncated(), verbose=False)"),
    "detokenize([10**6])": ("model().detokenize([10**6])", "model().detokenize([10**6])"),
    "detokenize([-5])": ("model().detokenize([-5])", "model().detokenize([-5])"),
    "tokenize text with NUL": ("model().tokenize('a\\x00b')",
                               "model().tokenize(b'a\\x00b')"),
    "prompt with a lone surrogate": ("gen('sky \\ud800')", "gen('sky \\ud800')"),
    "top_k=-3": ("gen(top_k=-3)", "gen(top_k=-3)"),
    "temperature=-1": ("gen(temperature=-1)", "gen(temperature=-1)"),
    "top_p=2.0": ("gen(top_p=2.0)", "gen(top_p=2.0)"),
    "min_p=-0.5": ("gen(min_p=-0.5)", "gen(min_p=-0.5)"),
    "repeat_penalty=-1": ("gen(repeat_penalty=-1)", "gen(repeat_penalty=-1)"),
    "max_tokens=-7": ("gen(max_tokens=-7)", "gen(max_tokens=-7)"),
    "stop=5 (not a string or list)": ("gen(stop=5)", "gen(stop=5)"),
    "threads=-7": ("model(context=lb.ContextConfig(n_threads=-7)).generate('Hi', max_tokens=2)"
                   ".text", "model(n_threads=-7).create_completion('Hi', max_tokens=2)"
                   "['choices'][0]['text']"),
    "n_ctx=1": ("model(n_ctx=1).generate('Hi', max_tokens=2).text",
                "model(n_ctx=1).create_completion('Hi', max_tokens=2)['choices'][0]['text']"),
    "prompt longer than n_ctx=64": (f"model(n_ctx=64).generate({LONG}, max_tokens=2).text",
                                    f"model(n_ctx=64).create_completion({LONG}, max_tokens=2)"
                                    "['choices'][0]['text']"),
    "unparsable grammar 'root ::= ('": ("gen(grammar='root ::= (')",
                                         "LlamaGrammar.from_string('root ::= (', "
                                         "verbose=False)"),
    "chat message without role": ("model().chat([{'content': 'hi'}], max_tokens=2).text",
                                  "model().create_chat_completion([{'content': 'hi'}], "
                                  "max_tokens=2)['choices'][0]['message']"),
}


def run_case(python: str, body: str, expr: str, scratch: str) -> dict[str, str]:
    code = body + f"\nrun(lambda: {expr})\n"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    try:
        proc = subprocess.run([python, "-c", code, str(MODEL), scratch], capture_output=True,
                              text=True, timeout=TIMEOUT, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"kind": "hang", "text": f"no answer in {TIMEOUT:.0f} s"}
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or [""]
        return {"kind": "crash", "text": f"{name}: {last[0][:200]}"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@"):
            found: dict[str, str] = json.loads(line[2:])
            return found
    tail = (proc.stderr.strip().splitlines() or ["(nothing)"])[-1]
    return {"kind": "error", "text": f"exit status {proc.returncode}: {tail[:200]}"}


def peer_python(given: str | None) -> str | None:
    python = given or str(PEER_VENV / "bin" / "python")
    if not Path(python).exists():
        return None
    probe = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                           capture_output=True, text=True, check=False)
    return python if probe.returncode == 0 else None


def cell(outcome: dict[str, str] | None) -> str:
    if outcome is None:
        return "(not installed)"
    text = outcome["text"].replace("|", "\\|").replace("\n", " ")
    if len(text) > 110:
        text = text[:107] + "..."
    return f"**{outcome['kind']}**: {text}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer-python", help="an interpreter with llama_cpp installed")
    ap.add_argument("--json", type=Path, help="also write the outcomes here")
    a = ap.parse_args()
    if not MODEL.exists():
        print(f"no test model at {MODEL}: run models/fetch_models.py", file=sys.stderr)
        return 2
    peer = peer_python(a.peer_python)
    results: dict[str, dict[str, dict[str, str] | None]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, (ours, theirs) in CASES.items():
            ours_got = run_case(sys.executable, LLAMABIND, ours, scratch)
            theirs_got = run_case(peer, PEER, theirs, scratch) if peer else None
            results[name] = {"llamabind": ours_got, "llama-cpp-python": theirs_got}
            print(f"{name}: llamabind {ours_got['kind']}, llama-cpp-python "
                  f"{theirs_got['kind'] if theirs_got else '-'}", file=sys.stderr)
    print("| input | llamabind | llama-cpp-python |")
    print("|---|---|---|")
    for name, got in results.items():
        print(f"| {name} | {cell(got['llamabind'])} | {cell(got['llama-cpp-python'])} |")
    counts: dict[str, dict[str, int]] = {impl: {} for impl in ("llamabind", "llama-cpp-python")}
    for got in results.values():
        for impl, outcome in got.items():
            if outcome is not None:
                counts[impl][outcome["kind"]] = counts[impl].get(outcome["kind"], 0) + 1
    print()
    for impl, by_kind in counts.items():
        if by_kind:
            print(f"{impl}: " + ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items())))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

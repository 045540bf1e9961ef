"""Load model files one after another: ``python -m children.loader JOBS.json SECONDS``.

Each job is ``{"id", "path", "vocab_only", "exercise"}``. Per job the child reports
"start", then "ok" or "error" (with the phase: "load" or "use"); a per-job watchdog
(faulthandler) ends a job that hangs with exit code 1 and "Timeout" in the output.
"""

from __future__ import annotations

import faulthandler
import json
import sys
from typing import Any

import llamabind
from children.channel import exc_fields, report, run_to_end


def exercise(model: llamabind.Model, vocab_only: bool) -> str:
    """After a successful load: use the vocabulary, and (full models) run one tiny
    decode. Returns a note on what was left out."""
    vocab = model.vocab
    n_vocab = model.n_vocab
    note = ""
    if vocab.type == "none":
        # no tokenizer: llamabind must refuse (llama.cpp would abort), then decode ids
        try:
            vocab.tokenize("Hello")
        except llamabind.TokenizationError:
            note = "vocab type none: tokenize refused"
        else:
            raise AssertionError("tokenize with a vocabulary of type none did not raise")
        toks = [0, 1, 2, 3]
    else:
        toks = vocab.tokenize("Hello world, 123! <s> \u00e9\u4e2d", add_special=True,
                              parse_special=True)
        vocab.detokenize(toks)
        for t in [*toks[:4], 0, n_vocab - 1]:
            if 0 <= t < n_vocab:
                vocab.token_to_piece(t, special=True)
    if vocab_only:
        return note
    ctx = llamabind.Context(model, n_ctx=64, n_batch=16, n_ubatch=16, n_threads=1)
    try:
        ctx.eval([t for t in toks if 0 <= t < n_vocab][:4] or [0])
        ctx.logits()
    finally:
        ctx.close()
    return note


def run(job: dict[str, Any], per_job: float) -> None:
    report(event="start", id=job["id"])
    faulthandler.dump_traceback_later(per_job, exit=True)
    phase = "load"
    try:
        model = llamabind.Model(job["path"], vocab_only=job.get("vocab_only", False))
        try:
            info = {"n_vocab": model.n_vocab, "note": ""}
            if job.get("exercise"):
                phase = "use"
                info["note"] = exercise(model, job.get("vocab_only", False))
        finally:
            model.close()
    except BaseException as exc:
        faulthandler.cancel_dump_traceback_later()
        report(event="error", id=job["id"], phase=phase, **exc_fields(exc))
    else:
        faulthandler.cancel_dump_traceback_later()
        report(event="ok", id=job["id"], **info)


def main() -> None:
    with open(sys.argv[1]) as fh:
        jobs = json.load(fh)
    for job in jobs:
        run(job, float(sys.argv[2]))


run_to_end(main)

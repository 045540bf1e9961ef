#!/usr/bin/env python3
"""How often does batched greedy output equal the output of decoding alone?

    python benchmarks/engine_equality.py                 # both models, 48 prompts, 64 tokens
    python benchmarks/engine_equality.py --models smol --tokens 32

Each prompt is generated greedily twice: alone, in a session of its own (a context with
one sequence, as before the engine), and batched, all prompts submitted at once to the
engine (``generate_many``: up to 16 sequences per decode). Batching changes the order
of floating-point sums, so a greedy choice can flip where the two best logits are
nearly equal; after that the texts part. Printed, per model: how many prompts give the
same tokens, and for the others the first differing position and the gap between the
two best log-probabilities there (in the run decoded alone). The engine's own
correctness is checked elsewhere, token for token, by replaying its schedule in native
llama.cpp (tests/test_fidelity.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "smol": ROOT / "models" / "gguf" / "SmolLM2-135M-Instruct-Q4_1.gguf",
    "qwen": ROOT / "models" / "gguf" / "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
}
SUBJECTS = ["the ocean", "a lighthouse", "bread", "volcanoes", "a chess opening", "autumn",
            "the moon", "railways", "honey bees", "a violin", "glaciers", "paper money"]
FORMS = ["Write two sentences about {}.", "Explain {} to a child.",
         "List three facts about {}.", "Write a short poem about {}."]


def prompts(n: int) -> list[list[dict[str, str]]]:
    out = []
    for i in range(n):
        form = FORMS[i % len(FORMS)]
        subject = SUBJECTS[(i // len(FORMS) + i) % len(SUBJECTS)]
        out.append([{"role": "user", "content": form.format(subject)}])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smol,qwen")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    import llamabind

    rows = []
    for name in args.models.split(","):
        chats = prompts(args.prompts)
        opts = {"temperature": 0.0, "max_tokens": args.tokens}
        with llamabind.LoadedModel.load(MODELS[name]) as model:
            texts = [model.chat_prompt_tokens(c) for c in chats]
            alone = []
            with model.create_session() as session:
                for t in texts:
                    alone.append(session.generate(t, logprobs=2, **opts))
            batched = model.generate_many(texts, **opts)
        same = 0
        parted = []
        for a, b in zip(alone, batched, strict=True):
            ta, tb = list(a.tokens), list(b.tokens)
            if ta == tb:
                same += 1
                continue
            i = next((k for k, (x, y) in enumerate(zip(ta, tb, strict=False)) if x != y),
                     min(len(ta), len(tb)))
            gap = None
            if i < len(a.logprobs or []):
                top = a.logprobs[i].top
                if len(top) >= 2:
                    gap = top[0][2] - top[1][2]
            parted.append({"at": i, "gap": gap})
        row = {"model": name, "prompts": len(texts), "tokens": args.tokens, "same": same,
               "parted": parted}
        rows.append(row)
        gaps = [p["gap"] for p in parted if p["gap"] is not None]
        print(f"{name}: {same}/{len(texts)} prompts give the same {args.tokens} greedy tokens "
              f"batched as alone"
              + (f"; the others part at token {[p['at'] for p in parted]}, top-2 "
                 f"log-probability gap there median {statistics.median(gaps):.3f}, max "
                 f"{max(gaps):.3f}" if gaps else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

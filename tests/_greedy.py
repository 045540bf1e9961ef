"""Greedy decoding with each step's logits, to compare one backend with another.

The Vulkan and GPU tests run it in-process on their device; the CPU build's own
interpreter runs it as a script to give them the CPU build's reference:

    python tests/_greedy.py MODEL_KEY OUT.npz     # MODEL_KEY: smollm2 or qwen2.5-0.5b

Each step decodes one token, the way generation does (the prompt is one batch), so the
device runs the same kernels as in a real generation.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

import llamabind

PROMPTS = {
    "smollm2": "The capital of France is",
    "qwen2.5-0.5b": "def is_prime(n: int) -> bool:\n",
}
N_TOKENS = 24
N_CTX = 256


class Trace(NamedTuple):
    tokens: np.ndarray   # int32 [N]: the token taken at each step
    logits: np.ndarray   # float32 [N, n_vocab]: the logits that step chose from


def decode(model: llamabind.Model, prompt: str, forced: np.ndarray | None = None,
           n_tokens: int = N_TOKENS) -> Trace:
    """Greedy decoding after ``prompt``; with ``forced``, those tokens are fed instead
    of the argmax (teacher forcing), so every step is compared at the same context."""
    steps = n_tokens if forced is None else len(forced)
    tokens = np.empty(steps, dtype=np.int32)
    logits = np.empty((steps, model.vocab.n_tokens), dtype=np.float32)
    with llamabind.Context(model, n_ctx=N_CTX, n_threads=2) as ctx:
        ctx.eval(model.vocab.tokenize(prompt))
        for i in range(steps):
            logits[i] = ctx.logits(-1)
            tokens[i] = int(logits[i].argmax()) if forced is None else int(forced[i])
            if i + 1 < steps:
                ctx.eval([int(tokens[i])])
    return Trace(tokens, logits)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in PROMPTS:
        print(f"usage: _greedy.py {{{','.join(PROMPTS)}}} OUT.npz", file=sys.stderr)
        return 2
    key, out = argv
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
    import fetch_models

    # devices=[]: the CPU even in a build that has a GPU backend
    with llamabind.Model(str(fetch_models.fetch(key)), n_gpu_layers=0, devices=[]) as model:
        trace = decode(model, PROMPTS[key])
    info = llamabind.build_info()
    np.savez(out, tokens=trace.tokens, logits=trace.logits,
             backends=np.array(sorted(info["backends"])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The batching engine's bookkeeping of KV cells: the sequence slots, the prompt
tokens still to decode into them, and the prompt cache in RAM that slots give cells up
to (see :mod:`llamabind.engine`)."""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

import numpy as np

from llamabind import _llama

if TYPE_CHECKING:
    from llamabind.requests import Request

__all__ = ["PrefillJob", "PromptCache", "Slot", "cells_held", "cells_needed"]


class Slot:
    """One sequence of the engine's context and the tokens whose KV cells it holds."""

    __slots__ = ("busy", "last_used", "seq_id", "tokens")

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        self.tokens: list[int] = []
        self.busy = False
        self.last_used = 0.0


class PrefillJob:
    """Prompt tokens still to decode into one sequence (and the choices that pick their
    first token from its last row; None when resuming a preempted choice)."""

    __slots__ = ("done", "outputs", "seq_id", "start_pos", "tokens")

    def __init__(self, tokens: np.ndarray, start_pos: int, seq_id: int,
                 outputs: list[_llama.Generation] | None) -> None:
        self.tokens = tokens
        self.start_pos = start_pos
        self.seq_id = seq_id
        self.outputs = outputs
        self.done = 0


class PromptCache:
    """KV cells of token prefixes, kept in RAM (sequence states) up to a byte budget,
    the least recently used dropped first."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.size = 0
        self.entries: collections.OrderedDict[tuple[int, ...], bytes] = \
            collections.OrderedDict()
        self.hits = 0

    def best(self, prompt: list[int]) -> tuple[tuple[int, ...] | None, int]:
        best_key, best_n = None, 0
        for key in self.entries:
            n = _llama.common_prefix(list(key), prompt)
            if n > best_n:
                best_key, best_n = key, n
        return best_key, best_n

    def put(self, tokens: list[int], state: bytes) -> None:
        if self.limit <= 0 or len(state) > self.limit:
            return
        key = tuple(tokens)
        old = self.entries.pop(key, None)
        if old is not None:
            self.size -= len(old)
        # a stored prefix of these tokens is now redundant
        for other in [k for k in self.entries if len(k) < len(key) and key[:len(k)] == k]:
            self.size -= len(self.entries.pop(other))
        self.entries[key] = state
        self.size += len(state)
        while self.size > self.limit and self.entries:
            _, dropped = self.entries.popitem(last=False)
            self.size -= len(dropped)

    def take(self, key: tuple[int, ...]) -> bytes:
        self.entries.move_to_end(key)
        self.hits += 1
        return self.entries[key]

    def clear(self) -> None:
        self.entries.clear()
        self.size = 0


def cells_held(request: Request) -> int:
    """KV cells a running request holds (its choices' cells counted apart)."""
    n = 0
    for job in request.jobs:
        n += job.start_pos + job.done
    for gen, slot in zip(request.gens, request.slots, strict=False):
        if slot is not None and not request.jobs:
            n += gen.pos
    return n


def cells_needed(request: Request) -> int:
    """KV cells a queued request needs to start (or to resume, when preempted)."""
    if request.resume is not None:
        return sum(len(tokens) + 1 for tokens, _ in request.resume)
    return request.prompt_tokens + 1

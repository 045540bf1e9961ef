"""The server's only door to the model's batching engine.

The engine is the LoadedModel itself: the server asks it for everything through its
request-level API (``submit``/``submit_chat``, a request's events, results and
structured-output plan, ``cancel()``, ``stats()``, ``aembed``,
``tokenize``/``detokenize``). ``Engine`` and ``EngineRequest`` name those two classes
for the server's modules; ``load_model`` and ``engine_of`` are where a model comes in.
"""

from __future__ import annotations

from typing import Any

from llamabind.api import LoadedModel as Engine
from llamabind.requests import Request as EngineRequest

__all__ = ["Engine", "EngineRequest", "engine_of", "load_model"]


def load_model(path: str | None, *, n_ctx: int, n_parallel: int, n_threads: int | None,
               n_gpu_layers: int | None, max_queue: int,
               kv_unified: bool | None = None) -> Engine:
    """Load a model for serving: a LoadedModel, whose batching engine serves it.
    ``kv_unified=None``: a KV buffer per slot (as llama-server at ``-np`` > 1), so a
    token's attention spans its own sequence's cells only; one slot: one buffer."""
    if kv_unified is None:
        kv_unified = n_parallel == 1
    return Engine.load(path, n_ctx=n_ctx, n_parallel=n_parallel, n_threads=n_threads,
                       n_gpu_layers=n_gpu_layers, max_queue=max_queue, kv_unified=kv_unified)


def engine_of(model: Any) -> Engine:
    """The engine behind ``model`` (what ``create_app`` was given): the LoadedModel."""
    if isinstance(model, Engine):
        return model
    raise TypeError(f"create_app needs a llamabind.LoadedModel, got {type(model).__name__}")

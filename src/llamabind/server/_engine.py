"""The server's only door to the model's batching engine.

Everything the server asks of the model goes through the protocols below, which are
the engine's request-level API (``LoadedModel.submit``/``submit_chat``, request events,
results and structured-output plan (events and results are the library's own
``Event``/``GenerationResult``), ``cancel()``, ``stats()``, ``aembed``,
``tokenize``/``detokenize``). ``load_model`` and ``engine_of`` are the two places that
name a concrete class.

The engine is the LoadedModel itself: these protocols name what the server uses of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from llamabind.api import GenerationResult
    from llamabind.results import Event
    from llamabind.structured import GenerationPlan

__all__ = ["Engine", "EngineRequest", "engine_of", "load_model"]


class EngineRequest(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def n(self) -> int: ...
    @property
    def done(self) -> bool: ...
    @property
    def plan(self) -> GenerationPlan | None: ...
    def cancel(self) -> None: ...
    def __aiter__(self) -> AsyncIterator[Event]: ...
    def result(self, timeout: float | None = None) -> list[GenerationResult]: ...
    async def aresult(self) -> list[GenerationResult]: ...


class Engine(Protocol):
    @property
    def n_ctx(self) -> int: ...
    @property
    def n_parallel(self) -> int: ...
    def submit(self, prompt: str | Sequence[int], *, n: int = 1, logprobs: int | None = None,
               queue_timeout: float | None = None, **options: Any) -> EngineRequest: ...
    def submit_chat(self, messages: Sequence[Any], *, n: int = 1,
                    logprobs: int | None = None, queue_timeout: float | None = None,
                    **options: Any) -> EngineRequest: ...
    def stats(self) -> dict[str, int]: ...
    async def aembed(self, texts: str | Sequence[str], **options: Any) -> np.ndarray: ...
    def tokenize(self, text: str, *, add_special: bool = True,
                 parse_special: bool = False) -> list[int]: ...
    def detokenize(self, tokens: Sequence[int]) -> str: ...
    def close(self) -> None: ...


def load_model(path: str | None, *, n_ctx: int, n_parallel: int, n_threads: int | None,
               n_gpu_layers: int | None, max_queue: int) -> Engine:
    """Load a model for serving: a LoadedModel, whose batching engine serves it."""
    from llamabind.api import LoadedModel

    return LoadedModel.load(path, n_ctx=n_ctx, n_parallel=n_parallel, n_threads=n_threads,
                            n_gpu_layers=n_gpu_layers, max_queue=max_queue)


def engine_of(model: Any) -> Engine:
    """The engine behind ``model`` (what ``create_app`` was given): the LoadedModel."""
    from llamabind.api import LoadedModel

    if isinstance(model, LoadedModel):
        return model
    raise TypeError(f"create_app needs a llamabind.LoadedModel, got {type(model).__name__}")

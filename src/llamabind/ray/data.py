"""Offline batch inference on a Ray dataset: one model per actor, a batch of rows
decoded together by the actor's engine.

    import ray, llamabind.ray
    ds = ray.data.from_items([{"prompt": "The capital of France is"}, ...])
    out = llamabind.ray.generate_dataset(ds, "model.gguf", concurrency=2,
                                         temperature=0, max_tokens=64)
    out.take(1)  # [{"prompt": ..., "text": ..., "prompt_tokens": ..., ...}]
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from llamabind.errors import InvalidArgumentError
from llamabind.ray._options import prepare, require

if TYPE_CHECKING:
    import pyarrow as pa
    from ray.data import Dataset

    from llamabind.api import GenerationResult

__all__ = ["OUTPUT_COLUMNS", "generate_dataset"]

# the columns generate_dataset adds to each row
OUTPUT_COLUMNS = ("text", "prompt_tokens", "completion_tokens", "finish_reason")


class _Generator:
    """The callable class map_batches runs in each actor: the model is loaded once, in
    the constructor; each batch's rows are submitted together, so the engine decodes
    them in one batch (``n_parallel`` at a time, the others waiting for a slot)."""

    def __init__(self, path: str, load: dict[str, Any], generation: dict[str, Any],
                 column: str, chat: bool) -> None:
        from llamabind.api import LoadedModel

        self.model = LoadedModel.load(path, **load)
        self.generation = generation
        self.column = column
        self.chat = chat

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        names = batch.column_names
        if self.column not in names:
            raise InvalidArgumentError(
                f"the dataset has no column {self.column!r}; its columns: {names}")
        taken = [name for name in OUTPUT_COLUMNS if name in names]
        if taken:
            raise InvalidArgumentError(
                f"the dataset already has a column {taken[0]!r}, which generate_dataset "
                f"writes ({', '.join(OUTPUT_COLUMNS)}): rename or drop it first")
        rows = batch.column(self.column).to_pylist()
        for i, row in enumerate(rows):
            if row is None:
                raise InvalidArgumentError(f"row {i} of the batch has no {self.column!r} "
                                           "(null)")
        if self.chat:
            results = self._chats([_messages(row) for row in rows])
        else:
            results = self.model.generate_many(rows, **self.generation)
        columns = {
            "text": pa.array([r.text for r in results], pa.string()),
            "prompt_tokens": pa.array([r.prompt_tokens for r in results], pa.int64()),
            "completion_tokens": pa.array([r.completion_tokens for r in results], pa.int64()),
            "finish_reason": pa.array([r.finish_reason for r in results], pa.string()),
        }
        for name, values in columns.items():
            batch = batch.append_column(name, values)
        return batch

    def _chats(self, chats: list[list[dict[str, Any]]]) -> list[GenerationResult]:
        # generate_many's way for chats: all submitted, then all awaited
        requests = []
        try:
            for messages in chats:
                requests.append(self.model.submit_chat(messages, stream=False,
                                                       **self.generation))
            return [request.result()[0] for request in requests]
        except BaseException:
            for request in requests:
                request.cancel()
            raise


def _messages(row: Any) -> Any:
    """A chat as Arrow gives it back: a list of structs, where a key some messages lack
    is null in the others; those nulls are dropped."""
    if isinstance(row, list):
        return [{k: v for k, v in m.items() if v is not None} if isinstance(m, Mapping)
                else m for m in row]
    return row


def generate_dataset(ds: Dataset, model_path: str | os.PathLike[str] | None = None, *,
                     prompt_column: str = "prompt", messages_column: str | None = None,
                     concurrency: int | tuple[int, int] = 1, num_cpus: float = 1.0,
                     num_gpus: float = 0.0, batch_size: int | None = None,
                     **options: Any) -> Dataset:
    """``ds`` with four columns added to each row: ``text``, ``prompt_tokens``,
    ``completion_tokens``, ``finish_reason`` (lazy, as Ray datasets are: it runs when
    the result is consumed).

    Each row's prompt is its ``prompt_column`` (a str, or a list of token ids); with
    ``messages_column``, each row's chat instead (a list of ``{"role", "content"}``
    messages, rendered with the model's template). ``concurrency`` actors (or a
    ``(min, max)`` range to scale between) each load ``model_path`` once and reserve
    ``num_cpus`` CPUs and ``num_gpus`` GPUs; each gets ``batch_size`` rows at a time
    (default 4 x ``n_parallel``), submitted together to its engine.

    ``options``: how to load the model (ModelConfig, ContextConfig, EngineConfig
    fields: ``n_ctx``, ``n_parallel``; ``n_threads`` defaults to ``num_cpus``) and how
    to generate (SamplingConfig, GenerationConfig fields and the structured-output
    options: ``temperature``, ``max_tokens``, ``stop``, ``json_schema``...), the same
    for every row. A bad option is refused here, before anything runs.
    """
    data = require("ray.data")
    run = prepare(model_path, options, num_cpus, num_gpus)
    for label, value in (("prompt_column", prompt_column), ("messages_column", messages_column)):
        if (value is not None or label == "prompt_column") and (
                not isinstance(value, str) or not value):
            raise InvalidArgumentError(f"{label} must be a non-empty str, got {value!r}")
    column = prompt_column if messages_column is None else messages_column
    if column in OUTPUT_COLUMNS:
        raise InvalidArgumentError(f"the input column {column!r} is one that "
                                   "generate_dataset writes")
    _check_concurrency(concurrency)
    if batch_size is None:
        batch_size = 4 * run.n_parallel
    elif isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be an int >= 1, got {batch_size!r}")
    out: Dataset = ds.map_batches(
        _Generator,
        fn_constructor_kwargs={"path": run.path, "load": run.load,
                               "generation": run.generation, "column": column,
                               "chat": messages_column is not None},
        batch_size=batch_size, batch_format="pyarrow", compute=_actor_pool(data, concurrency),
        num_cpus=run.resources.num_cpus, num_gpus=run.resources.num_gpus or None)
    return out


def _actor_pool(data: Any, concurrency: int | tuple[int, int]) -> Any:
    if isinstance(concurrency, tuple):
        return data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
    return data.ActorPoolStrategy(size=concurrency)


def _check_concurrency(value: Any) -> None:
    def ok(n: Any) -> bool:
        return not isinstance(n, bool) and isinstance(n, int) and n >= 1

    if ok(value) or (isinstance(value, tuple) and len(value) == 2 and all(map(ok, value))
                     and value[0] <= value[1]):
        return
    raise InvalidArgumentError(
        f"concurrency must be an int >= 1 or a (min, max) tuple of them, got {value!r}")

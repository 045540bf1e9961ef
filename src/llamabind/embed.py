"""Embeddings of many texts, batched: each text is a sequence of its own in one
decode, as llama.cpp's ``llama-embedding`` does, on a context kept per pooling type."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from llamabind import _llama
from llamabind.errors import ContextLengthExceededError, InvalidArgumentError

if TYPE_CHECKING:
    from llamabind.api import LoadedModel

__all__ = ["embed_texts"]

_POOLINGS = ("mean", "cls", "last")
# sequences one embedding decode holds at most
_MAX_SEQ = 64


class _Embedder:
    """A context with embeddings on and one pooling type, used by one thread at once."""

    def __init__(self, model: LoadedModel, pooling: str | None) -> None:
        n_ctx = model.n_ctx
        self.ctx = _llama.Context(
            model.native, model.context_config.with_(
                n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_seq_max=min(_MAX_SEQ, n_ctx),
                embeddings=True, pooling=pooling, kv_unified=True))
        self.lock = threading.Lock()
        self.n_batch = n_ctx
        self.n_seq = min(_MAX_SEQ, n_ctx)
        self.encoder = bool(model.native.has_encoder and not model.native.has_decoder)


def _embedder(model: LoadedModel, pooling: str | None) -> _Embedder:
    with model._embed_lock:
        model._check_open()
        found = model._embedders.get(pooling)
        if found is None:
            found = _Embedder(model, pooling)
            if found.ctx.pooling == "none" and pooling is None:
                # the model names no pooling of its own: mean, as most embedders use
                found.ctx.close()
                found = model._embedders.get("mean") or _Embedder(model, "mean")
                model._embedders["mean"] = found
            model._embedders[pooling] = found
        return found


def embed_texts(model: LoadedModel, texts: str | Sequence[str], *, pooling: str | None,
                normalize: bool, truncate: bool) -> npt.NDArray[np.float32]:
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
        raise InvalidArgumentError(
            f"texts must be a str or a list of str, got {type(texts).__name__}")
    if pooling is not None and pooling not in _POOLINGS:
        raise InvalidArgumentError(
            f"pooling must be None or one of {', '.join(map(repr, _POOLINGS))}, got {pooling!r}")
    if normalize is not True and normalize is not False:
        raise InvalidArgumentError(f"normalize must be a bool, got {normalize!r}")
    if truncate is not True and truncate is not False:
        raise InvalidArgumentError(f"truncate must be a bool, got {truncate!r}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidArgumentError(f"texts[{i}] must be a str, got {type(t).__name__}")
    emb = _embedder(model, pooling)
    token_lists: list[Any] = []
    for i, t in enumerate(texts):
        tokens = model.vocab.tokenize(t, add_special=True, parse_special=False)
        if len(tokens) == 0:
            raise InvalidArgumentError(f"texts[{i}] is empty (it produced no tokens)")
        if len(tokens) > emb.n_batch:
            if not truncate:
                raise ContextLengthExceededError(
                    f"texts[{i}] has {len(tokens)} tokens, more than the context's "
                    f"{emb.n_batch} (pass truncate=True to cut it)", len(tokens), emb.n_batch)
            tokens = tokens[:emb.n_batch]
        token_lists.append(tokens)
    d = int(model.native.n_embd_out)
    out = np.empty((len(token_lists), d), dtype=np.float32)
    with emb.lock:
        ctx = emb.ctx
        batch = _llama.Batch(emb.n_batch, 1)
        try:
            start = 0
            while start < len(token_lists):
                batch.clear()
                end = start
                while (end < len(token_lists) and end - start < emb.n_seq
                       and len(batch) + len(token_lists[end]) <= emb.n_batch):
                    batch.add_sequence(token_lists[end], seq_id=end - start)
                    end += 1
                ctx.memory_clear(False)
                if emb.encoder:
                    ctx.encode(batch)
                else:
                    ctx.decode(batch)
                for k in range(start, end):
                    out[k] = ctx.sequence_embeddings(k - start)
                start = end
        finally:
            batch.close()
            ctx.memory_clear(False)
    if normalize:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
    return out

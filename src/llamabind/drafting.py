"""Speculative decoding's drafters: the checks a request's options must pass, and the
drafters an engine keeps for its requests (prompt lookup by n-gram sizes, and one
context of the draft model with a sequence per slot)."""

from __future__ import annotations

from llamabind import _llama
from llamabind.config import ContextConfig, GenerationConfig
from llamabind.errors import InvalidArgumentError

__all__ = ["Drafters", "check_speculative", "ngram_drafter"]


def check_speculative(native: _llama.Model, draft: _llama.Model | None,
                      g: GenerationConfig) -> None:
    """Refuse speculative options this model cannot follow."""
    if g.spec_type == "draft-simple" and draft is None:
        raise InvalidArgumentError(
            "spec_type='draft-simple' needs a draft model: "
            "LoadedModel.load(path, draft=other_model_or_path)")
    if native.is_recurrent or native.is_hybrid:
        raise InvalidArgumentError(
            f"spec_type={g.spec_type!r}: speculative decoding needs a model whose KV "
            f"cells can be removed from the end of a sequence; {native.path!r} is a "
            "recurrent model")


def ngram_drafter(g: GenerationConfig) -> _llama.NgramDrafter:
    return _llama.NgramDrafter(g.spec_ngram_size_n, g.spec_ngram_size_min)


class Drafters:
    """An engine's drafters, made on first use: prompt lookup per n-gram sizes, and
    one context of the draft model (``context`` gives its size, sequences and batch)."""

    def __init__(self, native: _llama.Model, draft: _llama.Model | None,
                 context: ContextConfig) -> None:
        self.native = native
        self.draft = draft
        self.context = context
        self._model: _llama.ModelDrafter | None = None
        self._ngram: dict[tuple[int, int], _llama.NgramDrafter] = {}

    def get(self, g: GenerationConfig) -> _llama.Drafter | None:
        """The drafter of a request's options (None: no speculative decoding)."""
        if not g.speculative:
            return None
        if g.spec_type == "ngram-simple":
            key = (g.spec_ngram_size_n, g.spec_ngram_size_min or g.spec_ngram_size_n)
            drafter = self._ngram.get(key)
            if drafter is None:
                drafter = self._ngram[key] = ngram_drafter(g)
            return drafter
        if self._model is None:
            assert self.draft is not None
            c = self.context
            self._model = _llama.ModelDrafter(
                self.native, self.draft, n_ctx=c.n_ctx, n_seq_max=c.n_seq_max,
                n_batch=c.n_batch, n_threads=c.n_threads)
        return self._model

    def close(self) -> None:
        if self._model is not None:
            self._model.close()
            self._model = None

"""Typed, validated, immutable configuration for the high-level API.

Every field is checked when the object is built; a bad value raises
:class:`~llamabind.errors.InvalidArgumentError` (a ``ValueError``) naming the field and
the value, never later inside llama.cpp.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from llamabind._llama import _rpc_parse_servers
from llamabind.errors import InvalidArgumentError

__all__ = [
    "ContextConfig",
    "GenerationConfig",
    "ModelConfig",
    "SamplingConfig",
]

FlashAttention = Literal["auto", "on", "off"]
KVCacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"]
_KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")
_INT32_MAX = 2**31 - 1


def _fail(owner: object, name: str, value: object, expected: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{type(owner).__name__}.{name} must be {expected}, got {value!r}")


def _int(owner: object, name: str, value: object, lo: int, hi: int = _INT32_MAX) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(owner, name, value, f"an int in [{lo}, {hi}]")
    if not lo <= value <= hi:
        raise _fail(owner, name, value, f"an int in [{lo}, {hi}]")


def _float(owner: object, name: str, value: object, lo: float, hi: float,
           lo_open: bool = False, hi_open: bool = False) -> None:
    lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
    expected = f"a finite number in {lb}{lo:g}, {hi:g}{rb}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(owner, name, value, expected)
    v = float(value)
    if (not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo)
            or (hi_open and v == hi)):
        raise _fail(owner, name, value, expected)


def _bool(owner: object, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise _fail(owner, name, value, "a bool")


class _Config:
    """Shared helpers: ``with_(**changes)`` returns a validated copy."""

    def with_(self, **changes: Any) -> Any:
        known = {f.name for f in fields(self)}  # type: ignore[arg-type]
        unknown = sorted(set(changes) - known)
        if unknown:
            raise InvalidArgumentError(
                f"{type(self).__name__} has no field {unknown[0]!r}; fields: {sorted(known)}")
        return replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class ModelConfig(_Config):
    """How to load a model.

    ``n_gpu_layers=None`` offloads every layer when a GPU backend with a GPU device is
    present, or ``rpc_servers`` are given, and none otherwise; ``-1`` always means all
    layers. ``rpc_servers``: ``"host:port"`` of ggml RPC workers (``llamabind
    rpc-server``) whose devices take layers, before this machine's GPUs.
    """

    path: str
    n_gpu_layers: int | None = None
    use_mmap: bool = True
    use_mlock: bool = False
    main_gpu: int = 0
    split_mode: Literal["none", "layer", "row"] = "layer"
    tensor_split: tuple[float, ...] | None = None
    vocab_only: bool = False
    rpc_servers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        path: Any = self.path
        if isinstance(path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(path))
        elif not isinstance(path, str):
            raise _fail(self, "path", path, "a str or os.PathLike")
        if not self.path:
            raise _fail(self, "path", self.path, "a non-empty path")
        if self.n_gpu_layers is not None:
            _int(self, "n_gpu_layers", self.n_gpu_layers, -1)
        _bool(self, "use_mmap", self.use_mmap)
        _bool(self, "use_mlock", self.use_mlock)
        _bool(self, "vocab_only", self.vocab_only)
        _int(self, "main_gpu", self.main_gpu, 0, 1024)
        if self.split_mode not in ("none", "layer", "row"):
            raise _fail(self, "split_mode", self.split_mode, "'none', 'layer' or 'row'")
        if self.tensor_split is not None:
            split: Any = self.tensor_split
            if isinstance(split, (str, bytes)) or not isinstance(split, Iterable):
                raise _fail(self, "tensor_split", split, "a sequence of non-negative numbers")
            values = tuple(split)
            for v in values:
                if (isinstance(v, bool) or not isinstance(v, (int, float))
                        or not math.isfinite(v) or v < 0):
                    raise _fail(self, "tensor_split", split, "a sequence of non-negative numbers")
            object.__setattr__(self, "tensor_split", tuple(float(v) for v in values))
        try:
            servers = _rpc_parse_servers(self.rpc_servers)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{type(self).__name__}.{exc}") from None
        object.__setattr__(self, "rpc_servers", servers)


@dataclass(frozen=True)
class ContextConfig(_Config):
    """A context's size and compute settings. ``threads=None``: physical cores."""

    context_length: int = 2048
    batch_size: int = 512
    ubatch_size: int = 512
    threads: int | None = None
    threads_batch: int | None = None
    flash_attention: FlashAttention = "auto"
    kv_cache_type: KVCacheType = "f16"
    embeddings: bool = False

    def __post_init__(self) -> None:
        _int(self, "context_length", self.context_length, 1, 1 << 24)
        _int(self, "batch_size", self.batch_size, 1, 1 << 24)
        _int(self, "ubatch_size", self.ubatch_size, 1, self.batch_size)
        if self.threads is not None:
            _int(self, "threads", self.threads, 1, 1024)
        if self.threads_batch is not None:
            _int(self, "threads_batch", self.threads_batch, 1, 1024)
        if self.flash_attention not in ("auto", "on", "off"):
            raise _fail(self, "flash_attention", self.flash_attention, "'auto', 'on' or 'off'")
        if self.kv_cache_type not in _KV_TYPES:
            raise _fail(self, "kv_cache_type", self.kv_cache_type, f"one of {_KV_TYPES}")
        _bool(self, "embeddings", self.embeddings)


@dataclass(frozen=True)
class SamplingConfig(_Config):
    """The sampler chain. ``temperature=0`` is greedy decoding; ``seed=None`` draws a
    random seed, a given seed reproduces the output exactly.

    The chain runs in llama.cpp's usual order: logit bias, grammar, penalties, top-k,
    typical-p, top-p, min-p, temperature, then the random draw.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    grammar: str | None = None

    def __post_init__(self) -> None:
        _float(self, "temperature", self.temperature, 0.0, 1e6)
        _int(self, "top_k", self.top_k, 0)
        _float(self, "top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _float(self, "min_p", self.min_p, 0.0, 1.0)
        _float(self, "typical_p", self.typical_p, 0.0, 1.0, lo_open=True)
        _float(self, "repeat_penalty", self.repeat_penalty, 0.0, 1e6, lo_open=True)
        _float(self, "frequency_penalty", self.frequency_penalty, -1e6, 1e6)
        _float(self, "presence_penalty", self.presence_penalty, -1e6, 1e6)
        _int(self, "penalty_last_n", self.penalty_last_n, 0, 1 << 24)
        if self.seed is not None:
            _int(self, "seed", self.seed, 0, 0xFFFFFFFE)
        bias: Any = self.logit_bias
        if not isinstance(bias, Mapping):
            raise _fail(self, "logit_bias", bias, "a mapping token id -> bias")
        for tok, b in bias.items():
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise _fail(self, "logit_bias", bias, "a mapping with non-negative int token ids")
            if (isinstance(b, bool) or not isinstance(b, (int, float)) or math.isnan(b)
                    or b == math.inf):
                raise _fail(self, f"logit_bias[{tok}]", b, "a number (or -inf to ban)")
        # frozen and hashable: keep a private read-only copy
        object.__setattr__(self, "logit_bias", _FrozenMap(bias))
        if self.grammar is not None and (not isinstance(self.grammar, str)
                                         or not self.grammar.strip()):
            raise _fail(self, "grammar", self.grammar, "a non-empty GBNF grammar string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.penalty_last_n != 0 and (
            self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0)


class _FrozenMap(Mapping[int, float]):
    __slots__ = ("_d",)

    def __init__(self, data: Mapping[int, float]) -> None:
        self._d = {int(k): float(v) for k, v in data.items()}

    def __getitem__(self, key: int) -> float:
        return self._d[key]

    def __iter__(self) -> Any:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._d.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._d) == dict(other)

    def __repr__(self) -> str:
        return repr(self._d)


@dataclass(frozen=True)
class GenerationConfig(_Config):
    """What to generate: how many tokens at most, where to stop, how to tokenize."""

    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    add_bos: bool = True
    parse_special: bool = False

    def __post_init__(self) -> None:
        _int(self, "max_tokens", self.max_tokens, 0, 1 << 24)
        stop: Any = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)):
            raise _fail(self, "stop", self.stop, "a str or a sequence of str")
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise _fail(self, f"stop[{i}]", s, "a non-empty str")
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise _fail(self, f"stop[{i}]", s, "valid text (no lone surrogates)") from None
        object.__setattr__(self, "stop", tuple(stop))
        _bool(self, "add_bos", self.add_bos)
        _bool(self, "parse_special", self.parse_special)

"""llamabind's parameters: each one's name, type, range and default, stated once.

Every parameter is a field of one of the config dataclasses below, declared with
:func:`_param`, which records its rule (a :class:`Spec`) in the field's metadata. The
same rule checks the value everywhere it can arrive: building a config, keyword
options of the high-level API (``LoadedModel.load(path, n_ctx=4096)``,
``model.generate(prompt, top_k=20)``), the core classes (``Context(model, n_batch=...)``,
``Sampler().add_top_k(...)``) and the command line, whose flags are read from the specs
too. Names are llama.cpp's own (``n_ctx``, ``n_threads``, ``type_k``...); sampling and
generation options use llama-server's request names (``temperature``, ``max_tokens``).

A bad value raises :class:`~llamabind.errors.InvalidArgumentError` (a ``ValueError``)
naming the parameter and the value.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any, Literal

from llamabind.errors import InvalidArgumentError

__all__ = [
    "ContextConfig",
    "EngineConfig",
    "GenerationConfig",
    "ModelConfig",
    "SamplingConfig",
    "Spec",
    "SpecType",
    "check_option",
    "spec_of",
]

FlashAttn = Literal["auto", "on", "off"]
KVType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"]
SplitMode = Literal["none", "layer", "row", "tensor"]
Pooling = Literal["none", "mean", "cls", "last", "rank"]
SpecType = Literal["none", "ngram-simple", "draft-simple"]

KV_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0",
                             "q5_1", "iq4_nl")
INT32_MAX = 2**31 - 1
# llama.cpp's LLAMA_MAX_SEQ: sequences one context can hold
MAX_SEQUENCES = 256


# --- the rule of one parameter ---------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """How one parameter is checked.

    ``kind``: "int", "float", "bool", "choice", "str" or "custom" (``convert`` does
    the work). ``lo``/``hi`` bound numbers (``lo_open``/``hi_open`` exclude the bound);
    ``choices`` lists the values of a "choice"; ``optional`` lets ``None`` through
    (the field's doc says what None means); ``cli`` is the command line's flags.
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[Any, ...] = ()
    optional: bool = False
    doc: str = ""
    cli: tuple[str, ...] = ()
    convert: Callable[[str, Any], Any] | None = None

    def expected(self) -> str:
        """What a good value is, in words (used in messages and help texts)."""
        if self.kind == "int":
            return f"an int in [{_fmt(self.lo)}, {_fmt(self.hi)}]"
        if self.kind == "float":
            lb = "(" if self.lo_open else "["
            rb = ")" if self.hi_open else "]"
            return f"a finite number in {lb}{_fmt(self.lo)}, {_fmt(self.hi)}{rb}"
        if self.kind == "bool":
            return "a bool"
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "str":
            return "a non-empty str"
        return self.doc or "a valid value"

    def check(self, name: str, value: Any) -> Any:
        """The value, normalised (NumPy scalars become Python ones), or
        InvalidArgumentError naming ``name`` and ``value``."""
        if value is None and self.optional:
            return None
        if self.kind == "int":
            return _check_int(name, value, self)
        if self.kind == "float":
            return _check_float(name, value, self)
        if self.kind == "bool":
            return _check_bool(name, value)
        if self.kind == "choice":
            if isinstance(value, str) and value in self.choices:
                return value
            raise _bad(name, value, self.expected())
        if self.kind == "str":
            if isinstance(value, str) and value.strip():
                return value
            raise _bad(name, value, self.expected())
        assert self.convert is not None, name
        return self.convert(name, value)


def _fmt(x: float | None) -> str:
    if x is None:
        return "?"
    if float(x).is_integer() and abs(x) >= 1 << 20 and (int(x) & (int(x) - 1)) == 0:
        return f"2^{int(x).bit_length() - 1}"
    return f"{x:g}" if isinstance(x, float) else str(x)


def _bad(name: str, value: Any, expected: str) -> InvalidArgumentError:
    shown = repr(value)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return InvalidArgumentError(f"{name} must be {expected}, got {shown}")


def _is_numpy_bool(value: Any) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")


def _check_int(name: str, value: Any, spec: Spec) -> int:
    # ints and integer-like objects (NumPy integers); never bools or floats
    if isinstance(value, bool) or _is_numpy_bool(value):
        raise _bad(name, value, spec.expected())
    try:
        v = operator.index(value)
    except TypeError:
        raise _bad(name, value, spec.expected()) from None
    if (spec.lo is not None and v < spec.lo) or (spec.hi is not None and v > spec.hi):
        raise _bad(name, value, spec.expected())
    return v


def _check_float(name: str, value: Any, spec: Spec) -> float:
    if isinstance(value, (bool, str, bytes)) or _is_numpy_bool(value):
        raise _bad(name, value, spec.expected())
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise _bad(name, value, spec.expected()) from None
    lo = -math.inf if spec.lo is None else spec.lo
    hi = math.inf if spec.hi is None else spec.hi
    if (not math.isfinite(v) or v < lo or v > hi or (spec.lo_open and v == lo)
            or (spec.hi_open and v == hi)):
        raise _bad(name, value, spec.expected())
    return v


def _check_bool(name: str, value: Any) -> bool:
    # True/False and NumPy's bools; not 0/1, not strings (a "no" is truthy)
    if value is True or value is False:
        return bool(value)
    if _is_numpy_bool(value):
        return bool(value)
    raise _bad(name, value, "a bool")


def _param(default: Any, kind: str, **spec: Any) -> Any:
    """A config field whose rule is ``Spec(kind, **spec)``."""
    s = Spec(kind, **spec)
    if default is MISSING:
        return field(metadata={"spec": s})
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"spec": s})
    return field(default=default, metadata={"spec": s})


def spec_of(cls: type, name: str) -> Spec:
    """The rule of parameter ``name`` of config class ``cls``."""
    for f in fields(cls):
        if f.name == name:
            return f.metadata["spec"]  # type: ignore[no-any-return]
    raise KeyError(name)


def check_option(cls: type, name: str, value: Any) -> Any:
    """Check one option of ``cls`` by its rule; returns the normalised value."""
    return spec_of(cls, name).check(name, value)


def default_option(cls: type, name: str) -> Any:
    """The default of option ``name`` of config class ``cls``."""
    for f in fields(cls):
        if f.name == name:
            return default_of(f)
    raise KeyError(name)


def default_of(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


# --- converters of the structured parameters ---------------------------------------------

def _path(name: str, value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if not isinstance(value, str):
        raise _bad(name, value, "a str or os.PathLike")
    if not value:
        raise _bad(name, value, "a non-empty path")
    if "\0" in value:
        raise _bad(name, value, "a path without NUL characters")
    return value


def _float_tuple(name: str, value: Any) -> tuple[float, ...]:
    expected = "a sequence of non-negative numbers"
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise _bad(name, value, expected)
    out = []
    for v in value:
        if (isinstance(v, bool) or not isinstance(v, (int, float))
                or not math.isfinite(v) or v < 0):
            raise _bad(name, value, expected)
        out.append(float(v))
    return tuple(out)


def _str_tuple(name: str, value: Any, allow_empty_items: bool = False) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)):
        raise _bad(name, value, "a str or a sequence of str")
    out = []
    for i, s in enumerate(value):
        if not isinstance(s, str) or (not s and not allow_empty_items):
            raise _bad(f"{name}[{i}]", s, "a non-empty str")
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad(f"{name}[{i}]", s, "valid text (no lone surrogates)") from None
        if "\0" in s:
            raise _bad(f"{name}[{i}]", s, "text without NUL characters")
        out.append(s)
    return tuple(out)


def _stops(name: str, value: Any) -> tuple[str, ...]:
    return _str_tuple(name, value)


def _devices(name: str, value: Any) -> tuple[str, ...]:
    return _str_tuple(name, value)


def _rpc_servers(name: str, value: Any) -> tuple[str, ...]:
    # the endpoint rules live with the RPC backend's code (the core module)
    from llamabind._llama import _rpc_parse_servers

    if value is None:
        return ()
    return _rpc_parse_servers(value)


def _checked_mapping(name: str, value: Any, expected: str,
                     item: Callable[[Any, Any], tuple[Any, Any]]) -> Mapping[Any, Any]:
    """A mapping (``expected`` says of what), each item as ``item(key, value)`` checks
    and returns it; frozen."""
    if not isinstance(value, Mapping):
        raise _bad(name, value, expected)
    return _FrozenMap(dict(item(k, v) for k, v in value.items()))


def _kv_overrides(name: str, value: Any) -> Mapping[str, Any]:
    def item(key: Any, v: Any) -> tuple[str, Any]:
        if not isinstance(key, str) or not 0 < len(key.encode("utf-8", "replace")) < 128:
            raise _bad(f"{name} key", key, "a str of 1..127 bytes")
        if isinstance(v, bool) or _is_numpy_bool(v):
            return key, bool(v)
        if isinstance(v, int):
            if not -(2**63) <= v < 2**63:
                raise _bad(f"{name}[{key!r}]", v, "an int that fits in int64")
        elif isinstance(v, str):
            if len(v.encode("utf-8", "replace")) >= 128 or "\0" in v:
                raise _bad(f"{name}[{key!r}]", v, "a str under 128 bytes, without NUL")
        elif not isinstance(v, float):
            raise _bad(f"{name}[{key!r}]", v, "an int, float, bool or str")
        return key, v

    return _checked_mapping(name, value, "a mapping of metadata key -> int, float, bool or str",
                            item)


def _logit_bias(name: str, value: Any) -> Mapping[int, float]:
    def item(tok: Any, b: Any) -> tuple[int, float]:
        try:
            if isinstance(tok, bool):
                raise TypeError
            t = operator.index(tok)
        except TypeError:
            raise _bad(name, value, "a mapping with non-negative int token ids") from None
        if not 0 <= t <= INT32_MAX:
            raise _bad(name, value, "a mapping with non-negative int token ids")
        try:
            if isinstance(b, (bool, str, bytes)):
                raise TypeError
            fb = float(b)
        except (TypeError, ValueError):
            raise _bad(f"{name}[{t}]", b, "a number (or -inf to ban)") from None
        if math.isnan(fb) or fb == math.inf:
            raise _bad(f"{name}[{t}]", b, "a number (or -inf to ban)")
        return t, fb

    return _checked_mapping(name, value, "a mapping token id -> bias", item)


def _grammar(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(name, value, "a non-empty GBNF grammar string")
    return value


class _FrozenMap(Mapping[Any, Any]):
    """A read-only, hashable copy of a mapping (configs are frozen and hashable)."""

    __slots__ = ("_d",)

    def __init__(self, data: Mapping[Any, Any]) -> None:
        self._d = dict(data)

    def __getitem__(self, key: Any) -> Any:
        return self._d[key]

    def __iter__(self) -> Any:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._d.items(), key=repr)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._d) == dict(other)

    def __repr__(self) -> str:
        return repr(self._d)


# --- the configs ----------------------------------------------------------------------------

class _Config:
    """Shared behaviour: every field is checked by its Spec when the object is built;
    ``with_(**changes)`` returns a checked copy."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            checked = f.metadata["spec"].check(f.name, value)
            if checked is not value:
                object.__setattr__(self, f.name, checked)
        self._check_together()

    def _check_together(self) -> None:
        """Rules between fields (none by default)."""

    def with_(self, **changes: Any) -> Any:
        unknown = sorted(set(changes) - self.names())
        if unknown:
            raise InvalidArgumentError(
                f"{type(self).__name__} has no option {unknown[0]!r}; options: "
                f"{sorted(self.names())}")
        return replace(self, **changes)  # type: ignore[type-var]

    @classmethod
    def names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class ModelConfig(_Config):
    """How to load a model (llama_model_params)."""

    path: str = _param(MISSING, "custom", convert=_path, doc="the GGUF file",
                       cli=("-m", "--model"))
    n_gpu_layers: int | None = _param(
        None, "int", lo=-1, hi=INT32_MAX, optional=True, cli=("-ngl", "--n-gpu-layers"),
        doc="layers to offload to the GPU: -1 all; None: all when a GPU device is "
            "present, else 0")
    main_gpu: int = _param(0, "int", lo=0, hi=1 << 16, cli=("-mg", "--main-gpu"),
                           doc="the GPU for split_mode 'none'")
    split_mode: SplitMode = _param("layer", "choice",
                                   choices=("none", "layer", "row", "tensor"),
                                   cli=("-sm", "--split-mode"),
                                   doc="how to split the model across GPUs")
    tensor_split: tuple[float, ...] | None = _param(
        None, "custom", optional=True, convert=_float_tuple, cli=("-ts", "--tensor-split"),
        doc="fractions of the model per device")
    use_mmap: bool = _param(True, "bool", doc="map the file instead of reading it")
    use_mlock: bool = _param(False, "bool", cli=("--mlock",),
                             doc="keep the model in RAM (mlock)")
    vocab_only: bool = _param(False, "bool", doc="load only the vocabulary")
    check_tensors: bool = _param(False, "bool", cli=("--check-tensors",),
                                 doc="validate tensor data while loading")
    kv_overrides: Mapping[str, Any] | None = _param(
        None, "custom", optional=True, convert=_kv_overrides,
        doc="metadata values to override (key -> int, float, bool or str)")
    devices: tuple[str, ...] | None = _param(
        None, "custom", optional=True, convert=_devices, cli=("-dev", "--device"),
        doc="backend devices to use, by name (None: all)")
    rpc_servers: tuple[str, ...] = _param(
        (), "custom", convert=_rpc_servers, cli=("--rpc",),
        doc="'host:port' of ggml RPC workers (`llamabind rpc-server`) whose devices take "
            "layers, before this machine's GPUs; with them, n_gpu_layers=None means all")
    use_extra_bufts: bool = _param(
        True, "bool",
        doc="repack some quantised weights for faster CPU kernels (False: llama.cpp's "
            "--no-repack; the logits then equal an RPC worker's, which never repacks)")


@dataclass(frozen=True)
class ContextConfig(_Config):
    """A context's size and compute settings (llama_context_params)."""

    n_ctx: int = _param(2048, "int", lo=0, hi=1 << 24, cli=("-c", "--ctx-size"),
                        doc="context length of one sequence (0: the model's training "
                            "length)")
    n_batch: int = _param(512, "int", lo=1, hi=1 << 24, cli=("-b", "--batch-size"),
                          doc="tokens per llama_decode call at most")
    n_ubatch: int | None = _param(None, "int", lo=1, hi=1 << 24, optional=True,
                                  cli=("-ub", "--ubatch-size"),
                                  doc="physical batch size (None: min(n_batch, 512))")
    n_seq_max: int = _param(1, "int", lo=1, hi=MAX_SEQUENCES,
                            doc="sequences the context holds")
    n_threads: int | None = _param(None, "int", lo=1, hi=1024, optional=True,
                                   cli=("-t", "--threads"),
                                   doc="threads for generation (None: physical cores)")
    n_threads_batch: int | None = _param(
        None, "int", lo=1, hi=1024, optional=True, cli=("-tb", "--threads-batch"),
        doc="threads for prompt processing (None: n_threads)")
    flash_attn: FlashAttn = _param("auto", "choice", choices=("auto", "on", "off"),
                                   cli=("-fa", "--flash-attn"), doc="flash attention")
    type_k: KVType = _param("f16", "choice", choices=KV_TYPES, cli=("-ctk", "--cache-type-k"),
                            doc="KV cache type of K")
    type_v: KVType = _param("f16", "choice", choices=KV_TYPES, cli=("-ctv", "--cache-type-v"),
                            doc="KV cache type of V")
    embeddings: bool = _param(False, "bool", doc="output embeddings")
    pooling: Pooling | None = _param(None, "choice", optional=True,
                                     choices=("none", "mean", "cls", "last", "rank"),
                                     cli=("--pooling",),
                                     doc="embedding pooling (None: the model's)")
    offload_kqv: bool = _param(True, "bool", doc="KV cache and attention on the GPU")
    kv_unified: bool | None = _param(
        None, "bool", optional=True, cli=("-kvu", "--kv-unified"),
        doc="one KV buffer shared by all sequences (None: yes for the batching engine, "
            "whose slots then share its cells; no elsewhere, llama.cpp's default)")
    swa_full: bool = _param(False, "bool", cli=("--swa-full",),
                            doc="full-size cache for sliding-window attention")
    no_perf: bool = _param(False, "bool", doc="turn llama.cpp's timing counters off")

    def _check_together(self) -> None:
        if self.n_ubatch is not None and self.n_ubatch > self.n_batch:
            raise _bad("n_ubatch", self.n_ubatch, f"at most n_batch={self.n_batch}")


@dataclass(frozen=True)
class EngineConfig(_Config):
    """The batching engine of a LoadedModel: how many sequences it decodes together,
    how many requests may wait, how much RAM its prompt cache may take."""

    n_parallel: int = _param(16, "int", lo=1, hi=MAX_SEQUENCES, cli=("-np", "--parallel"),
                             doc="sequences decoded together (slots)")
    max_queue: int = _param(1024, "int", lo=0, hi=1 << 24, cli=("--max-queue",),
                            doc="requests that may wait for a slot")
    cache_ram_mib: int = _param(
        256, "int", lo=0, hi=1 << 24, cli=("--cache-ram",),
        doc="RAM for the prompt cache (MiB; 0: no cache beyond the slots' own)")
    kv_size: int | None = _param(
        None, "int", lo=1, hi=1 << 28, optional=True, cli=("--kv-size",),
        doc="KV cells of the engine's context in all (None: n_ctx x min(n_parallel, 4) "
            "when the slots share them, n_ctx x n_parallel when each has its own). Shared "
            "cells are handed out as requests need them; when they run out, the newest "
            "request is paused and resumed later")
    prefill_budget: int | None = _param(
        None, "int", lo=1, hi=1 << 24, optional=True, cli=("--prefill-budget",),
        doc="prompt tokens one step may carry while other sequences are generating "
            "(None: up to n_batch, a new prompt enters in one step). Smaller keeps the "
            "running streams' pace while long prompts enter, at the cost of the new "
            "requests' time to first token; steps with nothing generating take up to "
            "n_batch either way")


@dataclass(frozen=True)
class SamplingConfig(_Config):
    """The sampler chain, in llama.cpp's order: logit bias, grammar, penalties, DRY,
    top-n-sigma, top-k, typical-p, top-p, min-p, XTC, temperature, then the random
    draw (or mirostat). ``temperature=0`` is greedy decoding; ``seed=None`` draws a
    random seed, a given seed reproduces the output exactly."""

    temperature: float = _param(0.8, "float", lo=0.0, hi=1e6, cli=("--temp",),
                                doc="0: greedy")
    top_k: int = _param(40, "int", lo=0, hi=INT32_MAX, cli=("--top-k",), doc="0: off")
    top_p: float = _param(0.95, "float", lo=0.0, hi=1.0, lo_open=True, cli=("--top-p",),
                          doc="1: off")
    min_p: float = _param(0.05, "float", lo=0.0, hi=1.0, cli=("--min-p",), doc="0: off")
    typical_p: float = _param(1.0, "float", lo=0.0, hi=1.0, lo_open=True,
                              cli=("--typical",), doc="1: off")
    min_keep: int = _param(0, "int", lo=0, hi=INT32_MAX, cli=("--min-keep",),
                           doc="tokens the filters keep at least (0: 1)")
    top_n_sigma: float = _param(-1.0, "float", lo=-1.0, hi=1e6, cli=("--top-nsigma",),
                                doc="keep tokens within n std. deviations of the top "
                                    "logit; <= 0: off")
    xtc_probability: float = _param(0.0, "float", lo=0.0, hi=1.0,
                                    cli=("--xtc-probability",), doc="0: off")
    xtc_threshold: float = _param(0.1, "float", lo=0.0, hi=1.0, cli=("--xtc-threshold",),
                                  doc="> 0.5: off")
    dynatemp_range: float = _param(0.0, "float", lo=0.0, hi=1e6, cli=("--dynatemp-range",),
                                   doc="dynamic temperature range; 0: off")
    dynatemp_exponent: float = _param(1.0, "float", lo=0.0, hi=1e6,
                                      cli=("--dynatemp-exp",))
    repeat_penalty: float = _param(1.0, "float", lo=0.0, hi=1e6, lo_open=True,
                                   cli=("--repeat-penalty",), doc="1: off")
    frequency_penalty: float = _param(0.0, "float", lo=-1e6, hi=1e6,
                                      cli=("--frequency-penalty",), doc="0: off")
    presence_penalty: float = _param(0.0, "float", lo=-1e6, hi=1e6,
                                     cli=("--presence-penalty",), doc="0: off")
    penalty_last_n: int = _param(64, "int", lo=-1, hi=1 << 24, cli=("--repeat-last-n",),
                                 doc="tokens the penalties look back on (0: off, -1: "
                                     "the context)")
    dry_multiplier: float = _param(0.0, "float", lo=0.0, hi=1e6, cli=("--dry-multiplier",),
                                   doc="DRY repetition penalty; 0: off")
    dry_base: float = _param(1.75, "float", lo=1.0, hi=1e6, cli=("--dry-base",))
    dry_allowed_length: int = _param(2, "int", lo=0, hi=1 << 24,
                                     cli=("--dry-allowed-length",))
    dry_penalty_last_n: int = _param(64, "int", lo=-1, hi=1 << 24,
                                     cli=("--dry-penalty-last-n",),
                                     doc="tokens DRY looks back on (0: off, -1: the context)")
    dry_sequence_breakers: tuple[str, ...] = _param(
        ("\n", ":", '"', "*"), "custom", convert=_str_tuple, doc="DRY sequence breakers")
    mirostat: int = _param(0, "int", lo=0, hi=2, cli=("--mirostat",),
                           doc="0: off, 1: mirostat, 2: mirostat 2.0")
    mirostat_tau: float = _param(5.0, "float", lo=0.0, hi=1e6, cli=("--mirostat-ent",))
    mirostat_eta: float = _param(0.1, "float", lo=0.0, hi=1.0, lo_open=True,
                                 cli=("--mirostat-lr",))
    seed: int | None = _param(None, "int", lo=0, hi=0xFFFFFFFE, optional=True,
                              cli=("-s", "--seed"), doc="None: random")
    logit_bias: Mapping[int, float] = _param({}, "custom", convert=_logit_bias,
                                             doc="token id -> bias (-inf bans)")
    grammar: str | None = _param(None, "custom", optional=True, convert=_grammar,
                                 cli=("--grammar",), doc="a GBNF grammar")
    ignore_eos: bool = _param(False, "bool", cli=("--ignore-eos",),
                              doc="never stop at end-of-generation tokens")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 and self.mirostat == 0

    @property
    def has_penalties(self) -> bool:
        return self.penalty_last_n != 0 and (
            self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0)


@dataclass(frozen=True)
class GenerationConfig(_Config):
    """What to generate: how many tokens at most, where to stop, how to tokenize."""

    max_tokens: int = _param(256, "int", lo=0, hi=1 << 24, cli=("-n", "--n-predict"),
                             doc="tokens to generate at most")
    stop: tuple[str, ...] = _param((), "custom", convert=_stops, cli=("--stop",),
                                   doc="stop strings (never part of the output)")
    add_special: bool = _param(True, "bool",
                               doc="add the model's BOS/EOS tokens when tokenizing")
    parse_special: bool = _param(False, "bool",
                                 doc="read special tokens written as text in the prompt")
    logprobs: int | None = _param(None, "int", lo=0, hi=20, optional=True,
                                  doc="log-probabilities of each token and of the k most "
                                      "likely alternatives")
    # speculative decoding: the same tokens, fewer passes over the weights
    spec_type: SpecType = _param(
        "none", "choice", choices=("none", "ngram-simple", "draft-simple"),
        cli=("--spec-type",),
        doc="speculative decoding: 'ngram-simple' drafts from the prompt and the output "
            "(prompt lookup), 'draft-simple' with the draft model given to load(draft=...); "
            "the target model's sampler picks every token, so the output is the same")
    draft_max: int = _param(16, "int", lo=0, hi=256, cli=("--draft-max", "--spec-draft-n-max"),
                            doc="tokens drafted at most per step (0: no drafting)")
    draft_min: int = _param(0, "int", lo=0, hi=256, cli=("--draft-min", "--spec-draft-n-min"),
                            doc="a shorter draft is not tried")
    draft_p_min: float = _param(
        0.75, "float", lo=0.0, hi=1.0, cli=("--draft-p-min", "--spec-draft-p-min"),
        doc="the draft model stops drafting at a token it gives a lower probability")
    spec_ngram_size_n: int = _param(
        8, "int", lo=1, hi=64, cli=("--spec-ngram-size-n",),
        doc="prompt lookup: the n-gram looked up (the history's last n tokens, found "
            "earlier: what followed them there is the draft)")
    spec_ngram_size_min: int | None = _param(
        None, "int", lo=1, hi=64, optional=True, cli=("--spec-ngram-size-min",),
        doc="prompt lookup: shorter n-grams, down to this size, are tried when the "
            "spec_ngram_size_n-gram is not found (None: none; short matches draft often "
            "and are often wrong, which costs more than it saves on a CPU)")

    def _check_together(self) -> None:
        if self.draft_min > self.draft_max:
            raise _bad("draft_min", self.draft_min, f"at most draft_max={self.draft_max}")
        if self.spec_ngram_size_min is not None \
                and self.spec_ngram_size_min > self.spec_ngram_size_n:
            raise _bad("spec_ngram_size_min", self.spec_ngram_size_min,
                       f"at most spec_ngram_size_n={self.spec_ngram_size_n}")

    @property
    def speculative(self) -> bool:
        return self.spec_type != "none" and self.draft_max > 0


# the options of speculative decoding (GenerationConfig fields that LoadedModel.load
# also takes, as every request's defaults)
SPECULATIVE_OPTIONS = frozenset({"spec_type", "draft_max", "draft_min", "draft_p_min",
                                 "spec_ngram_size_n", "spec_ngram_size_min"})


# the configs of loading a model, and of one generation
LOAD_CONFIGS: tuple[type[_Config], ...] = (ModelConfig, ContextConfig, EngineConfig)
GENERATE_CONFIGS: tuple[type[_Config], ...] = (SamplingConfig, GenerationConfig)


def route_options(options: Mapping[str, Any], classes: Iterable[type[_Config]], *,
                  apart: Iterable[str] = (), refused: Iterable[str] = ()
                  ) -> tuple[dict[type[_Config], dict[str, Any]], dict[str, Any]]:
    """Keyword options split by the config class (of ``classes``) that has each, and
    the names in ``apart`` kept aside (unchecked, in the second dict). Any other name,
    or one in ``refused``, raises InvalidArgumentError listing the options."""
    groups: dict[type[_Config], dict[str, Any]] = {cls: {} for cls in classes}
    aside: dict[str, Any] = {}
    apart, refused = frozenset(apart), frozenset(refused)
    for name, value in options.items():
        if name in apart:
            aside[name] = value
            continue
        owner = next((cls for cls in groups if name in cls.names()), None)
        if owner is None or name in refused:
            known = apart.union(*(cls.names() for cls in groups)) - refused
            raise InvalidArgumentError(f"unknown option {name!r}; options: {sorted(known)}")
        groups[owner][name] = value
    return groups, aside

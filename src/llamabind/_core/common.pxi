# Shared helpers: C imports, argument checks, and the one place where llama.cpp's
# return codes become exceptions.

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from cpython.ref cimport PyObject
from libc.math cimport isfinite, logf
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy, memset
from libcpp cimport bool as cppbool
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from ggml cimport *
from llama cimport *

import atexit
import logging
import os
import threading
import time
import warnings

# NumPy is imported on first use: it is most of the import time of the package, and
# many programs load a model and generate text without ever needing an array.
cdef object _numpy = None


cdef object _np():
    global _numpy
    if _numpy is None:
        import numpy
        _numpy = numpy
    return _numpy

from llamabind.config import (
    ContextConfig as _ContextConfig,
    GenerationConfig as _GenerationConfig,
    ModelConfig as _ModelConfig,
    SamplingConfig as _SamplingConfig,
    Spec as _Spec,
    _check_bool as _config_check_bool,
    _check_float as _config_check_float,
    _check_int as _config_check_int,
    check_option as _config_check_option,
    default_option as _config_default,
)
from llamabind.errors import (
    BackendError,
    ChatTemplateError,
    ClosedError,
    ConcurrentUseError,
    ContextCreationError,
    DecodeError,
    ForkError,
    GenerationCancelled,
    GrammarError,
    InvalidArgumentError,
    ModelFileError,
    ModelLoadError,
    ModelNotFoundError,
    SamplingError,
    StateError,
    StateFileNotFoundError,
    TokenizationError,
)

cdef extern from *:
    """
    #ifndef LLAMABIND_LLAMA_COMMIT
    #define LLAMABIND_LLAMA_COMMIT "unknown"
    #endif
    #ifndef LLAMABIND_LLAMA_VERSION
    #define LLAMABIND_LLAMA_VERSION "unknown"
    #endif
    """
    const char * LLAMABIND_LLAMA_COMMIT
    const char * LLAMABIND_LLAMA_VERSION

cdef object _logger = logging.getLogger("llamabind")
# A library's logger gets a NullHandler: without one, logging's "last resort" handler
# would print llama.cpp's warnings to stderr in a program that configured no logging.
_logger.addHandler(logging.NullHandler())

cdef extern from "argmax.h" nogil:
    int32_t llamabind_argmax(const float * x, int32_t n)


cdef inline llama_token _argmax(const float * logits, int32_t n) noexcept nogil:
    """The first index of the largest logit: what llama.cpp's greedy sampler picks
    (``>`` comparisons, so NaNs are never picked; index 0 if logit 0 is NaN). In C
    (argmax.h): packed maxima over blocks, then one block scanned for the index."""
    return llamabind_argmax(logits, n)


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


# --- argument checks ---------------------------------------------------------------

cdef bytes _utf8(object text, str name):
    """Encode a str for llama.cpp, refusing what it cannot take."""
    if not isinstance(text, str):
        raise InvalidArgumentError(f"{name} must be a str, got {type(text).__name__}")
    try:
        data = (<str>text).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgumentError(
            f"{name} contains a lone surrogate {text[exc.start]!r} at index {exc.start}; "
            "it cannot be encoded as UTF-8") from None
    if b"\0" in data:
        raise InvalidArgumentError(
            f"{name} contains a NUL character at index {(<str>text).index(chr(0))}")
    return data


cdef object _path_bytes(object path, str name):
    try:
        fspath = os.fsdecode(os.fspath(path))
    except TypeError:
        raise InvalidArgumentError(
            f"{name} must be a str or os.PathLike, got {type(path).__name__}") from None
    if "\0" in fspath:
        raise InvalidArgumentError(f"{name} contains a NUL character: {fspath!r}")
    return fspath, os.fsencode(fspath)


# The rules themselves live in llamabind.config (one place for the core, the configs,
# the high-level API and the command line); these are the core's shorthands for them.

cdef int64_t _int_arg(object value, str name, int64_t lo, int64_t hi) except? -1:
    """An integer argument within [lo, hi]: ints and integer-like objects (NumPy's),
    never bools or floats."""
    return _config_check_int(name, value, _Spec("int", lo=lo, hi=hi))


cdef bint _bool_arg(object value, str name) except -1:
    """A flag: True/False (NumPy's bools too). Anything else (a string such as "no",
    None, 0/1) is refused rather than taken for its truth value."""
    return _config_check_bool(name, value)


cdef int64_t _any_int_arg(object value, str name) except? -1:
    """An integer argument whose range the caller checks (with its own message)."""
    return _int_arg(value, name, -(1 << 62), 1 << 62)


cdef double _float_arg(object value, str name, double lo, double hi,
                       bint lo_open=False, bint hi_open=False) except? -1:
    return _config_check_float(name, value, _Spec("float", lo=lo, hi=hi, lo_open=lo_open,
                                                  hi_open=hi_open))


cdef object _option(object cls, str name, object value):
    """An option checked by its rule in ``cls`` (a config class); ``None`` is the
    option's default there."""
    if value is None:
        return _config_default(cls, name)
    return _config_check_option(cls, name, value)


cdef object _options_config(object cls, object config, dict options):
    """A config of class ``cls`` from ``config`` (one, or None) and keyword options."""
    if config is not None:
        if not isinstance(config, cls):
            raise InvalidArgumentError(
                f"config must be a {cls.__name__}, got {type(config).__name__}")
        return config.with_(**options) if options else config
    unknown = sorted(set(options) - cls.names())
    if unknown:
        raise InvalidArgumentError(
            f"unknown option {unknown[0]!r}; options: {sorted(cls.names())}")
    return cls(**options)


cdef object _token_array(object tokens, int32_t n_vocab, str name):
    """Tokens as a contiguous int32 array, each checked to be in [0, n_vocab)."""
    if isinstance(tokens, (str, bytes)):
        raise InvalidArgumentError(f"{name} must be a sequence of token ids, not {type(tokens).__name__}")
    try:
        arr = _np().asarray(tokens)
    except Exception as exc:
        raise InvalidArgumentError(f"{name} is not a sequence of token ids: {exc}") from None
    if arr.ndim != 1:
        if arr.ndim == 0:
            raise InvalidArgumentError(f"{name} must be a sequence of token ids, got {tokens!r}")
        raise InvalidArgumentError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return _np().empty(0, dtype=_np().int32)
    if arr.dtype.kind not in "iu":
        # look in the caller's own sequence: asarray([1, 'a']) turns every item into a str
        items = tokens if isinstance(tokens, (list, tuple)) else arr.tolist()
        bad = next((t for t in items
                    if isinstance(t, bool) or not isinstance(t, (int, _np().integer))),
                   items[0])
        raise InvalidArgumentError(f"{name} must hold ints, got {type(bad).__name__} {bad!r}")
    lo = arr.min()
    hi = arr.max()
    if lo < 0 or hi >= n_vocab:
        index = int(_np().argmax((arr < 0) | (arr >= n_vocab)))
        raise InvalidArgumentError(
            f"{name}[{index}] = {int(arr[index])} is not a valid token id "
            f"(the vocabulary has {n_vocab} tokens: 0..{n_vocab - 1})")
    return _np().ascontiguousarray(arr, dtype=_np().int32)


# --- return codes -> exceptions -----------------------------------------------------

cdef dict _DECODE_MEANING = {
    1: "no KV-cache slot for the batch (the context is full: reduce the batch or raise n_ctx)",
    2: "aborted (cancelled)",
    -1: "invalid input batch",
    -2: "memory allocation failed during compute",
    -3: "compute failed",
}


cdef int _raise_for_decode(int32_t rc, str op) except -1:
    meaning = _DECODE_MEANING.get(rc, "llama.cpp internal error")
    raise DecodeError(f"{op} failed with code {rc}: {meaning}", rc)

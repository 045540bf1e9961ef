# Shared helpers: C imports, argument checks, and the one place where llama.cpp's
# return codes become exceptions.

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from cpython.ref cimport PyObject
from libc.math cimport isfinite
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

# --- fork safety -------------------------------------------------------------------
# Native objects made before os.fork() hold threads, mutexes and device handles that
# do not exist in the child. Each object records the fork generation it was made in;
# using it in a child raises ForkError instead of deadlocking.
cdef int _fork_generation = 0


def _bump_fork_generation():
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_bump_fork_generation)


cdef inline int _check_fork(int generation, str what) except -1:
    if generation != _fork_generation:
        raise ForkError(
            f"this {what} was created before os.fork() and cannot be used in the child "
            "process; load the model again in the child (or use the 'spawn' start method)")
    return 0


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


cdef int64_t _int_arg(object value, str name, int64_t lo, int64_t hi) except? -1:
    """An integer argument within [lo, hi]; bools and floats are refused."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be an int, got bool {value!r}")
    if not isinstance(value, int):
        try:
            import operator
            value = operator.index(value)
        except TypeError:
            raise InvalidArgumentError(
                f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if value < lo or value > hi:
        raise InvalidArgumentError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


cdef bint _bool_arg(object value, str name) except -1:
    """A flag: a bool (NumPy's too), or the ints 0 and 1. Anything else (a string such
    as "no", None, 2) is refused rather than taken for its truth value."""
    if value is True or value is False:
        return value
    if isinstance(value, int) and (value == 0 or value == 1):
        return value == 1
    if type(value).__name__ == "bool_" and type(value).__module__ == "numpy":
        return bool(value)
    raise InvalidArgumentError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


cdef int64_t _any_int_arg(object value, str name) except? -1:
    """An integer argument whose range the caller checks (with its own message)."""
    return _int_arg(value, name, -(1 << 62), 1 << 62)


cdef double _float_arg(object value, str name, double lo, double hi,
                       bint lo_open=False, bint hi_open=False) except? -1:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise InvalidArgumentError(
                f"{name} must be a number, got {type(value).__name__} {value!r}") from None
    cdef double v = value
    if not isfinite(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise InvalidArgumentError(f"{name} must be a finite number in {lb}{lo:g}, {hi:g}{rb}, "
                                   f"got {value!r}")
    return v


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


# --- objects freed while open ------------------------------------------------------

cdef void _warn_unclosed(str what) noexcept:
    """ResourceWarning for an object freed while still open; called from __dealloc__.

    The object is never passed as the warning's ``source``: it is being destroyed, and
    a warning kept by catch_warnings(record=True) (pytest records every warning) would
    hold a dangling pointer to it. Under ``-W error::ResourceWarning`` the error is
    reported through sys.unraisablehook, as CPython does for unclosed files; at
    interpreter exit, when the warnings machinery may be gone, nothing is said."""
    try:
        warnings.warn(f"unclosed {what}", ResourceWarning, stacklevel=2)
    except Warning:
        raise  # a noexcept function hands it to sys.unraisablehook
    except BaseException:
        pass

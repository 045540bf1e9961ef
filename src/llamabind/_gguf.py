"""Checks on a GGUF file before llama.cpp sees it.

llama.cpp returns an error for most broken files, but a few kinds of damage reach
code that aborts the process. llamabind reads the header first and refuses what it
can tell is wrong, with an exception that names the file and the problem.
"""

from __future__ import annotations

import os
import struct

from llamabind.errors import ModelFileError, ModelNotFoundError

__all__ = ["GGUF_MAGIC", "check_model_file"]

GGUF_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_HEADER = struct.Struct("<4sIQQ")


def check_model_file(path: str, *, vocab_only: bool = False) -> None:
    """Raise ModelNotFoundError / ModelFileError if ``path`` cannot be a GGUF model."""
    if not os.path.exists(path):
        raise ModelNotFoundError(f"model file not found: {path!r}", path)
    if os.path.isdir(path):
        raise ModelFileError(f"model path is a directory, not a GGUF file: {path!r}", path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(_HEADER.size)
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path!r}: {exc}", path) from None
    if size == 0:
        raise ModelFileError(f"model file is empty: {path!r}", path)
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        raise ModelFileError(
            f"not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r}): {path!r}", path)
    if len(head) < _HEADER.size:
        raise ModelFileError(f"GGUF header is truncated ({size} bytes): {path!r}", path)
    _, version, n_tensors, n_kv = _HEADER.unpack(head)
    if version not in _SUPPORTED_VERSIONS:
        raise ModelFileError(
            f"unsupported GGUF version {version} (supported: 2, 3): {path!r}", path)
    if n_kv > size or n_tensors > size:
        raise ModelFileError(
            f"corrupt GGUF header: {n_kv} metadata entries and {n_tensors} tensors cannot "
            f"fit in {size} bytes: {path!r}", path)

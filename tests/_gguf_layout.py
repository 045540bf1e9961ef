"""Where each field of a (well-formed) GGUF file lies, for tests that damage files.

llamabind reads GGUF files through ggml (gguf.h), which says what a file holds but not
at which byte: the damaged-file and fuzz tests need the positions of the fields they
overwrite, so this module walks the layout itself. It checks nothing: it is meant for
the intact test models, not for damaged files. The layout (little-endian)::

    magic "GGUF" | u32 version | i64 n_tensors | i64 n_kv
    n_kv x      { string key | i32 type | value }
    n_tensors x { string name | u32 n_dims | i64 ne[n_dims] | i32 ggml_type | u64 offset }
    padding to general.alignment | tensor data

where a string is ``u64 length | bytes`` and an array is ``i32 type | u64 count | items``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STRING, ARRAY = 8, 9
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B",
                  10: "<Q", 11: "<q", 12: "<d"}


@dataclass
class Entry:
    """A metadata entry: ``offset`` (its key length), ``value_offset`` (for arrays: the
    element type), ``end`` (one past its last byte). Scalars and strings carry
    ``value``; arrays ``elem_type``, ``count`` and (numeric ones) ``value``."""

    key: str
    type: int
    offset: int
    value_offset: int
    end: int = 0
    value: Any = None
    elem_type: int | None = None
    count: int | None = None


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int          # of its data, from the start of the data section
    info_offset: int     # where its tensor info starts
    offset_pos: int      # where its data offset field is


@dataclass
class Layout:
    file_size: int
    version: int
    n_tensors: int
    n_kv: int
    alignment: int = 32
    kv: dict[str, Entry] = field(default_factory=dict)
    tensors: list[Tensor] = field(default_factory=list)
    tensor_info_offset: int = 0
    data_offset: int = 0


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> bytes:
        n = self.take("<Q")
        self.pos += n
        return self.data[self.pos - n:self.pos]


def read_layout(path: str | Path, head_bytes: int = 64 << 20) -> Layout:
    """The layout of the GGUF file at ``path`` (its first ``head_bytes`` hold the header)."""
    path = Path(path)
    with open(path, "rb") as fh:
        cur = _Cursor(fh.read(head_bytes))
    assert cur.data[:4] == b"GGUF", path
    cur.pos = 4
    out = Layout(path.stat().st_size, cur.take("<I"), cur.take("<q"), cur.take("<q"))
    for _ in range(out.n_kv):
        start = cur.pos
        key = cur.string().decode("utf-8", "surrogateescape")
        vtype = cur.take("<i")
        entry = Entry(key, vtype, start, cur.pos)
        if vtype == ARRAY:
            entry.elem_type, entry.count = cur.take("<i"), cur.take("<Q")
            if entry.elem_type == STRING:
                entry.value = [cur.string() for _ in range(entry.count)]
            else:
                entry.value = [cur.take(SCALAR_FORMATS[entry.elem_type])
                               for _ in range(entry.count)]
        elif vtype == STRING:
            entry.value = cur.string()
        else:
            entry.value = cur.take(SCALAR_FORMATS[vtype])
        entry.end = cur.pos
        out.kv[key] = entry
    if "general.alignment" in out.kv:
        out.alignment = out.kv["general.alignment"].value
    out.tensor_info_offset = cur.pos
    for _ in range(out.n_tensors):
        start = cur.pos
        name = cur.string().decode("utf-8", "surrogateescape")
        shape = tuple(cur.take("<q") for _ in range(cur.take("<I")))
        gtype = cur.take("<i")
        out.tensors.append(Tensor(name, shape, gtype, cur.take("<Q"), start, cur.pos - 8))
    out.data_offset = cur.pos
    if out.tensors:
        out.data_offset += -cur.pos % out.alignment
    return out

"""Checks on a GGUF file before llama.cpp sees it.

llama.cpp returns an error for most broken files, but some kinds of damage reach code
that aborts the process (a failed ``GGML_ASSERT``) or reads past what the file holds.
llamabind reads the header region first -- the magic, the metadata key/values and the
tensor infos, never the tensor data -- and refuses anything that is structurally
wrong, with a :class:`~llamabind.errors.ModelFileError` that names the file, the byte
offset and the problem.

The layout (little-endian; see ``ggml/src/gguf.cpp``)::

    magic "GGUF" | u32 version | i64 n_tensors | i64 n_kv
    n_kv x      { string key | i32 type | value }
    n_tensors x { string name | u32 n_dims | i64 ne[n_dims] | i32 ggml_type | u64 offset }
    padding to general.alignment | tensor data

where a string is ``u64 length | bytes`` and an array value is
``i32 element type | u64 count | elements``.
"""

from __future__ import annotations

import array
import os
import stat
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, NoReturn

from llamabind.errors import ModelFileError, ModelNotFoundError

__all__ = [
    "GGUF_MAGIC",
    "GGUFHeader",
    "GGUFKeyValue",
    "GGUFTensorInfo",
    "check_adapter_file",
    "check_model_file",
    "read_header",
]

GGUF_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32          # GGUF_DEFAULT_ALIGNMENT
_MAX_STRING_LENGTH = 1 << 30     # GGUF_MAX_STRING_LENGTH
_MAX_ARRAY_ELEMENTS = 1 << 30    # GGUF_MAX_ARRAY_ELEMENTS
_MAX_DIMS = 4                    # GGML_MAX_DIMS
_MAX_NAME = 64                   # GGML_MAX_NAME (names must be shorter, with the NUL)
_KEEP_ARRAY_VALUES = 512         # numeric arrays up to this long (per-layer values) are kept
_INT64_MAX = (1 << 63) - 1
_SIZE_MAX = (1 << 64) - 1
_HEADER_SIZE = 24                # magic, version, n_tensors, n_kv
# The smallest possible entries, to refuse absurd counts before looping over them.
_MIN_KV_BYTES = 8 + 1 + 4 + 1             # key length, 1-byte key, type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8    # name length, n_dims, type, offset

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
# what _Reader.strings(collect=True, unique_ok=True) gives for strings that are all
# different and non-empty (compared by identity)
UNIQUE_STRINGS: list[bytes] = []
_I64 = struct.Struct("<q")

# gguf_type: value -> (name, element size in bytes; 0 where it varies)
_T_STRING = 8
_T_ARRAY = 9
_GGUF_TYPES = {
    0: ("u8", 1), 1: ("i8", 1), 2: ("u16", 2), 3: ("i16", 2), 4: ("u32", 4),
    5: ("i32", 4), 6: ("f32", 4), 7: ("bool", 1), _T_STRING: ("str", 0),
    _T_ARRAY: ("arr", 0), 10: ("u64", 8), 11: ("i64", 8), 12: ("f64", 8),
}
_SCALAR_FORMATS = {
    0: struct.Struct("<B"), 1: struct.Struct("<b"), 2: struct.Struct("<H"),
    3: struct.Struct("<h"), 4: _U32, 5: _I32, 6: struct.Struct("<f"),
    7: struct.Struct("<b"), 10: _U64, 11: _I64, 12: struct.Struct("<d"),
}

# ggml_type: value -> (name, block size in elements, bytes per block), from the
# type_traits table in ggml/src/ggml.c. Values 4, 5, 31-33 and 36-38 were removed
# (their traits have block size 0) and are refused, like values >= GGML_TYPE_COUNT.
_GGML_TYPES = {
    0: ("f32", 1, 4), 1: ("f16", 1, 2), 2: ("q4_0", 32, 18), 3: ("q4_1", 32, 20),
    6: ("q5_0", 32, 22), 7: ("q5_1", 32, 24), 8: ("q8_0", 32, 34), 9: ("q8_1", 32, 36),
    10: ("q2_K", 256, 84), 11: ("q3_K", 256, 110), 12: ("q4_K", 256, 144),
    13: ("q5_K", 256, 176), 14: ("q6_K", 256, 210), 15: ("q8_K", 256, 292),
    16: ("iq2_xxs", 256, 66), 17: ("iq2_xs", 256, 74), 18: ("iq3_xxs", 256, 98),
    19: ("iq1_s", 256, 50), 20: ("iq4_nl", 32, 18), 21: ("iq3_s", 256, 110),
    22: ("iq2_s", 256, 82), 23: ("iq4_xs", 256, 136), 24: ("i8", 1, 1),
    25: ("i16", 1, 2), 26: ("i32", 1, 4), 27: ("i64", 1, 8), 28: ("f64", 1, 8),
    29: ("iq1_m", 256, 56), 30: ("bf16", 1, 2), 34: ("tq1_0", 256, 54),
    35: ("tq2_0", 256, 66), 39: ("mxfp4", 32, 17), 40: ("nvfp4", 64, 36),
    41: ("q1_0", 128, 18), 42: ("q2_0", 64, 18),
}
_GGML_TYPE_COUNT = 43
_GGML_F32 = 0
_TOKEN_TYPE_BYTE = 6             # LLAMA_TOKEN_TYPE_BYTE

# Read the header region in chunks of at least this size, guessing at most this far
# ahead where a tokenizer's strings are.
_CHUNK = 1 << 20
_READ_AHEAD = 64 << 10
_MAX_READ_AHEAD = 64 << 20


@dataclass
class GGUFTensorInfo:
    """One tensor info entry (``info_offset``: where it starts in the file)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    info_offset: int
    nbytes: int
    offset_pos: int = 0    # where the data offset field is


@dataclass
class GGUFKeyValue:
    """One metadata entry. Scalars and strings carry ``value``; arrays carry
    ``elem_type`` and ``count`` (and ``value`` only for numeric arrays of up to 512
    elements). Keys that are not UTF-8 are decoded with "surrogateescape"."""

    key: str
    type: int
    offset: int            # where the entry (its key length) starts
    value_offset: int      # where the value (for arrays: the element type) starts
    end: int               # one past the entry's last byte
    value: Any = None
    elem_type: int | None = None
    count: int | None = None


@dataclass
class GGUFHeader:
    """What :func:`read_header` found."""

    path: str
    file_size: int
    version: int
    n_tensors: int
    n_kv: int
    alignment: int
    kv: dict[str, GGUFKeyValue] = field(default_factory=dict)
    tensors: list[GGUFTensorInfo] = field(default_factory=list)
    tensor_info_offset: int = 0   # where the tensor infos start (end of the metadata)
    data_offset: int = 0          # where the tensor data starts (after padding)
    data_size: int = 0            # the data section's size, tensors padded to alignment


class _Reader:
    """Sequential reads of the file's header region with bounds checks; every
    failure raises ModelFileError naming the file and the byte offset.

    It holds one window of the file (``data`` = the bytes from offset ``base``), read
    afresh when a read falls outside it, so a corrupt length that jumps far ahead
    does not make it read everything in between.
    """

    def __init__(self, fh: IO[bytes] | None, path: str, size: int) -> None:
        self.fh = fh
        self.path = path
        self.size = size
        self.base = 0
        self.data = b""
        self.pos = 0

    def fail(self, offset: int, problem: str) -> NoReturn:
        raise ModelFileError(
            f"invalid GGUF file {self.path!r} at byte {offset}: {problem}", self.path)

    def window(self, pos: int, n: int) -> int:
        """Make the window hold bytes [pos, pos + n) (as far as the file has them);
        return pos's index in ``data``."""
        rel = pos - self.base
        if 0 <= rel and rel + n <= len(self.data):
            return rel
        n = min(max(n, _CHUNK), self.size - pos)
        end = self.base + len(self.data)
        if 0 <= rel <= len(self.data):
            # keep what the window has from pos on; read only the rest
            data = self.data[rel:] + self._read(end, pos + n - end)
        else:
            data = self._read(pos, n)
        self.base = pos
        self.data = data
        return 0

    def _read(self, pos: int, n: int) -> bytes:
        if self.fh is None:
            raise ModelFileError(f"{self.path!r} is not open for reading", self.path)
        try:
            self.fh.seek(pos)
            data = self.fh.read(n)
        except (OSError, OverflowError, ValueError) as exc:
            raise ModelFileError(
                f"cannot read model file {self.path!r} at byte {pos}: {exc}", self.path) from None
        if len(data) != n:
            # the file shrank while we read it
            self.size = pos + len(data)
        return data

    def need(self, n: int, what: str) -> int:
        """Check that ``n`` bytes of ``what`` follow; return their index in ``data``."""
        pos = self.pos
        if n > self.size - pos:
            self.fail(pos, f"the file ends inside {what}: {n} bytes needed, "
                           f"{self.size - pos} left (file size {self.size})")
        rel = self.window(pos, n)
        if rel + n > len(self.data):
            self.fail(pos, f"the file ends inside {what} (it shrank while being read)")
        return rel

    def unpack(self, st: struct.Struct, what: str) -> Any:
        rel = self.need(st.size, what)
        self.pos += st.size
        return st.unpack_from(self.data, rel)[0]

    def string(self, what: str, max_len: int = _MAX_STRING_LENGTH) -> bytes:
        start = self.pos
        n = self.unpack(_U64, f"the length of {what}")
        if n > max_len:
            self.fail(start, f"{what} has length {n}, more than the maximum {max_len}")
        rel = self.need(n, what)
        self.pos += n
        return self.data[rel:rel + n]

    def strings(self, count: int, what: str, collect: bool = False,
                unique_ok: bool = False) -> list[bytes] | None:
        """Skip ``count`` length-prefixed strings (the bulk of a tokenizer), or with
        ``collect`` return them as a list of bytes. With ``unique_ok`` as well, strings
        that are all different and non-empty give ``UNIQUE_STRINGS`` instead of a list
        (checked in C, with no object per string)."""
        start = self.pos
        if collect and unique_ok:
            from llamabind._llama import _gguf_strings_unique

            span = min(count * 24 + _READ_AHEAD, _MAX_READ_AHEAD)
            rel = self.window(start, span)
            found = _gguf_strings_unique(self.data, rel, count, rel + span)
            if found is not None and found[1]:
                self.pos = start + (found[0] - rel)
                return UNIQUE_STRINGS
        if collect:
            out = self._collect_fast(count, min(count * 24 + _READ_AHEAD, _MAX_READ_AHEAD))
            if out is not None:
                return out
        if self._skip_fast(count):
            if not collect:
                return None
            end = self.pos
            self.pos = start
            out = self._collect_fast(count, end - start)
            if out is not None:
                return out
        # Find and describe the bad element the slow way.
        self.pos = start
        for i in range(count):
            self.string(f"{what}[{i}]")
        self.fail(start, f"{what} is damaged")  # not reached

    def _skip_fast(self, count: int) -> bool:
        """Skip the strings if they are all well-formed; False if one is not (the
        caller then finds it). The walk runs in C (``_llama._gguf_skip_strings``), one
        window of the file at a time."""
        from llamabind._llama import _gguf_skip_strings

        left = count
        rel = self.window(self.pos, min(count * 16 + _READ_AHEAD, _MAX_READ_AHEAD))
        while True:
            rel, done, bad = _gguf_skip_strings(self.data, rel, left, _MAX_STRING_LENGTH)
            if bad:
                return False
            left -= done
            pos = self.base + rel   # the next string, not wholly in the window
            if not left:
                break
            if pos + 8 > self.size:
                return False
            if done == 0:
                # one string longer than a window: read its length, jump over it
                n = _U64.unpack_from(self.data, self.window(pos, 8))[0]
                if n > _MAX_STRING_LENGTH or n > self.size - pos - 8:
                    return False
                pos += 8 + n
                left -= 1
                if not left:
                    break
            rel = self.window(pos, min(left * 16 + _READ_AHEAD, _MAX_READ_AHEAD))
        self.pos = pos
        return True

    def _collect_fast(self, count: int, span: int) -> list[bytes] | None:
        """The strings as a list, if they all lie within ``span`` bytes; None if not,
        or if one is damaged."""
        from llamabind._llama import _gguf_collect_strings

        start = self.pos
        rel = self.window(start, span)
        found = _gguf_collect_strings(self.data, rel, count, rel + span)
        if found is None:
            return None
        out, end = found
        self.pos = start + (end - rel)
        return out


def _open_checked(path: str, what: str = "model") -> tuple[IO[bytes], int]:
    """Open ``path`` for reading, mapping every failure to a llamabind exception."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelNotFoundError(f"{what} file not found: {path!r}", path) from None
    except NotADirectoryError:
        raise ModelNotFoundError(
            f"{what} file not found (a parent is not a directory): {path!r}", path) from None
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"cannot access {what} file {path!r}: {exc}", path) from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelFileError(f"{what} path is a directory, not a GGUF file: {path!r}", path)
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(
            f"{what} path is not a regular file (a device, pipe or socket?): {path!r}", path)
    if st.st_size == 0:
        raise ModelFileError(f"{what} file is empty: {path!r}", path)
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise ModelFileError(f"cannot open {what} file {path!r}: {exc}", path) from None
    return fh, st.st_size


def _fspath(path: str | os.PathLike[str]) -> str:
    p = os.fspath(path)
    return os.fsdecode(p) if isinstance(p, bytes) else p


def read_header(path: str | os.PathLike[str], *, vocab_only: bool = False,
                overrides: dict[str, Any] | None = None) -> GGUFHeader:
    """Parse and check the header region of a GGUF file.

    Raises ModelNotFoundError for a missing file and ModelFileError for anything
    llama.cpp would refuse or could crash on. With ``vocab_only`` the tensor data need
    not be present in the file (the tensor infos are still checked). ``overrides`` are
    the ``kv_overrides`` the model will be loaded with: the hyperparameter checks use
    the values llama.cpp will see.
    """
    path = _fspath(path)
    hdr = _read(path, vocab_only)
    if not vocab_only:
        _check_hparams(_Reader(None, path, hdr.file_size), hdr, overrides or {})
    return hdr


def _read(path: str, vocab_only: bool) -> GGUFHeader:
    fh, size = _open_checked(path)
    with fh:
        return _parse(_Reader(fh, path, size), vocab_only)


# Files that passed the structural check, by identity: (device, inode, size, mtime,
# ctime, vocab_only). Loading the same file again then costs one stat() instead of a
# parse: any write to a file changes its ctime, which cannot be set back. As with
# git's "racily clean" files, a file changed in the last seconds is not remembered,
# since a timestamp's granularity could hide a second write.
_CHECKED: OrderedDict[tuple[int, ...], GGUFHeader] = OrderedDict()
_CHECKED_MAX = 16
_CHECKED_LOCK = threading.Lock()
_RACY_NS = 3_000_000_000


def _identity(path: str, vocab_only: bool) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < _RACY_NS:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, int(vocab_only))


def check_model_file(path: str | os.PathLike[str], *, vocab_only: bool = False,
                     overrides: dict[str, Any] | None = None) -> None:
    """Raise ModelNotFoundError / ModelFileError if ``path`` cannot be a GGUF model.

    Checks the structure of the whole header region (magic, version, every metadata
    entry, every tensor info, the tensor data's place in the file), the vocabulary
    defects llama.cpp aborts on, and (for a full load) the hyperparameters that
    llama.cpp asserts on instead of reporting an error -- with ``overrides``, the
    ``kv_overrides`` the model will be loaded with, applied. A file that passed is
    remembered, so loading it again does not parse it again.
    """
    path = _fspath(path)
    key = _identity(path, vocab_only)
    with _CHECKED_LOCK:
        hdr = _CHECKED.get(key) if key is not None else None
        if hdr is not None:
            _CHECKED.move_to_end(key)  # type: ignore[arg-type]
    if hdr is None:
        hdr = _read(path, vocab_only)
        if key is not None:
            with _CHECKED_LOCK:
                _CHECKED[key] = hdr
                while len(_CHECKED) > _CHECKED_MAX:
                    _CHECKED.popitem(last=False)
    if not vocab_only:
        _check_hparams(_Reader(None, path, hdr.file_size), hdr, overrides or {})


def check_adapter_file(path: str | os.PathLike[str]) -> None:
    """Raise ModelNotFoundError / ModelFileError if ``path`` cannot be a GGUF LoRA
    adapter: the same structural checks as for a model (the tensor data must be in
    the file), without the vocabulary and hyperparameter checks."""
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    fh, size = _open_checked(path, "LoRA adapter")
    with fh:
        r = _Reader(fh, path, size)
        _parse(r, vocab_only=False, adapter=True)


def _parse(r: _Reader, vocab_only: bool, adapter: bool = False) -> GGUFHeader:
    size = r.size
    r.window(0, _HEADER_SIZE)
    head = r.data[:4]
    if head != GGUF_MAGIC:
        r.fail(0, f"not a GGUF file (magic {head!r}, expected {GGUF_MAGIC!r})")
    if size < _HEADER_SIZE:
        r.fail(size, f"the GGUF header is truncated: it needs {_HEADER_SIZE} bytes, "
                     f"the file has {size}")
    r.pos = 4
    version = r.unpack(_U32, "the version")
    if version not in _SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and version:
            problem = (f"GGUF version {version:#x} looks byte-swapped (a big-endian "
                       "file?); only little-endian files are supported")
        elif version == 1:
            problem = "GGUF version 1 is no longer supported by llama.cpp"
        else:
            problem = f"unsupported GGUF version {version} (supported: 2, 3)"
        r.fail(4, problem)
    n_tensors = r.unpack(_I64, "the tensor count")
    n_kv = r.unpack(_I64, "the metadata count")
    room = size - _HEADER_SIZE
    if n_tensors < 0 or n_tensors * _MIN_TENSOR_INFO_BYTES > room:
        r.fail(8, f"the header says {n_tensors} tensors; that many tensor infos cannot "
                  f"fit in a file of {size} bytes")
    if n_kv < 0 or n_kv * _MIN_KV_BYTES > room:
        r.fail(16, f"the header says {n_kv} metadata entries; that many cannot fit in "
                   f"a file of {size} bytes")
    if n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES > room:
        r.fail(8, f"the header says {n_tensors} tensors and {n_kv} metadata entries; "
                  f"they cannot fit in a file of {size} bytes")

    hdr = GGUFHeader(path=r.path, file_size=size, version=version, n_tensors=n_tensors,
                     n_kv=n_kv, alignment=_DEFAULT_ALIGNMENT)
    for i in range(n_kv):
        kv = _read_kv(r, i)
        if kv.key in hdr.kv:
            r.fail(kv.offset, f"metadata key {_short(kv.key)!r} appears twice (entry {i})")
        hdr.kv[kv.key] = kv
    hdr.tensor_info_offset = r.pos
    _check_metadata(r, hdr, adapter)

    fast = _tensor_infos_fast(r, n_tensors, hdr.alignment)
    if fast is not None and len({info.name for info in fast}) == n_tensors:
        hdr.tensors = fast
    else:
        # what is wrong, and where, the slow way
        seen = set()
        for i in range(n_tensors):
            info = _read_tensor_info(r, i, hdr.alignment)
            if info.name in seen:
                r.fail(info.info_offset,
                       f"tensor name {info.name!r} appears twice (tensor {i})")
            seen.add(info.name)
            hdr.tensors.append(info)
    if adapter:
        if not hdr.tensors:
            r.fail(r.pos, "the adapter file holds no tensors")
        _check_tensor_data(r, hdr, require_data=True)
    else:
        if not hdr.tensors and not vocab_only:
            r.fail(r.pos, "the file holds no tensors (a vocabulary-only GGUF?); "
                          "load it with vocab_only=True")
        _check_tensor_data(r, hdr, require_data=not vocab_only)
    return hdr


def _read_kv(r: _Reader, i: int) -> GGUFKeyValue:
    start = r.pos
    raw = r.string(f"the key of metadata entry {i}")
    if not raw:
        r.fail(start, f"metadata entry {i} has an empty key")
    key = raw.decode("utf-8", "surrogateescape")   # lossless: distinct keys stay distinct
    what = f"metadata {_short(key)!r}"
    type_pos = r.pos
    vtype = r.unpack(_I32, f"the type of {what}")
    if vtype not in _GGUF_TYPES:
        r.fail(type_pos, f"{what} has an invalid value type {vtype} (valid: 0..12)")
    kv = GGUFKeyValue(key=key, type=vtype, offset=start, value_offset=r.pos, end=0)
    if vtype == _T_ARRAY:
        elem_pos = r.pos
        etype = r.unpack(_I32, f"the element type of {what}")
        if etype == _T_ARRAY:
            r.fail(elem_pos, f"{what} is an array of arrays, which llama.cpp does not read")
        if etype not in _GGUF_TYPES:
            r.fail(elem_pos, f"{what} is an array of invalid element type {etype} "
                             "(valid: 0..8, 10..12)")
        count_pos = r.pos
        count = r.unpack(_U64, f"the element count of {what}")
        if count > _MAX_ARRAY_ELEMENTS:
            r.fail(count_pos, f"{what} has {count} elements, more than the maximum "
                              f"{_MAX_ARRAY_ELEMENTS}")
        kv.elem_type = etype
        kv.count = count
        if etype == _T_STRING:
            if count * 8 > _size_left(r):
                r.fail(count_pos, f"{what} has {count} strings; their lengths alone need "
                                  f"{count * 8} bytes, {_size_left(r)} are left")
            tokens = key == "tokenizer.ggml.tokens"
            strings = r.strings(count, what, collect=tokens, unique_ok=tokens)
            if strings is not None:
                kv.value = strings
        else:
            esize = _GGUF_TYPES[etype][1]
            nbytes = count * esize
            if nbytes > _size_left(r):
                r.fail(count_pos, f"{what} has {count} elements of {esize} bytes "
                                  f"({nbytes} bytes); only {_size_left(r)} bytes are left")
            if count <= _KEEP_ARRAY_VALUES:
                rel = r.need(nbytes, what)
                fmt = _SCALAR_FORMATS[etype]
                kv.value = [fmt.unpack_from(r.data, rel + k * esize)[0] for k in range(count)]
            r.pos += nbytes
    elif vtype == _T_STRING:
        kv.value = r.string(f"the value of {what}")
    else:
        kv.value = r.unpack(_SCALAR_FORMATS[vtype], f"the value of {what}")
    kv.end = r.pos
    return kv


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _size_left(r: _Reader) -> int:
    return r.size - r.pos


def _check_metadata(r: _Reader, hdr: GGUFHeader, adapter: bool = False) -> None:
    kv = hdr.kv.get("general.alignment")
    if kv is not None:
        if kv.type != 4:
            r.fail(kv.value_offset, "general.alignment must be a u32, not "
                                    f"{_type_name(kv)}")
        if kv.value == 0 or kv.value & (kv.value - 1):
            r.fail(kv.value_offset, f"general.alignment {kv.value} is not a power of 2")
        hdr.alignment = kv.value
    arch = hdr.kv.get("general.architecture")
    if arch is None:
        r.fail(hdr.tensor_info_offset, "the metadata has no general.architecture")
    if arch.type != _T_STRING:
        r.fail(arch.value_offset, f"general.architecture must be a string, not {_type_name(arch)}")
    if not arch.value:
        r.fail(arch.value_offset, "general.architecture is empty")
    if not adapter:
        _check_token_list(r, hdr)


def _check_token_list(r: _Reader, hdr: GGUFHeader) -> None:
    """llama.cpp aborts (GGML_ASSERT) on a vocabulary with a token text twice."""
    tokens = hdr.kv.get("tokenizer.ggml.tokens")
    model = hdr.kv.get("tokenizer.ggml.model")
    if tokens is None or not isinstance(tokens.value, list):
        return
    texts = tokens.value
    tokens.value = None   # not kept: it can be large
    if model is None or model.type != _T_STRING or model.value in (b"no_vocab", b"none"):
        return  # llama.cpp does not read the token list (or refuses the file)
    if model.value == b"bert":
        _check_wpm_token_types(r, hdr, tokens.count or 0)
    elif model.value == b"rwkv":
        if texts is UNIQUE_STRINGS:  # the RWKV check needs the texts: read them again
            saved, r.pos = r.pos, tokens.value_offset + 12   # after the type and count
            again = r.strings(tokens.count or 0, "tokenizer.ggml.tokens", collect=True)
            r.pos = saved
            assert again is not None
            texts = again
        _check_rwkv_tokens(r, tokens, texts)
    if texts is UNIQUE_STRINGS:
        return
    unique = set(texts)
    if len(unique) == len(texts) and b"" not in unique:
        return
    # llama.cpp renames empty tokens before it indexes them
    for i, text in enumerate(texts):
        if not text:
            texts[i] = b"[EMPTY_%d]" % i
    if len(set(texts)) == len(texts):
        return
    first: dict[bytes, int] = {}
    for i, text in enumerate(texts):
        j = first.setdefault(text, i)
        if j != i:
            r.fail(tokens.value_offset,
                   f"tokenizer.ggml.tokens has the token {text!r} twice (ids {j} and {i}); "
                   "llama.cpp cannot index such a vocabulary")


def _check_wpm_token_types(r: _Reader, hdr: GGUFHeader, n_tokens: int) -> None:
    """A WordPiece ("bert") vocabulary cannot render byte tokens: llama.cpp aborts
    (GGML_ABORT in token_to_byte) while it builds its token-to-piece cache."""
    types = hdr.kv.get("tokenizer.ggml.token_type")
    if (types is None or types.type != _T_ARRAY or types.elem_type != 5
            or types.count is None or types.count < n_tokens):
        return  # no token types, or llama.cpp refuses them with an error
    first = types.value_offset + 12
    saved, r.pos = r.pos, first
    rel = r.need(4 * n_tokens, "tokenizer.ggml.token_type")
    r.pos = saved
    values = array.array("i", r.data[rel:rel + 4 * n_tokens])
    if sys.byteorder != "little":
        values.byteswap()
    if _TOKEN_TYPE_BYTE in values:
        i = values.index(_TOKEN_TYPE_BYTE)
        r.fail(first + 4 * i, f"token {i} has type BYTE (6), which a WordPiece "
                              "(tokenizer.ggml.model 'bert') vocabulary cannot render")


def _unescape_rwkv(text: bytes, signed_char: bool) -> bytes:
    """llama_unescape_rwkv_token: ``\\t \\n \\r \\xHH`` and ``\\<c>`` escapes. The hex
    digits are not validated there, and what a non-ASCII "digit" gives depends on
    whether char is signed, hence ``signed_char``."""
    out = bytearray()
    escaping = False
    hex_left = 0
    acc = 0
    for b in text:
        c = b - 256 if signed_char and b >= 128 else b
        if hex_left:
            value = (c - 97 + 10) if c >= 97 else (c - 48)
            acc = ((acc << 4) + value) & 0xFF
            hex_left -= 1
            if not hex_left:
                out.append(acc)
                acc = 0
        elif escaping:
            if b == 0x74:      # t
                out.append(9)
            elif b == 0x6E:    # n
                out.append(10)
            elif b == 0x72:    # r
                out.append(13)
            elif b == 0x78:    # x
                hex_left = 2
            else:
                out.append(b)
            escaping = False
        elif b == 0x5C:        # backslash
            escaping = True
        else:
            out.append(b)
    return bytes(out)


def _check_rwkv_tokens(r: _Reader, tokens: GGUFKeyValue, texts: list[bytes]) -> None:
    """llama.cpp's RWKV tokenizer loops forever, allocating without bound, on text
    that ends in a byte that starts some token but is no token by itself (and it
    tokenizes "\\n" while loading). Every byte that starts a token must be a token."""
    starts: set[int] = set()
    singles: set[int] | None = None
    for signed_char in (True, False):   # both, where it matters: be safe on any platform
        one: set[int] = set()
        for text in texts:
            plain = text if b"\\" not in text else _unescape_rwkv(text, signed_char)
            if plain:
                starts.add(plain[0])
                if len(plain) == 1:
                    one.add(plain[0])
        singles = one if singles is None else singles & one
    missing = sorted(starts - (singles or set()))
    if missing:
        r.fail(tokens.value_offset, f"RWKV vocabulary: tokens start with byte "
                                    f"{missing[0]:#04x} but no token is that byte alone; "
                                    "llama.cpp's RWKV tokenizer never ends on such text")


def _type_name(kv: GGUFKeyValue) -> str:
    if kv.type == _T_ARRAY and kv.elem_type is not None:
        return f"an array of {_GGUF_TYPES[kv.elem_type][0]}"
    return _GGUF_TYPES[kv.type][0]


def _read_tensor_info(r: _Reader, i: int, align: int) -> GGUFTensorInfo:
    start = r.pos
    raw = r.string(f"the name of tensor {i}")
    if len(raw) >= _MAX_NAME:
        r.fail(start, f"the name of tensor {i} is {len(raw)} bytes long; names must be "
                      f"shorter than {_MAX_NAME} bytes")
    name = raw.decode("utf-8", "surrogateescape")
    what = f"tensor {name!r}"
    dims_pos = r.pos
    n_dims = r.unpack(_U32, f"the dimension count of {what}")
    if n_dims > _MAX_DIMS:
        r.fail(dims_pos, f"{what} has {n_dims} dimensions; at most {_MAX_DIMS} are allowed")
    shape: list[int] = []
    nelements = 1
    for d in range(n_dims):
        dim_pos = r.pos
        ne = r.unpack(_I64, f"dimension {d} of {what}")
        if ne <= 0:
            r.fail(dim_pos, f"dimension {d} of {what} is {ne}; it must be positive")
        nelements *= ne
        if nelements > _INT64_MAX:
            r.fail(dim_pos, f"{what} has shape {(*shape, ne)}: its element count overflows "
                            "int64")
        shape.append(ne)
    type_pos = r.pos
    gtype = r.unpack(_I32, f"the type of {what}")
    traits = _GGML_TYPES.get(gtype)
    if traits is None:
        if 0 <= gtype < _GGML_TYPE_COUNT:
            problem = f"{what} has ggml type {gtype}, which was removed from ggml"
        else:
            problem = f"{what} has an invalid ggml type {gtype} (valid: 0..{_GGML_TYPE_COUNT - 1})"
        r.fail(type_pos, problem)
    tname, blck, tsize = traits
    if len(shape) <= 1 and gtype != _GGML_F32:
        # Vectors (norm weights, biases, frequency factors) enter element-wise ggml
        # operations with f32 activations, which abort on any other type; converters
        # always store them as f32.
        r.fail(type_pos, f"{what} is a vector of type {tname}; llama.cpp needs 1-D "
                         "tensors in f32")
    row = shape[0] if shape else 1
    if row % blck:
        r.fail(type_pos, f"{what} of type {tname} has {row} elements per row, not a multiple "
                         f"of the type's block size {blck}")
    nbytes = nelements // blck * tsize
    if nbytes > _SIZE_MAX - (align - 1):
        r.fail(type_pos, f"{what} has shape {tuple(shape)}: its size in bytes overflows")
    off_pos = r.pos
    offset = r.unpack(_U64, f"the data offset of {what}")
    return GGUFTensorInfo(name=name, shape=tuple(shape), ggml_type=gtype, offset=offset,
                          info_offset=start, nbytes=nbytes, offset_pos=off_pos)


_TENSOR_INFO_GUESS = 96    # bytes per tensor info to read ahead (a name of ~30 bytes)


def _tensor_infos_fast(r: _Reader, count: int, align: int) -> list[GGUFTensorInfo] | None:
    """The tensor infos, if every one of them is well-formed (the same checks as
    :func:`_read_tensor_info`, in one loop over one window of the file, with no error
    text made); None if one is not, or if they do not lie in the window: the caller then
    reads them one by one and says what is wrong. ``r.pos`` moves past them only on
    success."""
    start = r.pos
    span = min(count * _TENSOR_INFO_GUESS + _READ_AHEAD, _MAX_READ_AHEAD, r.size - start)
    base = r.window(start, span)
    data = r.data
    end = len(data)
    u32, i32 = _U32.unpack_from, _I32.unpack_from
    u64 = _U64.unpack_from
    types = _GGML_TYPES
    out: list[GGUFTensorInfo] = []
    at = base
    for _ in range(count):
        if at + 12 > end:
            return None
        info_at = at
        n = u64(data, at)[0]
        if n >= _MAX_NAME or at + 8 + n + 4 > end:
            return None
        name = data[at + 8:at + 8 + n].decode("utf-8", "surrogateescape")
        at += 8 + n
        n_dims = u32(data, at)[0]
        at += 4
        if n_dims > _MAX_DIMS or at + 8 * n_dims + 12 > end:
            return None
        shape = struct.unpack_from(f"<{n_dims}q", data, at)
        at += 8 * n_dims
        nelements = 1
        for ne in shape:
            if ne <= 0:
                return None
            nelements *= ne
        if nelements > _INT64_MAX:
            return None
        gtype = i32(data, at)[0]
        traits = types.get(gtype)
        if traits is None or (n_dims <= 1 and gtype != _GGML_F32):
            return None
        _, blck, tsize = traits
        if (shape[0] if shape else 1) % blck:
            return None
        nbytes = nelements // blck * tsize
        if nbytes > _SIZE_MAX - (align - 1):
            return None
        offset = u64(data, at + 4)[0]
        off_pos = r.base + at + 4
        at += 12
        out.append(GGUFTensorInfo(name=name, shape=shape, ggml_type=gtype, offset=offset,
                                  info_offset=r.base + info_at, nbytes=nbytes,
                                  offset_pos=off_pos))
    r.pos = r.base + at
    return out


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _check_tensor_data(r: _Reader, hdr: GGUFHeader, require_data: bool) -> None:
    """Tensor offsets as llama.cpp computes them and, with ``require_data``, the tensor
    data inside the file."""
    align = hdr.alignment
    infos_end = r.pos
    if hdr.n_tensors == 0:
        hdr.data_offset = infos_end
        return
    data_offset = _pad(infos_end, align)
    if data_offset > r.size:
        r.fail(infos_end, f"the file ends before its tensor data (which would start at "
                          f"byte {data_offset}; file size {r.size})")
    hdr.data_offset = data_offset
    expected = 0
    for info in hdr.tensors:
        info_end = info.offset_pos
        if info.offset % align:
            r.fail(info_end, f"tensor {info.name!r} has data offset {info.offset}, not a "
                             f"multiple of the alignment {align}")
        if info.offset != expected:
            r.fail(info_end, f"tensor {info.name!r} has data offset {info.offset}; after "
                             f"the tensors before it, it must be {expected}")
        if require_data and data_offset + info.offset + info.nbytes > r.size:
            r.fail(data_offset + info.offset,
                   f"the data of tensor {info.name!r} ({info.nbytes} bytes at byte "
                   f"{data_offset + info.offset}) runs past the end of the file "
                   f"(size {r.size}): the file is truncated")
        expected += _pad(info.nbytes, align)
        if expected > _SIZE_MAX:
            r.fail(info_end, f"the tensor data up to tensor {info.name!r} is larger than "
                             "2^64 bytes")
    hdr.data_size = expected


# --- hyperparameters ------------------------------------------------------------------
# llama.cpp reads these while loading any architecture and checks them with
# GGML_ASSERT (which aborts the process) rather than with an error it can report, or
# passes them on to operations that assert at the first decode.

_LLAMA_MAX_LAYERS = 512
_LLAMA_MAX_EXPERTS = 1024
_ROPE_SCALING_TYPES = (b"none", b"linear", b"yarn", b"longrope")
_U32_TYPES = (4,)          # get_key<uint32_t> accepts only u32 values
_UNREADABLE = object()     # a value llama.cpp refuses with an error
_F32_TYPES = (6,)


class _HParams:
    """Typed access to ``{arch}.*`` values, as llama.cpp's get_key sees them: a
    kv_override of the right kind wins; a value of another type is ignored here (llama.cpp
    refuses it with an error)."""

    def __init__(self, hdr: GGUFHeader, overrides: dict[str, Any]) -> None:
        self.hdr = hdr
        self.arch = hdr.kv["general.architecture"].value.decode("utf-8", "surrogateescape")
        self.overrides = overrides

    def key(self, suffix: str) -> str:
        return f"{self.arch}.{suffix}"

    def offset(self, key: str) -> int:
        kv = self.hdr.kv.get(key)
        return kv.value_offset if kv is not None else self.hdr.tensor_info_offset

    def u32(self, key: str) -> int | None:
        if key in self.overrides:
            v = self.overrides[key]
            if isinstance(v, int) and not isinstance(v, bool):
                return v & 0xFFFFFFFF       # stored into a uint32_t
        kv = self.hdr.kv.get(key)
        if kv is not None and kv.type in _U32_TYPES:
            return int(kv.value)
        return None

    def u32_or_max(self, key: str, n_layer: int) -> Any:
        """A per-layer count given as one value or as an array of n_layer values: its
        maximum; None where absent; _UNREADABLE where llama.cpp refuses it (wrong type,
        wrong array length)."""
        kv = self.hdr.kv.get(key)
        if key in self.overrides or kv is None:
            return self.u32(key)
        if kv.type != _T_ARRAY:
            v = self.u32(key)
            return _UNREADABLE if v is None else v
        if kv.elem_type not in (4, 5, 7) or kv.count != n_layer or kv.value is None:
            return _UNREADABLE
        if kv.elem_type == 7:
            return max((1 if v else 0 for v in kv.value), default=0)
        return max((v & 0xFFFFFFFF for v in kv.value), default=0)

    def f32(self, key: str) -> float | None:
        if key in self.overrides:
            v = self.overrides[key]
            if isinstance(v, float):
                return v
        kv = self.hdr.kv.get(key)
        if kv is not None and kv.type in _F32_TYPES:
            return float(kv.value)
        return None

    def string(self, key: str) -> bytes | None:
        if key in self.overrides:
            v = self.overrides[key]
            if isinstance(v, str):
                return v.encode("utf-8")
        kv = self.hdr.kv.get(key)
        if kv is not None and kv.type == _T_STRING:
            return bytes(kv.value)
        return None


def _check_hparams(r: _Reader, hdr: GGUFHeader, overrides: dict[str, Any]) -> None:
    hp = _HParams(hdr, overrides)

    def fail(key: str, problem: str) -> NoReturn:
        source = " (from kv_overrides)" if key in overrides else ""
        r.fail(hp.offset(key), f"{key}{source} {problem}")

    key = hp.key("block_count")
    n_layer = hp.u32(key)
    if n_layer is not None and not 0 < n_layer <= _LLAMA_MAX_LAYERS:
        fail(key, f"is {n_layer}; llama.cpp supports 1..{_LLAMA_MAX_LAYERS} layers")
    if n_layer is None:
        return  # llama.cpp reports the missing (or mistyped) key itself

    key = hp.key("nextn_predict_layers")
    nextn = hp.u32(key)
    if nextn is not None and nextn > n_layer:
        fail(key, f"is {nextn}, more than the {n_layer} layers")
    for sub in ("posnet.block_count", "convnext.block_count"):
        key = hp.key(sub)
        v = hp.u32(key)
        if v is not None and v > n_layer:
            fail(key, f"is {v}, more than the {n_layer} layers")

    _check_experts(hp, fail, n_layer)

    key = hp.key("rope.scaling.type")
    scaling = hp.string(key)
    if scaling is not None and scaling not in _ROPE_SCALING_TYPES:
        fail(key, f"is {scaling!r}; llama.cpp knows "
                  f"{', '.join(t.decode() for t in _ROPE_SCALING_TYPES)}")

    # Normalisation epsilons reach ggml's norm operations, which assert eps >= 0.
    prefix = hp.arch + "."
    keys = set(k for k in hdr.kv if k.startswith(prefix)) | set(
        k for k in overrides if isinstance(k, str) and k.startswith(prefix))
    for key in sorted(keys):
        last = key.rsplit(".", 1)[-1]
        if "epsilon" in last or last == "eps" or last.endswith("_eps"):
            eps = hp.f32(key)
            if eps is not None and not (eps >= 0.0 and eps != float("inf")):
                fail(key, f"is {eps!r}; it must be a finite number >= 0")


def _check_experts(hp: _HParams, fail: Callable[[str, str], NoReturn], n_layer: int) -> None:
    """The expert counts llama.cpp asserts on (llama_model_base::load_hparams)."""
    k_count = hp.key("expert_count")
    k_used = hp.key("expert_used_count")
    k_groups = hp.key("expert_group_count")
    k_group_used = hp.key("expert_group_used_count")
    n_used = hp.u32_or_max(k_used, n_layer)
    if n_used is _UNREADABLE:
        return  # llama.cpp refuses the value with an error
    n_expert = hp.u32(k_count) or 0
    n_used = n_used or 0
    n_groups = hp.u32(k_groups) or 0
    n_group_used = hp.u32(k_group_used) or 0
    if hp.arch in ("hunyuan_vl", "hunyuan-dense") and n_expert <= 1:
        n_expert = n_used = 0   # llama.cpp turns these into dense models
    if n_expert > _LLAMA_MAX_EXPERTS:
        fail(k_count, f"is {n_expert}; llama.cpp supports at most {_LLAMA_MAX_EXPERTS} experts")
    if n_used > n_expert:
        fail(k_used, f"is {n_used}, more than the {n_expert} experts ({k_count})")
    if n_expert > 0:
        if n_used == 0:
            fail(k_used, f"is 0 or missing, but the model has {n_expert} experts")
        if n_groups >= n_expert:
            fail(k_groups, f"is {n_groups}; it must be less than the {n_expert} experts")
        if n_groups > 1:
            if n_expert % n_groups:
                fail(k_groups, f"is {n_groups}, which does not divide the {n_expert} experts")
            if not 0 < n_group_used < n_groups:
                fail(k_group_used, f"is {n_group_used}; it must be in 1..{n_groups - 1}")
    elif n_groups:
        fail(k_groups, f"is {n_groups}, but the model has no experts")

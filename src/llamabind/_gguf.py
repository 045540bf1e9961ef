"""Checks on a GGUF file before llama.cpp sees it.

The file is read by ggml's own GGUF reader (gguf.h, through ``_llama.GGUFFile``), the
one llama.cpp loads it with: a structurally broken file (magic, version, counts,
strings, value and tensor types, shapes, tensor offsets) is refused there, with
ggml's description of the problem. ggml never aborts or allocates more than the file
can hold on such files (tests/test_model_files.py keeps the list of what it catches).

ggml allocates what a count or a length in the file asks for before it finds that the
data is not there (32 bytes per string of an array, up to the file's size): a damaged
count in a large file would take gigabytes. So ggml may read only the first
``MAX_HEADER_BYTES`` (128 MiB) of a file for its metadata and tensor infos, eight
times the largest header among llama.cpp's vocabulary files (Gemma 4's, 15 MiB); a
file whose header does not end there is refused.

What ggml accepts but llama.cpp would abort the process on (a failed ``GGML_ASSERT``)
or never finish is checked here, through gguf.h's accessors: files that are not
regular files (ggml would block on a pipe), tensor data cut off by the end of the
file, norm weights and biases that are not f32, vocabularies that llama.cpp cannot
index or render, and hyperparameters it asserts on. Every refusal is a
:class:`~llamabind.errors.ModelFileError` naming the file and the problem.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from llamabind.errors import ModelFileError, ModelNotFoundError

if TYPE_CHECKING:
    from llamabind._llama import GGUFFile

__all__ = ["MAX_HEADER_BYTES", "check_adapter_file", "check_model_file", "read_file"]

MAX_HEADER_BYTES = 128 << 20

# The {arch}.* metadata a check needs again for other kv_overrides: key -> (gguf type
# name, value as _llama.GGUFFile.value gives it).
_Values = dict[str, tuple[str, Any]]

_TOKEN_TYPE_BYTE = 6             # LLAMA_TOKEN_TYPE_BYTE, in tokenizer.ggml.token_type
_ALL = 1 << 62                   # GGUFFile.value(key, _ALL): an array with all its items
_LLAMA_MAX_LAYERS = 512
_LLAMA_MAX_EXPERTS = 1024
_ROPE_SCALING_TYPES = (b"none", b"linear", b"yarn", b"longrope")

# The hyperparameters of a file that passed the other checks, by file identity:
# (device, inode, size, mtime, ctime, vocab_only). Loading the same file again then
# costs one stat() instead of a read: any write to a file changes its ctime, which
# cannot be set back. As with git's "racily clean" files, a file changed in the last
# seconds is not remembered, since a timestamp's granularity could hide a second write.
_CHECKED: OrderedDict[tuple[int, ...], _Values] = OrderedDict()
_CHECKED_MAX = 16
_CHECKED_LOCK = threading.Lock()
_RACY_NS = 3_000_000_000


def _fail(path: str, problem: str) -> NoReturn:
    raise ModelFileError(f"invalid GGUF file {path!r}: {problem}", path)


def _fspath(path: str | os.PathLike[str]) -> str:
    p = os.fspath(path)
    return os.fsdecode(p) if isinstance(p, bytes) else p


def read_file(path: str | os.PathLike[str], what: str = "model") -> GGUFFile:
    """The file's header as ggml reads it, after the checks that the path is a
    non-empty regular file."""
    from llamabind._llama import GGUFFile

    path = _fspath(path)
    try:
        # non-blocking: opening a pipe must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ModelNotFoundError(f"{what} file not found: {path!r}", path) from None
    except NotADirectoryError:
        raise ModelNotFoundError(
            f"{what} file not found (a parent is not a directory): {path!r}", path) from None
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"cannot open {what} file {path!r}: {exc}", path) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ModelFileError(f"{what} path is a directory, not a GGUF file: {path!r}", path)
        if not stat.S_ISREG(st.st_mode):
            raise ModelFileError(
                f"{what} path is not a regular file (a device, pipe or socket?): {path!r}", path)
        if st.st_size == 0:
            raise ModelFileError(f"{what} file is empty: {path!r}", path)
        try:
            return GGUFFile(fd, min(st.st_size, MAX_HEADER_BYTES), path)
        except ModelFileError as exc:
            if st.st_size <= MAX_HEADER_BYTES:
                raise
            raise ModelFileError(f"{exc} (llamabind reads a GGUF file's metadata and tensor "
                                 f"infos from its first {MAX_HEADER_BYTES >> 20} MiB only)",
                                 path) from None
    finally:
        os.close(fd)


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

    ggml reads the header (metadata and tensor infos); then the tensor data's place in
    the file, the vocabulary defects llama.cpp aborts on, and (for a full load) the
    hyperparameters it asserts on are checked -- with ``overrides``, the
    ``kv_overrides`` the model will be loaded with, applied. A file that passed is
    remembered, so loading it again does not read it again.
    """
    path = _fspath(path)
    key = _identity(path, vocab_only)
    with _CHECKED_LOCK:
        hparams = _CHECKED.get(key) if key is not None else None
        if hparams is not None:
            _CHECKED.move_to_end(key)  # type: ignore[arg-type]
    if hparams is None:
        gguf = read_file(path)
        _check_tensors(gguf, path, vocab_only, "model")
        arch = _architecture(gguf, path)
        _check_vocabulary(gguf, path)
        hparams = gguf.values(arch + ".")
        hparams["general.architecture"] = ("str", arch)
        if key is not None:
            with _CHECKED_LOCK:
                _CHECKED[key] = hparams
                while len(_CHECKED) > _CHECKED_MAX:
                    _CHECKED.popitem(last=False)
    if not vocab_only:
        _check_hparams(path, hparams, overrides or {})


def check_adapter_file(path: str | os.PathLike[str]) -> None:
    """Raise ModelNotFoundError / ModelFileError if ``path`` cannot be a GGUF LoRA
    adapter: what ggml checks, and the tensor data inside the file."""
    path = _fspath(path)
    _check_tensors(read_file(path, "LoRA adapter"), path, False, "adapter")


def _check_tensors(gguf: GGUFFile, path: str, vocab_only: bool, what: str) -> None:
    """Tensors llama.cpp can load: some (unless only the vocabulary is loaded), their
    data inside the file, norm weights and biases in f32."""
    tensors = gguf.tensors()
    if not tensors:
        if what == "adapter":
            _fail(path, "the adapter file holds no tensors")
        if not vocab_only:
            _fail(path, "the file holds no tensors (a vocabulary-only GGUF?); "
                        "load it with vocab_only=True")
        return
    if not vocab_only:
        size = os.path.getsize(path)
        # ggml checked that the tensors lie one after another: the last one ends the data
        name, _, _, offset, nbytes = tensors[-1]
        end = gguf.data_offset + offset + nbytes
        if end > size:
            _fail(path, f"the data of tensor {name!r} ends at byte {end}, past the end "
                        f"of the file (size {size}): the file is truncated")
    for name, ne, type_name, _, _ in tensors:
        # Norm weights and biases enter element-wise ggml operations with f32
        # activations, which abort on any other type (converters store them as f32).
        # They are told by name: a vector of another type can be a matrix of one row
        # (a rank-1 LoRA, a one-class classifier head), and gguf.h does not say how many
        # dimensions the file gave a tensor (llama.cpp goes by ne alone).
        if (ne[1] == ne[2] == ne[3] == 1 and type_name != "f32"
                and ("norm" in name or name.endswith(".bias"))):
            _fail(path, f"tensor {name!r} (a norm weight or bias) has type {type_name}; "
                        "llama.cpp needs them in f32")


def _architecture(gguf: GGUFFile, path: str) -> str:
    kind = gguf.kind("general.architecture")
    if kind is None:
        _fail(path, "the metadata has no general.architecture")
    if kind != "str":
        if kind == "arr":
            kind = f"an array of {gguf.value('general.architecture', 0)[0]}"
        _fail(path, f"general.architecture must be a string, not {kind}")
    arch = gguf.value("general.architecture")
    if not arch:
        _fail(path, "general.architecture is empty")
    return str(arch.decode("utf-8", "surrogateescape"))


# --- the vocabulary ----------------------------------------------------------------------

def _check_vocabulary(gguf: GGUFFile, path: str) -> None:
    """What llama.cpp aborts (GGML_ASSERT / GGML_ABORT) or loops forever on while it
    builds the vocabulary."""
    model = gguf.value("tokenizer.ggml.model")
    if not isinstance(model, bytes) or model in (b"no_vocab", b"none"):
        return  # llama.cpp does not read the token list (or refuses the file)
    tokens = "tokenizer.ggml.tokens"
    found = gguf.duplicate_string(tokens)
    if found is not None:
        first, second, text = found
        _fail(path, f"{tokens} has the token {text!r} twice (ids {first} and {second}); "
                    "llama.cpp cannot index such a vocabulary")
    if model == b"bert":
        # A WordPiece vocabulary cannot render byte tokens: llama.cpp aborts in
        # token_to_byte while it builds its token-to-piece cache.
        types = gguf.value("tokenizer.ggml.token_type", _ALL)
        n_tokens = gguf.value(tokens, 0)
        # (llama.cpp refuses other types, or fewer types than tokens, with an error)
        if (isinstance(types, tuple) and types[0] == "i32" and isinstance(n_tokens, tuple)
                and types[1] >= n_tokens[1] and _TOKEN_TYPE_BYTE in types[2][:n_tokens[1]]):
            i = types[2].index(_TOKEN_TYPE_BYTE)
            _fail(path, f"token {i} has type BYTE ({_TOKEN_TYPE_BYTE}), which a WordPiece "
                        "(tokenizer.ggml.model 'bert') vocabulary cannot render")
    elif model == b"rwkv":
        texts = gguf.value(tokens, _ALL)
        if isinstance(texts, tuple) and texts[0] == "str":
            _check_rwkv_tokens(path, texts[2])


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


def _check_rwkv_tokens(path: str, texts: list[bytes]) -> None:
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
        _fail(path, f"RWKV vocabulary: tokens start with byte {missing[0]:#04x} but no "
                    "token is that byte alone; llama.cpp's RWKV tokenizer never ends on "
                    "such text")


# --- hyperparameters ------------------------------------------------------------------
# llama.cpp reads these while loading any architecture and checks them with
# GGML_ASSERT (which aborts the process) rather than with an error it can report, or
# passes them on to operations that assert at the first decode.

_UNREADABLE = object()     # a value llama.cpp refuses with an error


class _HParams:
    """Typed access to ``{arch}.*`` values (``key -> (gguf type name, value)``), as
    llama.cpp's get_key sees them: a kv_override of the right kind wins; a value of
    another type is ignored here (llama.cpp refuses it with an error)."""

    def __init__(self, values: _Values, overrides: dict[str, Any]) -> None:
        self.values = values
        self.arch = values["general.architecture"][1]
        self.overrides = overrides

    def key(self, suffix: str) -> str:
        return f"{self.arch}.{suffix}"

    def _file_value(self, key: str, kind: str) -> Any:
        found = self.values.get(key)
        return found[1] if found is not None and found[0] == kind else None

    def u32(self, key: str) -> int | None:
        if key in self.overrides:
            v = self.overrides[key]
            if isinstance(v, int) and not isinstance(v, bool):
                return v & 0xFFFFFFFF       # stored into a uint32_t
        return self._file_value(key, "u32")  # type: ignore[no-any-return]

    def u32_or_max(self, key: str, n_layer: int) -> Any:
        """A per-layer count given as one value or as an array of n_layer values: its
        maximum; None where absent; _UNREADABLE where llama.cpp refuses it (wrong type,
        wrong array length)."""
        found = self.values.get(key)
        if key in self.overrides or found is None:
            return self.u32(key)
        if found[0] != "arr":
            v = self.u32(key)
            return _UNREADABLE if v is None else v
        elem, count, items = found[1]
        if elem not in ("u32", "i32", "bool") or count != n_layer or items is None:
            return _UNREADABLE
        return max((int(x) & 0xFFFFFFFF for x in items), default=0)

    def f32(self, key: str) -> float | None:
        if key in self.overrides:
            v = self.overrides[key]
            if isinstance(v, float):
                return v
        return self._file_value(key, "f32")  # type: ignore[no-any-return]

    def string(self, key: str) -> bytes | None:
        if key in self.overrides:
            v = self.overrides[key]
            if isinstance(v, str):
                return v.encode("utf-8")
        return self._file_value(key, "str")  # type: ignore[no-any-return]


def _check_hparams(path: str, values: _Values, overrides: dict[str, Any]) -> None:
    hp = _HParams(values, overrides)

    def fail(key: str, problem: str) -> NoReturn:
        source = " (from kv_overrides)" if key in overrides else ""
        _fail(path, f"{key}{source} {problem}")

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
    keys = {k for k in values if k.startswith(prefix)} | {
        k for k in overrides if isinstance(k, str) and k.startswith(prefix)}
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

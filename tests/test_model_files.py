"""Damaged, wrong and odd model files: every one must give a typed llamabind error
that names the file, never a crash.

Two layers:

* ``check_model_file`` on small GGUF files built here byte by byte, checking the
  exception type, the file name and the problem named in the message;
* ``llamabind.Model(...)`` on damaged copies of the real test model, each load in a
  child process, in test_damaged_models.py.

Who catches what (measured on these files, on the model cases and on the fuzz
mutations of test_fuzz_gguf.py, each run in a child process):

ggml's own reader (gguf.h, ``_llama.GGUFFile``) refuses, returning NULL without
aborting or hanging, every structural defect: a wrong magic, a truncated or
byte-swapped header, versions 0, 1 and > 3, negative or oversized counts, empty and
duplicate keys, invalid value and element types (nested arrays included), strings
longer than 1 GiB or than what is left of the file, arrays larger than what is left,
alignment that is not a power-of-2 u32, tensor names of 64 bytes or more, duplicate
tensor names, more than 4 dimensions, negative dimensions, element counts or sizes
that overflow, invalid, removed and out-of-range ggml types, rows that are not a
multiple of the block size, and tensor offsets out of place. One defect costs memory
there: ggml allocates 32 bytes per string an array's count announces, as long as the
rest of the file could hold their lengths (a damaged count in a 469 MiB file: 1.9 GB
and 2.4 s before the refusal); llamabind hands ggml only the first 128 MiB of a file
(``test_absurd_count_is_refused_within_bounded_memory``).

llamabind must check what ggml accepts and llama.cpp then aborts (GGML_ASSERT /
GGML_ABORT) or hangs on (each measured with the check switched off): a pipe (ggml
would block reading it), norm weights and biases not in f32 (abort at the first
decode, ``binary_op: unsupported types``), the same token text twice (abort), BYTE
tokens in a WordPiece vocabulary (abort), an RWKV vocabulary whose tokenizer never
ends (hang), and the hyperparameters llama.cpp asserts on (zero or too many layers,
expert counts, a negative norm epsilon, nextn layers), with the load's
``kv_overrides`` applied. Three more are refused here although llama.cpp reports them
itself, for a clearer typed error: tensor data cut off by the end of the file (a
truncated download), a file without tensors loaded as a full model, a file without
``general.architecture``. A zero-size tensor passes ggml and the check; llama.cpp
refuses its shape (test_damaged_models.py, ``tensor_dim_zero``).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from _gguf_layout import read_layout
from _subproc import run_python
from test_fuzz_gguf import _enc_str, _enc_value, write_sparse

from llamabind import _gguf
from llamabind._gguf import check_model_file, read_file
from llamabind.errors import LlamaError, ModelFileError, ModelNotFoundError

# --- building small GGUF files ------------------------------------------------------

U32, I32, F32, BOOL, STR, ARR, U64 = 4, 5, 6, 7, 8, 9, 10


def kv(key: str, gtype: int, value) -> bytes:
    return _enc_str(key.encode()) + _enc_value(gtype, value)


def tensor_info(name: str, shape, ggml_type: int, offset: int) -> bytes:
    return (_enc_str(name.encode()) + struct.pack("<I", len(shape))
            + b"".join(struct.pack("<q", d) for d in shape)
            + struct.pack("<iQ", ggml_type, offset))


BASE_KVS = [("general.architecture", STR, "llama"),
            ("tokenizer.ggml.model", STR, "gpt2"),
            ("tokenizer.ggml.tokens", ARR, (STR, ["a", "b", "c"]))]
# one f32 tensor of 8 elements (32 bytes)
BASE_TENSORS = [("t.weight", (8,), 0)]


def gguf(kvs=None, tensors=None, *, version=3, n_kv=None, n_tensors=None, align=32,
         extra_kv_bytes=b"", data_len=None) -> bytes:
    """A GGUF file: metadata ``kvs`` (key, type, value), tensors (name, shape, type) laid
    out one after another, tensor data of zeros."""
    kvs = BASE_KVS if kvs is None else kvs
    tensors = BASE_TENSORS if tensors is None else tensors
    body = b"".join(kv(*e) for e in kvs) + extra_kv_bytes
    infos = b""
    offset = 0
    for name, shape, gtype in tensors:
        infos += tensor_info(name, shape, gtype, offset)
        blck, tsize = {0: (1, 4), 1: (1, 2), 2: (32, 18), 8: (32, 34)}[gtype]
        n = 1
        for d in shape:
            n *= d
        offset += -(-(n // blck * tsize) // align) * align
    head = struct.pack("<4sIqq", b"GGUF", version,
                       len(tensors) if n_tensors is None else n_tensors,
                       len(kvs) if n_kv is None else n_kv) + body + infos
    if tensors:
        head += b"\0" * (-len(head) % align)
    return head + b"\0" * (offset if data_len is None else data_len)


def put(tmp_path: Path, data: bytes, name="model.gguf") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def refused(path: str, *, vocab_only=False, match=None, overrides=None):
    """check_model_file must raise ModelFileError naming the file (and the problem)."""
    with pytest.raises(ModelFileError) as info:
        check_model_file(path, vocab_only=vocab_only, overrides=overrides)
    msg = str(info.value)
    assert repr(path) in msg, msg
    assert info.value.path == path
    if match is not None:
        assert match in msg, msg
    return msg


# --- check_model_file on built files ------------------------------------------------

def test_builder_makes_a_valid_file(tmp_path):
    path = put(tmp_path, gguf())
    check_model_file(path)
    gguf_file = read_file(path)
    assert gguf_file.keys() == [k for k, _, _ in BASE_KVS]
    assert gguf_file.tensors() == [("t.weight", (8, 1, 1, 1), "f32", 0, 32)]
    offset = gguf_file.data_offset
    assert offset % 32 == 0 and offset + 32 == os.path.getsize(path)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.gguf")
    with pytest.raises(ModelNotFoundError) as info:
        check_model_file(path)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, LlamaError)
    assert repr(path) in str(info.value)


def test_missing_parent_is_not_found(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError):
        check_model_file(str(tmp_path / "file" / "model.gguf"))


def test_directory(tmp_path):
    refused(str(tmp_path), match="directory")


def test_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "pipe.gguf"
    os.mkfifo(path)
    refused(str(path), match="not a regular file")


def test_empty_file(tmp_path):
    refused(put(tmp_path, b""), match="empty")


@pytest.mark.parametrize("data", [b"G", b"GGU", b"GGML" + b"\0" * 40, b"\0" * 100,
                                  b"PK\x03\x04" + b"\0" * 60])
def test_wrong_magic(tmp_path, data):
    refused(put(tmp_path, data), match="magic")


@pytest.mark.parametrize("cut", [4, 5, 8, 12, 16, 23])
def test_truncated_header(tmp_path, cut):
    refused(put(tmp_path, gguf()[:cut]), match="failed to read")


@pytest.mark.parametrize("version, text", [(0, "bad GGUF version: 0"),
                                           (1, "GGUFv1 is no longer supported"),
                                           (4, "version 4 but"),
                                           (0x03000000, "mismatch between the host and model "
                                                        "endianness"),
                                           (0xFFFFFFFF, "version 4294967295 but")])
def test_bad_version(tmp_path, version, text):
    refused(put(tmp_path, gguf(version=version)), match=text)


def test_version_2_is_accepted(tmp_path):
    check_model_file(put(tmp_path, gguf(version=2)))


@pytest.mark.parametrize("n_kv", [-1, 2, 1 << 40, (1 << 63) - 1])
def test_wrong_metadata_count(tmp_path, n_kv):
    refused(put(tmp_path, gguf(n_kv=n_kv)))


@pytest.mark.parametrize("n_tensors", [-1, 2, 1 << 40, (1 << 63) - 1])
def test_wrong_tensor_count(tmp_path, n_tensors):
    refused(put(tmp_path, gguf(n_tensors=n_tensors)))


def test_every_truncation_of_a_small_file_is_refused(tmp_path):
    data = gguf()
    path = tmp_path / "cut.gguf"
    for cut in range(1, len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(ModelFileError) as info:
            check_model_file(str(path))
        assert repr(str(path)) in str(info.value)


def test_empty_key(tmp_path):
    refused(put(tmp_path, gguf([*BASE_KVS, ("", U32, 1)])), match="key 3 is empty")


def test_duplicate_key(tmp_path):
    data = gguf([*BASE_KVS, ("general.architecture", STR, "llama")])
    refused(put(tmp_path, data), match="duplicate key 'general.architecture'")
    # keys that are not UTF-8 are compared as bytes
    raw = (_enc_str(b"x\xff") + _enc_value(U32, 1)) + (_enc_str(b"x\xfe") + _enc_value(U32, 1))
    check_model_file(put(tmp_path, gguf(extra_kv_bytes=raw, n_kv=5), "b.gguf"))
    refused(put(tmp_path, gguf(extra_kv_bytes=raw + raw[:len(raw) // 2], n_kv=6), "c.gguf"),
            match="duplicate key")


@pytest.mark.parametrize("gtype", [13, 99, -1, 0x7FFFFFFF])
def test_invalid_value_type(tmp_path, gtype):
    bad = _enc_str(b"x.y") + struct.pack("<i", gtype) + b"\0" * 8
    data = gguf([*BASE_KVS, ("z", U32, 0)], extra_kv_bytes=bad, n_kv=5)
    refused(put(tmp_path, data), match=f"key 'x.y' has invalid GGUF type {gtype}")


def test_nested_array(tmp_path):
    bad = _enc_str(b"nested") + struct.pack("<iiQ", ARR, ARR, 1) + struct.pack("<iQ", U32, 0)
    refused(put(tmp_path, gguf(extra_kv_bytes=bad, n_kv=4)),
            match="key 'nested' has invalid GGUF type 9")


@pytest.mark.parametrize("etype", [13, -5, 1000])
def test_invalid_array_element_type(tmp_path, etype):
    bad = _enc_str(b"arr") + struct.pack("<iiQ", ARR, etype, 1) + b"\0" * 8
    refused(put(tmp_path, gguf(extra_kv_bytes=bad, n_kv=4)),
            match=f"key 'arr' has invalid GGUF type {etype}")


@pytest.mark.parametrize("count", [2, 1 << 29, (1 << 30) + 1, 1 << 62, (1 << 64) - 1])
def test_array_count_too_large(tmp_path, count):
    bad = _enc_str(b"arr") + struct.pack("<iiQ", ARR, U32, count) + b"\0" * 4
    refused(put(tmp_path, gguf(BASE_KVS, [], extra_kv_bytes=bad, n_kv=4)), vocab_only=True,
            match="failed to read key-value pairs")


@pytest.mark.parametrize("count", [5, 1 << 20, (1 << 64) - 1])
def test_string_array_count_too_large(tmp_path, count):
    bad = _enc_str(b"arr") + struct.pack("<iiQ", ARR, STR, count) + _enc_str(b"x") * 3
    refused(put(tmp_path, gguf(BASE_KVS, [], extra_kv_bytes=bad, n_kv=4)), vocab_only=True,
            match="failed to read key-value pairs")


@pytest.mark.parametrize("length", [100, 1 << 31, 1 << 40, (1 << 64) - 1])
def test_huge_string_length(tmp_path, length):
    bad = _enc_str(b"s") + struct.pack("<iQ", STR, length) + b"abc"
    refused(put(tmp_path, gguf(BASE_KVS, [], extra_kv_bytes=bad, n_kv=4)), vocab_only=True,
            match=f"string length {length} exceeds "
                  + ("maximum" if length > 1 << 30 else "remaining file size"))


@pytest.mark.parametrize("length", [1 << 20, 1 << 33, (1 << 64) - 1])
def test_huge_string_length_inside_a_string_array(tmp_path, length):
    strings = _enc_str(b"one") + struct.pack("<Q", length) + b"two" + _enc_str(b"three")
    bad = _enc_str(b"arr") + struct.pack("<iiQ", ARR, STR, 3) + strings
    refused(put(tmp_path, gguf(extra_kv_bytes=bad, n_kv=4)), match=f"string length {length}")


@pytest.mark.parametrize("key_length", [300, 1 << 40, (1 << 63)])
def test_huge_key_length(tmp_path, key_length):
    data = bytearray(gguf())
    struct.pack_into("<Q", data, 24, key_length)
    refused(put(tmp_path, bytes(data)), match=f"string length {key_length} exceeds")


def test_alignment_must_be_u32_power_of_two(tmp_path):
    refused(put(tmp_path, gguf([*BASE_KVS, ("general.alignment", U64, 32)])),
            match="'general.alignment' must be of type u32")
    refused(put(tmp_path, gguf([*BASE_KVS, ("general.alignment", U32, 0)]), "b.gguf"),
            match="not a power of 2")
    refused(put(tmp_path, gguf([*BASE_KVS, ("general.alignment", U32, 48)]), "c.gguf"),
            match="not a power of 2")
    path = put(tmp_path, gguf([*BASE_KVS, ("general.alignment", U32, 64)], align=64), "d.gguf")
    check_model_file(path)
    assert read_file(path).data_offset % 64 == 0


def test_architecture_must_be_a_string(tmp_path):
    refused(put(tmp_path, gguf(BASE_KVS[1:])), match="no general.architecture")
    kvs = [("general.architecture", U32, 1), *BASE_KVS[1:]]
    refused(put(tmp_path, gguf(kvs), "b.gguf"), match="must be a string")
    kvs = [("general.architecture", ARR, (STR, ["llama"])), *BASE_KVS[1:]]
    refused(put(tmp_path, gguf(kvs), "c.gguf"), match="must be a string")
    kvs = [("general.architecture", STR, ""), *BASE_KVS[1:]]
    refused(put(tmp_path, gguf(kvs), "d.gguf"), match="empty")


def test_tensor_name_too_long(tmp_path):
    check_model_file(put(tmp_path, gguf(tensors=[("n" * 63, (8,), 0)])))
    refused(put(tmp_path, gguf(tensors=[("n" * 64, (8,), 0)]), "b.gguf"),
            match="is too long: 64 >= 64")


def test_duplicate_tensor_name(tmp_path):
    refused(put(tmp_path, gguf(tensors=[("a", (8,), 0), ("a", (8,), 0)])),
            match="duplicate tensor name 'a'")


@pytest.mark.parametrize("n_dims", [5, 64, 0xFFFFFFFF])
def test_too_many_dimensions(tmp_path, n_dims):
    data = bytearray(gguf())
    pos = read_layout(put(tmp_path, bytes(data), "ok.gguf")).tensor_info_offset + 8 + 8
    struct.pack_into("<I", data, pos, n_dims)
    refused(put(tmp_path, bytes(data)), match=f"invalid number of dimensions: {n_dims} > 4")


@pytest.mark.parametrize("shape, text", [((-8,), "invalid number of elements: -8 < 0"),
                                         ((8, -1, 2), "invalid number of elements: -1 < 0"),
                                         ((1 << 32, 1 << 32), "may cause overflow"),
                                         ((1 << 62, 4), "may cause overflow")])
def test_bad_dimensions(tmp_path, shape, text):
    data = struct.pack("<4sIqq", b"GGUF", 3, 1, 1) + kv("general.architecture", STR, "llama")
    data += tensor_info("t", shape, 0, 0)
    refused(put(tmp_path, data + b"\0" * 64), vocab_only=True, match=text)


@pytest.mark.parametrize("gtype, text", [(4, "DEPRECATED"), (5, "DEPRECATED"),
                                         (31, "REMOVED"), (36, "REMOVED"),
                                         (43, "invalid ggml type 43"),
                                         (1000, "invalid ggml type 1000"),
                                         (-1, "invalid ggml type -1")])
def test_bad_ggml_type(tmp_path, gtype, text):
    data = bytearray(gguf())
    pos = read_layout(put(tmp_path, bytes(data), "ok.gguf")).tensors[0].offset_pos - 4
    struct.pack_into("<i", data, pos, gtype)
    refused(put(tmp_path, bytes(data)), match=text)


def test_row_not_a_multiple_of_the_block_size(tmp_path):
    data = gguf(tensors=[("q", (32, 2), 2)])
    check_model_file(put(tmp_path, data, "ok.gguf"))
    data = struct.pack("<4sIqq", b"GGUF", 3, 1, 1) + kv("general.architecture", STR, "llama")
    data += tensor_info("q", (48, 2), 2, 0)
    refused(put(tmp_path, data + b"\0" * 256), vocab_only=True,
            match="48 elements per row, not a multiple of block size (32)")


@pytest.mark.parametrize("gtype", [1, 2, 8])
@pytest.mark.parametrize("name", ["output_norm.weight", "blk.0.attn_q.bias"])
def test_norm_weights_and_biases_must_be_f32(tmp_path, name, gtype):
    """ggml's element-wise operations abort on them in another type, whatever number of
    dimensions the file gives them (a (576,) and a (576, 1) f16 output_norm.weight in
    SmolLM2 both abort at the first decode)."""
    check_model_file(put(tmp_path, gguf(tensors=[(name, (64,), 0)]), "ok.gguf"))
    refused(put(tmp_path, gguf(tensors=[(name, (64,), gtype)])), match="needs them in f32")
    refused(put(tmp_path, gguf(tensors=[(name, (64, 1), gtype)]), "b.gguf"),
            match="needs them in f32")
    # a matrix of one row (a rank-1 LoRA, a one-class head) is used by mul_mat: any type
    check_model_file(put(tmp_path, gguf(tensors=[("cls.output.weight", (64, 1), gtype)]),
                         "c.gguf"))


def test_wordpiece_vocabulary_with_byte_tokens(tmp_path):
    kvs = [BASE_KVS[0], ("tokenizer.ggml.model", STR, "bert"), BASE_KVS[2],
           ("tokenizer.ggml.token_type", ARR, (I32, [1, 6, 1]))]
    refused(put(tmp_path, gguf(kvs, [])), vocab_only=True, match="token 1 has type BYTE")
    kvs[1] = ("tokenizer.ggml.model", STR, "llama")
    check_model_file(put(tmp_path, gguf(kvs, []), "b.gguf"), vocab_only=True)


def _rwkv_vocab(tokens):
    return gguf([("general.architecture", STR, "rwkv6"), ("tokenizer.ggml.model", STR, "rwkv"),
                 ("tokenizer.ggml.tokens", ARR, (STR, tokens))], [])


def test_rwkv_vocabulary_that_would_never_finish_tokenizing(tmp_path):
    # "\n\n" (escaped) starts with a newline, but no token is a newline alone:
    # llama.cpp's tokenizer would loop forever on "\n" (which it tokenizes on load)
    refused(put(tmp_path, _rwkv_vocab(["\\n\\n", "a", "b"])), vocab_only=True,
            match="byte 0x0a")
    refused(put(tmp_path, _rwkv_vocab(["\\x41\\x42", "B"]), "b.gguf"), vocab_only=True,
            match="byte 0x41")
    check_model_file(put(tmp_path, _rwkv_vocab(["\\n", "\\n\\n", "a", "b", "ab"]), "c.gguf"),
                     vocab_only=True)


@pytest.mark.model
def test_rwkv_vocabulary_that_passes_the_check_loads_and_tokenizes(tmp_path):
    path = put(tmp_path, _rwkv_vocab(["\\n", "\\n\\n", "a", "b", "ab"]))
    o = run_python(f"""
        import llamabind
        m = llamabind.Model({path!r}, vocab_only=True)
        report(tokens=m.vocab.tokenize("ab\\n\\nb", add_special=False))
    """, timeout=120)
    assert o.kind == "ok", o.describe()
    assert o.reports[0]["tokens"] == [4, 1, 3]


def test_misaligned_or_wrong_tensor_offset(tmp_path):
    good = gguf(tensors=[("a", (8,), 0), ("b", (8,), 0)])
    pos = read_layout(put(tmp_path, good, "ok.gguf")).tensors[1].offset_pos
    for offset in (33, 0, 64, (1 << 64) - 32):
        data = bytearray(good)
        struct.pack_into("<Q", data, pos, offset)
        refused(put(tmp_path, bytes(data)), match=f"tensor 'b' has offset {offset}, expected 32")


def test_tensor_data_past_the_end(tmp_path):
    data = gguf(tensors=[("a", (8,), 0), ("b", (64,), 0)])
    refused(put(tmp_path, data[:-1]), match="past the end of the file")
    # the data need not be there for a vocabulary-only load
    check_model_file(put(tmp_path, data[:-200], "b.gguf"), vocab_only=True)


def test_no_tensors_needs_vocab_only(tmp_path):
    path = put(tmp_path, gguf(tensors=[]))
    refused(path, match="vocab_only=True")
    check_model_file(path, vocab_only=True)


def test_duplicate_token_text(tmp_path):
    kvs = [*BASE_KVS[:2], ("tokenizer.ggml.tokens", ARR, (STR, ["a", "b", "a"]))]
    msg = refused(put(tmp_path, gguf(kvs, [])), vocab_only=True, match="twice")
    assert "ids 0 and 2" in msg
    # llama.cpp names an empty token "[EMPTY_<id>]" before indexing it
    kvs = [*BASE_KVS[:2], ("tokenizer.ggml.tokens", ARR, (STR, ["", "[EMPTY_0]"]))]
    refused(put(tmp_path, gguf(kvs, []), "b.gguf"), vocab_only=True, match="twice")
    kvs = [*BASE_KVS[:2], ("tokenizer.ggml.tokens", ARR, (STR, ["", ""]))]
    check_model_file(put(tmp_path, gguf(kvs, []), "c.gguf"), vocab_only=True)
    # a vocabulary llama.cpp does not read may have duplicates
    kvs = [BASE_KVS[0], ("tokenizer.ggml.model", STR, "none"),
           ("tokenizer.ggml.tokens", ARR, (STR, ["a", "a"]))]
    check_model_file(put(tmp_path, gguf(kvs, []), "d.gguf"), vocab_only=True)


HPARAM_CASES = [
    ("llama.block_count", U32, 0, "1..512"),
    ("llama.block_count", U32, 513, "1..512"),
    ("llama.block_count", U32, 0xFFFFFFFF, "1..512"),
    ("llama.attention.layer_norm_rms_epsilon", F32, -1.0, ">= 0"),
    ("llama.attention.layer_norm_rms_epsilon", F32, float("nan"), ">= 0"),
    ("llama.attention.layer_norm_epsilon", F32, float("inf"), ">= 0"),
    ("llama.rope.scaling.type", STR, "cubic", "llama.cpp knows"),
    ("llama.expert_count", U32, 1025, "at most 1024"),
    ("llama.expert_count", U32, 8, "is 0 or missing"),
    ("llama.expert_used_count", U32, 2, "more than the 0 experts"),
    ("llama.expert_group_count", U32, 2, "no experts"),
    ("llama.nextn_predict_layers", U32, 3, "more than the 2 layers"),
]


@pytest.mark.parametrize("key, gtype, value, text", HPARAM_CASES,
                         ids=[f"{c[0]}={c[2]}" for c in HPARAM_CASES])
def test_hyperparameters_llama_cpp_asserts_on(tmp_path, key, gtype, value, text):
    kvs = [*BASE_KVS, ("llama.block_count", U32, 2)]
    kvs = [e for e in kvs if e[0] != key] + [(key, gtype, value)]
    path = put(tmp_path, gguf(kvs))
    refused(path, match=text)
    # a vocabulary-only load does not read them
    check_model_file(path, vocab_only=True)


def test_expert_counts_that_fit(tmp_path):
    kvs = [*BASE_KVS, ("llama.block_count", U32, 2), ("llama.expert_count", U32, 8),
           ("llama.expert_used_count", U32, 2)]
    check_model_file(put(tmp_path, gguf(kvs)))
    # per-layer form
    kvs[-1] = ("llama.expert_used_count", ARR, (U32, [2, 0]))
    check_model_file(put(tmp_path, gguf(kvs), "b.gguf"))
    kvs[-1] = ("llama.expert_used_count", ARR, (U32, [0, 0]))
    refused(put(tmp_path, gguf(kvs), "c.gguf"), match="is 0 or missing")
    kvs[-1] = ("llama.expert_used_count", ARR, (I32, [2, -1]))
    refused(put(tmp_path, gguf(kvs), "d.gguf"), match="more than the 8 experts")


def test_overrides_are_checked_too(tmp_path):
    path = put(tmp_path, gguf([*BASE_KVS, ("llama.block_count", U32, 2)]))
    check_model_file(path)
    refused(path, overrides={"llama.block_count": 0}, match="from kv_overrides")
    refused(path, overrides={"llama.attention.layer_norm_rms_epsilon": -1.0},
            match="from kv_overrides")
    # an override of another kind is ignored by llama.cpp, and so here
    check_model_file(path, overrides={"llama.block_count": "zero"})


def test_adapter_file_check(tmp_path):
    kvs = [("general.architecture", STR, "llama"), ("general.type", STR, "adapter"),
           ("adapter.type", STR, "lora")]
    tensors = [("blk.0.attn_q.weight.lora_a", (64, 8), 0),
               ("blk.0.attn_q.weight.lora_b", (8, 64), 0)]
    data = gguf(kvs, tensors)
    _gguf.check_adapter_file(put(tmp_path, data))
    # no tokenizer needed, but the tensor data must be there
    with pytest.raises(ModelFileError, match="past the end of the file") as info:
        _gguf.check_adapter_file(put(tmp_path, data[:-10], "b.gguf"))
    assert "b.gguf" in str(info.value)
    with pytest.raises(ModelFileError, match="no tensors"):
        _gguf.check_adapter_file(put(tmp_path, gguf(kvs, []), "c.gguf"))
    with pytest.raises(ModelNotFoundError, match="LoRA adapter file not found"):
        _gguf.check_adapter_file(str(tmp_path / "missing.gguf"))


def _age(path: str, seconds: float = 60.0) -> None:
    """Make a file look untouched for a while (only such files are remembered)."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


def test_a_file_that_passed_is_not_parsed_again(tmp_path, monkeypatch):
    path = put(tmp_path, gguf([*BASE_KVS, ("llama.block_count", U32, 2)]))
    opened = []
    real_read = _gguf.read_file
    monkeypatch.setattr(_gguf, "read_file", lambda p, *a: opened.append(p) or real_read(p, *a))
    monkeypatch.setattr(_gguf, "_RACY_NS", -(10**12))   # ctime cannot be aged
    _age(path)
    check_model_file(path)
    check_model_file(path)
    assert len(opened) == 1
    # the hyperparameter checks still see each load's overrides
    refused(path, overrides={"llama.block_count": 0}, match="from kv_overrides")
    # a vocab-only check is remembered separately
    check_model_file(path, vocab_only=True)
    assert len(opened) == 2
    # any write changes the file's identity: the damage is found
    data = bytearray(gguf([*BASE_KVS, ("llama.block_count", U32, 2)]))
    data[4] = 9   # version 9
    with open(path, "r+b") as fh:
        fh.write(data)
    refused(path, match="version 9")


def test_a_file_changed_just_now_is_not_remembered(tmp_path, monkeypatch):
    path = put(tmp_path, gguf())
    opened = []
    real_read = _gguf.read_file
    monkeypatch.setattr(_gguf, "read_file", lambda p, *a: opened.append(p) or real_read(p, *a))
    check_model_file(path)
    check_model_file(path)
    assert len(opened) == 2


def _bytes_read() -> int:
    """What this process has read from files so far (Linux: /proc/self/io)."""
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


def test_check_reads_only_the_header_region(tmp_path):
    """The check must not read tensor data: count the bytes read."""
    data = gguf(tensors=[("big", (1 << 22,), 0)])       # 16 MiB of tensor data
    path = put(tmp_path, data)
    before = _bytes_read()
    check_model_file(path)
    assert _bytes_read() - before < (2 << 20) < len(data)


def test_absurd_count_is_refused_within_bounded_memory(tmp_path):
    """ggml allocates 32 bytes per string that an array's count announces, as long as
    the rest of the file could hold their lengths: in a sparse 4 GiB file, a count of
    2^29 would cost 16 GiB before the refusal, a string length of 2^30 - 1 one GiB
    (and a GiB of reading). llamabind hands ggml the first 128 MiB only."""
    base = len(gguf(BASE_KVS, []))
    # key "n", then: an array of 1 string (its count after the two types), or a string
    array = bytearray(gguf(BASE_KVS, [], extra_kv_bytes=_enc_str(b"n") + _enc_value(
        ARR, (STR, ["a"])), n_kv=4))
    struct.pack_into("<Q", array, base + 9 + 4 + 4, 1 << 29)
    string = bytearray(gguf(BASE_KVS, [], extra_kv_bytes=_enc_str(b"n") + _enc_value(
        STR, "a"), n_kv=4))
    struct.pack_into("<Q", string, base + 9 + 4, (1 << 30) - 1)
    paths = {}
    for name, data in [("count", array), ("string", string)]:
        paths[name] = tmp_path / f"{name}.gguf"
        write_sparse(paths[name], bytes(data), 4 << 30)
    o = run_python(f"""
        import resource
        from llamabind import ModelFileError
        from llamabind._gguf import check_model_file
        for name, path in {({k: str(v) for k, v in paths.items()})!r}.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            try:
                check_model_file(path, vocab_only=True)
            except ModelFileError as exc:
                report(name=name, message=str(exc),
                       grew_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    assert o.kind == "ok", o.describe()
    assert [r["name"] for r in o.reports] == ["count", "string"], o.reports
    for r in o.reports:
        assert "first 128 MiB" in r["message"], r
        assert r["grew_kib"] < 64 * 1024, r

"""Damaged, wrong and odd model files: every one must give a typed llamabind error
that names the file, never a crash.

Two layers:

* ``check_model_file`` (pure Python) on small GGUF files built here byte by byte,
  checking the exception type, the file name and the byte offset in the message;
* ``llamabind.Model(...)`` on damaged copies of the real test model, each load in a
  child process (tests/_subproc.py), so that a crash in llama.cpp fails the test
  instead of killing pytest.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from _subproc import run_loads, run_python
from test_fuzz_gguf import (
    _enc_str,
    _enc_value,
    original_entries,
    read_prefix,
    serialize,
    write_sparse,
)

import llamabind
from llamabind import _gguf
from llamabind._gguf import check_model_file, read_header
from llamabind.errors import LlamaError, ModelFileError, ModelNotFoundError

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "gguf" / "SmolLM2-135M-Instruct-Q4_1.gguf"
VOCAB_BPE = ROOT / "models" / "vocab" / "ggml-vocab-llama-bpe.gguf"
VOCAB_SPM = ROOT / "models" / "vocab" / "ggml-vocab-llama-spm.gguf"

needs_model = pytest.mark.skipif(not MODEL.exists() or not VOCAB_BPE.exists(),
                                 reason="test models not fetched (models/fetch_models.py)")


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


def refused(path: str, *, vocab_only=False, at=None, match=None, overrides=None):
    """check_model_file must raise ModelFileError naming the file (and the offset)."""
    with pytest.raises(ModelFileError) as info:
        check_model_file(path, vocab_only=vocab_only, overrides=overrides)
    msg = str(info.value)
    assert repr(path) in msg, msg
    assert info.value.path == path
    if at is not None:
        assert f"at byte {at}:" in msg, msg
    if match is not None:
        assert match in msg, msg
    return msg


# --- check_model_file on built files ------------------------------------------------

def test_builder_makes_a_valid_file(tmp_path):
    path = put(tmp_path, gguf())
    check_model_file(path)
    hdr = read_header(path)
    assert hdr.n_kv == 3 and hdr.n_tensors == 1 and hdr.tensors[0].nbytes == 32
    assert hdr.data_offset % 32 == 0 and hdr.data_offset + 32 == os.path.getsize(path)


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
    refused(put(tmp_path, data), at=0, match="not a GGUF file")


@pytest.mark.parametrize("cut", [4, 5, 8, 12, 16, 23])
def test_truncated_header(tmp_path, cut):
    refused(put(tmp_path, gguf()[:cut]), match="truncated")


@pytest.mark.parametrize("version, text", [(0, "unsupported"), (1, "version 1"),
                                           (4, "unsupported"), (0x03000000, "byte-swapped"),
                                           (0xFFFFFFFF, "unsupported")])
def test_bad_version(tmp_path, version, text):
    refused(put(tmp_path, gguf(version=version)), at=4, match=text)


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
    refused(put(tmp_path, gguf([*BASE_KVS, ("", U32, 1)])), match="empty key")


def test_duplicate_key(tmp_path):
    data = gguf([*BASE_KVS, ("general.architecture", STR, "llama")])
    refused(put(tmp_path, data), match="appears twice")
    # keys that are not UTF-8 are compared as bytes
    raw = (_enc_str(b"x\xff") + _enc_value(U32, 1)) + (_enc_str(b"x\xfe") + _enc_value(U32, 1))
    check_model_file(put(tmp_path, gguf(extra_kv_bytes=raw, n_kv=5), "b.gguf"))
    refused(put(tmp_path, gguf(extra_kv_bytes=raw + raw[:len(raw) // 2], n_kv=6), "c.gguf"),
            match="appears twice")


@pytest.mark.parametrize("gtype", [13, 99, -1, 0x7FFFFFFF])
def test_invalid_value_type(tmp_path, gtype):
    bad = _enc_str(b"x.y") + struct.pack("<i", gtype) + b"\0" * 8
    data = gguf([*BASE_KVS, ("z", U32, 0)], extra_kv_bytes=bad, n_kv=5)
    # the entry after the valid ones: its type field is 8 + 3 bytes after it starts
    start = len(gguf([*BASE_KVS, ("z", U32, 0)], tensors=[]))
    refused(put(tmp_path, data), at=start + 11, match="invalid value type")


def test_nested_array(tmp_path):
    bad = _enc_str(b"nested") + struct.pack("<iiQ", ARR, ARR, 1) + struct.pack("<iQ", U32, 0)
    refused(put(tmp_path, gguf(extra_kv_bytes=bad, n_kv=4)), match="array of arrays")


@pytest.mark.parametrize("etype", [13, -5, 1000])
def test_invalid_array_element_type(tmp_path, etype):
    bad = _enc_str(b"arr") + struct.pack("<iiQ", ARR, etype, 1) + b"\0" * 8
    refused(put(tmp_path, gguf(extra_kv_bytes=bad, n_kv=4)), match="invalid element type")


@pytest.mark.parametrize("count", [2, 1 << 29, (1 << 30) + 1, 1 << 62, (1 << 64) - 1])
def test_array_count_too_large(tmp_path, count):
    bad = _enc_str(b"arr") + struct.pack("<iiQ", ARR, U32, count) + b"\0" * 4
    refused(put(tmp_path, gguf(BASE_KVS, [], extra_kv_bytes=bad, n_kv=4)), vocab_only=True)


@pytest.mark.parametrize("count", [5, 1 << 20, (1 << 64) - 1])
def test_string_array_count_too_large(tmp_path, count):
    bad = _enc_str(b"arr") + struct.pack("<iiQ", ARR, STR, count) + _enc_str(b"x") * 3
    refused(put(tmp_path, gguf(BASE_KVS, [], extra_kv_bytes=bad, n_kv=4)), vocab_only=True)


@pytest.mark.parametrize("length", [100, 1 << 31, 1 << 40, (1 << 64) - 1])
def test_huge_string_length(tmp_path, length):
    bad = _enc_str(b"s") + struct.pack("<iQ", STR, length) + b"abc"
    start = len(gguf(BASE_KVS, []))
    # the value's length field: after the key (8 + 1 bytes) and the type (4)
    refused(put(tmp_path, gguf(BASE_KVS, [], extra_kv_bytes=bad, n_kv=4)), vocab_only=True,
            at=start + 13 if length > 1 << 30 else start + 21)


@pytest.mark.parametrize("length", [1 << 20, 1 << 33, (1 << 64) - 1])
def test_huge_string_length_inside_a_string_array(tmp_path, length):
    strings = _enc_str(b"one") + struct.pack("<Q", length) + b"two" + _enc_str(b"three")
    bad = _enc_str(b"arr") + struct.pack("<iiQ", ARR, STR, 3) + strings
    msg = refused(put(tmp_path, gguf(extra_kv_bytes=bad, n_kv=4)))
    assert "arr" in msg and "[1]" in msg


@pytest.mark.parametrize("key_length", [300, 1 << 40, (1 << 63)])
def test_huge_key_length(tmp_path, key_length):
    data = bytearray(gguf())
    struct.pack_into("<Q", data, 24, key_length)
    # over the 1 GiB limit: refused at the length; else where the key would start
    refused(put(tmp_path, bytes(data)), at=24 if key_length > 1 << 30 else 32)


def test_alignment_must_be_u32_power_of_two(tmp_path):
    refused(put(tmp_path, gguf([*BASE_KVS, ("general.alignment", U64, 32)])),
            match="general.alignment must be a u32")
    refused(put(tmp_path, gguf([*BASE_KVS, ("general.alignment", U32, 0)]), "b.gguf"),
            match="not a power of 2")
    refused(put(tmp_path, gguf([*BASE_KVS, ("general.alignment", U32, 48)]), "c.gguf"),
            match="not a power of 2")
    path = put(tmp_path, gguf([*BASE_KVS, ("general.alignment", U32, 64)], align=64), "d.gguf")
    check_model_file(path)
    assert read_header(path).alignment == 64


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
            match="shorter than 64")


def test_duplicate_tensor_name(tmp_path):
    refused(put(tmp_path, gguf(tensors=[("a", (8,), 0), ("a", (8,), 0)])),
            match="appears twice")


@pytest.mark.parametrize("n_dims", [5, 64, 0xFFFFFFFF])
def test_too_many_dimensions(tmp_path, n_dims):
    data = bytearray(gguf())
    hdr = read_header(put(tmp_path, bytes(data), "ok.gguf"))
    pos = hdr.tensor_info_offset + 8 + len("t.weight")
    struct.pack_into("<I", data, pos, n_dims)
    refused(put(tmp_path, bytes(data)), at=pos, match="dimensions")


@pytest.mark.parametrize("shape, text", [((0,), "must be positive"),
                                         ((-8,), "must be positive"),
                                         ((8, 0, 2), "must be positive"),
                                         ((1 << 32, 1 << 32), "overflows int64"),
                                         ((1 << 62, 4), "overflows int64")])
def test_bad_dimensions(tmp_path, shape, text):
    data = struct.pack("<4sIqq", b"GGUF", 3, 1, 1) + kv("general.architecture", STR, "llama")
    data += tensor_info("t", shape, 0, 0)
    refused(put(tmp_path, data + b"\0" * 64), vocab_only=True, match=text)


@pytest.mark.parametrize("gtype, text", [(4, "removed"), (5, "removed"), (31, "removed"),
                                         (36, "removed"), (43, "invalid ggml type"),
                                         (1000, "invalid ggml type"),
                                         (-1, "invalid ggml type")])
def test_bad_ggml_type(tmp_path, gtype, text):
    data = bytearray(gguf())
    hdr = read_header(put(tmp_path, bytes(data), "ok.gguf"))
    pos = hdr.tensors[0].offset_pos - 4
    struct.pack_into("<i", data, pos, gtype)
    refused(put(tmp_path, bytes(data)), at=pos, match=text)


def test_row_not_a_multiple_of_the_block_size(tmp_path):
    data = gguf(tensors=[("q", (32, 2), 2)])
    check_model_file(put(tmp_path, data, "ok.gguf"))
    data = struct.pack("<4sIqq", b"GGUF", 3, 1, 1) + kv("general.architecture", STR, "llama")
    data += tensor_info("q", (48, 2), 2, 0)
    refused(put(tmp_path, data + b"\0" * 256), vocab_only=True, match="block size 32")


@pytest.mark.parametrize("gtype", [1, 2, 8])
def test_vector_must_be_f32(tmp_path, gtype):
    check_model_file(put(tmp_path, gguf(tensors=[("v", (64,), 0)]), "ok.gguf"))
    refused(put(tmp_path, gguf(tensors=[("v", (64,), gtype)])), match="1-D tensors in f32")


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
    hdr = read_header(put(tmp_path, good, "ok.gguf"))
    for offset, text in [(33, "not a multiple of the alignment"), (0, "must be 32"),
                         (64, "must be 32"), ((1 << 64) - 32, "must be 32")]:
        data = bytearray(good)
        struct.pack_into("<Q", data, hdr.tensors[1].offset_pos, offset)
        refused(put(tmp_path, bytes(data)), at=hdr.tensors[1].offset_pos, match=text)


def test_tensor_data_past_the_end(tmp_path):
    data = gguf(tensors=[("a", (8,), 0), ("b", (64,), 0)])
    refused(put(tmp_path, data[:-1]), match="runs past the end of the file")
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
    with pytest.raises(ModelFileError, match="runs past the end") as info:
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
    real_open = _gguf._open_checked
    monkeypatch.setattr(_gguf, "_open_checked",
                        lambda p, *a: opened.append(p) or real_open(p, *a))
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
    refused(path, at=4, match="version 9")


def test_a_file_changed_just_now_is_not_remembered(tmp_path, monkeypatch):
    path = put(tmp_path, gguf())
    opened = []
    real_open = _gguf._open_checked
    monkeypatch.setattr(_gguf, "_open_checked",
                        lambda p, *a: opened.append(p) or real_open(p, *a))
    check_model_file(path)
    check_model_file(path)
    assert len(opened) == 2


def test_check_reads_only_the_header_region(tmp_path, monkeypatch):
    """The check must not read tensor data: count the bytes it reads."""
    data = gguf(tensors=[("big", (1 << 20,), 0)])       # 4 MiB of tensor data
    path = put(tmp_path, data)
    header_size = read_header(path).data_offset
    counted = []
    real_open = open

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def read(self, n=-1):
            out = self.fh.read(n)
            counted.append(len(out))
            return out

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(_gguf, "open", lambda p, mode="r": Counting(real_open(p, mode)),
                        raising=False)
    check_model_file(path)
    assert counted and sum(counted) < header_size + (2 << 20) < len(data)


# --- Model(...) on damaged copies of the real model, in child processes -------------

def _flip_positions(hdr):
    """Byte positions in the metadata and tensor-info regions to damage."""
    kvs = list(hdr.kv.values())
    out = []
    for kv in kvs[:6] + kvs[-6:]:
        out += [kv.offset, kv.offset + 8, kv.value_offset - 4, kv.value_offset]
    for t in hdr.tensors[:3] + hdr.tensors[-3:]:
        out += [t.info_offset, t.info_offset + 8 + len(t.name), t.offset_pos - 4,
                t.offset_pos, t.offset_pos + 7]
    return out


def _model_cases(tmp_path: Path, write: bool = True):
    """(name, path, vocab_only, expected exception type, "ok", or None for either) for
    the damaged files; ``write=False`` only names them."""
    hdr = read_header(MODEL)
    head = read_prefix(MODEL, hdr.data_offset)
    size = hdr.file_size
    cases = []

    def add(name, data, length=None, vocab_only=False, expect=ModelFileError.__name__):
        path = tmp_path / f"{name}.gguf"
        if write:
            write_sparse(path, data, size if length is None else length)
        cases.append((name, str(path), vocab_only, expect))

    def patched(offset, fmt, value):
        b = bytearray(head)
        struct.pack_into(fmt, b, offset, value)
        return bytes(b)

    cases.append(("missing", str(tmp_path / "missing.gguf"), False, "ModelNotFoundError"))
    if write:
        (tmp_path / "a_directory.gguf").mkdir()
    cases.append(("directory", str(tmp_path / "a_directory.gguf"), False, "ModelFileError"))
    add("empty", b"", 0)
    add("wrong_magic", b"GGML" + head[4:])
    add("zeros", b"\0" * 4096)
    tokens = hdr.kv["tokenizer.ggml.tokens"]
    merges = hdr.kv["tokenizer.ggml.merges"]
    cuts = {"header": 10, "header_end": 23, "first_key": 30, "scalar_kv": 470,
            "token_list_start": tokens.value_offset + 8, "token_list": 400_000,
            "merges": merges.value_offset + 300_000, "before_tensor_infos":
            hdr.tensor_info_offset - 3, "tensor_infos": hdr.tensors[100].info_offset + 5,
            "last_tensor_offset": hdr.tensors[-1].offset_pos + 4,
            "data_start": hdr.data_offset, "data_middle": size // 2, "one_short": size - 1}
    for name, cut in cuts.items():
        add(f"truncated_{name}", head[:cut], cut)
    for name, off, fmt, value in [("n_tensors_huge", 8, "<q", 1 << 62),
                                  ("n_tensors_negative", 8, "<q", -1),
                                  ("n_tensors_plus_one", 8, "<q", hdr.n_tensors + 1),
                                  ("n_kv_huge", 16, "<q", (1 << 63) - 1),
                                  ("n_kv_negative", 16, "<q", -2),
                                  ("n_kv_plus_one", 16, "<q", hdr.n_kv + 1),
                                  ("version_1", 4, "<I", 1),
                                  ("version_4", 4, "<I", 4),
                                  ("first_key_length_huge", 24, "<Q", 1 << 63),
                                  ("arch_string_length_huge",
                                   hdr.kv["general.architecture"].value_offset, "<Q", 1 << 40),
                                  ("token_count_huge", tokens.value_offset + 4, "<Q", 1 << 40),
                                  ("token_length_huge", tokens.value_offset + 12, "<Q",
                                   (1 << 64) - 1),
                                  ("tensor_name_length_huge", hdr.tensors[5].info_offset,
                                   "<Q", 1 << 50),
                                  ("tensor_type_invalid", hdr.tensors[3].offset_pos - 4,
                                   "<i", 77),
                                  ("tensor_offset_wrong", hdr.tensors[7].offset_pos, "<Q",
                                   hdr.tensors[7].offset + 32),
                                  ("block_count_zero",
                                   hdr.kv["llama.block_count"].value_offset, "<I", 0),
                                  ("rms_eps_negative", hdr.kv[
                                      "llama.attention.layer_norm_rms_epsilon"].value_offset,
                                   "<f", -1.0)]:
        add(name, patched(off, fmt, value))
    for i, pos in enumerate(_flip_positions(hdr)):
        b = bytearray(head)
        b[pos] ^= 0x5A
        # a flip may leave a loadable file (e.g. a key llama.cpp does not read)
        add(f"flip_{i:02d}_at_{pos}", bytes(b), expect=None)
    # a token's text made equal to the one before it (same length)
    pos = tokens.value_offset + 12   # the first token's length field
    (n_prev,) = struct.unpack_from("<Q", head, pos)
    for _ in range(1000):
        nxt = pos + 8 + n_prev
        (n,) = struct.unpack_from("<Q", head, nxt)
        if n == n_prev:
            b = bytearray(head)
            b[nxt + 8:nxt + 8 + n] = head[pos + 8:pos + 8 + n]
            add("duplicate_token", bytes(b))
            break
        pos, n_prev = nxt, n
    # another architecture name of the same length, unknown to llama.cpp
    arch = hdr.kv["general.architecture"]
    b = bytearray(head)
    b[arch.value_offset + 8:arch.value_offset + 8 + len(arch.value)] = b"z" * len(arch.value)
    add("unknown_architecture", bytes(b), expect="ModelLoadError")
    # rewritten metadata
    entries = original_entries(hdr, head)
    for model in ("llama", "bert", "t5", "rwkv", "plamo2", "gemma4", "none", "no_vocab",
                  "bogus"):
        e = dict(entries)
        e["tokenizer.ggml.model"] = _enc_value(STR, model)
        data, length = serialize(hdr, head, e)
        add(f"tokenizer_model_{model}", data, length, expect=None)
    e = {k: v for k, v in entries.items() if k != "tokenizer.ggml.tokens"}
    add("no_token_list", *serialize(hdr, head, e), expect="ModelLoadError")
    e = {k: v for k, v in entries.items() if k != "general.architecture"}
    add("no_architecture", *serialize(hdr, head, e))
    # the real files that must load
    cases.append(("good_model", str(MODEL), False, "ok"))
    cases.append(("vocab_file_vocab_only", str(VOCAB_BPE), True, "ok"))
    cases.append(("vocab_file_as_full_model", str(VOCAB_BPE), False, "ModelFileError"))
    return cases


@pytest.fixture(scope="module")
def model_file_outcomes(tmp_path_factory):
    if not MODEL.exists() or not VOCAB_BPE.exists():
        pytest.skip("test models not fetched (models/fetch_models.py)")
    tmp_path = tmp_path_factory.mktemp("damaged")
    cases = _model_cases(tmp_path)
    jobs = [{"id": name, "path": path, "vocab_only": vocab_only, "exercise": True}
            for name, path, vocab_only, _ in cases]
    outcomes, _notes = run_loads(jobs, per_job_timeout=120, batch_size=20, workers=2)
    for f in tmp_path.glob("*.gguf"):   # ~2 MB of header each; not needed any more
        if f.is_file():
            f.unlink()
    return {name: (path, expect, outcomes.get(name)) for name, path, _, expect in cases}


def _case_names():
    if not MODEL.exists():
        return ["(models not fetched)"]
    return [c[0] for c in _model_cases(Path("/nonexistent"), write=False)]


@pytest.mark.model
@pytest.mark.parametrize("name", _case_names())
def test_model_load_outcome(model_file_outcomes, name):
    """Each damaged file, loaded with llamabind.Model in a child process (and, where it
    loads, used: tokenize, one decode): a typed error naming the file, or a clean load."""
    path, expect, o = model_file_outcomes[name]
    assert o is not None, "no outcome"
    assert o.kind in ("ok", "exception"), f"{name}: {o.describe()}"
    if expect == "ok":
        assert o.kind == "ok", o.describe()
        return
    if o.kind == "ok":
        assert expect is None, f"{name} loaded, expected {expect}"
        return
    assert o.is_llama_error, f"{name}: {o.exc_type} is not a LlamaError: {o.message}"
    if o.phase == "load":
        assert repr(path) in o.message, o.message
    if expect is not None:
        assert o.phase == "load" and o.exc_type == expect, o.describe()


@pytest.mark.model
@needs_model
def test_good_model_loads_in_process():
    with llamabind.Model(str(MODEL)) as m:
        assert m.n_vocab == 49152
    with llamabind.Model(str(VOCAB_BPE), vocab_only=True) as v:
        assert v.n_vocab > 100_000


@pytest.mark.model
@needs_model
def test_vocab_only_file_as_full_model_in_process():
    with pytest.raises(ModelFileError, match="vocab_only=True") as info:
        llamabind.Model(str(VOCAB_BPE))
    assert repr(str(VOCAB_BPE)) in str(info.value)


# --- issues the file check cannot prevent (they need the Cython core) ---------------

def _none_vocab_copy(tmp_path: Path) -> str:
    hdr = read_header(MODEL)
    head = read_prefix(MODEL, hdr.data_offset)
    e = original_entries(hdr, head)
    e["tokenizer.ggml.model"] = _enc_value(STR, "none")
    path = tmp_path / "none_vocab.gguf"
    write_sparse(path, *serialize(hdr, head, e))
    return str(path)


@pytest.mark.model
@needs_model
def test_tokenizing_with_no_vocabulary_raises(tmp_path):
    """llama.cpp aborts (GGML_ASSERT(tokenizer)) when a vocabulary of type "none" is
    asked to tokenize or render: llamabind raises TokenizationError for each."""
    path = _none_vocab_copy(tmp_path)
    o = run_python(f"""
        import llamabind
        m = llamabind.Model({path!r})
        assert m.vocab.type == "none"
        calls = {{"tokenize": lambda: m.vocab.tokenize("hello"),
                 "detokenize": lambda: m.vocab.detokenize([1, 2]),
                 "token_to_piece": lambda: m.vocab.token_to_piece(1)}}
        for name, call in calls.items():
            try:
                call()
            except llamabind.TokenizationError as exc:
                report(name=name, message=str(exc))
    """)
    assert o.kind == "ok", o.describe()
    refused = [r for r in o.reports if "name" in r]
    assert [r["name"] for r in refused] == ["tokenize", "detokenize", "token_to_piece"]
    assert all("no tokenizer" in r["message"] for r in refused), refused


@pytest.mark.model
@needs_model
def test_kv_override_block_count_zero_does_not_crash():
    """The file check runs with the overrides applied: llama.cpp would assert on a
    zero block count."""
    o = run_python(f"""
        import llamabind
        llamabind.Model({str(MODEL)!r}, kv_overrides={{"llama.block_count": 0}})
    """)
    assert o.kind == "exception" and o.exc_type == "ModelFileError", o.describe()
    assert "block_count" in o.message, o.message


# --- the child-process helper itself ----------------------------------------------------

def test_subprocess_helper_classifies_outcomes():
    assert run_python("report(x=1)").reports[0] == {"x": 1}
    o = run_python("raise ValueError('bad 42')")
    assert (o.kind, o.exc_type, o.message) == ("exception", "ValueError", "bad 42")
    o = run_python("import llamabind\nraise llamabind.ModelFileError('m')")
    assert o.is_llama_error and "ValueError" in o.exc_mro
    o = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert (o.kind, o.signal) == ("crash", "SIGSEGV")
    assert run_python("import os\nos.abort()").signal == "SIGABRT"
    assert run_python("import time\ntime.sleep(30)", timeout=2).kind == "hang"
    o = run_python("import os\nos._exit(7)")
    assert (o.kind, o.returncode) == ("died", 7)


@pytest.mark.model
@needs_model
def test_run_loads_names_a_hanging_job():
    """A load past its time limit (here: any load, with a tiny limit) is a hang."""
    jobs = [{"id": "vocab", "path": str(VOCAB_SPM), "vocab_only": True}]
    outcomes, notes = run_loads(jobs, per_job_timeout=0.001, batch_size=1, workers=1)
    assert outcomes["vocab"].kind == "hang", outcomes["vocab"].describe()
    assert notes


def test_compiled_string_walkers_agree_with_the_format():
    """The GGUF check's hot loops run in C (_llama._gguf_*): length-prefixed strings,
    cut strings, over-long lengths, duplicates and empty strings."""
    from llamabind._llama import _gguf_collect_strings, _gguf_skip_strings, _gguf_strings_unique

    def enc(items: list[bytes]) -> bytes:
        return b"".join(struct.pack("<Q", len(x)) + x for x in items)

    data = enc([b"a", b"bc", b"", b"def"])
    assert _gguf_skip_strings(data, 0, 4, 1 << 30) == (len(data), 4, False)
    assert _gguf_skip_strings(data, 0, 9, 1 << 30) == (len(data), 4, False)
    assert _gguf_skip_strings(data, 0, 4, 1) == (9, 1, True)          # "bc" is over 1
    assert _gguf_skip_strings(data[:-1], 0, 4, 1 << 30) == (27, 3, False)  # "def" cut
    assert _gguf_collect_strings(data, 0, 4, len(data)) == ([b"a", b"bc", b"", b"def"],
                                                           len(data))
    assert _gguf_collect_strings(data, 0, 4, len(data) - 1) is None
    assert _gguf_strings_unique(data, 0, 2, len(data)) == (19, True)
    assert _gguf_strings_unique(data, 0, 3, len(data)) == (27, False)  # an empty one
    dup = enc([b"ab", b"ba", b"ab"])
    assert _gguf_strings_unique(dup, 0, 3, len(dup)) == (len(dup), False)
    assert _gguf_strings_unique(dup, 0, 2, len(dup)) == (20, True)
    assert _gguf_strings_unique(dup[:-1], 0, 3, len(dup)) is None
    with pytest.raises(llamabind.InvalidArgumentError):
        _gguf_skip_strings(data, len(data) + 1, 1, 1 << 30)


def _outcome(path: str) -> object:
    try:
        return _gguf._read(path, False)
    except ModelFileError as exc:
        return str(exc)


@needs_model
def test_fast_tensor_info_pass_agrees_with_the_slow_one(tmp_path, monkeypatch):
    """The tensor infos are read in one loop when they are all well-formed; on damaged
    ones that loop must give up, so the entry-by-entry reader says what is wrong. 400
    seeded changes to SmolLM2's tensor infos (a field of a random tensor set to a small
    or extreme value, or a random byte changed) give the same header or the same error
    either way."""
    import random

    hdr = read_header(str(MODEL))
    head = read_prefix(MODEL, hdr.data_offset)
    rng = random.Random(7)
    fast = _gguf._tensor_infos_fast
    values = [0, 1, 2, 3, 4, 5, 9, 13, 31, 32, 63, 64, 255, 1 << 31, (1 << 32) - 1,
              (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
    errors = 0
    for i in range(400):
        data = bytearray(head)
        info = rng.choice(hdr.tensors)
        name_len = len(info.name.encode())
        dims_at = info.info_offset + 8 + name_len
        fields = [(info.info_offset, "<Q"), (dims_at, "<I"), (info.offset_pos - 4, "<i"),
                  (info.offset_pos, "<Q")]
        fields += [(dims_at + 4 + 8 * d, "<q") for d in range(len(info.shape))]
        at, fmt = rng.choice(fields)
        if i % 4 == 3:
            data[at + rng.randrange(struct.calcsize(fmt))] = rng.randrange(256)
        else:
            value = rng.choice(values)
            bits = 8 * struct.calcsize(fmt)
            if fmt.islower():    # signed: the same bits
                value = value % (1 << bits)
                value = value - (1 << bits) if value >= 1 << (bits - 1) else value
            else:
                value %= 1 << bits
            struct.pack_into(fmt, data, at, value)
        path = tmp_path / f"m{i}.gguf"
        write_sparse(path, bytes(data), hdr.file_size)
        got_fast = _outcome(str(path))
        monkeypatch.setattr(_gguf, "_tensor_infos_fast", lambda *args: None)
        got_slow = _outcome(str(path))
        monkeypatch.setattr(_gguf, "_tensor_infos_fast", fast)
        assert got_fast == got_slow, (i, info.name, at, fmt)
        errors += isinstance(got_slow, str)
        path.unlink()
    assert errors > 200   # most changes are damage the check must name

"""``llamabind.Model(...)`` on damaged copies of the real test model, each load in a
child process (tests/_subproc.py), so that a crash in llama.cpp fails the test instead
of killing pytest: every damaged file gives a typed error naming the file, or loads
and works. Which layer catches which damage (ggml's reader, llamabind's checks,
llama.cpp itself) is written down in test_model_files.py.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from _gguf_layout import read_layout
from _subproc import run_loads, run_python
from test_fuzz_gguf import _enc_value, original_entries, read_prefix, serialize, write_sparse

import llamabind
from llamabind.errors import ModelFileError

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "gguf" / "SmolLM2-135M-Instruct-Q4_1.gguf"
VOCAB_BPE = ROOT / "models" / "vocab" / "ggml-vocab-llama-bpe.gguf"
VOCAB_SPM = ROOT / "models" / "vocab" / "ggml-vocab-llama-spm.gguf"
STR = 8

needs_model = pytest.mark.skipif(not MODEL.exists() or not VOCAB_BPE.exists(),
                                 reason="test models not fetched (models/fetch_models.py)")


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
    hdr = read_layout(MODEL)
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
                                   "<f", -1.0),
                                  # the last tensor, output_norm.weight (576,) f32: as f16
                                  # it still fits (ggml accepts it), and aborts at decode
                                  ("output_norm_f16", hdr.tensors[-1].offset_pos - 4, "<i", 1)]:
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
    # a tensor of zero elements: ggml and the check accept it, llama.cpp reports the
    # wrong shape (output_norm.weight is last: its size does not move any other tensor)
    b = bytearray(head)
    struct.pack_into("<q", b, hdr.tensors[-1].offset_pos - 12, 0)
    add("tensor_dim_zero", bytes(b), expect="ModelLoadError")
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
    hdr = read_layout(MODEL)
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

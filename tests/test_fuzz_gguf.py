"""Fuzz llamabind's model loading with damaged copies of real GGUF files.

Several hundred mutations (byte flips, truncations, fields overwritten with extreme
values) of the small model's header region, and of a vocabulary-only file, each loaded
in a child process; a model that loads is also used (tokenize, detokenize, one small
decode). No mutation may crash or hang the process: every failure must be a
``LlamaError`` whose message names the file.

Disk use stays low: a mutated copy holds the (small) header region and the rest of
the file is a hole (a sparse file), and only one round of copies exists at a time.
"""

from __future__ import annotations

import collections
import os
import random
import struct
import time
from pathlib import Path

import pytest
from _gguf_layout import read_layout
from _subproc import run_loads

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "gguf" / "SmolLM2-135M-Instruct-Q4_1.gguf"
VOCAB = ROOT / "models" / "vocab" / "ggml-vocab-llama-spm.gguf"

# deterministic; LLAMABIND_FUZZ_SEED=<int> explores other mutations
SEED = int(os.environ.get("LLAMABIND_FUZZ_SEED", "20240607"))
N_MODEL_MUTATIONS = 480
N_VOCAB_MUTATIONS = 120
PER_LOAD_TIMEOUT = 60.0
ROUND = 50           # mutated files on disk at a time
BATCH = 25           # loads per child process

pytestmark = [pytest.mark.model, pytest.mark.slow]

# gguf value types: struct format of a scalar
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B",
           10: "<Q", 11: "<q", 12: "<d"}
_EXTREME_32 = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 31, 64, 255, 0x10000, 0x7FFFFFFF,
               0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
_EXTREME_64 = [0, 1, 2, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32, 1 << 40, 1 << 62,
               (1 << 63) - 1, 1 << 63, (1 << 64) - 2, (1 << 64) - 1]
_EXTREME_FLOAT = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -1.0, 1e38,
                  -1e38, 1e-45, 3.4e38]


class Field:
    """A field of the original file that a mutation may overwrite."""

    def __init__(self, offset: int, fmt: str, label: str, original=None) -> None:
        self.offset = offset
        self.fmt = fmt
        self.label = label
        self.original = original

    @property
    def size(self) -> int:
        return struct.calcsize(self.fmt)


def read_prefix(path: Path, n: int) -> bytes:
    """The first ``n`` bytes of a file (its header region), without reading the rest."""
    with open(path, "rb") as fh:
        return fh.read(n)


def _string_lengths(data: bytes, pos: int, count: int, take: int):
    """Offsets of the length fields of the first ``take`` strings of an array."""
    out = []
    for _ in range(min(count, take)):
        out.append(pos)
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n
    return out


def layout(path: Path):
    """The original file's header bytes, fields, and structural regions."""
    hdr = read_layout(path)
    data = read_prefix(path, hdr.data_offset)
    fields = [Field(4, "<I", "version", hdr.version),
              Field(8, "<q", "n_tensors", hdr.n_tensors),
              Field(16, "<q", "n_kv", hdr.n_kv)]
    structural = [(0, 24)]
    for kv in hdr.kv.values():
        klen = kv.value_offset - 4 - kv.offset - 8
        fields.append(Field(kv.offset, "<Q", f"{kv.key}: key length", klen))
        fields.append(Field(kv.value_offset - 4, "<i", f"{kv.key}: type", kv.type))
        if kv.type == 9:
            fields.append(Field(kv.value_offset, "<i", f"{kv.key}: element type", kv.elem_type))
            fields.append(Field(kv.value_offset + 4, "<Q", f"{kv.key}: count", kv.count))
            first = kv.value_offset + 12
            structural.append((kv.offset, first + 64))
            if kv.elem_type == 8:
                for i, off in enumerate(_string_lengths(data, first, kv.count, 3)):
                    fields.append(Field(off, "<Q", f"{kv.key}[{i}]: length"))
            elif kv.elem_type in _SCALAR:
                fmt = _SCALAR[kv.elem_type]
                for i in range(min(kv.count, 3)):
                    fields.append(Field(first + i * struct.calcsize(fmt), fmt, f"{kv.key}[{i}]"))
        else:
            structural.append((kv.offset, kv.end))
            if kv.type == 8:
                fields.append(Field(kv.value_offset, "<Q", f"{kv.key}: length",
                                    len(kv.value)))
            else:
                fields.append(Field(kv.value_offset, _SCALAR[kv.type], kv.key, kv.value))
    structural.append((hdr.tensor_info_offset, hdr.data_offset))
    for t in hdr.tensors:
        name_len = len(t.name.encode())
        pos = t.info_offset
        fields.append(Field(pos, "<Q", f"{t.name}: name length", name_len))
        pos += 8 + name_len
        fields.append(Field(pos, "<I", f"{t.name}: n_dims", len(t.shape)))
        pos += 4
        for d, ne in enumerate(t.shape):
            fields.append(Field(pos, "<q", f"{t.name}: ne[{d}]", ne))
            pos += 8
        fields.append(Field(pos, "<i", f"{t.name}: type", t.ggml_type))
        fields.append(Field(t.offset_pos, "<Q", f"{t.name}: offset", t.offset))
    structural = [(lo, min(hi, len(data))) for lo, hi in structural if lo < min(hi, len(data))]
    return hdr, data, fields, structural


def _extreme(rng: random.Random, field: Field):
    fmt = field.fmt
    if fmt in ("<f", "<d"):
        choices = list(_EXTREME_FLOAT)
        if field.original is not None:
            choices.append(-field.original)
        return rng.choice(choices)
    size = field.size
    bits = size * 8
    signed = fmt[-1].islower() and fmt[-1] != "?"
    if size == 1:
        choices = [0, 1, 2, 127, 255]
    elif size == 2:
        choices = [0, 1, 0x7FFF, 0xFFFF]
    elif size == 4:
        choices = list(_EXTREME_32)
    else:
        choices = list(_EXTREME_64)
    if isinstance(field.original, int):
        choices += [field.original + d for d in (-1, 1, 2)] + [field.original * 2]
    choices.append(rng.getrandbits(bits))
    value = rng.choice(choices) % (1 << bits)
    if signed and value >= 1 << (bits - 1):
        value -= 1 << bits
    return value


def mutations(path: Path, n: int, rng: random.Random):
    """Yield (label, header_bytes, file_length) for ``n`` deterministic mutations."""
    hdr, data, fields, structural = layout(path)
    size = hdr.file_size
    kinds = (["field"] * 6 + ["field2"] * 2 + ["flip_struct"] * 3 + ["flip_any"] * 2
             + ["trunc"] * 3 + ["rewrite"] * 8)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        buf = bytearray(data)
        length = size
        if kind == "rewrite":
            yield rewrite(rng, hdr, data)
            continue
        if kind in ("field", "field2"):
            parts = []
            for _ in range(1 if kind == "field" else 2):
                f = rng.choice(fields)
                value = _extreme(rng, f)
                struct.pack_into(f.fmt, buf, f.offset, value)
                parts.append(f"{f.label}={value!r}")
            label = "; ".join(parts)
        elif kind.startswith("flip"):
            parts = []
            for _ in range(rng.choice((1, 1, 2, 4))):
                if kind == "flip_struct":
                    lo, hi = rng.choice(structural)
                    off = rng.randrange(lo, hi)
                else:
                    off = rng.randrange(len(buf))
                if rng.random() < 0.5:
                    buf[off] ^= 1 << rng.randrange(8)
                else:
                    buf[off] = rng.randrange(256)
                parts.append(f"{off}:{buf[off]:#04x}")
            label = "flip " + " ".join(parts)
        else:
            r = rng.random()
            if r < 0.6 or hdr.data_offset >= size:
                length = rng.randrange(1, hdr.data_offset + 1)
            elif r < 0.9:
                length = rng.randrange(hdr.data_offset, size)
            else:
                length = size - rng.randrange(1, 4096)
            label = f"truncate to {length}"
        yield f"{kind}: {label}", bytes(buf[:length]), length


# --- rewrites: the metadata re-serialised with entries changed, added or removed ------

_TOKENIZER_MODELS = ["llama", "bert", "gpt2", "t5", "rwkv", "plamo2", "gemma4", "test",
                     "none", "no_vocab", "hybriddna", "whitespace", "bogus", ""]
_TOKENIZER_PRES = ["default", "llama3", "qwen2", "gpt-2", "deepseek-llm", "deepseek-coder",
                   "falcon", "bloom", "kimi-k2", "chatglm-bpe", "smollm", "tekken", "bogus",
                   ""]
_ARCHES = ["llama", "qwen2", "gemma", "gemma3", "gpt2", "bert", "t5", "mamba", "rwkv6",
           "phi3", "falcon", "starcoder", "clip", "deepseek2", "qwen3moe", "granite",
           "wavtokenizer-dec", "jamba", "nomic-bert", "bogus-arch"]
# (key suffix under the architecture, gguf type, candidate values)
_HPARAMS = [
    ("block_count", 4, [0, 1, 31, 512, 513, 0xFFFFFFFF]),
    ("expert_count", 4, [0, 1, 8, 1024, 1025, 0xFFFFFFFF]),
    ("expert_used_count", 4, [0, 1, 2, 9, 0xFFFFFFFF]),
    ("expert_group_count", 4, [0, 1, 2, 3, 8]),
    ("expert_group_used_count", 4, [0, 1, 2, 8]),
    ("nextn_predict_layers", 4, [0, 1, 30, 31, 0xFFFFFFFF]),
    ("attention.head_count", 4, [0, 1, 3, 9, 0xFFFFFFFF]),
    ("attention.head_count_kv", 4, [0, 1, 3, 9, 0xFFFFFFFF]),
    ("attention.key_length", 4, [0, 1, 64, 0xFFFFFFFF]),
    ("attention.value_length", 4, [0, 1, 64, 0xFFFFFFFF]),
    ("attention.sliding_window", 4, [0, 1, 0xFFFFFFFF]),
    ("rope.dimension_count", 4, [0, 1, 63, 64, 0xFFFFFFFF]),
    ("rope.scaling.type", 8, ["none", "linear", "yarn", "longrope", "bogus", ""]),
    ("rope.scaling.factor", 6, [0.0, -1.0, float("nan"), float("inf"), 1e-45]),
    ("rope.freq_base", 6, [0.0, -1.0, float("nan"), float("inf")]),
    ("attention.layer_norm_rms_epsilon", 6, [0.0, -1.0, float("nan"), float("inf"), -0.0]),
    ("attention.layer_norm_epsilon", 6, [0.0, -1.0, float("nan"), float("inf")]),
    ("context_length", 4, [0, 1, 0xFFFFFFFF]),
    ("pooling_type", 4, [0, 1, 2, 3, 4, 5, 99, 0xFFFFFFFF]),
    ("attention.causal", 7, [0, 1]),
    ("vocab_size", 4, [0, 1, 49151, 49153, 0xFFFFFFFF]),
]
_TOKENIZER_KEYS = [
    ("tokenizer.ggml.bos_token_id", 4, [0, 49151, 49152, 0x7FFFFFFF, 0xFFFFFFFF]),
    ("tokenizer.ggml.eos_token_id", 4, [0, 49152, 0xFFFFFFFF]),
    ("tokenizer.ggml.eot_token_id", 4, [0, 49152, 0xFFFFFFFF]),
    ("tokenizer.ggml.seperator_token_id", 4, [0, 49152, 0xFFFFFFFF]),
    ("tokenizer.ggml.add_bos_token", 7, [0, 1]),
    ("tokenizer.ggml.add_eos_token", 7, [0, 1]),
    ("tokenizer.ggml.add_sep_token", 7, [0, 1]),
    ("tokenizer.ggml.add_space_prefix", 7, [0, 1]),
]
_SCALAR_TYPES = [0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12]


def _enc_str(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _pack_scalar(gtype: int, value) -> bytes:
    """A number as gguf type ``gtype`` (integers wrap around like C casts)."""
    fmt = _SCALAR[gtype]
    if fmt in ("<f", "<d"):
        return struct.pack(fmt, float(value))
    bits = struct.calcsize(fmt) * 8
    value = int(value) % (1 << bits)
    if fmt[-1].islower() and value >= 1 << (bits - 1):
        value -= 1 << bits
    return struct.pack(fmt, value)


def _enc_value(gtype: int, value) -> bytes:
    """The type and value of a metadata entry."""
    if gtype == 8:
        return struct.pack("<i", 8) + _enc_str(value.encode() if isinstance(value, str) else value)
    if gtype == 9:
        etype, items = value
        body = b"".join(_enc_str(v.encode()) if etype == 8 else _pack_scalar(etype, v)
                        for v in items)
        return struct.pack("<iiQ", 9, etype, len(items)) + body
    return struct.pack("<i", gtype) + _pack_scalar(gtype, value)


def _random_value(rng: random.Random, gtype: int):
    if gtype in (6, 12):
        return rng.choice(_EXTREME_FLOAT)
    if gtype == 8:
        return rng.choice(["", "x", "llama", "\u00e9" * 3])
    return rng.choice(_EXTREME_64 + _EXTREME_32)


def rewrite(rng: random.Random, hdr, data: bytes):
    """Re-serialise the header with one semantic change. Returns (label, head, length)."""
    entries = original_entries(hdr, data)
    arch = hdr.kv["general.architecture"].value.decode()
    choice = rng.randrange(8)
    if choice == 0:
        v = rng.choice(_TOKENIZER_MODELS)
        entries["tokenizer.ggml.model"] = _enc_value(8, v)
        label = f"tokenizer.ggml.model={v!r}"
    elif choice == 1:
        v = rng.choice(_TOKENIZER_PRES)
        entries["tokenizer.ggml.pre"] = _enc_value(8, v)
        label = f"tokenizer.ggml.pre={v!r}"
    elif choice == 2:
        new = rng.choice(_ARCHES)
        entries = {(new + k[len(arch):] if k.startswith(arch + ".") else k): v
                   for k, v in entries.items()}
        entries["general.architecture"] = _enc_value(8, new)
        label = f"architecture {arch!r} -> {new!r} (keys renamed)"
    elif choice == 3:
        key = rng.choice(sorted(entries))
        del entries[key]
        label = f"remove {key}"
    elif choice == 4:
        key = rng.choice([kv.key for kv in hdr.kv.values() if kv.type != 9])
        t = rng.choice([*_SCALAR_TYPES, 8, 9])
        if t == 9:
            et = rng.choice(_SCALAR_TYPES)
            v = (et, [_random_value(rng, et) for _ in range(rng.choice((0, 1, 30, 31)))])
        else:
            v = _random_value(rng, t)
        entries[key] = _enc_value(t, v)
        label = f"retype {key} as type {t} = {v!r}"[:200]
    elif choice in (5, 6):
        suffix, t, values = rng.choice(_HPARAMS)
        key = f"{arch}.{suffix}"
        v = rng.choice(values)
        if t == 4 and rng.random() < 0.25:
            # per-layer array form, sometimes of the wrong length
            n = rng.choice((30, 30, 29, 31, 0))
            entries[key] = _enc_value(9, (4, [v] * n))
            label = f"{key}=[{v!r}] * {n}"
        else:
            entries[key] = _enc_value(t, v)
            label = f"{key}={v!r}"
    else:
        key, t, values = rng.choice(_TOKENIZER_KEYS)
        v = rng.choice(values)
        entries[key] = _enc_value(t, v)
        label = f"{key}={v!r}"
    head, length = serialize(hdr, data, entries)
    return f"rewrite: {label}", head, length


def original_entries(hdr, data: bytes) -> dict:
    """key -> encoded type and value, for every metadata entry of a file."""
    return {kv.key: data[kv.value_offset - 4:kv.end] for kv in hdr.kv.values()}


def serialize(hdr, data: bytes, entries: dict):
    """A header with metadata ``entries`` (key -> encoded type and value) and the
    original tensor infos; returns (header bytes, file length) where the tensor data
    (not written: a hole) keeps its size."""
    body = b"".join(_enc_str(k.encode()) + v for k, v in entries.items())
    infos_end = hdr.tensors[-1].offset_pos + 8 if hdr.tensors else hdr.tensor_info_offset
    infos = data[hdr.tensor_info_offset:infos_end]
    head = (b"GGUF" + struct.pack("<IqQ", hdr.version, hdr.n_tensors, len(entries))
            + body + infos)
    if hdr.tensors:
        head += b"\0" * (-len(head) % hdr.alignment)
    return head, len(head) + (hdr.file_size - hdr.data_offset)


def write_sparse(path: Path, head: bytes, length: int) -> None:
    """Write ``head`` and extend the file to ``length`` bytes with a hole."""
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(length)   # the rest is a hole: no disk blocks


def test_fuzz_gguf_loading(tmp_path):
    if not MODEL.exists() or not VOCAB.exists():
        pytest.skip("test models not fetched (models/fetch_models.py)")
    rng = random.Random(SEED)
    specs = [(label, head, length, False, kind_of(label))
             for label, head, length in mutations(MODEL, N_MODEL_MUTATIONS, rng)]
    specs += [(label, head, length, True, kind_of(label))
              for label, head, length in mutations(VOCAB, N_VOCAB_MUTATIONS, rng)]

    started = time.monotonic()
    outcomes = {}
    notes = []
    for start in range(0, len(specs), ROUND):
        jobs = []
        for k, (_, head, length, vocab_only, _) in enumerate(specs[start:start + ROUND]):
            idx = start + k
            path = tmp_path / f"mut{idx:04d}.gguf"
            write_sparse(path, head, length)
            jobs.append({"id": idx, "path": str(path), "vocab_only": vocab_only,
                         "exercise": True})
        got, round_notes = run_loads(jobs, per_job_timeout=PER_LOAD_TIMEOUT,
                                     batch_size=BATCH, workers=2)
        outcomes.update(got)
        notes += round_notes
        for job in jobs:
            os.unlink(job["path"])
    elapsed = time.monotonic() - started

    counts = collections.Counter()
    by_kind = collections.Counter()
    known = collections.Counter()
    bad = []
    for idx, (label, _, _, _, kind) in enumerate(specs):
        o = outcomes.get(idx)
        by_kind[kind] += 1
        if o is None:
            bad.append(f"#{idx} {label}: no outcome")
            continue
        name = f"{o.exc_type} ({o.phase})" if o.kind == "exception" else o.kind
        counts[name] += 1
        if o.note:
            known[o.note] += 1
        path = str(tmp_path / f"mut{idx:04d}.gguf")
        if o.kind in ("crash", "hang", "died"):
            bad.append(f"#{idx} {label}: {o.describe()}")
        elif o.kind == "exception" and not o.is_llama_error:
            bad.append(f"#{idx} {label}: {o.exc_type} in the {o.phase} phase is not a "
                       f"LlamaError: {o.message}")
        elif o.kind == "exception" and o.phase == "load":
            if path not in o.message:
                bad.append(f"#{idx} {label}: message does not name the file: {o.message}")
            elif kind == "trunc" and o.exc_type != "ModelFileError":
                bad.append(f"#{idx} {label}: a truncated file should be refused by the "
                           f"pre-check, got {o.exc_type}: {o.message}")
    crashes = counts["crash"] + counts["died"]
    print(f"\nGGUF fuzz: {len(specs)} mutations ({dict(by_kind)}), seed {SEED}, "
          f"{elapsed:.1f} s; outcomes: {dict(counts)}; crashes {crashes}, "
          f"hangs {counts['hang']}")
    for note, n in known.items():
        print(f"  x{n}: {note}")
    for note in notes:
        print("  note:", note)
    assert not bad, "\n".join(bad[:20])
    assert len(specs) >= 300


def kind_of(label: str) -> str:
    return label.split(":", 1)[0]

"""llama.cpp's tokenizer test vectors, through llamabind.

``test_vectors`` is llama.cpp's tests/test-tokenizer-0.cpp: each vocab file
``models/vocab/ggml-vocab-NAME.gguf`` comes with ``.inp`` (texts separated by
``"\\n__ggml_vocab_test__\\n"``) and ``.out`` (one line of token ids per text); every text
is tokenized with add_special=false, parse_special=false and must give exactly those ids.
The files are read the way that test reads them (lines stripped, a repeated text keeps
its last expected line, a count mismatch is an error).

``test_token_roundtrip`` / ``test_codepoint_roundtrip`` are tests/test-tokenizer-1-spm.cpp
and -1-bpe.cpp: detokenizing a single token, tokenizing that text and detokenizing again
gives the same text, and every Unicode code point survives tokenize -> detokenize.
llama.cpp makes this claim for SPM and BPE vocabularies only (its WPM and UGM
tokenizers normalise text: BERT lowercases and strips accents), so only those are
checked. Detokenizing uses llama.cpp's common_detokenize semantics:
remove_special=false, unparse_special=true. llama.cpp runs -1-spm on llama-spm only; the
other -1 runs are listed in its tests/CMakeLists.txt but disabled "due to slowness": here
they run, marked slow. Where a vocabulary itself loses a code point (falcon has no tokens
for some control bytes), the native reference tools confirm llama.cpp loses it the same
way.

Every vocab file llama.cpp tests loads and passes with this pinned llama.cpp; none needs
to be skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _native import NativeRef, native_fixture  # noqa: F401

import llamabind
from llamabind import InvalidArgumentError

ROOT = Path(__file__).resolve().parent.parent
VOCAB_DIR = ROOT / "models" / "vocab"
SEPARATOR = "\n__ggml_vocab_test__\n"
FETCH_HINT = "run 'python scripts/fetch_llama_cpp.py --vocab' to unpack llama.cpp's vocab files"

# The vocab files llama.cpp's tests/CMakeLists.txt runs test-tokenizer-0 on (pinned commit).
TOKENIZER_0_VOCABS = (
    "bert-bge", "command-r", "deepseek-coder", "deepseek-llm", "falcon", "gemma-4", "gpt-2",
    "llama-bpe", "llama-spm", "mpt", "phi-3", "qwen2", "qwen35", "refact", "starcoder",
)
# test-tokenizer-1-spm runs on llama-spm; the other -1 tests are listed there but
# commented out "due to slowness" (baichuan for spm; these for bpe).
TOKENIZER_1_ENABLED = ("llama-spm",)
TOKENIZER_1_LISTED = ("baichuan", "aquila", "falcon", "gpt-2", "gpt-neox", "llama-bpe", "mpt",
                      "refact", "starcoder")


def _vocab_names_with_vectors() -> list[str]:
    found = {p.name[len("ggml-vocab-"):-len(".gguf")]
             for p in VOCAB_DIR.glob("ggml-vocab-*.gguf")
             if p.with_name(p.name + ".inp").is_file() and p.with_name(p.name + ".out").is_file()}
    # llama.cpp's list always; any further vocab that ships test vectors as well
    return sorted(set(TOKENIZER_0_VOCABS) | found)


def _vocab_path(name: str) -> Path:
    path = VOCAB_DIR / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        pytest.skip(f"{path.name} is missing: {FETCH_HINT}")
    return path


def _strip(s: str) -> str:
    """common's string_strip: std::isspace characters at both ends."""
    return s.strip(" \t\n\v\f\r")


def read_tests(path: Path) -> dict[str, list[int]]:
    """test-tokenizer-0.cpp's read_tests(), for the ``.inp``/``.out`` pair of ``path``."""
    raw = path.with_name(path.name + ".inp").read_bytes().decode("utf-8")
    out_text = path.with_name(path.name + ".out").read_bytes().decode("utf-8")

    # std::getline: split on '\n', no empty line after a final newline
    sout = out_text.split("\n")
    if sout and sout[-1] == "":
        sout.pop()

    sinp: list[str] = []
    pos = 0
    while pos < len(raw):
        nxt = raw.find(SEPARATOR, pos)
        if nxt == -1:
            sinp.append(raw[pos:])
            break
        sinp.append(raw[pos:nxt])
        pos = nxt + len(SEPARATOR)

    if len(sinp) != len(sout):
        raise AssertionError(
            f"{path.name}: input and output files have different number of tests "
            f"({len(sinp)} vs {len(sout)})")

    tests: dict[str, list[int]] = {}
    for s, line in zip(sinp, sout, strict=True):
        o = _strip(line)
        toks: list[int] = []
        p = 0
        while p < len(o):
            nxt = o.find(" ", p)
            if nxt == -1:
                nxt = len(o)
            toks.append(int(o[p:nxt]))
            p = nxt + 1
        tests[s] = toks  # a std::map: a repeated text keeps the last line
    if not tests:
        raise AssertionError(f"{path.name}: no tests found")
    return tests


def _load(path: Path) -> llamabind.Model:
    return llamabind.Model(str(path), vocab_only=True)


# --- test-tokenizer-0 --------------------------------------------------------------------


def test_reader_follows_llama_cpp(tmp_path: Path) -> None:
    """read_tests() keeps llama.cpp's quirks (checked on a synthetic pair)."""
    fake = tmp_path / "ggml-vocab-fake.gguf"
    fake.with_name(fake.name + ".inp").write_bytes(
        ("a" + SEPARATOR + " b " + SEPARATOR + "a" + SEPARATOR + "\n").encode())
    fake.with_name(fake.name + ".out").write_bytes(b" 1 2 \n3\r\n4\n\n")
    assert read_tests(fake) == {"a": [4], " b ": [3], "\n": []}
    fake.with_name(fake.name + ".out").write_bytes(b"1\n")
    with pytest.raises(AssertionError, match="different number"):
        read_tests(fake)


@pytest.mark.parametrize("name", _vocab_names_with_vectors())
def test_vectors(name: str) -> None:
    path = _vocab_path(name)
    tests = read_tests(path)
    with _load(path) as model:
        vocab = model.vocab
        failures = []
        for text, expected in tests.items():
            got = vocab.tokenize(text, add_special=False, parse_special=False)
            if got != expected:
                failures.append(f"{text!r}: expected {expected}, got {got}")
    assert not failures, f"{name}: {len(failures)} of {len(tests)} texts differ:\n" + "\n".join(
        failures[:10])


def test_all_listed_vocabs_are_tested() -> None:
    """Every vocab llama.cpp tests is here, with its vectors (none silently left out)."""
    missing = [n for n in TOKENIZER_0_VOCABS
               if not (VOCAB_DIR / f"ggml-vocab-{n}.gguf.out").is_file()]
    if len(missing) == len(TOKENIZER_0_VOCABS):
        pytest.skip(f"no vocab files: {FETCH_HINT}")
    assert not missing, f"vocab files without test vectors: {missing}"


# --- test-tokenizer-1 --------------------------------------------------------------------


def _roundtrip_names() -> list[pytest.param]:
    params = []
    for name in (*TOKENIZER_1_ENABLED, *TOKENIZER_1_LISTED):
        marks = [] if name in TOKENIZER_1_ENABLED else [pytest.mark.slow]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def _detok(vocab: llamabind.Vocab, tokens: list[int]) -> bytes:
    data: bytes = vocab.detokenize_bytes(tokens, remove_special=False, unparse_special=True)
    return data


@pytest.mark.parametrize("name", _roundtrip_names())
def test_token_roundtrip(name: str) -> None:
    """For every token: detokenize([t]) -> tokenize(parse_special) -> detokenize is the
    same text. llamabind's tokenize takes str without NUL, so (unlike the C++ test) it
    cannot be given the bytes of single byte-tokens that are not valid UTF-8; the BPE
    test skips those too. Tokens whose text contains NUL are refused with
    InvalidArgumentError, which is checked."""
    path = _vocab_path(name)
    with _load(path) as model:
        vocab = model.vocab
        assert vocab.type in ("spm", "bpe")
        failures = []
        checked = not_utf8 = 0
        with_nul = []
        for tok in range(vocab.n_tokens):
            data = _detok(vocab, [tok])
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                not_utf8 += 1
                continue
            if "\0" in text:
                with_nul.append(tok)
                with pytest.raises(InvalidArgumentError, match="NUL"):
                    vocab.tokenize(text, add_special=False, parse_special=True)
                continue
            again = _detok(vocab, vocab.tokenize(text, add_special=False, parse_special=True))
            checked += 1
            if again != data:
                failures.append(f"token {tok}: {data!r} -> {again!r}")
        assert not failures, f"{len(failures)} tokens do not round-trip:\n" + "\n".join(
            failures[:10])
        # nearly all the vocabulary was checked (what is left out is byte tokens)
        assert checked + not_utf8 + len(with_nul) == vocab.n_tokens
        assert checked >= 0.95 * vocab.n_tokens
        assert len(with_nul) <= 3


@pytest.mark.slow
@pytest.mark.parametrize("name", _roundtrip_names())
def test_codepoint_roundtrip(name: str, native: NativeRef) -> None:
    """Every code point (bar surrogates, the unassigned planes 4-14, U+2581 '▁' and
    U+0000 that llamabind refuses) tokenizes and detokenizes back to itself. The SPM
    test tokenizes with parse_special=true, the BPE test with false.

    Where a code point does not survive, native llama.cpp must tokenize it exactly the
    same way: then the loss is the vocabulary's (falcon has no tokens for 14 ASCII
    control bytes, which llama.cpp drops; its -1-bpe test for falcon is disabled)."""
    path = _vocab_path(name)
    with _load(path) as model:
        vocab = model.vocab
        parse_special = vocab.type == "spm"
        lost: dict[int, list[int]] = {}
        for cp in range(1, 0x110000):
            if 0xD800 <= cp <= 0xDFFF or 0x40000 <= cp <= 0xE0000 or cp == 0x2581:
                continue
            s = chr(cp)
            toks = vocab.tokenize(s, add_special=False, parse_special=parse_special)
            if _detok(vocab, toks) != s.encode("utf-8"):
                lost[cp] = toks
    differ = {}
    for cp, toks in lost.items():
        ref = native.tokenize(str(path), chr(cp), add_special=False,
                              parse_special=parse_special, vocab_only=True)
        if ref != toks:
            differ[f"U+{cp:04X}"] = (toks, ref)
    assert not differ, f"llamabind and llama.cpp tokenize these differently: {differ}"
    assert len(lost) <= 32, f"{len(lost)} code points do not round-trip"

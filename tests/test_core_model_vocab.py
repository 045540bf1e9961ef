"""Core Model and Vocab on the real SmolLM2 model and on llama.cpp's vocab files."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import llamabind
from llamabind import ClosedError, InvalidArgumentError, Model

pytestmark = pytest.mark.model

VOCAB_DIR = Path(__file__).resolve().parent.parent / "models" / "vocab"


def test_model_information(smol: Model) -> None:
    assert smol.n_vocab == 49152
    assert smol.n_layer == 30
    assert smol.n_embd == 576
    assert smol.n_ctx_train == 8192
    assert smol.n_params == 134515008
    assert smol.ftype.startswith("Q4_1")
    assert "llama" in smol.description
    assert smol.size > 50_000_000
    assert not smol.has_encoder and smol.has_decoder
    meta = smol.metadata
    assert meta["general.architecture"] == "llama"
    assert smol.meta("general.architecture") == "llama"
    assert smol.meta("no.such.key", "x") == "x"
    template = smol.chat_template()
    assert template is not None and "<|im_start|>" in template
    # a metadata value longer than the 256-byte first buffer
    assert smol.meta("tokenizer.chat_template") == template


def test_missing_model_is_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError) as info:
        Model(missing)
    assert isinstance(info.value, llamabind.ModelNotFoundError)
    assert str(missing) in str(info.value)


def test_close_is_idempotent_and_blocks_use(smol_path: str) -> None:
    model = Model(smol_path)
    vocab = model.vocab
    model.close()
    model.close()
    assert model.closed
    with pytest.raises(ClosedError):
        _ = model.n_vocab
    with pytest.raises(ClosedError):
        vocab.tokenize("hello")
    with pytest.raises(ClosedError):
        llamabind.Context(model)


def test_context_keeps_model_alive_after_close(smol_path: str) -> None:
    model = Model(smol_path)
    ctx = llamabind.Context(model, n_ctx=128)
    tokens = model.vocab.tokenize("Hello")
    model.close()  # the context still pins the native model
    ctx.eval(tokens)
    assert ctx.logits().shape == (49152,)
    ctx.close()  # now the model is freed
    with pytest.raises(ClosedError):
        _ = model.n_layer


def test_drop_model_reference_first(smol_path: str) -> None:
    model = Model(smol_path)
    ctx = llamabind.Context(model, n_ctx=128)
    del model
    ctx.eval([1, 2, 3])
    assert np.isfinite(ctx.logits()).all()
    ctx.close()


def test_with_blocks(smol_path: str) -> None:
    with Model(smol_path) as model, llamabind.Context(model, n_ctx=64) as ctx:
        ctx.eval(model.vocab.tokenize("a b"))
    assert model.closed and ctx.closed


def test_tokenize_roundtrip_multilingual(smol: Model) -> None:
    vocab = smol.vocab
    for text in ["Hello, world!", "日本語のテキスト", "emoji 🦙🔥 ok", "e\u0301 combining",
                 "code: def f(x):\n    return x ** 2\n", "Ünïcödé ß", "  leading spaces"]:
        tokens = vocab.tokenize(text, add_special=False)
        assert tokens and all(isinstance(t, int) for t in tokens)
        assert vocab.detokenize(tokens) == text
        arr = vocab.tokenize(text, add_special=False, as_array=True)
        assert arr.dtype == np.int32 and arr.tolist() == tokens
        # pieces concatenate to the same bytes
        assert b"".join(vocab.token_to_piece(t) for t in tokens) == text.encode()


def test_special_tokens(smol: Model) -> None:
    vocab = smol.vocab
    assert vocab.n_tokens == len(vocab) == 49152
    assert vocab.bos == 1 and vocab.eos == 2
    assert vocab.is_eog(vocab.eos)
    assert not vocab.is_eog(vocab.tokenize("hi", add_special=False)[0])
    im_start = vocab.tokenize("<|im_start|>", add_special=False, parse_special=True)
    assert len(im_start) == 1 and vocab.is_control(im_start[0])
    # without parse_special the same text is ordinary text
    assert len(vocab.tokenize("<|im_start|>", add_special=False)) > 1
    assert vocab.token_to_piece(im_start[0]) == b""
    assert vocab.token_to_piece(im_start[0], special=True) == b"<|im_start|>"
    assert vocab.detokenize(im_start, unparse_special=True) == "<|im_start|>"
    assert vocab.token_text(im_start[0]) == "<|im_start|>"
    assert vocab.type == "bpe"


def test_detokenize_accepts_numpy_and_rejects_bad(smol: Model) -> None:
    vocab = smol.vocab
    tokens = np.array(vocab.tokenize("numpy input", add_special=False), dtype=np.int64)
    assert vocab.detokenize(tokens) == "numpy input"
    for bad in ([10**6], [-5], [49152], [1.5], ["a"], "text"):
        with pytest.raises(InvalidArgumentError):
            vocab.detokenize(bad)
    with pytest.raises(InvalidArgumentError, match="1000000"):
        vocab.token_to_piece(10**6)
    with pytest.raises(InvalidArgumentError, match="NUL"):
        vocab.tokenize("a\0b")
    with pytest.raises(InvalidArgumentError, match="surrogate"):
        vocab.tokenize("a\ud800b")
    assert vocab.detokenize([]) == ""


def test_long_text_tokenizes_without_gil(smol: Model) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 2000
    ticks = []
    stop = threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            ticks.append(1)
            stop.wait(0.0005)

    t = threading.Thread(target=ticker)
    t.start()
    tokens = smol.vocab.tokenize(text, add_special=False)
    stop.set()
    t.join()
    assert len(tokens) > 10000
    assert smol.vocab.detokenize(tokens) == text


def test_vocab_only_model() -> None:
    path = VOCAB_DIR / "ggml-vocab-llama-bpe.gguf"
    if not path.exists():
        pytest.fail(f"{path} missing: run python scripts/fetch_llama_cpp.py --vocab")
    model = Model(path, vocab_only=True)
    try:
        assert model.vocab.tokenize("Hello world", add_special=False) == [9906, 1917]
        with pytest.raises(llamabind.LlamaError):
            llamabind.Context(model)
    finally:
        model.close()


def test_backend_init_from_many_threads_at_once(smol_path: str) -> None:
    errors: list[BaseException] = []

    def load() -> None:
        try:
            llamabind.backend_init()
            with Model(smol_path, vocab_only=True) as m:
                assert m.vocab.n_tokens == 49152
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_load_progress_callback_and_cancel(smol_path: str) -> None:
    seen: list[float] = []
    with Model(smol_path, progress=seen.append) as model:
        assert model.n_vocab == 49152
    assert seen and seen[-1] == pytest.approx(1.0)
    with pytest.raises(llamabind.GenerationCancelled):
        Model(smol_path, progress=lambda p: False)

    def boom(p: float) -> None:
        raise RuntimeError("from the callback")

    with pytest.raises(RuntimeError, match="from the callback"):
        Model(smol_path, progress=boom)


def test_kv_overrides(smol_path: str) -> None:
    with Model(smol_path, kv_overrides={"llama.context_length": 4096}) as model:
        assert model.n_ctx_train == 4096
    with pytest.raises(InvalidArgumentError):
        Model(smol_path, kv_overrides={"k": object()})

"""Core Context, Batch, Sampler and TokenGenerator on the real SmolLM2 model."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import llamabind
from llamabind import (
    Batch,
    ClosedError,
    Context,
    Generation,
    InvalidArgumentError,
    Model,
    Sampler,
    TokenGenerator,
)

pytestmark = pytest.mark.model

PROMPT = "The capital of France is"


def greedy_tokens(ctx: Context, tokens: list[int], n: int) -> list[int]:
    ctx.memory_clear()
    ctx.eval(tokens)
    return [t for t, _ in TokenGenerator(ctx, len(tokens), max_tokens=n)]


def test_logits_are_a_zero_copy_view(smol: Model, ctx: Context) -> None:
    tokens = smol.vocab.tokenize(PROMPT)
    ctx.eval(tokens)
    logits = ctx.logits()
    assert logits.shape == (smol.n_vocab,) and logits.dtype == np.float32
    assert not logits.flags.owndata and not logits.flags.writeable
    first = logits.copy()
    # The array shows llama.cpp's buffer: the next decode changes what it holds.
    ctx.eval([int(np.argmax(first))])
    assert not np.array_equal(logits, first)
    assert np.array_equal(logits, ctx.logits())
    # The same address as a fresh view: no copy was made.
    assert logits.__array_interface__["data"][0] == ctx.logits().__array_interface__["data"][0]


def test_logits_view_keeps_context_alive(smol: Model) -> None:
    ctx = Context(smol, n_ctx=64)
    ctx.eval(smol.vocab.tokenize(PROMPT))
    logits = ctx.logits()
    expected = logits.copy()
    ctx.close()  # deferred while the view exists
    assert ctx.closed
    assert np.array_equal(logits, expected)
    with pytest.raises(ClosedError):
        ctx.logits()
    del logits  # the native context is freed now


def test_eval_matches_batch_decode(smol: Model, ctx: Context) -> None:
    tokens = smol.vocab.tokenize(PROMPT)
    ctx.eval(tokens)
    a = ctx.logits().copy()
    ctx.memory_clear()
    with Batch(64) as batch:
        batch.set_tokens(tokens)
        assert batch.output_rows() == [len(tokens) - 1]
        ctx.decode(batch)
    assert np.array_equal(a, ctx.logits())
    assert ctx.seq_pos_max(0) == len(tokens) - 1


def test_logits_all_rows(smol: Model, ctx: Context) -> None:
    tokens = smol.vocab.tokenize(PROMPT)
    ctx.eval(tokens, logits="all")
    rows = [ctx.logits(i).copy() for i in range(len(tokens))]
    assert np.array_equal(rows[-1], ctx.logits(-1))
    assert not np.array_equal(rows[0], rows[-1])
    with pytest.raises(InvalidArgumentError):
        ctx.logits(len(tokens))


def test_logits_of_row_without_output_is_refused(smol: Model, ctx: Context) -> None:
    ctx.eval(smol.vocab.tokenize(PROMPT))
    with pytest.raises(InvalidArgumentError, match="did not request logits"):
        ctx.logits(0)


def test_state_save_restore_gives_identical_logits(smol: Model, ctx: Context) -> None:
    tokens = smol.vocab.tokenize(PROMPT)
    ctx.eval(tokens)
    state = ctx.save_state()
    assert len(state) == ctx.state_size()
    ctx.eval([11])
    after = ctx.logits().copy()
    ctx.memory_clear()
    ctx.eval([1, 2, 3, 4])
    ctx.load_state(state)
    assert ctx.seq_pos_max(0) == len(tokens) - 1
    ctx.eval([11])
    assert np.array_equal(after, ctx.logits())
    with pytest.raises(llamabind.StateError):
        ctx.load_state(b"garbage" * 10)
    with pytest.raises(InvalidArgumentError):
        ctx.load_state("not bytes")


def test_state_file_roundtrip(smol: Model, ctx: Context, tmp_path) -> None:
    tokens = smol.vocab.tokenize(PROMPT)
    ctx.eval(tokens)
    path = tmp_path / "state.bin"
    ctx.save_state_file(path, tokens)
    ctx.eval([11])
    after = ctx.logits().copy()
    ctx.memory_clear()
    assert ctx.load_state_file(path) == tokens
    ctx.eval([11])
    assert np.array_equal(after, ctx.logits())


def test_sequence_state_and_copy(smol: Model) -> None:
    with Context(smol, n_ctx=256, n_seq_max=2) as ctx:
        tokens = smol.vocab.tokenize(PROMPT)
        ctx.eval(tokens, seq_id=0)
        ctx.seq_cp(0, 1)
        assert ctx.seq_pos_max(1) == len(tokens) - 1
        # continuing both sequences with the same token gives the same logits
        ctx.eval([11], seq_id=0)
        a = ctx.logits().copy()
        ctx.eval([11], seq_id=1)
        assert np.allclose(a, ctx.logits(), atol=1e-4)
        assert ctx.seq_rm(1, -1, -1)
        assert ctx.seq_pos_max(1) == -1 and ctx.seq_pos_max(0) == len(tokens)
        seq_state = ctx.save_state(seq_id=0)
        ctx.load_state(seq_state, seq_id=1)
        assert ctx.seq_pos_max(1) == len(tokens)
        with pytest.raises(InvalidArgumentError, match="seq_id"):
            ctx.eval([11], seq_id=2)


def test_seq_rm_then_recompute_matches(smol: Model, ctx: Context) -> None:
    tokens = smol.vocab.tokenize(PROMPT + " Paris and the capital of Spain is")
    ctx.eval(tokens)
    full = ctx.logits().copy()
    assert ctx.seq_rm(0, len(tokens) - 3, -1)
    ctx.eval(tokens[-3:], pos0=len(tokens) - 3)
    assert np.allclose(full, ctx.logits(), atol=1e-3)


def test_batch_multi_sequence(smol: Model) -> None:
    with Context(smol, n_ctx=256, n_seq_max=2) as ctx, Batch(16, n_seq_max=2) as batch:
        a = smol.vocab.tokenize("Hello")
        b = smol.vocab.tokenize("Goodbye")
        for i, t in enumerate(a):
            batch.add(t, i, (0,), logits=i == len(a) - 1)
        for i, t in enumerate(b):
            batch.add(t, i, 1, logits=i == len(b) - 1)
        ctx.decode(batch)
        la = ctx.logits(len(a) - 1).copy()
        lb = ctx.logits(-1).copy()
        assert not np.array_equal(la, lb)
        with Context(smol, n_ctx=64) as solo:
            solo.eval(a)
            assert np.allclose(la, solo.logits(), atol=1e-3)
        with pytest.raises(InvalidArgumentError):
            batch.add(1, 0, (0, 1, 2))


def test_bad_batches_are_refused_and_context_survives(smol: Model, ctx: Context) -> None:
    with Batch(4) as batch:
        with pytest.raises(InvalidArgumentError, match="empty"):
            ctx.decode(batch)
        batch.add(49152, 0)
        with pytest.raises(InvalidArgumentError, match="49152"):
            ctx.decode(batch)
        batch.clear()
        batch.add(1, 0, 5)
        with pytest.raises(InvalidArgumentError, match="seq_id"):
            ctx.decode(batch)
    with Batch(600) as big:
        big.set_tokens([1] * 600)
        with pytest.raises(InvalidArgumentError, match="n_batch"):
            ctx.decode(big)
    ctx.eval(smol.vocab.tokenize(PROMPT))
    assert ctx.logits().shape == (smol.n_vocab,)


def test_context_length_full_decode_error(smol: Model) -> None:
    with Context(smol, n_ctx=32, n_batch=32) as ctx:
        n = ctx.n_ctx  # llama.cpp may round the requested size up
        ctx.eval(list(range(100, 100 + n)))
        with pytest.raises(llamabind.DecodeError) as info:
            ctx.eval([200])
        assert info.value.code == 1
        ctx.memory_clear()
        ctx.eval([1, 2])


def test_greedy_generator_is_deterministic(smol: Model, ctx: Context) -> None:
    tokens = smol.vocab.tokenize(PROMPT)
    first = greedy_tokens(ctx, tokens, 16)
    assert greedy_tokens(ctx, tokens, 16) == first
    assert smol.vocab.detokenize(first).startswith(" Paris")
    # the greedy sampler of llama.cpp agrees with the C argmax fast path
    ctx.memory_clear()
    ctx.eval(tokens)
    chain = Sampler().add_greedy()
    via_sampler = [t for t, _ in TokenGenerator(ctx, len(tokens), chain, max_tokens=16)]
    assert via_sampler == first


def test_generator_stops_at_eog_and_length(smol: Model, ctx: Context) -> None:
    prompt = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
              "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
              "<|im_start|>assistant\n")
    tokens = smol.vocab.tokenize(prompt, parse_special=True)
    ctx.eval(tokens)
    gen = TokenGenerator(ctx, len(tokens), max_tokens=200)
    out = list(gen)
    assert gen.finish_reason == "stop" and smol.vocab.is_eog(gen.last_token)
    assert 0 < len(out) < 200
    ctx.memory_clear()
    ctx.eval(tokens)
    gen = TokenGenerator(ctx, len(tokens), max_tokens=3)
    assert len(list(gen)) == 3 and gen.finish_reason == "length"


def test_generation_run_equals_iteration(smol: Model, ctx: Context) -> None:
    """Generation.run (the loop in C), step() with take_text() (streaming) and
    TokenGenerator (the core iterator) are one loop: same tokens, bytes, text, end."""
    tokens = smol.vocab.tokenize("Once upon a time")

    def chain(seed: int | None) -> Sampler | None:
        return None if seed is None else (
            Sampler().add_top_k(40).add_temperature(0.9).add_dist(seed))

    def fresh(max_tokens: int, seed: int | None, stop: tuple[str, ...] = ()) -> Generation:
        ctx.memory_clear()
        ctx.eval(tokens)
        gen = Generation(smol, len(tokens), chain(seed), max_tokens=max_tokens, stop=stop,
                         n_ctx=ctx.n_ctx)
        gen.accept(ctx)
        return gen

    for seed in (None, 5):
        ctx.memory_clear()
        ctx.eval(tokens)
        it = TokenGenerator(ctx, len(tokens), chain(seed), max_tokens=40)
        pairs = list(it)
        run = fresh(40, seed)
        assert run.run(ctx) == "length" == it.finish_reason
        assert run.tokens == [t for t, _ in pairs]
        whole = b"".join(p for _, p in pairs)
        assert run.output_bytes == whole
        assert run.text == whole.decode("utf-8", "replace")
        assert (run.pos, run.n_generated) == (it.pos, it.n_generated)
        streamed = fresh(40, seed)
        pieces = [streamed.take_text()]
        while not streamed.finished:
            streamed.step(ctx)
            pieces.append(streamed.take_text())
        assert "".join(pieces) == run.text and streamed.tokens == run.tokens
        # a stop ends the generation at the token whose bytes complete it
        text = run.text
        ends = [len(b"".join(p for _, p in pairs[:i + 1])) for i in range(len(pairs))]
        for stop in (text[5:9], text[-3:], text[:1], "\u2603 never"):
            gen = fresh(40, seed, ("\x01", stop))
            reason = gen.run(ctx)
            at = whole.find(stop.encode())
            if at < 0:
                assert reason == "length" and gen.text == text and gen.stop_sequence is None
                continue
            n = next(i for i, e in enumerate(ends) if e >= at + len(stop.encode())) + 1
            assert reason == "stop" and len(gen.tokens) == n and gen.stop_sequence == stop
            assert gen.text == whole[:at].decode("utf-8", "replace")
    # run() after the end returns at once; so does a generation of 0 tokens
    assert run.run(ctx) == "length"
    empty = fresh(0, None)
    assert empty.finish_reason == "length" and empty.tokens == [] and empty.text == ""
    for bad in ("x", [""], ["ok", b"bytes"], [None], 5, ["\ud800"]):
        with pytest.raises(InvalidArgumentError, match="stop"):
            Generation(smol, 4, stop=bad)


def test_stop_string_rules(smol: Model) -> None:
    """What is held back and where a stop matches, on bytes fed as a token would."""
    g = Generation(smol, 1, stop=["</end>", "STOP"])
    assert g._feed(b"hello <") == "hello "
    assert g._feed(b"/e") == ""
    assert g._feed(b"nd> more") == ""
    assert g.finish_reason == "stop" and g.stop_sequence == "</end>" and g.text == "hello "
    g = Generation(smol, 1, stop=["STOP"])
    assert g._feed(b"abc ST") == "abc "
    assert g._feed(b"ART") == "START"
    assert g._feed(b"xS") == "x"
    g.finish("length")
    assert g.take_text() == "S" and g.text == "abc STARTxS"
    # the earliest match wins; at the same place, the first listed
    for stops, text, hit in ((["ab", "b"], b"xab", "ab"), (["abc", "ab"], b"xabcd", "abc"),
                             (["bc", "ab"], b"xabcd", "ab")):
        g = Generation(smol, 1, stop=stops)
        assert g._feed(text) == "x" and g.stop_sequence == hit
    # multi-byte characters: held until complete, matched by their UTF-8 bytes
    g = Generation(smol, 1, stop=["\u00e9t\u00e9", "\u65e5"])
    assert g._feed(b"l'" + "\u00e9".encode()[:1]) == "l'"
    assert g._feed("\u00e9".encode()[1:] + b"t") == ""
    g.finish("length")
    assert g.take_text() == "\u00e9t"
    # invalid bytes become U+FFFD in the text but are never matched by a U+FFFD stop
    g = Generation(smol, 1, stop=["\ufffd"])
    assert g._feed(b"a\xffb") == "a\ufffdb" and g.finish_reason is None
    assert g._feed("\ufffd".encode()) == "" and g.stop_sequence == "\ufffd"
    with pytest.raises(InvalidArgumentError, match="bytes"):
        Generation(smol, 1)._feed("text")  # type: ignore[arg-type]


def test_generation_cancelled_keeps_what_it_made(smol: Model, ctx: Context) -> None:
    tokens = smol.vocab.tokenize("Once upon a time")
    ctx.eval(tokens)
    gen = Generation(smol, len(tokens), max_tokens=100_000, n_ctx=ctx.n_ctx)
    gen.accept(ctx)
    timer = threading.Timer(0.3, ctx.cancel)
    timer.start()
    with pytest.raises(llamabind.GenerationCancelled):
        gen.run(ctx)
    timer.join()
    assert 0 < len(gen.tokens) == gen.n_generated < 2000
    assert gen.output_bytes == b"".join(smol.vocab.token_to_piece(t) for t in gen.tokens)
    ctx.memory_clear()
    ctx.eval(tokens)  # the context is usable afterwards
    assert ctx.seq_pos_max(0) == len(tokens) - 1


def test_seeded_sampling_reproduces(smol: Model, ctx: Context) -> None:
    tokens = smol.vocab.tokenize("Once upon a time")

    def run(seed: int) -> list[int]:
        ctx.memory_clear()
        ctx.eval(tokens)
        chain = (Sampler().add_penalties(smol.n_vocab, 64, 1.1).add_top_k(40).add_top_p(0.95)
                 .add_min_p(0.05).add_temperature(0.8).add_dist(seed))
        assert chain.names == ["penalties", "top_k", "top_p", "min_p", "temperature", "dist"]
        assert chain.seed == seed
        return [t for t, _ in TokenGenerator(ctx, len(tokens), chain, max_tokens=24)]

    assert run(1234) == run(1234)
    assert run(1234) != run(99)


@pytest.mark.parametrize("build", [
    lambda s, m: s.add_typical(0.9).add_dist(1),
    lambda s, m: s.add_temperature_ext(0.8, 0.2, 1.0).add_dist(1),
    lambda s, m: s.add_xtc(0.5, 0.1, 1, 1).add_dist(1),
    lambda s, m: s.add_top_n_sigma(1.0).add_dist(1),
    lambda s, m: s.add_mirostat(m.n_vocab, 5.0, 0.1, 100, 1),
    lambda s, m: s.add_mirostat_v2(5.0, 0.1, 1),
    lambda s, m: s.add_dry(m, 0.8, 1.75, 2, -1, n_ctx=512).add_dist(1),
    lambda s, m: s.add_logit_bias(m, {504: float("-inf")}).add_greedy(),
    lambda s, m: s.add_top_k(40).add_infill(m).add_greedy(),
], ids=["typical", "temp_ext", "xtc", "top_n_sigma", "mirostat", "mirostat_v2", "dry",
        "logit_bias", "infill"])
def test_every_sampler_runs(smol: Model, ctx: Context, build) -> None:
    tokens = smol.vocab.tokenize("The")
    ctx.eval(tokens)
    chain = build(Sampler(), smol)
    token = chain.sample(ctx)
    assert 0 <= token < smol.n_vocab
    chain.reset()
    chain.close()
    chain.close()


def test_logit_bias_bans_the_greedy_token(smol: Model, ctx: Context) -> None:
    ctx.eval(smol.vocab.tokenize(PROMPT))
    best = int(np.argmax(ctx.logits()))
    chain = Sampler().add_logit_bias(smol, {best: float("-inf")}).add_greedy()
    assert chain.sample(ctx) != best


def test_grammar_constrains_output(smol: Model, ctx: Context) -> None:
    tokens = smol.vocab.tokenize("Answer yes or no: is the sky blue?")
    ctx.eval(tokens)
    chain = Sampler().add_grammar(smol, 'root ::= ("yes" | "no") "."').add_greedy()
    gen = TokenGenerator(ctx, len(tokens), chain, max_tokens=10)
    text = b"".join(p for _, p in gen).decode()
    assert text in ("yes.", "no.")
    assert gen.finish_reason == "stop"
    with pytest.raises(llamabind.GrammarError):
        Sampler().add_grammar(smol, "root ::= (")
    g = Sampler().add_grammar(smol, 'root ::= "a"').add_greedy()
    with pytest.raises(llamabind.GrammarError):
        g.accept(smol.vocab.tokenize("zzz", add_special=False)[0])
    with pytest.raises(llamabind.GrammarError):
        g.accept(smol.vocab.eos)


def test_sampler_without_selector_is_refused(smol: Model, ctx: Context) -> None:
    ctx.eval([1, 2])
    with pytest.raises(llamabind.SamplingError):
        Sampler().add_top_k(5).sample(ctx)
    with pytest.raises(llamabind.SamplingError):
        TokenGenerator(ctx, 2, Sampler().add_top_k(5))


def test_sample_before_decode_is_refused(smol: Model) -> None:
    with Context(smol, n_ctx=64) as fresh:
        with pytest.raises(InvalidArgumentError, match="decode"):
            Sampler().add_greedy().sample(fresh)


def test_cancel_before_decode(smol: Model, ctx: Context) -> None:
    ctx.cancel()
    with pytest.raises(llamabind.GenerationCancelled):
        ctx.eval([1, 2, 3])
    ctx.eval([1, 2, 3])  # usable afterwards
    assert ctx.seq_pos_max(0) == 2


def test_embeddings(smol: Model) -> None:
    with Context(smol, n_ctx=128, embeddings=True, pooling="mean") as ctx:
        ctx.eval(smol.vocab.tokenize("Hello there"))
        emb = ctx.sequence_embeddings(0)
        assert emb.shape == (smol.n_embd,)
        assert np.isfinite(emb).all() and np.linalg.norm(emb) > 0
    with Context(smol, n_ctx=64) as ctx:
        ctx.eval([1, 2])
        with pytest.raises(InvalidArgumentError, match="embeddings"):
            ctx.embeddings()


def test_perf_counters(smol: Model, ctx: Context) -> None:
    ctx.perf_reset()
    tokens = smol.vocab.tokenize(PROMPT)
    ctx.eval(tokens)
    list(TokenGenerator(ctx, len(tokens), max_tokens=4))
    perf = ctx.perf()
    assert perf["n_p_eval"] == len(tokens)
    assert perf["n_eval"] == 3  # the 4th token is never decoded
    assert perf["t_eval_ms"] > 0


def test_closed_context_raises(smol: Model) -> None:
    ctx = Context(smol, n_ctx=64)
    ctx.close()
    ctx.close()
    for call in (lambda: ctx.eval([1]), lambda: ctx.logits(), lambda: ctx.save_state(),
                 lambda: ctx.memory_clear()):
        with pytest.raises(ClosedError):
            call()


def test_context_argument_checks(smol: Model) -> None:
    for kwargs, word in [({"n_ctx": -1}, "n_ctx"), ({"n_batch": 0}, "n_batch"),
                         ({"n_ubatch": 1024}, "n_ubatch"), ({"n_threads": -7}, "-7"),
                         ({"n_seq_max": 0}, "n_seq_max"), ({"flash_attn": "maybe"}, "maybe"),
                         ({"type_k": "q9"}, "q9"), ({"pooling": "max"}, "max")]:
        with pytest.raises(InvalidArgumentError, match=word):
            Context(smol, **kwargs)


def _greedy_reference(row: np.ndarray) -> int:
    """llama.cpp's greedy sampler, as written there: a strict ">" over the row."""
    values = row.tolist()
    best = 0
    for i in range(1, len(values)):
        if values[i] > values[best]:
            best = i
    return best


def test_argmax_is_llama_cpps_greedy_choice() -> None:
    """The C argmax (blocks of packed maxima) picks what llama.cpp's greedy loop picks:
    the first of equal maxima, across and inside block edges, never a NaN, index 0
    when logit 0 is NaN, infinities, signed zeros, short and odd lengths."""
    from llamabind._llama import _argmax_floats

    rng = np.random.default_rng(11)
    cases: list[np.ndarray] = []
    for n in (1, 2, 7, 8, 9, 511, 512, 513, 1024, 1031, 49152, 151936):
        row = rng.standard_normal(n).astype(np.float32)
        cases.append(row)
        for at in {0, n - 1, n // 2, min(n - 1, 512), min(n - 1, 520)}:
            peak = row.copy()
            peak[at] = 100.0
            cases.append(peak)
            tie = peak.copy()
            tie[n - 1] = 100.0       # a later equal maximum loses
            cases.append(tie)
            nan = peak.copy()
            nan[rng.integers(0, n, size=max(1, n // 50))] = np.nan
            cases.append(nan)
    special = [np.array(v, dtype=np.float32) for v in (
        [np.nan, 5.0, 7.0], [1.0, np.nan, 7.0, np.nan], [-np.inf, -np.inf],
        [-np.inf, np.inf, np.inf], [-0.0, 0.0, -0.0], [0.0, -0.0], [np.nan] * 9,
        [3.0] * 1000, [-1e30] * 600 + [-1e29] + [-1e30] * 600)]
    cases += special
    for row in cases:
        assert _argmax_floats(row) == _greedy_reference(row), row[:16]
    assert _argmax_floats(np.zeros(0, dtype=np.float32)) == -1


def _native_threads() -> int:
    import os
    return len(os.listdir("/proc/self/task"))


def test_context_keeps_a_thread_pool_of_its_own(smol: Model) -> None:
    """A context with n threads keeps n - 1 ggml worker threads between decodes (not
    started and joined on every decode); batches share the pool when it is big enough;
    set_n_threads keeps a pool that is big enough and starts a bigger one when asked
    for more; close() joins them all: no thread outlives its context. (At most 2
    threads: more than the machine's cores makes ggml's spinning barriers take seconds
    per token.)"""
    tokens = smol.vocab.tokenize(PROMPT)
    before = _native_threads()
    ctx = Context(smol, n_ctx=256, n_batch=64, n_threads=2, n_threads_batch=1)
    try:
        assert _native_threads() == before + 1          # 1 worker, shared by batches
        first = greedy_tokens(ctx, tokens, 4)
        assert _native_threads() == before + 1
        ctx.set_n_threads(1)
        assert ctx.n_threads == (1, 1)
        assert _native_threads() == before + 1          # the pool of 2 serves 1 thread
        assert greedy_tokens(ctx, tokens, 4) == first
        ctx.set_n_threads(1, 2)
        assert ctx.n_threads == (1, 2)
        assert greedy_tokens(ctx, tokens, 4) == first
    finally:
        ctx.close()
    assert _native_threads() == before
    ctx = Context(smol, n_ctx=256, n_batch=64, n_threads=1)
    try:
        assert _native_threads() == before
        ctx.set_n_threads(1, 2)                         # batches need a pool of 2
        assert _native_threads() == before + 1
        assert greedy_tokens(ctx, tokens, 4) == first
        ctx.set_n_threads(2)                            # a pool of 2 for decodes too
        assert ctx.n_threads == (2, 2)
        assert greedy_tokens(ctx, tokens, 4) == first
        assert _native_threads() == before + 2          # the replaced pool waits for close
    finally:
        ctx.close()
    assert _native_threads() == before

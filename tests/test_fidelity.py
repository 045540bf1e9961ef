"""Fidelity to native llama.cpp: llamabind must produce exactly what a plain C program
on llama.h produces (native/llamabind_ref.cpp, built by scripts/build_native.py from
the same pinned source with the same build options).

Both sides run on the same machine, with the same context sizes, batch sizes and thread
counts, so greedy and seeded sampling must give identical token ids, not merely similar
text. The native side uses llama.cpp's own greedy sampler; llamabind's
TokenGenerator(sampler=None) uses its argmax in C: they must agree.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _native import (  # noqa: F401
    BUILD_SCRIPT,
    BUILD_TIMEOUT_S,
    ROOT,
    NativeRef,
    native_fixture,
    native_tools,
)

import llamabind
from llamabind import Context, Model, Sampler, TokenGenerator

# The first test to need the native tools builds them (minutes from scratch).
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S + 600)

MODELS = ("smol", "qwen")
N_PREDICT = 64

PROMPTS: dict[str, str] = {
    "english": (
        "The history of the printing press begins in the fifteenth century, when Johannes "
        "Gutenberg"
    ),
    "code": (
        "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n"
        '    """Merge two sorted lists into one sorted list."""\n'
    ),
    "cjk": ("東京の朝は早い。서울의 겨울은 춥다. "
            "从前，在一个遥远的小山村里，住着一位老木匠。每天清晨，他都会"),
    "emoji": "My favourite emojis are 🦙, 🚀 and 😶‍🌫️ because",
}

# several batches of 64 tokens on both sides
MULTI_BATCH_PROMPT = (
    "Chapter One. The lighthouse keeper woke before dawn, as he had every morning for "
    "thirty years. He climbed the spiral stairs, one hundred and twelve steps, counting "
    "each one under his breath. At the top he wiped the great lens with a soft cloth, "
    "checked the oil, and looked out over the grey water. Far to the east a fishing boat "
    "was heading home, its lamps still burning. The wind had turned in the night and now "
    "came from the north, cold and steady, carrying the smell of snow. He wrote the time, "
    "the weather and the boat in the logbook, in the same careful hand his father had "
    "taught him. Then he made tea, sat by the window, and waited for the supply ship that "
    "was already two days late. In the afternoon he repaired the hinge of the storm door, "
    "oiled the winch, and carried three sacks of coal up from the cellar. His daughter "
    "had written from the city, asking him again to come and live with her family, and "
    "the letter lay unanswered on the table beside the barometer. He read it once more, "
    "folded it, and put it back under the brass weight. When the ship finally appeared "
    "on the horizon,"
)

SENTENCES = (
    "The river runs north through the valley and meets the sea near the old harbour.",
    "Every spring the farmers plant barley on the terraces above the village.",
    "A narrow road climbs from the square to the monastery on the hill.",
    "In the evenings the fishermen mend their nets on the stone quay.",
    "The school has three classrooms, a library and a small garden.",
    "Merchants once brought salt, wool and copper along the coastal route.",
    "Storms in winter sometimes close the mountain pass for several weeks.",
    "The bakery opens at five, and the smell of bread fills the lanes.",
)


def _ctx_threads(ctx: Context) -> int:
    n_threads, n_threads_batch = ctx.n_threads
    assert n_threads == n_threads_batch
    return int(n_threads)


def _first_difference(a: list[int], b: list[int]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"first difference at index {i}: llamabind {x}, native {y}"
    return f"lengths differ: llamabind {len(a)}, native {len(b)}"


def _generate_core(model: Model, prompt: str, *, n_ctx: int, n_batch: int, n_predict: int,
                   make_sampler: Callable[[], Sampler] | None = None,
                   ) -> tuple[list[int], list[int], str, int]:
    """llamabind's core: tokenize, Context.eval, TokenGenerator. Returns (prompt tokens,
    generated tokens, finish reason, threads used)."""
    tokens = model.vocab.tokenize(prompt, add_special=True, parse_special=False)
    with Context(model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(n_batch, 512)) as ctx:
        ctx.eval(tokens)
        sampler = make_sampler() if make_sampler is not None else None
        try:
            gen = TokenGenerator(ctx, len(tokens), sampler, max_tokens=n_predict)
            out = [tok for tok, _piece in gen]
            finish = str(gen.finish_reason)
        finally:
            if sampler is not None:
                sampler.close()
        threads = _ctx_threads(ctx)
    return tokens, out, finish, threads


def _check_same(ours: tuple[list[int], list[int], str, int], ref: dict[str, Any]) -> None:
    prompt_tokens, out, finish, _ = ours
    assert prompt_tokens == ref["prompt_tokens"], (
        "prompt tokenization differs: " + _first_difference(prompt_tokens, ref["prompt_tokens"]))
    assert out == ref["tokens"], "generated tokens differ: " + _first_difference(out, ref["tokens"])
    assert finish == ref["finish_reason"]


def _near_limit_prompt(model: Model, budget: int) -> str:
    """The longest run of SENTENCES (repeated) whose tokens, BOS included, fit in
    ``budget`` and come within 16 tokens of it."""
    text = ""
    i = 0
    while True:
        candidate = (text + " " if text else "") + SENTENCES[i % len(SENTENCES)]
        if len(model.vocab.tokenize(candidate)) > budget:
            break
        text = candidate
        i += 1
    # top up word by word to come close to the budget
    words = SENTENCES[i % len(SENTENCES)].split(" ")
    for w in words:
        candidate = text + " " + w
        if len(model.vocab.tokenize(candidate)) > budget:
            break
        text = candidate
    n = len(model.vocab.tokenize(text))
    assert budget - 16 <= n <= budget, (n, budget)
    return text


@pytest.fixture(params=MODELS)
def model_case(request: pytest.FixtureRequest) -> tuple[Model, str]:
    """(the loaded Model, its path) for each test model."""
    model: Model = request.getfixturevalue(request.param)
    path: str = request.getfixturevalue(f"{request.param}_path")
    return model, path


# --- greedy ----------------------------------------------------------------------------


@pytest.mark.model
@pytest.mark.parametrize("prompt_id", sorted(PROMPTS))
def test_greedy_matches_native(model_case: tuple[Model, str], native: NativeRef,
                               prompt_id: str) -> None:
    model, path = model_case
    ours = _generate_core(model, PROMPTS[prompt_id], n_ctx=512, n_batch=512, n_predict=N_PREDICT)
    ref = native.generate(path, PROMPTS[prompt_id], n_predict=N_PREDICT, n_ctx=512,
                          n_batch=512, n_ubatch=512, threads=ours[3])
    _check_same(ours, ref)
    # the comparison covers a real generation, not an early end-of-generation token
    assert len(ours[1]) == N_PREDICT and ours[2] == "length"


@pytest.mark.model
def test_greedy_multi_batch_prompt_matches_native(model_case: tuple[Model, str],
                                                  native: NativeRef) -> None:
    model, path = model_case
    n_batch = 64
    ours = _generate_core(model, MULTI_BATCH_PROMPT, n_ctx=512, n_batch=n_batch,
                          n_predict=N_PREDICT)
    assert len(ours[0]) > 3 * n_batch  # the prompt really spans several batches
    ref = native.generate(path, MULTI_BATCH_PROMPT, n_predict=N_PREDICT, n_ctx=512,
                          n_batch=n_batch, n_ubatch=n_batch, threads=ours[3])
    assert ref["n_batch"] == n_batch and ref["n_ubatch"] == n_batch
    _check_same(ours, ref)
    assert len(ours[1]) == N_PREDICT


@pytest.mark.model
def test_greedy_up_to_the_context_limit_matches_native(model_case: tuple[Model, str],
                                                       native: NativeRef) -> None:
    """A prompt that leaves room for only ~70 tokens, and a generation asked for more:
    both sides must run to the very end of the context and stop there."""
    model, path = model_case
    n_ctx = 512
    room = N_PREDICT + 8
    prompt = _near_limit_prompt(model, n_ctx - room)
    ours = _generate_core(model, prompt, n_ctx=n_ctx, n_batch=512, n_predict=4 * N_PREDICT)
    ref = native.generate(path, prompt, n_predict=4 * N_PREDICT, n_ctx=n_ctx, n_batch=512,
                          n_ubatch=512, threads=ours[3])
    assert ref["n_ctx"] == n_ctx
    _check_same(ours, ref)
    prompt_len, out = len(ours[0]), ours[1]
    assert prompt_len >= n_ctx - room - 16
    assert len(out) >= N_PREDICT
    # the generation filled the context exactly
    assert prompt_len + len(out) == n_ctx and ours[2] == "length"


# --- a seeded sampler chain ------------------------------------------------------------

CHAIN = {"penalty_last_n": 64, "repeat": 1.1, "freq": 0.0, "present": 0.0,
         "top_k": 40, "top_p": 0.95, "temp": 0.8}


def _f32(x: float) -> float:
    """The float32 llamabind passes to llama.cpp, so the native side gets the same bits."""
    return float(f"{float(np.float32(x)):.9g}")


def _native_chain(seed: int) -> dict[str, Any]:
    chain: dict[str, Any] = {k: (_f32(v) if isinstance(v, float) else v) for k, v in CHAIN.items()}
    chain["seed"] = seed
    return chain


def _core_chain(model: Model, seed: int) -> Sampler:
    return (Sampler()
            .add_penalties(model.n_vocab, CHAIN["penalty_last_n"], CHAIN["repeat"],
                           CHAIN["freq"], CHAIN["present"])
            .add_top_k(CHAIN["top_k"])
            .add_top_p(CHAIN["top_p"])
            .add_temperature(CHAIN["temp"])
            .add_dist(seed=seed))


@pytest.mark.model
@pytest.mark.parametrize(("prompt_id", "seed"), [("english", 1234), ("code", 7), ("cjk", 99)])
def test_seeded_sampler_chain_matches_native(model_case: tuple[Model, str], native: NativeRef,
                                             prompt_id: str, seed: int) -> None:
    model, path = model_case
    prompt = PROMPTS[prompt_id]
    ours = _generate_core(model, prompt, n_ctx=512, n_batch=512, n_predict=N_PREDICT,
                          make_sampler=lambda: _core_chain(model, seed))
    ref = native.generate(path, prompt, n_predict=N_PREDICT, n_ctx=512, n_batch=512,
                          n_ubatch=512, threads=ours[3], chain=_native_chain(seed))
    assert ref["seed"] == seed
    _check_same(ours, ref)
    assert len(ours[1]) >= 16
    # the chain really samples: the output is not the greedy one
    greedy = native.generate(path, prompt, n_predict=N_PREDICT, n_ctx=512, n_batch=512,
                             n_ubatch=512, threads=ours[3])
    assert greedy["tokens"] != ours[1]


@pytest.mark.model
def test_seed_changes_the_sample(smol: Model, smol_path: str, native: NativeRef) -> None:
    """The seed reaches llama.cpp: two seeds give two different samples on both sides."""
    prompt = PROMPTS["english"]
    outs = []
    for seed in (1, 2):
        ours = _generate_core(smol, prompt, n_ctx=512, n_batch=512, n_predict=32,
                              make_sampler=lambda s=seed: _core_chain(smol, s))
        ref = native.generate(smol_path, prompt, n_predict=32, n_ctx=512, n_batch=512,
                              n_ubatch=512, threads=ours[3], chain=_native_chain(seed))
        _check_same(ours, ref)
        outs.append(ours[1])
    assert outs[0] != outs[1]


# --- tokenization ----------------------------------------------------------------------

TOKENIZE_CASES = [
    *PROMPTS.values(),
    "中国的首都是北京。日本の首都は東京です。한국의 수도는 서울입니다.",
    MULTI_BATCH_PROMPT,
    "",
    " ",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|> in the middle <|endoftext|>",
    "Ünïcödé façade naïve Ελληνικά русский العربية हिन्दी",
]


@pytest.mark.model
@pytest.mark.parametrize("parse_special", [False, True])
@pytest.mark.parametrize("add_special", [True, False])
def test_tokenization_matches_native(model_case: tuple[Model, str], native: NativeRef,
                                     add_special: bool, parse_special: bool) -> None:
    model, path = model_case
    for text in TOKENIZE_CASES:
        ours = model.vocab.tokenize(text, add_special=add_special, parse_special=parse_special)
        ref = native.tokenize(path, text, add_special=add_special, parse_special=parse_special)
        assert ours == ref, f"{text!r}: " + _first_difference(ours, ref)


@pytest.mark.model
def test_text_with_nul_is_refused_where_native_tokenizes_it(smol: Model, smol_path: str,
                                                           native: NativeRef) -> None:
    """The one place llamabind departs from llama.cpp's tokenizer, on purpose: text
    with NUL characters. llama_tokenize (it takes a length) tokenizes NUL like any
    byte, but a NUL in a prompt is almost always a bug (a C string boundary, binary
    data), so llamabind refuses it with an error naming the position."""
    text = "a\0b"
    ref = native.tokenize(smol_path, text, add_special=False)
    assert len(ref) == 3
    with pytest.raises(llamabind.InvalidArgumentError, match=r"NUL.*index 1"):
        smol.vocab.tokenize(text, add_special=False)


# --- embeddings ------------------------------------------------------------------------


@pytest.mark.model
@pytest.mark.parametrize("prompt_id", ["english", "cjk", "code"])
def test_mean_pooled_embedding_matches_native(model_case: tuple[Model, str], native: NativeRef,
                                              prompt_id: str) -> None:
    model, path = model_case
    prompt = PROMPTS[prompt_id]
    tokens = model.vocab.tokenize(prompt)
    with Context(model, n_ctx=512, n_batch=512, embeddings=True, pooling="mean") as ctx:
        assert ctx.pooling == "mean"
        ctx.eval(tokens)
        ours = np.array(ctx.sequence_embeddings(0), dtype=np.float32)
        threads = _ctx_threads(ctx)
    ref = native.embed(path, prompt, n_ctx=512, n_batch=512, n_ubatch=512, threads=threads)
    assert ref["prompt_tokens"] == tokens
    theirs = np.array(ref["embedding"], dtype=np.float32)
    assert ours.shape == theirs.shape == (model.n_embd,)
    assert np.all(np.isfinite(ours)) and float(np.linalg.norm(ours)) > 0.0
    # Same code, same threads, same batch: the values should agree to the last bit; the
    # tolerance only allows for printing/parsing, and is far below the differences
    # between prompts checked below.
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.model
def test_embeddings_differ_between_prompts(model_case: tuple[Model, str]) -> None:
    """The embedding comparison above can fail: different texts are far apart."""
    model, _ = model_case
    embs = []
    for prompt_id in ("english", "cjk"):
        with Context(model, n_ctx=512, n_batch=512, embeddings=True, pooling="mean") as ctx:
            ctx.eval(model.vocab.tokenize(PROMPTS[prompt_id]))
            embs.append(np.array(ctx.sequence_embeddings(0)))
    assert not np.allclose(embs[0], embs[1], rtol=1e-2, atol=1e-3)


@pytest.mark.model
def test_mean_pooling_is_the_mean_of_token_embeddings(model_case: tuple[Model, str]) -> None:
    """What "mean" means: the average of the per-token embeddings of the same batch."""
    model, _ = model_case
    tokens = model.vocab.tokenize(PROMPTS["english"])
    with Context(model, n_ctx=512, n_batch=512, embeddings=True, pooling="mean") as ctx:
        ctx.eval(tokens)
        pooled = np.array(ctx.sequence_embeddings(0))
    with Context(model, n_ctx=512, n_batch=512, embeddings=True, pooling="none") as ctx:
        ctx.eval(tokens, logits="all")
        per_token = np.array([np.array(ctx.embeddings(i)) for i in range(len(tokens))])
    np.testing.assert_allclose(pooled, per_token.mean(axis=0), rtol=1e-4, atol=1e-4)


# --- the high-level API ----------------------------------------------------------------


@pytest.fixture(scope="module", params=MODELS)
def loaded_case(request: pytest.FixtureRequest) -> Iterator[tuple[Any, str]]:
    """(LoadedModel with n_ctx=1024 and one slot, its path) for each test model.

    One slot: the engine's context then has the native program's size (n_ctx x 1 KV
    cells). With more slots it holds more cells, and attention over a longer (mostly
    masked) KV buffer sums in another order: logits within float noise, not bit-equal,
    and a seeded pick can change. The engine with many slots is held to native by
    replaying its schedule with its own context size (test_engine_schedule_replays_natively).
    Each test empties the slot and the prompt cache first (``clear_cache``): a prompt
    an earlier test left there would be reused, its last token decoded alone instead of
    in the prompt's batch (equal to native within float noise, not bit-equal)."""
    path: str = request.getfixturevalue(f"{request.param}_path")
    with llamabind.LoadedModel.load(path, n_ctx=1024, n_parallel=1) as loaded:
        yield loaded, path


@pytest.mark.model
@pytest.mark.parametrize("prompt_id", ["english", "code", "emoji"])
def test_loaded_model_greedy_matches_native(loaded_case: tuple[Any, str], native: NativeRef,
                                            prompt_id: str) -> None:
    loaded, path = loaded_case
    prompt = PROMPTS[prompt_id]
    loaded.engine.clear_cache()
    result = loaded.generate(prompt, temperature=0.0, max_tokens=N_PREDICT)
    ref = native.generate(path, prompt, n_predict=N_PREDICT, n_ctx=1024, n_batch=512,
                          n_ubatch=512, threads=llamabind.default_threads())
    assert result.prompt_tokens == len(ref["prompt_tokens"])
    tokens = list(result.tokens)
    assert tokens == ref["tokens"], _first_difference(tokens, ref["tokens"])
    assert len(tokens) == N_PREDICT


@pytest.mark.model
@pytest.mark.parametrize(("prompt_id", "seed"), [("english", 1234), ("cjk", 99)])
def test_loaded_model_sampling_matches_native(loaded_case: tuple[Any, str], native: NativeRef,
                                              prompt_id: str, seed: int) -> None:
    """The high-level sampling options build the same chain as the native one
    (penalties -> top_k -> top_p -> temperature -> dist; min_p off)."""
    loaded, path = loaded_case
    prompt = PROMPTS[prompt_id]
    loaded.engine.clear_cache()
    result = loaded.generate(
        prompt, max_tokens=N_PREDICT, seed=seed, temperature=CHAIN["temp"],
        top_k=CHAIN["top_k"], top_p=CHAIN["top_p"], min_p=0.0, typical_p=1.0,
        repeat_penalty=CHAIN["repeat"], frequency_penalty=CHAIN["freq"],
        presence_penalty=CHAIN["present"], penalty_last_n=CHAIN["penalty_last_n"])
    ref = native.generate(path, prompt, n_predict=N_PREDICT, n_ctx=1024, n_batch=512,
                          n_ubatch=512, threads=llamabind.default_threads(),
                          chain=_native_chain(seed))
    assert result.prompt_tokens == len(ref["prompt_tokens"])
    tokens = list(result.tokens)
    assert tokens == ref["tokens"], _first_difference(tokens, ref["tokens"])


# --- the batching engine: its recorded schedule, replayed natively -----------------------

ENGINE_PROMPTS = [PROMPTS["english"], PROMPTS["code"], PROMPTS["emoji"], PROMPTS["cjk"],
                  "The three primary colors are", "Once upon a time,"]


@pytest.mark.model
@pytest.mark.parametrize("model_id", MODELS)
def test_engine_schedule_replays_natively(model_id: str, native: NativeRef,
                                          request: pytest.FixtureRequest) -> None:
    """Many requests decoded together: the engine records which tokens of which
    sequences went into each batch; the native program decodes exactly those batches
    with its own samplers, and every choice's tokens equal ours (greedy and seeded, n=2
    sharing a prompt, more requests than slots so slots are reused)."""
    path: str = request.getfixturevalue(f"{model_id}_path")
    with llamabind.LoadedModel.load(path, n_ctx=256, n_parallel=4, n_batch=64,
                                    cache_ram_mib=0) as model:
        record = model.engine.record_schedule()
        reqs = []
        for i, prompt in enumerate(ENGINE_PROMPTS):
            opts: dict[str, Any] = {"temperature": 0.0} if i % 2 == 0 else {
                "temperature": 0.9, "seed": 100 + i}
            reqs.append(model.submit(prompt, max_tokens=24 + 4 * i, n=2 if i == 1 else 1,
                                     stream=False, **opts))
        results = [r.result() for r in reqs]
        params = model.engine.context_params()
        model.engine.record_schedule(False)
    native_picks = native.replay(path, record, params)
    for req, res in zip(reqs, results, strict=True):
        for rid, choice in zip(req.rids, res, strict=True):
            picked = native_picks[rid]
            ours = list(choice.tokens)
            assert picked[:len(ours)] == ours, _first_difference(ours, picked)
            # the native side also picked the end-of-generation token where we stopped
            assert len(picked) == len(ours) + (1 if choice.finish_reason == "stop" else 0)
    assert len({tuple(r.tokens) for r in results[1]}) == 2  # the two choices differ


# --- the native build itself -----------------------------------------------------------

# what native/CMakeLists.txt sets itself: which targets, no web UI for llama-server
FORCED_BY_NATIVE = {"LLAMA_BUILD_COMMON", "LLAMA_BUILD_TESTS", "LLAMA_BUILD_TOOLS",
                    "LLAMA_BUILD_EXAMPLES", "LLAMA_BUILD_SERVER", "LLAMA_BUILD_APP",
                    "LLAMA_OPENSSL", "LLAMA_BUILD_UI", "LLAMA_USE_PREBUILT_UI"}


def _installed_build_config() -> tuple[Path, dict[str, Any]]:
    spec_dir = Path(llamabind._llama.__file__).parent
    path = spec_dir / "build_config.json"
    assert path.is_file(), f"the installed llamabind has no {path}"
    config: dict[str, Any] = json.loads(path.read_text())
    return path, config


def _cmake_cache(build_dir: Path) -> dict[str, str]:
    values = {}
    for line in (build_dir / "CMakeCache.txt").read_text().splitlines():
        if line and not line.startswith(("#", "//")) and ":" in line and "=" in line:
            key, _, value = line.partition("=")
            values[key.split(":", 1)[0]] = value
    return values


def test_native_build_uses_the_package_options() -> None:
    info = native_tools()
    config_path, config = _installed_build_config()
    assert Path(info["build_config"]) == config_path.resolve()
    expected = {k: v for k, v in config["options"].items() if k not in FORCED_BY_NATIVE}
    assert info["options"] == expected
    assert info["build_type"] == config["build_type"]
    assert info["llama_cpp_commit"] == config["llama_cpp_commit"]
    # ... and CMake really got them
    cache = _cmake_cache(Path(info["bin_dir"]).parent)
    assert {k: cache.get(k) for k in expected} == expected
    assert cache["CMAKE_BUILD_TYPE"] == config["build_type"]
    assert cache["LLAMA_BUILD_COMMON"] == "ON"
    for name in ("LLAMA_BUILD_TESTS", "LLAMA_BUILD_TOOLS", "LLAMA_BUILD_EXAMPLES",
                 "LLAMA_BUILD_SERVER", "LLAMA_BUILD_APP", "LLAMA_OPENSSL", "BUILD_SHARED_LIBS"):
        assert cache[name] == "OFF", name
    for path in info["binaries"].values():
        assert os.access(path, os.X_OK), path


def _compile_flags(build_dir: Path) -> dict[str, list[str]]:
    """Compile commands of llama.cpp's own sources (src/, ggml/), with the build dir,
    output names and the compiler path (compared as its real path) normalised."""
    out: dict[str, list[str]] = {}
    for entry in json.loads((build_dir / "compile_commands.json").read_text()):
        src = entry["file"]
        if "/vendor/llama.cpp/src/" not in src and "/vendor/llama.cpp/ggml/" not in src:
            continue
        args = shlex.split(entry["command"])
        norm = [os.path.realpath(args[0])]
        skip = False
        for arg in args[1:]:
            if skip:
                skip = False
            elif arg in ("-o", "-c", "-MF", "-MT"):
                skip = True
            else:
                norm.append(arg.replace(str(build_dir), "<build>"))
        out[src] = norm
    return out


def test_native_compile_flags_match_the_package_build() -> None:
    """Where the package's own build tree is at hand (build/<wheel tag>/, an editable or
    local install), every llama.cpp and ggml source is compiled the same way."""
    info = native_tools()
    _, config = _installed_build_config()
    package_trees = [p.parent for p in sorted((ROOT / "build").glob("*/build_config.json"))
                     if json.loads(p.read_text()) == config
                     and (p.parent / "compile_commands.json").is_file()]
    if not package_trees:
        pytest.skip("the installed llamabind's build tree (with compile_commands.json) is "
                    "not under build/")
    ours = _compile_flags(package_trees[0])
    theirs = _compile_flags(Path(info["bin_dir"]).parent)
    assert ours and set(ours) == set(theirs)
    different = {src: sorted(set(ours[src]) ^ set(theirs[src]))
                 for src in ours if ours[src] != theirs[src]}
    assert not different, f"{len(different)} sources compiled differently, e.g. " + str(
        next(iter(different.items())))


def test_build_native_is_idempotent() -> None:
    native_tools()  # built (or found current) once
    proc = subprocess.run([sys.executable, str(BUILD_SCRIPT), "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=True)
    assert json.loads(proc.stdout)["built"] is False
    proc = subprocess.run([sys.executable, str(BUILD_SCRIPT), "--print-dir"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0
    assert proc.stdout.strip() == native_tools()["bin_dir"]

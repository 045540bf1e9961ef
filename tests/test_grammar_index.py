"""The probe index (src/llamabind/_core/grammar_index.h): asking a grammar about the
whole vocabulary through probe tokens must allow exactly the tokens llama.cpp's grammar
sampler allows when asked about each token, at every point of a grammar, on both
vocabularies, and it must stand aside where it would not be exact."""

from __future__ import annotations

import random

import pytest
from structured_schemas import SCHEMAS

import llamabind
from llamabind.structured import Planner

pytestmark = pytest.mark.model

SCHEMA_NAMES = ("flat-object", "enum-in-object", "additional-properties-false", "pattern-code",
                "format-date-time", "anyOf-objects", "string-length", "invoice")

GBNF = {
    # characters beyond ASCII, positive: lead-byte probes are exact
    "wide-literals": 'root ::= ("日本" | "東京" | "café" | [a-z]+) " " [0-9]{1,3}',
    # a negated class listing a non-ASCII character: lead-byte probes must not be used
    "negated-wide": 'root ::= "«" [^»\\n]{1,12} "»"',
    # an escape beyond ASCII in a negated class
    "negated-escape": 'root ::= "<" [^\\u00e9>]{1,8} ">" # a comment with [^ and "',
    # free text: every probe allowed
    "ascii-negated": 'root ::= [^"\\\\]{1,16} "."',
}


@pytest.fixture(scope="module", params=["smol", "qwen"])
def model(request: pytest.FixtureRequest) -> llamabind.Model:
    return request.getfixturevalue(request.param)


def _walk(model: llamabind.Model, sampler: llamabind.Sampler, seed: int, steps: int) -> set[str]:
    """Feed the grammar random allowed tokens (any of them, not the likely ones: byte
    tokens and rare characters too), comparing the two masks at every step."""
    rng = random.Random(seed)
    ways = set()
    for _ in range(steps):
        plain, how = sampler._grammar_mask(indexed=False)
        assert how == "plain"
        indexed, how = sampler._grammar_mask()
        ways.add(how)
        assert indexed == plain, f"the index allowed {len(indexed)} tokens, llama.cpp {len(plain)}"
        non_eog = [t for t in plain if not model.vocab.is_eog(t)]
        if not non_eog:
            break
        sampler.accept(rng.choice(non_eog))
    return ways


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_index_equals_llama_on_schemas(model: llamabind.Model, name: str) -> None:
    plan = Planner(model).plan(json_schema=dict(SCHEMAS)[name])
    for seed in (1, 2):
        s = llamabind.Sampler()
        plan.add_to_sampler(s, model)
        s.add_greedy()
        ways = _walk(model, s, seed, 14)
        # JSON-schema grammars list only ASCII in negated classes: the lead bytes serve
        assert "index+lead" in ways
        s.close()


@pytest.mark.parametrize("name", sorted(GBNF))
def test_index_equals_llama_on_grammars(model: llamabind.Model, name: str) -> None:
    for seed in (1, 2, 3):
        s = llamabind.Sampler().add_grammar(model, GBNF[name]).add_greedy()
        ways = _walk(model, s, seed, 12)
        expected = "index" if name.startswith("negated") else "index+lead"
        assert ways <= {expected, "plain"} and expected in ways, ways
        s.close()


def test_pending_character_uses_llama(qwen: llamabind.Model) -> None:
    """A token that ends inside a UTF-8 character leaves the grammar owing bytes: the
    next mask is llama.cpp's own, and the index serves again once the character ends."""
    v = qwen.vocab
    wide = "日本".encode()
    bytes_tokens = [t for t in range(v.n_tokens) if v.token_to_piece(t, special=True) == wide[:1]]
    assert bytes_tokens, "Qwen's vocabulary has a token for each byte"
    rest = [t for t in range(v.n_tokens) if v.token_to_piece(t, special=True) == wide[1:3]]
    s = llamabind.Sampler().add_grammar(qwen, 'root ::= "日本" [a-z]{1,4}').add_greedy()
    assert s._grammar_mask()[1] == "index+lead"
    s.accept(bytes_tokens[0])
    plain, _ = s._grammar_mask(indexed=False)
    assert s._grammar_mask() == (plain, "plain")
    if rest:  # the character's other two bytes as one token
        s.accept(rest[0])
        plain, _ = s._grammar_mask(indexed=False)
        assert s._grammar_mask() == (plain, "index+lead")
    s.close()


def test_token_elements_and_lazy_grammars_use_llama(smol: llamabind.Model) -> None:
    with_token = llamabind.Sampler().add_grammar(smol, 'root ::= <[28]> "x" | "y"').add_greedy()
    plain, _ = with_token._grammar_mask(indexed=False)
    assert with_token._grammar_mask() == (plain, "plain")
    assert 28 in plain
    with_token.close()
    lazy = llamabind.Sampler().add_grammar(smol, 'root ::= "{" [a-z]+ "}"',
                                           trigger_patterns=["<tool>"]).add_greedy()
    assert lazy._grammar_mask()[1] == "plain"
    lazy.close()


@pytest.mark.parametrize("key", ["smol", "qwen"])
def test_sampling_with_the_index_matches_llama(request: pytest.FixtureRequest, key: str) -> None:
    """Whole generations as llama.cpp samples them (every refused choice masks the whole
    vocabulary): through the index and token by token, the same tokens."""
    model = request.getfixturevalue(key)
    plan = Planner(model).plan(json_schema=dict(SCHEMAS)["enum-in-object"])
    prompt = list(model.vocab.tokenize("Here is a JSON value:\n"))
    ctx = llamabind.Context(model, n_ctx=256)
    outs = []
    for use_index in (True, False):
        s = llamabind.Sampler()
        plan.add_to_sampler(s, model)
        s.add_top_k(40).add_top_p(0.95).add_min_p(0.05).add_temperature(0.8).add_dist(seed=5)
        s._resample_over_window(False)
        s._use_grammar_index(use_index)
        ctx.memory_clear()
        ctx.eval(prompt)
        out = []
        for _ in range(40):
            tok = s.sample(ctx)
            if model.vocab.is_eog(tok):
                break
            out.append(tok)
            ctx.eval([tok])
        outs.append(out)
        assert s.perf()["grammar_full_masks"] > 0
        s.close()
    ctx.close()
    assert outs[0] == outs[1]

"""Structured output on the real models: JSON schemas (the corpus in
structured_schemas.py), Pydantic models, response_format; refused and broken schemas."""

from __future__ import annotations

import json
from typing import Annotated, Any

import jsonschema
import pydantic
import pytest
from structured_schemas import BROKEN, SCHEMAS, UNSUPPORTED

import llamabind
from llamabind import structured
from llamabind.errors import (
    GrammarError,
    InvalidArgumentError,
    OutputParseError,
    SchemaError,
    UnsupportedSchemaError,
)

pytestmark = pytest.mark.model

# seeds per model: SmolLM2 is fast, Qwen slower (keep CI time in check)
SEEDS = {"smol": (1, 2, 3), "qwen": (1, 2)}


def _validator(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@pytest.fixture(scope="module", params=["smol", "qwen"])
def model(request: pytest.FixtureRequest) -> tuple[str, llamabind.LoadedModel]:
    name = request.param
    return name, request.getfixturevalue("loaded_smol" if name == "smol" else "loaded_qwen")


@pytest.mark.parametrize(("name", "schema"), SCHEMAS, ids=[n for n, _ in SCHEMAS])
def test_schema_corpus(model: tuple[str, llamabind.LoadedModel], name: str,
                       schema: dict[str, Any]) -> None:
    key, loaded = model
    validator = _validator(schema)
    prompt = f"Here is a JSON value ({name.replace('-', ' ')}):\n"
    unfinished = []
    for seed in SEEDS[key]:
        r = loaded.generate(prompt, json_schema=schema, seed=seed, max_tokens=256)
        if r.finish_reason == "length":
            # a sampled model can go on and on where the schema lets it (more
            # properties, deeper recursion): that output is cut, not invalid. Given
            # room, it ends; a second cut counts against the schema below.
            r = loaded.generate(prompt, json_schema=schema, seed=seed, max_tokens=1024)
            if r.finish_reason == "length":
                unfinished.append(seed)
                continue
        assert r.finish_reason == "stop", (seed, r.text)
        value = json.loads(r.text)
        errors = [e.message for e in validator.iter_errors(value)]
        assert not errors, (seed, r.text, errors)
        assert r.parsed == value
    assert len(unfinished) < len(SEEDS[key]), ("no seed finished", unfinished)


def test_corpus_size() -> None:
    assert len(SCHEMAS) >= 40
    for _, schema in SCHEMAS:
        jsonschema.Draft202012Validator.check_schema(schema)
        assert structured.check_schema(schema) == []


@pytest.mark.parametrize(("schema", "keyword", "path"), UNSUPPORTED,
                         ids=[f"{k}@{p}" for _, k, p in UNSUPPORTED])
def test_unsupported_keyword_refused(schema: dict[str, Any], keyword: str, path: str) -> None:
    with pytest.raises(UnsupportedSchemaError) as info:
        structured.json_schema_to_grammar(schema)
    assert (info.value.keyword, info.value.path) == (keyword, path)
    assert repr(keyword) in str(info.value) and path in str(info.value)
    assert "schema_best_effort=True" in str(info.value)
    # best effort: the converter's grammar for what it supports
    assert "root ::=" in structured.json_schema_to_grammar(schema, best_effort=True)
    findings = structured.check_schema(schema, best_effort=True)
    assert (findings[0].keyword, findings[0].path) == (keyword, path)


def test_refused_before_generation(loaded_smol: llamabind.LoadedModel) -> None:
    schema = {"type": "object", "properties": {"price": {"type": "number", "minimum": 0}}}
    with pytest.raises(UnsupportedSchemaError, match="#/properties/price/minimum"):
        loaded_smol.generate("x", json_schema=schema, max_tokens=4)
    r = loaded_smol.generate("A price:", json_schema=schema, schema_best_effort=True,
                             temperature=0, max_tokens=48)
    assert isinstance(json.loads(r.text), dict)


@pytest.mark.parametrize(("schema", "word"), BROKEN, ids=[w for _, w in BROKEN])
def test_broken_schema_typed_error(loaded_smol: llamabind.LoadedModel, schema: Any,
                                   word: str) -> None:
    with pytest.raises(SchemaError, match=word) as info:
        loaded_smol.generate("x", json_schema=schema, max_tokens=4)
    assert isinstance(info.value, (InvalidArgumentError, ValueError))
    r = loaded_smol.generate("The sky is", temperature=0, max_tokens=3)
    assert r.completion_tokens == 3


def test_schema_edge_cases(loaded_smol: llamabind.LoadedModel) -> None:
    deep: dict[str, Any] = {"type": "integer"}
    for _ in range(80):
        deep = {"type": "array", "items": deep}
    with pytest.raises(SchemaError, match="nested more than"):
        loaded_smol.generate("x", json_schema=deep, max_tokens=4)
    with pytest.raises(SchemaError, match="not JSON"):
        loaded_smol.generate("x", json_schema={"type": "number", "const": float("nan")})
    # a $ref that is its own definition: the grammar is left-recursive, llama.cpp
    # refuses it, and llamabind says so instead of aborting
    cyclic = {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
    with pytest.raises(GrammarError):
        loaded_smol.generate("x", json_schema=cyclic, max_tokens=4)
    with pytest.raises(GrammarError):
        loaded_smol.generate("x", grammar="root ::= (", max_tokens=4)
    with pytest.raises(InvalidArgumentError, match="only one of"):
        loaded_smol.generate("x", json_schema={"type": "integer"},
                             response_format={"type": "json_object"})
    with pytest.raises(InvalidArgumentError, match="grammar cannot be combined"):
        loaded_smol.generate("x", json_schema={"type": "integer"}, grammar='root ::= "1"')
    original = {"type": "object", "properties": {"a": {"type": "integer"}}}
    copy = json.loads(json.dumps(original))
    loaded_smol.generate("{", json_schema=original, temperature=0, max_tokens=16)
    assert original == copy  # the caller's schema is not modified
    r = loaded_smol.generate("The sky is", temperature=0, max_tokens=3)
    assert r.completion_tokens == 3


def test_grammar_text_is_llamas(loaded_smol: llamabind.LoadedModel) -> None:
    g = structured.json_schema_to_grammar({"type": "integer", "minimum": 0, "maximum": 9})
    assert g.startswith("root ::= ") and "[0-9]" in g
    with pytest.raises(InvalidArgumentError, match="dict or JSON text"):
        structured.json_schema_to_grammar(42)


class Line(pydantic.BaseModel):
    item: str = pydantic.Field(max_length=20)
    qty: int = pydantic.Field(ge=1, le=99)


class Invoice(pydantic.BaseModel):
    number: str = pydantic.Field(pattern=r"^INV-[0-9]{4}$")
    lines: list[Line] = pydantic.Field(min_length=1, max_length=2)
    paid: bool


def test_pydantic_model(loaded_qwen: llamabind.LoadedModel) -> None:
    r = loaded_qwen.chat([{"role": "user", "content": "Make an invoice for 2 apples."}],
                         schema=Invoice, temperature=0, max_tokens=160)
    assert r.finish_reason == "stop"
    assert isinstance(r.parsed, Invoice)
    assert r.parsed == Invoice.model_validate_json(r.message["content"])
    two_lines = Annotated[list[Line], pydantic.Field(min_length=1, max_length=2)]
    listed = loaded_qwen.generate("Two lines of an invoice as JSON: ", schema=two_lines,
                                  seed=3, max_tokens=160)
    assert listed.finish_reason == "stop"
    assert listed.parsed and all(isinstance(x, Line) for x in listed.parsed)


def test_pydantic_unsupported_field_refused(loaded_smol: llamabind.LoadedModel) -> None:
    class Priced(pydantic.BaseModel):
        price: float = pydantic.Field(ge=0)

    with pytest.raises(UnsupportedSchemaError) as info:
        loaded_smol.generate("x", schema=Priced)
    assert info.value.path == "#/properties/price/minimum"
    with pytest.raises(InvalidArgumentError, match="Pydantic model"):
        loaded_smol.generate("x", schema={"type": "integer"})


def test_response_format(loaded_qwen: llamabind.LoadedModel) -> None:
    msgs = [{"role": "user", "content": "Describe a cat in JSON."}]
    r = loaded_qwen.chat(msgs, response_format={"type": "json_object"}, temperature=0,
                         max_tokens=96)
    assert r.finish_reason == "stop" and isinstance(r.parsed, dict)
    assert json.loads(r.message["content"]) == r.parsed
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "legs": {"type": "integer", "minimum": 0,
                                                        "maximum": 8}},
              "required": ["name", "legs"]}
    r = loaded_qwen.chat(msgs, response_format={"type": "json_schema", "json_schema": {
        "name": "cat", "schema": schema, "strict": True}}, seed=1, max_tokens=64)
    assert not list(_validator(schema).iter_errors(r.parsed))
    r = loaded_qwen.chat(msgs, response_format={"type": "text"}, temperature=0, max_tokens=4)
    assert r.parsed is None and r.completion_tokens == 4
    with pytest.raises(InvalidArgumentError, match="response_format type"):
        loaded_qwen.chat(msgs, response_format={"type": "yaml"})


def test_cut_short_and_stream(loaded_smol: llamabind.LoadedModel) -> None:
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 20}
    r = loaded_smol.generate("Numbers: ", json_schema=schema, seed=1, max_tokens=5)
    assert r.finish_reason == "length" and r.parsed is None
    obj = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    text = "".join(loaded_smol.stream("{", json_schema=obj, seed=4, max_tokens=32))
    r = loaded_smol.generate("{", json_schema=obj, seed=4, max_tokens=32)
    assert text == r.text and r.parsed == json.loads(text)
    # a caller's stop string cuts the JSON: read as cut short, not an error
    r = loaded_smol.generate("{", json_schema=obj, stop=[":"], temperature=0, max_tokens=32)
    assert r.stop_sequence == ":" and r.parsed is None


def test_output_parse_error_for_invalid_value() -> None:
    class Even(pydantic.BaseModel):
        n: int

        @pydantic.field_validator("n")
        @classmethod
        def even(cls, v: int) -> int:
            if v % 2:
                raise ValueError("odd")
            return v

    plan = structured.GenerationPlan(kind="json", grammar="root ::= \"x\"",
                                     validate=Even.model_validate_json)
    assert plan.parse('{"n": 2}').value == Even(n=2)
    with pytest.raises(OutputParseError) as info:
        plan.parse('{"n": 3}')
    assert info.value.text == '{"n": 3}'
    assert plan.parse('{"n": 3}', partial=True).value is None


def test_output_parse_error_leaves_the_engine_running(
        loaded_smol: llamabind.LoadedModel) -> None:
    """Output the grammar allows but the validator refuses fails that request only:
    the engine (and every later request) goes on."""
    class Never(pydantic.BaseModel):
        n: Annotated[int, pydantic.Field(ge=0, le=9)]

        @pydantic.field_validator("n")
        @classmethod
        def never(cls, v: int) -> int:
            raise ValueError("refused")

    with pytest.raises(OutputParseError, match="refused"):
        loaded_smol.generate("A JSON object: ", schema=Never, temperature=0, max_tokens=32)
    assert loaded_smol.generate("Hello", temperature=0, max_tokens=2).finish_reason in (
        "stop", "length")
    assert loaded_smol.stats()["requests_failed"] >= 1


def test_window_resampling_is_exact(qwen: llamabind.Model) -> None:
    """A refused choice picked again over the best tokens gives what llama.cpp's
    whole-vocabulary mask gives, token for token (greedy, and the sampled chain)."""
    schema = {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
        "n": {"type": "integer", "minimum": 10, "maximum": 99}}, "required": ["code", "n"]}
    plan = structured.Planner(qwen).plan(json_schema=schema)
    assert plan is not None
    prompt = list(qwen.vocab.tokenize("A product code and a count as JSON: "))
    with llamabind.Context(qwen, n_ctx=256, n_batch=64) as ctx:
        for sampled in (False, True):
            runs = []
            for narrow in (True, False):
                s = llamabind.Sampler()
                plan.add_to_sampler(s, qwen)
                if sampled:
                    s.add_top_k(40).add_top_p(0.95).add_min_p(0.05).add_temperature(0.8)
                    s.add_dist(seed=5)
                else:
                    s.add_greedy()
                s._resample_over_window(narrow)
                ctx.memory_clear(False)
                ctx.eval(prompt)
                tokens = [t for t, _ in llamabind.TokenGenerator(ctx, len(prompt), s,
                                                                 max_tokens=40)]
                runs.append((tokens, s.perf()))
                s.close()
            (ours, perf), (theirs, full) = runs
            assert ours == theirs
            assert perf["grammar_resamples"] == full["grammar_resamples"] > 0
            assert perf["grammar_full_masks"] <= full["grammar_full_masks"]
            # fewer whole-vocabulary masks: greedy by the window, the default chain by
            # its min_p bound where fewer than top_k tokens are allowed
            assert perf["grammar_full_masks"] < full["grammar_full_masks"]

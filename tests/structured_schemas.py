"""The JSON-schema corpus of the structured-output tests (tests/test_structured.py).

SCHEMAS: schemas llama.cpp's converter enforces whole; every output generated under one
must parse and validate (jsonschema, formats checked). Strings and arrays are bounded
so that an output always ends within the tests' max_tokens.
UNSUPPORTED: schemas with a keyword the converter would skip, and the keyword and JSON
pointer llamabind must name when it refuses them.
BROKEN: schemas the converter cannot read at all, and a word the error must contain.
"""

from __future__ import annotations

from typing import Any

S = {"type": "string", "maxLength": 16}  # a short string


def obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props,
                           "required": list(props) if required is None else required}
    out.update(extra)
    return out


SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("string", S),
    ("integer", {"type": "integer"}),
    ("number", {"type": "number"}),
    ("boolean", {"type": "boolean"}),
    ("null", {"type": "null"}),
    ("flat-object", obj({"name": S, "age": {"type": "integer"}})),
    ("optional-properties", obj({"name": S, "nickname": S, "email": S}, ["name"])),
    ("no-required", obj({"a": {"type": "integer"}, "b": {"type": "boolean"}}, [])),
    ("nested-object", obj({"person": obj({"first": S, "last": S}),
                           "address": obj({"city": S, "zip": {"type": "string",
                                                              "pattern": "^[0-9]{5}$"}})})),
    ("deeply-nested", obj({"a": obj({"b": obj({"c": obj({"d": {"type": "integer"}})})})})),
    ("array-of-integers", {"type": "array", "items": {"type": "integer"}, "maxItems": 5}),
    ("array-min-max", {"type": "array", "items": S, "minItems": 2, "maxItems": 3}),
    ("array-exact", {"type": "array", "items": {"type": "boolean"}, "minItems": 3,
                     "maxItems": 3}),
    ("array-of-objects", {"type": "array", "maxItems": 3,
                          "items": obj({"id": {"type": "integer"}, "tag": S})}),
    ("object-with-array", obj({"title": S, "tags": {"type": "array", "items": S,
                                                    "maxItems": 4}})),
    ("tuple-prefix-items", {"type": "array", "prefixItems": [S, {"type": "integer"},
                                                             {"type": "boolean"}]}),
    ("enum-strings", {"type": "string", "enum": ["red", "green", "blue"]}),
    ("enum-mixed", {"enum": ["yes", "no", 1, 0, None, True]}),
    ("enum-in-object", obj({"size": {"enum": ["S", "M", "L", "XL"]},
                            "qty": {"type": "integer", "minimum": 1, "maximum": 9}})),
    ("const", obj({"version": {"const": 2}, "kind": {"const": "report"}, "body": S})),
    ("anyOf-primitives", {"anyOf": [{"type": "integer"}, S]}),
    ("anyOf-objects", {"anyOf": [obj({"cat": S}), obj({"dog": S})]}),
    ("oneOf-discriminated", {"oneOf": [
        obj({"type": {"const": "circle"}, "radius": {"type": "integer", "minimum": 1,
                                                     "maximum": 100}}),
        obj({"type": {"const": "square"}, "side": {"type": "integer", "minimum": 1,
                                                   "maximum": 100}})]}),
    ("oneOf-types", {"oneOf": [{"type": "boolean"}, {"type": "null"}, S]}),
    ("type-list", {"type": ["integer", "null"]}),
    ("nullable-property", obj({"note": {"anyOf": [S, {"type": "null"}]}})),
    ("ref-defs", {"$defs": {"point": obj({"x": {"type": "integer"}, "y": {"type": "integer"}})},
                  **obj({"start": {"$ref": "#/$defs/point"},
                         "end": {"$ref": "#/$defs/point"}})}),
    ("ref-definitions", {"definitions": {"color": {"enum": ["red", "green"]}},
                         "type": "array", "maxItems": 3,
                         "items": {"$ref": "#/definitions/color"}}),
    ("ref-nested", {"$defs": {"name": S, "person": obj({"name": {"$ref": "#/$defs/name"}})},
                    **obj({"owner": {"$ref": "#/$defs/person"}})}),
    ("recursive-ref", {"$defs": {"node": obj({"value": {"type": "integer"},
                                              "children": {"type": "array", "maxItems": 2,
                                                           "items": {"$ref": "#/$defs/node"}}},
                                             ["value"])},
                       "$ref": "#/$defs/node"}),
    ("pattern-code", {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}),
    ("pattern-alternation", {"type": "string", "pattern": "^(cat|dog|bird)s?$"}),
    ("pattern-email-like", {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"}),
    ("format-date", obj({"born": {"type": "string", "format": "date"}})),
    ("format-time", obj({"at": {"type": "string", "format": "time"}})),
    ("format-date-time", obj({"when": {"type": "string", "format": "date-time"}})),
    ("format-uuid", obj({"id": {"type": "string", "format": "uuid"}})),
    ("string-length", {"type": "string", "minLength": 3, "maxLength": 6}),
    ("integer-range", obj({"percent": {"type": "integer", "minimum": 0, "maximum": 100}})),
    ("integer-negative-range", {"type": "integer", "minimum": -50, "maximum": -10}),
    ("integer-exclusive", {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}),
    ("integer-minimum-only", {"type": "integer", "minimum": 1000}),
    ("additional-properties-typed", {"type": "object", "properties": {"total": {"type": "integer"}},
                                     "required": ["total"],
                                     "additionalProperties": {"type": "integer"}}),
    ("additional-properties-false", obj({"ok": {"type": "boolean"}}, [],
                                        additionalProperties=False)),
    ("empty-object", {"type": "object", "additionalProperties": False}),
    ("allOf-objects", {"allOf": [obj({"a": {"type": "integer"}}), obj({"b": S})]}),
    ("untyped-properties", {"properties": {"x": {"type": "boolean"}}, "required": ["x"]}),
    ("invoice", obj({
        "number": {"type": "string", "pattern": "^INV-[0-9]{4}$"},
        "date": {"type": "string", "format": "date"},
        "lines": {"type": "array", "minItems": 1, "maxItems": 2,
                  "items": obj({"item": S, "qty": {"type": "integer", "minimum": 1,
                                                   "maximum": 99},
                                "price": {"type": "number"}})},
        "paid": {"type": "boolean"}})),
]

UNSUPPORTED: list[tuple[dict[str, Any], str, str]] = [
    ({"type": "number", "minimum": 0}, "minimum", "#/minimum"),
    ({"type": "number", "multipleOf": 0.5}, "multipleOf", "#/multipleOf"),
    ({"type": "integer", "multipleOf": 3}, "multipleOf", "#/multipleOf"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems",
     "#/uniqueItems"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains", "#/contains"),
    ({"type": "string", "format": "email"}, "format", "#/format"),
    ({"type": "string", "pattern": "^\\d+$"}, "pattern", "#/pattern"),
    ({"type": "string", "pattern": "[a-z]+"}, "pattern", "#/pattern"),
    ({"type": "string", "pattern": "^(?=a).*$"}, "pattern", "#/pattern"),
    ({"not": {"type": "null"}}, "not", "#/not"),
    ({"if": {"type": "string"}, "then": {"maxLength": 3}}, "if", "#/if"),
    ({"type": "object", "patternProperties": {"^x-": {"type": "string"}}},
     "patternProperties", "#/patternProperties"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "minProperties": 1},
     "minProperties", "#/minProperties"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "anyOf": [
        {"required": ["a"]}]}, "type", "#/type"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"]},
     "required", "#/required/0"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "maxLength", "#/maxLength"),
    ({"type": "string", "format": "date", "minLength": 12}, "minLength", "#/minLength"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf", "#/oneOf"),
    ({"oneOf": [{"type": "integer"}], "anyOf": [{"type": "string"}]}, "anyOf", "#/anyOf"),
    ({"$defs": {"n": {"type": "number", "maximum": 5}}, "$ref": "#/$defs/n"}, "maximum",
     "#/$defs/n/maximum"),
    ({"type": "object", "properties": {"p": {"type": "array", "items": {"type": "string",
                                                                       "format": "uri"}}}},
     "format", "#/properties/p/items/format"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum", "#"),
    ({"type": "array", "minItems": 4, "maxItems": 2}, "minItems", "#/minItems"),
    ({"type": "string", "enum": ["a", 1]}, "type", "#/enum"),
    ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "allOf", "#/allOf/0"),
    ({"minimum": 3}, "minimum", "#/minimum"),
    ({"type": "object", "properties": {"a~b/c": {"type": "number", "maximum": 1}}},
     "maximum", "#/properties/a~0b~1c/maximum"),
]

BROKEN: list[tuple[Any, str]] = [
    ('{"type": "object", "properties": ', "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ({"$ref": "#/$defs/missing"}, "missing"),
    ({"$ref": "https://example.com/schema.json"}, "only references into the same document"),
    ({"type": "strange"}, "unrecognized type"),
    ({"type": "array", "minItems": -1}, "minItems"),
    ({"type": "integer", "minimum": "zero"}, "minimum"),
    ({"properties": {"a": 5}}, "schema must be an object"),
    ({"enum": []}, "enum"),
    ({"anyOf": []}, "must not be empty"),
]

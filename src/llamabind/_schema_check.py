"""What llama.cpp's JSON-schema converter would skip in a schema, found before it runs.

llama.cpp's converter (``common/json-schema.cpp`` builds a tree of the schema, then
``common/json-schema-to-grammar.cpp`` writes the grammar) takes a subset of JSON Schema
and passes over the rest without a word: a keyword it does not read constrains nothing,
so the model's output may break it. :func:`find_unsupported` walks a schema the way the
converter's tree builder does at the pinned commit (the same order of precedence among
``$ref``, ``oneOf``/``anyOf``, ``type``, ``const``, ``enum`` and the structural
keywords) and reports, for each node, the keywords that node's kind leaves unread, plus
the few constructs whose grammar would admit invalid values (a ``oneOf`` whose branches
may overlap, an ``enum`` value of the wrong type, a bound the grammar ignores...).
Regular expressions are checked by the converter itself (see ``structured.py``).

This module never converts anything: the grammar always comes from llama.cpp.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Finding", "find_unsupported", "json_pointer"]

# Keywords that only describe (they never reject a value), and containers of
# definitions: skipping them changes nothing.
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly",
    "$comment", "$schema", "$id", "$defs", "definitions", "$vocabulary",
    "contentEncoding", "contentMediaType", "contentSchema",
    # OpenAPI and Pydantic extras that JSON Schema validators ignore too
    "discriminator", "nullable", "example", "xml", "externalDocs",
})

# Every keyword of JSON Schema (drafts 4 to 2020-12) that can reject a value.
ASSERTIONS = frozenset({
    "$ref", "$dynamicRef", "$recursiveRef", "$anchor", "$dynamicAnchor", "$recursiveAnchor",
    "allOf", "anyOf", "oneOf", "not", "if", "then", "else", "dependentSchemas",
    "dependencies", "dependentRequired",
    "type", "enum", "const",
    "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
    "maxLength", "minLength", "pattern", "format",
    "items", "prefixItems", "additionalItems", "unevaluatedItems", "contains",
    "minContains", "maxContains", "maxItems", "minItems", "uniqueItems",
    "properties", "patternProperties", "additionalProperties", "unevaluatedProperties",
    "propertyNames", "maxProperties", "minProperties", "required",
})

# The string formats the converter writes a grammar for.
FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4",
                     "uuid5"})

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_INTEGER_BOUNDS = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")

# Which keywords each kind of node reads (besides the ones every node may carry).
_READS: dict[str, frozenset[str]] = {
    "object": frozenset({"type", "properties", "required", "additionalProperties"}),
    "array": frozenset({"type", "items", "prefixItems", "minItems", "maxItems"}),
    "tuple": frozenset({"type", "items", "prefixItems", "minItems", "maxItems"}),
    "string": frozenset({"type", "pattern", "format", "minLength", "maxLength"}),
    "integer": frozenset({"type", *_INTEGER_BOUNDS}),
    "number": frozenset({"type"}),
    "boolean": frozenset({"type"}),
    "null": frozenset({"type"}),
    "const": frozenset({"type", "const"}),
    "enum": frozenset({"type", "enum"}),
    "ref": frozenset({"$ref"}),
    "alternatives": frozenset({"oneOf", "anyOf"}),
    "allOf": frozenset({"type", "allOf"}),
    "any": frozenset(),
}


@dataclass(frozen=True)
class Finding:
    """One thing the converter would not enforce: ``keyword`` at ``path`` (a JSON
    pointer into the schema) and why."""

    path: str
    keyword: str
    reason: str

    def __str__(self) -> str:
        return f"{self.keyword!r} at {self.path}: {self.reason}"


def json_pointer(path: str, key: str | int) -> str:
    """``path`` extended by one step, escaped as RFC 6901 says."""
    return f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _type_matches(value: Any, type_name: str) -> bool:
    actual = _json_type(value)
    return actual == type_name or (type_name == "number" and actual == "integer")


class _Walker:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.findings: list[Finding] = []
        self.seen_refs: set[str] = set()

    def flag(self, path: str, keyword: str, reason: str) -> None:
        self.findings.append(Finding(path, keyword, reason))

    # --- resolving ----------------------------------------------------------------

    def resolve(self, ref: str) -> Any:
        """The target of a same-document ``$ref`` (None when it does not resolve: the
        converter reports that itself, as an error)."""
        target: Any = self.root
        for raw in ref[2:].split("/") if ref != "#/" else [""]:
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                return None
        return target

    def target_kind(self, schema: Any, depth: int = 0) -> tuple[str, Any]:
        """The kind of node a schema builds, following $refs: (kind, resolved schema)."""
        while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and depth < 64:
            ref = schema["$ref"]
            if not ref.startswith("#/"):
                return "ref", schema
            schema = self.resolve(ref)
            depth += 1
        return (self.kind(schema) if isinstance(schema, dict) else "invalid"), schema

    # --- the node kinds, in json-schema.cpp's order of precedence -----------------------

    @staticmethod
    def kind(schema: dict[str, Any]) -> str:
        if "$ref" in schema:
            return "ref"
        if "oneOf" in schema or "anyOf" in schema:
            return "alternatives"
        type_ = schema.get("type")
        if isinstance(type_, list):
            return "type-list"
        if "const" in schema:
            return "const"
        if "enum" in schema:
            return "enum"
        additional = schema.get("additionalProperties", True)
        has_properties = "properties" in schema or (
            "additionalProperties" in schema and additional is not True)
        if type_ is None:
            if has_properties:
                return "object"
            if "allOf" in schema:
                return "allOf"
            if "items" in schema or "prefixItems" in schema:
                return "tuple" if isinstance(schema.get("items",
                                                        schema.get("prefixItems")),
                                             list) else "array"
            fmt = schema.get("format")
            if ("pattern" in schema or "minLength" in schema or "maxLength" in schema
                    or fmt in FORMATS):
                return "string"
            return "any"
        if type_ == "object":
            return "allOf" if not has_properties and "allOf" in schema else "object"
        if type_ == "string":
            return "allOf" if "allOf" in schema else "string"
        if type_ == "array":
            items = schema.get("items", schema.get("prefixItems"))
            return "tuple" if isinstance(items, list) else "array"
        if type_ in ("integer", "number", "boolean", "null"):
            return str(type_)
        return "invalid"

    # --- walking --------------------------------------------------------------------

    def walk(self, schema: Any, path: str) -> None:
        if not isinstance(schema, dict):
            return  # not a schema: the converter refuses it with an error of its own
        kind = self.kind(schema)
        if kind == "type-list":
            for i, t in enumerate(schema["type"]):
                self.walk({**schema, "type": t}, json_pointer(json_pointer(path, "type"), i))
            return
        reads = _READS.get(kind)
        if reads is None:
            return  # an unknown type: an error from the converter
        self.unread(schema, path, kind, reads)
        getattr(self, "node_" + kind.replace("-", "_"))(schema, path)

    def unread(self, schema: dict[str, Any], path: str, kind: str, reads: frozenset[str]) -> None:
        for key in schema:
            if key in reads or key in ANNOTATIONS or key not in ASSERTIONS:
                continue
            if key == "type" and kind in ("ref", "alternatives"):
                if self.type_implied(schema, kind):
                    continue
            self.flag(json_pointer(path, key), key, _why_unread(key, kind))

    def type_implied(self, schema: dict[str, Any], kind: str) -> bool:
        """Whether a ``type`` beside a $ref or anyOf/oneOf adds nothing: every branch
        (or the target) is already of that type."""
        type_ = schema.get("type")
        if not isinstance(type_, str):
            return False
        branches = ([schema] if kind == "ref" else
                    schema.get("oneOf", schema.get("anyOf")) or [])
        if not isinstance(branches, list):
            return False
        for branch in branches:
            if not isinstance(branch, dict):
                return False
            if kind == "ref":
                branch = {"$ref": branch["$ref"]}
            if self.value_types(branch, 0) - ({type_, "integer"} if type_ == "number"
                                              else {type_}):
                return False
        return True

    def value_types(self, schema: Any, depth: int) -> set[str]:
        """The JSON types a schema's grammar may produce (all of them when unknown)."""
        everything = {"null", "boolean", "integer", "number", "string", "array", "object"}
        if depth > 32:
            return everything
        kind, target = self.target_kind(schema)
        if kind in ("object", "array", "tuple", "string", "integer", "boolean", "null"):
            return {"array" if kind == "tuple" else kind}
        if kind == "number":
            return {"number", "integer"}
        if kind == "const":
            return {_json_type(target["const"])}
        if kind == "enum" and isinstance(target.get("enum"), list):
            return {_json_type(v) for v in target["enum"]}
        if kind == "alternatives":
            branches = target.get("oneOf", target.get("anyOf"))
            if isinstance(branches, list):
                out: set[str] = set()
                for b in branches:
                    out |= self.value_types(b, depth + 1)
                return out
        if kind == "type-list":
            return {t for t in target["type"] if isinstance(t, str)}
        if kind == "allOf":
            return {"object"}
        return everything

    # --- kinds ---------------------------------------------------------------------

    def node_ref(self, schema: dict[str, Any], path: str) -> None:
        ref = schema["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#/") or ref in self.seen_refs:
            return
        self.seen_refs.add(ref)
        target = self.resolve(ref)
        if target is not None:
            self.walk(target, ref)

    def read_first(self, schema: dict[str, Any], path: str, first: str, second: str,
                   skipped: str) -> str:
        """Of two keywords the converter reads only one of: ``first`` if given (then
        ``second`` is flagged with ``skipped``), else ``second``."""
        if first in schema and second in schema:
            self.flag(json_pointer(path, second), second, skipped)
        return first if first in schema else second

    def node_alternatives(self, schema: dict[str, Any], path: str) -> None:
        key = self.read_first(schema, path, "oneOf", "anyOf",
                              "next to oneOf, anyOf is skipped (the converter reads only oneOf)")
        branches = schema[key]
        if not isinstance(branches, list):
            return
        for i, branch in enumerate(branches):
            self.walk(branch, json_pointer(json_pointer(path, key), i))
        if key == "oneOf":
            self.check_exclusive(branches, json_pointer(path, key))

    def check_exclusive(self, branches: list[Any], path: str) -> None:
        """oneOf is compiled as anyOf: a value matching two branches would break it.
        Branches are accepted when provably exclusive: different JSON types, or
        objects told apart by a required property with different constant values."""
        for i in range(len(branches)):
            for j in range(i + 1, len(branches)):
                if not self.exclusive(branches[i], branches[j]):
                    self.flag(path, "oneOf",
                              f"branches {i} and {j} may both match a value; the grammar "
                              "treats oneOf as anyOf (use anyOf, or tell the branches apart "
                              "by type or by a required property with const values)")
                    return

    def exclusive(self, a: Any, b: Any) -> bool:
        types_a, types_b = self.value_types(a, 0), self.value_types(b, 0)
        if not types_a & types_b:
            return True
        kind_a, ta = self.target_kind(a)
        kind_b, tb = self.target_kind(b)
        if kind_a == "object" and kind_b == "object":
            props_a, props_b = ta.get("properties"), tb.get("properties")
            req_a, req_b = ta.get("required"), tb.get("required")
            if not all(isinstance(x, dict) for x in (props_a, props_b)) or not all(
                    isinstance(x, list) for x in (req_a, req_b)):
                return False
            for name in set(req_a) & set(req_b):
                if not isinstance(name, str) or name not in props_a or name not in props_b:
                    continue
                values_a = self.constants(props_a[name])
                values_b = self.constants(props_b[name])
                if values_a is not None and values_b is not None and not (
                        {_freeze(v) for v in values_a} & {_freeze(v) for v in values_b}):
                    return True
        if {kind_a, kind_b} <= {"const", "enum"}:
            values_a, values_b = self.constants(ta), self.constants(tb)
            if values_a is not None and values_b is not None:
                return not ({_freeze(v) for v in values_a} & {_freeze(v) for v in values_b})
        return False

    def constants(self, schema: Any) -> list[Any] | None:
        kind, target = self.target_kind(schema)
        if kind == "const":
            return [target["const"]]
        if kind == "enum" and isinstance(target.get("enum"), list):
            return list(target["enum"])
        return None

    def node_allOf(self, schema: dict[str, Any], path: str) -> None:
        children = schema["allOf"]
        here = json_pointer(path, "allOf")
        if not isinstance(children, list):
            return
        kinds = [self.target_kind(c) for c in children]
        if all(k == "enum" for k, _ in kinds):
            return  # the grammar is the intersection of the enums
        if not all(k == "object" for k, _ in kinds):
            bad = next(i for i, (k, _) in enumerate(kinds) if k != "object")
            self.flag(json_pointer(here, bad), "allOf",
                      "the converter merges allOf only from objects with properties (or "
                      f"only enums); this branch is a {kinds[bad][0]} and would be skipped")
            return
        names: set[str] = set()
        for i, (_, target) in enumerate(kinds):
            branch_path = json_pointer(here, i)
            props = target.get("properties")
            if not isinstance(props, dict):
                continue
            for name, sub in props.items():
                if name in names:
                    self.flag(json_pointer(json_pointer(branch_path, "properties"), name),
                              "allOf", f"property {name!r} appears in two allOf branches; "
                              "the merged grammar would write it twice")
                names.add(name)
                self.walk(sub, json_pointer(json_pointer(branch_path, "properties"), name))
            self.check_required(target, branch_path, props)
            for key in target:
                if key not in ("properties", "required", "type", "additionalProperties") \
                        and key in ASSERTIONS:
                    self.flag(json_pointer(branch_path, key), key,
                              "inside allOf only properties are merged; this keyword is skipped")

    def node_object(self, schema: dict[str, Any], path: str) -> None:
        props = schema.get("properties", {})
        if isinstance(props, dict):
            for name, sub in props.items():
                self.walk(sub, json_pointer(json_pointer(path, "properties"), name))
        else:
            props = {}
        additional = schema.get("additionalProperties")
        if isinstance(additional, dict):
            self.walk(additional, json_pointer(path, "additionalProperties"))
        self.check_required(schema, path, props)

    def check_required(self, schema: dict[str, Any], path: str, props: dict[str, Any]) -> None:
        if "required" not in schema:
            return
        required = schema["required"]
        if not isinstance(required, list):
            self.flag(json_pointer(path, "required"), "required",
                      "required is not a list, so the converter skips it")
            return
        for i, name in enumerate(required):
            if not isinstance(name, str):
                self.flag(json_pointer(json_pointer(path, "required"), i), "required",
                          f"{name!r} is not a property name, so the converter skips it")
            elif name not in props:
                self.flag(json_pointer(json_pointer(path, "required"), i), "required",
                          f"required property {name!r} is not in properties: the grammar "
                          "writes only listed properties, so it would never be there")

    def node_array(self, schema: dict[str, Any], path: str) -> None:
        key = self.read_first(schema, path, "items", "prefixItems",
                              "next to items, prefixItems is skipped")
        if key in schema:
            self.walk(schema[key], json_pointer(path, key))
        self.check_counts(schema, path, "minItems", "maxItems")

    def node_tuple(self, schema: dict[str, Any], path: str) -> None:
        key = self.read_first(schema, path, "items", "prefixItems",
                              "next to an items list, prefixItems is skipped")
        items = schema[key]
        for i, sub in enumerate(items):
            self.walk(sub, json_pointer(json_pointer(path, key), i))
        # the grammar writes exactly len(items) items: min/max must allow that many
        n = len(items)
        lo, hi = schema.get("minItems", 0), schema.get("maxItems", n)
        if isinstance(lo, int) and isinstance(hi, int) and not lo <= n <= hi:
            self.flag(path, "minItems" if lo > n else "maxItems",
                      f"a tuple of {n} items is written whole; minItems/maxItems "
                      f"({lo}, {hi}) would need another length")

    def node_string(self, schema: dict[str, Any], path: str) -> None:
        fmt = schema.get("format")
        if "pattern" in schema:
            for key in ("format", "minLength", "maxLength"):
                if key in schema:
                    self.flag(json_pointer(path, key), key,
                              f"next to pattern, {key} is skipped (the converter writes "
                              "only the pattern)")
            return
        if fmt is not None:
            if fmt not in FORMATS:
                self.flag(json_pointer(path, "format"), "format",
                          f"format {fmt!r} is not supported (only {', '.join(sorted(FORMATS))})")
            else:
                for key in ("minLength", "maxLength"):
                    if key in schema:
                        self.flag(json_pointer(path, key), key,
                                  f"next to format, {key} is skipped")
                return
        self.check_counts(schema, path, "minLength", "maxLength")

    def node_integer(self, schema: dict[str, Any], path: str) -> None:
        for low, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
            if low in schema and exclusive in schema:
                self.flag(json_pointer(path, exclusive), exclusive,
                          f"next to {low}, {exclusive} is skipped")
        bounds = []
        for key in _INTEGER_BOUNDS:
            value = schema.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not _INT64_MIN < value < _INT64_MAX:
                self.flag(json_pointer(path, key), key,
                          f"{value!r} is outside the 64-bit range the converter handles")
                return
            bounds.append(key)
        lo = _integer_bound(schema, "minimum", "exclusiveMinimum", True)
        hi = _integer_bound(schema, "maximum", "exclusiveMaximum", False)
        if lo is not None and hi is not None and lo > hi:
            self.flag(path, "minimum", f"no integer lies between the bounds ({lo} > {hi})")

    def node_number(self, schema: dict[str, Any], path: str) -> None:
        pass  # every numeric keyword is already reported as unread

    def node_boolean(self, schema: dict[str, Any], path: str) -> None:
        pass

    def node_null(self, schema: dict[str, Any], path: str) -> None:
        pass

    def node_any(self, schema: dict[str, Any], path: str) -> None:
        pass

    def node_const(self, schema: dict[str, Any], path: str) -> None:
        self.check_typed_values(schema, path, [schema["const"]], "const")

    def node_enum(self, schema: dict[str, Any], path: str) -> None:
        values = schema["enum"]
        if isinstance(values, list):
            self.check_typed_values(schema, path, values, "enum")

    def check_typed_values(self, schema: dict[str, Any], path: str, values: list[Any],
                           key: str) -> None:
        type_ = schema.get("type")
        if not isinstance(type_, str):
            return
        for v in values:
            if not _type_matches(v, type_):
                self.flag(json_pointer(path, key), "type",
                          f"{key} value {v!r} is not of type {type_!r}; the grammar writes "
                          f"the {key} values and skips the type")
                return

    def check_counts(self, schema: dict[str, Any], path: str, low: str, high: str) -> None:
        lo, hi = schema.get(low), schema.get(high)
        if isinstance(lo, int) and isinstance(hi, int) and not isinstance(lo, bool) \
                and not isinstance(hi, bool) and lo > hi:
            self.flag(json_pointer(path, low), low, f"{low} {lo} is above {high} {hi}")


def _integer_bound(schema: dict[str, Any], key: str, exclusive: str, low: bool) -> int | None:
    import math

    value = schema.get(key, schema.get(exclusive))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if key in schema:
        return math.ceil(value) if low else math.floor(value)
    return math.floor(value) + 1 if low else math.ceil(value) - 1


def _freeze(value: Any) -> Any:
    import json

    return json.dumps(value, sort_keys=True)


def _why_unread(key: str, kind: str) -> str:
    if kind == "ref":
        return "next to $ref, the converter reads nothing else"
    if kind == "alternatives":
        return "next to anyOf/oneOf, the converter reads nothing else"
    if kind in ("const", "enum"):
        return f"next to {kind}, the converter reads nothing else"
    if kind == "any":
        return "this schema has no type the converter can tell, so it allows any value"
    if key == "multipleOf":
        return "multipleOf is not supported by llama.cpp's converter"
    if kind == "number" and key in _INTEGER_BOUNDS:
        return ("bounds are supported only for integers (\"type\": \"integer\"), not "
                "numbers")
    return f"not supported for a {kind} by llama.cpp's converter"


def find_unsupported(schema: Any) -> list[Finding]:
    """Everything in ``schema`` that llama.cpp's converter would not enforce."""
    walker = _Walker(schema)
    walker.walk(schema, "#")
    return walker.findings


def iter_patterns(schema: Any) -> Iterator[tuple[str, str]]:
    """(path, pattern) of every string pattern the converter would compile, so that
    each can be tried on its own."""
    walker = _PatternWalker(schema)
    walker.walk(schema, "#")
    yield from walker.patterns


class _PatternWalker(_Walker):
    def __init__(self, root: Any) -> None:
        super().__init__(root)
        self.patterns: list[tuple[str, str]] = []

    def node_string(self, schema: dict[str, Any], path: str) -> None:
        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            self.patterns.append((json_pointer(path, "pattern"), pattern))

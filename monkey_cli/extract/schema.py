"""What to extract: fields with a question and a type, from a JSON Schema, a fields file, `--field` or pydantic.

Every way in ends as an `ExtractSchema`: its `fields` (name, question, kind, whether "not found" is allowed, the
property's own JSON Schema with `$ref`s resolved) and `json_schema`, the object schema the values are validated
against. Kinds: string, number, integer, boolean, date (`"type": "string", "format": "date"`), enum (`enum` or
`const`), array (of strings, or of enum values). Anything else (nested objects, arrays of numbers, `anyOf` other
than "X or null") is refused with one line naming the field.

"Not found" is allowed where the schema lets the value be missing: the property's type admits null (`["number",
"null"]`, `anyOf` with `{"type": "null"}`, `nullable: true`, an enum holding null) or the property is not
`required`. A required, non-null field always gets a value: the grammar offers the model no way out.

A schema is input from a user: it is read with limits (size, nesting, node count, fields, enum values, question
length) and checked (the JSON Schema metaschema, each pattern) before any model work, so a hostile one fails in
one line instead of hanging the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monkey_cli.errors import UsageError

KINDS = ("string", "number", "integer", "boolean", "date", "enum", "array")
# Short-form type names (--field, fields files) -> kind.
TYPE_NAMES = {
    "string": "string",
    "str": "string",
    "text": "string",
    "number": "number",
    "float": "number",
    "integer": "integer",
    "int": "integer",
    "boolean": "boolean",
    "bool": "boolean",
    "date": "date",
    "enum": "enum",
    "array": "array",
    "list": "array",
    "string[]": "array",
}

MAX_SCHEMA_BYTES = 16 << 20
MAX_FIELDS = 256
MAX_ENUM_VALUES = 1000
MAX_ENUM_TEXT = 200  # characters of one enum value
MAX_QUESTION_CHARS = 2000
MAX_NAME_CHARS = 200
MAX_NODES = 200_000  # objects, lists and values walked in a schema (a YAML alias bomb shares nodes)
MAX_REF_DEPTH = 32
MAX_NESTING = 64

_SHORT_FORM = re.compile(
    r"(?P<name>[^:=]+?)\s*(?::\s*(?P<type>[A-Za-z\[\]]+)(?:\((?P<choices>[^)]*)\))?(?P<required>!)?)?\s*"
    r"(?:=(?P<question>.*))?",
    re.DOTALL,
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class SchemaError(UsageError):
    """A schema, fields file or --field that cannot be used (a usage error: exit code 2, one line)."""


@dataclass(frozen=True)
class Field:
    """One thing to extract: asked as `question`, answered within `kind`'s grammar, checked against `schema`."""

    name: str
    question: str
    kind: str
    nullable: bool  # the model may answer "not found" (the value is then null)
    required: bool
    schema: Mapping[str, Any]  # the property's JSON Schema, $refs resolved: what a value is validated against

    @property
    def choices(self) -> tuple[Any, ...]:
        """The values an enum field (or an array of enum items) may take, null left out."""
        source = self.schema.get("items", {}) if self.kind == "array" else self.schema
        values = source.get("enum", [source["const"]] if "const" in source else [])
        return tuple(value for value in values if value is not None)


@dataclass(frozen=True)
class ExtractSchema:
    """The fields to extract, and the JSON Schema their values are validated against (an object of them)."""

    fields: tuple[Field, ...]
    json_schema: Mapping[str, Any] = field(repr=False)
    model: Any = field(default=None, compare=False)  # the pydantic model class it was made from, if any

    @property
    def names(self) -> list[str]:
        return [item.name for item in self.fields]

    @property
    def fingerprint(self) -> str:
        """sha256 of the schema and the questions and kinds derived from it: a changed schema redoes documents."""
        derived = [[item.name, item.question, item.kind, item.nullable] for item in self.fields]
        text = json.dumps([self.json_schema, derived], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()

    def __add__(self, other: ExtractSchema) -> ExtractSchema:
        """Both schemas' fields, in order (names must differ)."""
        return _build(
            [*_properties_of(self), *_properties_of(other)],
            required={*self.json_schema.get("required", ()), *other.json_schema.get("required", ())},
        )


# --- ways in ---------------------------------------------------------------------------------------------------


def coerce_schema(schema: Any) -> ExtractSchema:
    """An `ExtractSchema` from what the Python API takes: an ExtractSchema, a pydantic model class, a JSON Schema
    (a mapping), a list of `--field` short forms, or the path of a JSON Schema file."""
    if isinstance(schema, ExtractSchema):
        return schema
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return from_pydantic(schema)
    if isinstance(schema, Mapping):
        return from_json_schema(schema)
    if isinstance(schema, (str, os.PathLike)):
        return read_schema_file(schema)
    if isinstance(schema, Sequence) and all(isinstance(item, str) for item in schema):
        return from_short_forms(schema)
    raise TypeError(
        "schema must be an ExtractSchema, a pydantic model class, a JSON Schema dict, a list of 'name:type=question' "
        f"strings or the path of a JSON Schema file; got {type(schema).__name__}"
    )


def from_pydantic(model: type) -> ExtractSchema:
    """The fields of a pydantic model class (`Optional[...]` fields may be not found; the others may not)."""
    try:
        schema = model.model_json_schema()  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - pydantic's own errors name the problem
        raise SchemaError(f"{model.__name__}: pydantic cannot make a JSON Schema of it ({exc})") from None
    result = from_json_schema(schema, origin=model.__name__)
    return ExtractSchema(result.fields, result.json_schema, model=model)


def read_schema_file(path: str | os.PathLike[str]) -> ExtractSchema:
    """A JSON Schema object from a JSON or YAML file (--schema)."""
    return from_json_schema(_read_document(path, "--schema"), origin=f"--schema {path}")


def read_fields_file(path: str | os.PathLike[str]) -> ExtractSchema:
    """A fields file (--fields), JSON or YAML: a mapping of name -> "[TYPE[!]=]QUESTION" or a mapping of JSON
    Schema keywords (plus `question`, and the short type names), or a list of `--field` short forms."""
    origin = f"--fields {path}"
    data = _read_document(path, "--fields")
    _check_size(data, origin)
    if isinstance(data, list):
        if not all(isinstance(item, str) for item in data):
            raise SchemaError(f"{origin}: a list must hold 'name:type=question' strings")
        return from_short_forms(data, origin=origin)
    if not isinstance(data, Mapping) or not data:
        raise SchemaError(f"{origin}: expected a mapping of field names (or a list of 'name:type=question')")
    properties, required = [], set()
    for name, spec in data.items():
        prop, is_required = _field_spec(str(name), spec, f"{origin}: field {str(name)!r}")
        properties.append((str(name), prop))
        if is_required:
            required.add(str(name))
    return _build(properties, required=required, origin=origin)


def from_short_forms(specs: Sequence[str], origin: str = "--field") -> ExtractSchema:
    """Fields from `name[:type[(a|b|c)][!]][=question]` strings, e.g. `total:number=What is the total?`,
    `status:enum(paid|unpaid)`, `items:list`, `id:string!` (`!`: required, never "not found")."""
    properties, required = [], set()
    for spec in specs:
        match = _SHORT_FORM.fullmatch(spec.strip())
        if match is None or not match["name"].strip():
            example = "'total:number=What is the total?'"
            raise SchemaError(f"{origin} {spec!r}: expected NAME[:TYPE][=QUESTION], e.g. {example}")
        name = match["name"].strip()
        where = f"{origin} {spec!r}"
        prop = _short_type(match["type"] or "string", match["choices"], where)
        question = (match["question"] or "").strip()
        if question:
            prop["description"] = question
        properties.append((name, prop))
        if match["required"]:
            required.add(name)
    return _build(properties, required=required, origin=origin)


def from_json_schema(schema: Any, origin: str = "schema") -> ExtractSchema:
    """The fields of a JSON Schema object (`{"type": "object", "properties": {...}, "required": [...]}`)."""
    if not isinstance(schema, Mapping):
        raise SchemaError(f"{origin}: must be a JSON Schema object with properties, got {_kind_of(schema)}")
    _check_size(schema, origin)
    if schema.get("type", "object") != "object":
        raise SchemaError(f"{origin}: must be the JSON Schema of an object (type object), got {schema['type']!r}")
    properties = schema.get("properties")
    if not isinstance(properties, Mapping) or not properties:
        raise SchemaError(f"{origin}: needs \"properties\": the fields to extract")
    if len(properties) > MAX_FIELDS:
        raise SchemaError(f"{origin}: {len(properties):,} fields; at most {MAX_FIELDS} can be extracted at once")
    _check_metaschema(schema, origin)
    required = schema.get("required", [])
    resolved = [(name, _Resolver(schema, f"{origin}: field {name!r}")(prop)) for name, prop in properties.items()]
    return _build(resolved, required=set(required), origin=origin)


# --- building ----------------------------------------------------------------------------------------------------


def _build(properties: list[tuple[str, Any]], *, required: set[str], origin: str = "schema") -> ExtractSchema:
    if len(properties) > MAX_FIELDS:
        raise SchemaError(f"{origin}: {len(properties):,} fields; at most {MAX_FIELDS} can be extracted at once")
    names = [name for name, _ in properties]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SchemaError(f"{origin}: field {duplicates[0]!r} is given twice")
    unknown = sorted(set(required) - set(names))
    if unknown:
        raise SchemaError(f"{origin}: \"required\" names {unknown[0]!r}, which is not a property")
    fields = tuple(_field(name, prop, name in required, origin) for name, prop in properties)
    _check_grammars(fields, origin)
    json_schema = {
        "type": "object",
        "properties": {item.name: dict(item.schema) for item in fields},
        "required": [item.name for item in fields if item.required],
    }
    _check_metaschema(json_schema, origin)
    return ExtractSchema(fields, json_schema)


def _check_grammars(fields: Sequence[Field], origin: str) -> None:
    """Every field's answers must compile as a grammar (a pattern the regex engine refuses fails here)."""
    from monkey_cli.extract.grammar import check_grammar

    for item in fields:
        try:
            check_grammar(item, budget=64)
        except SchemaError as exc:
            raise SchemaError(f"{origin}: {exc}") from None


def _field(name: str, prop: Any, required: bool, origin: str) -> Field:
    where = f"{origin}: field {name!r}"
    _check_name(name, where)
    if not isinstance(prop, Mapping):
        raise SchemaError(f"{where}: must be a JSON Schema object, got {_kind_of(prop)}")
    prop, allows_null = _without_null(prop, where)
    kind = _kind(prop, where)
    question = _question(name, prop, where)
    nullable = allows_null or not required
    _check_kind(kind, prop, where)
    if allows_null:
        prop = {**prop, "type": _with_null_type(prop)} if "type" in prop else prop
        if "enum" in prop and None not in prop["enum"]:
            prop = {**prop, "enum": [*prop["enum"], None]}
    return Field(name=name, question=question, kind=kind, nullable=nullable, required=required, schema=prop)


def _without_null(prop: Mapping[str, Any], where: str) -> tuple[dict[str, Any], bool]:
    """The property with "or null" taken out, and whether it was there."""
    prop = dict(prop)
    allows_null = bool(prop.pop("nullable", False))
    for keyword in ("anyOf", "oneOf"):
        if keyword in prop:
            options = prop.pop(keyword)
            if not isinstance(options, list):
                raise SchemaError(f"{where}: {keyword} must be a list")
            others = [item for item in options if not (isinstance(item, Mapping) and item.get("type") == "null")]
            if len(others) != 1 or len(others) == len(options):
                raise SchemaError(f"{where}: {keyword} is supported only as \"X or null\"")
            allows_null = True
            if not isinstance(others[0], Mapping):
                raise SchemaError(f"{where}: {keyword} holds {_kind_of(others[0])}, not a schema")
            prop = {**others[0], **prop}
    types = prop.get("type")
    if isinstance(types, list):
        kept = [item for item in types if item != "null"]
        if len(kept) != 1:
            raise SchemaError(f"{where}: \"type\" {types!r}: one type (or one type and null) is supported")
        allows_null = allows_null or len(kept) < len(types)
        prop["type"] = kept[0]
    if "enum" in prop:
        if not isinstance(prop["enum"], list) or not prop["enum"]:
            raise SchemaError(f"{where}: \"enum\" must be a non-empty list")
        allows_null = allows_null or None in prop["enum"]
        prop["enum"] = [value for value in prop["enum"] if value is not None]
        if not prop["enum"]:
            raise SchemaError(f"{where}: \"enum\" holds only null")
    return prop, allows_null


def _with_null_type(prop: Mapping[str, Any]) -> list[str]:
    return [prop["type"], "null"]


def _kind(prop: Mapping[str, Any], where: str) -> str:
    if "enum" in prop or "const" in prop:
        return "enum"
    type_ = prop.get("type", "string")
    if type_ == "string":
        return "date" if prop.get("format") == "date" else "string"
    if type_ in ("number", "integer", "boolean", "array"):
        return type_
    raise SchemaError(f"{where}: type {type_!r} is not supported (supported: {', '.join(KINDS)})")


def _check_kind(kind: str, prop: Mapping[str, Any], where: str) -> None:
    if kind == "enum":
        _check_choices(prop.get("enum", [prop.get("const")]), where)
    elif kind == "string":
        _check_lengths(prop, "minLength", "maxLength", where)
        if "pattern" in prop and not isinstance(prop["pattern"], str):
            raise SchemaError(f"{where}: \"pattern\" must be a string")
    elif kind == "array":
        items = prop.get("items", {"type": "string"})
        strings = isinstance(items, Mapping) and ("enum" in items or "const" in items or items.get("type", "string")
                                                   == "string" and "format" not in items)
        if not strings:
            raise SchemaError(f"{where}: only arrays of strings (or of enum values) are supported")
        _check_kind(_kind(items, f"{where} items"), items, f"{where} items")
        _check_lengths(prop, "minItems", "maxItems", where)


def _check_choices(values: Any, where: str) -> None:
    if len(values) > MAX_ENUM_VALUES:
        raise SchemaError(f"{where}: {len(values):,} enum values; at most {MAX_ENUM_VALUES:,} are supported")
    for value in values:
        if isinstance(value, (dict, list)):
            raise SchemaError(f"{where}: enum value {json.dumps(value)[:60]} is not a string, number or boolean")
        text = choice_text(value)
        if not text.strip():
            raise SchemaError(f"{where}: the empty enum value {value!r} cannot be an answer")
        if len(text) > MAX_ENUM_TEXT or _CONTROL.search(text):
            raise SchemaError(f"{where}: enum value {text[:40]!r}... is longer than {MAX_ENUM_TEXT} characters or "
                              "holds control characters")
    texts = [choice_text(value) for value in values]
    if len(set(texts)) != len(texts):
        raise SchemaError(f"{where}: enum values that read the same ({texts}) cannot be told apart in an answer")


def choice_text(value: Any) -> str:
    """How an enum value is written in an answer: a string as itself, other values as JSON (true, 1.5)."""
    return value if isinstance(value, str) else json.dumps(value)


def _check_lengths(prop: Mapping[str, Any], low: str, high: str, where: str) -> None:
    for key in (low, high):
        value = prop.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise SchemaError(f"{where}: {key} must be a non-negative integer, got {value!r}")
    if prop.get(high) == 0:
        raise SchemaError(f"{where}: {high} 0 leaves nothing to answer")
    if prop.get(low) is not None and prop.get(high) is not None and prop[low] > prop[high]:
        raise SchemaError(f"{where}: {low} {prop[low]} is more than {high} {prop[high]}")


def _question(name: str, prop: Mapping[str, Any], where: str) -> str:
    """The property's description, or a question made of its name ("total_amount" -> "What is the total amount?")."""
    question = prop.get("description")
    if question is None:
        words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).replace("_", " ").replace("-", " ")
        question = f"What is the {' '.join(words.split()).lower()}?"
    if not isinstance(question, str) or not question.strip():
        raise SchemaError(f"{where}: \"description\" (its question) must be a non-empty string")
    if len(question) > MAX_QUESTION_CHARS:
        raise SchemaError(f"{where}: its question is {len(question):,} characters; at most {MAX_QUESTION_CHARS:,}")
    return " ".join(question.split())


def _check_name(name: str, where: str) -> None:
    if not name.strip() or name != name.strip():
        raise SchemaError(f"{where}: a field name must be non-empty, without spaces around it")
    if len(name) > MAX_NAME_CHARS or _CONTROL.search(name):
        raise SchemaError(f"{where}: a field name must be at most {MAX_NAME_CHARS} characters, without control "
                          "characters")


def _properties_of(schema: ExtractSchema) -> list[tuple[str, Any]]:
    return [(item.name, dict(item.schema)) for item in schema.fields]


# --- short forms and fields files --------------------------------------------------------------------------------


def _short_type(type_name: str, choices: str | None, where: str) -> dict[str, Any]:
    kind = TYPE_NAMES.get(type_name.lower())
    if kind is None:
        names = ", ".join(sorted({*TYPE_NAMES} - {"str", "int", "bool", "float", "text", "string[]"}))
        raise SchemaError(f"{where}: unknown type {type_name!r} (choose from {names}; enum(a|b|c))")
    if (choices is not None) != (kind == "enum"):
        raise SchemaError(f"{where}: enum needs its values as enum(a|b|c), and only enum takes values")
    if kind == "enum":
        return {"enum": [value.strip() for value in choices.split("|")]}
    if kind == "date":
        return {"type": "string", "format": "date"}
    if kind == "array":
        return {"type": "array", "items": {"type": "string"}}
    return {"type": kind}


def _field_spec(name: str, spec: Any, where: str) -> tuple[dict[str, Any], bool]:
    """A fields-file entry -> (its JSON Schema property, whether it is required)."""
    if spec is None:
        return {"type": "string"}, False
    if isinstance(spec, str):
        head, equals, question = spec.partition("=")
        match = re.fullmatch(r"\s*([A-Za-z\[\]]+)(?:\(([^)]*)\))?(!)?\s*", head) if equals else None
        if match is None:
            return {"type": "string", "description": spec.strip()}, False
        prop = _short_type(match[1], match[2], where)
        if question.strip():
            prop["description"] = question.strip()
        return prop, bool(match[3])
    if not isinstance(spec, Mapping):
        raise SchemaError(f"{where}: expected a question string or a mapping, got {_kind_of(spec)}")
    prop = dict(spec)
    required = prop.pop("required", False)
    if not isinstance(required, bool):
        raise SchemaError(f"{where}: required must be true or false")
    if "question" in prop:
        prop["description"] = prop.pop("question")
    values = prop.pop("values", None)
    type_name = prop.pop("type", None)
    base: dict[str, Any] = {}
    if type_name is not None:
        if not isinstance(type_name, str) or type_name.lower() not in TYPE_NAMES:
            raise SchemaError(f"{where}: unknown type {type_name!r} (choose from {', '.join(KINDS)})")
        if TYPE_NAMES[type_name.lower()] == "enum":
            values = values if values is not None else prop.pop("enum", None)
            if not isinstance(values, list):
                raise SchemaError(f"{where}: type enum needs its values: values: [a, b, c]")
            base = {"enum": values}
        else:
            base = _short_type(type_name, None, where)
    elif values is not None:
        base = {"enum": values}
    return {**base, **prop}, required


# --- reading and checking ----------------------------------------------------------------------------------------


def _read_document(path: str | os.PathLike[str], option: str) -> Any:
    """A JSON or YAML file's content, read with limits; one-line errors naming the file."""
    origin = f"{option} {path}"
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_SCHEMA_BYTES + 1)
    except OSError as exc:
        raise SchemaError(f"{origin}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > MAX_SCHEMA_BYTES:
        raise SchemaError(f"{origin}: larger than {MAX_SCHEMA_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SchemaError(f"{origin}: not UTF-8 (byte {exc.start + 1})") from None
    suffix = Path(path).suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            return _load_yaml(text)
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            if suffix == ".json":
                where = f"line {exc.lineno}, column {exc.colno}"
                raise SchemaError(f"{origin}: not valid JSON ({where}: {exc.msg})") from None
            return _load_yaml(text)
    except RecursionError:
        raise SchemaError(f"{origin}: nested too deeply") from None
    except SchemaError as exc:
        raise SchemaError(f"{origin}: {exc}") from None


def _load_yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SchemaError(f"not valid YAML{where}: {problem}") from None


def _check_size(value: Any, origin: str) -> None:
    """Refuse schemas that are too big or too deep to walk (before anything else walks them)."""
    budget = MAX_NODES
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        budget -= 1
        if budget < 0:
            raise SchemaError(f"{origin}: more than {MAX_NODES:,} values; too large to be a schema of fields")
        if depth > MAX_NESTING:
            raise SchemaError(f"{origin}: nested more than {MAX_NESTING} levels deep")
        if isinstance(item, Mapping):
            if not all(isinstance(key, str) for key in item):
                raise SchemaError(f"{origin}: every key must be a string")
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
        elif not (item is None or isinstance(item, (str, int, float, bool))):
            raise SchemaError(f"{origin}: holds {_kind_of(item)}, which JSON has no place for")


def _check_metaschema(schema: Mapping[str, Any], origin: str) -> None:
    """The schema must be a valid JSON Schema (its own $schema's draft, else 2020-12), patterns included."""
    import jsonschema

    try:
        validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        path = "/".join(str(part) for part in exc.absolute_path)
        raise SchemaError(f"{origin}: not a valid JSON Schema{f' at {path}' if path else ''}: "
                          f"{_first_line(exc.message)}") from None
    except (jsonschema.exceptions.UnknownType, ValueError, RecursionError) as exc:
        raise SchemaError(f"{origin}: not a valid JSON Schema: {_first_line(str(exc))}") from None


class _Resolver:
    """Replaces every local `$ref` (`#/$defs/X`, `#/definitions/X`) by what it points at, within a node budget
    (a definition used twice by another used twice, 30 times over, would otherwise expand to billions)."""

    def __init__(self, root: Mapping[str, Any], where: str) -> None:
        self.root, self.where, self.budget = root, where, MAX_NODES

    def __call__(self, prop: Any, refs: int = 0) -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise SchemaError(f"{self.where}: its $refs expand to more than {MAX_NODES:,} values")
        if refs > MAX_REF_DEPTH:
            raise SchemaError(f"{self.where}: $refs nested more than {MAX_REF_DEPTH} deep (a cycle?)")
        if isinstance(prop, list):
            return [self(item, refs) for item in prop]
        if not isinstance(prop, Mapping):
            return prop
        result = {key: self(value, refs) for key, value in prop.items() if key != "$ref"}
        if "$ref" in prop:
            target = self(_pointer(self.root, prop["$ref"], self.where), refs + 1)
            if not isinstance(target, Mapping):
                raise SchemaError(f"{self.where}: $ref {prop['$ref']!r} points at {_kind_of(target)}, not a schema")
            result = {**target, **result}  # keys beside the $ref win
        return result


def _pointer(root: Mapping[str, Any], ref: Any, where: str) -> Any:
    if not isinstance(ref, str) or not ref.startswith("#/"):
        raise SchemaError(f"{where}: $ref {ref!r}: only references inside the schema (#/...) are followed")
    node: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or part not in node:
            raise SchemaError(f"{where}: $ref {ref!r} points at nothing")
        node = node[part]
    return node


def _kind_of(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    for type_, name in names.items():
        if isinstance(value, type_):
            return name
    return type(value).__name__


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "invalid"
    return unicodedata.normalize("NFC", line)[:300]

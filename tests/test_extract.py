"""monkey extract without a model: schemas in (JSON Schema, fields files, --field, pydantic), grammars that admit
exactly the answers that parse (random walks through the token masks on the tiny and the real Qwen vocabulary),
answers -> values, the multi-page rule, and the json / jsonl / csv writers."""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import random
import re
from pathlib import Path
from typing import Literal

import pytest
import torch
from conftest import require_parity

from monkey_cli.engine.constraints import TokenConstraint, bitmask_words
from monkey_cli.extract import NOT_FOUND, SchemaError, coerce_schema, from_json_schema, from_short_forms
from monkey_cli.extract.constraint import CompiledGrammar, ForcedTokens, GrammarConstraint, llguidance_tokenizer
from monkey_cli.extract.grammar import answer_grammar, check_grammar, check_value, date_regex, parse_answer
from monkey_cli.extract.results import Candidate, Extraction, choose, csv_cell, render, review
from monkey_cli.extract.schema import read_fields_file, read_schema_file
from monkey_cli.model.tokenizer import QWenTokenizer

ALL_TYPES = {
    "type": "object",
    "properties": {
        "total": {"type": "number", "description": "What is the total amount due?"},
        "count": {"type": "integer", "minimum": 0},
        "paid": {"type": "boolean"},
        "issued": {"type": "string", "format": "date"},
        "status": {"enum": ["paid", "unpaid", "overdue", 3, True]},
        "vendor": {"type": "string", "maxLength": 24},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "items": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 2},
    },
    "required": ["total", "status", "vendor", "code", "items"],
}


def _fields(schema: dict) -> dict:
    return {item.name: item for item in from_json_schema(schema).fields}


# --- schemas in ----------------------------------------------------------------------------------------------


def test_json_schema_fields_get_kinds_questions_and_not_found_rules() -> None:
    fields = _fields(ALL_TYPES)
    assert [f.kind for f in fields.values()] == [
        "number", "integer", "boolean", "date", "enum", "string", "string", "array", "array"
    ]  # fmt: skip
    assert fields["total"].question == "What is the total amount due?"
    assert fields["count"].question == "What is the count?"  # no description: made from the name
    assert not fields["total"].nullable and fields["count"].nullable  # required vs optional
    nullable = _fields({"properties": {
        "a": {"type": ["number", "null"]}, "b": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "c": {"enum": ["x", None]}, "d": {"type": "string", "nullable": True},
    }, "required": ["a", "b", "c", "d"]})  # fmt: skip
    assert all(item.nullable and item.required for item in nullable.values())
    assert nullable["c"].choices == ("x",)
    named = _fields({"properties": {"totalAmount_due": {}}})["totalAmount_due"]
    assert named.question == "What is the total amount due?"


def test_short_forms_and_fields_files_give_the_same_schema(tmp_path: Path) -> None:
    specs = ["total:number=What is the total?", "status:enum(paid|unpaid)!", "items:list", "note"]
    short = from_short_forms(specs)
    assert [(f.name, f.kind, f.nullable) for f in short.fields] == [
        ("total", "number", True), ("status", "enum", False), ("items", "array", True), ("note", "string", True)
    ]  # fmt: skip
    (tmp_path / "fields.yaml").write_text(
        "total: number=What is the total?\n"
        "status: {type: enum, values: [paid, unpaid], required: true}\n"
        "items: list=\n"
        "note:\n"
    )
    (tmp_path / "fields.json").write_text(json.dumps(specs))
    assert read_fields_file(tmp_path / "fields.yaml").fingerprint == short.fingerprint
    assert read_fields_file(tmp_path / "fields.json").fingerprint == short.fingerprint
    (tmp_path / "schema.yaml").write_text("type: object\nproperties:\n  total: {type: number}\n")
    assert read_schema_file(tmp_path / "schema.yaml").fields[0].kind == "number"


def test_a_pydantic_model_is_a_schema() -> None:
    import enum

    from pydantic import BaseModel, Field

    class Status(enum.Enum):
        PAID = "paid"
        UNPAID = "unpaid"

    class Invoice(BaseModel):
        total: float = Field(description="What is the total amount due?")
        issued: datetime.date | None = None
        status: Status
        kind: Literal["bill", "receipt"] | None = None
        items: list[str] = []

    schema = coerce_schema(Invoice)
    fields = {f.name: f for f in schema.fields}
    assert schema.model is Invoice
    assert [f.kind for f in schema.fields] == ["number", "date", "enum", "enum", "array"]
    assert fields["status"].choices == ("paid", "unpaid") and not fields["status"].nullable  # $ref resolved
    assert fields["issued"].nullable and fields["kind"].nullable and fields["items"].nullable


def test_fingerprint_follows_questions_and_types() -> None:
    base = from_short_forms(["total:number=What is the total?"])
    assert base.fingerprint == from_short_forms(["total:number=What is the total?"]).fingerprint
    assert base.fingerprint != from_short_forms(["total:number=What is the sum?"]).fingerprint
    assert base.fingerprint != from_short_forms(["total:integer=What is the total?"]).fingerprint
    combined = base + from_short_forms(["date:date"])
    assert combined.names == ["total", "date"]
    with pytest.raises(SchemaError, match="given twice"):
        _ = base + base


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "string"}, "type object"),
        ([1, 2], "JSON Schema object"),
        ("total", "JSON Schema object"),
        ({"type": "object"}, "properties"),
        ({"properties": {"a": {"type": "object", "properties": {}}}}, "type 'object' is not supported"),
        ({"properties": {"a": {"type": "array", "items": {"type": "number"}}}}, "arrays of strings"),
        ({"properties": {"a": {"anyOf": [{"type": "string"}, {"type": "number"}]}}}, "X or null"),
        ({"properties": {"a": {"type": "string", "pattern": "[a-"}}}, "not a valid JSON Schema"),
        ({"properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}}, "look-around"),
        ({"properties": {"a": {"$ref": "#/$defs/a"}}, "$defs": {"a": {"$ref": "#/$defs/a"}}}, "cycle"),
        ({"properties": {"a": {"$ref": "https://example.com/s.json"}}}, "only references inside"),
        ({"properties": {"a": {"enum": [""]}}}, "empty enum value"),
        ({"properties": {"a": {"enum": [f"v{i}" for i in range(100_000)]}}}, "at most 1,000"),
        ({"properties": {f"f{i}": {"type": "string"} for i in range(10_000)}}, "at most 256"),
        ({"properties": {"a": {"type": "string", "maxLength": 0}}}, "maxLength 0"),
        ({"properties": {"": {}}}, "non-empty"),
        ({"properties": {"a\x1b[2J": {}}}, "control"),
        ({"properties": {"a": {}}, "required": ["b"]}, "not a property"),
    ],
)
def test_hostile_schemas_fail_in_one_line(schema, message: str) -> None:
    with pytest.raises(SchemaError, match=re.escape(message)) as caught:
        if isinstance(schema, dict):
            schema = {"type": "object", **schema} if "type" not in schema else schema
        from_json_schema(schema)
    assert "\n" not in str(caught.value)


def test_nested_and_aliased_documents_fail_in_one_line(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SchemaError, match="nested"):
        read_schema_file(deep)
    nested = {"type": "array", "items": {}}
    cursor = nested
    for _ in range(80):
        cursor["items"] = {"type": "array", "items": {}}
        cursor = cursor["items"]
    (tmp_path / "nested.json").write_text(json.dumps({"type": "object", "properties": {"a": nested}}))
    with pytest.raises(SchemaError, match="nested more than"):
        read_schema_file(tmp_path / "nested.json")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(20)
    )
    (tmp_path / "bomb.yaml").write_text(bomb)
    with pytest.raises(SchemaError, match="too large"):
        read_fields_file(tmp_path / "bomb.yaml")
    (tmp_path / "bad.yaml").write_text("a: [unclosed\n")
    with pytest.raises(SchemaError, match=r"--fields .*bad\.yaml: not valid YAML \(line 2\)"):
        read_fields_file(tmp_path / "bad.yaml")


# --- grammars: every answer they allow parses --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer() -> QWenTokenizer:
    return QWenTokenizer(require_parity("tiny-monkey") / "qwen.tiktoken")


@pytest.fixture(scope="module")
def qwen_tokenizer() -> QWenTokenizer:
    return QWenTokenizer(require_parity("qwen.tiktoken"))


def _allowed(constraint: TokenConstraint, vocab: int) -> list[int]:
    bitmask = torch.full((2, bitmask_words(vocab)), -1, dtype=torch.int32)
    constraint.fill_next_token_bitmask(bitmask, 1)
    bits = (bitmask[1, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
    assert (bitmask[0] == -1).all()  # only its own row is written
    return bits.flatten()[:vocab].nonzero().flatten().tolist()


def _random_walk(compiled: CompiledGrammar, tokenizer: QWenTokenizer, vocab: int, rng: random.Random, limit: int):
    """Random tokens the grammar allows until <|endoftext|> (taken with odds 1 in 3 when allowed) or `limit`."""
    constraint, tokens = compiled.constraint(), []
    for _ in range(limit):
        allowed = _allowed(constraint, vocab)
        assert allowed, "the grammar allows nothing"
        assert all(t < tokenizer.eod_id or t == tokenizer.eod_id for t in allowed)  # never a special token
        ends = tokenizer.eod_id in allowed
        token = tokenizer.eod_id if ends and (rng.random() < 1 / 3 or len(allowed) == 1) else rng.choice(
            [t for t in allowed if t != tokenizer.eod_id] or allowed
        )
        assert constraint.accept_token(token)
        if token == tokenizer.eod_id:
            return tokens, True
        tokens.append(token)
        assert not constraint.is_terminated()  # extraction grammars end only with <|endoftext|>
    return tokens, False


@pytest.mark.parametrize("name", list(ALL_TYPES["properties"]))
def test_every_answer_a_grammar_allows_parses_and_validates(name: str, tiny_tokenizer: QWenTokenizer) -> None:
    vocab = 2304  # tiny-monkey's logits
    for item in (_fields(ALL_TYPES)[name], _fields({**ALL_TYPES, "required": []})[name]):
        grammar = check_grammar(item, budget=48)
        compiled = CompiledGrammar.from_lark(grammar.lark, llguidance_tokenizer(tiny_tokenizer, vocab))
        rng = random.Random(f"{name}-{item.nullable}")
        outcomes = set()
        for _ in range(25):
            tokens, ended = _random_walk(compiled, tiny_tokenizer, vocab, rng, grammar.max_tokens)
            assert ended or not grammar.bounded, "a bounded answer must end within its token limit"
            parsed = parse_answer(item, tiny_tokenizer.decode(tokens, skip_special_tokens=True), complete=ended)
            assert parsed.error is None, parsed.error
            assert parsed.found or item.nullable
            if parsed.found:
                assert check_value(item, parsed.value) is None
            outcomes.add(parsed.found)
        assert True in outcomes


def test_real_vocabulary_masks_are_right_and_never_offer_special_tokens(qwen_tokenizer: QWenTokenizer) -> None:
    vocab = 151936  # Monkey's logits: 151,851 tokens padded to a multiple of 128
    llg = llguidance_tokenizer(qwen_tokenizer, vocab)
    for name in ("total", "issued", "status", "vendor"):
        item = _fields({**ALL_TYPES, "required": []})[name]
        grammar = answer_grammar(item, budget=48)
        compiled = CompiledGrammar.from_lark(grammar.lark, llg)
        rng = random.Random(name)
        for _ in range(5):
            tokens, ended = _random_walk(compiled, qwen_tokenizer, vocab, rng, grammar.max_tokens)
            parsed = parse_answer(item, qwen_tokenizer.decode(tokens, skip_special_tokens=True), complete=ended)
            assert parsed.error is None and (parsed.found or parsed.value is None)
    first = _allowed(CompiledGrammar.from_lark(answer_grammar(_fields(ALL_TYPES)["paid"], 48).lark, llg).constraint(),
                     vocab)
    words = {qwen_tokenizer.decode([t]) for t in first}
    assert {"Yes", "No", "true", "False"} <= words and "Maybe" not in words


def test_not_found_is_offered_only_where_the_schema_allows_it(tiny_tokenizer: QWenTokenizer) -> None:
    llg = llguidance_tokenizer(tiny_tokenizer, 2304)
    not_found = tiny_tokenizer.encode(NOT_FOUND)
    for required in ([], ["total", "vendor", "status"]):
        for name in ("total", "vendor", "status"):
            item = _fields({**ALL_TYPES, "required": required})[name]
            constraint = CompiledGrammar.from_lark(answer_grammar(item, 48).lark, llg).constraint()
            accepted = all(constraint.accept_token(t) for t in not_found)
            ends = accepted and tiny_tokenizer.eod_id in _allowed(constraint, 2304)
            assert ends == item.nullable, (name, required)


def test_forced_tokens_allow_exactly_their_tokens_then_the_end() -> None:
    forced = ForcedTokens([5, 31, 63, 2000], eos_id=2001)
    for token in (5, 31, 63, 2000, 2001):  # 31 and 63 are bit 31 of their word: the int32 sign bit
        assert _allowed(forced, 2304) == [token]
        assert forced.accept_token(token)
    assert not ForcedTokens([5], 9).accept_token(6)


def test_json_schema_grammar_ends_at_the_closing_brace(tiny_tokenizer: QWenTokenizer) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    compiled = CompiledGrammar.from_json_schema(schema, llguidance_tokenizer(tiny_tokenizer, 2304))
    constraint: GrammarConstraint = compiled.constraint()
    for token in tiny_tokenizer.encode('{"a":12}'):
        assert not constraint.is_terminated() and constraint.accept_token(token)
    assert constraint.is_terminated()


def test_dates_are_real_calendar_dates() -> None:
    pattern = re.compile(date_regex())
    day, end = datetime.date(1999, 1, 1), datetime.date(2001, 1, 1)
    while day < end:
        assert pattern.fullmatch(day.isoformat()), day
        assert pattern.fullmatch(day.strftime("%B %-d, %Y")) and pattern.fullmatch(day.strftime("%-d %b %Y"))
        day += datetime.timedelta(days=1)
    for wrong in ("2023-02-29", "1900-02-29", "2024-04-31", "February 30, 2024", "29 Feb 2100", "2024-13-01"):
        assert not pattern.fullmatch(wrong), wrong
    for right in ("2024-02-29", "2000-02-29", "Feb 29, 2400", "31 December 1999"):
        assert pattern.fullmatch(right), right


# --- answers -> values ----------------------------------------------------------------------------------------


def test_answers_become_values() -> None:
    fields = _fields({**ALL_TYPES, "required": []})
    cases = [
        ("total", "1,234.50", 1234.5), ("total", "-3", -3), ("count", "1,200", 1200), ("paid", "Yes", True),
        ("paid", "false", False), ("issued", "March 3, 2024", "2024-03-03"), ("issued", "3 Mar 2024", "2024-03-03"),
        ("issued", "2024-03-03", "2024-03-03"), ("status", "3", 3), ("status", "true", True),
        ("items", "apples, pears,plums", ["apples", "pears", "plums"]), ("tags", "red, green", ["red", "green"]),
        ("vendor", "  Acme, Inc. ", "Acme, Inc."),
    ]  # fmt: skip
    for name, text, value in cases:
        parsed = parse_answer(fields[name], text)
        assert parsed.found and parsed.value == value and type(parsed.value) is type(value), (name, text)
    assert parse_answer(fields["total"], NOT_FOUND) == parse_answer(fields["items"], f" {NOT_FOUND} ")
    assert not parse_answer(fields["total"], NOT_FOUND).found
    cut = parse_answer(fields["total"], "12.", complete=False)
    assert not cut.found and "cut" in cut.error
    assert check_value(_fields({"properties": {"n": {"type": "number", "maximum": 10}}})["n"], 12) is not None


# --- the multi-page rule -------------------------------------------------------------------------------------


def _candidate(page, value, confidence, found=True, error=None, answer="x"):
    return Candidate(page, value, found, answer, confidence, confidence, 0.1, error)


def test_the_most_confident_page_wins_and_ties_go_to_the_earliest() -> None:
    result = choose([_candidate(1, "a", 0.4), _candidate(2, "b", 0.9), _candidate(3, "c", 0.9)])
    assert (result.value, result.page, result.confidence) == ("b", 2, 0.9)
    assert len(result.candidates) == 3


def test_a_value_beats_not_found_and_not_found_everywhere_is_null() -> None:
    result = choose([_candidate(1, None, 0.99, found=False), _candidate(2, 7, 0.2)])
    assert (result.value, result.page) == (7, 2)
    result = choose([_candidate(1, None, 0.3, found=False), _candidate(2, None, 0.8, found=False)])
    assert (result.value, result.page, result.confidence) == (None, None, 0.8)
    failed = _candidate(1, None, None, found=False, error="p.1: RuntimeError: boom", answer=None)
    result = choose([failed, _candidate(2, 5, 0.1)])
    assert (result.value, result.page) == (5, 2)
    assert choose([failed]).error == "p.1: RuntimeError: boom"
    assert review({"a": choose([_candidate(1, 1, 0.2)]), "b": choose([_candidate(1, 1, 0.8)])}, 0.5) == ["a"]


# --- writers -------------------------------------------------------------------------------------------------


def _extraction(values: dict, **kwargs) -> Extraction:
    fields = {name: choose([_candidate(1, value, 0.5, found=value is not None)]) for name, value in values.items()}
    return Extraction(source=kwargs.pop("source", "a.pdf"), pages=1, fields=fields, **kwargs)


def test_csv_quotes_commas_quotes_and_newlines_and_disarms_formulas() -> None:
    values = {"name": 'Acme, "the best"\nInc.', "total": 12.5, "paid": True, "items": ["a,b", "c"], "none": None,
              "formula": "=HYPERLINK(\"http://x\")", "negative": -3}
    text = render([_extraction(values, source="dir/a, b.pdf", needs_review=["total", "paid"])], "csv", list(values))
    assert text.count("\r\n") == 2  # header and row end with CRLF (RFC 4180); a newline inside a value is quoted
    assert '"Acme, ""the best""\nInc."' in text
    header, row = list(csv.reader(io.StringIO(text, newline="")))
    assert header == ["source", "pages", *values, "needs_review", "error"]
    assert row == ["dir/a, b.pdf", "1", 'Acme, "the best"\nInc.', "12.5", "true", '["a,b", "c"]', "",
                   "'=HYPERLINK(\"http://x\")", "-3", "total; paid", ""]
    assert csv_cell("\x1b]0;owned\x07") == "\\x1b]0;owned\\x07"


def test_json_and_jsonl_carry_the_schema_version_and_every_field() -> None:
    extraction = _extraction({"total": 3, "date": None}, all_pages=True)
    document = json.loads(render([extraction, extraction], "json", ["total", "date"]))
    assert document["schema_version"] == 2 and len(document["records"]) == 2
    record = document["records"][0]
    assert record["task"] == "extract" and record["fields"]["total"]["value"] == 3
    assert record["fields"]["date"] == {"value": None, "page": None, "confidence": 0.5, "confidence_min": 0.5,
                                        "null_probability": 0.1, "answer": "x", "error": None}
    assert record["candidates"]["total"][0]["page"] == 1
    lines = render([extraction], "jsonl", ["total", "date"]).splitlines()
    assert list(json.loads(lines[0]))[:2] == ["schema_version", "source"]
    assert math.isclose(json.loads(lines[0])["fields"]["total"]["confidence"], 0.5)


# --- the command's usage errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--field", "a", "--min-confidence", "1.5"], "--min-confidence must be a number from 0 to 1; got '1.5'"),
        (["--field", "a", "-f", "md"], "--format must be one of json, jsonl, csv; got 'md'"),
        ([], "extract needs fields"),
        (["--field", "a:money"], "unknown type 'money'"),
        (["--field", "a:enum"], "enum needs its values"),
        (["--field", "source", "-f", "csv"], "field 'source' would share a CSV column"),
        (["--field", "a", "--max-new-tokens", "1"], "--max-new-tokens must be at least 2"),
        (["--field", "a", "--field", "a:number"], "field 'a' is given twice"),
        (["--schema", "missing.json"], "--schema missing.json: cannot read it"),
    ],
)
def test_extract_usage_errors_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from monkey_cli.cli import _register_commands, app

    _register_commands()
    result = CliRunner().invoke(app, ["extract", "x.png", *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {message}") or message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""

"""The answer each field may take, as a grammar for constrained decoding, and how an answer becomes a value.

A field is asked the way Monkey answers questions (`<img></img> {question} Answer: `) and its answer is the value
written the way the model writes it on its own, not JSON: `1,234.50`, `Yes`, `March 3, 2024`, `paid`,
`apples, pears`. The grammar (llguidance's Lark dialect) admits exactly the answers that parse as a value of the
field's type, so on any weights the answer parses; every grammar ends in <|endoftext|> (the model's own choice
where the value could go on, forced where it cannot), so every answer carries the model's probability of
stopping there.

"Not found" is the answer `unanswerable`, the word VQA data (VizWiz) uses for a question the image cannot
answer; the grammar offers it only where the schema allows the value to be missing, and refuses it as a value
elsewhere.

| kind    | the model writes                                     | the value                           |
|---------|------------------------------------------------------|-------------------------------------|
| string  | one line of text (no control characters)             | the text                            |
| number  | `-12`, `3.5`, `1,234.50` (15 digits, no exponent)    | an int, or a float with a decimal   |
| integer | `42`, `1,200` (15 digits)                            | an int                              |
| boolean | yes, no, true, false (or Yes, No, True, False)       | true / false                        |
| date    | `2024-03-01`, `March 1, 2024`, `1 Mar 2024`          | ISO 8601 `2024-03-01` (always real) |
| enum    | one of the values as written                         | that value                          |
| array   | items separated by commas                            | a list of strings                   |
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from monkey_cli.extract.schema import Field, SchemaError, choice_text

NOT_FOUND = "unanswerable"
DEFAULT_STRING_CHARS = 200  # the longest string answer without a maxLength (the token budget cuts it sooner)
DEFAULT_ARRAY_ITEMS = 32
DEFAULT_ITEM_CHARS = 100
UTF8_MAX = 4  # bytes per character: a token holds at least one byte, so this bounds tokens per character

_SAFE_CHAR = r"[^\x00-\x1f\x7f]"  # one character of a one-line answer: no control characters
_START_CHAR = r"[^\s\x00-\x1f\x7f]"  # ... that does not start with a space
_ITEM_CHAR = r"[^,\x00-\x1f\x7f]"
_ITEM_START = r"[^\s,\x00-\x1f\x7f]"

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_MONTH_NUMBERS = {name.lower(): number for number, full in enumerate(_MONTHS, 1) for name in (full, full[:3])}
_YEAR = r"[12][0-9]{3}"
_LEAP_YEAR = r"(?:[12][0-9](?:0[48]|[2468][048]|[13579][26])|(?:1[26]|2[048])00)"
_TEXT_DATE = re.compile(
    r"(?:(?P<m1>[A-Za-z]+) (?P<d1>[0-9]{1,2}),? |(?P<d2>[0-9]{1,2}) (?P<m2>[A-Za-z]+) )(?P<y>[0-9]{4})"
)


@dataclass(frozen=True)
class AnswerGrammar:
    """A field's grammar and how many tokens its longest answer takes (<|endoftext|> included)."""

    lark: str
    max_tokens: int
    bounded: bool  # False: an answer may be cut at max_tokens (a long string), and is then taken as it stands


@dataclass(frozen=True)
class Parsed:
    """What an answer says: a value (`found`), not found (value None), or why it is no value (`error`)."""

    value: Any
    found: bool
    error: str | None = None


# --- grammars ------------------------------------------------------------------------------------------------


def answer_grammar(field: Field, budget: int) -> AnswerGrammar:
    """The grammar of `field`'s answers; `budget` caps the tokens of answers that can be long (strings, lists)."""
    body, longest = _BODIES[field.kind](field)
    rules = [f"start: {'value | NOT_FOUND' if field.nullable else 'value'}", *body]
    if field.nullable:
        rules.append(f"NOT_FOUND: {json.dumps(NOT_FOUND)}")
        longest = None if longest is None else max(longest, len(NOT_FOUND))
    text = "\n".join(rules)
    if longest is None or (field.kind in ("string", "array") and longest + 1 > budget):
        return AnswerGrammar(text, budget, bounded=False)
    return AnswerGrammar(text, longest + 1, bounded=True)


def check_grammar(field: Field, budget: int) -> AnswerGrammar:
    """`answer_grammar`, checked by llguidance: SchemaError naming the field if it cannot be compiled (a pattern
    the regex engine does not take, say)."""
    from llguidance import LLMatcher

    grammar = answer_grammar(field, budget)
    problem = LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(grammar.lark))
    if problem:
        detail = next((line.strip() for line in problem.splitlines() if line.strip().startswith("error:")), None)
        first = problem.strip().splitlines()[0]
        raise SchemaError(f"field {field.name!r}: cannot constrain answers to it: {detail or first}")
    return grammar


def _string(field: Field) -> tuple[list[str], int | None]:
    exclude = not field.nullable  # a required string may not say "not found"
    return _text_rules("value", field.schema, DEFAULT_STRING_CHARS, _START_CHAR, _SAFE_CHAR, exclude=exclude)


def _text_rules(
    rule: str, schema: Mapping[str, Any], default_chars: int, first: str, rest: str, exclude: bool
) -> tuple[list[str], int | None]:
    """A one-line text lexeme, within the schema's length (and pattern)."""
    low = max(schema.get("minLength", 1), 1)
    high = schema.get("maxLength")
    limit = high if high is not None else default_chars
    token = rule.upper() + "_TEXT"
    shape = f"/{first}{rest}{{{low - 1},{limit - 1}}}/"
    if "pattern" in schema:
        shape = f"/{_lark_regex(schema['pattern'])}/ & /{rest}{{{low},{limit}}}/"
    if exclude:
        shape += f" & ~{json.dumps(NOT_FOUND)}"
    longest = None if "pattern" in schema and high is None else limit * UTF8_MAX
    return [f"{rule}: {token}", f"{token}: {shape}"], longest


def _number(field: Field) -> tuple[list[str], int | None]:
    sign = "" if _non_negative(field.schema) else "-?"
    # At most 15 significant digits, what a double (a JSON number) holds exactly.
    plain = rf"{sign}(?:0|[1-9][0-9]{{0,10}})(?:\.[0-9]{{1,4}})?"
    grouped = rf"{sign}[1-9][0-9]{{0,2}}(?:,[0-9]{{3}}){{1,3}}(?:\.[0-9]{{1,3}})?"
    return [f"value: /{plain}|{grouped}/"], len("-999,999,999,999.999")


def _integer(field: Field) -> tuple[list[str], int | None]:
    sign = "" if _non_negative(field.schema) else "-?"
    plain = rf"{sign}(?:0|[1-9][0-9]{{0,14}})"
    grouped = rf"{sign}[1-9][0-9]{{0,2}}(?:,[0-9]{{3}}){{1,4}}"
    return [f"value: /{plain}|{grouped}/"], len("-999,999,999,999,999")


def _boolean(field: Field) -> tuple[list[str], int | None]:
    return ["value: /[Yy]es|[Nn]o|[Tt]rue|[Ff]alse/"], 5


def _date(field: Field) -> tuple[list[str], int | None]:
    return [f"value: /{date_regex()}/"], len("September 30, 2024")


def _enum(field: Field) -> tuple[list[str], int | None]:
    texts = [choice_text(value) for value in field.choices]
    return [f"value: {' | '.join(_literal(text) for text in texts)}"], max(len(t.encode()) for t in texts)


def _array(field: Field) -> tuple[list[str], int | None]:
    schema = field.schema
    items = schema.get("items", {"type": "string"})
    low = max(schema.get("minItems", 1), 1)
    high = schema.get("maxItems", DEFAULT_ARRAY_ITEMS)
    rules = [f"value: item (SEPARATOR item){{{low - 1},{high - 1}}}", r"SEPARATOR: /, ?/"]
    if "enum" in items or "const" in items:
        texts = [choice_text(value) for value in field.choices]
        rules.append(f"item: {' | '.join(_literal(text) for text in texts)}")
        item_bytes = max(len(t.encode()) for t in texts)
    else:
        item_rules, item_bytes = _text_rules("item", items, DEFAULT_ITEM_CHARS, _ITEM_START, _ITEM_CHAR, exclude=False)
        rules += item_rules
    longest = None if item_bytes is None else high * item_bytes + (high - 1) * 2
    return rules, longest


_BODIES = {
    "string": _string,
    "number": _number,
    "integer": _integer,
    "boolean": _boolean,
    "date": _date,
    "enum": _enum,
    "array": _array,
}


def date_regex() -> str:
    """Real calendar dates, ISO 8601 or written out with an English month name (full or three letters)."""
    day31, day30, day28 = r"(?:0[1-9]|[12][0-9]|3[01])", r"(?:0[1-9]|[12][0-9]|30)", r"(?:0[1-9]|1[0-9]|2[0-8])"
    iso = [
        rf"{_YEAR}-(?:0[13578]|1[02])-{day31}",
        rf"{_YEAR}-(?:0[469]|11)-{day30}",
        rf"{_YEAR}-02-{day28}",
        rf"{_LEAP_YEAR}-02-29",
    ]
    written = []
    for months, day in (((1, 3, 5, 7, 8, 10, 12), day31), ((4, 6, 9, 11), day30), ((2,), day28)):
        names = "|".join(sorted({n for m in months for n in (_MONTHS[m - 1], _MONTHS[m - 1][:3])}))
        loose = day.replace("(?:0[1-9]", "(?:0?[1-9]")  # a written day needs no leading zero
        written += [rf"(?:{names}) {loose},? {_YEAR}", rf"{loose} (?:{names}) {_YEAR}"]
    written += [rf"(?:February|Feb) 29,? {_LEAP_YEAR}", rf"29 (?:February|Feb) {_LEAP_YEAR}"]
    return "|".join(f"(?:{part})" for part in iso + written)


def _non_negative(schema: Mapping[str, Any]) -> bool:
    bounds = [schema.get("minimum"), schema.get("exclusiveMinimum")]
    return any(isinstance(bound, (int, float)) and not isinstance(bound, bool) and bound >= 0 for bound in bounds)


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _lark_regex(pattern: str) -> str:
    """A JSON Schema pattern as the whole of a lexeme: anchors dropped, `\\d` and `\\w` ASCII as in JavaScript."""
    from llguidance import regex_to_lark

    if pattern.startswith("^"):
        pattern = pattern[1:]
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1]
    return regex_to_lark(pattern, "dw")


# --- answers -> values ---------------------------------------------------------------------------------------


def parse_answer(field: Field, text: str, complete: bool = True) -> Parsed:
    """The value `text` (an answer decoded without special tokens) stands for. `complete` False: the answer was cut
    at its token limit before the model ended it (text and lists are taken as they stand)."""
    text = text.strip()
    if field.nullable and text == NOT_FOUND:
        return Parsed(None, found=False)
    try:
        value = _PARSERS[field.kind](field, text)
    except ValueError as exc:
        cut = "" if complete else " (the answer was cut at its token limit)"
        return Parsed(None, found=False, error=f"{exc}{cut}")
    return Parsed(value, found=True)


def _parse_string(field: Field, text: str) -> str:
    if not text:
        raise ValueError("the answer is empty")
    return text


def _parse_number(field: Field, text: str) -> int | float:
    if not re.fullmatch(r"-?[0-9][0-9,]*(\.[0-9]+)?", text):
        raise ValueError(f"{text!r} is not a number")
    plain = text.replace(",", "")
    return float(plain) if "." in plain else int(plain)


def _parse_integer(field: Field, text: str) -> int:
    if not re.fullmatch(r"-?[0-9][0-9,]*", text):
        raise ValueError(f"{text!r} is not an integer")
    return int(text.replace(",", ""))


def _parse_boolean(field: Field, text: str) -> bool:
    answer = text.lower()
    if answer not in ("yes", "no", "true", "false"):
        raise ValueError(f"{text!r} is not yes or no")
    return answer in ("yes", "true")


def _parse_date(field: Field, text: str) -> str:
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return datetime.date.fromisoformat(text).isoformat()
        return _written_date(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a date") from None


def _written_date(text: str) -> str:
    match = _TEXT_DATE.fullmatch(text)
    if match is None:
        raise ValueError(text)
    month = _MONTH_NUMBERS.get((match["m1"] or match["m2"]).lower())
    if month is None:
        raise ValueError(text)
    return datetime.date(int(match["y"]), month, int(match["d1"] or match["d2"])).isoformat()


def _parse_enum(field: Field, text: str) -> Any:
    for value in field.choices:
        if choice_text(value) == text:
            return value
    raise ValueError(f"{text!r} is not one of the values")


def _parse_array(field: Field, text: str) -> list[Any]:
    items = [item.strip() for item in text.split(",")]
    items = [item for item in items if item]
    if not items:
        raise ValueError("the answer lists nothing")
    if field.choices:
        by_text = {choice_text(value): value for value in field.choices}
        if any(item not in by_text for item in items):
            raise ValueError(f"{text!r} lists something that is not one of the values")
        return [by_text[item] for item in items]
    return items


_PARSERS = {
    "string": _parse_string,
    "number": _parse_number,
    "integer": _parse_integer,
    "boolean": _parse_boolean,
    "date": _parse_date,
    "enum": _parse_enum,
    "array": _parse_array,
}


def check_value(field: Field, value: Any) -> str | None:
    """Why `value` does not satisfy the field's schema (a number under its minimum, say), or None."""
    import jsonschema

    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    validator = jsonschema.Draft202012Validator(field.schema, format_checker=checker)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    return None if error is None else error.message.splitlines()[0][:300]

"""Extraction results: one record per document, the multi-page rule, and the json / jsonl / csv writers.

A record (`Extraction.to_dict()`, `schema_version` 2, `"task": "extract"`):

    {"source": "invoice.pdf", "pages": 2, "task": "extract",
     "fields": {"total": {"value": 1234.5, "page": 1, "confidence": 0.91, "confidence_min": 0.62,
                          "null_probability": 0.01, "answer": "1,234.50", "error": null}, ...},
     "candidates": null, "needs_review": null, "valid": true,
     "model": "echo840/Monkey-Chat", "quant": "4bit", "schema_sha256": "...", "seconds": 1.9, "error": null,
     "warnings": []}

The multi-page rule (`choose`): every page answers every field. Among the pages that found a value, the one with
the highest confidence wins, ties going to the earliest page; a value found anywhere beats "not found" however
confident (a field is usually on one page and absent from the others). Only when no page found a value is the
field null, with the confidence of the most confident "not found" (ties: the earliest page) and no page.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TextIO, TypeVar

from monkey_cli import __version__
from monkey_cli.output import SCHEMA_VERSION, one_line
from monkey_cli.printing import json_text, terminal_text

FORMATS = ("json", "jsonl", "csv")
EXTENSIONS = {"json": ".json", "jsonl": ".jsonl", "csv": ".csv"}
TASK = "extract"
CSV_COLUMNS = ("source", "pages")  # then one column per field, then these
CSV_TRAILING = ("needs_review", "error")
DIGITS = 4  # confidences in records (the objects keep every digit)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs a cell starting with these as a formula

ModelT = TypeVar("ModelT")


@dataclass(frozen=True)
class Candidate:
    """What one page answered for one field."""

    page: int | None
    value: Any
    found: bool
    answer: str | None  # the model's answer as text (None: the request failed)
    confidence: float | None  # exp(mean token log-probability), <|endoftext|> included when the model ended it
    confidence_min: float | None  # the least likely token's probability
    null_probability: float | None  # the model's probability of answering "not found" (None: not allowed)
    error: str | None = None  # why this page gave no value: an answer the schema refuses, a failed request

    def to_dict(self) -> dict[str, Any]:
        return {
            "page": self.page,
            "value": self.value,
            "confidence": _rounded(self.confidence),
            "confidence_min": _rounded(self.confidence_min),
            "null_probability": _rounded(self.null_probability),
            "answer": self.answer,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Candidate:
        """A candidate as `to_dict` wrote it (a value was found where there is one: not-found is null)."""
        return cls(page=data["page"], value=data["value"], found=data["value"] is not None, answer=data["answer"],
                   confidence=data["confidence"], confidence_min=data["confidence_min"],
                   null_probability=data["null_probability"], error=data["error"])  # fmt: skip


@dataclass(frozen=True)
class FieldResult:
    """A field's value for the whole document, chosen from its pages' candidates by the multi-page rule."""

    value: Any
    page: int | None
    confidence: float | None
    confidence_min: float | None
    null_probability: float | None
    answer: str | None
    error: str | None
    candidates: tuple[Candidate, ...] = ()

    @property
    def found(self) -> bool:
        return self.page is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "page": self.page,
            "confidence": _rounded(self.confidence),
            "confidence_min": _rounded(self.confidence_min),
            "null_probability": _rounded(self.null_probability),
            "answer": self.answer,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]] = ()) -> FieldResult:
        """A field's result as `to_dict` wrote it, with its candidates (the record's `candidates` entry)."""
        return cls(value=data["value"], page=data["page"], confidence=data["confidence"],
                   confidence_min=data["confidence_min"], null_probability=data["null_probability"],
                   answer=data["answer"], error=data["error"],
                   candidates=tuple(Candidate.from_dict(item) for item in candidates))  # fmt: skip


def choose(candidates: Sequence[Candidate]) -> FieldResult:
    """The document's value from its pages' candidates (the rule in the module's docstring)."""
    answered = [c for c in candidates if c.answer is not None and c.confidence is not None]
    found = [c for c in answered if c.found]
    pool = found or [c for c in answered if c.error is None] or answered
    if not pool:
        errors = [c.error for c in candidates if c.error]
        return FieldResult(None, None, None, None, None, None, errors[0] if errors else "no page answered",
                           tuple(candidates))
    best = min(pool, key=lambda c: (-(c.confidence or 0.0), c.page or 0))
    return FieldResult(
        value=best.value if best.found else None,
        page=best.page if best.found else None,
        confidence=best.confidence,
        confidence_min=best.confidence_min,
        null_probability=best.null_probability,
        answer=best.answer,
        error=None if found else best.error,
        candidates=tuple(candidates),
    )


@dataclass
class Extraction(Generic[ModelT]):
    """One document's fields. `values` maps each field to its value (None: not found); `model`, when the schema
    was a pydantic model class, is that class's instance of them (None if pydantic refuses them)."""

    source: str
    pages: int | None
    fields: dict[str, FieldResult]
    model_name: str | None = None
    quant: str | None = None
    schema_sha256: str | None = None
    seconds: float = 0.0
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    valid: bool | None = None  # the values satisfy the whole schema (None: not checked, the document failed)
    needs_review: list[str] | None = None  # with a minimum confidence: the fields under it (or with no value)
    all_pages: bool = False
    model: ModelT | None = None
    retry: bool = field(default=False, repr=False)  # a request failed for a reason of the moment (not written)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def values(self) -> dict[str, Any]:
        return {name: result.value for name, result in self.fields.items()}

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-ready dict, keys in a stable order."""
        candidates = None
        if self.all_pages:
            candidates = {name: [c.to_dict() for c in result.candidates] for name, result in self.fields.items()}
        return {
            "source": self.source,
            "pages": self.pages,
            "task": TASK,
            "fields": {name: result.to_dict() for name, result in self.fields.items()},
            "candidates": candidates,
            "needs_review": None if self.needs_review is None else list(self.needs_review),
            "valid": self.valid,
            "model": self.model_name,
            "quant": self.quant,
            "schema_sha256": self.schema_sha256,
            "seconds": round(float(self.seconds), 3),
            "error": None if self.error is None else one_line(self.error),
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Extraction[Any]:
        """A record as `to_dict` wrote it (a server's, say): `to_dict()` of the result gives `data` back. Raises
        ValueError for anything else."""
        if not isinstance(data, Mapping) or data.get("task") != TASK:
            raise ValueError("not an extract record")
        try:
            return cls._from_dict(data)
        except KeyError as exc:
            raise ValueError(f"no {exc.args[0]!r} in it") from None
        except (AttributeError, TypeError) as exc:
            raise ValueError(str(exc)) from None

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any]) -> Extraction[Any]:
        candidates = data["candidates"]
        if not isinstance(data["fields"], Mapping) or not (candidates is None or isinstance(candidates, Mapping)):
            raise ValueError("its fields are not an object")
        fields = {str(name): FieldResult.from_dict(result, (candidates or {}).get(name, ()))
                  for name, result in data["fields"].items()}  # fmt: skip
        return cls(
            source=str(data["source"]),
            pages=data["pages"],
            fields=fields,
            model_name=data["model"],
            quant=data["quant"],
            schema_sha256=data["schema_sha256"],
            seconds=float(data["seconds"]),
            error=data["error"],
            warnings=[str(note) for note in data["warnings"]],
            valid=data["valid"],
            needs_review=None if data["needs_review"] is None else [str(name) for name in data["needs_review"]],
            all_pages=candidates is not None,
        )


def review(fields: Mapping[str, FieldResult], min_confidence: float) -> list[str]:
    """Fields to check by hand: a confidence under `min_confidence`, or no confidence at all (nothing answered)."""
    return [name for name, result in fields.items()
            if result.confidence is None or result.confidence < min_confidence]


def _rounded(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None if value is None else 0.0
    return round(value, DIGITS)


# --- writers ---------------------------------------------------------------------------------------------------


class ExtractionWriter:
    """Writes extractions to a text stream: `write()` per document, `close()` once (also on Ctrl-C)."""

    def __init__(self, stream: TextIO, fmt: str, field_names: Sequence[str]) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown extract format {fmt!r} (choose from {', '.join(FORMATS)})")
        self.stream = stream
        self.fmt = fmt
        self.field_names = list(field_names)
        self.closed = False
        self._records: list[dict[str, Any]] = []
        self._csv: Any = None  # made with the first row: a run that fails before any result prints nothing

    def write(self, extraction: Extraction[Any]) -> None:
        if self.closed:
            raise ValueError("write() on a closed writer")
        if self.fmt == "json":
            self._records.append(extraction.to_dict())
        elif self.fmt == "jsonl":
            self.stream.write(json_text({"schema_version": SCHEMA_VERSION, **extraction.to_dict()}) + "\n")
            self.stream.flush()
        else:
            self._csv_writer().writerow(csv_row(extraction, self.field_names))
            self.stream.flush()

    def _csv_writer(self) -> Any:
        if self._csv is None:
            self._csv = csv.writer(self.stream, lineterminator="\r\n")  # RFC 4180: CRLF, quotes doubled
            self._csv.writerow([*CSV_COLUMNS, *self.field_names, *CSV_TRAILING])
        return self._csv

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.fmt == "json":
            document = {
                "schema_version": SCHEMA_VERSION,
                "tool": {"name": "monkey-cli", "version": __version__},
                "records": self._records,
            }
            self.stream.write(json_text(document, indent=2) + "\n")
        elif self.fmt == "csv":
            self._csv_writer()  # no document at all: the header alone
        self.stream.flush()

    def __enter__(self) -> ExtractionWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def csv_row(extraction: Extraction[Any], field_names: Sequence[str]) -> list[str]:
    """One document as a CSV row: its source and page count, each field's value, the fields to review, the error."""
    values = [csv_cell(extraction.fields[name].value if name in extraction.fields else None) for name in field_names]
    review_list = "; ".join(extraction.needs_review or [])
    return [csv_cell(extraction.source), csv_cell(extraction.pages), *values, csv_cell(review_list),
            csv_cell(extraction.error)]


def csv_cell(value: Any) -> str:
    """A value as a spreadsheet cell: empty for null, true/false, numbers as written, lists as JSON. Text keeps its
    line breaks (the csv module quotes it) with other control characters made visible, and text a spreadsheet
    would run as a formula (`=`, `+`, `-`, `@` first) gets a leading apostrophe, as OWASP advises."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, dict)):
        return json_text(value)
    text = terminal_text(str(value))
    return "'" + text if text.startswith(_FORMULA_START) else text


def render(extractions: Sequence[Extraction[Any]], fmt: str, field_names: Sequence[str]) -> str:
    """Extractions in `fmt`, as the content of an output file."""
    buffer = io.StringIO(newline="")
    with ExtractionWriter(buffer, fmt, field_names) as writer:
        for extraction in extractions:
            writer.write(extraction)
    return buffer.getvalue()



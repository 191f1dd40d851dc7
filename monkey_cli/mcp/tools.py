"""The tools `monkey mcp` offers, one function each: its parameters (with their descriptions) are the tool's
input schema, its docstring the tool's description, and it returns the CLI's records for the file (`ask`,
`caption`, `read`: one per page; `extract`: the document's one).

Adding a tool is adding one function here with `@tool`: the server registers every function in `TOOLS`, in
this order, and gives each a `DocumentService` as its first argument.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

from monkey_cli.errors import UsageError
from monkey_cli.extract import Extraction, ExtractSchema, from_json_schema, from_short_forms
from monkey_cli.mcp.service import DocumentService
from monkey_cli.output import Record

ToolOutput = list[Record] | Extraction[Any]  # what a tool returns; the server makes it the tool's answer
TOOLS: list[Callable[..., ToolOutput]] = []


def tool(function: Callable[..., ToolOutput]) -> Callable[..., ToolOutput]:
    """Offer `function` as an MCP tool named after it."""
    TOOLS.append(function)
    return function


Path = Annotated[
    str,
    Field(description="The document: a path relative to the root folder (or an absolute path inside it). "
          "PDF, PNG, JPEG, TIFF (every frame a page), WEBP, BMP, GIF."),
]  # fmt: skip
Pages = Annotated[
    str | None,
    Field(description="Pages to use, e.g. '1-3,7,-1' (1-based; -1 is the last page). Default: every page."),
]
Question = Annotated[str, Field(description="The question, in plain words, e.g. 'What is the total amount due?'")]
ForceOcr = Annotated[
    bool, Field(description="Have the model read the page even where a PDF has a usable text layer.")
]
Schema = Annotated[
    dict[str, Any] | None,
    Field(description="The fields as a JSON Schema object, e.g. {\"type\": \"object\", \"properties\": "
          "{\"total\": {\"type\": \"number\", \"description\": \"What is the total amount due?\"}}, \"required\": []}. "
          "Each property's description (or its name) is the question asked; types: string, number, integer, "
          "boolean, string with format date, enum, array of strings. A required field is never 'not found'."),
]  # fmt: skip
Fields = Annotated[
    list[str] | str | None,
    Field(description="Fields in short form, NAME[:TYPE][=QUESTION], e.g. ['total:number=What is the total "
          "amount due?', 'paid:boolean', 'status:enum(paid|unpaid)', 'items:list', 'id:string!'] (TYPE: string, "
          "number, integer, boolean, date, enum(a|b), list; default string; '!': required); one field may be a "
          "string. Added after `schema`'s."),
]  # fmt: skip
AllPages = Annotated[bool, Field(description="Also give every page's answers, under the record's `candidates`.")]
MinConfidence = Annotated[
    float | None,
    Field(description="Between 0 and 1: fields whose confidence is under it are listed in `needs_review`."),
]
NullProbability = Annotated[
    bool, Field(description="Score 'not found' for the fields that may be missing (its probability per field).")
]
MaxNewTokens = Annotated[
    int | None,
    Field(description="The longest string or list answer, in tokens (default 64, at most the server's "
          "--max-new-tokens)."),
]  # fmt: skip


@tool
def ask(service: DocumentService, path: Path, question: Question, pages: Pages = None) -> list[Record]:
    """Answer a question about a local document with the Monkey model: one answer per page (a PDF's pages, a
    TIFF's frames, or the one image)."""
    return service.run("ask", path, questions=[question], pages=pages)


@tool
def caption(service: DocumentService, path: Path, pages: Pages = None) -> list[Record]:
    """Describe each page or photo of a local document in detail, with the Monkey model."""
    return service.run("caption", path, pages=pages)


@tool
def read(service: DocumentService, path: Path, pages: Pages = None, force_ocr: ForceOcr = False) -> list[Record]:
    """The text of each page of a local document, as Markdown: a born-digital PDF page from its own text layer
    (headings, lists, tables; exact, no model), anything else read by the Monkey model."""
    return service.run("read", path, pages=pages, force_ocr=force_ocr)


@tool
def extract(
    service: DocumentService,
    path: Path,
    schema: Schema = None,
    fields: Fields = None,
    pages: Pages = None,
    all_pages: AllPages = False,
    min_confidence: MinConfidence = None,
    null_probability: NullProbability = True,
    max_new_tokens: MaxNewTokens = None,
) -> Extraction[Any]:
    """Extract fields from a local document as validated values (numbers, dates, booleans, enums, lists) with the
    model's confidence: every field is asked of every page, its answer constrained to its type, the most
    confident page wins, and a value not found is null. Give the fields as `schema` and/or `fields`. One record
    for the document, as `monkey extract -f json` writes it."""
    return service.extract(path, extract_schema(schema, fields), pages=pages, all_pages=all_pages,
                           min_confidence=min_confidence, null_probability=null_probability,
                           max_new_tokens=max_new_tokens)  # fmt: skip


def extract_schema(schema: dict[str, Any] | None, fields: list[str] | str | None) -> ExtractSchema:
    """The fields of `schema`, then those of `fields` (as the CLI combines --schema and --field; names must
    differ); a SchemaError (a UsageError) names what is wrong."""
    parts = []
    if schema is not None:
        parts.append(from_json_schema(schema, origin="schema"))
    if fields:
        parts.append(from_short_forms([fields] if isinstance(fields, str) else fields, origin="field"))
    if not parts:
        raise UsageError("extract needs fields: `schema` (a JSON Schema object) or `fields` "
                         "(['NAME:TYPE=QUESTION', ...])")  # fmt: skip
    return functools.reduce(operator.add, parts)


def describe(function: Callable[..., Any]) -> str:
    """A tool's description: its docstring on one paragraph."""
    return " ".join((function.__doc__ or "").split())

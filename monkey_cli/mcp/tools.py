"""The tools `monkey mcp` offers, one function each: its parameters (with their descriptions) are the tool's
input schema, its docstring the tool's description, and it returns the CLI's records for the file.

Adding a tool is adding one function here with `@tool`: the server registers every function in `TOOLS`, in
this order, and gives each a `DocumentService` as its first argument.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

from monkey_cli.mcp.service import DocumentService
from monkey_cli.output import Record

TOOLS: list[Callable[..., list[Record]]] = []


def tool(function: Callable[..., list[Record]]) -> Callable[..., list[Record]]:
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


def describe(function: Callable[..., Any]) -> str:
    """A tool's description: its docstring on one paragraph."""
    return " ".join((function.__doc__ or "").split())

"""Grounded reading: TextMonkey's text positions, from its answers to boxes on the page and to files.

    parse      the model's `<ref>TEXT</ref><box>(x1,y1),(x2,y2)</box>` syntax -> texts and frame boxes
    geometry   the 0..1000 frame -> page pixels and PDF points (`Span`, `PageGeometry`)
    hocr       records with spans -> an hOCR document (the format OCR tools and viewers read)
    pdf        the original pages with an invisible text layer at the spotted positions (a searchable PDF)
    overlay    a page image with each text's box drawn and labelled, for a person to check

Light at import (no torch, no PyMuPDF); the writers import what they need when called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from monkey_cli.grounding.geometry import PageGeometry, Span, to_page
from monkey_cli.grounding.parse import FRAME, FrameSpan, GroundedText, parse_grounded

__all__ = [
    "FRAME",
    "FrameSpan",
    "Grounded",
    "GroundedText",
    "PageGeometry",
    "Span",
    "ground_record",
    "parse_grounded",
    "record_spans",
    "to_page",
]


@dataclass
class Grounded:
    """A grounded answer about one page: `text` (text spotting: one text per line; otherwise the answer without
    its markup), `spans` on the page (`geometry` gives its size), `warnings` about what could not be read, and
    `raw`, the answer as the model wrote it (grounding tags kept)."""

    text: str
    spans: list[Span]
    geometry: PageGeometry
    warnings: list[str] = field(default_factory=list)
    raw: str = ""

    @classmethod
    def of(cls, raw: str, page: Any, *, lines: bool = False, unnamed: str | None = None) -> Grounded:
        """From `raw` about `page` (a `documents.Page`); `lines`: text spotting's one-text-per-line answer."""
        grounded = parse_grounded(raw, unnamed)
        geometry = PageGeometry.of(page)
        number = page.page if page.page is not None else 1
        spans = [to_page(span, geometry, number) for span in grounded.spans]
        return cls(grounded.lines() if lines else grounded.text, spans, geometry, grounded.warnings, raw)


def ground_record(record: Any, raw: str, page: Any) -> None:
    """Fill an answer record's `spans` and `page_size` from `raw` (the answer decoded with its grounding tags)
    about `page` (a `documents.Page`): text spotting answers with one text per line, a grounded answer with its
    text; what could not be read becomes a warning on the record, never an error."""
    grounded = Grounded.of(raw, page, lines=record.task == "spot")
    record.answer = grounded.text
    record.spans = [span.to_dict() for span in grounded.spans]
    record.page_size = grounded.geometry.to_dict()
    record.warnings = [*record.warnings, *grounded.warnings]


def record_spans(record: Any) -> tuple[PageGeometry | None, list[Span]]:
    """A record's page size and spans as objects (none for a record without positions)."""
    if getattr(record, "page_size", None) is None:
        return None, []
    return PageGeometry.from_dict(record.page_size), [Span.from_dict(span) for span in record.spans or ()]

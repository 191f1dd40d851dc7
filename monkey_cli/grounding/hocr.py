"""Records with text positions -> hOCR 1.2 (XHTML), the format OCR tools and viewers read.

One `ocr_page` per page record (its `bbox` the page in pixels, `image` the source, `ppageno` 0-based), one
`ocr_line` per spotted text (its box from the model), one `ocrx_word` per word (boxes estimated from the line's
box, see `geometry.word_boxes`). Coordinates are the page's pixels (`Page.original_size`). Text and attributes are
XML-escaped; characters XML cannot hold (control characters) are dropped. Every page of the records goes in, in
order; a page without positions (an error record, say) is an `ocr_page` without lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from monkey_cli import __version__
from monkey_cli.grounding import record_spans
from monkey_cli.grounding.geometry import text_box, word_boxes

HOCR_CAPABILITIES = "ocr_page ocr_line ocrx_word"
# Characters XML 1.0 cannot carry at all (C0 controls but tab, newline, carriage return; lone surrogates).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def render_hocr(records: Sequence[Any], title: str | None = None) -> str:
    """An hOCR document for `records` (`output.Record`s; those without spans give empty pages), titled `title`
    (default: the document's name when there is one document, else "monkey-cli")."""
    if title is None:
        sources = {record.source for record in records}
        title = sources.pop() if len(sources) == 1 else "monkey-cli"
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN" '
        '"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">',
        '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">',
        "<head>",
        f"<title>{_text(title)}</title>",
        '<meta http-equiv="Content-Type" content="text/html; charset=utf-8" />',
        f'<meta name="ocr-system" content="monkey-cli {_text(__version__)} (TextMonkey)" />',
        f'<meta name="ocr-capabilities" content="{HOCR_CAPABILITIES}" />',
        "</head>",
        "<body>",
    ]
    for number, record in enumerate(_page_records(records), start=1):
        lines += _page(number, record)
    lines += ["</body>", "</html>", ""]
    return "\n".join(lines)


def _page_records(records: Iterable[Any]) -> list[Any]:
    """One record per (source, page): the first with positions, else the first."""
    chosen: dict[tuple[str, Any], Any] = {}
    for record in records:
        key = (record.source, record.page)
        if key not in chosen or (not chosen[key].spans and getattr(record, "spans", None)):
            chosen[key] = record
    return list(chosen.values())


def _page(number: int, record: Any) -> list[str]:
    geometry, spans = record_spans(record)
    page_index = (record.page or 1) - 1
    if geometry is None:
        title = f"image {_title_string(record.source)}; ppageno {page_index}"
        return [f'<div class="ocr_page" id="page_{number}" title={quoteattr(title)}>', "</div>"]
    width, height = geometry.pixels
    title = f"image {_title_string(record.source)}; bbox 0 0 {width} {height}; ppageno {page_index}"
    lines = [f'<div class="ocr_page" id="page_{number}" title={quoteattr(title)}>']
    for line_number, span in enumerate(spans, start=1):
        box = text_box(span.bbox, span.text, height)
        words = word_boxes(span.text, box)
        if not words:
            continue
        line_id = f"line_{number}_{line_number}"
        lines.append(f'<span class="ocr_line" id="{line_id}" title="bbox {_bbox(box, width, height)}">')
        for word_number, (word, word_box) in enumerate(words, start=1):
            word_id = f"word_{number}_{line_number}_{word_number}"
            lines.append(
                f'<span class="ocrx_word" id="{word_id}" title="bbox {_bbox(word_box, width, height)}">'
                f"{_text(word)}</span>"
            )
        lines.append("</span>")
    lines.append("</div>")
    return lines


def _bbox(box: tuple[float, ...], width: int, height: int) -> str:
    """Integer hOCR bbox inside the page: x0 y0 x1 y1 with x0 <= x1, y0 <= y1."""
    x0, y0, x1, y1 = box
    left, top = min(max(int(x0), 0), width), min(max(int(y0), 0), height)
    right, bottom = min(max(round(x1), left), width), min(max(round(y1), top), height)
    return f"{left} {top} {right} {bottom}"


def _text(text: str) -> str:
    return escape(_NOT_XML.sub("", text))


def _title_string(text: str) -> str:
    """A double-quoted string inside an hOCR title property (backslash and quote escaped)."""
    cleaned = _NOT_XML.sub("", text).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{cleaned}"'

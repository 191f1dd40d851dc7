"""A searchable PDF: the original pages with an invisible text layer at the spotted positions (as OCRmyPDF makes).

A PDF input keeps its pages as they are (vectors, fonts, images: copied, not re-rendered); an image input becomes
one page per image (frame), the picture filling a page of its size in points (its stored resolution, 72 dpi
when it has none). Only the pages the records cover go in, in their order. Each spotted text is written as one
line in render mode 3 (invisible: selectable, searchable and extractable, never drawn) in its box; the font size
makes the line fit its box, so a viewer's selection matches the page. Latin-1 text uses the
built-in Helvetica, anything else the built-in Droid Sans Fallback (CJK, Cyrillic, Greek, the euro sign, ...);
scripts neither covers (Hebrew, Arabic, Devanagari) are missing from the text layer (they stay in the records
and the hOCR). Rotated PDF pages get their text turned with them, so it reads in the displayed orientation.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from monkey_cli.errors import DocumentError
from monkey_cli.grounding import record_spans
from monkey_cli.grounding.geometry import text_box

LATIN_FONT = "helv"
FALLBACK_FONT = "china-s"  # PyMuPDF's built-in Droid Sans Fallback: wide Unicode coverage
JPEG_QUALITY = 92


def searchable_pdf(records: Sequence[Any], source: Any, password: str | None = None) -> bytes:
    """The PDF bytes for one document's `records` (`output.Record`s of one source) and its `documents.Source`.

    Raises DocumentError when the document cannot be opened again (it changed since it was read, say)."""
    import pymupdf

    from monkey_cli.documents import DEFAULT_MAX_PIXELS, DEFAULT_PDF_DPI, open_document
    from monkey_cli.documents.records import Options

    numbers = _page_numbers(records)
    document = open_document(source, Options(None, password, DEFAULT_MAX_PIXELS, DEFAULT_PDF_DPI))
    output = pymupdf.open()
    try:
        original = _original_pdf(pymupdf, source, password) if document.kind == "pdf" else None
        for number in numbers:
            if original is not None:
                output.insert_pdf(original, from_page=number - 1, to_page=number - 1)
            else:
                _add_image_page(output, document.page(number))
        for record in records:
            geometry, spans = record_spans(record)
            if geometry is None or (record.page or 1) not in numbers:
                continue
            page = output[numbers.index(record.page or 1)]
            for span in spans:
                _add_text(pymupdf, page, span.text, text_box(span.points, span.text, geometry.points[1]))
        return output.tobytes(garbage=3, deflate=True)
    except (RuntimeError, ValueError) as exc:  # MuPDF's own errors
        raise DocumentError(f"cannot write the searchable PDF ({exc})") from None
    finally:
        output.close()
        document.close()


def _original_pdf(pymupdf: Any, source: Any, password: str | None) -> Any:
    """The source PDF opened here, for its pages to be copied as they are (`insert_pdf` copies objects and draws
    nothing, so the render budget that guards drawing in the renderer process is not needed for it). Opened
    through the descriptor `open_regular` checked, never through a path that could be swapped meanwhile."""
    from monkey_cli.documents.inputs import open_regular

    if source.path is None:
        original = pymupdf.open(stream=source.data, filetype="pdf")
    else:
        with open_regular(source.path) as checked:
            original = pymupdf.open(stream=checked.read(), filetype="pdf")
    if original.needs_pass and not original.authenticate(password or ""):
        original.close()
        raise DocumentError("cannot write the searchable PDF: the PDF's password is needed (--password)")
    return original


def _page_numbers(records: Sequence[Any]) -> list[int]:
    """The pages of the answered records, in order (a page that failed to render is left out)."""
    numbers: list[int] = []
    for record in records:
        if getattr(record, "error", None) is not None:
            continue
        number = record.page or 1
        if number not in numbers:
            numbers.append(number)
    return numbers


def _add_image_page(output: Any, page: Any) -> None:
    """A new page the image's size in points, the image filling it."""
    from monkey_cli.grounding.geometry import PageGeometry

    width, height = PageGeometry.of(page).points
    new = output.new_page(width=width, height=height)
    buffer = io.BytesIO()
    if page.kind == "jpeg":
        page.image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        page.image.save(buffer, format="PNG", compress_level=6)
    new.insert_image(new.rect, stream=buffer.getvalue())


def _add_text(pymupdf: Any, page: Any, text: str, box: tuple[float, ...]) -> None:
    """`text`, invisible, as one line in `box` (displayed page coordinates, points): the font size makes its line
    box (ascender to descender, what viewers select and extractors report) as tall as the box, or smaller where
    the text would overrun the box's width; extractors then find its words along the line, inside the box."""
    line = " ".join(text.split())
    if not line:
        return
    x0, y0, x1, y1 = box
    font = LATIN_FONT if _latin(line) else FALLBACK_FONT
    ascender, descender = _metrics(pymupdf, font)
    length = pymupdf.get_text_length(line, fontname=font, fontsize=1) or 1.0
    size = max(min((y1 - y0) / (ascender - descender), (x1 - x0) / length), 0.5)
    baseline = (y0 + y1) / 2 + (ascender + descender) / 2 * size  # the line box centred on the box's middle
    origin = pymupdf.Point(x0, baseline) * page.derotation_matrix
    page.insert_text(origin, line, fontname=font, fontsize=size, render_mode=3, rotate=page.rotation)


_METRICS: dict[str, tuple[float, float]] = {}


def _metrics(pymupdf: Any, font: str) -> tuple[float, float]:
    """(ascender, descender) of a built-in font, per point of size (descender negative)."""
    if font not in _METRICS:
        loaded = pymupdf.Font(font)
        _METRICS[font] = (loaded.ascender, loaded.descender)
    return _METRICS[font]


def _latin(text: str) -> bool:
    """Whether the built-in Helvetica as PyMuPDF writes it (Latin-1) holds every character (not the euro sign)."""
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True

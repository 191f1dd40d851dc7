"""Overlay files: one PNG per page with positions, written into an output folder (`--overlay DIR`).

    DIR/<document's path relative to the inputs' common folder>/page-001-spots.png

Pages are drawn at their own pixels (the document is opened again, at `size=None`), written through
`monkey_cli.output_folder` (nothing outside DIR, no file monkey did not write replaced, each file whole).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from monkey_cli.errors import DocumentError
from monkey_cli.grounding import record_spans
from monkey_cli.grounding.overlay import draw_overlay


def overlay_name(page: int, pages: int | None) -> str:
    """`page-001-spots.png` (as many digits as the page count needs, at least 3)."""
    return f"page-{page:0{max(3, len(str(pages or 1)))}d}-spots.png"


def write_overlays(
    folder: Any, directory: PurePosixPath, source: Any, records: Sequence[Any], password: str | None = None
) -> list[Path]:
    """Draw and write the overlay of every page of `records` that has positions; the files written."""
    from monkey_cli.documents import DEFAULT_MAX_PIXELS, DEFAULT_PDF_DPI, open_document
    from monkey_cli.documents.records import Options

    by_page: dict[int, list[Any]] = {}
    for record in records:
        _, spans = record_spans(record)
        if spans:
            by_page.setdefault(record.page or 1, []).extend(spans)
    if not by_page:
        return []
    document = open_document(source, Options(None, password, DEFAULT_MAX_PIXELS, DEFAULT_PDF_DPI))
    files = []
    try:
        for number, spans in by_page.items():
            page = document.page(number)
            image = draw_overlay(page.image, spans)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", compress_level=6)
            files.append((directory / overlay_name(number, page.pages), buffer.getvalue()))
    except (OSError, ValueError) as exc:
        raise DocumentError(f"cannot draw the overlay ({exc})") from None
    finally:
        document.close()
    return folder.write_files(files, {str(relative): {"overlay": True} for relative, _ in files})

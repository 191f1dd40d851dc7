"""PDF documents: opened with PyMuPDF, each page rendered straight to the model's input size."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from monkey_cli.documents.inputs import open_regular
from monkey_cli.documents.records import Options, Page, Source, merge_warnings
from monkey_cli.documents.textlayer import read_text_layer
from monkey_cli.errors import DocumentError

_OWN_DESCRIPTORS = "/proc/self/fd"


def _import_pymupdf() -> Any:
    try:
        import pymupdf
    except ImportError:  # PyMuPDF < 1.24.3 only has the old name
        import fitz as pymupdf  # type: ignore[no-redef]
    # MuPDF prints repair notes and errors to stderr by default in some versions: collect them instead.
    pymupdf.TOOLS.mupdf_display_errors(False)
    pymupdf.TOOLS.mupdf_display_warnings(False)
    return pymupdf


def _take_mupdf_warnings(pymupdf: Any) -> list[str]:
    """MuPDF's messages since the last call (a process-wide buffer; documents are opened one at a time)."""
    text = pymupdf.TOOLS.mupdf_warnings(reset=True)
    return [line.strip() for line in text.splitlines() if line.strip()]


class PdfDocument:
    kind = "pdf"

    def __init__(self, source: Source, sha256: str, options: Options) -> None:
        self.pymupdf = pymupdf = _import_pymupdf()
        self.source, self.sha256, self.options = source, sha256, options
        self.warnings: list[str] = []
        _take_mupdf_warnings(pymupdf)
        try:
            if source.data is None:
                self.doc = _open_file(pymupdf, source.path)
            else:
                self.doc = pymupdf.open(stream=source.data, filetype="pdf")
        except (OSError, DocumentError):  # the file itself could not be read: not a damaged PDF
            raise
        except Exception as exc:  # MuPDF raises FileDataError/RuntimeError/ValueError for unreadable files
            notes = _take_mupdf_warnings(pymupdf)
            cause = f" ({notes[0]})" if notes else ""
            raise DocumentError(f"cannot open PDF: damaged beyond repair{cause}") from exc
        merge_warnings(self.warnings, _take_mupdf_warnings(pymupdf))
        try:
            self._unlock(options.password)
            if self.doc.page_count < 1:
                raise DocumentError("PDF has no pages")
            self.page_count: int = self.doc.page_count
        except BaseException:
            self.doc.close()
            raise
        if getattr(self.doc, "is_repaired", False) and not any("repair" in line for line in self.warnings):
            self.warnings.insert(0, "damaged file repaired by MuPDF")

    def _unlock(self, password: str | None) -> None:
        if not self.doc.needs_pass:
            return
        if password is None:
            raise DocumentError("PDF is encrypted: give its password (--password)")
        if not self.doc.authenticate(password):
            raise DocumentError("wrong password for this encrypted PDF")

    def page(self, number: int) -> Page:
        from PIL import Image

        pymupdf, options = self.pymupdf, self.options
        _take_mupdf_warnings(pymupdf)
        page = self.doc.load_page(number - 1)
        rect = page.rect  # after the page's /Rotate, so width and height are as displayed
        if rect.width <= 0 or rect.height <= 0:
            raise DocumentError(f"page has no area ({rect.width:g} x {rect.height:g} pt)")
        native = (_at_dpi(rect.width, options.pdf_dpi), _at_dpi(rect.height, options.pdf_dpi))
        if options.size is None:
            if native[0] * native[1] > options.max_pixels:
                raise DocumentError(
                    f"page is {rect.width:g} x {rect.height:g} pt, {native[0]}x{native[1]} pixels at "
                    f"{options.pdf_dpi:g} dpi, over the limit of {options.max_pixels:,} pixels"
                )
            target = native
        else:
            target = (options.size[1], options.size[0])
        # Render straight to the target pixels (separate x and y scales): no second resampling step.
        matrix = pymupdf.Matrix(target[0] / rect.width, target[1] / rect.height)
        pixmap = page.get_pixmap(matrix=matrix, alpha=False, colorspace=pymupdf.csRGB)
        size = (pixmap.width, pixmap.height)
        image = Image.frombytes("RGB", size, pixmap.samples, "raw", "RGB", pixmap.stride)
        del pixmap
        if image.size != target:  # MuPDF rounds the page box outward; guard against an off-by-one pixel
            image = image.resize(target, Image.Resampling.BICUBIC)
        layer = read_text_layer(page) if options.text_layer else None
        page_warnings = list(self.warnings)
        merge_warnings(page_warnings, _take_mupdf_warnings(pymupdf))
        if layer is not None and layer.problem is not None:
            page_warnings.append(layer.problem)
        return Page(
            source=self.source.name,
            page=number,
            pages=self.page_count,
            image=image,
            kind="pdf",
            original_size=native,
            dpi=(round(72 * target[0] / rect.width, 3), round(72 * target[1] / rect.height, 3)),
            points=(round(rect.width, 3), round(rect.height, 3)),
            text=layer.markdown if layer is not None and layer.problem is None else None,
            warnings=tuple(page_warnings),
            sha256=self.sha256,
            path=self.source.path,
        )

    def close(self) -> None:
        self.doc.close()


def _at_dpi(points: float, dpi: float) -> int:
    return max(1, round(points * dpi / 72))


def _open_file(pymupdf: Any, path: Path | None) -> Any:
    """Open the regular file at `path` with MuPDF, through the descriptor checked by `open_regular` where the
    system allows (/proc/self/fd/N): a file swapped for a FIFO or a device after the check is never opened."""
    assert path is not None
    with open_regular(path) as checked:
        if os.path.isdir(_OWN_DESCRIPTORS):
            return pymupdf.open(f"{_OWN_DESCRIPTORS}/{checked.fileno()}", filetype="pdf")
    return pymupdf.open(path, filetype="pdf")

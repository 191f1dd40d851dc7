"""The renderer process (see `renderer`): MuPDF opens documents and renders pages here, never in monkey itself.

It reads requests from its socket and answers each: `open` (a file by path, or bytes sent along), `page`
(render one page straight to the target pixels, with its text layer and MuPDF's notes), `close`. It is
killed by its parent when a page takes longer than the budget, and ends with its parent.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

from monkey_cli.documents.inputs import open_regular
from monkey_cli.documents.records import merge_warnings
from monkey_cli.documents.renderer import receive_message, send_message
from monkey_cli.documents.textlayer import read_text_layer
from monkey_cli.errors import DocumentError

_OWN_DESCRIPTORS = "/proc/self/fd"
_MAX_OPEN = 64  # documents kept open at once; a parent that forgot to close some cannot fill the memory


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
    """MuPDF's messages since the last call (a process-wide buffer; one request at a time)."""
    text = pymupdf.TOOLS.mupdf_warnings(reset=True)
    return [line.strip() for line in text.splitlines() if line.strip()]


class MuPdf:
    """One open PDF: what `pdf.PdfDocument` asks of it."""

    def __init__(self, pymupdf: Any, path: str | None, data: bytes | None, password: str | None) -> None:
        self.pymupdf = pymupdf
        self.warnings: list[str] = []
        _take_mupdf_warnings(pymupdf)
        try:
            if path is not None:
                self.doc = _open_file(pymupdf, Path(path))
            else:
                self.doc = pymupdf.open(stream=data, filetype="pdf")
        except (OSError, DocumentError):  # the file itself could not be read: not a damaged PDF
            raise
        except Exception as exc:  # MuPDF raises FileDataError/RuntimeError/ValueError for unreadable files
            notes = _take_mupdf_warnings(pymupdf)
            cause = f" ({notes[0]})" if notes else ""
            raise DocumentError(f"cannot open PDF: damaged beyond repair{cause}") from exc
        merge_warnings(self.warnings, _take_mupdf_warnings(pymupdf))
        try:
            self._unlock(password)
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

    def page(
        self, number: int, size: list[int] | None, max_pixels: int, pdf_dpi: float, text_layer: bool
    ) -> tuple[dict, bytes]:
        """Page `number` rendered to `size` (height, width), or at `pdf_dpi` when None: its header and pixels.
        With `text_layer`, the header's `text` is the page's text layer as Markdown (None when it was set aside:
        the reason joins the warnings; see `textlayer`), else None."""
        pymupdf = self.pymupdf
        _take_mupdf_warnings(pymupdf)
        page = self.doc.load_page(number - 1)
        rect = page.rect  # after the page's /Rotate, so width and height are as displayed
        if rect.width <= 0 or rect.height <= 0:
            raise DocumentError(f"page has no area ({rect.width:g} x {rect.height:g} pt)")
        native = (_at_dpi(rect.width, pdf_dpi), _at_dpi(rect.height, pdf_dpi))
        if size is None:
            if native[0] * native[1] > max_pixels:
                raise DocumentError(
                    f"page is {rect.width:g} x {rect.height:g} pt, {native[0]}x{native[1]} pixels at "
                    f"{pdf_dpi:g} dpi, over the limit of {max_pixels:,} pixels"
                )
            target = native
        else:
            target = (size[1], size[0])
        # Render straight to the target pixels (separate x and y scales): no second resampling step.
        matrix = pymupdf.Matrix(target[0] / rect.width, target[1] / rect.height)
        pixmap = page.get_pixmap(matrix=matrix, alpha=False, colorspace=pymupdf.csRGB)
        samples = bytes(pixmap.samples)
        header = {
            "width": pixmap.width,
            "height": pixmap.height,
            "stride": pixmap.stride,
            "target": list(target),
            "native": list(native),
            "points": [rect.width, rect.height],
        }
        del pixmap
        layer = read_text_layer(page) if text_layer else None
        header["text"] = layer.markdown if layer is not None and layer.problem is None else None
        page_warnings = list(self.warnings)
        merge_warnings(page_warnings, _take_mupdf_warnings(pymupdf))
        if layer is not None and layer.problem is not None:
            page_warnings.append(layer.problem)
        header["warnings"] = page_warnings
        return header, samples

    def close(self) -> None:
        self.doc.close()


def _at_dpi(points: float, dpi: float) -> int:
    return max(1, round(points * dpi / 72))


def _open_file(pymupdf: Any, path: Path) -> Any:
    """Open the regular file at `path` with MuPDF, through the descriptor checked by `open_regular` where the
    system allows (/proc/self/fd/N): a file swapped for a FIFO or a device after the check is never opened."""
    with open_regular(path) as checked:
        if os.path.isdir(_OWN_DESCRIPTORS):
            return pymupdf.open(f"{_OWN_DESCRIPTORS}/{checked.fileno()}", filetype="pdf")
    return pymupdf.open(path, filetype="pdf")


# --- the loop -----------------------------------------------------------------------------------------------


def main(fd: int, parent: int) -> None:
    """Serve requests on the socket `fd` until it closes; `parent` is the pid that started this process."""
    _end_with(parent)
    sock = socket.socket(fileno=fd)
    pymupdf = _import_pymupdf()
    documents: OrderedDict[int, MuPdf] = OrderedDict()
    while True:
        try:
            message = receive_message(sock)
        except (OSError, ValueError):
            message = None
        if message is None:
            os._exit(0)
        header, payload = message
        op = header.get("op")
        if op == "close":
            document = documents.pop(header.get("doc"), None)
            if document is not None:
                document.close()
            continue
        try:
            answer, pixels = _answer(pymupdf, documents, op, header, payload)
        except DocumentError as exc:
            answer, pixels = {"ok": False, "kind": "document", "error": str(exc)}, b""
        except MemoryError:
            answer, pixels = {"ok": False, "kind": "memory", "error": "out of memory"}, b""
        except OSError as exc:
            answer, pixels = {"ok": False, "kind": "os", "error": exc.strerror or _one_line(exc)}, b""
        except Exception as exc:  # hostile bytes can make MuPDF raise anything
            answer, pixels = {"ok": False, "kind": "other", "error": _one_line(exc)}, b""
        try:
            send_message(sock, answer, pixels)
        except OSError:
            os._exit(0)


def _answer(pymupdf: Any, documents: OrderedDict[int, MuPdf], op: Any, header: dict, payload: bytes) -> tuple:
    if op == "ping":
        return {"ok": True}, b""
    if op == "open":
        data = payload if header.get("path") is None else None
        document = MuPdf(pymupdf, header.get("path"), data, header.get("password"))
        documents[header["doc"]] = document
        while len(documents) > _MAX_OPEN:
            documents.popitem(last=False)[1].close()
        return {"ok": True, "page_count": document.page_count, "warnings": document.warnings}, b""
    if op == "page":
        document = documents.get(header.get("doc"))
        if document is None:
            return {"ok": False, "kind": "closed", "error": "document not open"}, b""
        page, pixels = document.page(
            int(header["number"]), header.get("size"), header["max_pixels"], header["pdf_dpi"],
            bool(header.get("text_layer", True)),
        )  # fmt: skip
        return {"ok": True, **page}, pixels
    return {"ok": False, "kind": "other", "error": f"unknown request {op!r}"}, b""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _end_with(parent: int) -> None:
    """Ignore the terminal's signals (the parent decides) and die with the parent (Linux: PR_SET_PDEATHSIG)."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for name in ("SIGINT", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent ended before the line above: nobody is there to serve
        os._exit(0)

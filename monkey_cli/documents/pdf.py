"""PDF documents: opened and rendered by MuPDF in the renderer process (`renderer`), each page straight to the
model's input size, within the render budget."""

from __future__ import annotations

import os
from typing import Any

from monkey_cli.documents.records import Options, Page, Source
from monkey_cli.documents.renderer import Renderer, RenderTimeout, renderer
from monkey_cli.errors import DocumentError


class PdfDocument:
    """A PDF open in the renderer: `page_count`, `warnings` (MuPDF's notes on opening it), `page(n)`, `close()`.

    A page over the budget raises RenderTimeout (the renderer is then restarted, and this document is opened
    again in the new one for its next page)."""

    kind = "pdf"

    def __init__(self, source: Source, sha256: str, options: Options) -> None:
        self.source, self.sha256, self.options = source, sha256, options
        self._renderer: Renderer = renderer()
        self._id = self._renderer.new_id()
        self._generation = -1
        self.warnings: list[str] = []
        try:
            answer = self._open()
        except RenderTimeout as exc:
            raise RenderTimeout(f"opening it {exc}") from None
        self.page_count: int = int(answer["page_count"])
        self.warnings = [str(line) for line in answer.get("warnings", [])]

    def _open(self) -> dict[str, Any]:
        source = self.source
        path = None if source.path is None else _for_the_renderer(source.path)
        header = {"op": "open", "doc": self._id, "path": path, "password": self.options.password}
        payload = source.data if source.path is None and source.data is not None else b""
        answer, _ = self._renderer.request(header, payload, self.options.render_timeout)
        self._generation = self._renderer.generation
        _raise_failure(answer, "cannot open")
        return answer

    def page(self, number: int) -> Page:
        from PIL import Image

        options = self.options
        if self._generation != self._renderer.generation:  # the renderer was restarted since: open it again
            self._open()
        header = {"op": "page", "doc": self._id, "number": number,
                  "size": None if options.size is None else list(options.size),
                  "max_pixels": options.max_pixels, "pdf_dpi": options.pdf_dpi,
                  "text_layer": options.text_layer}  # fmt: skip
        try:
            answer, pixels = self._renderer.request(header, b"", options.render_timeout)
            if answer.get("kind") == "closed":  # the renderer let it go (too many open at once): open it again
                self._open()
                answer, pixels = self._renderer.request(header, b"", options.render_timeout)
        except RenderTimeout as exc:
            raise RenderTimeout(f"rendering {exc}") from None
        _raise_failure(answer, "cannot render")
        size, target = (answer["width"], answer["height"]), tuple(answer["target"])
        image = Image.frombytes("RGB", size, pixels, "raw", "RGB", answer["stride"])
        if image.size != target:  # MuPDF rounds the page box outward; guard against an off-by-one pixel
            image = image.resize(target, Image.Resampling.BICUBIC)
        width, height = answer["points"]
        return Page(
            source=self.source.name,
            page=number,
            pages=self.page_count,
            image=image,
            kind="pdf",
            original_size=tuple(answer["native"]),
            dpi=(round(72 * target[0] / width, 3), round(72 * target[1] / height, 3)),
            points=(round(width, 3), round(height, 3)),
            text=answer["text"],
            warnings=tuple(answer["warnings"]),
            sha256=self.sha256,
            path=self.source.path,
        )

    def close(self) -> None:
        if self._generation == self._renderer.generation:
            self._renderer.send({"op": "close", "doc": self._id})


def _for_the_renderer(path: os.PathLike[str] | str) -> str:
    """`path` as the renderer process must name it: absolute (it has its own working folder), and a descriptor
    of this process (`/proc/self/fd/N`, what callers that checked a file pass, e.g. the MCP server) named by
    this process's id, since the renderer's own /proc/self is another process."""
    absolute = os.path.abspath(path)
    own = "/proc/self/fd/"
    if absolute.startswith(own):
        return f"/proc/{os.getpid()}/fd/{absolute[len(own):]}"
    return absolute


def _raise_failure(answer: dict[str, Any], doing: str) -> None:
    """The renderer's error as the exception the page flow expects (DocumentError: permanent for the bytes;
    OSError and MemoryError: of the moment)."""
    if answer.get("ok"):
        return
    kind, message = answer.get("kind"), str(answer.get("error", "unknown error"))
    if kind == "os":
        raise OSError(message)
    if kind == "memory":
        raise MemoryError
    if kind == "document":
        raise DocumentError(message)
    raise DocumentError(f"{doing}: {message}")

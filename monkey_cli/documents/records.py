"""The records documents turn into, and the arguments that select them (`--pages`, `--size`)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from monkey_cli.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

# The released checkpoints take 896x896 images (config "visual.image_size"); sizes are (height, width).
DEFAULT_SIZE: tuple[int, int] = (896, 896)
# Pillow's own hard guard is 2 x Image.MAX_IMAGE_PIXELS (about 179 MP) and still applies to images; this
# default matches it so that both guards agree. PDFs are checked against it when rendered at native size.
DEFAULT_MAX_PIXELS = 2 * 89_478_485
# Decoded images may hold at most as many bytes as the largest image allowed at 3 bytes (RGB) per pixel:
# an RGBA or 16-bit image is refused at fewer pixels than an RGB one (`image_bytes` counts them).
BYTES_PER_ALLOWED_PIXEL = 3
# Resolution of PDF pages when `size=None` asks for native pixels (and for `Page.original_size`).
DEFAULT_PDF_DPI = 144.0
STDIN_NAME = "<stdin>"
_MAX_WARNINGS = 20  # per document: a badly damaged PDF can produce thousands of identical lines


@dataclass(frozen=True)
class Source:
    """One input document: a path, or bytes read from standard input, or an input that resolved to nothing.

    `name` is what records and messages show: the path as the user spelled it (joined with the path found
    under a folder), or `<stdin>`. `data` holds the bytes of a stream read once (standard input, a process
    substitution such as `<(curl ...)`); `path` is then None. `error` is set when the input could not be
    resolved (missing path, glob matching nothing, a FIFO named explicitly); such a source yields one
    `PageError` and no pages.
    """

    name: str
    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)
    error: str | None = None


@dataclass(frozen=True, eq=False)
class Page:
    """One page as the model will see it.

    Sizes on the record are in Pillow's (width, height) order; `size=` arguments are (height, width).
    `original_size` is the source image in pixels after EXIF orientation, or for a PDF the page at
    `DEFAULT_PDF_DPI` (the pixels `size=None` gives); `points` is a PDF page's size in points. `dpi` is the
    image's stored resolution (None when it has none) or, for a PDF, the resolution `image` was rendered at.
    `text` is a PDF page's text layer as Markdown (`documents.textlayer`; "" for a page without text): None
    for images, for a page whose text layer was set aside as not its real text (the reason is among
    `warnings`), and when `iter_pages` was told not to read text layers; `sha256` hashes the whole file.
    """

    source: str
    page: int
    pages: int
    image: Image.Image = field(repr=False)
    kind: str
    original_size: tuple[int, int]
    dpi: tuple[float, float] | None = None
    points: tuple[float, float] | None = None
    text: str | None = field(default=None, repr=False)
    warnings: tuple[str, ...] = ()
    sha256: str = ""
    path: Path | None = None

    @property
    def has_text_layer(self) -> bool:
        """True when the page carries real text (a born-digital PDF, or a scan with a usable OCR layer)."""
        return bool(self.text and self.text.strip())

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of `image`."""
        return self.image.size


@dataclass(frozen=True)
class PageError:
    """A document or page that could not be turned into a page; `page` is None when the whole file failed."""

    source: str
    page: int | None
    message: str
    pages: int | None = None
    path: Path | None = None
    # False when the same bytes with the same settings always give this error (an unsupported type, a page
    # the document does not have); True for errors of the moment (a read error, memory), worth a retry.
    transient: bool = False

    def __str__(self) -> str:
        where = self.source if self.page is None else f"{self.source}: page {self.page}"
        return f"{where}: {self.message}"


Record = Page | PageError


# ------------------------------------------------------------------------------------ argument parsing


@dataclass(frozen=True)
class PageSelection:
    """A validated `--pages` spec: items (text, first, last), 1-based or negative numbers, last None = end."""

    spec: str
    items: tuple[tuple[str, int, int | None], ...]

    def resolve(self, count: int) -> tuple[list[int], list[str]]:
        """Pages (sorted, unique, 1-based) that exist in a `count`-page document, and the spec items that
        asked for pages it does not have."""
        wanted: set[int] = set()
        missing: list[str] = []
        for text, first, last in self.items:
            start = _absolute(first, count)
            end = count if last is None else _absolute(last, count)
            if start > end:
                missing.append(f"{text} (runs backwards in a {count}-page document)")
                continue
            inside = range(max(start, 1), min(end, count) + 1)
            wanted.update(inside)
            if start < 1 or end > count:
                missing.append(text)
        return sorted(wanted), missing


def _absolute(number: int, count: int) -> int:
    return number if number > 0 else count + 1 + number


def _split_spec(spec: str) -> list[str]:
    return [item.strip() for item in spec.split(",")]


_PAGE_ITEM = re.compile(r"(-?\d+)(?:\s*(-)\s*(-?\d+)?)?")


def parse_pages(spec: str | Sequence[int] | PageSelection | None) -> PageSelection | None:
    """Parse a page selection such as "1-3,7,-1" (1-based; -1 is the last page; "5-" runs to the end).

    Raises UsageError for bad syntax, page 0, or a backwards range of positive numbers. Whether pages exist
    is only known per document: missing ones become a `PageError` for that document.
    """
    if spec is None or isinstance(spec, PageSelection):
        return spec
    if not isinstance(spec, str):
        spec = ",".join(str(int(number)) for number in spec)
    items: list[tuple[str, int, int | None]] = []
    for text in _split_spec(spec):
        match = _PAGE_ITEM.fullmatch(text)
        if not text or match is None:
            raise UsageError(
                f"--pages {spec!r}: cannot read {text!r}; use numbers and ranges like 1-3,7,-1 (-1 is the last page)"
            )
        first = int(match.group(1))
        last = None if match.group(2) and match.group(3) is None else int(match.group(3) or first)
        if first == 0 or last == 0:
            raise UsageError(f"--pages {spec!r}: pages are numbered from 1 (use -1 for the last page)")
        if last is not None and 0 < last < first:
            raise UsageError(f"--pages {spec!r}: range {text!r} runs backwards")
        items.append((text, first, last))
    return PageSelection(spec=spec, items=tuple(items))


def parse_size(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """Parse "896x1344" (height x width) or "896" (square) into (height, width); None means native size."""
    if text is None:
        return None
    if isinstance(text, str):
        match = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", text)
        if match is None:
            raise UsageError(f"size {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 896x896 or 896x1344")
        height = int(match.group(1))
        size = (height, int(match.group(2) or height))
    else:
        size = (int(text[0]), int(text[1]))
    if min(size) < 1:
        raise UsageError(f"size {size[0]}x{size[1]}: height and width must be at least 1 pixel")
    return size


@dataclass(frozen=True)
class Options:
    """How pages are made: validated arguments of `iter_pages`."""

    size: tuple[int, int] | None
    password: str | None
    max_pixels: int
    pdf_dpi: float
    text_layer: bool = True  # read PDF pages' text layers (judged, as Markdown): see documents.textlayer
    # Seconds one PDF page may take to render (or a PDF to open), None for no limit: see `renderer`.
    render_timeout: float | None = field(default_factory=lambda: _default_render_timeout())

    @property
    def max_image_bytes(self) -> int:
        return BYTES_PER_ALLOWED_PIXEL * self.max_pixels


def _default_render_timeout() -> float | None:
    from monkey_cli.documents.renderer import default_render_timeout

    return default_render_timeout()


def one_line(exc: BaseException | str) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def merge_warnings(existing: list[str], new: Iterable[str]) -> None:
    """Add `new` notes to `existing`, each once, at most a screenful per document."""
    for line in new:
        if line in existing:
            continue
        if len(existing) == _MAX_WARNINGS:
            existing.append("(more warnings not shown)")
        if len(existing) <= _MAX_WARNINGS:
            existing.append(line)

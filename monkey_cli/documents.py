"""Documents in: turn whatever a user points at into pages for the model.

Inputs are files, folders (walked recursively in natural order, hidden entries skipped), glob patterns and
`-` (standard input: either the bytes of one document or a list of paths). Each file's type is sniffed from
its first bytes, never from its extension. PDFs are opened with PyMuPDF and rendered one page at a time;
images are opened with Pillow, turned upright (EXIF), flattened onto white and converted to RGB. Every page
comes out at the model's input size (bicubic, aspect not kept, as the model does) unless `size=None`.

Nothing here raises for a bad document: problems travel as `PageError` records next to the `Page` records,
so one damaged file never ends a batch. Only invalid arguments (a bad page range, a bad size, `-` twice)
raise `UsageError`, up front.

    >>> from monkey_cli.documents import iter_pages
    >>> for record in iter_pages(["scans/", "report.pdf"], pages="1-3,-1"):
    ...     print(record)

Heavy imports (Pillow, PyMuPDF) happen on first use, so importing this module is cheap.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import io
import os
import queue
import re
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar

from monkey_cli.errors import DocumentError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_PDF_DPI",
    "DEFAULT_SIZE",
    "Page",
    "PageError",
    "PageSelection",
    "Record",
    "STDIN_NAME",
    "SUPPORTED_TYPES",
    "Source",
    "expand_inputs",
    "iter_pages",
    "load_documents",
    "parse_pages",
    "parse_size",
    "prefetch",
    "sniff_type",
]

# The released checkpoints take 896x896 images (config "visual.image_size"); sizes are (height, width).
DEFAULT_SIZE: tuple[int, int] = (896, 896)
# Pillow's own hard guard is 2 x Image.MAX_IMAGE_PIXELS (about 179 MP) and still applies to images; this
# default matches it so that both guards agree. PDFs are checked against it when rendered at native size.
DEFAULT_MAX_PIXELS = 2 * 89_478_485
# Resolution of PDF pages when `size=None` asks for native pixels (and for `Page.original_size`).
DEFAULT_PDF_DPI = 144.0
STDIN_NAME = "<stdin>"

# Kind (as on `Page.kind`) -> the Pillow formats allowed to open it. Opening with exactly the sniffed
# plugin means a crafted file can never reach one of Pillow's rarer, less hardened decoders.
_PILLOW_FORMATS: dict[str, tuple[str, ...]] = {
    "png": ("PNG",),
    "jpeg": ("JPEG", "MPO"),
    "tiff": ("TIFF",),
    "webp": ("WEBP",),
    "bmp": ("BMP",),
    "gif": ("GIF",),
    "jpeg2000": ("JPEG2000",),
    "avif": ("AVIF",),
    "pnm": ("PPM",),
}
# Pillow features an optional codec needs (a build without them reports the type as unsupported).
_PILLOW_FEATURES = {"webp": "webp", "jpeg2000": "jpg_2000", "avif": "avif"}
SUPPORTED_TYPES: tuple[str, ...] = ("pdf", *_PILLOW_FORMATS)
_TYPE_LABELS = {"pdf": "PDF", "jpeg2000": "JPEG 2000"}
_SUPPORTED_TEXT = ", ".join(_TYPE_LABELS.get(kind, kind.upper()) for kind in SUPPORTED_TYPES)

_HEAD_BYTES = 4096  # enough for every signature below (PDF allows up to 1 KiB of junk before %PDF-)
_HASH_CHUNK = 1 << 20
_MAX_STREAM_BYTES = 1 << 30  # pipes and devices are read into memory: refuse more than 1 GiB
_MAX_WARNINGS = 20  # per document: a badly damaged PDF can produce thousands of identical lines
_GLOB_MAGIC = re.compile(r"[*?[]")
_BMP_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}
_PNM_HEADER = re.compile(rb"P[1-6]\s+(?:#[^\n]*\n\s*)*\d+\s+\d+")
_EXIF_ORIENTATION = 0x0112
# Bytes no list of file names contains (tab, newline and carriage return excepted): binary data, not paths.
_CONTROL_BYTES = re.compile(rb"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f]")


# --------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Source:
    """One input document: a path, or bytes read from standard input, or an input that resolved to nothing.

    `name` is what records and messages show: the path as the user spelled it (joined with the path found
    under a folder), or `<stdin>`. `error` is set when the input could not be resolved (missing path, glob
    matching nothing); such a source yields one `PageError` and no pages.
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
    `text` is a PDF page's text layer (None for images); `sha256` hashes the whole source file.
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
        """True when the page carries real text (a born-digital PDF, or a scan with an OCR layer)."""
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


# ------------------------------------------------------------------------------------- type sniffing


def sniff_type(head: bytes) -> str | None:
    """The document kind ("pdf", "png", ...) from a file's first bytes, or None when it is not supported."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    # "BM" alone would also match a list of paths starting with "BM...": check the DIB header size too.
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "bmp"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "jpeg2000"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "avif"
    if _PNM_HEADER.match(head):
        return "pnm"
    if b"%PDF-" in head[:1024]:
        return "pdf"
    return None


def _describe_unsupported(head: bytes) -> str:
    if not head:
        return "empty file"
    if head.startswith(b"PK\x03\x04"):
        return "unsupported type: ZIP archive (DOCX, XLSX, ODT and EPUB are ZIP files: export them to PDF)"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"hevc", b"mif1", b"msf1"):
        return "unsupported type: HEIC/HEIF image (convert it to JPEG or PNG)"
    if head.startswith(b"%!PS"):
        return "unsupported type: PostScript (convert it to PDF)"
    what = "text" if _looks_like_text(head) else "unrecognised binary data"
    return f"unsupported type: {what} (supported: {_SUPPORTED_TEXT})"


def _looks_like_text(head: bytes) -> bool:
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\t\n\r\f\v" for ch in text)


# ------------------------------------------------------------------------------------ input discovery


def expand_inputs(
    inputs: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
    stdin: bytes | IO[bytes] | IO[str] | None = None,
) -> list[Source]:
    """Resolve files, folders, globs and `-` into sources, in order, each file once.

    Folders are walked recursively in natural order ("page2" before "page10"), skipping hidden files and
    folders; a path that exists is taken literally, otherwise one with *, ? or [ is a glob. `-` reads
    `stdin` (default: the process's standard input): bytes that start like a supported document are that
    document, named `<stdin>`; otherwise they are paths, one per line (or NUL-separated, as `find -print0`
    writes them). Inputs that resolve to nothing become sources with `error` set, not exceptions.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    sources: list[Source] = []
    read_stdin = False
    for raw in inputs:
        text = os.fspath(raw)
        if text == "-":
            if read_stdin:
                raise UsageError("'-' (standard input) can be given only once")
            read_stdin = True
            sources.extend(_expand_stdin(_read_stdin(stdin)))
        else:
            sources.extend(_expand_path(text))
    return _without_duplicates(sources)


def _read_stdin(stdin: bytes | IO[bytes] | IO[str] | None) -> bytes:
    if stdin is None:
        stdin = sys.stdin.buffer
    data = stdin if isinstance(stdin, bytes) else stdin.read()
    return os.fsencode(data) if isinstance(data, str) else data


def _expand_stdin(data: bytes) -> list[Source]:
    head = data[:_HEAD_BYTES]
    if sniff_type(head) is not None:
        return [Source(name=STDIN_NAME, data=data)]
    if _CONTROL_BYTES.search(data.replace(b"\x00", b"")):
        what = _describe_unsupported(head)
        return [Source(name=STDIN_NAME, error=f"standard input is neither a document nor paths ({what})")]
    if b"\x00" in data:  # as `find -print0` writes them: any name, newlines and surrounding spaces included
        names = [os.fsdecode(item) for item in data.split(b"\x00") if item]
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            what = _describe_unsupported(head)
            return [Source(name=STDIN_NAME, error=f"standard input is neither a document nor paths ({what})")]
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        return [Source(name=STDIN_NAME, error="standard input is empty (expected paths or a document)")]
    return [source for name in names for source in _expand_path(name)]


def _expand_path(raw: str) -> list[Source]:
    path = Path(raw)
    if not os.path.lexists(raw) and raw.startswith("~"):
        path = Path(os.path.expanduser(raw))
    if path.is_dir():
        return _walk_folder(path, raw)
    if path.exists():
        return [Source(name=raw, path=path)]
    if os.path.lexists(path):
        return [Source(name=raw, path=path, error="broken symbolic link")]
    if _GLOB_MAGIC.search(raw):
        return _expand_glob(raw)
    return [Source(name=raw, path=path, error="no such file or directory")]


def _expand_glob(pattern: str) -> list[Source]:
    # glob's * and ? do not match names starting with a dot, so hidden entries stay out here too.
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True), key=_natural_key)
    if not matches:
        return [Source(name=pattern, error="no files match this pattern")]
    return [source for match in matches for source in _expand_path(match)]


def _walk_folder(folder: Path, display: str) -> list[Source]:
    found: list[tuple[tuple[Any, ...], str, Path]] = []
    unreadable: list[Source] = []

    def note_error(exc: OSError) -> None:
        name = os.path.join(display, os.path.relpath(exc.filename, folder)) if exc.filename else display
        unreadable.append(Source(name=name, error=f"cannot read folder: {exc.strerror or exc}"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=note_error):
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        for filename in filenames:
            if filename.startswith("."):
                continue
            relative = os.path.relpath(os.path.join(dirpath, filename), folder)
            parts = Path(relative).parts
            found.append((tuple(_natural_key(part) for part in parts), relative, Path(dirpath, filename)))
    found.sort(key=lambda entry: entry[0])
    sources = [Source(name=os.path.join(display, relative), path=path) for _, relative, path in found]
    if not sources and not unreadable:
        return [Source(name=display, path=folder, error="folder has no files (hidden files are skipped)")]
    return sources + unreadable


def _natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that orders digit runs by value ("scan2" < "scan10"), case-insensitively, ties by name."""
    tokens = re.split(r"(\d+)", name)
    return (
        tuple((0, int(token), "") if token.isdigit() else (1, 0, token.casefold()) for token in tokens),
        name,
    )


def _without_duplicates(sources: list[Source]) -> list[Source]:
    seen: set[str] = set()
    unique: list[Source] = []
    for source in sources:
        if source.path is not None and source.error is None:
            key = os.path.realpath(source.path)
            if key in seen:
                continue
            seen.add(key)
        unique.append(source)
    return unique


# ------------------------------------------------------------------------------------------- opening


@dataclass(frozen=True)
class _Options:
    size: tuple[int, int] | None
    password: str | None
    max_pixels: int
    pdf_dpi: float


def _read_source_head(source: Source) -> tuple[bytes, bytes | None]:
    """First bytes of the source, and all its bytes when it is not a regular file (stdin, a pipe)."""
    if source.data is not None:
        return source.data[:_HEAD_BYTES], source.data
    assert source.path is not None
    if not source.path.is_file():  # a pipe such as <(curl ...) can be read only once: keep it in memory
        with open(source.path, "rb") as stream:
            data = stream.read(_MAX_STREAM_BYTES + 1)
        if len(data) > _MAX_STREAM_BYTES:
            raise DocumentError(f"input is larger than {_MAX_STREAM_BYTES >> 30} GiB and not a regular file")
        return data[:_HEAD_BYTES], data
    with open(source.path, "rb") as stream:
        return stream.read(_HEAD_BYTES), None


def _sha256(path: Path | None, data: bytes | None) -> str:
    if data is not None:
        return hashlib.sha256(data).hexdigest()
    assert path is not None
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _open_document(source: Source, options: _Options) -> _PdfDocument | _ImageDocument:
    head, data = _read_source_head(source)
    kind = sniff_type(head)
    if kind is None:
        raise DocumentError(_describe_unsupported(head))
    feature = _PILLOW_FEATURES.get(kind)
    if feature is not None:
        from PIL import features

        if not features.check(feature):
            raise DocumentError(f"unsupported type: this Pillow build cannot read {kind.upper()} images")
    digest = _sha256(source.path, data)
    if kind == "pdf":
        return _PdfDocument(source, data, digest, options)
    return _ImageDocument(source, kind, data, digest, options)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# ------------------------------------------------------------------------------------------------ PDF


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


def _merge_warnings(existing: list[str], new: Iterable[str]) -> None:
    for line in new:
        if line in existing:
            continue
        if len(existing) == _MAX_WARNINGS:
            existing.append("(more warnings not shown)")
        if len(existing) <= _MAX_WARNINGS:
            existing.append(line)


class _PdfDocument:
    kind = "pdf"

    def __init__(self, source: Source, data: bytes | None, sha256: str, options: _Options) -> None:
        self.pymupdf = pymupdf = _import_pymupdf()
        self.source, self.sha256, self.options = source, sha256, options
        self.warnings: list[str] = []
        _take_mupdf_warnings(pymupdf)
        try:
            if data is None:
                self.doc = pymupdf.open(source.path, filetype="pdf")
            else:
                self.doc = pymupdf.open(stream=data, filetype="pdf")
        except Exception as exc:  # MuPDF raises FileDataError/RuntimeError/ValueError for unreadable files
            notes = _take_mupdf_warnings(pymupdf)
            cause = f" ({notes[0]})" if notes else ""
            raise DocumentError(f"cannot open PDF: damaged beyond repair{cause}") from exc
        _merge_warnings(self.warnings, _take_mupdf_warnings(pymupdf))
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
        text = page.get_text("text")
        page_warnings = list(self.warnings)
        _merge_warnings(page_warnings, _take_mupdf_warnings(pymupdf))
        return Page(
            source=self.source.name,
            page=number,
            pages=self.page_count,
            image=image,
            kind="pdf",
            original_size=native,
            dpi=(round(72 * target[0] / rect.width, 3), round(72 * target[1] / rect.height, 3)),
            points=(round(rect.width, 3), round(rect.height, 3)),
            text=text,
            warnings=tuple(page_warnings),
            sha256=self.sha256,
            path=self.source.path,
        )

    def close(self) -> None:
        self.doc.close()


def _at_dpi(points: float, dpi: float) -> int:
    return max(1, round(points * dpi / 72))


# --------------------------------------------------------------------------------------------- images


class _ImageDocument:
    def __init__(self, source: Source, kind: str, data: bytes | None, sha256: str, options: _Options) -> None:
        self.source, self.kind, self.sha256, self.options = source, kind, sha256, options
        self.warnings: list[str] = []
        stream: IO[bytes] = io.BytesIO(data) if data is not None else open(source.path, "rb")  # noqa: SIM115
        self.stream = stream
        try:
            self.image, self.page_count = self._open(stream)
        except BaseException:
            stream.close()
            raise

    def _open(self, stream: IO[bytes]) -> tuple[Image.Image, int]:
        from PIL import Image

        try:
            # Pillow's DecompressionBombWarning is redundant with the explicit limit checked below.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(stream, formats=list(_PILLOW_FORMATS[self.kind]))
        except Image.DecompressionBombError as exc:
            raise DocumentError(f"image refused as a possible decompression bomb: {_one_line(exc)}") from exc
        except Exception as exc:
            raise DocumentError(f"cannot read {self.kind.upper()} image: {_one_line(exc)}") from exc
        try:
            self._check_pixels(image.size)
            # Multi-page TIFFs give every frame; animations (GIF, WEBP, APNG, MPO) give their first frame.
            count = image.n_frames if self.kind == "tiff" else 1
        except DocumentError:
            image.close()
            raise
        except Exception as exc:  # a damaged chain of TIFF directories
            image.close()
            raise DocumentError(f"cannot read {self.kind.upper()} image: {_one_line(exc)}") from exc
        return image, count

    def _check_pixels(self, size: tuple[int, int]) -> None:
        width, height = size
        if width * height > self.options.max_pixels:
            raise DocumentError(
                f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
                f"{self.options.max_pixels:,} (possible decompression bomb)"
            )

    def page(self, number: int) -> Page:
        from PIL import Image

        frame = self.image
        if self.page_count > 1:
            frame.seek(number - 1)
            self._check_pixels(frame.size)
        try:
            frame.load()
        except OSError as exc:
            raise DocumentError(f"image data is truncated or damaged ({_one_line(exc)})") from exc
        page_warnings = list(self.warnings)
        dpi = _image_dpi(frame)
        upright, turned = _exif_upright(frame, page_warnings)
        if turned and dpi is not None:
            dpi = (dpi[1], dpi[0])
        rgb = _to_rgb(upright)
        original_size = rgb.size
        size = self.options.size
        if size is not None and rgb.size != (size[1], size[0]):
            rgb = rgb.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        return Page(
            source=self.source.name,
            page=number,
            pages=self.page_count,
            image=rgb,
            kind=self.kind,
            original_size=original_size,
            dpi=dpi,
            warnings=tuple(page_warnings),
            sha256=self.sha256,
            path=self.source.path,
        )

    def close(self) -> None:
        self.image.close()
        self.stream.close()


def _image_dpi(image: Image.Image) -> tuple[float, float] | None:
    dpi = image.info.get("dpi")
    try:
        x, y = (float(value) for value in dpi)
    except (TypeError, ValueError):
        return None
    return (round(x, 2), round(y, 2)) if x > 0 and y > 0 else None


def _exif_upright(image: Image.Image, notes: list[str]) -> tuple[Image.Image, bool]:
    """The image turned as its EXIF orientation says, and whether width and height swapped."""
    from PIL import ImageOps

    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        upright = ImageOps.exif_transpose(image)
    except Exception as exc:  # a damaged EXIF block should cost the orientation, not the page
        notes.append(f"ignored unreadable EXIF data ({_one_line(exc)})")
        return image, False
    return upright, orientation in (5, 6, 7, 8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels as a viewer would show them: alpha flattened onto white, 16-bit and 1-bit scaled right."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        return _on_white(image) if has_alpha else image
    if mode in ("RGBA", "RGBa", "LA", "La"):
        return _on_white(image.convert("RGBA"))
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if mode.startswith("I;16") or (mode == "I" and image.getextrema()[1] > 255):
        # 16-bit samples: scale 0..65535 to 0..255 (a plain convert("L") would clip everything above 255).
        return image.point(lambda value: value / 257).convert("L").convert("RGB")
    if mode in ("I", "F"):
        return image.convert("L").convert("RGB")
    try:
        return image.convert("RGB")  # "1", "L", "YCbCr", "LAB", "HSV"
    except (ValueError, OSError) as exc:
        raise DocumentError(f"cannot convert {mode} pixels to RGB ({_one_line(exc)})") from exc


def _on_white(rgba: Image.Image) -> Image.Image:
    from PIL import Image

    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """Use the file's ICC profile when it has one (print CMYK is not 255 - C); else Pillow's formula."""
    profile = image.info.get("icc_profile")
    if profile:
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # a broken profile: fall back to the plain conversion below
            pass
    return image.convert("RGB")


# ------------------------------------------------------------------------------------------- pipeline


def iter_pages(
    inputs: Iterable[str | os.PathLike[str] | Source] | str | os.PathLike[str],
    *,
    size: tuple[int, int] | str | None = DEFAULT_SIZE,
    pages: str | Sequence[int] | PageSelection | None = None,
    password: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    pdf_dpi: float = DEFAULT_PDF_DPI,
    stdin: bytes | IO[bytes] | IO[str] | None = None,
) -> Iterator[Page | PageError]:
    """Pages of every input, lazily, one document open at a time and one page rendered at a time.

    `size` is (height, width) or "HxW"; None keeps native pixels (PDFs at `pdf_dpi`). `pages` selects pages
    in every document. Arguments are validated now (UsageError); documents only when iterated, and their
    problems come out as `PageError` records.
    """
    selection = parse_pages(pages)
    if max_pixels < 1:
        raise UsageError(f"max_pixels must be positive, got {max_pixels}")
    if pdf_dpi <= 0:
        raise UsageError(f"pdf_dpi must be positive, got {pdf_dpi}")
    options = _Options(parse_size(size), password, max_pixels, pdf_dpi)
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    items = list(inputs)
    sources: list[Source]
    if all(isinstance(item, Source) for item in items):
        sources = items  # type: ignore[assignment]
    elif any(isinstance(item, Source) for item in items):
        raise UsageError("inputs must be all paths or all Source objects (from expand_inputs), not a mix")
    else:
        sources = expand_inputs(items, stdin)  # type: ignore[arg-type]
    return _generate(sources, selection, options)


def _generate(sources: list[Source], selection: PageSelection | None, options: _Options) -> Iterator[Page | PageError]:
    for source in sources:
        yield from _source_pages(source, selection, options)


def _source_pages(source: Source, selection: PageSelection | None, options: _Options) -> Iterator[Record]:
    if source.error is not None:
        yield PageError(source.name, None, source.error, path=source.path)
        return
    try:
        document = _open_document(source, options)
    except DocumentError as exc:
        yield PageError(source.name, None, str(exc), path=source.path)
        return
    except OSError as exc:
        yield PageError(source.name, None, f"cannot read: {exc.strerror or _one_line(exc)}", path=source.path)
        return
    except Exception as exc:  # hostile bytes can make decoders raise anything; never end the batch
        yield PageError(source.name, None, f"cannot open: {_one_line(exc)}", path=source.path)
        return
    try:
        count = document.page_count
        numbers, missing = (list(range(1, count + 1)), []) if selection is None else selection.resolve(count)
        if missing:
            noun = "page" if count == 1 else "pages"
            message = f"--pages {', '.join(missing)}: not in this document ({count} {noun})"
            yield PageError(source.name, None, message, pages=count, path=source.path)
        for number in numbers:
            try:
                record: Record = document.page(number)
            except DocumentError as exc:
                record = PageError(source.name, number, str(exc), pages=count, path=source.path)
            except Exception as exc:
                message = f"cannot render: {_one_line(exc)}"
                record = PageError(source.name, number, message, pages=count, path=source.path)
            yield record
    finally:
        document.close()


def load_documents(
    inputs: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    size: tuple[int, int] | str | None = DEFAULT_SIZE,
    pages: str | Sequence[int] | None = None,
    password: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    errors: Literal["raise", "skip"] = "raise",
) -> list[Page]:
    """All pages of the inputs as a list: the convenient form for a few documents in Python.

    With errors="raise" (default) the first problem raises DocumentError naming the file; with "skip" bad
    documents and pages are left out. For large inputs, iterate `iter_pages` instead (one page in memory).
    """
    if errors not in ("raise", "skip"):
        raise UsageError(f"errors must be 'raise' or 'skip', got {errors!r}")
    records = iter_pages(inputs, size=size, pages=pages, password=password, max_pixels=max_pixels)
    loaded: list[Page] = []
    for record in records:
        if isinstance(record, PageError):
            if errors == "raise":
                raise DocumentError(str(record))
            continue
        loaded.append(record)
    return loaded


T = TypeVar("T")
_ITEM, _RAISED, _DONE = "item", "raised", "done"


def prefetch(iterable: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate `iterable` in a background thread, up to `depth` items ahead of the consumer.

    Rendering the next pages then overlaps the model's work on the current ones. An exception raised by
    the producer is re-raised in the consumer after the items produced before it. If the consumer stops
    early (break, close, an exception), the producer stops at its next item and the source iterator is
    closed in its own thread (so documents it holds open get closed). The thread is a daemon: it never
    keeps the interpreter alive.
    """
    if depth < 1:
        raise ValueError(f"prefetch depth must be at least 1, got {depth}")
    return _prefetch(iterable, depth)


def _prefetch(iterable: Iterable[T], depth: int) -> Iterator[T]:
    handoff: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(message: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                handoff.put(message, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(iterable)
        try:
            for item in iterator:
                if not offer((_ITEM, item)):
                    return
            offer((_DONE, None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            offer((_RAISED, exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=produce, name="monkey-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = handoff.get()
            if kind == _ITEM:
                yield value
            elif kind == _RAISED:
                raise value
            else:
                return
    finally:
        stop.set()
        # The producer notices `stop` within one item; waiting briefly lets it close open documents
        # before the caller moves on, without hanging on a producer stuck in a slow read.
        worker.join(timeout=5)

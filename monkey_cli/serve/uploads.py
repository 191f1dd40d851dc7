"""Images and documents sent to the server -> pages, exactly as the CLI reads them.

A chat request carries its image as a `data:` URL; `/v1/documents` as a multipart upload. Either way the
bytes go through `monkey_cli.documents` like a file given to `monkey ask`: the type is sniffed from the
content (never trusted from a name or a media type), images are decoded with the plugin of that type only,
size-checked, turned upright and flattened onto white, PDF pages are rendered straight to the model's input
size, with the CLI's page selection syntax. Nothing a request names is ever fetched or opened: remote
`http(s)` URLs and local paths are refused with a 400.

MuPDF works in one renderer process (`monkey_cli.documents.renderer`), one request at a time, and a server
opens documents for several requests at a time: all document work in the server goes through
`DOCUMENTS_LOCK` (one page render at a time), each page within the render budget (`--render-timeout`), so a
page that would take hours to draw is an error for that page and never stops the server answering.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import threading
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from monkey_cli.documents import DEFAULT_MAX_PIXELS, DEFAULT_PDF_DPI, Page, PageError, Source, open_document
from monkey_cli.documents.records import Options, one_line, parse_pages
from monkey_cli.documents.renderer import RenderTimeout
from monkey_cli.errors import UsageError
from monkey_cli.serve.errors import bad_request

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

DOCUMENTS_LOCK = threading.RLock()
PREVIEW_SIDE = 512  # longest side of a page's preview, in pixels
DATA_URL_EXAMPLE = "data:image/png;base64,iVBORw0..."
_PAGE_FRAGMENT = re.compile(r"page=(\d{1,9})")
_WINDOWS_PATH = re.compile(r"[a-zA-Z]:[\\/]")
T = TypeVar("T")


@dataclass(frozen=True)
class ImageRef:
    """The bytes of an image or document from a data: URL, and the page of it that is meant (1-based)."""

    data: bytes
    page: int = 1

    @property
    def key(self) -> tuple[str, str, int]:
        """Names the page's content: requests about the same page share its vision features."""
        return ("upload", hashlib.sha256(self.data).hexdigest(), self.page)


def parse_image_url(url: str, param: str) -> ImageRef:
    """The bytes of a `data:` URL (base64 or percent-encoded); a PDF's page as a `#page=N` suffix.

    Anything else is refused with a 400 that says why: remote URLs are never fetched, local paths never
    opened."""
    text = url.strip()
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if scheme in ("http", "https", "ftp", "ftps"):
        raise bad_request(
            f"remote image URLs are never fetched: send the image itself as a data: URL ({DATA_URL_EXAMPLE})",
            param,
            code="remote_url_refused",
        )
    if scheme == "file" or not scheme or _WINDOWS_PATH.match(text) or text.startswith(("/", ".", "~", "\\")):
        raise bad_request(
            f"local files are never opened: send the image itself as a data: URL ({DATA_URL_EXAMPLE})",
            param,
            code="local_path_refused",
        )
    if scheme != "data":
        raise bad_request(f"only data: URLs are accepted ({DATA_URL_EXAMPLE}), not {scheme}: URLs", param)
    header, comma, rest = text[len("data:") :].partition(",")
    if not comma:
        raise bad_request("malformed data: URL: no ',' between the media type and the data", param)
    payload, _, fragment = rest.partition("#")  # '#' is not in the base64 alphabet, and is %23 when encoded
    page = _page_number(fragment, param)
    if header.lower().endswith(";base64"):
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            message = "the data: URL's base64 is broken (not valid base64)"
            raise bad_request(message, param, code="invalid_base64") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if not data:
        raise bad_request("the data: URL holds no data", param)
    return ImageRef(data, page)


def _page_number(fragment: str, param: str) -> int:
    if not fragment:
        return 1
    match = _PAGE_FRAGMENT.fullmatch(fragment.strip())
    if match is None or int(match.group(1)) < 1:
        raise bad_request(f"cannot read the URL's fragment #{fragment[:40]}: use #page=N (1 for the first page)", param)
    return int(match.group(1))


# --- pages ---------------------------------------------------------------------------------------------


def open_page(image: ImageRef, size: tuple[int, int], param: str, render_timeout: float | None = None) -> Page:
    """The page `image` means, rendered at `size` (height, width) as the CLI renders it, within
    `render_timeout` seconds (None: no limit); a 400 otherwise."""
    options = Options(size, None, DEFAULT_MAX_PIXELS, DEFAULT_PDF_DPI, text_layer=False, render_timeout=render_timeout)
    with DOCUMENTS_LOCK:
        try:
            document = open_document(Source("image", data=image.data), options)
        except RenderTimeout as exc:
            raise bad_request(f"the document: {exc}", param, code="render_timeout") from None
        except Exception as exc:  # DocumentError, or anything hostile bytes make a decoder raise
            raise bad_request(f"cannot read the image: {one_line(exc)}", param, code="invalid_image") from None
        try:
            count = document.page_count
            if image.page > count:
                noun = "page" if count == 1 else "pages"
                raise bad_request(f"#page={image.page}: the document has {count} {noun}", param, code="invalid_page")
            try:
                return document.page(image.page)
            except RenderTimeout as exc:
                raise bad_request(f"page {image.page}: {exc}", param, code="render_timeout") from None
            except Exception as exc:
                message = f"cannot read page {image.page}: {one_line(exc)}"
                raise bad_request(message, param, code="invalid_image") from None
        finally:
            document.close()


def selected_pages(
    source: Source, pages: str | None, password: str | None, size: tuple[int, int], render_timeout: float | None = None
) -> int:
    """How many pages of `source` the `pages` selection (the CLI's --pages syntax) takes; a 400 when the
    document cannot be opened at all or the selection cannot be read (what fails per page is a record)."""
    try:
        selection = parse_pages(pages.strip() if pages and pages.strip() else None)
    except UsageError as exc:
        raise bad_request(str(exc).replace("--pages", "pages", 1), "pages") from None
    # counting pages reads no text layer; the budget is this server's (--render-timeout), not the environment's
    options = Options(size, password, DEFAULT_MAX_PIXELS, DEFAULT_PDF_DPI, text_layer=False,
                      render_timeout=render_timeout)
    with DOCUMENTS_LOCK:
        try:
            document = open_document(source, options)
        except RenderTimeout as exc:
            raise bad_request(f"{source.name}: {exc}", "file", code="render_timeout") from None
        except Exception as exc:  # DocumentError, or anything a hostile file makes a decoder raise
            raise bad_request(f"{source.name}: {one_line(exc)}", "file", code="invalid_document") from None
        try:
            count = document.page_count
        finally:
            document.close()
    if selection is None:
        return count
    numbers, _missing = selection.resolve(count)  # missing pages become error records, as in the CLI
    return len(numbers)


def serialized(items: Iterable[T]) -> Iterator[T]:
    """`items`, each one made under DOCUMENTS_LOCK (for page iterators that render with MuPDF)."""
    iterator = iter(items)
    try:
        while True:
            with DOCUMENTS_LOCK:
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            with DOCUMENTS_LOCK:
                close()


def preview(records: Iterable[Page | PageError]) -> tuple[list[dict[str, Any]], list[str]]:
    """Small JPEGs of the pages, at their own proportions, for the web page; and the pages' errors."""
    pages, errors = [], []
    for record in serialized(records):
        if isinstance(record, PageError):
            errors.append(str(record))
            continue
        width, height = record.original_size
        pages.append(
            {
                "page": record.page,
                "pages": record.pages,
                "width": width,
                "height": height,
                "image": _jpeg_data_url(_thumbnail(record.image, (width, height))),
            }
        )
    return pages, errors


def _thumbnail(image: Image.Image, original: tuple[int, int]) -> Image.Image:
    """`image` (the model's square view) back at the page's own proportions, at most PREVIEW_SIDE a side."""
    from PIL import Image

    width, height = original
    scale = PREVIEW_SIDE / max(width, height, 1)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(target, Image.Resampling.BICUBIC)


def _jpeg_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

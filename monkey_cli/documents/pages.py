"""Sources -> pages: open each document (its type sniffed from its bytes), yield its pages lazily."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Literal

from monkey_cli.documents.inputs import expand_inputs, open_regular, source_sha256
from monkey_cli.documents.records import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_PDF_DPI,
    DEFAULT_SIZE,
    Options,
    Page,
    PageError,
    PageSelection,
    Record,
    Source,
    one_line,
    parse_pages,
    parse_size,
)
from monkey_cli.documents.renderer import (
    RendererCrashed,
    RenderTimeout,
    check_render_timeout,
    default_render_timeout,
)
from monkey_cli.documents.types import HEAD_BYTES, PILLOW_FEATURES, describe_unsupported, sniff_type
from monkey_cli.errors import DocumentError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from monkey_cli.documents.images import ImageDocument
    from monkey_cli.documents.pdf import PdfDocument


def _read_head(source: Source) -> bytes:
    if source.data is not None:
        return source.data[:HEAD_BYTES]
    assert source.path is not None
    with open_regular(source.path) as stream:
        return stream.read(HEAD_BYTES)


def open_document(source: Source, options: Options) -> PdfDocument | ImageDocument:
    """The document behind a source; DocumentError (or OSError) when it cannot be opened."""
    head = _read_head(source)
    kind = sniff_type(head)
    if kind is None:
        raise DocumentError(describe_unsupported(head))
    feature = PILLOW_FEATURES.get(kind)
    if feature is not None:
        from PIL import features

        if not features.check(feature):
            raise DocumentError(f"unsupported type: this Pillow build cannot read {kind.upper()} images")
    digest = source_sha256(source)
    if kind == "pdf":
        from monkey_cli.documents.pdf import PdfDocument

        return PdfDocument(source, digest, options)
    from monkey_cli.documents.images import ImageDocument

    return ImageDocument(source, kind, digest, options)


def iter_pages(
    inputs: Iterable[str | os.PathLike[str] | Source] | str | os.PathLike[str],
    *,
    size: tuple[int, int] | str | None = DEFAULT_SIZE,
    pages: str | Sequence[int] | PageSelection | None = None,
    password: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    pdf_dpi: float = DEFAULT_PDF_DPI,
    stdin: bytes | IO[bytes] | IO[str] | None = None,
    max_stream_bytes: int | None = None,
    text_layer: bool = True,
    render_timeout: float | None | Literal["default"] = "default",
) -> Iterator[Page | PageError]:
    """Pages of every input, lazily, one document open at a time and one page rendered at a time.

    `size` is (height, width) or "HxW"; None keeps native pixels (PDFs at `pdf_dpi`). `pages` selects pages
    in every document. `text_layer` reads each PDF page's text layer into `Page.text` as Markdown (judged
    first: `documents.textlayer`); without it `Page.text` is None, which saves the conversion when nothing
    will read it. `render_timeout` is the budget of one PDF page in seconds (None or 0: none; default:
    `MONKEY_RENDER_TIMEOUT`, else 30): a page over it is a `PageError`. Arguments are validated now
    (UsageError); documents only when iterated, and their problems come out as `PageError` records.
    """
    selection = parse_pages(pages)
    if max_pixels < 1:
        raise UsageError(f"max_pixels must be positive, got {max_pixels}")
    if pdf_dpi <= 0:
        raise UsageError(f"pdf_dpi must be positive, got {pdf_dpi}")
    options = Options(parse_size(size), password, max_pixels, pdf_dpi, text_layer, render_budget(render_timeout))
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    items = list(inputs)
    sources: list[Source]
    if all(isinstance(item, Source) for item in items):
        sources = items  # type: ignore[assignment]
    elif any(isinstance(item, Source) for item in items):
        raise UsageError("inputs must be all paths or all Source objects (from expand_inputs), not a mix")
    else:
        sources = expand_inputs(items, stdin, max_stream_bytes=max_stream_bytes)  # type: ignore[arg-type]
    return _generate(sources, selection, options)


def render_budget(render_timeout: float | None | Literal["default"] = "default") -> float | None:
    """The render budget `render_timeout` asks for ("default": this process's, see `renderer`); UsageError
    for a value that is not a budget."""
    if render_timeout == "default":
        return default_render_timeout()
    try:
        return check_render_timeout(render_timeout)  # type: ignore[arg-type]
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _generate(sources: list[Source], selection: PageSelection | None, options: Options) -> Iterator[Page | PageError]:
    for source in sources:
        yield from _source_pages(source, selection, options)


def _source_pages(source: Source, selection: PageSelection | None, options: Options) -> Iterator[Record]:
    if source.error is not None:
        yield PageError(source.name, None, source.error, path=source.path)
        return
    try:
        document = open_document(source, options)
    except (RenderTimeout, RendererCrashed) as exc:  # the machine's doing as much as the file's: retried later
        yield PageError(source.name, None, str(exc), path=source.path, transient=True)
        return
    except DocumentError as exc:
        yield PageError(source.name, None, str(exc), path=source.path)
        return
    except OSError as exc:  # the file could not be read now: worth another try later
        message = f"cannot read: {exc.strerror or one_line(exc)}"
        yield PageError(source.name, None, message, path=source.path, transient=True)
        return
    except MemoryError:
        yield PageError(source.name, None, "cannot open: out of memory", path=source.path, transient=True)
        return
    except Exception as exc:  # hostile bytes can make decoders raise anything; never end the batch
        yield PageError(source.name, None, f"cannot open: {one_line(exc)}", path=source.path)
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
            except (RenderTimeout, RendererCrashed) as exc:
                record = PageError(source.name, number, str(exc), pages=count, path=source.path, transient=True)
            except DocumentError as exc:
                record = PageError(source.name, number, str(exc), pages=count, path=source.path)
            except (OSError, MemoryError) as exc:  # of the moment, not of the document
                message = f"cannot render: {one_line(exc) if isinstance(exc, OSError) else 'out of memory'}"
                record = PageError(source.name, number, message, pages=count, path=source.path, transient=True)
            except Exception as exc:
                message = f"cannot render: {one_line(exc)}"
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
    text_layer: bool = True,
) -> list[Page]:
    """All pages of the inputs as a list: the convenient form for a few documents in Python.

    With errors="raise" (default) the first problem raises DocumentError naming the file; with "skip" bad
    documents and pages are left out. For large inputs, iterate `iter_pages` instead (one page in memory).
    """
    if errors not in ("raise", "skip"):
        raise UsageError(f"errors must be 'raise' or 'skip', got {errors!r}")
    records = iter_pages(
        inputs, size=size, pages=pages, password=password, max_pixels=max_pixels, text_layer=text_layer
    )
    loaded: list[Page] = []
    for record in records:
        if isinstance(record, PageError):
            if errors == "raise":
                raise DocumentError(str(record))
            continue
        loaded.append(record)
    return loaded

"""Documents in: turn whatever a user points at into pages for the model.

Inputs are files, folders (walked recursively in natural order, hidden entries skipped), glob patterns and
`-` (standard input: either the bytes of one document or a list of paths). Each file's type is sniffed from
its first bytes, never from its extension. PDFs are opened with PyMuPDF and rendered one page at a time;
images are opened with Pillow, turned upright (EXIF), flattened onto white and converted to RGB. Every page
comes out at the model's input size (bicubic, aspect not kept, as the model does) unless `size=None`.

Nothing here raises for a bad document: problems travel as `PageError` records next to the `Page` records,
so one damaged file never ends a batch. Only invalid arguments (a bad page range, a bad size, `-` twice)
raise `UsageError`, up front. Only regular files are read; special files, links to folders and loops are
skipped (see `inputs`).

    >>> from monkey_cli.documents import iter_pages
    >>> for record in iter_pages(["scans/", "report.pdf"], pages="1-3,-1"):
    ...     print(record)

Modules: `records` (Source, Page, PageError, --pages, --size), `types` (sniffing), `inputs` (paths, folders,
globs, standard input), `pages` (iter_pages), `pdf`, `textlayer` (a PDF page's text layer: judged, then
Markdown), `images`, `prefetch`. Heavy imports (Pillow, PyMuPDF)
happen on first use, so importing this package is cheap.
"""

from __future__ import annotations

from monkey_cli.documents.inputs import (
    DEFAULT_MAX_STREAM_BYTES,
    MAX_STDIN_PATHS,
    MAX_STREAM_BYTES_ENV,
    expand_inputs,
    open_regular,
    source_sha256,
    stream_limit,
)
from monkey_cli.documents.pages import iter_pages, load_documents, open_document
from monkey_cli.documents.prefetch import prefetch
from monkey_cli.documents.records import (
    BYTES_PER_ALLOWED_PIXEL,
    DEFAULT_MAX_PIXELS,
    DEFAULT_PDF_DPI,
    DEFAULT_SIZE,
    STDIN_NAME,
    Page,
    PageError,
    PageSelection,
    Record,
    Source,
    parse_pages,
    parse_size,
)
from monkey_cli.documents.renderer import DEFAULT_RENDER_TIMEOUT, RENDER_TIMEOUT_ENV
from monkey_cli.documents.types import SUPPORTED_TYPES, sniff_type

__all__ = [
    "BYTES_PER_ALLOWED_PIXEL",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_STREAM_BYTES",
    "DEFAULT_PDF_DPI",
    "DEFAULT_RENDER_TIMEOUT",
    "DEFAULT_SIZE",
    "MAX_STDIN_PATHS",
    "MAX_STREAM_BYTES_ENV",
    "Page",
    "PageError",
    "PageSelection",
    "RENDER_TIMEOUT_ENV",
    "Record",
    "STDIN_NAME",
    "SUPPORTED_TYPES",
    "Source",
    "expand_inputs",
    "iter_pages",
    "load_documents",
    "open_document",
    "open_regular",
    "parse_pages",
    "parse_size",
    "prefetch",
    "sniff_type",
    "source_sha256",
    "stream_limit",
]

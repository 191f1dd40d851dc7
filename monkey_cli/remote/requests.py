"""What each task sends to the server, and where: the one place a task is taught to run remotely.

`ask`, `caption` and `read` are `POST /v1/documents` (a multipart form: the document, then the fields of
docs/serve.md); `extract` is `POST /v1/extract` (the document, the combined fields as one JSON Schema, the
extraction's options). A new task adds its builder to `BUILDERS`; every endpoint answers with the same
server-sent events (`page` and `page_error` as pages go, `record` per record in input order, then `done`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from monkey_cli.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from monkey_cli.extract.run import ExtractRunOptions
    from monkey_cli.pipeline import RunOptions


@dataclass(frozen=True)
class DocumentRequest:
    """The endpoint and form fields (names may repeat: one `question` per question) of one document's request;
    the document itself goes as the form's `file`."""

    path: str
    fields: dict[str, str | list[str]]


def _documents(options: RunOptions, max_tokens: int) -> DocumentRequest:
    job = options.job
    fields: dict[str, str | list[str]] = {"task": job.task, "max_tokens": str(max_tokens), "stream": "true"}
    if job.task == "ask":
        fields["question"] = [str(question) for question in job.questions]
    if options.pages is not None:
        fields["pages"] = options.pages
    if options.password is not None:
        fields["password"] = options.password
    if job.force_ocr:
        fields["force_ocr"] = "true"
    return DocumentRequest("/v1/documents", fields)


def extract_request(options: ExtractRunOptions, max_tokens: int) -> DocumentRequest:
    """`monkey extract`'s request: its fields as one JSON Schema (the server derives the same fields, questions
    and fingerprint from it), and the options that change a record."""
    import json

    extract = options.extract
    fields: dict[str, str | list[str]] = {
        "schema": json.dumps(options.schema.json_schema, ensure_ascii=False),
        "max_tokens": str(max_tokens),
        "all_pages": str(extract.all_pages).lower(),
        "null_probability": str(extract.null_probability).lower(),
        "stream": "true",
    }
    if extract.min_confidence is not None:
        fields["min_confidence"] = repr(extract.min_confidence)
    if options.pages is not None:
        fields["pages"] = options.pages
    if options.password is not None:
        fields["password"] = options.password
    return DocumentRequest("/v1/extract", fields)


# task -> the request for one of its documents (the run's options, the longest answer to ask for)
BUILDERS: dict[str, Callable[[RunOptions, int], DocumentRequest]] = {
    "ask": _documents,
    "caption": _documents,
    "read": _documents,
}


def document_request(options: RunOptions, max_tokens: int) -> DocumentRequest:
    """The request every document of the run is sent with."""
    builder = BUILDERS.get(options.job.task)
    if builder is None:
        remote = ", ".join(sorted(BUILDERS))
        raise UsageError(f"{options.job.task} does not run on a server (--server runs {remote})")
    return builder(options, max_tokens)

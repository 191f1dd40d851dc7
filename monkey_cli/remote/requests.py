"""What each task sends to the server, and where: the one place a task is taught to run remotely.

`ask`, `caption` and `read` are `POST /v1/documents` (a multipart form: the document, then the fields of
docs/serve.md). A new task adds its builder to `BUILDERS` (for `extract`: its endpoint `/v1/extract` and its
schema field); nothing else of the remote run changes, since every endpoint answers with the same
server-sent events (`record` per record, in input order, then `done`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from monkey_cli.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
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

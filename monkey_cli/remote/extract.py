"""`monkey extract --server URL`: `extract.run.run`'s flow, with a running `monkey serve` in the engine's place.

As for the other tasks (`runner`): the server's settings first (reachable, the key right, its model ready),
then the inputs listed and the output folder planned and resumed by the local code, with a resume
fingerprint made of the server's model settings and the schema's fingerprint. Each document goes whole to
`POST /v1/extract` (streamed; its pages are counted when its record is given out), a few at a time, and its
record comes back in input order, written through the local run's own atomic per-document files.

The record is the record a local run makes but for what is the server's: `model` as the server names its
model, `quant` its quantization, `seconds` its time; `source` is the document's local name. A document the
server does not answer (a refusal, a limit of its own, the connection lost) is that document's error record,
with every field null; the others go on.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import IO, Any

from monkey_cli import documents, pipeline
from monkey_cli.errors import UsageError
from monkey_cli.extract.extractor import Extractor
from monkey_cli.extract.results import Extraction
from monkey_cli.extract.run import ExtractRunOptions, _save, extract_settings
from monkey_cli.output_folder import OutputFolder, OutputsFilter
from monkey_cli.pipeline import Summary
from monkey_cli.remote.client import DocumentFailed, Server, ServerInfo
from monkey_cli.remote.requests import DocumentRequest, extract_request
from monkey_cli.remote.runner import check_model, in_order, max_tokens_for, upload_name


@dataclasses.dataclass
class _Answered:
    """One document's record, its pages that reached the model, and the problems that came from its bytes."""

    record: Extraction[Any]
    pages: list[int | None] = dataclasses.field(default_factory=list)  # each page's document length
    page_errors: list[documents.PageError] = dataclasses.field(default_factory=list)


def run(
    options: ExtractRunOptions,
    server: Server,
    *,
    model: str | None = None,
    say_cap: bool = True,
    on_record: Callable[[Extraction[Any]], None] = lambda record: None,
    on_start: Callable[[int], None] = lambda documents: None,
    on_stage: Callable[[str], None] = lambda stage: None,
    on_page: Callable[[int | None], None] = lambda pages: None,
    stdin: IO[bytes] | bytes | None = None,
) -> Summary:
    """`extract.run.run(options, ...)` answered by `server`; `model`, when given, must name the server's model.
    Raises ServerError before any work when the server cannot be used, UsageError when it cannot give what is
    asked; KeyboardInterrupt propagates once the finished documents are saved."""
    started = time.perf_counter()
    summary = Summary()
    info = server.info(on_wait=lambda: on_stage("waiting for the server's model to load"))
    check_model(model, info, server.url)
    if options.size is not None:
        raise UsageError("--size: not available with --server (the server uses its model's page size); run it "
                         "locally")  # fmt: skip
    fields = len(options.schema.fields)
    if info.max_questions is not None and fields > info.max_questions:
        raise UsageError(f"{fields} fields; --server {server.url} extracts at most {info.max_questions} per document "
                         "(its --max-questions): extract fewer, or start the server with a higher "
                         "--max-questions")  # fmt: skip
    max_tokens = max_tokens_for(options.extract.max_new_tokens, info, say_cap)
    if max_tokens < 2:
        raise UsageError(f"--server {server.url} gives answers of at most {max_tokens} token (its "
                         "--max-new-tokens); extract needs 2")  # fmt: skip
    request = extract_request(options, max_tokens)
    extract_options = dataclasses.replace(options.extract, max_new_tokens=max_tokens)
    # Only for the records of documents the server does not answer (every field null); it never loads a model.
    failures = Extractor(_no_model, options.schema, extract_options, model_name=info.model, quant=info.quant)
    folder = OutputFolder(options.out_dir, overwrite=options.overwrite) if options.out_dir else None
    try:
        sources = documents.expand_inputs(list(options.inputs), stdin, exclude=OutputsFilter(folder))
        settings = server_settings(options, info, max_tokens)
        pending = pipeline._pending_documents(sources, options, settings, summary, folder)
        on_start(len(pending))
        on_stage("answering")
        by_name = {item.source.name: item for item in pending}

        def answer(source: documents.Source) -> _Answered:
            return _answer(server, request, source, failures)

        for source, result in in_order(server, info, [item.source for item in pending], answer):
            for pages in result.pages:
                on_page(pages)
            summary.documents += 1
            summary.pages += len(result.pages)
            if result.record.error is not None:
                summary.failed += 1
            on_record(result.record)
            item = by_name[source.name]
            if folder is not None and item.target is not None:
                _save(folder, item, result.record, result.page_errors, settings, options, summary, on_record)
    finally:
        if folder is not None:
            folder.close()
        summary.seconds = time.perf_counter() - started
    return summary


def server_settings(options: ExtractRunOptions, info: ServerInfo, max_tokens: int) -> dict[str, Any]:
    """The resume fingerprint of an extraction on this server: a local run's, with the model settings the
    server's (a rerun against another model, adapter or quantization redoes the documents)."""
    model = dataclasses.replace(
        options.model, source=info.model, dtype=info.dtype, quant=info.quant, quant_vision=info.quant_vision,
        prompt_style=info.prompt_style, adapter=None,
    )  # fmt: skip
    extract = dataclasses.replace(options.extract, max_new_tokens=max_tokens)
    settings = extract_settings(dataclasses.replace(options, model=model, extract=extract), info.quant or "none")
    settings["adapter"] = info.adapter_sha256
    return settings


def _no_model() -> Any:
    raise AssertionError("an extraction with --server never loads a model here")


def _answer(server: Server, request: DocumentRequest, source: documents.Source, failures: Extractor) -> _Answered:
    """One document's record from the server, or its error record (every problem is one, never an exception)."""
    if source.error is not None:
        error = documents.PageError(source.name, None, source.error)
        return _Answered(failures.failure(source.name, source.error), page_errors=[error])
    upload = upload_name(source)
    try:
        content = source.data if source.data is not None else open(source.path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        return _Answered(failures.failure(source.name, f"cannot read: {exc.strerror or exc}", retry=True))
    answered = _Answered(record=None)  # type: ignore[arg-type] - set below, from the record event or a failure
    try:
        for event in server.document_events(request, upload, content):
            _take(event, answered, source)
    except DocumentFailed as exc:
        message = exc.message.removeprefix(f"{upload}: ")  # the server names the upload; the record, the source
        if exc.permanent:  # the bytes themselves: the same file fails so again
            answered.page_errors.append(documents.PageError(source.name, None, message))
        answered.record = failures.failure(source.name, message, retry=not exc.permanent)
    except _Unreadable as exc:
        answered.record = failures.failure(source.name, str(exc), retry=True)
    finally:
        if not isinstance(content, bytes):
            content.close()
    if answered.record is None:
        answered.record = failures.failure(source.name, "the server sent no record for it", retry=True)
    return answered


class _Unreadable(Exception):
    """An event from the server this version cannot read (a newer server's, say)."""


def _take(event: dict[str, Any], answered: _Answered, source: documents.Source) -> None:
    kind = event.get("type")
    if kind == "page":
        pages = event.get("pages")
        answered.pages.append(pages if isinstance(pages, int) else None)
    elif kind == "page_error":  # what made a page fail, for good or for now (resume)
        page = event.get("page")
        answered.page_errors.append(documents.PageError(
            source.name, page if isinstance(page, int) else None, str(event.get("message")),
            transient=event.get("transient") is not False,
        ))  # fmt: skip
    elif kind == "record":
        try:
            record = Extraction.from_dict(event.get("record"))
        except ValueError as exc:
            raise _Unreadable(f"the server sent a record this monkey-cli cannot read ({exc}): update it") from None
        record.source = source.name
        record.retry = event.get("retry") is True
        answered.record = record

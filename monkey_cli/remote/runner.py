"""A run whose documents a `monkey serve` answers: `pipeline.run`'s flow, with the server in the engine's place.

Before any work: the server's settings (`Server.info`, which also proves it reachable and the key right), the
task checked against its model's family, the inputs listed and the output folder planned and resumed by
`pipeline`'s own code, with a resume fingerprint made of the server's settings (so a rerun against the same
model resumes, and one against another model redoes the documents). Then each document is sent whole, a few at
a time (the server batches them with its other clients' requests), and its records are given out in input
order through `pipeline`'s counting, warnings and atomic per-document files.

A record from the server is the record a local run makes, but for what is inherently the server's: `model`
names the server's model as it names it (a local folder by its name alone), `quant` is its quantization and
`seconds` its time. Its `source` is the local name of the document (the server only saw an upload).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, TypeVar

from monkey_cli import documents, pipeline
from monkey_cli.engine import BadQuestion, DocumentEnd
from monkey_cli.errors import UsageError
from monkey_cli.output import Record
from monkey_cli.output_folder import OutputFolder
from monkey_cli.pipeline import RunOptions, Summary
from monkey_cli.remote.client import DocumentFailed, Server, ServerInfo
from monkey_cli.remote.requests import document_request

log = logging.getLogger("monkey_cli")

T = TypeVar("T")
MAX_IN_FLIGHT = 8  # documents sent at once: at most this many, and no more than the server's decode slots
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f]")


@dataclasses.dataclass
class _Answered:
    """One document's records, and the problems that came from its bytes (they make a failure permanent)."""

    records: list[Record]
    page_errors: list[documents.PageError] = dataclasses.field(default_factory=list)


def run(
    options: RunOptions,
    server: Server,
    *,
    model: str | None = None,
    say_cap: bool = True,
    on_record: Callable[[Record], None] = lambda record: None,
    on_document: Callable[[str], None] = lambda name: None,
    on_start: Callable[[int], None] = lambda documents: None,
    on_stage: Callable[[str], None] = lambda stage: None,
    stdin: IO[bytes] | bytes | None = None,
) -> Summary:
    """`pipeline.run(options, ...)` answered by `server`. `options.model` is not used (the server's model
    answers); `model`, when given, must name the server's model (a UsageError naming both otherwise).
    `say_cap`: say so when the server gives shorter answers than `options.job.max_new_tokens` (its cap).
    Raises ServerError before any work when the server cannot be used; KeyboardInterrupt propagates once the
    finished documents are saved (the server drops the others as their connections close)."""
    started = time.perf_counter()
    summary = Summary()
    # First the server (reachable, the key right, its model ready) and what it cannot do: nothing is made before.
    info = server.info(on_wait=lambda: on_stage("waiting for the server's model to load"))
    check_model(model, info, server.url)
    _check_job(options)
    pipeline.check_family_job(info.family, options.job)
    max_tokens = max_tokens_for(options.job.max_new_tokens, info, say_cap)
    request = document_request(options, max_tokens)
    folder = OutputFolder(options.out_dir, overwrite=options.overwrite) if options.out_dir else None
    try:
        sources = documents.expand_inputs(
            list(options.inputs),
            stdin,
            exclude=pipeline._outputs_filter(folder, None),
            pipe_hint=pipeline.pipe_hint(options.job),
        )
        settings = server_settings(options, info, max_tokens)
        pending = pipeline._pending_documents(sources, options, settings, summary, folder)
        on_start(len(pending))
        on_stage("answering")
        answered: dict[str, _Answered] = {}
        by_name = {item.source.name: item for item in pending}
        events = _events(server, request, info, options, pending, answered)
        for name, records in pipeline._per_document(events, on_record, summary):
            on_document(name)
            summary.documents += 1
            item = by_name.get(name)
            result = answered.pop(name, None)
            if folder is not None and item is not None and item.target is not None:
                errors = result.page_errors if result is not None else []
                pipeline._save(folder, item, records, errors, settings, options, summary, on_record)
    finally:
        if folder is not None:
            folder.close()
        summary.seconds = time.perf_counter() - started
    return summary


def server_settings(options: RunOptions, info: ServerInfo, max_tokens: int) -> dict[str, Any]:
    """The resume fingerprint of a run on this server: a local run's (`pipeline._settings`), with the model
    settings the server's (so one against another model, adapter or quantization redoes the documents)."""
    model = dataclasses.replace(
        options.model,
        source=info.model,
        dtype=info.dtype,
        quant=info.quant,
        quant_vision=info.quant_vision,
        prompt_style=info.prompt_style,
        adapter=None,
        family=None,
    )
    job = dataclasses.replace(options.job, max_new_tokens=max_tokens)
    settings = pipeline._settings(dataclasses.replace(options, model=model, job=job), info.quant or "none")
    settings["adapter"] = info.adapter_sha256
    return settings


def check_model(model: str | None, info: ServerInfo, url: str) -> None:
    if model is None or model == info.model or _folder_name(model) == info.model:
        return
    raise UsageError(f"--model {model}: the server at {url} serves {info.model} (with --server its model answers: "
                     "leave --model out, or start the server with this model)")  # fmt: skip


def _folder_name(model: str) -> str:
    return model.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]


def _check_job(options: RunOptions) -> None:
    """What a server cannot do for this run is refused before any work (the CLI refuses the options first)."""
    job = options.job
    bad = next((q for q in job.questions if isinstance(q, BadQuestion)), None)
    if bad is not None:
        raise UsageError(f"{bad.error}; with --server every question must be readable (fix the line, or run locally)")
    for what, given in (("text positions", job.positions), ("a --prompt template", job.template is not None),
                        ("--size", options.size is not None), ("--overlay", options.overlay_dir is not None)):
        if given:
            raise UsageError(f"{what}: not available with --server (the server answers with its own prompts, at its "
                             "model's page size, without positions); run it locally")  # fmt: skip


def max_tokens_for(asked: int, info: ServerInfo, say: bool) -> int:
    """The longest answer the server will give: `asked`, capped at its --max-new-tokens (said, if `say`)."""
    limit = info.max_new_tokens
    if limit is None or asked <= limit:
        return asked
    if say:
        log.warning(
            "--max-new-tokens %d: the server gives at most %d tokens per answer (its --max-new-tokens); using %d",
            asked, limit, limit,
        )  # fmt: skip
    return limit


def _events(
    server: Server,
    request: Any,
    info: ServerInfo,
    options: RunOptions,
    pending: list[pipeline._Pending],
    answered: dict[str, _Answered],
) -> Iterator[Record | DocumentEnd]:
    """Every pending document's records and its end, in input order."""
    def answer(source: documents.Source) -> _Answered:
        return _answer(server, request, info, options, source)

    for source, result in in_order(server, info, [item.source for item in pending], answer):
        answered[source.name] = result
        yield from result.records
        yield DocumentEnd(source.name)


def in_order(
    server: Server, info: ServerInfo, sources: list[documents.Source], answer: Callable[[documents.Source], T]
) -> Iterator[tuple[documents.Source, T]]:
    """`answer(source)` of every source, given out in input order; up to MAX_IN_FLIGHT documents (no more than
    the server's decode slots) are being answered at once. Interrupted, the server's connections are closed
    (it drops what it was doing)."""
    window = max(1, min(MAX_IN_FLIGHT, info.slots))
    queue: deque[tuple[documents.Source, Future[T]]] = deque()
    items = iter(sources)
    pool = ThreadPoolExecutor(max_workers=window, thread_name_prefix="monkey-remote")
    clean = False
    try:
        while True:
            while len(queue) < window and (source := next(items, None)) is not None:
                queue.append((source, pool.submit(answer, source)))
            if not queue:
                break
            source, future = queue.popleft()
            yield source, future.result()
        clean = True
    finally:
        if not clean:  # interrupted (or failing): the server drops what it was doing as the connections close
            for _source, future in queue:
                future.cancel()
            server.close()
        pool.shutdown(wait=clean, cancel_futures=True)


def _answer(server: Server, request: Any, info: ServerInfo, options: RunOptions, source: documents.Source) -> _Answered:
    """One document's records from the server, or its error record (every problem is one, never an exception)."""
    failure = _Failure(source, options, info)
    if source.error is not None:
        return _Answered([failure.record(source.error)], [documents.PageError(source.name, None, source.error)])
    upload = upload_name(source)
    try:
        content = source.data if source.data is not None else open(source.path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        return _Answered([failure.record(f"cannot read: {exc.strerror or exc}")])
    records: list[Record] = []
    page_errors: list[documents.PageError] = []
    try:
        for event in server.document_events(request, upload, content):
            if event.get("type") == "record":
                records.append(_local_record(event.get("record"), source, options))
            elif event.get("type") == "page_error":  # what made a page fail, for good or for now (resume)
                page_errors.append(_page_error(event, source))
    except DocumentFailed as exc:
        message = exc.message.removeprefix(f"{upload}: ")  # the server names the upload; the record, the source
        record = failure.record(message)
        if exc.permanent:  # the bytes themselves: the same file fails so again
            page_errors.append(documents.PageError(source.name, None, message))
        return _Answered([*records, record], page_errors)
    except _UnreadableRecord as exc:
        return _Answered([failure.record(str(exc))])
    finally:
        if not isinstance(content, bytes):
            content.close()
    return _Answered(records, page_errors)


def _page_error(event: dict[str, Any], source: documents.Source) -> documents.PageError:
    page = event.get("page")
    return documents.PageError(source.name, page if isinstance(page, int) else None, str(event.get("message")),
                               transient=event.get("transient") is not False)  # fmt: skip


class _UnreadableRecord(Exception):
    """A record from the server this version cannot read (a newer server's, say)."""


def _local_record(data: Any, source: documents.Source, options: RunOptions) -> Record:
    """The server's record as the local run makes it: its source the document's local name; a question shown
    as the user wrote it (the server strips the spaces around one)."""
    try:
        record = Record.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise _UnreadableRecord(f"the server sent a record this monkey-cli cannot read ({exc}): update it") from None
    record.source = source.name
    if record.task == "ask":
        asked = {str(question).strip(): str(question) for question in reversed(options.job.questions)}
        record.prompt = asked.get(record.prompt, record.prompt)
    return record


@dataclasses.dataclass
class _Failure:
    """A document's error record, as a local run makes it (no page; the prompt of a page's error)."""

    source: documents.Source
    options: RunOptions
    info: ServerInfo

    def record(self, message: str) -> Record:
        job = self.options.job
        prompt = str(job.questions[0]) if job.task == "ask" and len(job.questions) == 1 else job.task
        return Record.failure(error=message, source=self.source.name, page=None, pages=None, task=job.task,
                              prompt=prompt, model=self.info.model, quant=self.info.quant)  # fmt: skip


def upload_name(source: documents.Source) -> str:
    """The file name the upload carries (the server shows it in its messages; records get the local name)."""
    name = re.split(r"[\\/]", source.name)[-1].strip()
    return _UNSAFE_NAME.sub("", name) or "upload"

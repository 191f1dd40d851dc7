"""`monkey extract`'s flow for a batch of inputs: inputs -> documents -> pages -> fields -> one record each.

The same rules as `monkey ask|caption|read` (`monkey_cli.pipeline`), shared with it: inputs are expanded the
same way (monkey's own outputs never read back), with `--out DIR` every document gets its own file, planned
before any work and written atomically with a manifest entry, and a rerun skips documents whose input and
settings are unchanged. The schema's fingerprint is one of those settings: a changed schema (a field, a
question, a type) redoes every document.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from monkey_cli import documents, output, pipeline
from monkey_cli.engine import Job
from monkey_cli.extract.extractor import ExtractOptions, Extractor
from monkey_cli.extract.results import Extraction, render
from monkey_cli.extract.schema import ExtractSchema
from monkey_cli.output_folder import OutputError, OutputFolder, OutputFull, OutputsFilter
from monkey_cli.pipeline import ModelOptions, Summary


@dataclass(frozen=True)
class ExtractRunOptions:
    inputs: tuple[str, ...]
    schema: ExtractSchema
    model: ModelOptions
    extract: ExtractOptions = ExtractOptions()
    pages: str | None = None
    password: str | None = None
    size: str | None = None
    out_dir: Path | None = None
    fmt: str = "json"
    overwrite: bool = False
    retry_failed: bool = False


def run(
    options: ExtractRunOptions,
    *,
    on_record: Callable[[Extraction[Any]], None] = lambda record: None,
    on_start: Callable[[int], None] = lambda documents: None,
    on_stage: Callable[[str], None] = lambda stage: None,
    on_page: Callable[[int | None], None] = lambda pages: None,
    stdin: IO[bytes] | bytes | None = None,
    load_model: Callable[[], Any] | None = None,
) -> Summary:
    """Extract from every input; returns counts. KeyboardInterrupt propagates after finished documents are saved.

    `on_record` gets each document's record in input order (with an output folder, also a failure record for an
    output that could not be written); `OutputFull` (a MonkeyError) stops the run when the disk is full.
    """
    started = time.perf_counter()
    summary = Summary()
    job = _job(options)
    extractor_options = options.extract
    folder = OutputFolder(options.out_dir, overwrite=options.overwrite) if options.out_dir else None

    def load(device: str) -> Any:
        on_stage("loading the model")
        model = (load_model or (lambda: pipeline._load(options.model, job, device)))()
        on_stage("answering")
        return model

    try:
        sources = documents.expand_inputs(list(options.inputs), stdin, exclude=OutputsFilter(folder))
        device, quant = pipeline._device_and_quant(options.model, job)
        settings = extract_settings(options, quant)
        extractor = Extractor(lambda: load(device), options.schema, extractor_options,
                              model_name=options.model.source, quant=quant)
        pending = pipeline._pending_documents(sources, options, settings, summary, folder)
        on_start(len(pending))
        on_stage("rendering")
        by_name = {item.source.name: item for item in pending}
        watched = _Watched(on_page)
        pages = documents.iter_pages(
            [item.source for item in pending],
            size=options.size or pipeline.model_input_size(options.model.source),
            pages=options.pages,
            password=options.password,
        )
        for extraction in extractor.run(watched.watch(pages)):
            summary.documents += 1
            summary.pages += watched.pages.pop(extraction.source, 0)
            page_errors = watched.errors.pop(extraction.source, [])
            if extraction.error is not None:
                summary.failed += 1
            on_record(extraction)
            item = by_name.get(extraction.source)
            if folder is not None and item is not None and item.target is not None:
                _save(folder, item, extraction, page_errors, settings, options, summary, on_record)
    finally:
        if folder is not None:
            folder.close()
        summary.seconds = time.perf_counter() - started
    return summary


class _Watched:
    """Counts the pages that reach the extractor and keeps each document's page errors (they tell a permanent
    failure from one of the moment)."""

    def __init__(self, on_page: Callable[[int | None], None]) -> None:
        self.on_page = on_page
        self.pages: dict[str, int] = {}
        self.errors: dict[str, list[documents.PageError]] = {}

    def watch(self, items: Iterable[documents.Page | documents.PageError]) -> Iterator[Any]:
        for item in items:
            if isinstance(item, documents.PageError):
                self.errors.setdefault(item.source, []).append(item)
            else:
                self.pages[item.source] = self.pages.get(item.source, 0) + 1
                self.on_page(item.pages)
            yield item


def _save(
    folder: OutputFolder,
    item: Any,
    extraction: Extraction[Any],
    page_errors: list[documents.PageError],
    settings: dict[str, Any],
    options: ExtractRunOptions,
    summary: Summary,
    on_record: Callable[[Extraction[Any]], None],
) -> None:
    """Write one document's file and its manifest entry; a refused or failed write is a failure record."""
    # Permanent: the document itself failed (same bytes, same settings, same error), no request of the moment.
    permanent = not extraction.retry and not any(error.transient for error in page_errors)
    entry = output.ResumeIndex.entry(item.sha256 or "", settings, [extraction], permanent=permanent)
    data = render([extraction], options.fmt, options.schema.names).encode("utf-8", "backslashreplace")
    try:
        summary.written.append(folder.write(item.target, data, {**entry, **output.output_fingerprint(data)}))
    except OutputFull:
        raise
    except OutputError as exc:
        summary.failed += 1
        on_record(Extraction(source=item.source.name, pages=None, fields={}, model_name=options.model.source,
                             quant=settings["quant"], error=str(exc)))


def _job(options: ExtractRunOptions) -> Job:
    """The engine job the memory plan is made for: every field's question, the longest answer allowed."""
    from monkey_cli.extract.grammar import answer_grammar

    budget = options.extract.max_new_tokens
    longest = max(answer_grammar(item, budget).max_tokens for item in options.schema.fields)
    return Job(
        task="ask",
        questions=tuple(item.question for item in options.schema.fields),
        max_new_tokens=longest,
        batch_size=options.extract.batch_size,
    )


def extract_settings(options: ExtractRunOptions, quant: str) -> dict[str, Any]:
    """Everything that changes a record (the resume fingerprint); batch size and format do not."""
    model, extract = options.model, options.extract
    return {
        "model": model.source,
        "dtype": model.dtype,
        "quant": quant,
        "quant_vision": model.quant_vision,
        "prompt_style": model.prompt_style,
        "adapter": pipeline._adapter_fingerprint(model.adapter),
        "task": "extract",
        "schema_sha256": options.schema.fingerprint,
        "max_new_tokens": extract.max_new_tokens,
        "min_confidence": extract.min_confidence,
        "all_pages": extract.all_pages,
        "null_probability": extract.null_probability,
        "pages": options.pages,
        "size": options.size,
    }

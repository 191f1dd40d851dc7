"""A run on several workers: the same flow as `pipeline.run`, with whole documents handed to workers.

The driver does what a single-process run does before and after the model: it lists the inputs, decides the
quantization once (so that every worker loads the same model and the resume fingerprint is the same as a
single-process run's), skips what an earlier run finished (`pipeline._pending_documents`, the very same
rules), and gives the records out in input order through the same counting and warning code
(`pipeline._per_document`). In between, a backend (`workers.LocalWorkers`: processes on this machine;
`ray_runner.RayCluster`: actors on a Ray cluster) moves whole documents to workers and their records back.

Outputs: each document's file is written as soon as the document is complete, whatever the order (by the
driver for local workers, by the actor itself on Ray), atomically and recorded in the manifest exactly as a
single-process run writes it; so an interrupted run keeps every finished document.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from typing import IO, Any

from monkey_cli import documents, pipeline
from monkey_cli.distributed.protocol import (
    DocumentDone,
    Finished,
    Lost,
    Note,
    NoWorkers,
    ProcessId,
    Received,
    Setup,
    Stage,
    Task,
)
from monkey_cli.distributed.queue import DocumentQueue
from monkey_cli.distributed.worker import save_document
from monkey_cli.engine.pages import IN_FLIGHT_PER_SLOT, DocumentEnd
from monkey_cli.errors import MonkeyWarning
from monkey_cli.output import Record
from monkey_cli.output_folder import OutputFolder, OutputsFilter
from monkey_cli.pipeline import RunOptions, Summary, pipe_hint

logger = logging.getLogger(__name__)


def run(
    options: RunOptions,
    backend_factory: Callable[[], Any],
    *,
    on_record: Callable[[Record], None] = lambda record: None,
    on_document: Callable[[str], None] = lambda name: None,
    on_start: Callable[[int], None] = lambda documents: None,
    on_stage: Callable[[str], None] = lambda stage: None,
    on_page: Callable[[int | None], None] = lambda pages: None,
    stdin: IO[bytes] | bytes | None = None,
) -> Summary:
    """Process every input on the workers `backend_factory()` starts; see `monkey_cli.distributed.run`.

    Progress comes as it happens, whatever the order documents finish in (their records still go out in input
    order): `on_start` first with the number of inputs, then with the number left after resume; `on_page`
    (with the document's page count) as a worker sends a page's first record, `on_document` as a document is
    complete."""
    started = time.perf_counter()
    summary = Summary()
    folder = OutputFolder(options.out_dir, overwrite=options.overwrite) if options.out_dir else None
    backend = None
    clean_end = False
    try:
        pipeline.check_model(options.model)
        sources = documents.expand_inputs(
            list(options.inputs), stdin, exclude=OutputsFilter(folder), pipe_hint=pipe_hint(options.job)
        )
        on_start(len(sources))  # a total from the start: planning memory on a worker's GPU takes a while
        quant = options.model.quant
        if quant in (None, "auto"):  # the memory plan may need a worker's device (a GPU, a cluster's node)
            backend = backend_factory()
            quant = backend.resolve_quant(options)
        settings = pipeline._settings(options, quant)
        pending = pipeline._pending_documents(sources, options, settings, summary, folder)
        on_start(len(pending))
        if pending:
            backend = backend or backend_factory()
            count, note = backend.fit(options, quant, min(backend.count, len(pending)))
            if note:
                logging.getLogger("monkey_cli").warning(note)  # said as a lowered --batch-size is
            setup = _setup(options, quant, settings, backend)
            on_stage(f"starting {count} {backend.noun}{'' if count == 1 else 's'}")
            backend.start(setup, count)
            tasks = [Task(i, item.source, item.target, item.sha256) for i, item in enumerate(pending)]
            work = _Work(setup, tasks, backend, folder, summary, on_stage, on_document, on_page)
            for _name, _records in pipeline._per_document(work.events(), on_record, summary):
                summary.documents += 1
        clean_end = True
    finally:
        try:
            if backend is not None:
                backend.close(graceful=clean_end)
        finally:
            if folder is not None:
                folder.close()
            summary.seconds = time.perf_counter() - started
    return summary


def _setup(options: RunOptions, quant: str, settings: dict[str, Any], backend: Any) -> Setup:
    model = options.model if quant == "auto" else dataclasses.replace(options.model, quant=quant)
    return Setup(
        options=dataclasses.replace(options, model=model),
        quant=quant,
        device=backend.device,
        size=options.size or pipeline.model_input_size(options.model.source),
        settings=settings,
        write=backend.writes,
        window=IN_FLIGHT_PER_SLOT * options.job.batch_size,
        cwd=os.getcwd(),
        verbose=backend.verbose,
        driver=ProcessId.of(os.getpid()),
    )


class _Work:
    """The documents on their way through the workers, and what comes back."""

    def __init__(
        self,
        setup: Setup,
        tasks: list[Task],
        backend: Any,
        folder: OutputFolder | None,
        summary: Summary,
        on_stage: Callable[[str], None],
        on_document: Callable[[str], None] = lambda name: None,
        on_page: Callable[[int | None], None] = lambda pages: None,
    ) -> None:
        self.setup = setup
        self.queue = DocumentQueue(tasks)
        self.backend = backend
        self.folder = folder
        self.summary = summary
        self.on_stage = on_stage
        self.on_document = on_document
        self.on_page = on_page
        self._pages_seen: set[tuple[int, int | None]] = set()  # (document, page) whose progress was counted
        self._stages: set[str] = set()
        self._notes: set[str] = set()
        self._causes: dict[int, list[str]] = {}

    def events(self) -> Iterator[Record | DocumentEnd]:
        """Every document's records and end, in input order, as soon as they can go out."""
        while True:
            yield from self.queue.release()
            if self.queue.finished:
                return
            for event in self.backend.step(self.queue):
                self._apply(event)

    def _apply(self, event: Any) -> None:
        if isinstance(event, Received):
            self.queue.add_record(event.worker, event.index, event.record)
            self._page_progress(event.index, event.record)
        elif isinstance(event, Finished):
            self._finished(event.worker, event.done)
        elif isinstance(event, Lost):
            self._causes.setdefault(event.index, []).append(event.cause)
            task = self.queue.lose(event.worker, event.index)
            if task is not None:
                causes = "; then ".join(self._causes[event.index])
                self._give_up(task, f"not done: tried twice, and both times its {self.backend.noun} died ({causes})")
        elif isinstance(event, Note):
            self._show(event)
        elif isinstance(event, Stage):
            if event.text not in self._stages:  # the first worker to get there sets the stage
                self._stages.add(event.text)
                self.on_stage(event.text)
        elif isinstance(event, NoWorkers):
            for index in self.queue.unfinished:
                self._give_up(self.queue.task(index), f"not done: no {self.backend.noun} left ({event.cause})")

    def _finished(self, worker: Any, done: DocumentDone) -> None:
        for note in done.notes:
            self._show(note)
        if not self.queue.holds(worker, done.index):
            return
        task = self.queue.task(done.index)
        records = [*done.records, *done.write_failures]
        if done.written is not None:
            self.summary.written.append(done.written)
        if self.folder is not None and not self.setup.write and task.target is not None:
            written, failures = save_document(self.folder, self.setup, task, done.records, done.page_errors)
            if written is not None:
                self.summary.written.append(written)
            records += failures
        self.queue.finish(worker, done.index, records)
        for record in done.records:  # a worker that writes its own outputs may send no records on the way
            self._page_progress(done.index, record)
        self.on_document(task.source.name)

    def _give_up(self, task: Task, message: str) -> None:
        """An error record for a document that will not be done; with --out its file says so too (as an
        error of the moment: a rerun tries it again)."""
        record = pipeline._failure(task.source.name, self.setup.options, self.setup.quant, message)
        records = [record]
        if self.folder is not None and task.target is not None:
            everything = [*self.queue.released_records(task.index), record]
            written, failures = save_document(self.folder, self.setup, task, everything, [])
            if written is not None:
                self.summary.written.append(written)
            records += failures
        self.queue.fail(task.index, records)
        self.on_document(task.source.name)

    def _page_progress(self, index: int, record: Record) -> None:
        """Count a page for the progress line the first time one of its records comes from any worker."""
        if record.page is not None and (index, record.page) not in self._pages_seen:
            self._pages_seen.add((index, record.page))
            self.on_page(record.pages)

    def _show(self, note: Note) -> None:
        """A worker's note, once however many workers said it."""
        if note.text in self._notes:
            return
        self._notes.add(note.text)
        if note.warning:
            warnings.warn(note.text, MonkeyWarning, stacklevel=2)
        else:
            logger.log(note.level, note.text)

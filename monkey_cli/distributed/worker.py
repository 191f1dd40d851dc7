"""One model, several whole documents at once: what a local worker process or a Ray actor runs.

`DocumentWorker.process(task)` turns one document into its records exactly as a single-process run does
(the same `documents.iter_pages` and pages `Engine`), and may be called from several threads at once: every
document gets its own `Engine`, and all of them submit to one `EngineLoop` over the worker's one model, so
pages of different documents still share decode batches. The model is loaded on first need, as in a
single-process run (a `read` of born-digital PDFs never loads it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monkey_cli import documents, pipeline
from monkey_cli.distributed.protocol import DocumentDone, Note, Setup, Task
from monkey_cli.errors import MonkeyWarning
from monkey_cli.output import Record
from monkey_cli.output_folder import OutputFolder

# Test hooks, off unless set (tests/test_workers.py and tests/test_ray.py use them to make crashes exact):
# a line `pid attempt name` per document a worker starts, appended to this file ...
WORKER_LOG_ENV = "MONKEY_TEST_WORKER_LOG"
# ... and `NAME[:always]`: the worker SIGKILLs itself at the first record of the document whose name ends with
# NAME, on its first attempt (or on every attempt with `:always`).
KILL_ENV = "MONKEY_TEST_KILL_WORKER"


class DocumentWorker:
    def __init__(
        self,
        setup: Setup,
        *,
        on_stage: Callable[[str], None] = lambda stage: None,
    ) -> None:
        self.setup = setup
        self._on_stage = on_stage
        self._lock = threading.Lock()
        self._model: Any = None
        self._load_error: BaseException | None = None
        self._loop: Any = None
        self._folder: OutputFolder | None = None
        self._write_lock = threading.Lock()  # one manifest update at a time (its file lock is per process)
        self._hooks = _TestHooks.from_environment()

    def process(self, task: Task, on_record: Callable[[Record], None] = lambda record: None) -> DocumentDone:
        """The document's records, in page order (`on_record` gets each as soon as it is ready); a worker
        that writes outputs (`setup.write`) writes the document's file too. Raises MonkeyError when the model
        cannot be loaded (the whole run has to stop, as it would in one process)."""
        from monkey_cli.engine.pages import DocumentEnd, Engine

        self._hooks.started(task)
        options = self.setup.options
        if self._done_by_first_attempt(task):
            return DocumentDone(task.index, [], already_written=True)
        engine = Engine(
            options.job,
            load_model=self._loaded_model,
            model_name=pipeline.model_name(options.model),
            quant=self.setup.quant,
            loop=_SharedLoop(self),
        )
        watched = pipeline._PageErrors()
        pages = documents.iter_pages(
            [task.source],
            size=self.setup.size,
            pages=options.pages,
            password=options.password,
            text_layer=pipeline.reads_text_layer(options.job),
        )
        records: list[Record] = []
        for event in engine.run(watched.watch(pages)):
            if isinstance(event, DocumentEnd):
                continue
            records.append(event)
            self._hooks.record(task)
            on_record(event)
        done = DocumentDone(task.index, records, watched.pop(task.source.name))
        if self.setup.write and task.target is not None:
            with self._write_lock:
                if self._folder is None:
                    options = self.setup.options
                    self._folder = OutputFolder(options.out_dir, overwrite=options.overwrite)
                done.written, done.write_failures = save_document(
                    self._folder, self.setup, task, records, done.page_errors
                )
        return done

    def close(self) -> None:
        """Stop the engine loop and remove this worker's work folder from --out (the model goes with the
        process)."""
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.close()
        with self._write_lock:
            folder, self._folder = self._folder, None
        if folder is not None:
            folder.close()

    # --- the shared model and loop ----------------------------------------------------------------------
    def _loaded_model(self) -> Any:
        with self._lock:
            if self._load_error is not None:
                raise self._load_error
            if self._model is None:
                self._on_stage("loading the model")
                options = self.setup.options
                try:
                    self._model = pipeline._load(options.model, options.job, self.setup.device)
                except BaseException as exc:
                    self._load_error = exc  # every document waiting for the model gets the same error
                    raise
                self._on_stage("answering")
            return self._model

    def _engine_loop(self) -> Any:
        from monkey_cli.engine.loop import EngineLoop

        model = self._loaded_model()
        with self._lock:
            if self._loop is None:
                job_batch = self.setup.options.job.batch_size
                self._loop = EngineLoop(model.scheduler(min(job_batch, getattr(model, "batch_size", 0) or job_batch)))
            return self._loop

    def _done_by_first_attempt(self, task: Task) -> bool:
        """A worker that writes its outputs can die between writing a document and reporting it: a second
        attempt then finds the file done (same input, same settings, intact) and does not redo it. Not with
        --overwrite, where a file from an earlier run looks just the same."""
        setup = self.setup
        if not (setup.write and task.attempt and task.target is not None and task.sha256):
            return False
        if setup.options.overwrite or setup.options.out_dir is None:
            return False
        from monkey_cli.output import ResumeIndex

        with OutputFolder(setup.options.out_dir) as folder:  # opened afresh: the manifest as it is now
            return ResumeIndex(folder).is_done(task.target, task.sha256, setup.settings)


class _SharedLoop:
    """The worker's EngineLoop, started when the first request comes (the model loads then, not before)."""

    def __init__(self, worker: DocumentWorker) -> None:
        self._worker = worker

    def submit(self, request: Any) -> Any:
        return self._worker._engine_loop().submit(request)


def save_document(
    folder: OutputFolder, setup: Setup, task: Task, records: list[Record], page_errors: list[documents.PageError]
) -> tuple[Path | None, list[Record]]:
    """Write one document's file and manifest entry as a single-process run does: the path written (None if
    refused or failed) and the error records of a write that failed. OutputFull (no room) is raised."""
    summary = pipeline.Summary()
    failures: list[Record] = []
    item = pipeline._Pending(task.source, task.target, task.sha256)
    pipeline._save(folder, item, records, page_errors, setup.settings, setup.options, summary, failures.append)
    return (summary.written[0] if summary.written else None), failures


# --- what a worker process says ---------------------------------------------------------------------------


def route_notes(on_note: Callable[[Note], None], verbose: bool) -> None:
    """In a worker process: monkey-cli's log lines and MonkeyWarnings go to `on_note` (the driver shows each
    once); other libraries' warnings and log lines only with --verbose, as in a single-process run."""

    class _Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            own = record.name == "monkey_cli" or record.name.startswith("monkey_cli.")
            if own or (verbose and record.levelno >= logging.WARNING):
                text = record.getMessage().strip()
                if text:
                    on_note(Note(text, level=record.levelno))

    def show(message: Any, category: type[Warning], *_args: Any, **_kwargs: Any) -> None:
        if issubclass(category, MonkeyWarning) or verbose:
            on_note(Note(str(message), warning=True))

    root = logging.getLogger()
    root.addHandler(_Forward(logging.INFO))
    logging.getLogger("monkey_cli").setLevel(logging.INFO)
    warnings.showwarning = show
    warnings.simplefilter("always", MonkeyWarning)


def set_threads(threads: int) -> None:
    """Give this worker its share of the CPU: torch's threads (and the OpenMP libraries' under it)."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)


class _TestHooks:
    def __init__(self, log: str | None, kill: str | None) -> None:
        self._log = log
        self._kill_suffix, _, mode = (kill or "").partition(":")
        self._kill_always = mode == "always"

    @classmethod
    def from_environment(cls) -> _TestHooks:
        return cls(os.environ.get(WORKER_LOG_ENV) or None, os.environ.get(KILL_ENV) or None)

    def started(self, task: Task) -> None:
        if self._log:
            with open(self._log, "a", encoding="utf-8") as log:  # one short append: whole lines, any process
                log.write(f"{os.getpid()} {task.attempt} {task.source.name}\n")

    def record(self, task: Task) -> None:
        if not self._kill_suffix or not task.source.name.endswith(self._kill_suffix):
            return
        if task.attempt == 0 or self._kill_always:
            with contextlib.suppress(OSError):
                os.kill(os.getpid(), signal.SIGKILL)

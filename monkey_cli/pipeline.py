"""The whole flow for a batch of inputs: inputs -> documents -> pages -> engine -> records -> outputs.

`run()` is what `monkey ask|caption|read` call; it is plain Python, usable without the CLI. With an output
folder, every document becomes one file written atomically, and a document whose input hash and settings
match a finished earlier run is skipped (resume); without one, records go to the `on_record` callback only.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from monkey_cli import documents, output
from monkey_cli.engine import DocumentEnd, Engine, Job
from monkey_cli.output import Record


@dataclass(frozen=True)
class ModelOptions:
    source: str
    device: str = "auto"
    dtype: str | None = None
    quant: str | None = None
    quant_vision: bool = False
    prompt_style: str = "auto"
    compile: bool | None = None  # None: on for CUDA, off for the CPU


@dataclass(frozen=True)
class RunOptions:
    inputs: tuple[str, ...]
    job: Job
    model: ModelOptions
    pages: str | None = None
    password: str | None = None
    size: str | None = None  # pages are rendered at this size (default: the model's input size)
    out_dir: Path | None = None
    fmt: str = "text"
    overwrite: bool = False


@dataclass
class Summary:
    documents: int = 0
    pages: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    written: list[Path] = field(default_factory=list)

    def line(self) -> str:
        skipped = f", {self.skipped} already done" if self.skipped else ""
        counts = f"{_count(self.documents, 'document')}, {_count(self.pages, 'page')}, {self.failed} failed"
        return f"{counts}{skipped}, {self.seconds:.1f} s"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


@dataclass
class _Pending:
    """A document to process: its source and, with an output folder, where it goes and its input hash."""

    source: documents.Source
    target: Path | None = None
    sha256: str | None = None


def run(
    options: RunOptions,
    *,
    on_record: Callable[[Record], None] = lambda record: None,
    on_document: Callable[[str], None] = lambda name: None,
    on_start: Callable[[int], None] = lambda documents: None,
    on_stage: Callable[[str], None] = lambda stage: None,
    stdin: IO[bytes] | bytes | None = None,
    streamer_factory: Callable[[Any], Any] | None = None,
    load_model: Callable[[], Any] | None = None,
) -> Summary:
    """Process every input; returns counts. KeyboardInterrupt propagates after finished documents are saved.

    `on_start` gets the number of documents to do (after resume), `on_stage` each stage as it begins
    ("rendering", "loading the model", "answering"), `on_record` and `on_document` the results.
    """
    started = time.perf_counter()
    summary = Summary()
    sources = documents.expand_inputs(list(options.inputs), stdin)
    device, quant = _device_and_quant(options.model, options.job)
    settings = _settings(options, quant)
    index = output.ResumeIndex(options.out_dir) if options.out_dir else None
    pending = _pending_documents(sources, options, settings, summary, index)
    on_start(len(pending))
    on_stage("rendering")

    def load() -> Any:
        on_stage("loading the model")
        model = (load_model or (lambda: _load(options.model, options.job, device)))()
        on_stage("answering")
        return model

    engine = Engine(
        options.job,
        load_model=load,
        model_name=options.model.source,
        quant=quant,
        streamer_factory=streamer_factory,
    )
    by_name = {item.source.name: item for item in pending}
    # Rendered lazily: the engine renders and preprocesses ahead on its own thread while the model works.
    pages = documents.iter_pages(
        [item.source for item in pending],
        size=options.size or model_input_size(options.model.source),
        pages=options.pages,
        password=options.password,
    )
    try:
        for name, records in _per_document(engine.run(pages), on_record, summary):
            on_document(name)
            summary.documents += 1
            item = by_name.get(name)
            if index is not None and item is not None and item.target is not None:
                output.write_document(item.target, records, options.fmt)
                index.update(item.target, item.sha256, settings, records)
                summary.written.append(item.target)
    finally:
        summary.seconds = time.perf_counter() - started
    return summary


def _per_document(
    events: Iterator[Record | DocumentEnd], on_record: Callable[[Record], None], summary: Summary
) -> Iterator[tuple[str, list[Record]]]:
    """Group the (input-ordered) records by document, counting pages and failures on the way."""
    groups: dict[str, list[Record]] = {}
    for event in events:
        if isinstance(event, DocumentEnd):
            yield event.source, groups.pop(event.source, [])
            continue
        on_record(event)
        group = groups.setdefault(event.source, [])
        if event.page is not None and all(r.page != event.page for r in group):
            summary.pages += 1
        if event.error is not None:
            summary.failed += 1
        group.append(event)


def _pending_documents(
    sources: list[documents.Source],
    options: RunOptions,
    settings: dict[str, Any],
    summary: Summary,
    index: output.ResumeIndex | None,
) -> list[_Pending]:
    """Sources still to do: with an output folder, those whose output is missing or out of date."""
    if index is None:
        return [_Pending(source) for source in sources]
    output.cleanup_stale_temps(options.out_dir)
    root = output.common_root([s.path for s in sources if s.path is not None])
    pending = []
    for source in sources:
        if source.error is not None:
            pending.append(_Pending(source))
            continue
        shown = output.STDIN if source.data is not None else str(source.path)
        target = output.output_path(options.out_dir, shown, options.fmt, root)
        sha = hashlib.sha256(source.data).hexdigest() if source.data is not None else output.file_sha256(source.path)
        if not options.overwrite and index.is_done(target, sha, settings):
            summary.skipped += 1
            continue
        pending.append(_Pending(source, target, sha))
    return pending


def _settings(options: RunOptions, quant: str) -> dict[str, Any]:
    """Everything that changes an answer (the resume fingerprint); batch size and format do not."""
    job = options.job
    return {
        "model": options.model.source,
        "dtype": options.model.dtype,
        "quant": quant,
        "quant_vision": options.model.quant_vision,
        "prompt_style": options.model.prompt_style,
        "task": job.task,
        "questions": [str(question) for question in job.questions],
        "template": job.template,
        "max_new_tokens": job.max_new_tokens,
        "force_ocr": job.force_ocr,
        "pages": options.pages,
        "size": options.size,
    }


def _device_and_quant(model: ModelOptions, job: Job) -> tuple[str, str]:
    """The device, and the quantization loading will use (what resume fingerprints and records name).

    For --quant auto that is the memory plan's choice, made here from the config alone; when nothing fits
    the answer stays "auto" and loading, if a page needs the model, says what would fit.
    """
    from monkey_cli.api import Monkey
    from monkey_cli.model.memory import MemoryBudgetError
    from monkey_cli.model.sources import resolve_device

    device = resolve_device(model.device)
    if model.quant not in (None, "auto"):
        return device, model.quant
    try:
        return device, Monkey.choose(model.source, **_plan_options(model, job, device)).plan.quant
    except MemoryBudgetError:
        return device, "auto"


def _load(model: ModelOptions, job: Job, device: str) -> Any:
    from monkey_cli.api import Monkey

    prompts = [prompt for _shown, prompt, error in job.prompts(chat=True) if error is None]
    options = _plan_options(model, job, device)
    return Monkey.load(
        model.source,
        quant=model.quant,
        prompt_style=model.prompt_style,
        prompts=prompts,
        compile=model.compile,
        **options,
    )


def _plan_options(model: ModelOptions, job: Job, device: str) -> dict[str, Any]:
    """What the memory plan of a run depends on, besides the quantization."""
    return {
        "device": device,
        "dtype": model.dtype,
        "quant_vision": model.quant_vision,
        "batch_size": job.batch_size,
        "max_new_tokens": job.max_new_tokens,
    }


def model_input_size(source: str) -> tuple[int, int]:
    """The page size the model reads, from the checkpoint's config without loading (or downloading) weights."""
    from monkey_cli.model.sources import peek_config

    config = peek_config(source)
    return config.vision.input_size

"""The whole flow for a batch of inputs: inputs -> documents -> pages -> engine -> records -> outputs.

`run()` is what `monkey ask|caption|read` call; it is plain Python, usable without the CLI. With an output
folder, every document becomes one file of its own (names planned before any work, never shared), written
atomically through `monkey_cli.output_folder` (nothing outside the folder, no file monkey did not write
replaced), and a document whose input hash and settings match a finished earlier run is skipped (resume);
without one, records go to the `on_record` callback only. Files monkey wrote (listed in a manifest) and the
output folder itself are never read as inputs.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from monkey_cli import documents, output
from monkey_cli.engine import DocumentEnd, Engine, Job
from monkey_cli.errors import DocumentError, MonkeyWarning
from monkey_cli.output import Record
from monkey_cli.output_folder import OutputError, OutputFolder, OutputFull, OutputsFilter


@dataclass(frozen=True)
class ModelOptions:
    source: str
    device: str = "auto"
    dtype: str | None = None
    quant: str | None = None
    quant_vision: bool = False
    prompt_style: str = "auto"
    compile: bool | None = None  # None: decided from the work (Monkey.load; never on the CPU)
    adapter: str | None = None  # a LoRA adapter folder (monkey finetune) applied on top of `source`
    family: str | None = None  # "monkey" or "textmonkey" (--family); None: the checkpoint's config says


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
    retry_failed: bool = False
    overlay_dir: Path | None = None  # each page with its text positions drawn (spot, ask --ground), as PNGs here


@dataclass
class Summary:
    documents: int = 0
    pages: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    written: list[Path] = field(default_factory=list)

    def line(self, out_dir: Path | None = None) -> str:
        """`3 documents, 5 pages, 0 failed, 4.2 s`; with an output folder, also where the files went."""
        skipped = f", {self.skipped} already done" if self.skipped else ""
        counts = f"{_count(self.documents, 'document')}, {_count(self.pages, 'page')}, {self.failed} failed"
        where = "" if out_dir is None else f"; results in {out_dir} ({_count(len(self.written), 'file')} written)"
        return f"{counts}{skipped}, {self.seconds:.1f} s{where}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


@dataclass
class _Pending:
    """A document to process: its source and, with an output folder, its output file and its input hash."""

    source: documents.Source
    target: PurePosixPath | None = None
    sha256: str | None = None


def run(
    options: RunOptions,
    *,
    on_record: Callable[[Record], None] = lambda record: None,
    on_document: Callable[[str], None] = lambda name: None,
    on_start: Callable[[int], None] = lambda documents: None,
    on_stage: Callable[[str], None] = lambda stage: None,
    stdin: IO[bytes] | bytes | None = None,
    streamer_factory: Callable[[Any, Any, str], Any] | None = None,
    load_model: Callable[[], Any] | None = None,
) -> Summary:
    """Process every input; returns counts. KeyboardInterrupt propagates after finished documents are saved.

    `on_start` gets the number of documents to do (after resume), `on_stage` each stage as it begins
    ("rendering", "loading the model", "answering"), `on_record` and `on_document` the results.
    With an output folder, `OutputFull` (a MonkeyError) stops the run when the disk is full; every other
    problem is an error record for its document and the run goes on.
    """
    started = time.perf_counter()
    summary = Summary()
    folder = OutputFolder(options.out_dir, overwrite=options.overwrite) if options.out_dir else None

    def load(device: str) -> Any:
        on_stage("loading the model")
        model = (load_model or (lambda: _load(options.model, options.job, device)))()
        on_stage("answering")
        return model

    overlays = OutputFolder(options.overlay_dir, overwrite=options.overwrite) if options.overlay_dir else None
    try:
        check_model(options.model)
        check_family_task(options.model, options.job)
        sources = documents.expand_inputs(
            list(options.inputs), stdin, exclude=_outputs_filter(folder, overlays), pipe_hint=pipe_hint(options.job)
        )
        device, quant = _device_and_quant(options.model, options.job)
        settings = _settings(options, quant)
        pending = _pending_documents(sources, options, settings, summary, folder)
        on_start(len(pending))
        on_stage("rendering")
        engine = Engine(
            options.job,
            load_model=lambda: load(device),
            model_name=model_name(options.model),
            quant=quant,
            streamer_factory=streamer_factory,
        )
        by_name = {item.source.name: item for item in pending}
        overlay_dirs = _overlay_dirs([item.source for item in pending], overlays)
        page_errors = _PageErrors()
        # Rendered lazily: the engine renders and preprocesses ahead on its own thread while the model works.
        pages = documents.iter_pages(
            [item.source for item in pending],
            size=options.size or model_input_size(options.model.source, options.model.family),
            pages=options.pages,
            password=options.password,
            text_layer=reads_text_layer(options.job),
        )
        for name, records in _per_document(engine.run(page_errors.watch(pages)), on_record, summary):
            on_document(name)
            summary.documents += 1
            item = by_name.get(name)
            errors = page_errors.pop(name)
            if folder is not None and item is not None and item.target is not None:
                _save(folder, item, records, errors, settings, options, summary, on_record)
            if overlays is not None and item is not None and item.source.name in overlay_dirs:
                directory = overlay_dirs[item.source.name]
                _save_overlays(overlays, directory, item.source, records, options, on_record, summary)
    finally:
        if folder is not None:
            folder.close()
        if overlays is not None:
            overlays.close()
        summary.seconds = time.perf_counter() - started
    return summary


def model_name(model: ModelOptions) -> str:
    """The model as records name it: as the user named it, a cache snapshot folder by its hub id."""
    from monkey_cli.model.sources import display_name

    return display_name(model.source)


def pipe_hint(job: Job) -> str:
    """The command that reads one document from standard input, as the error for a URL input suggests it."""
    return f"monkey {job.task} -" + (" -q QUESTION" if job.task == "ask" else "")


def reads_text_layer(job: Job) -> bool:
    """Whether the run answers PDF pages from their text layers (`read`, unless --force-ocr or --prompt):
    only then are text layers converted (and judged) as pages are made."""
    return job.task == "read" and not job.force_ocr and job.template is None


class _PageErrors:
    """The document problems that went into the engine, per source: they tell a permanent failure."""

    def __init__(self) -> None:
        self._by_source: dict[str, list[documents.PageError]] = {}

    def watch(self, pages: Iterable[documents.Record]) -> Iterator[documents.Record]:
        for item in pages:
            if isinstance(item, documents.PageError):
                self._by_source.setdefault(item.source, []).append(item)
            yield item

    def pop(self, source: str) -> list[documents.PageError]:
        return self._by_source.pop(source, [])


def _save(
    folder: OutputFolder,
    item: _Pending,
    records: list[Record],
    page_errors: list[documents.PageError],
    settings: dict[str, Any],
    options: RunOptions,
    summary: Summary,
    on_record: Callable[[Record], None],
) -> None:
    """Write one document's file and its manifest entry; a refused or failed write is an error record."""
    failed = [record for record in records if not record.ok]
    if options.fmt == "pdf" and len(failed) == len(records):
        return  # a searchable PDF of nothing: the errors are reported, no file is made (a rerun tries again)
    # Permanent: every error came from the document itself (same bytes, same settings, same error).
    permanent = len(failed) == len(page_errors) and not any(error.transient for error in page_errors)
    entry = output.ResumeIndex.entry(item.sha256 or "", settings, records, permanent=permanent)
    try:
        summary.written.append(
            output.write_document(
                folder, item.target, records, options.fmt, entry, source=item.source, password=options.password
            )
        )
    except OutputFull:
        raise
    except (OutputError, DocumentError) as exc:  # DocumentError: a searchable PDF's document cannot be reopened
        summary.failed += 1
        on_record(_failure(item.source.name, options, settings["quant"], str(exc)))


def _save_overlays(
    overlays: OutputFolder,
    directory: PurePosixPath,
    source: documents.Source,
    records: list[Record],
    options: RunOptions,
    on_record: Callable[[Record], None],
    summary: Summary,
) -> None:
    """One overlay PNG per page with positions; a page that cannot be drawn or written is an error record."""
    from monkey_cli.grounding.files import write_overlays

    try:
        summary.written += write_overlays(overlays, directory, source, records, options.password)
    except OutputFull:
        raise
    except (OutputError, DocumentError) as exc:
        summary.failed += 1
        on_record(_failure(source.name, options, records[0].quant if records else "none", f"overlay: {exc}"))


def _overlay_dirs(sources: list[documents.Source], overlays: OutputFolder | None) -> dict[str, PurePosixPath]:
    """The folder under --overlay DIR of each document (its path relative to the inputs' common folder)."""
    if overlays is None:
        return {}
    from monkey_cli.render import output_dirs

    return {name: PurePosixPath(path.as_posix()) for name, path in output_dirs(sources, Path()).items()}


def _outputs_filter(folder: OutputFolder | None, overlays: OutputFolder | None) -> Callable[[Path], str | None]:
    """What is never read as an input: the output folder's files, and the overlay folder's (outputs too)."""
    filters = [OutputsFilter(folder)] + ([OutputsFilter(overlays)] if overlays is not None else [])
    return lambda path: next((why for check in filters if (why := check(path)) is not None), None)


def check_model(model: ModelOptions) -> None:
    """Before any input is read: a --model that is neither a folder nor a hub id is one line (ModelSourceError),
    even for a run that would never load it (every page read from its text layer)."""
    from monkey_cli.model.sources import check_source

    check_source(model.source)


def check_family_task(model: ModelOptions, job: Job) -> None:
    """A task the checkpoint's family was not trained for (text positions from Monkey, a caption from TextMonkey)
    is refused in one line before any work; a --prompt template is the user's own and always goes."""
    from monkey_cli.model.sources import peek_config

    if not job.positions and (job.template is not None or job.task != "caption"):
        return
    check_family_job(peek_config(model.source, model.family).family, job)


def check_family_job(family: str, job: Job) -> None:
    """`check_family_task` for a model whose family is known (a server's, say)."""
    from monkey_cli import tasks

    if job.positions and not tasks.prompt_forms(family).positions:
        raise tasks.refuse_positions(family)
    if job.task == "caption" and job.template is None:
        tasks.caption_prompt(family=family)  # raises UnsupportedTask for a family without one


def _failure(source: str, options: RunOptions, quant: str, message: str) -> Record:
    job = options.job
    prompt = job.questions[0] if job.task == "ask" and len(job.questions) == 1 else job.task
    return Record.failure(
        error=message,
        source=source,
        page=None,
        pages=None,
        task=job.task,
        prompt=prompt,
        model=model_name(options.model),
        quant=quant,
    )


def _per_document(
    events: Iterator[Record | DocumentEnd], on_record: Callable[[Record], None], summary: Summary
) -> Iterator[tuple[str, list[Record]]]:
    """Group the (input-ordered) records by document, counting pages and failures on the way; a page's
    warnings reach the user once (as a MonkeyWarning) as well as its records."""
    groups: dict[str, list[Record]] = {}
    for event in events:
        if isinstance(event, DocumentEnd):
            yield event.source, groups.pop(event.source, [])
            continue
        on_record(event)
        group = groups.setdefault(event.source, [])
        if all(r.page != event.page for r in group):
            for note in event.warnings:
                warnings.warn(f"{event.location}: {note}", MonkeyWarning, stacklevel=2)
            if event.page is not None:
                summary.pages += 1
        if event.error is not None:
            summary.failed += 1
        group.append(event)


def _pending_documents(
    sources: list[documents.Source],
    options: RunOptions,
    settings: dict[str, Any],
    summary: Summary,
    folder: OutputFolder | None,
) -> list[_Pending]:
    """Sources still to do, each with its own output file. Before any work: outputs that cannot be written
    (a file monkey did not write is in the way, a link on the way) and inputs that cannot be read become
    errors for their document; finished documents are skipped; documents that failed for good with these
    settings are reported again without being redone (unless --retry-failed or --overwrite)."""
    if folder is None:
        return [_Pending(source) for source in sources]
    usable = [source for source in sources if source.error is None]
    root = output.common_root([source.path for source in usable if source.path is not None])
    targets = output.plan_outputs(
        {source.name: source.path for source in usable}, options.fmt, root, blocked=folder.blocked
    )
    index = output.ResumeIndex(folder)
    pending = []
    for source in sources:
        if source.error is not None:
            pending.append(_Pending(source))
            continue
        target = targets[source.name]
        problem = folder.check(target)
        if problem is None:
            try:
                sha = documents.source_sha256(source)
            except (OSError, DocumentError) as exc:
                problem = f"cannot read: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
        if problem is not None:
            pending.append(_Pending(dataclasses.replace(source, data=None, error=problem)))
            continue
        if not options.overwrite:
            if index.is_done(target, sha, settings):
                summary.skipped += 1
                continue
            recorded = index.recorded_errors(target, sha, settings)
            if recorded is not None and not options.retry_failed:
                more = f" (and {len(recorded) - 1} more)" if len(recorded) > 1 else ""
                message = f"{recorded[0]}{more}; as in an earlier run with these settings (--retry-failed redoes it)"
                pending.append(_Pending(dataclasses.replace(source, data=None, error=message)))
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
        "adapter": _adapter_fingerprint(options.model.adapter),
        "family": options.model.family,
        "positions": job.positions or None,  # None when off: older runs' fingerprints stay valid
        "task": job.task,
        "questions": [str(question) for question in job.questions],
        "template": job.template,
        "max_new_tokens": job.max_new_tokens,
        "force_ocr": job.force_ocr,
        "pages": options.pages,
        "size": options.size,
    }


def _adapter_fingerprint(adapter: str | None) -> str | None:
    """The adapter's content hash: a rerun with a retrained adapter redoes the documents."""
    if adapter is None:
        return None
    from monkey_cli.finetune.adapters import adapter_fingerprint

    return adapter_fingerprint(adapter)


def _device_and_quant(model: ModelOptions, job: Job) -> tuple[str, str]:
    """The device, and the quantization loading will use (what resume fingerprints and records name).

    For --quant auto that is the memory plan's choice, made here from the config alone; when nothing fits
    the answer stays "auto" and loading, if a page needs the model, says what would fit.
    """
    from monkey_cli.model.sources import resolve_device

    device = resolve_device(model.device)
    return device, quant_choice(model, job, device)[0]


def quant_choice(model: ModelOptions, job: Job, device: str) -> tuple[str, Any]:
    """The quantization loading on `device` will use, and for --quant auto the memory plan's `Choice` (whose
    notes say what it chose and why: `api.say_choice` logs them); ("auto", None) when nothing fits (loading
    then says so)."""
    from monkey_cli.api import Monkey
    from monkey_cli.model.memory import MemoryBudgetError

    if model.quant not in (None, "auto"):
        return model.quant, None
    try:
        choice = Monkey.choose(model.source, **_plan_options(model, job, device))
    except MemoryBudgetError:
        return "auto", None
    return choice.plan.quant, choice


def _load(model: ModelOptions, job: Job, device: str) -> Any:
    from monkey_cli.api import Monkey
    from monkey_cli.model.sources import peek_config

    family = peek_config(model.source, model.family).family
    prompts = [prompt for _shown, prompt, error in job.prompts(chat=True, family=family) if error is None]
    options = _plan_options(model, job, device)
    return Monkey.load(
        model.source,
        quant=model.quant,
        prompt_style=model.prompt_style,
        prompts=prompts,
        compile=model.compile,
        adapter=model.adapter,
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
        "family": model.family,
    }


def model_input_size(source: str, family: str | None = None) -> tuple[int, int]:
    """The page size the model reads, from the checkpoint's config without loading (or downloading) weights."""
    from monkey_cli.model.sources import peek_config

    config = peek_config(source, family)
    return config.vision.input_size

"""Run a model over VQA datasets: batched greedy answers, appended as they come, resumable, then scored.

The runner needs only an object with

    generate(images: list[PIL.Image | str | Path], prompts: list[str], max_new_tokens: int,
             min_new_tokens: int) -> list[str]

(`monkey_cli.Monkey` has it), so its logic runs in tests with a small fake model.

Files written in the output folder, per dataset NAME:
  NAME.predictions.jsonl   one answer per line, appended and flushed after every batch; a rerun skips the
                           question ids already in it (resume after an interruption or a crash)
  NAME.errors.jsonl        the items that could not be answered in the LAST run (bad line, missing field,
                           missing image, generation error); they are retried by the next run
and for the whole run: results.json (merged with earlier runs' datasets) and results.md (a table).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from monkey_cli.errors import UsageError
from monkey_cli.evaluation.datasets import (
    EvalTask,
    ItemError,
    VQAAnnotation,
    VQAItem,
    format_prompt,
    image_search_description,
    iter_json_lines,
    load_vqa_annotations,
    question_key,
    read_items,
    resolve_image,
)
from monkey_cli.evaluation.scoring import ScoreReport, record_question_id, score_records
from monkey_cli.output_folder import OutputFolder
from monkey_cli.printing import json_text, terminal_text

RESULTS_SCHEMA = "monkey-cli/eval-results/1"
RESULTS_JSON = "results.json"
RESULTS_MARKDOWN = "results.md"
_MAX_RESULTS_BYTES = 64 << 20
_SETTINGS_MAX_BYTES = 1 << 20
# Settings that do not change the answers (where the model ran; the adapter's path, its hash is compared).
_SETTINGS_NOT_COMPARED = ("device", "adapter")

Reporter = Callable[[str], None]

METRIC_LABELS = {
    "anls": "ANLS",
    "relaxed_accuracy": "Relaxed accuracy",
    "accuracy": "Accuracy",
    "vqa_score": "VQA score",
}


class AnswerModel(Protocol):
    """What the runner needs from a model: greedy answers, one per (image, prompt) pair."""

    def generate(
        self, images: list[Any], prompts: list[str], max_new_tokens: int, min_new_tokens: int
    ) -> list[str]: ...


def _stderr_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def predictions_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.predictions.jsonl"


def errors_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.errors.jsonl"


@dataclass
class DatasetRun:
    """The outcome of evaluating one dataset."""

    task: EvalTask
    items: int  # entries of the data file (after --limit), good or bad
    generated: int  # answered by this run
    resumed: int  # answered by an earlier run and skipped
    failed: int  # could not be answered in this run (see the errors file)
    report: ScoreReport
    predictions_file: Path
    errors_file: Path | None

    @property
    def score(self) -> float | None:
        return self.report.result.score if self.report.result.n else None

    def to_dict(self) -> dict[str, Any]:
        result = self.report.result
        scored = result.n > 0
        return {
            "dataset": self.task.name,
            "metric": self.task.metric,
            "gqa_postprocess": self.task.gqa_postprocess,
            "score": result.score if scored else None,
            "percent": result.percent if scored else None,
            **(result.details if scored else {}),
            "n_scored": result.n,
            "n_items": self.items,
            "n_failed": self.failed,
            "n_generated": self.generated,
            "n_resumed": self.resumed,
            "complete": self.failed == 0 and result.n == self.items,
            "max_new_tokens": self.task.max_new_tokens,
            "prompt": self.task.prompt,
            "data_file": str(self.task.data_file),
            "annotations_file": str(self.task.annotations_file) if self.task.annotations_file else None,
            "predictions": self.predictions_file.name,
            "errors": self.errors_file.name if self.errors_file else None,
        }


# --------------------------------------------------------------------------------------------------
# One dataset
# --------------------------------------------------------------------------------------------------


def run_task(
    model: AnswerModel,
    task: EvalTask,
    out_dir: Path | OutputFolder,
    *,
    batch_size: int = 1,
    limit: int | None = None,
    report: Reporter | None = None,
    show_progress: bool = False,
    settings: dict[str, Any] | None = None,
) -> DatasetRun:
    """Answer every not-yet-answered item of `task`, appending to its predictions file, then score it.

    `settings` (how the model runs: its name, device, dtype, quantization, adapter hash) are kept beside the
    predictions with the task's prompt and answer length; resuming with other settings is a UsageError, since
    the score would mix two runs' answers.

    Bad items are reported (one line each through `report`, stderr by default), recorded in the errors
    file, and skipped. A KeyboardInterrupt propagates after the finished batches have been saved. Files
    are written through `monkey_cli.output_folder` (no link followed, nothing outside `out_dir`).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    report = report or _stderr_line
    with _opened(out_dir) as folder:
        vqa_annotations = (
            load_vqa_annotations(task.annotations_file, task.questions_file) if task.annotations_file else None
        )
        items, read_errors = _task_items(task, vqa_annotations, limit)
        predictions_name = predictions_path(Path(), task.name).name
        answered = _answered(folder, predictions_name, report)
        if settings is not None:
            _keep_settings(folder, task, settings, predictions_name, resuming=bool(answered))
        pending = [item for item in items if item.key not in answered]

        errors = _ErrorLog(folder, errors_path(Path(), task.name).name, task.name, report)
        try:
            errors.add_all(read_errors)
            with (
                _PredictionWriter(folder, predictions_name, task.name) as writer,
                _progress(show_progress, task.name, len(pending)) as advance,
            ):
                for batch in _loaded_batches(pending, task, batch_size, errors, advance):
                    for item, answer, error in _answer_batch(model, batch, task):
                        if error is None:
                            writer.add(item, task, answer)
                        else:
                            errors.add(error)
                    writer.flush()
                    advance(len(batch))
        finally:
            errors.close()

        score = _score_task(task, items, folder, predictions_name, vqa_annotations)
        predictions_file = folder.root / predictions_name
        errors_file = folder.root / errors.name
    return DatasetRun(
        task=task,
        items=len(items) + len(read_errors),
        generated=writer.count,
        resumed=len(items) - len(pending),
        failed=errors.count,
        report=score,
        predictions_file=predictions_file,
        errors_file=errors_file if errors.count else None,
    )


@contextmanager
def _opened(out_dir: Path | OutputFolder) -> Iterator[OutputFolder]:
    """The output folder (opened here and closed after, unless the caller passes one it keeps open).

    The files in it are the evaluation's own, by name (an earlier version wrote them without a manifest),
    so the folder is opened to replace them: still nothing is written outside it or through a link."""
    if isinstance(out_dir, OutputFolder):
        yield out_dir
        return
    with OutputFolder(out_dir, overwrite=True) as folder:
        yield folder


def _task_items(
    task: EvalTask, vqa_annotations: dict[str, VQAAnnotation] | None, limit: int | None
) -> tuple[list[VQAItem], list[ItemError]]:
    """Valid items and the errors for bad entries, in file order, the first `limit` entries only."""
    items: list[VQAItem] = []
    errors: list[ItemError] = []
    for entry in read_items(task.data_file, require_answer=vqa_annotations is None):
        if limit is not None and len(items) + len(errors) >= limit:
            break
        if isinstance(entry, VQAItem) and vqa_annotations is not None and entry.key not in vqa_annotations:
            entry = ItemError(
                str(task.data_file),
                entry.line,
                "question_id not found in the VQA annotation/question files",
                question_id=entry.question_id,
                image=entry.image,
            )
        (items if isinstance(entry, VQAItem) else errors).append(entry)
    return items, errors


def settings_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.settings.json"


def _keep_settings(
    folder: OutputFolder, task: EvalTask, settings: dict[str, Any], predictions_name: str, *, resuming: bool
) -> None:
    """Record the run's settings beside a dataset's predictions, or, on a resume, check they are the same."""
    current = {key: value for key, value in settings.items() if key not in _SETTINGS_NOT_COMPARED}
    current |= {"prompt": task.prompt, "max_new_tokens": task.max_new_tokens}
    name = settings_path(Path(), task.name).name
    if resuming:
        earlier = _read_settings(folder, name)
        if earlier == current:
            return
        if earlier is not None:
            keys = current.keys() | earlier.keys()
            changed = ", ".join(sorted(key for key in keys if current.get(key) != earlier.get(key)))
            raise UsageError(
                f"{folder.shown(predictions_name)} holds answers made with other settings (changed: {changed}); "
                f"use another --out, or delete {folder.shown(predictions_name)} to start {task.name} over"
            )
    folder.write(name, (json_text(current, indent=2) + "\n").encode("utf-8"))


def _read_settings(folder: OutputFolder, name: str) -> dict[str, Any] | None:
    """The recorded settings; None when there are none (a run from before they were kept) or they are damaged."""
    handle = folder.open_read(name)
    if handle is None:
        return None
    with handle:
        text = handle.read(_SETTINGS_MAX_BYTES + 1)
    try:
        value = json.loads(text) if len(text) <= _SETTINGS_MAX_BYTES else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _answered(folder: OutputFolder, name: str, report: Reporter) -> dict[str, dict[str, Any]]:
    """Question key -> first answered record of an existing predictions file (the resume state)."""
    answered: dict[str, dict[str, Any]] = {}
    handle = folder.open_read(name)
    if handle is None:
        return answered
    shown = folder.shown(name)
    with handle:
        for line, record in iter_json_lines(Path(shown), handle=handle):
            if isinstance(record, ItemError):
                # Only a line cut short by a kill is expected here; it is re-asked, not fatal.
                report(f"{record}; line ignored")
                continue
            question_id = record_question_id(record) if isinstance(record, dict) else None
            if not isinstance(record.get("answer") if isinstance(record, dict) else None, str) or not (
                isinstance(question_id, str) or (isinstance(question_id, int) and not isinstance(question_id, bool))
            ):
                report(f"{shown}:{line}: not a prediction record (answer and question id); line ignored")
                continue
            answered.setdefault(question_key(question_id), record)
    return answered


@dataclass
class _Loaded:
    item: VQAItem
    image: Any  # a loaded PIL image


def _loaded_batches(
    pending: Sequence[VQAItem],
    task: EvalTask,
    batch_size: int,
    errors: _ErrorLog,
    advance: Callable[[int], None],
) -> Iterator[list[_Loaded]]:
    """Full batches of items whose image opened; items whose image did not are recorded and skipped."""
    batch: list[_Loaded] = []
    for item in pending:
        image_or_error = _open_image(item, task)
        if isinstance(image_or_error, ItemError):
            errors.add(image_or_error)
            advance(1)
            continue
        batch.append(_Loaded(item, image_or_error))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _open_image(item: VQAItem, task: EvalTask) -> Any:
    """The item's image, or an ItemError saying in one line why not.

    An image file opens as the original's evaluation opens it (Pillow, as stored). A PDF gives its first
    page, or page N for `doc.pdf#page=N` (any document with `#page=N`: a TIFF's frame N), rendered by the
    same document loader as `monkey ask`.
    """
    from PIL import Image, UnidentifiedImageError

    from monkey_cli.documents import BYTES_PER_ALLOWED_PIXEL, DEFAULT_MAX_PIXELS, open_regular, sniff_type
    from monkey_cli.documents.images import bytes_per_pixel
    from monkey_cli.documents.types import HEAD_BYTES, describe_unsupported

    def error(message: str) -> ItemError:
        return ItemError(str(task.data_file), item.line, message, question_id=item.question_id, image=item.image)

    name, page = _page_of(item.image)
    kind = "image"
    if page == 0:
        return error(f"image {item.image}: pages are numbered from 1")
    path = resolve_image(name, task)
    if path is None:
        return error(f"image {name} not found (looked in: {image_search_description(task)})")
    try:
        with open_regular(path) as stream:  # never a FIFO or a device, whatever the data file names
            kind = sniff_type(stream.read(HEAD_BYTES))
            if kind is None:
                stream.seek(0)
                return error(f"image {path}: {describe_unsupported(stream.read(HEAD_BYTES))}")
            if kind == "pdf" or page is not None:
                return _document_page(path, page, error)
            stream.seek(0)
            image = Image.open(stream)
            decoded = image.width * image.height * bytes_per_pixel(image.mode)
            if decoded > BYTES_PER_ALLOWED_PIXEL * DEFAULT_MAX_PIXELS:
                return error(f"image {path} would take {decoded:,} bytes decoded (possible decompression bomb)")
            image.load()  # decode now, so a truncated file fails here and not inside a batch
    except UnidentifiedImageError:  # its first bytes say one thing, the rest is not that
        return error(f"image {path}: cannot read it (damaged: it starts like a {kind.upper()} image, but is not one)")
    except Exception as exc:  # PIL raises OSError, ValueError, DecompressionBombError, ...
        return error(f"image {path}: cannot read it ({_message(exc)})")
    return image


_PAGE_FRAGMENT = re.compile(r"(.*)#page=(\d+)")


def _page_of(image: str) -> tuple[str, int | None]:
    """`doc.pdf#page=2` -> ("doc.pdf", 2); a path without the fragment -> (path, None)."""
    match = _PAGE_FRAGMENT.fullmatch(image)
    return (match.group(1), int(match.group(2))) if match else (image, None)


def _document_page(path: Path, page: int | None, error: Callable[[str], ItemError]) -> Any:
    """Page `page` (default 1) of a PDF or multi-frame image, at the released checkpoints' input size (the
    model's processor resizes anything else to its own)."""
    from monkey_cli.documents import DEFAULT_SIZE, PageError, iter_pages

    records = iter_pages([path], size=DEFAULT_SIZE, pages=[page or 1], text_layer=False)
    try:
        record = next(records, None)
    finally:
        records.close()
    if isinstance(record, PageError):
        if record.page is None and record.pages is not None and (page or 1) > record.pages:
            return error(f"image {path}#page={page}: no such page (the document has {record.pages})")
        return error(f"image {path}{'' if page is None else f'#page={page}'}: {record.message}")
    if record is None:
        return error(f"image {path}: no page")
    return record.image


def _answer_batch(
    model: AnswerModel, batch: list[_Loaded], task: EvalTask
) -> list[tuple[VQAItem, str | None, ItemError | None]]:
    """Answers for a batch; if the batch fails, each item is retried alone so one bad item costs only itself."""
    try:
        answers = _generate(model, batch, task)
    except Exception as exc:
        if len(batch) > 1:
            return [result for entry in batch for result in _answer_batch(model, [entry], task)]
        item = batch[0].item
        error = ItemError(
            str(task.data_file),
            item.line,
            f"generation failed: {_one_line(exc)}",
            question_id=item.question_id,
            image=item.image,
        )
        return [(item, None, error)]
    return [(entry.item, answer, None) for entry, answer in zip(batch, answers, strict=True)]


def _generate(model: AnswerModel, batch: list[_Loaded], task: EvalTask) -> list[str]:
    prompts = [format_prompt(task.prompt, entry.item.image, entry.item.question) for entry in batch]
    # min_new_tokens=1 as the original's evaluate_vqa.py: an answer is never empty because <|endoftext|> won.
    images = [entry.image for entry in batch]
    answers = model.generate(images, prompts, max_new_tokens=task.max_new_tokens, min_new_tokens=1)
    if not isinstance(answers, list) or len(answers) != len(batch) or not all(isinstance(a, str) for a in answers):
        raise TypeError(f"the model must return {len(batch)} strings, got {_describe(answers)}")
    return answers


def _score_task(
    task: EvalTask,
    items: Sequence[VQAItem],
    folder: OutputFolder,
    predictions_name: str,
    vqa_annotations: dict[str, VQAAnnotation] | None,
) -> ScoreReport:
    """Score the dataset's answered items, in dataset order, against the dataset's CURRENT annotations."""
    answered = _answered(folder, predictions_name, lambda _message: None)
    records = []
    for item in items:
        prediction = answered.get(item.key)
        if prediction is not None:
            record = {"question_id": item.question_id, "answer": prediction["answer"], "annotation": item.annotations}
            records.append((item.line, record))
    return score_records(
        records,
        task.metric,
        gqa_postprocess=task.gqa_postprocess,
        vqa_annotations=vqa_annotations,
        source=str(task.data_file),
    )


class _PredictionWriter:
    """Appends prediction records; `flush()` after each batch makes them durable for a resume."""

    def __init__(self, folder: OutputFolder, name: str, dataset: str) -> None:
        self.dataset = dataset
        self._handle = folder.open_file(name, append=True)
        _end_with_newline(self._handle)
        self.count = 0

    def add(self, item: VQAItem, task: EvalTask, answer: str) -> None:
        record = {
            "dataset": self.dataset,
            "question_id": item.question_id,
            "image": item.image,
            "question": item.question,
            "prompt": format_prompt(task.prompt, item.image, item.question),
            "answer": answer,
            "annotation": item.annotations,
        }
        self._handle.write((json_text(record) + "\n").encode("utf-8"))
        self.count += 1

    def flush(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def __enter__(self) -> _PredictionWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._handle.close()


def _end_with_newline(handle: BinaryIO) -> None:
    """A kill can leave a partial last line; start appending on a fresh line so no record is glued to it."""
    size = handle.seek(0, os.SEEK_END)
    if size:
        handle.seek(size - 1)
        if handle.read(1) != b"\n":
            handle.write(b"\n")  # the handle appends: this goes at the end whatever the position


class _ErrorLog:
    """This run's item errors: one line each on stderr, one record each in the errors file.

    The file is rewritten by every run (failed items are retried), and removed when a run has none.
    """

    def __init__(self, folder: OutputFolder, name: str, dataset: str, report: Reporter) -> None:
        self.folder = folder
        self.name = name
        self.dataset = dataset
        self.report = report
        self.count = 0
        self._handle: BinaryIO | None = None

    def add(self, error: ItemError) -> None:
        if self._handle is None:
            self._handle = self.folder.open_file(self.name, append=False)
        self._handle.write((json_text(error.to_record(self.dataset)) + "\n").encode("utf-8"))
        self._handle.flush()
        self.count += 1
        self.report(f"{self.dataset}: {error}")

    def add_all(self, errors: Sequence[ItemError]) -> None:
        for error in errors:
            self.add(error)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        else:
            self.folder.remove(self.name)  # a previous run's errors, all resolved now


@contextmanager
def _progress(enabled: bool, description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr when enabled (the CLI enables it only on a terminal)."""
    if not enabled or total == 0:
        yield lambda _count: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task_id = progress.add_task(description, total=total)
        yield lambda count: progress.advance(task_id, count)


# --------------------------------------------------------------------------------------------------
# A suite of datasets and the results files
# --------------------------------------------------------------------------------------------------


def run_tasks(
    model: AnswerModel,
    tasks: Sequence[EvalTask],
    out_dir: Path,
    *,
    batch_size: int = 1,
    limit: int | None = None,
    model_name: str | None = None,
    model_info: dict[str, Any] | None = None,
    report: Reporter | None = None,
    show_progress: bool = False,
) -> list[DatasetRun]:
    """Run the tasks in order; results.json and results.md are updated after each dataset.

    An existing results.json is checked first, so a damaged entry is reported before any model work."""
    report = report or _stderr_line
    runs: list[DatasetRun] = []
    with _opened(out_dir) as folder:
        _read_results(folder, report)
        for task in tasks:
            run = run_task(
                model,
                task,
                folder,
                batch_size=batch_size,
                limit=limit,
                report=report,
                show_progress=show_progress,
                settings={"model": model_name, **(model_info or {})},
            )
            runs.append(run)
            write_results(folder, runs, model_name=model_name, model_info=model_info)
    return runs


def write_results(
    out_dir: Path | OutputFolder,
    runs: Sequence[DatasetRun],
    *,
    model_name: str | None = None,
    model_info: dict[str, Any] | None = None,
    report: Reporter | None = None,
) -> dict[str, Any]:
    """Merge these runs into out_dir/results.json (other datasets are kept) and rewrite results.md.

    Entries of the existing file that are not dataset results are reported through `report` and left out."""
    with _opened(out_dir) as folder:
        results = _read_results(folder, report or (lambda _message: None))
        results["schema"] = RESULTS_SCHEMA
        if model_name is not None:
            results["model"] = model_name
        if model_info is not None:
            results["model_settings"] = model_info  # how the model ran (device, dtype, quantization)
        results["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for run in runs:
            # Per dataset too: a later run with other settings may add datasets to the same folder.
            results["datasets"][run.task.name] = {**run.to_dict(), "model": model_name, "model_settings": model_info}
        folder.write(RESULTS_JSON, (json_text(results, indent=2) + "\n").encode("utf-8"))
        folder.write(RESULTS_MARKDOWN, terminal_text(results_markdown(results)).encode("utf-8"))
    return results


def _read_results(folder: OutputFolder, report: Reporter) -> dict[str, Any]:
    """The existing results.json, its damaged parts reported and left out (a damaged file: rebuilt)."""
    fresh: dict[str, Any] = {"schema": RESULTS_SCHEMA, "datasets": {}}
    shown = folder.shown(RESULTS_JSON)
    handle = folder.open_read(RESULTS_JSON)
    if handle is None:
        return fresh
    try:
        with handle:
            results = json.loads(handle.read(_MAX_RESULTS_BYTES + 1).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSON, huge numbers
        report(f"{shown}: unreadable ({_one_line(exc)}); rebuilt from this run's datasets")
        return fresh
    if not isinstance(results, dict) or not isinstance(results.get("datasets"), dict):
        report(f"{shown}: not a results file (no 'datasets' mapping); rebuilt from this run's datasets")
        return fresh
    datasets = {}
    for key, entry in results["datasets"].items():
        problem = _entry_problem(entry)
        if problem:
            report(f"{shown}: dataset entry {key!r} left out: {problem}")
        else:
            datasets[key] = entry
    results["datasets"] = datasets
    return results


def _entry_problem(entry: Any) -> str | None:
    """Why a results.json dataset entry cannot be shown in the table, or None."""
    if not isinstance(entry, dict):
        return f"expected an object, got {type(entry).__name__}"
    for name, kind in (("dataset", str), ("metric", str), ("n_scored", int), ("n_items", int), ("n_failed", int)):
        if name not in entry:
            return f"missing field {name!r}"
        if not isinstance(entry[name], kind) or isinstance(entry[name], bool):
            return f"field {name!r} must be {'a string' if kind is str else 'an integer'}"
    percent = entry.get("percent")
    if percent is not None and (not isinstance(percent, int | float) or not math.isfinite(percent)):
        return "field 'percent' must be a finite number"
    return None


def table_rows(entries: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Dataset, metric, score in percent (2 decimals, as the paper), scored items, failed items."""
    rows = []
    for entry in entries:
        label = METRIC_LABELS.get(entry["metric"], entry["metric"])
        if entry.get("gqa_postprocess"):
            label += " (GQA)"
        percent = entry.get("percent")
        rows.append(
            [
                entry["dataset"],
                label,
                f"{percent:.2f}" if percent is not None else "-",
                f"{entry['n_scored']}/{entry['n_items']}",
                str(entry["n_failed"]),
            ]
        )
    return rows


TABLE_HEADER = ["Dataset", "Metric", "Score (%)", "Scored", "Failed"]


def _adapter_cell(entry: dict[str, Any]) -> str:
    settings = entry.get("model_settings")
    adapter = settings.get("adapter") if isinstance(settings, dict) else None
    if not adapter:
        return "-"
    digest = settings.get("adapter_sha256")
    return f"`{adapter}`" + (f" (sha256 {str(digest)[:12]})" if digest else "")


def results_markdown(results: dict[str, Any]) -> str:
    """results.md: the model, and the table; an Adapter column when a dataset ran with a LoRA adapter (its
    folder and the first 12 digits of its content hash: a retrained adapter in the same folder shows)."""
    lines = ["# Evaluation results", ""]
    if results.get("model"):
        lines += [f"Model: `{results['model']}`", ""]
    entries = list(results["datasets"].values())
    adapters = [_adapter_cell(entry) for entry in entries]
    header, align = list(TABLE_HEADER), "|---|---|---:|---:|---:|"
    if any(cell != "-" for cell in adapters):
        header, align = [*header, "Adapter"], align + "---|"
    lines.append("| " + " | ".join(header) + " |")
    lines.append(align)
    for row, adapter in zip(table_rows(entries), adapters, strict=True):
        cells = row + ([adapter] if len(header) > len(row) else [])
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    lines += [
        "",
        "Scores: ANLS, relaxed accuracy and accuracy as fractions x 100; VQA score as the VQA toolkit "
        "reports it (percent, rounded to 2 decimals). Details per dataset: results.json.",
        "",
    ]
    return "\n".join(lines)


def print_results_table(runs: Sequence[DatasetRun]) -> None:
    """The runs' scores as a rich table on stderr (stdout is kept for results)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Evaluation results")
    for index, header in enumerate(TABLE_HEADER):
        table.add_column(header, justify="right" if index >= 2 else "left")
    for row in table_rows([run.to_dict() for run in runs]):
        table.add_row(*row)
    Console(stderr=True).print(table)


def _message(exc: BaseException) -> str:
    """An exception's text on one line, without its class name where the text says enough."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)} ({', '.join(sorted({type(v).__name__ for v in value})) or 'empty'})"
    return type(value).__name__

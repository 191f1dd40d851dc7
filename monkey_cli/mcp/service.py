"""What the tools run on: one model, loaded on first need and kept, and the same flows as `monkey ask|caption|
read` (`pipeline.run`) and `monkey extract` (`extract.run.run`), so a tool's records are exactly the CLI's
records for the same file and options.

Calls run one at a time (a desktop assistant or an agent asks in turn; the engine batches the pages of a
document). Files are opened through `RootFolder`: the pipeline reads the checked descriptor
(`/proc/self/fd/N`), never the path again, and records name the file by its path under the root.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from monkey_cli import pipeline
from monkey_cli.engine import Job
from monkey_cli.errors import MonkeyError, UsageError
from monkey_cli.mcp.roots import RootFolder
from monkey_cli.output import Record
from monkey_cli.serve.settings import DEFAULT_MAX_QUESTIONS  # the HTTP server's --max-questions default

if TYPE_CHECKING:  # pragma: no cover
    from monkey_cli.extract import Extraction, ExtractSchema

_OWN_DESCRIPTORS = "/proc/self/fd"


@dataclass(frozen=True)
class ToolSettings:
    """What every tool call shares: the model (the other commands' model options), the answer length (the
    longest answer; an extract answer's default is the command's 64 tokens, capped at it), and the most fields
    one extract call may ask for (each is a question of every page)."""

    model: pipeline.ModelOptions
    max_new_tokens: int = 512
    batch_size: int = 4
    max_fields: int = DEFAULT_MAX_QUESTIONS


class DocumentService:
    """Runs the tools' documents through the pipeline on one model, kept between calls."""

    def __init__(self, root: RootFolder, settings: ToolSettings) -> None:
        self.root = root
        self.settings = settings
        self._lock = threading.Lock()
        self._model: Any = None
        self.loads = 0  # how many times the model was loaded (once, whatever the number of calls)

    def run(
        self,
        task: str,
        path: str,
        *,
        questions: Sequence[str] = (),
        pages: str | None = None,
        force_ocr: bool = False,
    ) -> list[Record]:
        """The records of `task` on the file at `path` (under the root), in page order.

        Raises PathRefused for a path that is not a readable file under the root, UsageError for a bad
        argument (an empty question, a bad page range); a damaged document gives error records instead."""
        if task == "ask" and not any(question.strip() for question in questions):
            raise UsageError("ask needs a question")
        job = Job(
            task=task,
            questions=tuple(question for question in questions if question.strip()),
            template=None,
            max_new_tokens=self.settings.max_new_tokens,
            batch_size=self.settings.batch_size,
            force_ocr=force_ocr,
        )
        with self.root.open(path) as (relative, descriptor), self._lock:
            options = pipeline.RunOptions(
                inputs=(_descriptor_path(descriptor, self.root.path / relative),),
                job=job,
                model=self.settings.model,
                pages=pages,
            )
            records: list[Record] = []
            pipeline.run(options, on_record=records.append, load_model=self._loaded)
        return [dataclasses.replace(record, source=str(relative)) for record in records]

    def extract(
        self,
        path: str,
        schema: ExtractSchema,
        *,
        pages: str | None = None,
        all_pages: bool = False,
        min_confidence: float | None = None,
        null_probability: bool = True,
        max_new_tokens: int | None = None,
    ) -> Extraction[Any]:
        """The file's `monkey extract` record (one per document), on the model the other tools use.

        `max_new_tokens` caps the string and list answers (default: the command's, at most the service's).
        Raises PathRefused and UsageError as `run` does, and for more fields than `settings.max_fields`."""
        from monkey_cli.extract import ExtractOptions
        from monkey_cli.extract.extractor import DEFAULT_MAX_NEW_TOKENS
        from monkey_cli.extract.run import ExtractRunOptions
        from monkey_cli.extract.run import run as run_extract

        count, most = len(schema.fields), self.settings.max_fields
        if count > most:
            raise UsageError(f"{count} fields; this server extracts at most {most} per call (--max-fields): "
                             "ask for the others in another call")  # fmt: skip
        if max_new_tokens is not None and max_new_tokens < 2:
            raise UsageError(f"max_new_tokens must be at least 2 for extract; got {max_new_tokens}")
        limit = self.settings.max_new_tokens
        answer_tokens = min(DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens, limit)
        if answer_tokens < 2:
            raise UsageError(f"extract needs answers of at least 2 tokens; this server's --max-new-tokens is {limit}")
        try:
            options = ExtractOptions(
                max_new_tokens=answer_tokens,
                min_confidence=min_confidence,
                all_pages=all_pages,
                null_probability=null_probability,
                batch_size=self.settings.batch_size,
            )
        except ValueError as exc:  # a minimum confidence outside [0, 1]
            raise UsageError(str(exc)) from None
        with self.root.open(path) as (relative, descriptor), self._lock:
            run_options = ExtractRunOptions(
                inputs=(_descriptor_path(descriptor, self.root.path / relative),),
                schema=schema,
                model=self.settings.model,
                extract=options,
                pages=pages,
            )
            extractions: list[Extraction[Any]] = []
            run_extract(run_options, on_record=extractions.append, load_model=self._loaded)
        if not extractions:  # the flow gives every input a record, a failure's too; never seen
            raise MonkeyError(f"{relative}: no record came back")
        return dataclasses.replace(extractions[0], source=str(relative))

    def _loaded(self) -> Any:
        if self._model is None:
            model = self.settings.model
            job = Job(task="caption", questions=(), template=None, max_new_tokens=self.settings.max_new_tokens,
                      batch_size=self.settings.batch_size, force_ocr=False)  # fmt: skip
            from monkey_cli.model.sources import resolve_device

            self._model = pipeline._load(model, job, resolve_device(model.device))
            self.loads += 1
        return self._model


def _descriptor_path(descriptor: int, checked: os.PathLike[str]) -> str:
    """The checked file as the pipeline should open it: through its descriptor where the system names one
    (nothing swapped in after the check is read), else its checked path."""
    if os.path.isdir(_OWN_DESCRIPTORS):
        return f"{_OWN_DESCRIPTORS}/{descriptor}"
    return os.fspath(checked)

"""Pages + prompts -> answer records: batching, vision-feature reuse, text layers, and input order.

The engine is the middle of the flow (documents -> pages -> engine -> records -> writers). It loads the model
only when a page actually needs it (a born-digital PDF read from its text layer never does), encodes every
page of a batch in one vision pass, answers all questions of a page from those features, and yields records
in input order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from monkey_cli import tasks
from monkey_cli.documents import Page, PageError
from monkey_cli.output import Record


@dataclass(frozen=True)
class Job:
    """What to ask of every page. `questions` for ask; `template` overrides the task's prompt."""

    task: str
    questions: tuple[str, ...] = ()
    template: str | None = None
    max_new_tokens: int = 512
    batch_size: int = 4
    force_ocr: bool = False

    def prompts(self, caption_as_question: bool) -> list[tuple[str, str]]:
        """(what the record shows as its prompt, the model prompt) for each question of a page."""
        if self.task == "ask":
            if self.template is not None:
                return [(q, tasks.custom_prompt(self.template, q)) for q in self.questions]
            return [(q, tasks.vqa_prompt(q)) for q in self.questions]
        if self.template is not None:
            return [(self.template, tasks.custom_prompt(self.template))]
        prompt = tasks.task_prompt(self.task, caption_as_question=caption_as_question)
        shown = tasks.READ_QUESTION if self.task == "read" else tasks.CAPTION_QUESTION
        return [(shown, prompt)]


@dataclass(frozen=True)
class DocumentEnd:
    """Marks that every record of `source` has been yielded (so its output file can be written now)."""

    source: str


@dataclass
class _Slot:
    """One output item in input order; model work fills `record` when its batch runs."""

    page: Page | None
    shown_prompt: str
    model_prompt: str | None = None
    record: Record | DocumentEnd | None = None


@dataclass
class Engine:
    """Turns a stream of pages into a stream of records. `load_model` is called at most once, lazily."""

    job: Job
    load_model: Callable[[], Any]
    model_name: str
    quant: str
    streamer_factory: Callable[[Any], Any] | None = None
    model: Any = field(default=None, init=False)
    vision_passes: int = field(default=0, init=False)

    def run(self, pages: Iterable[Page | PageError]) -> Iterator[Record | DocumentEnd]:
        """Records in input order, each document followed by its DocumentEnd as soon as it is complete."""
        pending: list[_Slot] = []
        model_pages = 0
        current: str | None = None
        for item in pages:
            if item.source != current and current is not None:
                pending.append(_Slot(None, "", record=DocumentEnd(current)))
                yield from _pop_ready(pending)
            current = item.source
            slots = self._slots_for(item)
            pending.extend(slots)
            if any(slot.model_prompt is not None for slot in slots):
                model_pages += 1
            if model_pages >= self.job.batch_size:
                yield from self._flush(pending)
                pending, model_pages = [], 0
            else:
                yield from _pop_ready(pending)
        if current is not None:
            pending.append(_Slot(None, "", record=DocumentEnd(current)))
        yield from self._flush(pending)

    # --- building slots -------------------------------------------------------------------------
    def _slots_for(self, item: Page | PageError) -> list[_Slot]:
        if isinstance(item, PageError):
            return [_Slot(None, self._error_prompt(), record=self._failure(item.source, item.page, item.pages, item))]
        if self.job.task == "read" and item.has_text_layer and not self.job.force_ocr and self.job.template is None:
            record = self._record(item, tasks.READ_QUESTION, item.text.strip(), "text_layer", 0.0)
            return [_Slot(item, record.prompt, record=record)]
        caption_as_question = self._model().caption_as_question if self.job.task == "caption" else False
        return [_Slot(item, shown, prompt) for shown, prompt in self.job.prompts(caption_as_question)]

    def _error_prompt(self) -> str:
        return self.job.questions[0] if self.job.task == "ask" and len(self.job.questions) == 1 else self.job.task

    # --- running the model ------------------------------------------------------------------------
    def _model(self) -> Any:
        if self.model is None:
            self.model = self.load_model()
        return self.model

    def _flush(self, slots: list[_Slot]) -> Iterator[Record | DocumentEnd]:
        work = [slot for slot in slots if slot.record is None]
        if work:
            self._answer(work)
        for slot in slots:
            assert slot.record is not None
            yield slot.record

    def _answer(self, work: list[_Slot]) -> None:
        """One vision pass for every page in `work`, then the prompts in chunks of batch_size."""
        model = self._model()
        pages = _unique_pages(work)
        started = time.perf_counter()
        try:
            features = model.encode_images([page.image for page in pages])
            self.vision_passes += 1
        except Exception as exc:  # a page the processor cannot take fails alone, not the batch
            for slot in work:
                slot.record = self._failure(slot.page.source, slot.page.page, slot.page.pages, exc, slot.shown_prompt)
            return
        row_of = {id(page): row for row, page in enumerate(pages)}
        for chunk in _chunks(work, self.job.batch_size):
            rows = [row_of[id(slot.page)] for slot in chunk]
            extra = {}
            if self.streamer_factory is not None and len(work) == 1:
                extra["streamer"] = self.streamer_factory(model.tokenizer)
            answers = model.generate(
                None,
                [slot.model_prompt for slot in chunk],
                image_embeds=features[rows],
                max_new_tokens=self.job.max_new_tokens,
                **extra,
            )
            for slot, answer in zip(chunk, answers, strict=True):
                slot.record = self._record(slot.page, slot.shown_prompt, answer, "model", 0.0)
        seconds = (time.perf_counter() - started) / len(work)
        for slot in work:
            slot.record.seconds = seconds

    # --- records ----------------------------------------------------------------------------------
    def _record(self, page: Page, prompt: str, answer: str, source: str, seconds: float) -> Record:
        return Record(
            source=page.source,
            page=page.page,
            pages=page.pages,
            task=self.job.task,
            prompt=prompt,
            answer=answer,
            answer_source=source,
            model=self.model_name,
            quant=self.quant,
            seconds=seconds,
            error=None,
            warnings=list(page.warnings),
        )

    def _failure(
        self, source: str, page: int | None, pages: int | None, error: Any, prompt: str | None = None
    ) -> Record:
        message = error.message if isinstance(error, PageError) else f"{type(error).__name__}: {error}"
        return Record.failure(
            error=message,
            source=source,
            page=page,
            pages=pages,
            task=self.job.task,
            prompt=prompt or self._error_prompt(),
            model=self.model_name,
            quant=self.quant,
            seconds=0.0,
        )


def _pop_ready(pending: list[_Slot]) -> Iterator[Record | DocumentEnd]:
    """Yield (and remove) the leading items that need no more work, keeping input order."""
    while pending and pending[0].record is not None:
        yield pending.pop(0).record


def _unique_pages(work: Sequence[_Slot]) -> list[Page]:
    seen: dict[int, Page] = {}
    for slot in work:
        seen.setdefault(id(slot.page), slot.page)
    return list(seen.values())


def _chunks(items: Sequence[_Slot], size: int) -> Iterator[Sequence[_Slot]]:
    for start in range(0, len(items), max(size, 1)):
        yield items[start : start + size]

"""Pages + prompts -> answer records, in input order, on the generation engine.

The middle of the flow (documents -> pages -> engine -> records -> writers). The model is loaded only when a
page actually needs it (a born-digital PDF read from its text layer never does). Every question of every page
becomes a request to the model's scheduler: pages are preprocessed ahead on a background thread, their vision
features computed several pages per pass, a page's questions share its image prefix, and continuous batching
keeps the decode slots busy, so a short answer never waits for a long one. Records still come out in input
order, each document followed by its `DocumentEnd` as soon as it is complete.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from monkey_cli import tasks
from monkey_cli.documents import Page, PageError, prefetch
from monkey_cli.errors import MonkeyError
from monkey_cli.output import Record, answer_confidence

# Requests kept submitted per decode slot: enough for the vision look-ahead to batch the next pages, few
# enough that pages do not pile up in memory.
IN_FLIGHT_PER_SLOT = 2
# The scheduler caches vision features and image prefixes by image key: keys are unique in the process, so
# engines sharing one scheduler (a server running several documents at once) never get each other's pages.
_PAGE_KEYS = itertools.count()


@dataclass(frozen=True)
class BadQuestion:
    """A question that could not be read (say, a line of a questions file that is not UTF-8): every page
    gets an error record for it, and the other questions go on."""

    shown: str
    error: str

    def __str__(self) -> str:
        return self.shown


@dataclass(frozen=True)
class Job:
    """What to ask of every page. `questions` for ask; `template` overrides the task's prompt."""

    task: str
    questions: tuple[str | BadQuestion, ...] = ()
    template: str | None = None
    max_new_tokens: int = 512
    batch_size: int = 4
    force_ocr: bool = False
    positions: bool = False  # read the text positions in the answers into the records' `spans` (TextMonkey)

    def prompts(self, chat: bool = False, family: str = "monkey") -> list[tuple[str, tasks.Prompt | None, str | None]]:
        """(what the record shows as its prompt, the model prompt, an error) for each question of a page.
        `chat`: the checkpoint is Monkey-Chat (its caption prompt differs); `family`: the model family, whose
        prompt forms are used (a task it has none for is an error)."""
        if self.task == "ask":
            return [self._question_prompt(question, family) for question in self.questions]
        if self.template is not None:
            return [(self.template, tasks.custom_prompt(self.template), None)]
        shown = tasks.shown_prompt(self.task)
        try:
            return [(shown, tasks.task_prompt(self.task, chat=chat, family=family), None)]
        except tasks.UnsupportedTask as exc:
            return [(shown, None, str(exc))]

    def _question_prompt(
        self, question: str | BadQuestion, family: str = "monkey"
    ) -> tuple[str, tasks.Prompt | None, str | None]:
        if isinstance(question, BadQuestion):
            return question.shown, None, question.error
        if self.template is not None:
            return question, tasks.custom_prompt(self.template, question), None
        try:
            return question, tasks.vqa_prompt(question, family, ground=self.positions), None
        except tasks.UnsupportedTask as exc:
            return question, None, str(exc)


@dataclass(frozen=True)
class DocumentEnd:
    """Marks that every record of `source` has been yielded (so its output file can be written now)."""

    source: str


@dataclass
class _Slot:
    """One output item in input order: a finished record, or a request the scheduler is working on."""

    page: Page | None
    shown_prompt: str
    model_prompt: tasks.Prompt | None = None
    record: Record | DocumentEnd | None = None
    handle: Any = None


@dataclass
class Engine:
    """Turns a stream of pages into a stream of records. `load_model` is called at most once, lazily.

    `streamer_factory(tokenizer, page, prompt)`, if given, returns an `on_token(token_id)` callback for the
    answer to `prompt` (as its record shows it) about `page` (the CLI prints a single page's answer as it is
    decoded; a server streams every answer to its client). `loop`, if given, is an `EngineLoop` that already drives
    the model's scheduler on its own thread (a server): requests go through it and this engine only waits for
    them, instead of stepping the scheduler itself.
    """

    job: Job
    load_model: Callable[[], Any]
    model_name: str
    quant: str
    streamer_factory: Callable[[Any, Page, str], Callable[[int], None]] | None = None
    loop: Any = None
    model: Any = field(default=None, init=False)
    # prompt -> its token ids, or why the model cannot take it (checked once per prompt, not per page)
    _prompt_ids: dict[tasks.Prompt, list[int] | str] = field(default_factory=dict, init=False)

    @property
    def batch_size(self) -> int:
        """The job's batch size, lowered to what the loaded model's memory plan allows."""
        allowed = getattr(self.model, "batch_size", None) if self.model is not None else None
        return min(self.job.batch_size, allowed or self.job.batch_size)

    def run(self, pages: Iterable[Page | PageError]) -> Iterator[Record | DocumentEnd]:
        """Records in input order, each document followed by its DocumentEnd as soon as it is complete."""
        pending: deque[_Slot] = deque()
        current: str | None = None
        for item, pixels in prefetch(self._with_pixels(pages)):
            if item.source != current and current is not None:
                pending.append(_Slot(None, "", record=DocumentEnd(current)))
            current = item.source
            image_key = ("page", next(_PAGE_KEYS))  # the questions of one page share its features
            for slot in self._slots_for(item):
                if slot.record is None:
                    self._submit(slot, pixels, image_key)
                pending.append(slot)
            while self._in_flight(pending) >= IN_FLIGHT_PER_SLOT * self.batch_size:
                self._advance(pending)
                yield from self._pop_ready(pending)
            yield from self._pop_ready(pending)
        if current is not None:
            pending.append(_Slot(None, "", record=DocumentEnd(current)))
        while pending:
            yield from self._pop_ready(pending)
            if pending:
                self._advance(pending)

    def _with_pixels(self, pages: Iterable[Page | PageError]) -> Iterator[tuple[Page | PageError, Any]]:
        """Each page with its vision-tower input, made on the prefetch thread that also renders the pages, so
        this CPU work overlaps the model's. None where the page does not go to the model, or where the model
        is not loaded yet (the first pages: the scheduler then preprocesses them itself)."""
        for item in pages:
            model = self.model
            needs_model = model is not None and isinstance(item, Page) and not self._from_text_layer(item)
            yield item, _preprocess(model, item) if needs_model else None

    # --- building slots -------------------------------------------------------------------------
    def _slots_for(self, item: Page | PageError) -> list[_Slot]:
        if isinstance(item, PageError):
            return [_Slot(None, self._error_prompt(), record=self._failure(item.source, item.page, item.pages, item))]
        if self._from_text_layer(item):
            record = self._text_layer_record(item)
            return [_Slot(item, record.prompt, record=record)]
        model = self._model()
        slots = []
        family = getattr(model, "family", "monkey")
        for shown, prompt, error in self.job.prompts(chat=bool(getattr(model, "chat", False)), family=family):
            error = error or self._prompt_error(prompt)
            if error is None:
                slots.append(_Slot(item, shown, prompt))
            else:
                slots.append(_Slot(item, shown, record=self._failure(item.source, item.page, item.pages, error, shown)))
        return slots

    def _from_text_layer(self, page: Page) -> bool:
        return self.job.task == "read" and page.has_text_layer and not self.job.force_ocr and self.job.template is None

    def _prompt_error(self, prompt: tasks.Prompt) -> str | None:
        """Why the model cannot take `prompt` (too long for its context), checked once per prompt."""
        if prompt not in self._prompt_ids:
            try:
                self._prompt_ids[prompt] = self._model().check_prompt(prompt, self.job.max_new_tokens)
            except MonkeyError as exc:
                self._prompt_ids[prompt] = str(exc)
        ids = self._prompt_ids[prompt]
        return ids if isinstance(ids, str) else None

    def _error_prompt(self) -> str:
        if self.job.task == "ask" and len(self.job.questions) == 1:
            return str(self.job.questions[0])
        return self.job.task

    # --- running the model ------------------------------------------------------------------------
    def _model(self) -> Any:
        if self.model is None:
            self.model = self.load_model()
        return self.model

    def _scheduler(self) -> Any:
        return self._model().scheduler(self.batch_size)

    def _advance(self, pending: deque[_Slot]) -> None:
        """Make progress: one scheduler step, or (when a loop drives it) wait for the oldest request."""
        if self.loop is None:
            self._scheduler().step()
            return
        oldest = next(slot.handle for slot in pending if slot.handle is not None and not slot.handle.done())
        oldest.wait_done()

    def _submit(self, slot: _Slot, pixels: Any, image_key: tuple[str, int]) -> None:
        """One request for `slot`'s question (whose prompt `_prompt_error` has checked)."""
        from monkey_cli.engine.scheduler import GenerationRequest

        model = self._model()
        streamer = self.streamer_factory
        on_token = None if streamer is None else streamer(model.tokenizer, slot.page, slot.shown_prompt)
        request = GenerationRequest(
            self._prompt_ids[slot.model_prompt],
            image=pixels if pixels is not None else slot.page.image,
            image_key=image_key,
            params=model.sampling_params(self.job.max_new_tokens),
            on_token=on_token,
        )
        slot.handle = (self.loop or self._scheduler()).submit(request)

    def _in_flight(self, pending: deque[_Slot]) -> int:
        return sum(1 for slot in pending if slot.handle is not None and not slot.handle.done())

    def _pop_ready(self, pending: deque[_Slot]) -> Iterator[Record | DocumentEnd]:
        """Yield (and remove) the leading items that are finished, keeping input order."""
        while pending:
            slot = pending[0]
            if slot.record is None:
                if not slot.handle.done():
                    return
                slot.record = self._answer_record(slot)
            yield pending.popleft().record

    def _answer_record(self, slot: _Slot) -> Record:
        handle, page = slot.handle, slot.page
        try:
            result = handle.wait()
        except Exception as exc:  # this page's request failed (an image the processor cannot take, say)
            return self._failure(page.source, page.page, page.pages, exc, slot.shown_prompt)
        tokenizer = self._model().tokenizer
        answer = tasks.clean_answer(tokenizer.decode(result.token_ids, skip_special_tokens=True))
        confidence = answer_confidence(result.logprobs, result.stop_logprob)
        record = self._record(page, slot.shown_prompt, answer, "model", handle.seconds, confidence)
        if self.job.positions:  # the answer's texts and positions, from its tokens with the grounding tags
            from monkey_cli.grounding import ground_record

            ground_record(record, tokenizer.decode_grounded(result.token_ids), page)
        return record

    # --- records ----------------------------------------------------------------------------------
    def _record(
        self, page: Page, prompt: str, answer: str, source: str, seconds: float, confidence: float | None = None
    ) -> Record:
        return Record(
            source=page.source,
            page=page.page,
            pages=page.pages,
            task=self.job.task,
            prompt=prompt,
            answer=answer,
            answer_source=source,
            model=self.model_name,
            quant=getattr(self.model, "quant", self.quant),
            seconds=seconds,
            error=None,
            warnings=list(page.warnings),
            confidence=confidence,
        )

    def _text_layer_record(self, page: Page) -> Record:
        """A `read` answered from the PDF's own text: no model or quantization took part, no model time."""
        return Record(
            source=page.source,
            page=page.page,
            pages=page.pages,
            task=self.job.task,
            prompt=tasks.READ_QUESTION,
            answer=page.text.strip(),
            answer_source="text_layer",
            model=None,
            quant=None,
            seconds=0.0,
            error=None,
            warnings=list(page.warnings),
        )

    def _failure(
        self, source: str, page: int | None, pages: int | None, error: Any, prompt: str | None = None
    ) -> Record:
        if isinstance(error, PageError):
            message = error.message
        elif isinstance(error, str):
            message = error
        else:
            message = f"{type(error).__name__}: {error}"
        return Record.failure(
            error=message,
            source=source,
            page=page,
            pages=pages,
            task=self.job.task,
            prompt=prompt or self._error_prompt(),
            model=self.model_name,
            quant=getattr(self.model, "quant", self.quant),
            seconds=0.0,
        )


def _preprocess(model: Any, page: Page) -> Any:
    try:
        return model.preprocess(page.image)
    except Exception:  # noqa: BLE001 - a page the processor cannot take fails when its request runs
        return None

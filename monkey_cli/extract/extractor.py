"""Pages + schema -> one validated record per document, on the generation engine.

Every field of every page is one request to the model's scheduler: the field's question in Monkey's VQA form,
its answer constrained by the field's grammar (`grammar.py`, through `constraint.py`). A page's requests share
its vision features and its image prefix (the ~1,280-token prefill is done once per page, each field then
prefills only its own question), and continuous batching keeps the decode slots busy across fields, pages and
documents, so a field costs about its question and its answer's few tokens. The fields of a page admitted
together prefill their questions in one forward pass. Where "not found" is allowed, the not-found answer itself
is scored in that same pass (its tokens and <|endoftext|> fed after the question, teacher-forced:
`GenerationRequest.score_ids`), which gives its probability exactly and costs no decode step.

`Extractor.run(pages)` streams records in input order (the CLI); `extract_pages(model, pages, schema)` returns
one document's record (the Python API and a server, which passes its `EngineLoop` as `loop`).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from monkey_cli import tasks
from monkey_cli.documents import Page, PageError, prefetch
from monkey_cli.errors import MonkeyError
from monkey_cli.extract.grammar import NOT_FOUND, AnswerGrammar, check_grammar, check_value, parse_answer
from monkey_cli.extract.results import Candidate, Extraction, choose, review
from monkey_cli.extract.schema import ExtractSchema, Field
from monkey_cli.output import answer_confidence

DEFAULT_MAX_NEW_TOKENS = 64
IN_FLIGHT_PER_SLOT = 4  # requests kept submitted per decode slot (a page brings one per field)
_PAGE_KEYS = itertools.count()  # image keys unique in the process (a server's documents never share a page)


@dataclass(frozen=True)
class ExtractOptions:
    """How to extract. `max_new_tokens` caps the answers that can be long (strings, lists; the other kinds take
    what their grammar needs); `min_confidence` lists fields under it in `needs_review`; `all_pages` keeps
    every page's candidates in the record; `null_probability` scores "not found" on every page where it is
    allowed (its few tokens teacher-forced in the field's prefill pass)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_confidence: float | None = None
    all_pages: bool = False
    null_probability: bool = True
    batch_size: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 2:
            raise ValueError(f"max_new_tokens must be an integer of at least 2, got {self.max_new_tokens!r}")
        if self.min_confidence is not None and not 0 <= self.min_confidence <= 1:
            raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence!r}")


@dataclass
class _Plan:
    """A field, ready for the model: its prompt's ids (or why it cannot be asked) and its compiled grammar."""

    field: Field
    grammar: AnswerGrammar
    prompt_ids: list[int] | None
    compiled: Any = None
    error: str | None = None


@dataclass
class _Ask:
    """One field asked of one page: its value request (which scores not found too, where that is allowed)."""

    plan: _Plan
    value: Any = None  # RequestHandle


@dataclass
class _Document:
    source: str
    pages: int | None = None
    asks: list[tuple[Page, list[_Ask]]] = field(default_factory=list)
    errors: list[PageError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    closed: bool = False

    def handles(self) -> Iterator[Any]:
        for _page, asks in self.asks:
            yield from (ask.value for ask in asks if ask.value is not None)


class Extractor:
    """Turns a stream of pages into a stream of per-document records. `load_model` is called at most once, when a
    page first needs the model. `loop`: an `EngineLoop` already driving the model's scheduler (a server)."""

    def __init__(
        self,
        load_model: Callable[[], Any],
        schema: ExtractSchema,
        options: ExtractOptions | None = None,
        *,
        model_name: str | None = None,
        quant: str | None = None,
        loop: Any = None,
    ) -> None:
        self.load_model = load_model
        self.schema = schema
        self.options = options or ExtractOptions()
        self.model_name = model_name
        self.quant = quant
        self.loop = loop
        self.model: Any = None
        self._plans: list[_Plan] | None = None
        self._null_ids: list[int] = []
        # Checked before any model work: a field whose grammar cannot be compiled fails the schema here.
        self._grammars = [check_grammar(item, self.options.max_new_tokens) for item in schema.fields]

    # --- the stream ------------------------------------------------------------------------------------------

    def run(self, pages: Iterable[Page | PageError]) -> Iterator[Extraction[Any]]:
        """One record per document, in input order, each as soon as its pages are all answered."""
        pending: deque[_Document] = deque()
        for item, pixels in prefetch(self._with_pixels(pages)):
            if not pending or pending[-1].source != item.source or pending[-1].closed:
                if pending:
                    pending[-1].closed = True
                pending.append(_Document(item.source))
            document = pending[-1]
            document.pages = item.pages if item.pages is not None else document.pages
            if isinstance(item, PageError):
                document.errors.append(item)
            else:
                document.warnings += [f"p.{item.page}: {note}" for note in item.warnings]
                document.asks.append((item, self._submit(item, pixels)))
            while self._in_flight(pending) >= IN_FLIGHT_PER_SLOT * self._slots():
                self._advance(pending)
                yield from self._pop_ready(pending)
            yield from self._pop_ready(pending)
        if pending:
            pending[-1].closed = True
        while pending:
            yield from self._pop_ready(pending)
            if pending:
                self._advance(pending)

    def _with_pixels(self, pages: Iterable[Page | PageError]) -> Iterator[tuple[Page | PageError, Any]]:
        """Each page with its vision input, made on the prefetch thread once the model is loaded."""
        for item in pages:
            model = self.model
            yield item, _preprocess(model, item) if model is not None and isinstance(item, Page) else None

    def _slots(self) -> int:
        allowed = getattr(self.model, "batch_size", None) if self.model is not None else None
        return min(self.options.batch_size, allowed or self.options.batch_size)

    def _in_flight(self, pending: deque[_Document]) -> int:
        return sum(1 for document in pending for handle in document.handles() if not handle.done())

    def _advance(self, pending: deque[_Document]) -> None:
        """One scheduler step, or (when a loop drives it) wait for the oldest unfinished request."""
        if self.loop is None:
            self._model().scheduler(self._slots()).step()
            return
        for document in pending:
            for handle in document.handles():
                if not handle.done():
                    handle.wait_done()
                    return

    def _pop_ready(self, pending: deque[_Document]) -> Iterator[Extraction[Any]]:
        while pending and pending[0].closed and all(handle.done() for handle in pending[0].handles()):
            yield self._record(pending.popleft())

    # --- requests ----------------------------------------------------------------------------------------------

    def _model(self) -> Any:
        if self.model is None:
            self.model = self.load_model()
        return self.model

    def _prepare(self) -> list[_Plan]:
        """Each field's prompt ids and compiled grammar for the loaded model (once)."""
        if self._plans is not None:
            return self._plans
        from monkey_cli.extract.constraint import CompiledGrammar, llguidance_tokenizer

        model = self._model()
        vocabulary = llguidance_tokenizer(model.tokenizer, model.model.config.vocab_size)
        self._null_ids = list(model.tokenizer.encode(NOT_FOUND))
        plans = []
        for item, grammar in zip(self.schema.fields, self._grammars, strict=True):
            try:
                ids = model.check_prompt(tasks.vqa_prompt(item.question), grammar.max_tokens)
            except MonkeyError as exc:
                plans.append(_Plan(item, grammar, None, error=f"field {item.name!r}: {exc}"))
                continue
            compiled = CompiledGrammar.from_lark(grammar.lark, vocabulary, name=f"field {item.name!r}")
            plans.append(_Plan(item, grammar, ids, compiled))
        self._plans = plans
        return plans

    def _submit(self, page: Page, pixels: Any) -> list[_Ask]:
        from monkey_cli.engine import GenerationRequest, SamplingParams

        model = self._model()
        target = self.loop or model.scheduler(self._slots())
        image = pixels if pixels is not None else page.image
        key = ("extract", next(_PAGE_KEYS))  # a page's fields share its features and image prefix
        asks = []
        for plan in self._prepare():
            ask = _Ask(plan)
            if plan.prompt_ids is not None:
                params = SamplingParams(max_new_tokens=plan.grammar.max_tokens)
                scored = plan.field.nullable and self.options.null_probability
                ask.value = target.submit(GenerationRequest(
                    plan.prompt_ids, image=image, image_key=key, params=params, constraint=plan.compiled.constraint(),
                    score_ids=[*self._null_ids, model.tokenizer.eod_id] if scored else (),
                ))  # fmt: skip
            asks.append(ask)
        return asks

    # --- records -----------------------------------------------------------------------------------------------

    def failure(self, source: str, message: str, *, retry: bool = False) -> Extraction[Any]:
        """The record `run` gives a document that could not be opened (`message` says why): every field without
        a value. `retry`: the failure was of the moment (a rerun with --out redoes the document)."""
        extraction = self._record(_Document(source, errors=[PageError(source, None, message)]))
        extraction.retry = retry
        return extraction

    def _record(self, document: _Document) -> Extraction[Any]:
        candidates: dict[str, list[Candidate]] = {item.name: [] for item in self.schema.fields}
        failures = [f"p.{error.page}: {error.message}" if error.page else error.message for error in document.errors]
        retry = False
        for page, asks in document.asks:
            for ask in asks:
                candidate = self._candidate(page, ask)
                candidates[ask.plan.field.name].append(candidate)
                if candidate.answer is None and candidate.error:
                    retry = retry or ask.value is not None  # the request ran and failed (not a question too long)
                    if candidate.error not in failures:
                        failures.append(candidate.error)
        fields = {name: choose(found) for name, found in candidates.items()}
        handles = list(document.handles())
        extraction = Extraction(
            source=document.source,
            pages=document.pages,
            fields=fields,
            model_name=self.model_name,
            quant=getattr(self.model, "quant", self.quant),
            schema_sha256=self.schema.fingerprint,
            seconds=_span(handles),
            error="; ".join(failures) or None,
            warnings=document.warnings,
            all_pages=self.options.all_pages,
            retry=retry,
        )
        if document.asks:
            extraction.valid = _validate(self.schema, fields)
            extraction.model = _as_model(self.schema, extraction.values)
        if self.options.min_confidence is not None:
            extraction.needs_review = review(fields, self.options.min_confidence)
        return extraction

    def _candidate(self, page: Page, ask: _Ask) -> Candidate:
        item = ask.plan.field
        if ask.value is None:
            return Candidate(page.page, None, False, None, None, None, None, error=ask.plan.error)
        try:
            result = ask.value.wait()
        except Exception as exc:  # noqa: BLE001 - this page's request failed; the record says so
            return Candidate(page.page, None, False, None, None, None, None,
                             error=f"p.{page.page}: field {item.name!r}: {type(exc).__name__}: {exc}")
        text = self._model().tokenizer.decode(result.token_ids, skip_special_tokens=True)
        complete = result.finish_reason == "stop"
        if not complete:
            text = text.rstrip("\ufffd")  # a character cut in two at the token limit
        parsed = parse_answer(item, text, complete=complete)
        error = parsed.error
        value, found = parsed.value, parsed.found
        if found:
            problem = check_value(item, value)
            if problem is not None:
                value, found, error = None, False, f"{text.strip()!r}: {problem}"
        logprobs = [*result.logprobs, *([result.stop_logprob] if result.stop_logprob is not None else [])]
        return Candidate(
            page=page.page,
            value=value,
            found=found,
            answer=text.strip(),
            confidence=answer_confidence(result.logprobs, result.stop_logprob),
            confidence_min=math.exp(min(logprobs)) if logprobs else None,
            null_probability=_null_probability(result, self._null_ids) if item.nullable else None,
            error=error,
        )


def extract_pages(
    model: Any,
    pages: Sequence[Page],
    schema: ExtractSchema,
    options: ExtractOptions | None = None,
    *,
    loop: Any = None,
    model_name: str | None = None,
) -> Extraction[Any]:
    """One document's record from its pages (all of one source), on `model` (a loaded `Monkey`)."""
    if not pages:
        raise ValueError("extract_pages needs at least one page")
    if len({page.source for page in pages}) != 1:
        raise ValueError("extract_pages takes the pages of one document")
    extractor = Extractor(lambda: model, schema, options, model_name=model_name or getattr(model, "name", None),
                          quant=getattr(model, "quant", None), loop=loop)
    return next(iter(extractor.run(pages)))


def _null_probability(result: Any, null_ids: list[int]) -> float | None:
    """The model's probability of answering "not found" (its tokens, then <|endoftext|>): scored in the value
    request's prefill (`score_logprobs`), or, without that scoring, read from an answer that was "not found"."""
    if result.score_logprobs is not None:
        return math.exp(sum(result.score_logprobs))
    if result.token_ids == null_ids and result.stop_logprob is not None:
        return math.exp(sum(result.logprobs) + result.stop_logprob)  # the same tokens, the same probability
    return None


def _span(handles: list[Any]) -> float:
    """The document's model time: from its first request's prefill to its last token."""
    started = [h.started_at for h in handles if h.started_at is not None]
    ended = [h.finished_at for h in handles if h.finished_at is not None]
    return max(ended) - min(started) if started and ended else 0.0


def _validate(schema: ExtractSchema, fields: dict[str, Any]) -> bool:
    """Whether the values satisfy the whole schema (a missing optional value is left out, not null)."""
    import jsonschema

    instance = {}
    for item in schema.fields:
        value = fields[item.name].value
        if value is not None or _allows_null(item):
            instance[item.name] = value
    validator = jsonschema.Draft202012Validator(schema.json_schema)
    return validator.is_valid(instance)


def _allows_null(item: Field) -> bool:
    types = item.schema.get("type")
    return (isinstance(types, list) and "null" in types) or None in item.schema.get("enum", [])


def _as_model(schema: ExtractSchema, values: dict[str, Any]) -> Any:
    """The pydantic model instance of the values, when the schema came from a model class."""
    if schema.model is None:
        return None
    nullable = {item.name for item in schema.fields if _allows_null(item)}
    try:
        return schema.model.model_validate({k: v for k, v in values.items() if v is not None or k in nullable})
    except Exception:  # noqa: BLE001 - pydantic refused them (a validator of its own): no instance
        return None


def _preprocess(model: Any, page: Page) -> Any:
    try:
        return model.preprocess(page.image)
    except Exception:  # noqa: BLE001 - a page the processor cannot take fails when its request runs
        return None

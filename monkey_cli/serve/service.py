"""The bridge between HTTP requests and the engine: one model, one queue, limits, timeouts, cancellation.

All model work happens on the engine's own thread (`EngineLoop`): requests only submit to it and wait. The
CPU work of a request (decoding its image, rendering a PDF page, tokenizing its question) runs in worker
threads, never on the event loop. Waiting is done by threads of a pool sized to the queue limit, blocked
on the request's completion event, so thirty-two waiting clients cost thirty-two idle threads, not a
poll loop. A request whose client disconnects, or whose time runs out, is cancelled: the engine frees its
slot at its next step and the others go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import io
import itertools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from monkey_cli import tasks
from monkey_cli.serve import uploads
from monkey_cli.serve.errors import APIError, bad_request
from monkey_cli.serve.settings import ServeSettings

if TYPE_CHECKING:  # pragma: no cover
    from monkey_cli.api import Monkey
    from monkey_cli.engine import EngineLoop, GenerationRequest, GenerationResult, RequestHandle

log = logging.getLogger("monkey_cli.serve")

_END = object()  # the request is finished (or failed, or its time ran out)
_GONE = object()  # the client disconnected
T = TypeVar("T")
_GROUPS = itertools.count(1)  # one scheduling group per HTTP request: the engine takes turns between groups


def new_group() -> tuple[str, int]:
    """A fresh scheduling group: every generation of one HTTP request carries the same one, so that one
    request with many questions takes its turn with the others instead of going first with all of them."""
    return ("http", next(_GROUPS))


class ClientGone(Exception):
    """The client left before its answer was ready: its work was dropped."""


class _Abandoned(Exception):
    """A document run stopped because its client left or its time ran out."""


@dataclass(frozen=True)
class ChatJob:
    """What a chat request asks for, once read: one question about one page, answered once per choice
    (`sampling` holds each choice's settings), each answer constrained by a fresh `constraint()` if given."""

    question: str
    image: uploads.ImageRef
    image_param: str
    max_tokens: int
    sampling: tuple[dict[str, Any], ...] = ({},)
    client: str = ""  # who asks (routers.common.client_identity): features are shared within one client only
    top_logprobs: int = 0  # the most likely tokens reported at each step (0-20)
    constraint: Callable[[], Any] | None = None


@dataclass(frozen=True)
class DocumentJob:
    """What a /v1/documents request asks for: the CLI's `monkey TASK FILE` on uploaded bytes."""

    data: bytes
    name: str
    task: str
    questions: tuple[str, ...]
    pages: str | None
    password: str | None
    force_ocr: bool
    max_tokens: int


class ModelService:
    """One loaded model and its engine loop, shared by every request of the server."""

    def __init__(self, settings: ServeSettings, load_model: Callable[[], Monkey] | None = None) -> None:
        self.settings = settings
        self._load_model = load_model or self._load_from_settings
        self.monkey: Monkey | None = None
        self.loop: EngineLoop | None = None
        self.state = "loading"
        self.failure: BaseException | None = None
        self.created = int(time.time())
        self.in_progress = 0  # requests for the model being served now (see middleware.AdmissionMiddleware)
        self._adapter_sha256: str | None = None
        # Threads that wait for answers (and run documents, which mostly wait): one per request in progress.
        self._waiters = ThreadPoolExecutor(max_workers=settings.max_queue + 4, thread_name_prefix="monkey-wait")

    # --- life cycle ---------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        """How responses name the model: the --model hub id as given, a local folder by its name only (its
        path on this machine is none of a client's business)."""
        return shown_model_name(self.settings.model)

    def load(self) -> None:
        """Load the model and start the engine (blocking: run it in a thread). Raises what loading raised."""
        from monkey_cli.engine import EngineLoop

        try:
            monkey = self._load_model()
            self.monkey, self.state = monkey, "warming"
            scheduler = monkey.scheduler(monkey.batch_size)
            scheduler.warm_up()  # the cache and every compiled graph, before the first request waits for them
            loop = EngineLoop(scheduler)
            self._adapter_sha256 = None if self.settings.adapter is None else _adapter_sha256(self.settings.adapter)
        except BaseException as exc:
            self.failure, self.state = exc, "failed"
            raise
        self.loop, self.state = loop, "ready"

    def _load_from_settings(self) -> Monkey:
        from monkey_cli.api import Monkey

        s = self.settings
        return Monkey.load(
            s.model,
            device=s.device,
            dtype=s.dtype,
            quant=s.quant,
            quant_vision=s.quant_vision,
            prompt_style=s.prompt_style,
            batch_size=s.slots,
            max_new_tokens=s.max_new_tokens,
            compile=s.compile,
            adapter=s.adapter,
        )

    def close(self) -> None:
        """Stop the engine (requests still running are failed), the renderer (a page being drawn must not
        keep the server from stopping) and the waiting threads."""
        from monkey_cli.documents import renderer

        if self.loop is not None:
            self.loop.close()
        renderer.shutdown()
        self._waiters.shutdown(wait=False, cancel_futures=True)

    def ready(self) -> Monkey:
        if self.state == "ready" and self.monkey is not None:
            return self.monkey
        if self.state == "failed":
            raise APIError(503, "the model failed to load (see the server's log)", code="model_unavailable")
        doing = "warming up (compiling the decode step)" if self.state == "warming" else "still loading"
        raise APIError(503, f"the model is {doing}: GET /health says when it is ready", code="model_loading")

    def health(self) -> dict[str, Any]:
        monkey, loop = self.monkey, self.loop
        health: dict[str, Any] = {
            "status": self.state,
            "model": self.model_name,
            "requests": self.in_progress,
            "max_queue": self.settings.max_queue,
        }
        if monkey is not None and loop is not None:
            s = self.settings
            health.update(
                quant=monkey.quant,
                device=str(monkey.model.transformer.wte.weight.device),
                slots=loop.scheduler.slots,
                pending=loop.pending,
                engine=dataclasses.asdict(loop.scheduler.stats),
                compile=loop.scheduler.compile_report(),
                # what a `monkey ... --server` client fingerprints its results with (resume), as a local run
                max_new_tokens=s.max_new_tokens,
                dtype=s.dtype,
                quant_vision=s.quant_vision,
                prompt_style=s.prompt_style,
                family=getattr(monkey, "family", "monkey"),
                adapter_sha256=self._adapter_sha256,
                max_questions=s.max_questions,  # a client refuses a run over it before any work
            )
        return health

    @property
    def render_timeout(self) -> float | None:
        """Seconds one page may take to render (None: no limit)."""
        return self.settings.render_timeout or None

    def max_tokens(self, asked: int | None) -> int:
        """A client's max_tokens, capped at the server's --max-new-tokens (its default too)."""
        return min(asked or self.settings.max_new_tokens, self.settings.max_new_tokens)

    # --- chat ---------------------------------------------------------------------------------------------
    async def start_chat(
        self, job: ChatJob, on_token: Callable[[int, int], None] | None = None
    ) -> list[RequestHandle]:
        """Read the image and the question (off the event loop) and queue one generation per choice;
        `on_token(choice, token)` is told each token as it is chosen."""
        monkey = self.ready()
        requests = await asyncio.to_thread(self._chat_requests, monkey, job, on_token)
        return [self._submit(request) for request in requests]

    def _chat_requests(
        self, monkey: Monkey, job: ChatJob, on_token: Callable[[int, int], None] | None
    ) -> list[GenerationRequest]:
        from monkey_cli.engine import GenerationRequest

        prompt = tasks.vqa_prompt(job.question, getattr(monkey, "family", "monkey"))
        ids = self._prompt_ids(monkey, prompt, job.max_tokens, "messages")
        max_tokens = self._answer_room(ids, job.max_tokens)
        page = uploads.open_page(job.image, monkey.processor.input_size, job.image_param, self.render_timeout)
        pixels = monkey.preprocess(page.image)
        group = new_group()  # the choices of one request take their turn together
        requests = []
        for index, sampling in enumerate(job.sampling):
            params = monkey.sampling_params(max_tokens, **sampling)
            if job.top_logprobs:
                params = dataclasses.replace(params, top_logprobs=job.top_logprobs)
            requests.append(GenerationRequest(
                ids,
                image=pixels,
                image_key=(job.client, *job.image.key),  # the choices share the page's features and prefix
                params=params,
                on_token=None if on_token is None else functools.partial(on_token, index),
                group=group,
                constraint=None if job.constraint is None else job.constraint(),
            ))  # fmt: skip
        return requests

    def _answer_room(self, ids: list[int], max_tokens: int) -> int:
        """`max_tokens`, cut to what the engine's cache holds after the prompt: the cache was sized once, at
        start-up, for --max-new-tokens after a question; a longer sequence would make the engine grow it and
        compile again while every other request waits."""
        limit = self.loop.scheduler.max_length if self.loop is not None else None
        if limit is None:
            return max_tokens
        if len(ids) >= limit:
            raise bad_request(
                f"the prompt is {len(ids):,} tokens, over this server's {limit:,}-token cache: shorten the question",
                "messages",
                code="context_length_exceeded",
            )
        return min(max_tokens, limit - len(ids))

    @staticmethod
    def _prompt_ids(monkey: Monkey, prompt: tasks.Prompt, max_tokens: int, param: str) -> list[int]:
        from monkey_cli.api import PromptTooLongError

        try:
            return monkey.check_prompt(prompt, max_tokens)
        except PromptTooLongError as exc:
            message = str(exc).replace("(or lower --max-new-tokens)", "(or ask for fewer max_tokens)")
            raise bad_request(message, param, code="context_length_exceeded") from None

    def _submit(self, request: GenerationRequest) -> RequestHandle:
        assert self.loop is not None
        return self.loop.submit(request)

    async def finish(
        self, handles: list[RequestHandle], client_gone: Callable[[], Awaitable[None]]
    ) -> list[GenerationResult]:
        """The handles' results; cancels them when the client leaves (ClientGone) or the time runs out (504)."""
        finished = asyncio.get_running_loop().run_in_executor(
            self._waiters, _wait_all, handles, self.settings.request_timeout
        )
        gone = asyncio.ensure_future(client_gone())
        try:
            await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not finished.done() or not finished.result():
                for handle in handles:
                    handle.cancel()
        if not finished.done():
            raise ClientGone
        if not finished.result():
            raise self.timeout()
        return [handle.wait(0) for handle in handles]

    def timeout(self) -> APIError:
        limit = self.settings.request_timeout
        return APIError(504, f"the request took longer than this server's limit of {limit:g} s (--request-timeout)",
                        code="timeout")

    async def stream_tokens(
        self, handles: list[RequestHandle], tokens: asyncio.Queue[Any], client_gone: Callable[[], Awaitable[None]]
    ) -> AsyncIterator[Any]:
        """What `tokens` is fed (by the requests' `on_token`) until every handle is finished; then the caller
        reads `handle.wait(0)`. Cancels the requests when the client leaves (ClientGone) or the time runs out
        (504), and whenever the caller stops early."""
        finished = asyncio.get_running_loop().run_in_executor(
            self._waiters, _wait_all, handles, self.settings.request_timeout
        )
        finished.add_done_callback(lambda _: tokens.put_nowait(_END))  # after every token already queued
        watcher = asyncio.ensure_future(_signal_when_gone(client_gone, tokens))
        try:
            while (item := await tokens.get()) is not _END:
                if item is _GONE:
                    raise ClientGone
                yield item
            if not finished.result():
                raise self.timeout()
        finally:
            watcher.cancel()
            for handle in handles:
                if not handle.done():
                    handle.cancel()

    def token_feed(self) -> tuple[asyncio.Queue[Any], Callable[[Any], None]]:
        """A queue on the event loop and the function (called on the engine thread) that fills it."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        return queue, _threadsafe_put(asyncio.get_running_loop(), queue)

    # --- documents ----------------------------------------------------------------------------------------
    async def check_document(self, job: DocumentJob) -> None:
        """400 before any work when the document cannot be opened, its page selection cannot be
        read or takes too many pages, or a question cannot fit in the model's context."""
        monkey = self.ready()
        await asyncio.to_thread(self._check_document, monkey, job)

    def _check_document(self, monkey: Monkey, job: DocumentJob) -> None:
        from monkey_cli.documents import Source
        from monkey_cli.engine import Job

        self.check_questions(job.questions)
        pages = self._check_pages(monkey, Source(job.name, data=job.data), job.pages, job.password)
        answers = pages * max(1, len(job.questions))
        if answers > self.settings.max_answers:
            raise bad_request(
                f"{pages} pages x {max(1, len(job.questions))} questions = {answers} answers; this server gives at "
                f"most {self.settings.max_answers} per request (--max-answers): choose fewer pages or questions, "
                "or send several requests",
                "question" if len(job.questions) > 1 else "pages",
                code="too_many_answers",
            )
        family = getattr(monkey, "family", "monkey")
        for _shown, prompt, _error in Job(task=job.task, questions=job.questions).prompts(monkey.chat, family):
            if prompt is not None:  # a task the family has no prompt for: its records say so
                self._prompt_ids(monkey, prompt, job.max_tokens, "question" if job.task == "ask" else "task")

    def check_questions(self, questions: tuple[str, ...]) -> None:
        """A 400 before anything is read for more questions than --max-questions."""
        if len(questions) > self.settings.max_questions:
            raise bad_request(
                f"{len(questions)} questions; this server takes at most {self.settings.max_questions} per request "
                "(--max-questions): send the others in another request",
                "question",
                code="too_many_questions",
            )

    async def run_document(
        self,
        job: DocumentJob,
        client_gone: Callable[[], Awaitable[None]],
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> str:
        """The CLI's JSON document (`--format json`) for a checked document (`check_document`), its text
        identical to the CLI's. With `on_event`, it also gets (on the event loop) `delta` events as the
        answers are decoded and a `record` event as each record is ready, in input order."""
        monkey = self.ready()
        emit = None if on_event is None else threadsafe_call(asyncio.get_running_loop(), on_event)
        return await self.run_guarded(lambda run: self._document_records(monkey, job, run, emit), client_gone)

    async def run_guarded(self, work: Callable[[_DocumentRun], T], client_gone: Callable[[], Awaitable[None]]) -> T:
        """`work(run)` in a waiting thread, every generation it submits going through `run` (an engine loop of
        one request's own: one scheduling group, all cancelled at once): when the client leaves (ClientGone) or
        the time runs out (504), they are all dropped."""
        run = _DocumentRun(self.loop)
        loop = asyncio.get_running_loop()
        work_done = loop.run_in_executor(self._waiters, work, run)
        work_done.add_done_callback(_retrieve)
        gone = asyncio.ensure_future(client_gone())
        try:
            done, _ = await asyncio.wait(
                {work_done, gone}, timeout=self.settings.request_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:  # cancelled (the stream carrying it was closed): drop the work
            run.abort()
            raise
        finally:
            gone.cancel()
        if work_done not in done:
            run.abort()
            raise ClientGone if gone in done else self.timeout()
        return work_done.result()

    def check_pages(self, source: Any, pages: str | None, password: str | None) -> int:
        """How many pages of `source` the request selects; a 400 when it cannot be read or takes too many."""
        return self._check_pages(self.ready(), source, pages, password)

    def _document_records(
        self, monkey: Monkey, job: DocumentJob, run: _DocumentRun, emit: Callable[[dict[str, Any]], None] | None
    ) -> str:
        """Runs in a worker thread: the CLI's pages flow, its generations submitted to the engine loop."""
        from monkey_cli.documents import Source, iter_pages
        from monkey_cli.engine import Engine, Job
        from monkey_cli.output import Record, make_writer
        from monkey_cli.pipeline import reads_text_layer

        model_job = Job(
            task=job.task,
            questions=job.questions,
            max_new_tokens=job.max_tokens,
            batch_size=monkey.batch_size,
            force_ocr=job.force_ocr,
        )
        engine = Engine(
            model_job,
            load_model=lambda: monkey,
            model_name=self.model_name,
            quant=monkey.quant,
            loop=run,
            streamer_factory=None if emit is None else _delta_streamer(emit),
        )
        source = Source(job.name, data=job.data)
        size = monkey.processor.input_size
        pages = uploads.serialized(
            iter_pages(
                [source], size=size, pages=job.pages, password=job.password, render_timeout=self.render_timeout,
                text_layer=reads_text_layer(model_job),
            )  # fmt: skip
        )
        if emit is not None:
            pages = _told_page_errors(pages, emit)
        buffer = io.StringIO()
        writer = make_writer("json", buffer)
        for event in engine.run(pages):
            if isinstance(event, Record):
                writer.write(event)
                if emit is not None:
                    emit({"type": "record", "record": event.to_dict()})
        writer.close()
        return buffer.getvalue()

    async def preview(self, data: bytes, name: str, pages: str | None, password: str | None) -> dict[str, Any]:
        """Small images of the selected pages, for the web page."""
        monkey = self.ready()
        return await asyncio.to_thread(self._preview, monkey, data, name, pages, password)

    def _preview(self, monkey: Monkey, data: bytes, name: str, pages: str | None, password: str | None) -> dict:
        from monkey_cli.documents import Source, iter_pages

        source = Source(name, data=data)
        self._check_pages(monkey, source, pages, password)
        size = monkey.processor.input_size
        records = iter_pages(
            [source], size=size, pages=pages, password=password, render_timeout=self.render_timeout, text_layer=False
        )
        shown, errors = uploads.preview(records)
        return {"source": name, "pages": shown, "errors": errors}

    def _check_pages(self, monkey: Monkey, source: Any, pages: str | None, password: str | None) -> int:
        """How many pages the request selects; a 400 when it cannot be read or takes too many."""
        size = monkey.processor.input_size
        count = uploads.selected_pages(source, pages, password, size, self.render_timeout)
        if count > self.settings.max_pages:
            raise bad_request(
                f"{count} pages selected; this server takes at most {self.settings.max_pages} per request "
                "(--max-pages): choose some with `pages`",
                "pages",
                code="too_many_pages",
            )
        return count


class AnswerText:
    """An answer's text piece by piece as its tokens come; the pieces joined equal the final answer.

    `IncrementalDecoder` never splits a character and drops the leading space; the final answer is also
    stripped at its end (`tasks.clean_answer`), so whitespace is held back until more text follows it."""

    def __init__(self, tokenizer: Any) -> None:
        from monkey_cli.engine.streaming import IncrementalDecoder

        self._decoder = IncrementalDecoder(tokenizer)
        self._sent: list[str] = []
        self._held = ""

    def push(self, token: int) -> str:
        text = self._held + self._decoder.push(token)
        piece = text.rstrip()
        self._held = text[len(piece) :]
        if piece:
            self._sent.append(piece)
        return piece

    def finish(self, answer: str) -> str:
        """What of `answer` has not been sent yet (a character whose last bytes never came, say)."""
        sent = "".join(self._sent)
        return answer[len(sent) :] if answer.startswith(sent) else ""


class _DocumentRun:
    """The engine loop as one document's `Engine` sees it: every generation it submits can be cancelled at
    once (the client left, or the request's time ran out), after which it can submit no more."""

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.group = new_group()  # all of this document's generations take one turn together
        self._handles: list[RequestHandle] = []
        self._aborted = False
        self._lock = threading.Lock()

    def submit(self, request: GenerationRequest) -> RequestHandle:
        with self._lock:
            if self._aborted:
                raise _Abandoned
            handle = self.loop.submit(dataclasses.replace(request, group=self.group))
            self._handles.append(handle)
            return handle

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            handles = list(self._handles)
        for handle in handles:
            handle.cancel()


def _told_page_errors(pages: Iterator[Any], emit: Callable[[dict[str, Any]], None]) -> Iterator[Any]:
    """`pages`, each page that could not be made (or the document, page None) also told as a `page_error` event
    with whether it is of the moment (`transient`): a client's resume tells a failure for good by it."""
    from monkey_cli.documents import PageError

    for item in pages:
        if isinstance(item, PageError):
            emit({"type": "page_error", "page": item.page, "message": item.message, "transient": item.transient})
        yield item


def _delta_streamer(emit: Callable[[dict[str, Any]], None]) -> Callable[..., Callable[[int], None]]:
    """An Engine `streamer_factory` whose answers become `delta` events: {page, prompt, index, text}."""
    counter = iter(range(1 << 62))

    def factory(tokenizer: Any, page: Any, prompt: str) -> Callable[[int], None]:
        text, index, lock = AnswerText(tokenizer), next(counter), threading.Lock()

        def on_token(token: int) -> None:  # on the engine thread: decode there, it is cheap next to a step
            with lock:
                piece = text.push(token)
            if piece:
                emit({"type": "delta", "index": index, "page": page.page, "prompt": prompt, "text": piece})

        return on_token

    return factory


def _wait_all(handles: list[RequestHandle], timeout: float) -> bool:
    """Block until every handle is finished; False if `timeout` seconds passed first."""
    deadline = time.monotonic() + timeout
    return all(handle.wait_done(max(deadline - time.monotonic(), 0.0)) for handle in handles)


def _threadsafe_put(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> Callable[[Any], None]:
    return threadsafe_call(loop, queue.put_nowait)


def threadsafe_call(loop: asyncio.AbstractEventLoop, function: Callable[[Any], None]) -> Callable[[Any], None]:
    """`function(item)` scheduled on `loop` from any thread; dropped once the loop is closed (shutdown)."""

    def call(item: Any) -> None:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(function, item)

    return call


async def _signal_when_gone(client_gone: Callable[[], Awaitable[None]], tokens: asyncio.Queue[Any]) -> None:
    await client_gone()
    tokens.put_nowait(_GONE)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a worker's outcome as seen (an abandoned run's error is expected and needs no log line)."""
    if not future.cancelled():
        future.exception()


def _adapter_sha256(adapter: str) -> str:
    from monkey_cli.finetune.adapters import adapter_fingerprint

    return adapter_fingerprint(adapter)


def shown_model_name(model: str) -> str:
    """A hub id as given; a local folder by its name alone (`/srv/models/monkey-forms` -> `monkey-forms`)."""
    from pathlib import Path

    path = Path(model).expanduser()
    try:
        local = path.is_dir()
    except OSError:
        local = False
    if not local:
        return model
    return path.resolve().name or "model"


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


"""POST /v1/chat/completions: OpenAI's chat format, questions about one image, with structured outputs.

One request is one question about the one image of its conversation (the turns rule: `completions`), answered
`n` times (greedy choices are all the same answer), each answer free text or a JSON document constrained by
`response_format`, cut before a `stop` string, with the model's own log-probabilities when asked. The image may
be sent again with every turn: requests about the same image bytes and page share its vision features (one
client's only, see `routers.common.client_identity`), and so do a request's choices.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from monkey_cli.printing import json_text
from monkey_cli.serve import completions, uploads
from monkey_cli.serve.errors import APIError, bad_request
from monkey_cli.serve.routers.common import Service, client_gone, client_identity
from monkey_cli.serve.schemas import (
    ERROR_RESPONSES,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    Usage,
)
from monkey_cli.serve.service import ChatJob, ClientGone, ModelService, completion_id

log = logging.getLogger("monkey_cli.serve")
router = APIRouter(prefix="/v1", tags=["chat"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_GRAMMARS = completions.ResponseGrammars()


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def chat_completions(body: ChatCompletionRequest, request: Request, service: Service) -> Any:
    """A chat completion; with `stream: true`, server-sent events as the answer is decoded, token by token."""
    service.ready()
    # base64 and hashing of a large image, compiling a schema's grammar: off the loop
    job = await asyncio.to_thread(read_chat, body, service, client_identity(request))
    stops = completions.stop_strings(body)
    if body.stream:
        tokens, put = service.token_feed()
        handles = await service.start_chat(job, lambda choice, token: put((choice, token)))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _events(service, handles, tokens, request, stops, bool(body.logprobs), include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    handles = await service.start_chat(job)
    results = await service.finish(handles, lambda: client_gone(request))
    for handle in handles:
        completions.check_grammar_error(handle)
    monkey = service.ready()
    names = completions.TokenTexts(monkey.tokenizer) if body.logprobs else None
    choices = [
        Choice(
            index=index,
            message=AssistantMessage(content=completions.answer_text(monkey.tokenizer, result.token_ids, stops)),
            finish_reason=_finish_reason(result),
            logprobs=None if names is None else names.logprobs(result),
        )
        for index, result in enumerate(results)
    ]
    return ChatCompletion(
        id=completion_id(), created=int(time.time()), model=service.model_name, choices=choices, usage=_usage(results)
    )


def read_chat(body: ChatCompletionRequest, service: ModelService, client: str = "") -> ChatJob:
    """The question, the one image, each choice's sampling and the answers' constraint of a chat request; a 400
    naming what is wrong. `client` names who asks (see `client_identity`): only its own requests share this
    image's features."""
    completions.check_supported(body)
    n = body.n or 1
    if n > service.settings.max_answers:
        raise bad_request(f"n={n}: this server gives at most {service.settings.max_answers} answers per request "
                          "(--max-answers)", "n", code="too_many_answers")  # fmt: skip
    images: dict[tuple[str, str, int], tuple[uploads.ImageRef, str]] = {}
    for i, message in enumerate(body.messages):
        for j, part in enumerate(message.content if isinstance(message.content, list) else []):
            if part.type != "image_url":
                continue
            param = f"messages.{i}.content.{j}.image_url.url"
            if message.role != "user":
                raise bad_request("images go in user messages", param)
            image = uploads.parse_image_url(part.image_url.url, param)
            images.setdefault(image.key, (image, param))
    if not images:
        raise bad_request(
            "no image: Monkey answers questions about an image; add an image_url content part with a data: URL "
            f"({uploads.DATA_URL_EXAMPLE})",
            "messages",
            code="missing_image",
        )
    if len(images) > 1:
        raise bad_request(
            f"{len(images)} different images: the model takes one image per request (one page of a PDF: "
            "#page=N); ask about each in its own request",
            "messages",
            code="too_many_images",
        )
    (image, param), = images.values()
    question = completions.question_text(body.messages)
    monkey = service.ready()
    grammar = _GRAMMARS.get(body, monkey)
    return ChatJob(
        question=question,
        image=image,
        image_param=param,
        max_tokens=service.max_tokens(body.max_completion_tokens or body.max_tokens),
        sampling=completions.choice_sampling(body),
        client=client,
        top_logprobs=body.top_logprobs or 0,
        constraint=completions.constraint_factory(grammar, completions.stop_strings(body), monkey.tokenizer),
    )


def _finish_reason(result: Any) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _usage(results: Sequence[Any]) -> Usage:
    """The prompt counted once (the choices share it), the answers' tokens of every choice."""
    prompt = results[0].prompt_tokens
    completion = sum(len(result.token_ids) for result in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _events(
    service: ModelService,
    handles: list[Any],
    tokens: asyncio.Queue[Any],
    request: Request,
    stops: tuple[str, ...],
    logprobs: bool,
    include_usage: bool,
) -> AsyncIterator[str]:
    """OpenAI's stream: a role chunk per choice, content chunks (with their tokens' log-probabilities when
    asked: then one chunk per token), a finish chunk per choice, optionally usage, then [DONE]."""
    stream_id, created, model = completion_id(), int(time.time()), service.model_name
    monkey = service.ready()
    names = completions.TokenTexts(monkey.tokenizer) if logprobs else None

    def chunk(index: int, delta: Delta, finish: str | None = None, result: Any = None, position: int = 0) -> str:
        choice = ChunkChoice(index=index, delta=delta, finish_reason=finish)
        if result is not None and names is not None:
            choice.logprobs = names.logprobs(result, position, position + 1)
        body = ChatCompletionChunk(id=stream_id, created=created, model=model, choices=[choice])
        return sse(body.model_dump(exclude_none=True))

    for index in range(len(handles)):
        yield chunk(index, Delta(role="assistant", content=""))
    texts = [completions.ChoiceText(monkey.tokenizer, stops) for _ in handles]
    counts = [0] * len(handles)
    try:
        async for index, token in service.stream_tokens(handles, tokens, lambda: client_gone(request)):
            piece = texts[index].push(token)
            position, counts[index] = counts[index], counts[index] + 1
            if names is not None:  # the engine recorded the token's log-probabilities before telling us of it
                yield chunk(index, Delta(content=piece), result=_SoFar(handles[index]), position=position)
            elif piece:
                yield chunk(index, Delta(content=piece))
        results = [handle.wait(0) for handle in handles]
        for handle in handles:
            completions.check_grammar_error(handle)
    except ClientGone:
        log.info("a client left before its answer was finished: its request was dropped")
        return
    except APIError as exc:
        yield sse(exc.body())
        return
    except Exception as exc:  # a failure in the engine: the stream has started, so it ends with an error event
        log.error("chat stream failed: %s: %s", type(exc).__name__, exc)
        yield sse(APIError(500, "the generation failed (see the server's log)", code="internal_error").body())
        return
    for index, result in enumerate(results):
        rest = texts[index].finish(completions.answer_text(monkey.tokenizer, result.token_ids, stops))
        if rest:
            yield chunk(index, Delta(content=rest))
        yield chunk(index, Delta(), _finish_reason(result))
    if include_usage:
        usage = ChatCompletionChunk(id=stream_id, created=created, model=model, choices=[], usage=_usage(results))
        yield sse(usage.model_dump())
    yield "data: [DONE]\n\n"


class _SoFar:
    """A running request's tokens and log-probabilities as `TokenTexts.logprobs` reads a result."""

    def __init__(self, handle: Any) -> None:
        self.token_ids = handle.tokens
        self.logprobs = handle.logprobs
        self.top_logprobs = handle.top_logprobs


def sse(data: Any) -> str:
    """One server-sent event carrying `data` as one line of JSON."""
    return f"data: {json_text(data)}\n\n"

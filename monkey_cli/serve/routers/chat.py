"""POST /v1/chat/completions: OpenAI's chat format, one question about one image per request.

Monkey answers single questions about one image (the original's demo keeps no history): the answer is to the
last user message's text, about the one image of the conversation. Earlier turns are not replayed to the
model, but they may carry the image: a follow-up question in the same conversation names the same image and
reuses its vision features (requests about the same image bytes and page share them in the engine).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from monkey_cli.printing import json_text
from monkey_cli.serve import uploads
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


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def chat_completions(body: ChatCompletionRequest, request: Request, service: Service) -> Any:
    """A chat completion; with `stream: true`, server-sent events as the answer is decoded, token by token."""
    service.ready()
    # base64 and hashing of a large image: off the loop
    job = await asyncio.to_thread(read_chat, body, service, client_identity(request))
    if body.stream:
        tokens, on_token = service.token_feed()
        handle = await service.start_chat(job, on_token)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _events(service, handle, tokens, request, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    handle = await service.start_chat(job)
    result = await service.finish(handle, lambda: client_gone(request))
    answer = service.answer_text(result)
    return ChatCompletion(
        id=completion_id(),
        created=int(time.time()),
        model=service.model_name,
        choices=[Choice(message=AssistantMessage(content=answer), finish_reason=result.finish_reason)],
        usage=_usage(result),
    )


def read_chat(body: ChatCompletionRequest, service: ModelService, client: str = "") -> ChatJob:
    """The question, the one image and the sampling settings of a chat request; a 400 naming what is wrong.
    `client` names who asks (see `client_identity`): only its own requests share this image's features."""
    if body.n not in (None, 1):
        raise bad_request("only one choice per request is supported (n=1)", "n")
    if body.stop:
        raise bad_request("stop sequences are not supported: the answer ends where the model ends it", "stop")
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
    return ChatJob(
        question=_question(body),
        image=image,
        image_param=param,
        max_tokens=service.max_tokens(body.max_completion_tokens or body.max_tokens),
        sampling=_sampling(body),
        client=client,
    )


def _question(body: ChatCompletionRequest) -> str:
    index, last = len(body.messages) - 1, body.messages[-1]
    if last.role != "user":
        raise bad_request("the last message must be the user's question", f"messages.{index}.role")
    if isinstance(last.content, str):
        text = last.content
    else:
        text = "\n".join(part.text for part in last.content or [] if part.type == "text")
    if not text.strip():
        raise bad_request("the last user message has no text: ask a question about the image",
                          f"messages.{index}.content", code="missing_question")
    return text.strip()


def _sampling(body: ChatCompletionRequest) -> dict[str, Any]:
    """Greedy (the original's setting) unless a temperature above 0 asks for sampling."""
    if not body.temperature:
        return {}
    options: dict[str, Any] = {"do_sample": True, "temperature": body.temperature}
    if body.top_p is not None:
        options["top_p"] = body.top_p
    if body.top_k is not None:
        options["top_k"] = body.top_k
    if body.seed is not None:
        options["seed"] = body.seed
    return options


def _usage(result: Any) -> Usage:
    completion = len(result.token_ids)
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=completion,
                 total_tokens=result.prompt_tokens + completion)


async def _events(
    service: ModelService, handle: Any, tokens: asyncio.Queue[Any], request: Request, include_usage: bool
) -> AsyncIterator[str]:
    """OpenAI's stream: a role chunk, content chunks, a finish chunk, optionally usage, then [DONE]."""
    stream_id, created, model = completion_id(), int(time.time()), service.model_name

    def chunk(delta: Delta, finish: str | None = None) -> str:
        body = ChatCompletionChunk(
            id=stream_id, created=created, model=model, choices=[ChunkChoice(delta=delta, finish_reason=finish)]
        )
        return sse(body.model_dump(exclude_none=True))

    yield chunk(Delta(role="assistant", content=""))
    text = service.text_stream()
    try:
        async for token in service.stream_tokens(handle, tokens, lambda: client_gone(request)):
            piece = text.push(token)
            if piece:
                yield chunk(Delta(content=piece))
        result = handle.wait(0)
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
    rest = text.finish(service.answer_text(result))
    if rest:
        yield chunk(Delta(content=rest))
    yield chunk(Delta(), result.finish_reason)
    if include_usage:
        usage = ChatCompletionChunk(id=stream_id, created=created, model=model, choices=[], usage=_usage(result))
        yield sse(usage.model_dump())
    yield "data: [DONE]\n\n"


def sse(data: Any) -> str:
    """One server-sent event carrying `data` as one line of JSON."""
    return f"data: {json_text(data)}\n\n"

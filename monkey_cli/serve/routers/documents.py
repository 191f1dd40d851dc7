"""POST /v1/documents: `monkey ask|caption|read FILE --format json` over HTTP, same records, same schema.

A multipart form: `file` (the document: PDF, PNG, JPEG, TIFF, WEBP, ...), `task` (ask, caption or read),
`question` (repeat it for several; ask only), `pages` (the CLI's --pages syntax: `1-3,7,-1`), `password`,
`force_ocr`, `max_tokens`, `stream`. With `stream=true` the answer is server-sent events: `delta` events
({index, page, prompt, text}) as the answers are decoded, a `page_error` event ({page, message, transient})
for a page that could not be made, a `record` event as each record is ready (in input order), then `done`
with the whole document (as an object, and as the texts `--format json` and `--format md` print: `json`,
`markdown`), then `[DONE]`.

POST /v1/documents/preview: small images of the selected pages (for the web page).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response, StreamingResponse

from monkey_cli.serve.errors import bad_request
from monkey_cli.serve.routers.chat import SSE_HEADERS
from monkey_cli.serve.routers.common import Service, client_gone
from monkey_cli.serve.routers.streaming import event_stream
from monkey_cli.serve.schemas import ERROR_RESPONSES, MAX_TOKENS, DocumentResult, Preview
from monkey_cli.serve.service import DocumentJob, ModelService

router = APIRouter(prefix="/v1", tags=["documents"])

Upload = Annotated[UploadFile, File(description="The document: PDF, PNG, JPEG, TIFF, WEBP, ... (sniffed).")]
Pages = Annotated[str | None, Form(description="Pages, as the CLI's --pages: 1-3,7,-1 (default: all).")]
Password = Annotated[str | None, Form(description="The password of an encrypted PDF.")]
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f]")


@router.post(
    "/documents",
    response_model=DocumentResult,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def documents(
    request: Request,
    service: Service,
    file: Upload,
    task: Annotated[Literal["ask", "caption", "read"], Form()] = "ask",
    question: Annotated[list[str] | None, Form(description="A question (repeat for several).")] = None,
    pages: Pages = None,
    password: Password = None,
    force_ocr: Annotated[bool, Form(description="read: use the model even where a PDF has text.")] = False,
    max_tokens: Annotated[int | None, Form(ge=1, le=MAX_TOKENS)] = None,
    stream: Annotated[bool, Form()] = False,
) -> Any:
    """The CLI's records for the uploaded document (`--format json`)."""
    service.ready()
    questions = tuple(q.strip() for q in question or () if q.strip())
    if task == "ask" and not questions:
        raise bad_request("ask needs at least one question (the form field `question`, repeated for several)",
                          "question", code="missing_question")
    if task != "ask" and questions:
        raise bad_request(f"{task} takes no question (only ask does)", "question")
    service.check_questions(questions)
    job = DocumentJob(
        data=await file.read(),
        name=upload_name(file.filename),
        task=task,
        questions=questions,
        pages=pages.strip() if pages and pages.strip() else None,
        password=password,
        force_ocr=force_ocr,
        max_tokens=service.max_tokens(max_tokens),
    )
    await service.check_document(job)
    if stream:
        return StreamingResponse(_events(service, job, request), media_type="text/event-stream", headers=SSE_HEADERS)
    document = await service.run_document(job, lambda: client_gone(request))
    return Response(document, media_type="application/json")


@router.post("/documents/preview", response_model=Preview, responses=ERROR_RESPONSES)
async def preview(service: Service, file: Upload, pages: Pages = None, password: Password = None) -> Any:
    """Small images of the selected pages, at their own proportions (what the web page shows)."""
    pages = pages.strip() if pages and pages.strip() else None
    return await service.preview(await file.read(), upload_name(file.filename), pages, password)


def document_markdown(document: dict[str, Any]) -> str:
    """What `monkey TASK FILE --format md` prints for the document's records."""
    from monkey_cli.output import Record, render

    return render([Record.from_dict(record) for record in document["records"]], "md")


def upload_name(filename: str | None) -> str:
    """What the records call the document: the upload's file name without any folder (the CLI shows the path
    it was given; a client's folders mean nothing here)."""
    name = re.split(r"[\\/]", filename or "")[-1].strip()
    return _UNSAFE_NAME.sub("", name) or "upload"


def _events(service: ModelService, job: DocumentJob, request: Request) -> AsyncIterator[str]:
    async def done(document: str) -> dict[str, Any]:
        parsed = json.loads(document)
        markdown = await asyncio.to_thread(document_markdown, parsed)
        # The document as an object, and as the exact texts `--format json` and `--format md` print (downloads).
        return {"document": parsed, "json": document, "markdown": markdown}

    return event_stream(
        lambda put: service.run_document(job, lambda: client_gone(request), on_event=put), done, "document"
    )

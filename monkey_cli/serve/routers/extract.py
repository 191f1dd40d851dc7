"""POST /v1/extract: `monkey extract FILE --schema SCHEMA -f json` over HTTP: the same record, the same document.

Two ways to send it (the same options either way):

- multipart/form-data: `file` (the document), `schema` (a JSON Schema object, as a text field or a file part)
  and/or `field` (the CLI's `--field NAME:TYPE=QUESTION` short forms, repeated), `pages`, `password`,
  `all_pages`, `min_confidence`, `max_tokens`, `null_probability`, `stream`;
- application/json: `{"document": "data:application/pdf;base64,...", "name": "invoice.pdf", "schema": {...},
  "field": [...], "pages": ..., ...}`.

The answer is the CLI's JSON document (`{"schema_version", "tool", "records": [record]}`), its text what
`monkey extract -f json` prints for the same document, schema and options. The same limits as /v1/documents
hold: `--max-pages`, `--max-questions` (fields), `--max-answers` (fields x pages), the body's size and deadline,
each page's render budget and the request's time; problems with the request are 400s naming the field, what
fails for a page is in the record (its `error`), as in the CLI.

With `stream=true` the answer is server-sent events, as /v1/documents' (what `monkey extract --server` reads):
a `page` event ({page, pages}) for each page as it goes to the model, a `page_error` event ({page, message,
transient}) for a page that could not be made, the `record` event ({record, retry}: `retry`, a request failed
for a reason of the moment), then `done` ({document, json}: the answer above, as an object and as its text),
then `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import UploadFile

from monkey_cli.serve import uploads
from monkey_cli.serve.errors import APIError, bad_request
from monkey_cli.serve.routers.chat import SSE_HEADERS
from monkey_cli.serve.routers.common import Service, client_gone
from monkey_cli.serve.routers.documents import upload_name
from monkey_cli.serve.routers.streaming import event_stream
from monkey_cli.serve.schemas import ERROR_RESPONSES, MAX_TOKENS, DocumentResult
from monkey_cli.serve.service import ModelService, threadsafe_call

router = APIRouter(prefix="/v1", tags=["extract"])
Emit = Callable[[dict[str, Any]], None]

DEFAULT_MAX_TOKENS = 64  # the CLI's --max-new-tokens default for extract
MAX_FORM_FIELDS = 300  # parts of a multipart body (`field` may repeat)


class ExtractFields(BaseModel):
    """What to extract and how: `monkey extract`'s options."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: dict[str, Any] | None = Field(
        None, alias="schema", description="A JSON Schema object whose properties are the fields (as --schema)."
    )
    field: list[str] | None = Field(None, description="Fields as NAME[:TYPE][=QUESTION] (as --field, repeatable).")
    pages: str | None = Field(None, description="Pages, as the CLI's --pages: 1-3,7,-1 (default: all).")
    password: str | None = Field(None, description="The password of an encrypted PDF.")
    all_pages: bool = Field(False, description="Keep every page's answers under candidates (--all-pages).")
    min_confidence: float | None = Field(None, ge=0, le=1, description="List fields under it in needs_review.")
    max_tokens: int | None = Field(
        None, ge=2, le=MAX_TOKENS, description=f"The longest string or list answer (default {DEFAULT_MAX_TOKENS})."
    )
    null_probability: bool = Field(True, description="Score \"not found\" where a field may be missing.")
    stream: bool = Field(False, description="Answer as server-sent events (page, page_error, record, done).")

    @field_validator("field", mode="before")
    @classmethod
    def _one_field(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # one short form, not in a list


class ExtractJSON(ExtractFields):
    """The JSON body: the document as a data: URL."""

    document: str = Field(description="The document as a data: URL (base64): PDF, PNG, JPEG, TIFF, WEBP, ...")
    name: str | None = Field(None, description="What the record calls the document (its `source`).")


@dataclass(frozen=True)
class ExtractJob:
    data: bytes
    name: str
    fields: ExtractFields


_FORM_BODY = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "The document."},
        "schema": {"type": "string", "description": "A JSON Schema object (text, or a JSON file part)."},
        "field": {"type": "array", "items": {"type": "string"}},
        **{name: spec for name, spec in ExtractFields.model_json_schema()["properties"].items()
           if name not in ("schema", "field")},
    },
}  # fmt: skip
_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _FORM_BODY},
            "application/json": {"schema": ExtractJSON.model_json_schema(by_alias=True)},
        },
    }
}


@router.post(
    "/extract",
    response_model=DocumentResult,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
    openapi_extra=_OPENAPI,
)
async def extract(request: Request, service: Service) -> Response:
    """`monkey extract`'s record for the document: its fields as validated values, with confidence."""
    service.ready()
    job = await _read(request)
    extractor = await asyncio.to_thread(_prepare, service, job)
    if job.fields.stream:
        events = _events(service, job, extractor, request)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    document = await service.run_guarded(
        lambda run: _document(service, job, extractor, run), lambda: client_gone(request)
    )
    return Response(document, media_type="application/json")


# --- reading the request -------------------------------------------------------------------------------------


async def _read(request: Request) -> ExtractJob:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _read_form(request)
    if content_type in ("application/json", ""):
        try:
            body = await request.json()
        except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
            raise bad_request(f"the request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
        payload = _validated(ExtractJSON, body)
        document = uploads.parse_image_url(payload.document, "document")
        if document.page != 1:
            raise bad_request("choose pages with `pages`, not a #page= fragment", "document")
        return ExtractJob(document.data, upload_name(payload.name), payload)
    raise APIError(415, f"unsupported Content-Type {content_type[:80]!r}: send multipart/form-data (file, schema) "
                   "or application/json (document, schema)", code="unsupported_media_type")  # fmt: skip


async def _read_form(request: Request) -> ExtractJob:
    async with request.form(max_files=2, max_fields=MAX_FORM_FIELDS) as form:
        known = {"file", *ExtractFields.model_fields, "schema"} - {"schema_"}
        unknown = sorted(set(form.keys()) - known)
        if unknown:
            raise bad_request(f"{unknown[0]}: not a field of /v1/extract (it takes {', '.join(sorted(known))})",
                              unknown[0], code="unsupported_parameter")  # fmt: skip
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise bad_request("file: missing (the document, as a file part)", "file")
        values: dict[str, Any] = {}
        for name in form:
            if name == "file":
                continue
            items = form.getlist(name)
            if name == "field":
                values[name] = [await _text(item, name) for item in items]
            elif len(items) > 1:
                raise bad_request(f"{name}: given {len(items)} times", name)
            elif name == "schema":
                values[name] = _schema_object(await _text(items[0], name))
            else:
                values[name] = await _text(items[0], name)
        data = await upload.read()
        return ExtractJob(data, upload_name(upload.filename), _validated(ExtractFields, values))


async def _text(item: Any, name: str) -> str:
    if isinstance(item, UploadFile):  # a file part: -F schema=@invoice.schema.json
        raw = await item.read()
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise bad_request(f"{name}: not UTF-8 text", name) from None
    return str(item)


def _schema_object(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"schema: not JSON: {str(exc)[:200]}", "schema", code="invalid_schema") from None


def _validated(model: type[ExtractFields], values: Any) -> Any:
    """`values` as `model`; pydantic's errors as the app's 400s (the field named)."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


# --- checking, then running ----------------------------------------------------------------------------------


def _prepare(service: ModelService, job: ExtractJob) -> Any:
    """The extractor for the job, once the schema, the document and the limits are checked (400s otherwise)."""
    from monkey_cli.documents import Source
    from monkey_cli.extract import ExtractOptions, Extractor
    from monkey_cli.extract.schema import SchemaError

    monkey = service.ready()
    fields = job.fields
    schema = _schema(fields)
    settings = service.settings
    count = len(schema.fields)
    if count > settings.max_questions:
        raise bad_request(
            f"{count} fields; this server asks at most {settings.max_questions} questions per request "
            "(--max-questions): send the others in another request",
            "schema" if fields.schema_ is not None else "field",
            code="too_many_questions",
        )
    pages = service.check_pages(Source(job.name, data=job.data), fields.pages, fields.password)
    if pages * count > settings.max_answers:
        raise bad_request(
            f"{pages} pages x {count} fields = {pages * count} answers; this server gives at most "
            f"{settings.max_answers} per request (--max-answers): choose fewer pages or fields, or send several "
            "requests",
            "pages",
            code="too_many_answers",
        )
    max_tokens = min(fields.max_tokens or DEFAULT_MAX_TOKENS, settings.max_new_tokens)
    if max_tokens < 2:
        raise bad_request(f"extract needs answers of at least 2 tokens; this server's --max-new-tokens is "
                          f"{settings.max_new_tokens}", "max_tokens")  # fmt: skip
    options = ExtractOptions(
        max_new_tokens=max_tokens,
        min_confidence=fields.min_confidence,
        all_pages=fields.all_pages,
        null_probability=fields.null_probability,
        batch_size=monkey.batch_size,
    )
    try:  # compiles every field's grammar: a pattern the regex engine refuses fails here
        return Extractor(lambda: monkey, schema, options, model_name=service.model_name, quant=monkey.quant)
    except SchemaError as exc:
        param = "schema" if fields.schema_ is not None else "field"
        raise bad_request(str(exc), param, code="invalid_schema") from None


def _schema(fields: ExtractFields) -> Any:
    """The fields to extract: `schema`, then `field` (as the CLI combines --schema and --field)."""
    from monkey_cli.extract import from_json_schema, from_short_forms
    from monkey_cli.extract.schema import SchemaError

    parts, param = [], "schema"
    try:
        if fields.schema_ is not None:
            parts.append(from_json_schema(fields.schema_, origin="schema"))
        if fields.field:
            param = "field"
            parts.append(from_short_forms(fields.field, origin="field"))
        if not parts:
            raise bad_request("nothing to extract: send `schema` (a JSON Schema object) or `field` "
                              "(NAME:TYPE=QUESTION)", "schema", code="missing_schema")  # fmt: skip
        combined = parts[0]
        for part in parts[1:]:
            param = "field"
            combined = combined + part
    except SchemaError as exc:
        raise bad_request(str(exc), param, code="invalid_schema") from None
    return combined


def _document(service: ModelService, job: ExtractJob, extractor: Any, run: Any, emit: Emit | None = None) -> str:
    """Runs in a worker thread: the CLI's pages flow into the extractor, its requests through `run`; `emit`
    (from any thread) gets the stream's events."""
    from monkey_cli.documents import Source, iter_pages
    from monkey_cli.extract.results import render

    monkey = service.ready()
    extractor.loop = run  # every request of this document in one scheduling group, cancelled together
    pages: Iterable[Any] = uploads.serialized(
        iter_pages([Source(job.name, data=job.data)], size=monkey.processor.input_size, pages=job.fields.pages,
                   password=job.fields.password, render_timeout=service.render_timeout)
    )  # fmt: skip
    if emit is not None:
        pages = _told_pages(pages, emit)
    records = []
    for record in extractor.run(pages):
        records.append(record)
        if emit is not None:
            emit({"type": "record", "record": record.to_dict(), "retry": record.retry})
    return render(records, "json", extractor.schema.names)


def _told_pages(pages: Iterable[Any], emit: Emit) -> Iterator[Any]:
    """`pages`, each also told as an event: `page` as it goes to the model (a client counts them), `page_error`
    with whether it is of the moment (a client's resume tells a failure for good by it)."""
    from monkey_cli.documents import PageError

    for item in pages:
        if isinstance(item, PageError):
            emit({"type": "page_error", "page": item.page, "message": item.message, "transient": item.transient})
        else:
            emit({"type": "page", "page": item.page, "pages": item.pages})
        yield item


def _events(service: ModelService, job: ExtractJob, extractor: Any, request: Request) -> AsyncIterator[str]:
    """The document's server-sent events (the module's docstring), then `done` and `[DONE]`."""

    def start(put: Callable[[dict[str, Any]], None]) -> Awaitable[str]:
        emit = threadsafe_call(asyncio.get_running_loop(), put)  # the extraction's events come from worker threads
        return service.run_guarded(
            lambda run: _document(service, job, extractor, run, emit), lambda: client_gone(request)
        )

    async def done(document: str) -> dict[str, Any]:
        return {"document": json.loads(document), "json": document}

    return event_stream(start, done, "extraction")

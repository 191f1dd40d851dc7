"""`monkey serve`: parse, then `monkey_cli.serve.server.serve` until interrupted."""

from __future__ import annotations

from typing import Annotated

import typer

from monkey_cli.cli import app
from monkey_cli.cli.common import Command, adapter_base, needs_extra, user_errors
from monkey_cli.cli.options import (
    Adapter,
    BatchSize,
    Compile,
    Device,
    Dtype,
    MaxNewTokens,
    Model,
    PromptStyle,
    Quant,
    QuantVision,
    RenderTimeout,
    Verbose,
    positive_int,
)
from monkey_cli.documents.renderer import DEFAULT_RENDER_TIMEOUT
from monkey_cli.serve import settings as defaults
from monkey_cli.tasks import DEFAULT_MODEL

SERVER = "Server"


def _port(value: str | int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise typer.BadParameter(f"must be a port number in 0..65535 (0: any free port); got {value!r}")
    return number


def _seconds(value: str | float) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        number = 0.0
    if not 0 < number < float("inf"):
        raise typer.BadParameter(f"must be a positive number of seconds; got {value!r}")
    return number


def _size(value: str | int) -> int:
    from monkey_cli.documents.inputs import parse_byte_size

    try:
        return parse_byte_size(str(value))
    except ValueError:
        raise typer.BadParameter(f"must be a size such as 64M, 512K or 1G; got {value!r}") from None


def _api_key(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise typer.BadParameter("must not be empty")
    return value


Host = Annotated[
    str,
    typer.Option(
        "--host", metavar="ADDRESS", rich_help_panel=SERVER,
        help="Address to listen on: 127.0.0.1 is this machine only; 0.0.0.0 every network (set --api-key then).",
    ),
]  # fmt: skip
Port = Annotated[
    int,
    typer.Option("--port", metavar="N", parser=_port, rich_help_panel=SERVER, help="Port (0: any free one)."),
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key", envvar="MONKEY_API_KEY", metavar="KEY", parser=_api_key, rich_help_panel=SERVER,
        show_default=False,
        help="Require 'Authorization: Bearer KEY' on every request (the variable keeps it out of `ps`).",
    ),
]  # fmt: skip
MaxQueue = Annotated[
    int,
    typer.Option(
        "--max-queue", metavar="N", parser=positive_int, rich_help_panel=SERVER,
        help="Most requests in progress at once (answers, documents); more get 429 (busy, retry).",
    ),
]  # fmt: skip
RequestTimeout = Annotated[
    float,
    typer.Option(
        "--request-timeout", metavar="SECONDS", parser=_seconds, rich_help_panel=SERVER,
        help="Longest an HTTP request may take (a whole document included); then 504 and its work is dropped.",
    ),
]  # fmt: skip
MaxUpload = Annotated[
    int,
    typer.Option(
        "--max-upload", metavar="SIZE", parser=_size, rich_help_panel=SERVER, show_default="64M",
        help="Largest request body (an image as base64 in JSON, or an uploaded document), e.g. 64M; more gets 413.",
    ),
]  # fmt: skip
MaxPages = Annotated[
    int,
    typer.Option(
        "--max-pages", metavar="N", parser=positive_int, rich_help_panel=SERVER,
        help="Most pages of a document one request may select.",
    ),
]  # fmt: skip

MaxQuestions = Annotated[
    int,
    typer.Option(
        "--max-questions", metavar="N", parser=positive_int, rich_help_panel=SERVER,
        help="Most questions one document request may ask (fields, for /v1/extract).",
    ),
]  # fmt: skip
MaxAnswers = Annotated[
    int,
    typer.Option(
        "--max-answers", metavar="N", parser=positive_int, rich_help_panel=SERVER,
        help="Most answers one request may ask for: pages x questions (or fields), or a chat request's n.",
    ),
]  # fmt: skip
BodyTimeout = Annotated[
    float,
    typer.Option(
        "--body-timeout", metavar="SECONDS", parser=_seconds, rich_help_panel=SERVER,
        help="Seconds a request's body may take to arrive (one more per 64 KiB received); then 408.",
    ),
]  # fmt: skip


def _names(value: str) -> str:
    names = [name.strip() for name in str(value).split(",")]
    if not all(names) or any(" " in name or "/" in name for name in names):
        raise typer.BadParameter(f"must be names separated by commas (or *); got {value!r}")
    return ",".join(names)


def _origins(value: str) -> str:
    origins = [origin.strip().rstrip("/") for origin in str(value).split(",")]
    for origin in origins:
        scheme, separator, rest = origin.partition("://")
        if origin != "*" and (not separator or scheme not in ("http", "https") or not rest or "/" in rest):
            raise typer.BadParameter(f"must be origins such as http://localhost:3000, separated by commas (or *); "
                                     f"got {value!r}")  # fmt: skip
    return ",".join(origins)


AllowedHosts = Annotated[
    str | None,
    typer.Option(
        "--allowed-hosts", metavar="NAMES", parser=_names, rich_help_panel=SERVER, show_default=False,
        help="Names the server answers to besides localhost, its IP addresses and --host, comma-separated "
        "(* any): the Host header of every other request is refused (DNS rebinding).",
    ),
]  # fmt: skip
AllowedOrigins = Annotated[
    str | None,
    typer.Option(
        "--allowed-origins", metavar="ORIGINS", parser=_origins, rich_help_panel=SERVER, show_default=False,
        help="Web origins whose pages may use the API (CORS), e.g. http://localhost:3000 (* any); every "
        "other site's POST is refused (CSRF).",
    ),
]  # fmt: skip


AccessLog = Annotated[
    bool,
    typer.Option(
        "--access-log/--no-access-log", rich_help_panel=SERVER,
        help="A line per request on stderr: method, path, status, milliseconds, bytes (never a query string, "
        "a header or a body).",
    ),
]  # fmt: skip


@app.command(cls=Command)
def serve(
    host: Host = defaults.DEFAULT_HOST,
    port: Port = defaults.DEFAULT_PORT,
    api_key: ApiKey = None,
    max_queue: MaxQueue = defaults.DEFAULT_MAX_QUEUE,
    request_timeout: RequestTimeout = defaults.DEFAULT_REQUEST_TIMEOUT,
    max_upload: MaxUpload = defaults.DEFAULT_MAX_UPLOAD_BYTES,
    max_pages: MaxPages = defaults.DEFAULT_MAX_PAGES,
    max_questions: MaxQuestions = defaults.DEFAULT_MAX_QUESTIONS,
    max_answers: MaxAnswers = defaults.DEFAULT_MAX_ANSWERS,
    body_timeout: BodyTimeout = defaults.DEFAULT_BODY_TIMEOUT,
    allowed_hosts: AllowedHosts = None,
    allowed_origins: AllowedOrigins = None,
    render_timeout: RenderTimeout = DEFAULT_RENDER_TIMEOUT,
    access_log: AccessLog = True,
    model: Model = DEFAULT_MODEL,
    quant: Quant = "auto",
    quant_vision: QuantVision = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    adapter: Adapter = None,
    compile: Compile = None,
    prompt_style: PromptStyle = "auto",
    batch_size: BatchSize = defaults.DEFAULT_SLOTS,
    max_new_tokens: MaxNewTokens = defaults.DEFAULT_MAX_NEW_TOKENS,
    verbose: Verbose = False,
) -> None:
    """Serve the model to many clients: an OpenAI-compatible API (/v1/chat/completions), the CLI's records
    (/v1/documents) and a web page (/). --batch-size is the number of requests decoded together."""
    with user_errors(verbose):
        needs_extra("serve")
        model = adapter_base(model, adapter)
        from monkey_cli.errors import UsageError
        from monkey_cli.serve.server import serve as run
        from monkey_cli.serve.settings import ServeSettings

        if quant_vision and quant == "none":
            raise UsageError("--quant-vision needs --quant auto, 8bit or 4bit")
        settings = ServeSettings(
            model=model,
            device=device,
            dtype=None if dtype == "auto" else dtype,
            quant=quant,
            quant_vision=quant_vision,
            prompt_style=prompt_style,
            adapter=None if adapter is None else str(adapter),
            compile=compile,
            slots=batch_size,
            max_new_tokens=max_new_tokens,
            host=host,
            port=port,
            api_key=api_key,
            max_queue=max_queue,
            request_timeout=request_timeout,
            max_upload_bytes=max_upload,
            max_pages=max_pages,
            max_questions=max_questions,
            max_answers=max_answers,
            body_timeout=body_timeout,
            allowed_hosts=tuple(allowed_hosts.split(",")) if allowed_hosts else (),
            allowed_origins=tuple(allowed_origins.split(",")) if allowed_origins else (),
            render_timeout=render_timeout,
            access_log=access_log,
        )
        run(settings, verbose=verbose)

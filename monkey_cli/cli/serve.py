"""`monkey serve`: parse, then `monkey_cli.serve.server.serve` until interrupted."""

from __future__ import annotations

from typing import Annotated

import typer

from monkey_cli.cli import app
from monkey_cli.cli.common import Command, needs_extra, user_errors
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
    Verbose,
    positive_int,
)
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


@app.command(cls=Command)
def serve(
    host: Host = defaults.DEFAULT_HOST,
    port: Port = defaults.DEFAULT_PORT,
    api_key: ApiKey = None,
    max_queue: MaxQueue = defaults.DEFAULT_MAX_QUEUE,
    request_timeout: RequestTimeout = defaults.DEFAULT_REQUEST_TIMEOUT,
    max_upload: MaxUpload = defaults.DEFAULT_MAX_UPLOAD_BYTES,
    max_pages: MaxPages = defaults.DEFAULT_MAX_PAGES,
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
        )
        run(settings, verbose=verbose)

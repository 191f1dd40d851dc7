"""`monkey mcp --root DIR`: serve ask, caption, read and extract over the Model Context Protocol (stdio) to a desktop
assistant or an agent, on files under DIR only, with the model options of the other commands."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from monkey_cli.cli import app
from monkey_cli.cli.common import Command, adapter_base, model_options, needs_extra, user_errors, warn
from monkey_cli.cli.options import (
    INPUT,
    PROMPT,
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
from monkey_cli.serve.settings import DEFAULT_MAX_QUESTIONS as DEFAULT_MAX_FIELDS
from monkey_cli.tasks import DEFAULT_MODEL


def _folder(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_dir():
        raise typer.BadParameter(f"must be a folder; {value!r} is {'a file' if path.exists() else 'not there'}")
    return path


Root = Annotated[
    Path,
    typer.Option(
        "--root", metavar="DIR", parser=_folder, rich_help_panel=INPUT, show_default=False,
        help="The folder the tools may read: only files under it, named relative to it; symbolic links are "
        "not followed.",
    ),
]  # fmt: skip

MaxFields = Annotated[
    int,
    typer.Option(
        "--max-fields", metavar="N", parser=positive_int, rich_help_panel=PROMPT,
        help="Most fields one extract call may ask for (each is a question of every page).",
    ),
]  # fmt: skip


@app.command(cls=Command)
def mcp(
    root: Root,
    model: Model = DEFAULT_MODEL,
    quant: Quant = "auto",
    quant_vision: QuantVision = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    adapter: Adapter = None,
    compile: Compile = None,
    prompt_style: PromptStyle = "auto",
    batch_size: BatchSize = 4,
    max_new_tokens: MaxNewTokens = 512,
    max_fields: MaxFields = DEFAULT_MAX_FIELDS,
    verbose: Verbose = False,
) -> None:
    """Serve the tools ask, caption, read and extract over the Model Context Protocol on stdin/stdout (for Claude
    Desktop, IDEs and agents); the model loads on the first call that needs it and stays loaded."""
    with user_errors(verbose):
        needs_extra("mcp")
        model = adapter_base(model, adapter)
        from monkey_cli.mcp import DocumentService, RootFolder, ToolSettings, serve_stdio

        options = model_options(model, device=device, dtype=dtype, quant=quant, quant_vision=quant_vision,
                                prompt_style=prompt_style, compile=compile, adapter=adapter)  # fmt: skip
        settings = ToolSettings(options, max_new_tokens=max_new_tokens, batch_size=batch_size, max_fields=max_fields)
        try:
            serve_stdio(DocumentService(RootFolder(root), settings))
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP (monkey_cli.signals)
            _leave_now()


def _leave_now() -> NoReturn:
    """End at once with 128 + the signal: the SDK reads stdin on a worker thread that only the client's
    closing its end stops, and the interpreter would wait for it at exit. Nothing is left to save."""
    import os
    import sys

    from monkey_cli import signals

    warn("interrupted")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(signals.exit_code())

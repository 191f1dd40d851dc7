"""`monkey render`: write the pages exactly as the model will see them, to check that small print survives."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from monkey_cli.cli import app
from monkey_cli.cli.common import EXIT_SOME_FAILED, Command, user_errors, warn
from monkey_cli.cli.options import (
    INPUT,
    OUTPUT,
    Inputs,
    Pages,
    Password,
    RenderTimeout,
    Size,
    Verbose,
    out_option,
    positive_int,
)
from monkey_cli.documents import DEFAULT_MAX_PIXELS, DEFAULT_RENDER_TIMEOUT  # documents imports nothing heavy

RenderOut = Annotated[Path, out_option("Folder to write into; nothing is written outside it.")]
MaxPixels = Annotated[
    int,
    typer.Option(
        "--max-pixels", metavar="N", parser=positive_int, rich_help_panel=INPUT,
        help="Refuse larger images (decompression-bomb guard).",
    ),
]  # fmt: skip


@app.command(cls=Command)
def render(
    inputs: Inputs,
    out: RenderOut,
    pages: Pages = None,
    size: Size = None,
    password: Password = None,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    render_timeout: RenderTimeout = DEFAULT_RENDER_TIMEOUT,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", rich_help_panel=OUTPUT,
            help="Replace files in --out that monkey did not write (never done otherwise).",
        ),
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Write each page at the model's input size with its 448-pixel windows outlined and numbered, every
    window as its own PNG, and the 448x448 global view. Prints the grid image of each page."""
    failed = 0
    with user_errors(verbose):
        from monkey_cli.documents import DEFAULT_SIZE, PageError
        from monkey_cli.printing import terminal_line
        from monkey_cli.render import render_documents

        written = 0
        records = render_documents(
            inputs,
            out,
            size=size or DEFAULT_SIZE,
            pages=pages,
            password=password,
            max_pixels=max_pixels,
            overwrite=overwrite,
            render_timeout=render_timeout,
        )
        for record in records:
            if isinstance(record, PageError):
                warn(f"error: {record}")
                failed += 1
            else:
                typer.echo(terminal_line(record.grid))
                written += 1
        noun = "page" if written == 1 else "pages"
        warn(f"rendered {written} {noun} into {out}" + (f"; {failed} failed" if failed else ""))
    if failed:
        raise typer.Exit(EXIT_SOME_FAILED)

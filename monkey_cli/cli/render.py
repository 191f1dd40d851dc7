"""`monkey render`: write the pages exactly as the model will see them, to check that small print survives."""

from __future__ import annotations

from pathlib import Path

import typer

from monkey_cli.cli import app
from monkey_cli.cli.common import EXIT_SOME_FAILED, user_errors, warn
from monkey_cli.documents import DEFAULT_MAX_PIXELS  # the documents module imports nothing heavy


@app.command()
def render(
    inputs: list[str] = typer.Argument(
        ..., help="Files, folders, globs, or '-' for paths (or one document's bytes) on stdin."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write into; nothing is written outside it."),
    pages: str | None = typer.Option(
        None, "--pages", "-p", help="Pages of every document, e.g. 1-3,7,-1 (-1 is the last page)."
    ),
    size: str = typer.Option(
        "896x896", "--size", help="Model input size HEIGHTxWIDTH in pixels, multiples of 448 (896x896 for Monkey)."
    ),
    password: str | None = typer.Option(
        None, "--password", envvar="MONKEY_PDF_PASSWORD", help="Password for encrypted PDFs."
    ),
    max_pixels: int = typer.Option(
        DEFAULT_MAX_PIXELS, "--max-pixels", min=1, help="Refuse larger images (decompression-bomb guard)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace files in --out that monkey did not write (never done otherwise)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks for unexpected errors."),
) -> None:
    """Write each page at the model's input size with its 448-pixel windows outlined and numbered, every
    window as its own PNG, and the 448x448 global view. Prints the grid image of each page."""
    failed = 0
    with user_errors(verbose):
        from monkey_cli.documents import PageError
        from monkey_cli.printing import terminal_line
        from monkey_cli.render import render_documents

        written = 0
        records = render_documents(
            inputs, out, size=size, pages=pages, password=password, max_pixels=max_pixels, overwrite=overwrite
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

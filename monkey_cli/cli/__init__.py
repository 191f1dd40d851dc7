"""The `monkey` command line: thin commands that parse, call the library, and print.

One module per command group; each registers itself on `app`. Heavy imports (torch, transformers,
pymupdf) happen inside the commands so `monkey --help` stays fast.
"""

from __future__ import annotations

import typer

from monkey_cli import __version__

app = typer.Typer(
    name="monkey",
    help="Ask questions about, caption, and read PDFs, scans and photos with the Monkey multimodal model.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"monkey-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Document understanding with Monkey."""


def _register_commands() -> None:
    # Importing a command module registers its commands on `app` (modules import only light things).
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(f"monkey_cli.cli.{name}")


_COMMAND_MODULES: list[str] = ["run", "render", "doctor", "eval", "finetune"]


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:  # noqa: ANN001
    return f"warning: {message}\n"


def main() -> None:
    import warnings

    warnings.formatwarning = _one_line_warning  # library warnings (e.g. the slow-CPU one) as one stderr line
    _register_commands()
    app()

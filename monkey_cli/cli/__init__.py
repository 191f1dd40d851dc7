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
    _show_warnings_as_lines()


def _show_warnings_as_lines() -> None:
    """Library warnings (an input skipped, a damaged file repaired, the slow-CPU note) as one stderr line
    each, every time (two documents with the same problem get a line each), control characters escaped."""
    import warnings

    from monkey_cli.errors import MonkeyWarning

    warnings.showwarning = _show_warning
    warnings.simplefilter("always", MonkeyWarning)


def _register_commands() -> None:
    # Importing a command module registers its commands on `app` (modules import only light things).
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(f"monkey_cli.cli.{name}")


_COMMAND_MODULES: list[str] = ["run", "extract", "render", "doctor", "eval", "finetune", "serve", "mcp"]


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    import contextlib
    import sys

    from monkey_cli.printing import terminal_line

    with contextlib.suppress(OSError, ValueError, AttributeError):  # stderr gone (SIGHUP, closed): never fail
        print(f"warning: {terminal_line(message)}", file=sys.stderr, flush=True)


def main() -> None:
    """The `monkey` command. SIGINT, SIGTERM and SIGHUP end it with 128 + signal, finished results kept."""
    from monkey_cli import signals

    try:
        signals.install()  # already done by `monkey_cli.__main__`, which installs it before any import
        _show_warnings_as_lines()  # also before a command runs (warnings while imports happen)
        _register_commands()
        app()
    except KeyboardInterrupt:  # outside any command (while registering them, or in the argument parser)
        raise SystemExit(signals.exit_code()) from None
    except SystemExit:
        # typer reports an interrupt as 130 whatever the signal was; the status must name the signal.
        if signals.received() is not None:
            raise SystemExit(signals.exit_code()) from None
        raise
    finally:
        signals.leaving()

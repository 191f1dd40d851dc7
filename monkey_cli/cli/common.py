"""What every command shares: one-line errors, exit codes, and stderr-only chatter."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer

from monkey_cli import signals
from monkey_cli.errors import MonkeyError, UsageError
from monkey_cli.printing import terminal_line

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def warn(message: str) -> None:
    """One line on stderr (stdout carries results only), control characters made visible."""
    print(terminal_line(message), file=sys.stderr, flush=True)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    warn(f"error: {message}")
    raise typer.Exit(code)


@contextmanager
def user_errors(verbose: bool = False) -> Iterator[None]:
    """Turn user-caused errors into one line on stderr and an exit code; tracebacks only with --verbose."""
    try:
        try:
            yield
        except Exception as exc:
            if signals.caused(exc):  # a library turned the interrupt into an error of its own
                raise KeyboardInterrupt from exc
            raise
    except typer.Exit:
        raise
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP (monkey_cli.signals): 128 + signal
        warn("interrupted")
        raise typer.Exit(signals.exit_code(EXIT_INTERRUPTED)) from None
    except UsageError as exc:
        if verbose:
            traceback.print_exc()
        fail(str(exc), EXIT_USAGE)
    except MonkeyError as exc:
        if verbose:
            traceback.print_exc()
        fail(str(exc), EXIT_USAGE)
    except Exception as exc:  # a bug: say so in one line, show the traceback on request
        if verbose:
            traceback.print_exc()
        fail(f"unexpected {type(exc).__name__}: {exc} (run with --verbose for the traceback)", EXIT_SOME_FAILED)

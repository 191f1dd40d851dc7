"""What every command shares: one-line errors, exit codes, and stderr-only chatter."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer

from monkey_cli.errors import MonkeyError, UsageError

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def warn(message: str) -> None:
    """One line on stderr (stdout carries results only)."""
    print(message, file=sys.stderr, flush=True)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    warn(f"error: {message}")
    raise typer.Exit(code)


@contextmanager
def user_errors(verbose: bool = False) -> Iterator[None]:
    """Turn user-caused errors into one line on stderr and an exit code; tracebacks only with --verbose."""
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        warn("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None
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

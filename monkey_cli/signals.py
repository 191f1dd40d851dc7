"""SIGINT, SIGTERM and SIGHUP all end a run the same way: finished results are kept, exit 128 + signal.

Python turns only SIGINT into an exception (KeyboardInterrupt); SIGTERM (`kill`, `timeout`, a job
scheduler) and SIGHUP (the terminal went away) kill the process on the spot, so a JSON document or Markdown
report that is written at the end never reaches stdout. `install()` makes all three raise `Interrupted`, a
KeyboardInterrupt, so every `finally:` and `except KeyboardInterrupt:` that already saves finished work for
Ctrl-C does the same for them, and the exit status says which signal it was (130, 143, 129).

A second signal while that clean-up runs ends the process at once (the user or the system insists), still
with status 128 + signal and without a traceback. `deferred()` holds a signal back for the few statements
that must not be split (rename an output into place, then record it), and raises it right after.

Signals the process was started with ignored (`nohup` ignores SIGHUP, `cmd &` in a script ignores SIGINT)
stay ignored.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["Interrupted", "caused", "deferred", "exit_code", "install", "leaving", "received", "uninstall"]

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def _handled_signals() -> list[signal.Signals]:
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    return [getattr(signal, name) for name in names if hasattr(signal, name)]


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; `exit_code` is the status a shell expects (128 + the signal number)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {_name(signum)}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _State:
    def __init__(self) -> None:
        self.received: int | None = None
        self.defer_depth = 0
        self.pending = False
        self.leaving = False
        self.previous: dict[int, object] = {}


_state = _State()


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _handle(signum: int, frame: FrameType | None) -> None:
    if _state.received is not None:
        # A second signal during the clean-up of the first: leave now, quietly, with the first one's status.
        os._exit(128 + _state.received)
    if _state.leaving:  # the work is done and written: nothing left to save, just go
        _state.received = signum
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(128 + signum)
    _state.received = signum
    if _state.defer_depth:
        _state.pending = True
        return
    raise Interrupted(signum)


def install() -> None:
    """Route SIGINT, SIGTERM and SIGHUP to `Interrupted` (main thread only; ignored signals stay ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return
    handled = _handled_signals()
    can_mask = hasattr(signal, "pthread_sigmask")
    if can_mask:  # none may arrive half-way through; one held back meanwhile is delivered to the new handler
        signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    try:
        for signum in handled:
            previous = signal.signal(signum, _handle)
            if previous is signal.SIG_IGN:
                signal.signal(signum, signal.SIG_IGN)
            elif previous is not _handle:
                _state.previous[signum] = previous
    finally:
        if can_mask:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)


def uninstall() -> None:
    """Put back the handlers `install()` replaced and forget any signal received (for tests and embedding)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, previous in _state.previous.items():
        signal.signal(signum, previous)  # type: ignore[arg-type]
    _state.__init__()


def leaving() -> None:
    """The command is done: a signal from now on ends the process at once instead of raising."""
    _state.leaving = True


def received() -> int | None:
    """The signal that interrupted this process, if one did."""
    return _state.received


def caused(exc: BaseException) -> bool:
    """Whether `exc` is (or came from) an interrupt: a KeyboardInterrupt, or anything raised after a signal.

    Some libraries turn a KeyboardInterrupt raised inside them into their own error (transformers' lazy
    imports raise ModuleNotFoundError), so once a signal came, whatever error follows is its consequence.
    """
    return isinstance(exc, KeyboardInterrupt) or _state.received is not None


def exit_code(default: int = EXIT_INTERRUPTED) -> int:
    """128 + the signal received, or `default` (130, as for Ctrl-C) when none was."""
    return default if _state.received is None else 128 + _state.received


@contextmanager
def deferred() -> Iterator[None]:
    """Hold a signal back until the block is done, then raise it (a no-op unless `install()` ran)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.defer_depth += 1
    try:
        yield
    except BaseException as exc:
        if _leave_deferral() and not isinstance(exc, KeyboardInterrupt):
            raise Interrupted(_state.received or signal.SIGINT) from exc
        raise
    if _leave_deferral():
        raise Interrupted(_state.received or signal.SIGINT)


def _leave_deferral() -> bool:
    """Leave one level of `deferred()`; True when a signal came meanwhile and is now due."""
    _state.defer_depth -= 1
    if _state.defer_depth == 0 and _state.pending:
        _state.pending = False
        return True
    return False

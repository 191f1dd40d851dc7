"""A one-line progress status on stderr, only when stderr is a terminal (pipelines and logs stay clean).

    ⠹ answering · 3/10 documents · 7 pages · 0.42 pages/s · ETA 0:17 · 0:25

It names the stage (rendering, loading the model, answering), counts documents against the total known up
front, and shows pages/s and an ETA once answers arrive. It is one line, redrawn in place and cut to the
terminal's width (so it never wraps), and it is cleared before anything else is printed: results written
through `guard(stdout)` and messages written with `common.warn` never share a line with it, and nothing of
it is left on the screen when the run ends.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from types import TracebackType
from typing import Any, TextIO

from monkey_cli.cli import common

_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
_CLEAR_LINE = "\r\x1b[2K"
_REFRESH_S = 0.25


class Progress:
    """The status line; every method is a no-op when disabled."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self._stream = stream
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._suspended = 0
        self._shown = False
        self._tick = 0
        self._stage = "starting"
        self._documents_total: int | None = None
        self._documents_done = 0
        self._pages_done = 0
        self._current_pages: int | None = None  # page count of the document being answered, once known
        self._current_done = 0
        self._started = time.monotonic()
        self._answering_since: float | None = None

    # --- life cycle -----------------------------------------------------------------------------------
    def __enter__(self) -> Progress:
        if self.enabled:
            common.status_line = self
            self._thread = threading.Thread(target=self._ticker, name="monkey-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Clear the line for good (the run is over, or a token stream takes the terminal)."""
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1)
        with self._lock:
            self._clear()
            self.enabled = False
        if common.status_line is self:
            common.status_line = None

    # --- events ---------------------------------------------------------------------------------------
    def start(self, documents: int) -> None:
        self._documents_total = documents

    def stage(self, name: str) -> None:
        self._stage = name
        if name == "answering" and self._answering_since is None:
            self._answering_since = time.monotonic()
        self._draw()

    def page_done(self, pages_in_document: int | None = None) -> None:
        self._pages_done += 1
        self._current_done += 1
        self._current_pages = pages_in_document
        self._draw()

    def document_done(self, name: str) -> None:
        self._documents_done += 1
        self._current_done, self._current_pages = 0, None
        self._draw()

    # --- sharing the terminal ---------------------------------------------------------------------------
    def suspend(self) -> None:
        """Clear the line and keep it off until `resume` (something else is being printed)."""
        if not self.enabled:
            return
        with self._lock:
            self._suspended += 1
            self._clear()

    def resume(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._suspended = max(0, self._suspended - 1)
        self._draw()

    def guard(self, stream: TextIO) -> TextIO:
        """`stream` (stdout) wrapped so that the status line is cleared before each result and redrawn
        only once the result's line is complete."""
        return _Guarded(stream, self) if self.enabled else stream

    # --- drawing ----------------------------------------------------------------------------------------
    def text(self) -> str:
        """The status line's content (without the spinner)."""
        parts = [self._stage]
        if self._documents_total is not None:
            parts.append(f"{self._documents_done}/{self._documents_total} documents")
        parts.append(f"{self._pages_done} page{'' if self._pages_done == 1 else 's'}")
        now = time.monotonic()
        if self._answering_since is not None and self._pages_done:
            parts.append(f"{self._pages_done / max(now - self._answering_since, 1e-9):.2f} pages/s")
            eta = self._eta(now)
            if eta is not None:
                parts.append(f"ETA {_clock(eta)}")
        parts.append(_clock(now - self._started))
        return " · ".join(parts)

    def _eta(self, now: float) -> float | None:
        if not self._documents_total or self._answering_since is None:
            return None
        current = self._current_done / self._current_pages if self._current_pages else 0.0
        fraction = min((self._documents_done + min(current, 1.0)) / self._documents_total, 1.0)
        if fraction <= 0:
            return None
        return (now - self._answering_since) * (1 - fraction) / fraction

    def _ticker(self) -> None:
        while not self._stop.wait(_REFRESH_S):
            self._tick += 1
            self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._suspended or not self.enabled:
                return
            width = max(shutil.get_terminal_size((80, 24)).columns - 1, 10)
            line = f"{_SPINNER[self._tick % len(_SPINNER)]} {self.text()}"[:width]
            self._shown = self._write(_CLEAR_LINE + line)

    def _clear(self) -> None:
        if self._shown:
            self._write(_CLEAR_LINE)
            self._shown = False

    def _write(self, text: str) -> bool:
        try:
            stream = self._stream if self._stream is not None else sys.stderr
            stream.write(text)
            stream.flush()
            return True
        except (OSError, ValueError):  # the terminal went away; results matter more than the status
            self.enabled = False
            return False


class _Guarded:
    """A text stream that keeps the status line off from a result's first character until the writer
    flushes it with its last line complete."""

    def __init__(self, stream: TextIO, progress: Progress) -> None:
        self._stream = stream
        self._progress = progress
        self._suspended = False
        self._line_open = False

    def write(self, text: str) -> int:
        if text and not self._suspended:
            self._progress.suspend()
            self._suspended = True
        if text:
            self._line_open = not text.endswith("\n")
        return self._stream.write(text)

    def flush(self) -> None:
        """Writers flush once a record is out: the status line comes back if the last line is complete."""
        self._stream.flush()
        if self._suspended and not self._line_open:
            self._suspended = False
            self._progress.resume()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"

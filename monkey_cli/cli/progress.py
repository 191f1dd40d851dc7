"""A rich progress bar on stderr, only when stderr is a terminal (pipelines and logs stay clean)."""

from __future__ import annotations

import time
from types import TracebackType


class Progress:
    """Documents done, pages/s and elapsed time; a no-op when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar = None
        self._task = None
        self._pages = 0
        self._started = time.perf_counter()

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed} docs, {task.fields[pages]} pages, {task.fields[rate]:.2f} pages/s"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("working", total=None, pages=0, rate=0.0)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, exc, tb)

    def page_done(self) -> None:
        self._pages += 1
        self._update()

    def document_done(self, name: str) -> None:
        if self._bar is not None:
            from rich.markup import escape

            from monkey_cli.printing import terminal_line

            # A document's name is the user's data: escaped like every other line, and [brackets] shown as
            # typed rather than read as rich markup.
            self._bar.update(self._task, advance=1, description=escape(terminal_line(name)[-40:]))

    def _update(self) -> None:
        if self._bar is not None:
            rate = self._pages / max(time.perf_counter() - self._started, 1e-9)
            self._bar.update(self._task, pages=self._pages, rate=rate)

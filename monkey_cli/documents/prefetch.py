"""Render ahead: pages are made in a background thread while the model works on the previous ones."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_ITEM, _RAISED, _DONE = "item", "raised", "done"


def prefetch(iterable: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate `iterable` in a background thread, up to `depth` items ahead of the consumer.

    Rendering the next pages then overlaps the model's work on the current ones. An exception raised by
    the producer is re-raised in the consumer after the items produced before it. If the consumer stops
    early (break, close, an exception), the producer stops at its next item and the source iterator is
    closed in its own thread (so documents it holds open get closed). The thread is a daemon: it never
    keeps the interpreter alive.
    """
    if depth < 1:
        raise ValueError(f"prefetch depth must be at least 1, got {depth}")
    return _prefetch(iterable, depth)


def _prefetch(iterable: Iterable[T], depth: int) -> Iterator[T]:
    handoff: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(message: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                handoff.put(message, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(iterable)
        try:
            for item in iterator:
                if not offer((_ITEM, item)):
                    return
            offer((_DONE, None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            offer((_RAISED, exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=produce, name="monkey-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = handoff.get()
            if kind == _ITEM:
                yield value
            elif kind == _RAISED:
                raise value
            else:
                return
    finally:
        stop.set()
        # The producer notices `stop` within one item; waiting briefly lets it close open documents
        # before the caller moves on, without hanging on a producer stuck in a slow read.
        worker.join(timeout=5)

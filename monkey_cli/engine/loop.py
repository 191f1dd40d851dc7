"""A scheduler driven by a background thread, for callers that submit from many threads (a web server).

`EngineLoop.submit()` is safe from any thread and returns the request's handle at once; the loop thread admits
and decodes while there is work and sleeps while there is none. All model work happens on that one thread.
"""

from __future__ import annotations

import logging
import threading

from monkey_cli.engine.scheduler import GenerationRequest, RequestHandle, Scheduler

logger = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._handles: set[RequestHandle] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="monkey-engine", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> RequestHandle:
        if self._stop.is_set():
            raise RuntimeError("the engine loop is closed")
        handle = self.scheduler.submit(request)
        with self._lock:
            self._handles.add(handle)
        self._wake.set()
        return handle

    @property
    def pending(self) -> int:
        """Requests submitted and not finished (waiting or decoding)."""
        with self._lock:
            return len(self._handles)

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop after the current step; requests still pending are cancelled."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:
            leftover, self._handles = self._handles, set()
        for handle in leftover:
            if not handle.done():
                handle._fail(RuntimeError("the engine was shut down"))

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.scheduler.idle:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                finished = self.scheduler.step()
            except Exception as exc:  # a bug or a callback's error: fail what is running, keep serving
                logger.exception("engine step failed")
                finished = self._fail_running(exc)
            with self._lock:
                self._handles.difference_update(finished)
                self._handles = {handle for handle in self._handles if not handle.done()}

    def _fail_running(self, error: BaseException) -> list[RequestHandle]:
        with self._lock:
            running = [handle for handle in self._handles if not handle.done()]
        for handle in running:
            handle.cancel()
        try:
            self.scheduler.step()  # frees the cancelled slots
        except Exception:  # noqa: BLE001 - the state is reset below either way
            logger.exception("engine step failed again while cancelling")
        for handle in running:
            if not handle.done():
                handle._fail(error)
        return running

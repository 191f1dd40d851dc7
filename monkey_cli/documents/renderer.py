"""PDF pages are opened and rendered by MuPDF in a child process, each within a time budget.

A few kilobytes of PDF can take MuPDF hours to draw (Form XObjects that each draw the next ten times, eight
levels deep), and while MuPDF works it holds Python's GIL: in-process, nothing else runs, no time limit
fires, no signal is acted on. So every MuPDF call on a document (opening it, rendering a page, reading its
text layer) runs in a child process (`python -c ...render_child`), and this process only waits for the
answer on a socket, which it can stop waiting for at any moment:

* a page that takes longer than the budget (`render_timeout` seconds, `--render-timeout`, default
  DEFAULT_RENDER_TIMEOUT; `MONKEY_RENDER_TIMEOUT` sets the default of a process) is an error for that page:
  the child is killed, the next page gets a fresh one, the other pages and documents go on;
* a signal (Ctrl-C, SIGTERM) is acted on at once: a waiting thread notices within a tenth of a second;
* a child that crashes (a MuPDF bug on hostile bytes) is an error for that page, not for the process;
* the child never outlives this process: it is killed when this process exits (Linux: even by SIGKILL,
  through PR_SET_PDEATHSIG), and it exits when its socket closes.

One child per process serves every document, one request at a time (MuPDF is not thread-safe, and one
renderer is what the pages' order needs). Its answers are a JSON header and raw pixel bytes, never a
pickle: nothing the child sends can run code here.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from monkey_cli.errors import DocumentError

DEFAULT_RENDER_TIMEOUT = 30.0  # seconds for one page (or for opening one document)
RENDER_TIMEOUT_ENV = "MONKEY_RENDER_TIMEOUT"
MAX_HEADER_BYTES = 256 << 20  # a page's text layer travels in the header
MAX_PAYLOAD_BYTES = 4 << 30
_POLL_S = 0.1
_START_TIMEOUT_S = 60.0  # importing PyMuPDF in the child, on a busy machine
_FRAME = struct.Struct(">IQ")  # header length, payload length


class RenderTimeout(DocumentError):
    """A page (or a document's opening) took longer than the render budget; worth a retry with a larger one."""


class RendererCrashed(DocumentError):
    """The renderer process died while working on a page (a crash in MuPDF on hostile bytes)."""


def default_render_timeout() -> float | None:
    """The budget of one page in this process: `MONKEY_RENDER_TIMEOUT` (seconds; 0: none), else the default."""
    raw = os.environ.get(RENDER_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_RENDER_TIMEOUT
    try:
        return check_render_timeout(float(raw))
    except ValueError:
        return DEFAULT_RENDER_TIMEOUT


def check_render_timeout(seconds: float | None) -> float | None:
    """`seconds` as a budget: None or 0 for none, else a positive finite number (ValueError otherwise)."""
    if seconds is None or seconds == 0:
        return None
    if not 0 < seconds < float("inf"):
        raise ValueError(f"the render budget must be a positive number of seconds (0: none), got {seconds!r}")
    return float(seconds)


@contextlib.contextmanager
def process_budget(seconds: float | None) -> Any:
    """Within the block, `seconds` is this process's render budget (None or 0: none), and the budget of the
    processes it starts (workers inherit the environment variable)."""
    previous = os.environ.get(RENDER_TIMEOUT_ENV)
    os.environ[RENDER_TIMEOUT_ENV] = "0" if not seconds else repr(float(seconds))
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(RENDER_TIMEOUT_ENV, None)
        else:
            os.environ[RENDER_TIMEOUT_ENV] = previous


def describe_budget(seconds: float) -> str:
    return f"{seconds:g} s, the render budget (--render-timeout)"


# --- the wire -------------------------------------------------------------------------------------------------


def send_message(sock: socket.socket, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
    data = json.dumps(header, separators=(",", ":")).encode("utf-8")
    sock.sendall(_FRAME.pack(len(data), len(payload)) + data)
    if payload:
        sock.sendall(payload)


def receive_message(
    sock: socket.socket, deadline: float | None = None, abort: Any = None
) -> tuple[dict[str, Any], bytes] | None:
    """The next message, or None when the other end closed. `deadline` (time.monotonic) raises TimeoutError;
    `abort()`, checked every tenth of a second, raises InterruptedError when it says so."""
    frame = _receive_exactly(sock, _FRAME.size, deadline, abort)
    if frame is None:
        return None
    header_size, payload_size = _FRAME.unpack(frame)
    if header_size > MAX_HEADER_BYTES or payload_size > MAX_PAYLOAD_BYTES:
        raise ConnectionError("renderer message too large")
    header = _receive_exactly(sock, header_size, deadline, abort)
    payload = _receive_exactly(sock, payload_size, deadline, abort) if payload_size else b""
    if header is None or payload is None:
        return None
    decoded = json.loads(header.decode("utf-8"))
    if not isinstance(decoded, dict):
        raise ConnectionError("renderer message is not an object")
    return decoded, payload


def _receive_exactly(sock: socket.socket, size: int, deadline: float | None, abort: Any) -> bytes | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        if abort is not None and abort():
            raise InterruptedError("stopped by a signal")
        wait = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
        if wait <= 0:
            raise TimeoutError
        sock.settimeout(wait if abort is not None or deadline is not None else None)
        try:
            count = sock.recv_into(view[got:], size - got)
        except TimeoutError:
            continue
        if count == 0:
            return None
        got += count
    return bytes(buffer)


# --- the parent's side ------------------------------------------------------------------------------------------


class Renderer:
    """The child process and its socket: `request(header, payload, timeout)` -> (header, payload)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self.generation = 0  # which child: documents opened in an earlier one must be opened again
        self._ids = itertools.count(1)
        self._owner = os.getpid()

    def new_id(self) -> int:
        return next(self._ids)

    def request(self, header: dict[str, Any], payload: bytes = b"", timeout: float | None = None) -> tuple[dict, bytes]:
        """Send one request and wait for its answer, at most `timeout` seconds (RenderTimeout; the child is
        killed). A signal received meanwhile (monkey_cli.signals) stops the wait: KeyboardInterrupt."""
        with self._lock:
            sock = self._started()
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                send_message(sock, header, payload)
                answer = receive_message(sock, deadline, _interrupted)
            except TimeoutError:
                self._stop()
                raise RenderTimeout(f"took longer than {describe_budget(timeout or 0)}") from None
            except InterruptedError:
                self._stop()
                raise KeyboardInterrupt from None
            except OSError:
                answer = None
            except BaseException:
                self._stop()  # the child's state is unknown now: a later answer would be out of step
                raise
            if answer is None:
                how = self._stop()
                raise RendererCrashed(f"the PDF renderer crashed ({how})")
            return answer

    def send(self, header: dict[str, Any]) -> None:
        """A message that has no answer (closing a document); dropped if the child is not running."""
        with self._lock:
            if self._sock is None:
                return
            try:
                send_message(self._sock, header)
            except OSError:
                self._stop()

    def _started(self) -> socket.socket:
        if self._owner != os.getpid():  # a forked copy of this process: the renderer is the parent's
            self._process, self._sock, self._owner = None, None, os.getpid()
        if self._sock is not None and self._process is not None and self._process.poll() is None:
            return self._sock
        self._stop()
        ours, theirs = socket.socketpair()
        try:
            self._process = _launch(theirs)
        except OSError as exc:
            ours.close()
            raise DocumentError(f"cannot start the PDF renderer ({exc.strerror or exc})") from None
        finally:
            theirs.close()
        self._sock = ours
        self.generation += 1
        # Ready (PyMuPDF imported) before any budget starts: starting it is not part of a page's time.
        try:
            send_message(ours, {"op": "ping"})
            ready = receive_message(ours, time.monotonic() + _START_TIMEOUT_S, _interrupted)
        except InterruptedError:
            self._stop()
            raise KeyboardInterrupt from None
        except (OSError, TimeoutError, ValueError):
            ready = None
        if ready is None:
            how = self._stop()
            raise RendererCrashed(f"the PDF renderer did not start ({how})")
        return ours

    def _stop(self) -> str:
        """Kill the child (if any); how it ended."""
        process, sock = self._process, self._sock
        self._process = self._sock = None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        if process is None:
            return "not running"
        if process.poll() is None:
            with contextlib.suppress(OSError):
                process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)
        code = process.returncode
        if code is not None and code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit status {code}"

    def shutdown(self) -> None:
        """Stop the child now, whatever it is doing (a waiting request gets RendererCrashed)."""
        if self._owner != os.getpid():
            return
        process, sock = self._process, self._sock
        if process is not None and process.poll() is None:
            with contextlib.suppress(OSError):
                process.kill()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


_RENDERER = Renderer()
atexit.register(_RENDERER.shutdown)


def renderer() -> Renderer:
    """This process's renderer (started on first use)."""
    return _RENDERER


def shutdown() -> None:
    """Stop this process's renderer at once (a server that shuts down: no render may keep it waiting)."""
    _RENDERER.shutdown()


def _interrupted() -> bool:
    from monkey_cli import signals

    return signals.received() is not None


# The child is started from one long-lived thread: PR_SET_PDEATHSIG fires when the *thread* that started a
# process ends, and a page iterator's thread (prefetch) ends long before this process does.
_launches: queue.Queue[tuple[socket.socket, queue.Queue[Any]]] = queue.Queue()
_launcher: threading.Thread | None = None
_launcher_lock = threading.Lock()


def _launch(theirs: socket.socket) -> subprocess.Popen[bytes]:
    global _launcher
    with _launcher_lock:
        if _launcher is None or not _launcher.is_alive():
            _launcher = threading.Thread(target=_launch_forever, name="monkey-render-launcher", daemon=True)
            _launcher.start()
    reply: queue.Queue[Any] = queue.Queue()
    _launches.put((theirs, reply))
    outcome = reply.get(timeout=_START_TIMEOUT_S)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _launch_forever() -> None:
    while True:
        theirs, reply = _launches.get()
        try:
            reply.put(_popen(theirs))
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that asked
            reply.put(exc)


def _popen(theirs: socket.socket) -> subprocess.Popen[bytes]:
    root = str(Path(__file__).resolve().parents[2])  # the folder monkey_cli is imported from
    code = (
        "import sys\n"
        f"sys.path.insert(0, {root!r}) if {root!r} not in sys.path else None\n"
        "from monkey_cli.documents.render_child import main\n"
        "main(int(sys.argv[1]), int(sys.argv[2]))\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(theirs.fileno()), str(os.getpid())],
        pass_fds=(theirs.fileno(),),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # MuPDF's messages are collected as warnings; nothing of the child is shown
        close_fds=True,
    )

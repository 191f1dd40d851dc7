"""Run the server: bind the socket, start uvicorn on the app, stop cleanly on a signal.

The socket is bound here, before uvicorn starts, so that an address in use or a port that needs privileges
is one clear error (and `--port 0` picks a free port, said in the first line on stderr). SIGINT and SIGTERM
(uvicorn's) and SIGHUP (ours) stop the server gracefully: requests in flight get a few seconds, the engine
stops, then the process ends with 128 + the signal like every monkey command.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from typing import Any

from monkey_cli.errors import MonkeyError
from monkey_cli.serve.settings import ServeSettings

log = logging.getLogger("monkey_cli.serve")

GRACEFUL_SHUTDOWN_SECONDS = 5
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class ServerError(MonkeyError):
    """The server cannot start: the address cannot be used, or the model cannot be loaded."""


def serve(settings: ServeSettings, *, verbose: bool = False) -> None:
    """Serve until interrupted (KeyboardInterrupt, as `monkey_cli.signals` raises it). Raises what stopped the
    model from loading, or ServerError when the address cannot be used."""
    import uvicorn

    from monkey_cli.serve.app import create_app
    from monkey_cli.serve.service import ModelService

    listener = listen(settings.host, settings.port)
    failures: list[BaseException] = []
    server: Any = None

    def stop_on_failure(exc: BaseException) -> None:
        failures.append(exc)
        server.should_exit = True

    service = ModelService(settings)
    app = create_app(service, on_load_failure=stop_on_failure, verbose=verbose)
    config = uvicorn.Config(
        app,
        log_config=None,  # our stderr handler shows our lines, and the others' only with --verbose
        log_level="info" if verbose else "warning",
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    server = uvicorn.Server(config)
    url = base_url(listener)
    log.info("monkey serve: %s (the web page; the OpenAI API is at %sv1): loading %s", url, url, settings.model)
    if settings.host not in LOOPBACK and not settings.api_key:
        log.warning("warning: listening on %s without --api-key: anyone who can reach it can use the model",
                    settings.host)
    with listener, _hangup_stops(server):
        server.run(sockets=[listener])
    if failures:
        raise failures[0]


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on `host`:`port` (0: any free port); ServerError naming the address otherwise."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ServerError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    try:
        return socket.create_server(address, family=family)
    except OSError as exc:
        raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def base_url(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


@contextlib.contextmanager
def _hangup_stops(server: Any) -> Iterator[None]:
    """SIGHUP stops the server like SIGTERM (uvicorn handles only SIGINT and SIGTERM), then is raised again
    to the handler it replaced, so the exit status says it. Left alone when ignored (nohup)."""
    hangup = getattr(signal, "SIGHUP", None)
    previous = signal.getsignal(hangup) if hangup is not None else signal.SIG_IGN
    if previous in (signal.SIG_IGN, None):
        yield
        return
    received: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        received.append(signum)
        server.should_exit = True

    signal.signal(hangup, stop)
    try:
        yield
    finally:
        signal.signal(hangup, previous)
    if received:
        signal.raise_signal(hangup)

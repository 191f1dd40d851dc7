"""Talking to a `monkey serve`: its settings (GET /health), one document's events (a streamed POST), and what
can go wrong, as exceptions a run turns into its one-line errors.

Two kinds of failure: `ServerError` when the server cannot be used at all (it cannot be reached, refuses the
key, is not a monkey server, its model failed to load): the command stops before any work, exit 2; and
`DocumentFailed` when it does not answer one document (a file it cannot read, a limit of its own, a time
limit, the connection lost midway): that document's error record, the others go on.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from monkey_cli.errors import MonkeyError
from monkey_cli.remote.requests import DocumentRequest

CONNECT_SECONDS = 10.0
# Between two events of a stream: the server's own --request-timeout (300 s by default) ends a request long
# before this; it only bounds a connection that went silent.
READ_SECONDS = 900.0
WAIT_FOR_MODEL_SECONDS = 0.5  # between two /health polls while the server's model loads
BUSY_RETRIES = 120  # a full queue (429) is retried after its Retry-After, this many times per document
_MAX_SHOWN = 300  # characters of a server's message shown


class ServerError(MonkeyError):
    """The server cannot be used at all (exit code 2, before any work)."""


class DocumentFailed(Exception):
    """The server did not answer a document. `permanent`: the same bytes always fail so (it found no document
    in them), so a resumed run reports it again instead of sending it again."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent


@dataclass(frozen=True)
class ServerInfo:
    """What the server's /health says decides its answers (besides a request's own fields)."""

    model: str
    quant: str | None
    family: str
    max_new_tokens: int | None
    dtype: str | None
    quant_vision: bool
    prompt_style: str
    adapter_sha256: str | None
    slots: int
    max_questions: int | None = None  # per request (None: an older server that does not say)

    @classmethod
    def from_health(cls, body: dict[str, Any]) -> ServerInfo:
        return cls(
            model=str(body["model"]),
            quant=body.get("quant"),
            family=str(body.get("family") or "monkey"),
            max_new_tokens=body.get("max_new_tokens"),
            dtype=body.get("dtype"),
            quant_vision=bool(body.get("quant_vision")),
            prompt_style=str(body.get("prompt_style") or "auto"),
            adapter_sha256=body.get("adapter_sha256"),
            slots=int(body.get("slots") or 1),
            max_questions=body.get("max_questions") if isinstance(body.get("max_questions"), int) else None,
        )


class Server:
    """A `monkey serve` at `url` (`http://127.0.0.1:8000`, or behind a proxy `https://host/prefix`), with the
    key `api_key` (sent as `Authorization: Bearer KEY`; None: none). Thread-safe: documents go in parallel."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.api_key = api_key or None
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        timeout = httpx.Timeout(READ_SECONDS, connect=CONNECT_SECONDS)
        self._httpx = httpx
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, follow_redirects=False)
        self._closed = False

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection: documents being answered are dropped by the server (it sees them go)."""
        self._closed = True
        self._client.close()

    # --- the server's settings --------------------------------------------------------------------------------
    def info(self, on_wait: Callable[[], None] = lambda: None) -> ServerInfo:
        """The server's settings, once its model is ready (`on_wait` is told once if it is still loading)."""
        waited = False
        while True:
            response = self._request("GET", "/health")
            body = _json(response)
            if not isinstance(body, dict) or response.status_code not in (200, 503):
                raise self._unusable(response, body)
            if body.get("key_required"):
                raise ServerError(self._key_problem())
            status = body.get("status")
            if status == "ready" and isinstance(body.get("model"), str):
                return ServerInfo.from_health(body)
            if status == "failed":
                raise ServerError(f"--server {self.url}: its model failed to load (the server's log says why)")
            if status not in ("loading", "warming"):  # warming: loaded, compiling its decode step
                raise ServerError(f"--server {self.url}: does not answer as `monkey serve` does (its /health)")
            if not waited:
                on_wait()
                waited = True
            time.sleep(WAIT_FOR_MODEL_SECONDS)

    def _key_problem(self) -> str:
        if self.api_key:
            return f"--server {self.url} refused the API key in $MONKEY_API_KEY: set it to the key the server was " \
                   "started with"  # fmt: skip
        return f"--server {self.url} needs an API key: set $MONKEY_API_KEY to the key it was started with"

    def _unusable(self, response: Any, body: Any) -> ServerError:
        if response.status_code == 401:
            return ServerError(self._key_problem())
        message = _error_message(body)
        if message:
            return ServerError(f"--server {self.url}: {response.status_code}: {message}")
        return ServerError(f"--server {self.url}: does not answer as `monkey serve` does (GET /health: "
                           f"{response.status_code})")  # fmt: skip

    def _request(self, method: str, path: str) -> Any:
        try:
            return self._client.request(method, path)
        except self._httpx.TransportError as exc:
            raise ServerError(f"--server {self.url}: cannot connect ({_reason(exc)}); is `monkey serve` running "
                              "there?") from None  # fmt: skip
        except self._httpx.InvalidURL as exc:
            raise ServerError(f"--server {self.url}: {_reason(exc)}") from None

    # --- one document -------------------------------------------------------------------------------------------
    def document_events(self, request: DocumentRequest, name: str, content: bytes | IO[bytes]) -> Iterator[dict]:
        """The events of one document's streamed answer (`delta`, `record`, ..., `done`), in order. Raises
        DocumentFailed when the server refuses it, stops answering it, or cannot be reached; a full queue is
        waited out (its Retry-After)."""
        for attempt in range(BUSY_RETRIES + 1):
            if hasattr(content, "seek"):
                content.seek(0)
            try:
                with self._client.stream(
                    "POST", request.path, data=request.fields, files={"file": (name, content)}
                ) as response:
                    if response.status_code == 429 and attempt < BUSY_RETRIES:
                        response.read()
                        time.sleep(_retry_after(response))
                        continue
                    if response.status_code != 200:
                        response.read()
                        raise _refused(response)
                    yield from _events(response)
                    return
            except self._httpx.TransportError as exc:
                if self._closed:
                    raise DocumentFailed("not answered: the run was stopped") from None
                raise DocumentFailed(f"the server at {self.url} cannot be reached ({_reason(exc)})") from None


def _events(response: Any) -> Iterator[dict]:
    """Server-sent events, one JSON object per `data:` line, until `[DONE]`; an `error` event raises."""
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            raise DocumentFailed("the server sent an event that is not JSON") from None
        if isinstance(event, dict) and event.get("type") == "error":
            raise DocumentFailed(f"the server stopped answering it: {_error_message(event) or 'an error'}")
        if isinstance(event, dict):
            yield event
    raise DocumentFailed("the server closed the connection before the document was finished")


# Codes of a refusal that comes from the bytes themselves: the same file is refused again, whatever the server.
_PERMANENT = frozenset({"invalid_document", "invalid_image", "invalid_page"})


def _refused(response: Any) -> DocumentFailed:
    body = _json(response)
    message = _error_message(body) or f"the server answered {response.status_code}"
    code = body.get("error", {}).get("code") if isinstance(body, dict) and isinstance(body.get("error"), dict) else None
    return DocumentFailed(message, permanent=code in _PERMANENT)


def _json(response: Any) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error_message(body: Any) -> str:
    """The message of an error in OpenAI's shape (`{"error": {"message": ...}}`), on one line."""
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str):
        return ""
    text = " ".join(message.split())
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _retry_after(response: Any) -> float:
    try:
        return min(max(float(response.headers.get("retry-after", "1")), 0.1), 30.0)
    except ValueError:
        return 1.0


def _reason(exc: BaseException) -> str:
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", " ".join(str(exc).split()))  # "[Errno 111] Connection refused"
    return text[:_MAX_SHOWN] if text else type(exc).__name__

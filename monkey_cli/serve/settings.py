"""What a server is started with: the model, where it listens, and the limits every request is held to."""

from __future__ import annotations

from dataclasses import dataclass

from monkey_cli.documents.renderer import DEFAULT_RENDER_TIMEOUT
from monkey_cli.tasks import DEFAULT_MODEL

DEFAULT_HOST = "127.0.0.1"  # loopback only, unless the user says otherwise
DEFAULT_PORT = 8000
DEFAULT_SLOTS = 8
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_MAX_QUEUE = 128
DEFAULT_REQUEST_TIMEOUT = 300.0
DEFAULT_MAX_UPLOAD_BYTES = 64 * 2**20
DEFAULT_MAX_PAGES = 64
DEFAULT_MAX_QUESTIONS = 32
DEFAULT_MAX_ANSWERS = 256
DEFAULT_BODY_TIMEOUT = 30.0
MIN_BODY_RATE = 64 * 2**10  # bytes per second a body must keep up after --body-timeout's grace
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class ServeSettings:
    """`model` ... `compile` load the model as `Monkey.load` does; `slots` is the number of decode slots (the
    CLI's --batch-size, lowered to what fits). `max_new_tokens` is the longest answer a request gets (its
    default, and the cap on a client's `max_tokens`). Limits: `max_queue` requests in progress at once (one
    beyond them gets 429 before its body is read), `request_timeout` seconds per HTTP request (a whole
    document included), `max_upload_bytes` per request body (413), `max_pages` per document request,
    `max_questions` per document request and `max_answers` (questions x pages) per document request;
    `body_timeout` seconds for a request's body to arrive (plus a second per MIN_BODY_RATE bytes received).
    Browsers: `allowed_hosts` are names a request's Host header may carry besides loopback names, IP
    addresses and `host`; `allowed_origins` are the web origins (`http://localhost:3000`) whose pages may
    send requests that change something (POST), "*" any. `render_timeout` is the budget of one page's
    rendering (uploads, previews). `access_log`: a line per request in the log."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str | None = None
    quant: str = "auto"
    quant_vision: bool = False
    prompt_style: str = "auto"
    adapter: str | None = None  # a LoRA adapter folder (monkey finetune) applied on top of `model`
    compile: bool | None = None
    slots: int = DEFAULT_SLOTS
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None
    max_queue: int = DEFAULT_MAX_QUEUE
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pages: int = DEFAULT_MAX_PAGES
    max_questions: int = DEFAULT_MAX_QUESTIONS
    max_answers: int = DEFAULT_MAX_ANSWERS
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    render_timeout: float = DEFAULT_RENDER_TIMEOUT  # 0: no limit
    access_log: bool = True  # a line per request on stderr (method, path, status, ms, bytes)

    def __post_init__(self) -> None:
        counts = ("slots", "max_new_tokens", "max_queue", "max_upload_bytes", "max_pages")
        for name in (*counts, "max_questions", "max_answers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.render_timeout < float("inf"):
            raise ValueError(f"render_timeout must be 0 (no limit) or positive, got {self.render_timeout!r}")
        for name in ("request_timeout", "body_timeout"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty")

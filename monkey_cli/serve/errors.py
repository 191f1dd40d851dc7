"""Errors as data: every failure is an HTTP status and a JSON body in OpenAI's error shape.

`{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`: what OpenAI's clients parse (the
official Python client raises `BadRequestError`, `AuthenticationError`, `RateLimitError`, ... from the status
and shows the message). The message is one line for a person; no traceback or internal detail is ever sent.
"""

from __future__ import annotations

from typing import Any

# The error `type` by status, as OpenAI names them where it has a name.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    403: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class APIError(Exception):
    """A request that cannot be served, with what the client is told."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than this server's limit of {describe_bytes(limit)} (monkey serve --max-upload)",
        code="request_too_large",
    )


def too_slow(timeout: float) -> APIError:
    from monkey_cli.serve.settings import MIN_BODY_RATE

    return APIError(
        408,
        f"the request body did not arrive in time: a body gets {timeout:g} s (--body-timeout), and one more "
        f"second per {describe_bytes(MIN_BODY_RATE)} received",
        code="body_timeout",
        headers={"Connection": "close"},
    )


def describe_bytes(size: int) -> str:
    for unit, power in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << power:
            value = size / (1 << power)
            return f"{value:g} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} bytes"

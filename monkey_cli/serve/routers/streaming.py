"""A document's answer as server-sent events: what /v1/documents and /v1/extract share when `stream=true`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from monkey_cli.serve.errors import APIError
from monkey_cli.serve.routers.chat import sse
from monkey_cli.serve.service import ClientGone

log = logging.getLogger("monkey_cli.serve")
Put = Callable[[dict[str, Any]], None]


async def event_stream(
    start: Callable[[Put], Awaitable[str]], done: Callable[[str], Awaitable[dict[str, Any]]], what: str
) -> AsyncIterator[str]:
    """Each event the run `start(put)` puts (`put` on the event loop), then the `done` event made of the run's
    answer by `done(answer)`, then `[DONE]`. A client that leaves has the run dropped (nothing more is sent); a
    failure midway is an `error` event in OpenAI's shape (`what` names the run in the messages)."""
    events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    run = asyncio.ensure_future(start(events.put_nowait))
    run.add_done_callback(lambda _: events.put_nowait(None))  # after every event already queued
    try:
        while (event := await events.get()) is not None:
            yield sse(event)
        answer = run.result()
    except ClientGone:
        log.info("a client left before its %s was finished: its requests were dropped", what)
        return
    except APIError as exc:
        yield sse({"type": "error", **exc.body()})
        return
    except Exception as exc:
        log.error("%s stream failed: %s: %s", what, type(exc).__name__, exc)
        yield sse({"type": "error", **APIError(500, f"the {what} failed (see the server's log)").body()})
        return
    finally:
        run.cancel()
    yield sse({"type": "done", **(await done(answer))})
    yield "data: [DONE]\n\n"

"""`monkey ask|caption|read|extract --server URL`: a command's documents answered by a running `monkey serve`.

    from monkey_cli.remote import Server, run
    with Server("http://127.0.0.1:8000", api_key=None) as server:
        summary = run(options, server, on_record=print)        # options: a pipeline.RunOptions

The flow is `pipeline.run`'s, with the server in the engine's place: the inputs are listed, the output
folder planned and resumed, every record written, counted and reported by the very same code; only the
answering moves. Each document goes to the server whole (`POST /v1/documents`, streamed), a few at a time,
and its records come back in input order. A server that cannot be used at all (unreachable, refusing the key,
its model failed) is one `ServerError` before any work; a document it does not answer is an error record for
that document, and the others go on.

Modules: `client` (HTTP: the server's settings from /health, one document's events, errors as exceptions),
`requests` (what each task sends where: the one place a new task is added), `runner` (the run),
`extract` (`monkey extract`'s run: its records are extractions, written by extract's own code). httpx is
imported only when a Server is made.
"""

from __future__ import annotations

from monkey_cli.remote.client import DocumentFailed, Server, ServerError, ServerInfo
from monkey_cli.remote.runner import run

__all__ = ["DocumentFailed", "Server", "ServerError", "ServerInfo", "run"]

"""`monkey mcp`: a Model Context Protocol server, so desktop assistants and agents can use a local Monkey.

    from monkey_cli.mcp import DocumentService, RootFolder, ToolSettings, serve_stdio
    from monkey_cli.pipeline import ModelOptions

    service = DocumentService(RootFolder("~/documents"), ToolSettings(ModelOptions("echo840/Monkey-Chat")))
    serve_stdio(service)          # the official MCP SDK over stdio, until the client closes it

Tools (`tools.TOOLS`, one function each): `ask`, `caption`, `read` and `extract`, on files under the root
folder only (`roots.RootFolder`: every path resolved and checked, links not followed). They run the CLI's own
flows (`pipeline.run`, `extract.run.run`) on one model, loaded on the first call that needs it and kept
(`service`), and answer with the CLI's text and records (`server`). The SDK (the `mcp` extra) is imported by
`server` only.

Modules: `roots` (which paths may be read), `service` (the model and the runs), `tools` (the tools),
`server` (the SDK's MCPServer, stdio).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from monkey_cli.mcp.roots import PathRefused, RootFolder
from monkey_cli.mcp.service import DocumentService, ToolSettings

if TYPE_CHECKING:  # pragma: no cover
    from monkey_cli.mcp.server import build_server, serve_stdio

__all__ = ["DocumentService", "PathRefused", "RootFolder", "ToolSettings", "build_server", "serve_stdio"]


def __getattr__(name: str) -> Any:
    if name in ("build_server", "serve_stdio"):  # the SDK only when the server is wanted
        from monkey_cli.mcp import server

        return getattr(server, name)
    raise AttributeError(name)

"""The MCP server: every tool of `tools.TOOLS` on the official SDK's `MCPServer`, over stdio.

A tool answers with the records' text (what `monkey ... -f text` prints: the answer, or a header per page when
there are several) and, as structured content, the records themselves (the CLI's JSON records). A path that is
refused, a bad argument, or a document none of whose pages could be answered is a tool error: `isError` with
one line saying why, never a protocol error and never a traceback.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Callable
from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from monkey_cli import __version__, output
from monkey_cli.errors import MonkeyError
from monkey_cli.mcp.service import DocumentService
from monkey_cli.mcp.tools import TOOLS, describe
from monkey_cli.output import Record

INSTRUCTIONS = (
    "Tools over local documents (PDFs, scans, photos) with the Monkey multimodal model: ask questions about "
    "them, caption them, read their text as Markdown. Paths are relative to the server's root folder; nothing "
    "outside it is read, and symbolic links are not followed. The first call that needs the model loads it "
    "(seconds to a minute); later calls reuse it."
)
# Every tool only reads files under the root: safe to call again, nothing changed, nothing fetched.
READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)


class ToolAnswer(BaseModel):
    """A tool's structured content: the records, as `monkey ... -f json` writes them."""

    records: list[dict[str, Any]] = Field(description="One record per page and question (schema_version 1).")


def build_server(service: DocumentService) -> MCPServer:
    """An MCPServer offering every tool of `TOOLS` on `service`."""
    server = MCPServer("monkey", instructions=INSTRUCTIONS, version=__version__)
    for function in TOOLS:
        server.add_tool(
            _bound(function, service),
            name=function.__name__,
            description=describe(function),
            annotations=READ_ONLY,
            structured_output=True,
        )
    return server


def serve_stdio(service: DocumentService) -> None:
    """Serve MCP over this process's standard input and output until the client closes them."""
    build_server(service).run("stdio")


def _bound(function: Callable[..., list[Record]], service: DocumentService) -> Callable[..., CallToolResult]:
    """`function` with `service` given: its other parameters are the tool's input schema."""
    signature = inspect.signature(function, eval_str=True)
    parameters = list(signature.parameters.values())[1:]

    def call(**arguments: Any) -> CallToolResult:
        try:
            records = function(service, **arguments)
        except MonkeyError as exc:  # a refused path, a bad argument: the client's to fix
            raise ToolError(str(exc)) from None
        return tool_result(records)

    call.__name__ = function.__name__
    call.__doc__ = function.__doc__
    call.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=parameters, return_annotation=Annotated[CallToolResult, ToolAnswer]
    )
    return call


def tool_result(records: list[Record]) -> CallToolResult:
    """The records as a tool's answer: their text, and the records as structured content; an error when no
    record could be answered (each error on a line of its own)."""
    errors = [f"error: {record.location}: {record.error}" for record in records if not record.ok]
    answered = [record for record in records if record.ok]
    text = io.StringIO()
    with output.make_writer("text", text, multi=len(answered) > 1, show_prompt=False) as writer:
        for record in answered:
            writer.write(record)
    lines = text.getvalue().rstrip("\n")
    content = "\n".join(part for part in [lines, *errors] if part) or output.EMPTY_ANSWER
    structured = {"records": [{"schema_version": output.SCHEMA_VERSION, **r.to_dict()} for r in records]}
    return CallToolResult(
        content=[TextContent(type="text", text=content)],
        structured_content=structured,
        is_error=not answered,
    )

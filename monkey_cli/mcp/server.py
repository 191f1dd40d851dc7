"""The MCP server: every tool of `tools.TOOLS` on the official SDK's `MCPServer`, over stdio.

Every tool answers the same way (`tool_result`): a text, and as structured content `{"records": [...]}`, the
CLI's JSON records for the file. The text of `ask`, `caption` and `read` is what `monkey ... -f text` prints
(the answer, or a header per page when there are several); `extract`'s is its values as a JSON object. A path
that is refused, a bad argument (a bad schema or field among them), or a document none of whose pages could
be answered is a tool error: `isError` with one line saying why, never a protocol error and never a traceback.
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
from monkey_cli.extract import Extraction
from monkey_cli.mcp.service import DocumentService
from monkey_cli.mcp.tools import TOOLS, ToolOutput, describe
from monkey_cli.output import Record
from monkey_cli.printing import json_text

INSTRUCTIONS = (
    "Tools over local documents (PDFs, scans, photos) with the Monkey multimodal model: ask questions about "
    "them, caption them, read their text as Markdown, extract fields as typed values with confidence. Paths "
    "are relative to the server's root folder; nothing outside it is read, and symbolic links are not "
    "followed. The first call that needs the model loads it (seconds to a minute); later calls reuse it."
)
# Every tool only reads files under the root: safe to call again, nothing changed, nothing fetched.
READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)


class ToolAnswer(BaseModel):
    """A tool's structured content: the records, as `monkey ... -f json` writes them."""

    records: list[dict[str, Any]] = Field(
        description=f"ask, caption, read: one record per page and question; extract: one record for the document, "
        f"with its fields (schema_version {output.SCHEMA_VERSION})."
    )


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


def _bound(function: Callable[..., ToolOutput], service: DocumentService) -> Callable[..., CallToolResult]:
    """`function` with `service` given: its other parameters are the tool's input schema."""
    signature = inspect.signature(function, eval_str=True)
    parameters = list(signature.parameters.values())[1:]

    def call(**arguments: Any) -> CallToolResult:
        try:
            answer = function(service, **arguments)
        except MonkeyError as exc:  # a refused path, a bad argument: the client's to fix
            raise ToolError(str(exc)) from None
        return tool_result(answer)

    call.__name__ = function.__name__
    call.__doc__ = function.__doc__
    call.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=parameters, return_annotation=Annotated[CallToolResult, ToolAnswer]
    )
    return call


def tool_result(answer: ToolOutput) -> CallToolResult:
    """A tool's answer: its text, its records as structured content, and whether it is an error (nothing could
    be answered; each error on a line of its own)."""
    text, records, failed = _of_extraction(answer) if isinstance(answer, Extraction) else _of_records(answer)
    return CallToolResult(
        content=[TextContent(type="text", text=text)],
        structured_content={"records": records},
        is_error=failed,
    )


def _of_records(records: list[Record]) -> tuple[str, list[dict[str, Any]], bool]:
    """ask, caption, read: the pages' text as `-f text` prints it, then a line per failed page."""
    errors = [f"error: {record.location}: {record.error}" for record in records if not record.ok]
    answered = [record for record in records if record.ok]
    text = io.StringIO()
    with output.make_writer("text", text, multi=len(answered) > 1, show_prompt=False) as writer:
        for record in answered:
            writer.write(record)
    lines = text.getvalue().rstrip("\n")
    content = "\n".join(part for part in [lines, *errors] if part) or output.EMPTY_ANSWER
    return content, [_versioned(record.to_dict()) for record in records], not answered


def _of_extraction(extraction: Extraction[Any]) -> tuple[str, list[dict[str, Any]], bool]:
    """extract: the values as one JSON object (null: not found), then the fields to review and the error, if any;
    an error when no page could be asked (`valid` unset: the document could not be opened or read)."""
    failed = extraction.valid is None
    lines = [] if failed else [json_text(extraction.values)]
    if extraction.needs_review and not failed:
        lines.append(f"needs review: {', '.join(extraction.needs_review)}")
    if extraction.error is not None:
        lines.append(f"error: {extraction.source}: {output.one_line(extraction.error)}")
    text = "\n".join(lines) or f"error: {extraction.source}: nothing could be read"
    return text, [_versioned(extraction.to_dict())], failed


def _versioned(record: dict[str, Any]) -> dict[str, Any]:
    return {"schema_version": output.SCHEMA_VERSION, **record}

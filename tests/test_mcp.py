"""`monkey mcp`: the Model Context Protocol server, driven by the official SDK's own client over stdio against
tiny-monkey; and the root folder's rules (nothing outside it, no link followed), checked on their own."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import SAMPLES_DIR, require_parity

from monkey_cli.mcp.roots import PathRefused, RootFolder

REPO = Path(__file__).resolve().parents[1]
# The extract calls' fields: one from a JSON Schema object, one in short form (the tool combines them).
EXTRACT_SCHEMA = {"type": "object", "properties": {"total": {"type": "number", "description": "What is the total?"}}}
EXTRACT_FIELDS = ["paid:boolean=Is the invoice paid?"]
MAX_FIELDS = 3  # the session's --max-fields


def make_root(tmp_path: Path) -> Path:
    """A root with documents in it, beside a folder and a file outside it that links point to."""
    folder = tmp_path / "root"
    (folder / "scans").mkdir(parents=True)
    shutil.copy(SAMPLES_DIR / "invoice.pdf", folder / "invoice.pdf")
    shutil.copy(SAMPLES_DIR / "chart.png", folder / "chart.png")
    shutil.copy(SAMPLES_DIR / "scan.png", folder / "scans" / "scan.png")
    (folder / "notes.txt").write_text("/etc/passwd\n")  # a list of paths: never taken as one
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(SAMPLES_DIR / "report.pdf", outside / "secret.pdf")
    (folder / "secret.pdf").symlink_to(outside / "secret.pdf")  # a link to a file outside
    (folder / "elsewhere").symlink_to(outside, target_is_directory=True)  # a link to a folder outside
    (folder / "also-chart.png").symlink_to(folder / "chart.png")  # a link that stays inside: refused too
    return folder


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_root(tmp_path)


# --- the root folder ------------------------------------------------------------------------------------------


def test_files_under_the_root_open_by_relative_or_absolute_path(root: Path) -> None:
    folder = RootFolder(root)
    for given in ("scans/scan.png", "./scans//scan.png", str(root / "scans" / "scan.png")):
        with folder.open(given) as (relative, descriptor):
            assert str(relative) == "scans/scan.png"
            assert os.read(descriptor, 8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        ("../outside/secret.pdf", "outside the root folder"),
        ("scans/../../outside/secret.pdf", "outside the root folder"),
        ("scans/../chart.png", "('..' is not allowed)"),  # even one that would come back in
        ("/etc/passwd", "outside the root folder"),
        ("secret.pdf", "secret.pdf: a symbolic link; links are not followed"),
        ("elsewhere/secret.pdf", "elsewhere: a symbolic link; links are not followed"),
        ("also-chart.png", "also-chart.png: a symbolic link; links are not followed"),
        ("scans", "scans: a folder"),
        (".", "the root folder itself"),
        ("missing.pdf", "missing.pdf: no such file under the root folder"),
        ("", "give the path of a file"),
        ("a\x00b", "NUL"),
    ],
)
def test_paths_that_are_refused_say_why(root: Path, given: str, reason: str) -> None:
    with pytest.raises(PathRefused) as refused, RootFolder(root).open(given):
        pass
    assert reason in str(refused.value)


def test_a_fifo_is_refused_without_blocking(root: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this system")
    os.mkfifo(root / "pipe.pdf")
    with pytest.raises(PathRefused, match="pipe.pdf: not a regular file"), RootFolder(root).open("pipe.pdf"):
        pass


def test_a_root_given_through_a_link_accepts_both_spellings(root: Path, tmp_path: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    folder = RootFolder(alias)
    for given in (str(alias / "chart.png"), str(root / "chart.png"), "chart.png"):
        with folder.open(given) as (relative, _descriptor):
            assert str(relative) == "chart.png"


# --- the server, through the SDK's own client -----------------------------------------------------------------


def _call_everything(root: Path, model: str, errlog: Path) -> dict:
    """One `monkey mcp` session: list the tools, call each, try the refused paths; what came back."""
    import anyio
    from mcp import ClientSession, StdioServerParameters, stdio_client

    env = {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = ["-m", "monkey_cli", "mcp", "--root", str(root), "--model", model, "--device", "cpu",
            "--max-new-tokens", "4", "--max-fields", str(MAX_FIELDS)]  # fmt: skip
    server = StdioServerParameters(command=sys.executable, args=args, env=env, cwd=str(REPO))
    seen: dict = {}

    async def session() -> None:
        with errlog.open("w") as stderr:
            async with stdio_client(server, errlog=stderr) as (read, write), ClientSession(read, write) as client:
                await client.initialize()
                seen["tools"] = (await client.list_tools()).tools
                seen["read"] = await client.call_tool("read", {"path": "invoice.pdf"})
                seen["ask"] = await client.call_tool("ask", {"path": "chart.png", "question": "What is shown?"})
                seen["caption"] = await client.call_tool("caption", {"path": "scans/scan.png"})
                seen["read_ocr"] = await client.call_tool("read", {"path": "invoice.pdf", "force_ocr": True})
                for name in ("../outside/secret.pdf", "secret.pdf", "elsewhere/secret.pdf", "notes.txt"):
                    seen[name] = await client.call_tool("read", {"path": name})
                seen["no question"] = await client.call_tool("ask", {"path": "chart.png", "question": " "})
                seen["bad pages"] = await client.call_tool("read", {"path": "invoice.pdf", "pages": "0"})
                extract = {"path": "invoice.pdf", "schema": EXTRACT_SCHEMA, "fields": EXTRACT_FIELDS}
                seen["extract"] = await client.call_tool("extract", extract)
                seen["extract options"] = await client.call_tool("extract", {
                    "path": "chart.png", "fields": "kind:enum(bar|line|pie)=What kind of chart is it?",
                    "all_pages": True, "min_confidence": 0.99, "null_probability": False})  # fmt: skip
                for name, arguments in (
                    ("extract bad field", {"path": "chart.png", "fields": ["total:money=What is the total?"]}),
                    ("extract bad schema", {"path": "chart.png", "schema": {"type": "object", "properties": {}}}),
                    ("extract too many", {"path": "chart.png", "fields": [f"f{i}" for i in range(MAX_FIELDS + 1)]}),
                    ("extract bad confidence", {**extract, "min_confidence": 2}),
                    ("extract short answers", {**extract, "max_new_tokens": 1}),
                    ("extract outside", {**extract, "path": "../outside/secret.pdf"}),
                    ("extract notes", {**extract, "path": "notes.txt"}),
                ):
                    seen[name] = await client.call_tool("extract", arguments)
                seen["extract again"] = await client.call_tool("extract", extract)  # after the errors

    anyio.run(session)
    return seen


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> tuple[dict, Path, str, str]:
    try:
        import mcp  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("the mcp extra is part of .[dev]: CI=true requires it")
        pytest.skip("the mcp extra is not installed (pip install -e '.[mcp]')")
    base = tmp_path_factory.mktemp("mcp")
    folder = make_root(base)
    model = str(require_parity("tiny-monkey"))
    errlog = base / "stderr.txt"
    return _call_everything(folder, model, errlog), folder, model, errlog.read_text()


def _records(result) -> list[dict]:
    return result.structured_content["records"]


def test_the_server_lists_its_tools_with_their_inputs(session) -> None:
    seen, *_ = session
    tools = {tool.name: tool for tool in seen["tools"]}
    assert list(tools) == ["ask", "caption", "read", "extract"]
    assert tools["ask"].input_schema["required"] == ["path", "question"]
    assert set(tools["read"].input_schema["properties"]) == {"path", "pages", "force_ocr"}
    extract = tools["extract"].input_schema
    assert extract["required"] == ["path"]
    assert list(extract["properties"]) == ["path", "schema", "fields", "pages", "all_pages", "min_confidence",
                                           "null_probability", "max_new_tokens"]  # fmt: skip
    assert "NAME[:TYPE][=QUESTION]" in extract["properties"]["fields"]["description"]
    assert "JSON Schema object" in extract["properties"]["schema"]["description"]
    assert all(tool.annotations.read_only_hint and tool.output_schema for tool in tools.values())
    assert "root folder" in tools["ask"].input_schema["properties"]["path"]["description"]


def test_each_tool_answers_with_the_clis_records(session) -> None:
    from hostile import cli

    seen, folder, model, _stderr = session
    for name, args in (("read", ["read", "invoice.pdf"]), ("ask", ["ask", "chart.png", "-q", "What is shown?"]),
                       ("caption", ["caption", "scans/scan.png"])):  # fmt: skip
        result = seen[name]
        assert not result.is_error, result.content
        local = cli(*args[:1], folder / args[1], *args[2:], "--model", model, "--device", "cpu",
                    "--max-new-tokens", "4", "-f", "json")  # fmt: skip
        expected = [{**record, "source": args[1]} for record in json.loads(local.stdout)["records"]]
        got = _records(result)
        for records in (got, expected):
            for record in records:
                record.pop("seconds")
        assert [{k: v for k, v in r.items() if k != "schema_version"} for r in got] == expected, name
    read = seen["read"]
    assert _records(read)[0]["answer_source"] == "text_layer"
    assert read.content[0].text == _records(read)[0]["answer"]  # the text is the page's Markdown
    assert "|Oscilloscope probe set P-200|2|EUR 189.00|EUR 378.00|" in read.content[0].text
    assert _records(seen["read_ocr"])[0]["answer_source"] == "model"


def test_the_model_is_loaded_once_and_kept(session) -> None:
    seen, *_, stderr = session
    assert not seen["ask"].is_error and not seen["extract"].is_error  # both used the model
    assert stderr.count("--quant auto: using") == 1  # ask, caption, a forced read and extract: one load


def test_paths_outside_the_root_and_links_out_are_tool_errors(session) -> None:
    seen, *_ = session
    for name, reason in (("../outside/secret.pdf", "outside the root folder"),
                         ("secret.pdf", "secret.pdf: a symbolic link; links are not followed"),
                         ("elsewhere/secret.pdf", "elsewhere: a symbolic link; links are not followed")):  # fmt: skip
        result = seen[name]
        assert result.is_error and reason in result.content[0].text, name
        assert "Traceback" not in result.content[0].text
    notes = seen["notes.txt"]  # a text file is not a list of paths to read here
    assert notes.is_error and "unsupported type: text" in notes.content[0].text
    assert seen["no question"].is_error and "ask needs a question" in seen["no question"].content[0].text
    assert seen["bad pages"].is_error and "pages are numbered from 1" in seen["bad pages"].content[0].text


def _fields(result) -> dict:
    [record] = _records(result)
    return record["fields"]


def test_extract_answers_with_the_librarys_record_for_the_file(session) -> None:
    """The tool's record is `monkey extract -f json`'s: its fields equal `Monkey.extract`'s in this process for
    the same file and fields (the same checkpoint, greedy: the same answers)."""
    from monkey_cli import Monkey
    from monkey_cli.extract import from_json_schema, from_short_forms
    from monkey_cli.output import SCHEMA_VERSION

    seen, folder, model, _stderr = session
    result = seen["extract"]
    assert not result.is_error, result.content
    [record] = _records(result)
    assert (record["schema_version"], record["task"], record["source"]) == (SCHEMA_VERSION, "extract", "invoice.pdf")
    assert list(record["fields"]) == ["total", "paid"]
    assert isinstance(record["valid"], bool) and record["error"] is None
    for field in record["fields"].values():
        for key in ("confidence", "confidence_min", "null_probability"):
            assert field[key] is None or 0 <= field[key] <= 1, (key, field)
    schema = from_json_schema(EXTRACT_SCHEMA) + from_short_forms(EXTRACT_FIELDS)
    monkey = Monkey.load(model, device="cpu", batch_size=4)
    local = monkey.extract(folder / "invoice.pdf", schema, max_new_tokens=4).to_dict()  # the server's answer cap
    chosen = ("value", "answer", "page", "error")
    assert {name: [field[key] for key in chosen] for name, field in record["fields"].items()} == {
        name: [field[key] for key in chosen] for name, field in local["fields"].items()
    }
    for name, field in record["fields"].items():
        for key in ("confidence", "confidence_min", "null_probability"):
            assert field[key] == pytest.approx(local["fields"][name][key], abs=2e-4), (name, key)
    assert (record["valid"], record["schema_sha256"]) == (local["valid"], local["schema_sha256"])
    assert json.loads(result.content[0].text) == {name: field["value"] for name, field in local["fields"].items()}


def test_extract_takes_the_commands_options(session) -> None:
    seen, *_ = session
    result = seen["extract options"]
    assert not result.is_error, result.content
    [record] = _records(result)
    [candidate] = record["candidates"]["kind"]  # all_pages: the one page's answer
    assert candidate["page"] == 1 and candidate["value"] in ("bar", "line", "pie")
    assert record["fields"]["kind"]["null_probability"] is None  # not scored
    low = [name for name, field in record["fields"].items() if field["confidence"] < 0.99]
    assert record["needs_review"] == low == ["kind"]  # tiny-monkey is never that sure
    assert result.content[0].text.splitlines()[1] == "needs review: kind"


def test_extract_errors_are_one_line_tool_errors_and_the_server_goes_on(session) -> None:
    seen, *_ = session
    for name, reason in (
        ("extract bad field", "field 'total:money=What is the total?': unknown type 'money'"),
        ("extract bad schema", 'schema: needs "properties"'),
        ("extract too many", f"{MAX_FIELDS + 1} fields; this server extracts at most {MAX_FIELDS} per call"),
        ("extract bad confidence", "min_confidence must be in [0, 1], got 2"),
        ("extract short answers", "max_new_tokens must be at least 2 for extract; got 1"),
        ("extract outside", "outside the root folder"),
        ("extract notes", "error: notes.txt: unsupported type: text"),
    ):
        result = seen[name]
        text = result.content[0].text
        assert result.is_error and reason in text, (name, text)
        assert "\n" not in text and "Traceback" not in text, name
    again = seen["extract again"]
    assert not again.is_error and _fields(again) == _fields(seen["extract"])  # answering still, and the same


@pytest.mark.parametrize("how", ["client leaves", "SIGTERM"])
def test_the_server_ends_when_its_client_leaves_or_on_a_signal(root: Path, how: str) -> None:
    """Closing its input ends it cleanly (exit 0, nothing said); SIGTERM ends it like any command (143, one
    `interrupted` line); never a traceback, never a byte on stdout that is not MCP."""
    import signal
    import subprocess

    pytest.importorskip("mcp")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen([sys.executable, "-m", "monkey_cli", "mcp", "--root", str(root)], env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    hello = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18",
             "capabilities": {}, "clientInfo": {"name": "test", "version": "0"}}}  # fmt: skip
    process.stdin.write((json.dumps(hello) + "\n").encode())
    process.stdin.flush()
    answer = json.loads(process.stdout.readline())  # it is serving: the signal handlers are in place
    assert answer["id"] == 1 and "result" in answer, answer
    if how == "SIGTERM":
        process.send_signal(signal.SIGTERM)
    else:
        process.stdin.close()
    try:
        code = process.wait(timeout=60)
    finally:
        process.kill()
    stderr = process.stderr.read().decode()
    assert process.stdout.read() == b""
    assert (code, stderr.strip()) == ((143, "interrupted") if how == "SIGTERM" else (0, ""))

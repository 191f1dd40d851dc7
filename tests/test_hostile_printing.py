"""What is printed is safe to print: no control character or escape sequence from a document, a file name or
an answer reaches a terminal (or a text file) raw, JSON escapes them and parses back to the same strings, and
a file name cannot forge a `==> ... <==` header.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys

import pytest
from hostile import cli, monkey, text_pdf, tiny_model

from monkey_cli.cli.common import warn
from monkey_cli.cli.progress import _CLEAR_LINE, Progress
from monkey_cli.output import Record, make_writer
from monkey_cli.printing import json_text, terminal_line, terminal_text

# What an attacker puts in a PDF's text layer, a file name or (through the model) an answer.
ATTACKS = {
    "window title": "\x1b]0;owned\x07",
    "clipboard (OSC 52)": "\x1b]52;c;cm0gLXJmIH4=\x07",
    "clear screen": "\x1b[2J\x1b[H",
    "C1 CSI": "\x9b31m",
    "carriage return": "safe\rEVIL",
    "bidi override": "txt.\u202eexe",
    "lone surrogate (a non-UTF-8 name)": "\udcff\udcfe",
    "line separator": "a\u2028b",
    "NUL and DEL": "\x00\x7f",
}
# Nothing of this may reach a terminal raw: C0 controls but tab and newline, DEL, C1, separators, bidi, surrogates.
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
FORGED_NAME = "a.pdf\n==> forged.pdf p.1 <==\nnot an answer"


def _records() -> list[Record]:
    records = []
    for index, (label, attack) in enumerate(ATTACKS.items(), start=1):
        records.append(
            Record(
                source=f"{FORGED_NAME}{attack}", page=index, pages=len(ATTACKS), task="ask",
                prompt=f"{label}? {attack}", answer=f"answer {attack} end", answer_source="model",
                model="m", quant="none", warnings=[f"note {attack}"],
            )  # fmt: skip
        )
    records.append(Record.failure(error=f"bad {ATTACKS['window title']}", source="x", page=None, pages=None,
                                  task="ask", prompt="q", model="m", quant="none"))  # fmt: skip
    return records


def _written(fmt: str) -> str:
    stream = io.StringIO()
    with make_writer(fmt, stream, multi=True, show_prompt=True) as writer:
        for record in _records():
            writer.write(record)
    text = stream.getvalue()
    text.encode("utf-8")  # encodable: a lone surrogate used to crash the write to stdout
    return text


@pytest.mark.parametrize("fmt", ["text", "md"])
def test_text_and_markdown_never_hold_a_raw_control_character(fmt):
    text = _written(fmt)
    assert not RAW.search(text), RAW.findall(text)
    assert "\\x1b]0;owned\\x07" in text  # shown, escaped, not dropped


def test_a_file_name_cannot_forge_a_header_in_text_output():
    text = _written("text")
    headers = [line for line in text.splitlines() if line.startswith("==> ")]
    assert len(headers) == len(ATTACKS)  # one per answer, none forged by the name
    assert all("\\n==> forged.pdf p.1 <==\\n" in header for header in headers)


def test_markdown_headings_come_only_from_documents_and_pages():
    text = _written("md")
    assert len([line for line in text.splitlines() if line.startswith("## ")]) == len(ATTACKS) + 1


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_json_escapes_every_control_and_parses_back_to_the_same_strings(fmt):
    text = _written(fmt)
    assert not RAW.search(text.replace("\n", "")), RAW.findall(text)
    documents = [json.loads(text)] if fmt == "json" else [json.loads(line) for line in text.splitlines()]
    records = documents[0]["records"] if fmt == "json" else documents
    assert [record["source"] for record in records] == [record.source for record in _records()]
    assert [record["answer"] for record in records] == [record.answer for record in _records()]
    assert records[0]["warnings"] == _records()[0].warnings


@pytest.mark.parametrize("attack", list(ATTACKS.values()), ids=list(ATTACKS))
def test_the_escaping_functions_leave_nothing_raw(attack):
    assert not RAW.search(terminal_line(attack)) and "\n" not in terminal_line(attack + "\n")
    assert not RAW.search(terminal_text(attack))
    assert json.loads(json_text(attack)) == attack and not RAW.search(json_text(attack))


def test_stderr_lines_are_escaped(capsys):
    warn(f"error: {FORGED_NAME}{ATTACKS['clipboard (OSC 52)']}: bad")
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and not RAW.search(line)


def test_progress_never_prints_a_hostile_name_raw(capsys):
    """The status line draws itself with its own carriage return and clear-line code; nothing else of the
    terminal's control vocabulary, and nothing of a document's name, may reach it raw."""
    with Progress(enabled=True) as progress:
        progress.start(2)
        progress.document_done("[/bold]" + ATTACKS["window title"] + "[red]x.pdf")
        progress.page_done()
    err = capsys.readouterr().err.replace("\n", "").replace(_CLEAR_LINE, "")
    assert not RAW.search(err)


def test_a_pdf_text_layer_cannot_drive_the_terminal(tmp_path):
    """The text layer of a PDF set the window title and wrote the clipboard through `monkey read`."""
    layer = "before " + ATTACKS["window title"] + ATTACKS["clipboard (OSC 52)"] + " after"
    pdf = text_pdf(tmp_path / "hostile.pdf", layer)
    result = monkey("read", pdf, "--model", tiny_model())  # the real stdout of a process
    assert result.returncode == 0, result.stderr
    assert b"\x1b" not in result.stdout and b"\x07" not in result.stdout and b"]0;owned" in result.stdout
    for fmt in ("md", "json", "jsonl"):
        result = cli("read", pdf, "--model", tiny_model(), "-f", fmt)
        assert result.exit_code == 0 and not RAW.search(result.stdout.replace("\n", "")), fmt
        if fmt == "json":
            # The Markdown converter (pymupdf4llm) already turns a text layer's control characters into U+FFFD;
            # whatever reaches the writers is escaped on a terminal and kept by JSON.
            answer = json.loads(result.stdout)["records"][0]["answer"]
            assert answer == "before \ufffd]0;owned\ufffd\ufffd]52;c;cm0gLXJmIH4=\ufffd after"


def test_hostile_file_names_in_errors_and_outputs(tmp_path):
    names = ["evil\x1b]0;owned\x07.pdf", "two\nlines.pdf", "a\u202etxt.pdf"]
    for name in names:
        (tmp_path / name).write_text("not a document")
    result = monkey("read", *[tmp_path / name for name in names], "--model", tiny_model(), "-f", "jsonl")
    assert result.returncode == 1
    errors = result.stderr.decode().splitlines()
    assert not RAW.search(result.stderr.decode()) and len([e for e in errors if e.startswith("error: ")]) == 3
    assert [json.loads(line)["source"] for line in result.stdout.decode().splitlines()] == [
        str(tmp_path / name) for name in names
    ]


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse names that are not UTF-8")
def test_a_file_name_that_is_not_utf8_is_read_written_and_printed(tmp_path):
    folder = tmp_path / "in"
    text_pdf(folder / "ok.pdf", "fine")
    raw = os.fsdecode(b"caf\xe9.pdf")  # Latin-1 bytes: not UTF-8
    text_pdf(folder / "latin.pdf", "latin").rename(folder / raw)  # (MuPDF cannot save under such a name)
    for fmt in ("text", "json", "md"):
        result = cli("read", folder, "--model", tiny_model(), "-f", fmt)
        assert result.exit_code == 0, result.stderr
        assert "latin" in result.stdout and "\\udce9" in result.stdout
    result = cli("read", folder, "--model", tiny_model(), "-f", "md", "--out", tmp_path / "out")
    assert result.exit_code == 0 and (tmp_path / "out" / f"{raw}.md").read_text().count("latin") == 1

"""Output records, stream writers, per-document files (mirroring, atomicity) and the resume manifest."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from monkey_cli import output, output_folder
from monkey_cli.errors import DocumentError, MonkeyError, MonkeyWarning, UsageError
from monkey_cli.output import (
    SCHEMA_VERSION,
    Record,
    ResumeIndex,
    common_root,
    file_sha256,
    make_writer,
    output_path,
    settings_fingerprint,
    write_document,
)
from monkey_cli.output_folder import OutputFolder

RECORD_KEYS = [
    "source",
    "page",
    "pages",
    "task",
    "prompt",
    "answer",
    "answer_source",
    "model",
    "quant",
    "seconds",
    "error",
    "warnings",
    "confidence",
]


def answer(source: str = "docs/a.pdf", page: int | None = 1, prompt: str = "What?", **kw) -> Record:
    fields = dict(
        source=source,
        page=page,
        pages=3 if page is not None else None,
        task="ask",
        prompt=prompt,
        answer="42",
        answer_source="model",
        model="echo840/Monkey",
        quant="4bit",
        seconds=0.8,
    )
    fields.update(kw)
    return Record(**fields)


def failure(source: str = "docs/a.pdf", page: int | None = 2, message: object = "can't render") -> Record:
    return Record.failure(
        source=source,
        page=page,
        pages=3,
        task="ask",
        prompt="What?",
        model="m",
        quant="bf16",
        error=message,
    )


class FlushRecorder(io.StringIO):
    """A stream that remembers what it held each time it was flushed."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        super().flush()
        self.flushed.append(self.getvalue())


# ------------------------------------------------------------------------------------------- records


def test_record_to_dict_has_the_documented_keys_in_a_stable_order():
    record = answer()
    assert list(record.to_dict()) == RECORD_KEYS
    # Text positions (spot, ask --ground) are optional keys after them, absent from other records.
    assert [field.name for field in dataclasses.fields(Record)] == [*RECORD_KEYS, "spans", "page_size"]
    assert Record.from_dict({"schema_version": 1, **record.to_dict()}) == record


def test_schema_version_2_records_carry_confidence_and_version_1_records_still_read():
    record = answer(confidence=0.123456789)
    assert SCHEMA_VERSION == 2
    assert record.to_dict()["confidence"] == 0.1235  # written with 4 digits; the object keeps them all
    old = {key: value for key, value in answer().to_dict().items() if key != "confidence"}
    assert Record.from_dict({"schema_version": 1, **old}).confidence is None
    assert failure().to_dict()["confidence"] is None


def test_answer_confidence_is_the_geometric_mean_of_the_token_probabilities():
    import math

    from monkey_cli.output import answer_confidence

    assert answer_confidence([math.log(0.5), math.log(0.125)]) == pytest.approx(0.25)
    assert answer_confidence([math.log(0.5)], stop_logprob=math.log(0.125)) == pytest.approx(0.25)
    assert answer_confidence([], None) is None
    assert answer_confidence([], stop_logprob=math.log(0.5)) == pytest.approx(0.5)


def test_error_records_have_no_answer_and_a_one_line_message():
    record = failure(message=ValueError("bad\n  xref table\n"))
    assert record.answer is None and not record.ok
    assert record.error == "bad xref table"
    assert failure(message=KeyError()).error == "KeyError"


@pytest.mark.parametrize(
    "changes",
    [{"task": "summarise"}, {"answer_source": "ocr"}, {"page": 0}, {"error": "boom"}, {"answer": None}],
)
def test_inconsistent_records_are_rejected(changes):
    with pytest.raises(ValueError):
        answer(**changes)


# ------------------------------------------------------------------------------------------- writers


def test_json_writer_writes_one_document_with_schema_version_at_close():
    stream = io.StringIO()
    writer = make_writer("json", stream, multi=True)
    writer.write(answer(page=1))
    writer.write(failure(page=2))
    assert stream.getvalue() == ""  # buffered: a half document is never on stdout
    writer.close()
    writer.close()  # idempotent
    document = json.loads(stream.getvalue())
    assert document["schema_version"] == SCHEMA_VERSION
    assert document["tool"]["name"] == "monkey-cli"
    assert [list(record) for record in document["records"]] == [RECORD_KEYS, RECORD_KEYS]
    assert document["records"][0]["answer"] == "42"
    assert document["records"][1]["answer"] is None
    assert document["records"][1]["error"] == "can't render"


def test_json_writer_still_writes_finished_records_on_ctrl_c():
    stream = io.StringIO()
    with pytest.raises(KeyboardInterrupt), make_writer("json", stream) as writer:
        writer.write(answer(page=1))
        raise KeyboardInterrupt
    assert [record["page"] for record in json.loads(stream.getvalue())["records"]] == [1]


def test_jsonl_writer_flushes_one_valid_object_per_record():
    stream = FlushRecorder()
    writer = make_writer("jsonl", stream, multi=True)
    records = [answer(page=1), failure(page=2), answer(page=3, answer="héllo\nworld")]
    for count, record in enumerate(records, start=1):
        writer.write(record)
        # The record is on the stream and flushed before the next one is produced.
        assert stream.flushed and stream.flushed[-1].count("\n") == count
    writer.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    parsed = [json.loads(line) for line in lines]
    assert all(list(item) == ["schema_version", *RECORD_KEYS] for item in parsed)
    assert all(item["schema_version"] == SCHEMA_VERSION for item in parsed)
    assert parsed[2]["answer"] == "héllo\nworld"
    assert parsed[1]["error"] == "can't render"


def test_text_writer_prints_only_the_answer_for_a_single_record():
    stream = io.StringIO()
    with make_writer("text", stream, multi=False) as writer:
        writer.write(answer(answer="Total: 42\n"))
    assert stream.getvalue() == "Total: 42\n"


def test_text_writer_adds_headers_for_several_records_and_skips_errors():
    stream = FlushRecorder()
    with make_writer("text", stream, multi=True) as writer:
        writer.write(answer(page=1, answer="first"))
        assert "first" in stream.flushed[-1]  # streamed, not held until close
        writer.write(failure(page=2))
        writer.write(answer(source="b.png", page=None, answer="second"))
    text = stream.getvalue()
    assert "==> docs/a.pdf p.1 <==\nfirst\n" in text
    assert "==> b.png <==\nsecond\n" in text
    assert "can't render" not in text and "p.2" not in text
    assert "What?" not in text


def test_text_writer_names_the_question_when_asked_to():
    stream = io.StringIO()
    with make_writer("text", stream, multi=True, show_prompt=True) as writer:
        writer.write(answer(prompt="Who signed?", answer="Ada"))
        writer.write(answer(prompt="When?", answer="1843"))
    assert "==> docs/a.pdf p.1: Who signed? <==\nAda\n" in stream.getvalue()
    assert "==> docs/a.pdf p.1: When? <==\n1843\n" in stream.getvalue()


def test_markdown_report_groups_by_document_and_page_and_marks_errors():
    stream = io.StringIO()
    with make_writer("md", stream) as writer:
        writer.write(answer(page=1, answer="forty-two"))
        writer.write(answer(source="b.png", page=None, task="caption", prompt="caption", answer="A cat."))
        writer.write(failure(page=2))
        writer.write(answer(page=1, prompt="When?", answer="1843"))
    report = stream.getvalue()
    assert report.startswith("# monkey-cli results\n")
    assert report.count("## `docs/a.pdf`") == 1 and report.count("## `b.png`") == 1
    # Page 1 keeps both of its records although page 2 arrived in between.
    assert report.index("### Page 1") < report.index("forty-two") < report.index("1843")
    assert report.index("1843") < report.index("### Page 2") < report.index("can't render")
    assert "**Q:** What?" in report and "**A:** forty-two" in report
    assert "**Caption:** A cat." in report
    assert "**Error:** can't render" in report


def test_read_as_markdown_is_the_documents_text():
    """`read -f md`: no report around the text, no code fence; a text layer's Markdown as it is, the model's
    plain text escaped with its lines kept; pages marked by comments; errors visible, warnings as comments."""
    from monkey_cli.output import render

    layer = "# Report\n\n- first\n- second\n\n|a|b|\n|---|---|\n|1|2|"
    seen = "ACME Store\nMilk *2* 1.99\n\n# 7 items\n- total"
    records = [
        answer(page=1, task="read", prompt="read", answer=layer, answer_source="text_layer", model=None, quant=None),
        answer(page=2, task="read", prompt="read", answer=seen, model="m", warnings=["text layer not used: x --> y"]),
        dataclasses.replace(failure(page=3), task="read", prompt="read"),
    ]
    document = render(records, "md")
    assert "```" not in document and "monkey-cli results" not in document and "**Text:**" not in document
    blocks = document.rstrip("\n").split("\n\n")
    assert blocks[0] == "<!-- docs/a.pdf p.1/3 · the PDF's text layer -->"
    assert "# Report\n\n- first\n- second\n\n|a|b|\n|---|---|\n|1|2|" in document  # Markdown kept as it is
    assert "<!-- docs/a.pdf p.2/3 · read by m (4bit) -->" in blocks
    assert "ACME Store\\\nMilk \\*2\\* 1.99" in blocks  # one hard line break, the stars are not emphasis
    assert "\\# 7 items\\\n\\- total" in blocks  # neither a heading nor a list
    assert "<!-- warning: text layer not used: x -- > y -->" in blocks  # nothing closes the comment early
    assert "<!-- docs/a.pdf p.3/3 · not read -->" in blocks and "> **Error:** can't render" in blocks
    assert document.endswith("\n") and not document.endswith("\n\n")


def test_unknown_format_is_a_usage_error():
    with pytest.raises(UsageError, match="xml"):
        make_writer("xml", io.StringIO())


def test_output_module_imports_no_heavy_packages():
    heavy = "{'torch', 'numpy', 'fitz', 'transformers', 'rich'}"
    code = f"import sys, monkey_cli.output; print(sorted({heavy} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# -------------------------------------------------------------------------------------- output paths


def test_output_path_mirrors_the_input_tree_and_appends_the_extension(tmp_path):
    root, out = tmp_path / "docs", tmp_path / "out"
    source = root / "2024" / "q1" / "report.pdf"
    assert output_path(out, source, "json", root) == out / "2024" / "q1" / "report.pdf.json"
    assert output_path(out, str(root / "a.png"), "md", root) == out / "a.png.md"
    extensions = {fmt: output_path(out, source, fmt, root).name for fmt in ("text", "json", "jsonl", "md")}
    assert extensions == {
        "text": "report.pdf.txt",
        "json": "report.pdf.json",
        "jsonl": "report.pdf.jsonl",
        "md": "report.pdf.md",
    }
    # Same stem, different type: no collision.
    assert output_path(out, root / "x.pdf", "json", root) != output_path(out, root / "x.png", "json", root)


def test_output_path_defaults_to_the_current_folder_as_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert output_path("out", "sub/a.pdf", "json") == Path("out") / "sub" / "a.pdf.json"


def test_sources_outside_the_root_and_stdin_get_flat_names_inside_out(tmp_path):
    root, out = tmp_path / "docs", tmp_path / "out"
    first = output_path(out, tmp_path / "elsewhere" / "a.pdf", "json", root)
    second = output_path(out, tmp_path / "other" / "a.pdf", "json", root)
    climbing = output_path(out, str(root / ".." / ".." / "a.pdf"), "json", root)
    for path in (first, second, climbing):
        assert path.parent == out and path.name.startswith("a.pdf.") and path.suffix == ".json"
    assert first != second
    assert output_path(out, "-", "jsonl", root) == out / "stdin.jsonl"


def test_common_root_is_the_deepest_shared_folder(tmp_path):
    sources = [tmp_path / "d" / "x" / "a.pdf", tmp_path / "d" / "b.pdf", "-"]
    assert common_root(sources) == tmp_path / "d"
    assert common_root([tmp_path / "d" / "a.pdf"]) == tmp_path / "d"


def test_plan_outputs_gives_every_source_its_own_file(tmp_path):
    root = tmp_path / "docs"
    plan = output.plan_outputs({"a.pdf": root / "a.pdf", "sub/b.png": root / "sub" / "b.png"}, "json", root)
    assert plan == {"a.pdf": PurePosixPath("a.pdf.json"), "sub/b.png": PurePosixPath("sub/b.png.json")}


# -------------------------------------------------------------------------------------- atomic files


def _folder(tmp_path: Path, **options) -> OutputFolder:
    return OutputFolder(tmp_path / "out", **options)


def test_write_document_writes_every_format_without_temp_files(tmp_path):
    records = [answer(page=1), failure(page=2)]
    folder = _folder(tmp_path)
    for fmt in ("text", "json", "jsonl", "md"):
        path = write_document(folder, f"nested/a.pdf{output.extension_for(fmt)}", records, fmt)
        assert path.read_text(encoding="utf-8") == output.render(records, fmt)
    folder.close()
    out = tmp_path / "out"
    assert json.loads((out / "nested" / "a.pdf.json").read_text())["records"][1]["error"]
    assert sorted(p.name for p in out.iterdir()) == [output.MANIFEST_NAME, "nested"], "a temp file was left"


def test_new_files_get_ordinary_permissions_not_0600(tmp_path):
    previous = os.umask(0o022)
    try:
        path = write_document(_folder(tmp_path), "a.json", [answer()], "json")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("interruption", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch, interruption):
    folder = _folder(tmp_path)
    path = write_document(folder, "a.pdf.json", [answer(answer="old")], "json")
    old = path.read_bytes()

    def fail_mid_write(fd: int) -> None:
        raise interruption

    monkeypatch.setattr(output_folder.os, "fsync", fail_mid_write)
    with pytest.raises((type(interruption), MonkeyError)):
        write_document(folder, "a.pdf.json", [answer(answer="new")], "json")
    monkeypatch.undo()
    folder.close()
    assert path.read_bytes() == old
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [output.MANIFEST_NAME, "a.pdf.json"]


def test_a_rendering_failure_never_touches_the_file(tmp_path):
    folder = _folder(tmp_path)
    path = write_document(folder, "a.pdf.json", [answer()], "json")
    old = path.read_bytes()
    unserialisable = answer(page=2, answer=object())  # json.dump fails halfway through the document
    with pytest.raises(TypeError):
        write_document(folder, "a.pdf.json", [answer(page=1), unserialisable], "json")
    assert path.read_bytes() == old


# -------------------------------------------------------------------------------------------- resume

SETTINGS = {
    "model": "echo840/Monkey",
    "quant": "4bit",
    "dtype": "bfloat16",
    "task": "ask",
    "questions": ["What?"],
    "pages": "1-3",
    "max_new_tokens": 64,
    "batch_size": 4,
}


def test_file_sha256_streams_in_chunks(tmp_path):
    path = tmp_path / "doc.bin"
    data = os.urandom(10_000)
    path.write_bytes(data)
    assert file_sha256(path, chunk_size=4096) == hashlib.sha256(data).hexdigest()
    with pytest.raises(DocumentError, match="missing.pdf"):
        file_sha256(tmp_path / "missing.pdf")


def test_fingerprint_ignores_batch_size_order_and_none_but_not_answer_settings():
    base = settings_fingerprint(SETTINGS)
    assert settings_fingerprint({**SETTINGS, "batch_size": 32, "verbose": True}) == base
    assert settings_fingerprint(dict(reversed(SETTINGS.items()))) == base
    assert settings_fingerprint({**SETTINGS, "questions": ("What?",), "new_flag": None}) == base
    changes = [("max_new_tokens", 128), ("quant", "none"), ("questions", ["Who?"]), ("force_ocr", True)]
    for key, value in changes:
        assert settings_fingerprint({**SETTINGS, key: value}) != base, key
    assert settings_fingerprint(base) == base


def _written(folder: OutputFolder, name: str = "a.pdf.json", sha: str = "sha-1", records=None) -> str:
    records = records or [answer()]
    entry = ResumeIndex.entry(sha, SETTINGS, records, permanent=True)
    write_document(folder, name, records, "json", entry)
    return name


def test_resume_index_matches_only_the_same_input_settings_and_intact_file(tmp_path):
    folder = _folder(tmp_path)
    name = _written(folder)
    folder.close()

    index = ResumeIndex(_folder(tmp_path))  # a later run reads the manifest back
    assert index.folder.warning is None
    assert index.is_done(name, "sha-1", SETTINGS)
    assert index.is_done(name, "sha-1", {**SETTINGS, "batch_size": 1})
    assert not index.is_done(name, "sha-2", SETTINGS)
    assert not index.is_done(name, "sha-1", {**SETTINGS, "max_new_tokens": 65})
    assert not index.is_done("other.pdf.json", "sha-1", SETTINGS)
    path = tmp_path / "out" / name
    path.write_bytes(path.read_bytes()[:-5])  # truncated: no longer what was written
    assert not index.is_done(name, "sha-1", SETTINGS)
    path.write_bytes(b"")
    assert not index.is_done(name, "sha-1", SETTINGS)
    path.unlink()
    assert not index.is_done(name, "sha-1", SETTINGS)


def test_documents_with_errors_are_failed_for_good_or_incomplete(tmp_path):
    folder = _folder(tmp_path)
    index = ResumeIndex(folder)
    records = [answer(page=1), failure(page=2)]
    write_document(folder, "a.json", records, "json", ResumeIndex.entry("s", SETTINGS, records, permanent=True))
    write_document(folder, "b.json", records, "json", ResumeIndex.entry("s", SETTINGS, records, permanent=False))
    assert not index.is_done("a.json", "s", SETTINGS) and not index.is_done("b.json", "s", SETTINGS)
    assert index.recorded_errors("a.json", "s", SETTINGS) == ["can't render"]
    assert index.recorded_errors("a.json", "s", {**SETTINGS, "pages": "1"}) is None  # other settings: redo
    assert index.recorded_errors("b.json", "s", SETTINGS) is None  # an error of the moment: redo


def test_manifest_keeps_entries_written_by_another_run(tmp_path):
    run_one, run_two = _folder(tmp_path), _folder(tmp_path)
    _written(run_one, "a.pdf.json", "sha-a")
    _written(run_two, "b.pdf.json", "sha-b")
    run_one.close()
    run_two.close()
    after = ResumeIndex(_folder(tmp_path))
    assert after.is_done("a.pdf.json", "sha-a", SETTINGS) and after.is_done("b.pdf.json", "sha-b", SETTINGS)


def test_an_unreadable_manifest_means_nothing_is_reused_or_replaced_with_a_warning(tmp_path):
    folder = _folder(tmp_path)
    name = _written(folder)
    folder.close()
    (tmp_path / "out" / output.MANIFEST_NAME).write_text('{"schema_version": 1, "entries": {')
    with pytest.warns(MonkeyWarning, match="no longer knows which files it wrote"):
        folder = _folder(tmp_path)
    index = ResumeIndex(folder)
    assert output.MANIFEST_NAME in folder.warning
    assert not index.is_done(name, "sha-1", SETTINGS)
    assert "not written by monkey" in folder.check(name)  # the file is no longer known to be monkey's
    with pytest.raises(MonkeyError, match="not written by monkey"):
        _written(folder)
    with pytest.warns(MonkeyWarning):
        assert _folder(tmp_path, overwrite=True).check(name) is None


@pytest.mark.parametrize("escape", ["../evil.json", "/etc/evil.json", "sub/../../evil.json", "./a.json", ""])
def test_the_output_folder_refuses_paths_outside_it(tmp_path, escape):
    with pytest.raises(MonkeyError):
        _folder(tmp_path).write(escape, b"x")
    assert not (tmp_path / "evil.json").exists()

"""Hostile output folders: nothing written outside --out, nothing of the user's lost, one output per input.

Classes attacked: symbolic links planted in --out (as a folder on the way, as the output file itself, as a
work folder), files in --out that monkey did not write (outputs, temp-like names, a killed run's leftovers),
--out inside (or equal to) an input folder, inputs that would share an output, a full disk, outputs emptied
or damaged after the fact, documents that fail for good, an unreadable manifest.

Most cases run `monkey read` on born-digital PDFs: answers come from the text layer, so no model is loaded.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import resource
import signal
from pathlib import Path

import pytest
from hostile import cli, files_under, monkey, sample, text_pdf, tiny_model

import monkey_cli.api
from monkey_cli import output_folder
from monkey_cli.documents import pages as pages_module
from monkey_cli.output_folder import MANIFEST_NAME, OutputFolder


def _read(*args) -> object:
    return cli("read", *args, "--model", tiny_model(), "-f", "json")


def _outputs(out: Path) -> list[str]:
    """Outputs under `out`, monkey's own bookkeeping (manifest, work folders) left out."""
    first = (name.split(os.sep)[0] for name in files_under(out))
    return [
        name
        for name, top in zip(files_under(out), first, strict=True)
        if top != MANIFEST_NAME and not re.fullmatch(r"\.monkey-work-[0-9a-f]{16}", top)
    ]


def _records(path: Path) -> list[dict]:
    return json.loads(path.read_text())["records"]


@pytest.fixture()
def never_load(monkeypatch):
    """Fails the test if the model is loaded (the runs here must not need it)."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(monkey_cli.api.Monkey, "load", classmethod(refuse))


# ------------------------------------------------------------------------------------- planted links


def test_a_link_planted_as_a_folder_under_out_refuses_that_document_only(tmp_path, never_load):
    docs, out, outside = tmp_path / "docs", tmp_path / "out", tmp_path / "outside"
    text_pdf(docs / "sub" / "a.pdf", "a")
    text_pdf(docs / "b.pdf", "b")
    outside.mkdir()
    out.mkdir()
    (out / "sub").symlink_to(outside, target_is_directory=True)
    result = _read(docs, "--out", out)
    assert result.exit_code == 1, result.stderr
    assert f"{out / 'sub'} is a symbolic link; monkey never writes through one" in result.stderr
    assert os.listdir(outside) == []
    assert _records(out / "b.pdf.json")[0]["answer"] == "b"
    again = _read(docs, "--out", out, "--overwrite")  # --overwrite replaces files, never goes through links
    assert again.exit_code == 1 and os.listdir(outside) == []


def test_render_creates_no_folder_through_a_planted_link(tmp_path):
    """`render` used to create the page's folder through the link before its check refused it."""
    docs, out, outside = tmp_path / "docs", tmp_path / "out", tmp_path / "outside"
    sample("chart.png", docs / "a" / "b" / "chart.png")
    sample("scan.png", docs / "c.png")
    outside.mkdir()
    out.mkdir()
    (out / "a").symlink_to(outside, target_is_directory=True)
    result = cli("render", docs, "--out", out)
    assert result.exit_code == 1
    assert os.listdir(outside) == [], "a folder was created outside --out"
    assert "is a symbolic link; monkey never writes through one" in result.stderr
    assert any(name.startswith("c.png.pages" + os.sep) for name in _outputs(out))


def test_a_link_planted_as_the_output_file_is_never_followed(tmp_path, never_load):
    docs, out, victim = tmp_path / "docs", tmp_path / "out", tmp_path / "victim.json"
    text_pdf(docs / "a.pdf", "a")
    victim.write_text("precious")
    out.mkdir()
    (out / "a.pdf.json").symlink_to(victim)
    result = _read(docs / "a.pdf", "--out", out)
    assert result.exit_code == 1 and "exists and was not written by monkey" in result.stderr
    assert victim.read_text() == "precious" and (out / "a.pdf.json").is_symlink()
    result = _read(docs / "a.pdf", "--out", out, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert victim.read_text() == "precious"  # the link itself was replaced, not what it points to
    assert not (out / "a.pdf.json").is_symlink() and _records(out / "a.pdf.json")[0]["answer"] == "a"


def test_a_link_planted_as_the_manifest_is_replaced_not_followed(tmp_path, never_load):
    docs, out, victim = tmp_path / "docs", tmp_path / "out", tmp_path / "victim"
    text_pdf(docs / "a.pdf", "a")
    victim.write_text("precious")
    out.mkdir()
    (out / MANIFEST_NAME).symlink_to(victim)
    result = _read(docs / "a.pdf", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert "warning: " in result.stderr and MANIFEST_NAME in result.stderr
    assert victim.read_text() == "precious" and not (out / MANIFEST_NAME).is_symlink()


def test_eval_never_writes_through_a_planted_link(tmp_path):
    from monkey_cli.evaluation.datasets import file_task
    from monkey_cli.evaluation.runner import run_task

    data, out, victim = tmp_path / "data.jsonl", tmp_path / "out", tmp_path / "victim"
    data.write_text(json.dumps({"image": "x.png", "question": "q", "answer": "a", "question_id": 1}) + "\n")
    victim.write_text("precious")
    out.mkdir()
    (out / "data.predictions.jsonl").symlink_to(victim)

    class Model:
        def generate(self, images, prompts, max_new_tokens):
            return ["a"] * len(prompts)

    with pytest.raises(output_folder.OutputRefused, match="not a regular file|symbolic link"):
        run_task(Model(), file_task(data, "accuracy"), out, report=lambda _line: None)
    assert victim.read_text() == "precious"


# ------------------------------------------------------------------------------ files monkey did not write


def test_a_users_file_in_out_is_never_replaced_without_overwrite(tmp_path, never_load):
    docs, out = tmp_path / "docs", tmp_path / "out"
    text_pdf(docs / "a.pdf", "a")
    text_pdf(docs / "b.pdf", "b")
    out.mkdir()
    (out / "a.pdf.json").write_text("my own notes")
    result = _read(docs, "--out", out)
    assert result.exit_code == 1
    assert f"error: {docs / 'a.pdf'}: {out / 'a.pdf.json'} exists and was not written by monkey" in result.stderr
    assert (out / "a.pdf.json").read_text() == "my own notes"
    assert _records(out / "b.pdf.json")[0]["answer"] == "b"
    assert _read(docs, "--out", out, "--overwrite").exit_code == 0
    assert _records(out / "a.pdf.json")[0]["answer"] == "a"


def test_render_never_replaces_a_users_file_without_overwrite(tmp_path):
    out = tmp_path / "out"
    sample("chart.png", tmp_path / "chart.png")
    (out / "chart.png.pages").mkdir(parents=True)
    (out / "chart.png.pages" / "page-001-grid.png").write_bytes(b"my own picture")
    result = cli("render", tmp_path / "chart.png", "--out", out)
    assert result.exit_code == 1 and "page-001-grid.png exists and was not written by monkey" in result.stderr
    assert (out / "chart.png.pages" / "page-001-grid.png").read_bytes() == b"my own picture"
    assert cli("render", tmp_path / "chart.png", "--out", out, "--overwrite").exit_code == 0
    assert (out / "chart.png.pages" / "page-001-grid.png").read_bytes().startswith(b"\x89PNG")
    assert cli("render", tmp_path / "chart.png", "--out", out).exit_code == 0  # now monkey's: replaced freely


def test_temp_like_files_of_the_user_are_never_deleted(tmp_path, never_load):
    docs, out = tmp_path / "docs", tmp_path / "out"
    text_pdf(docs / "a.pdf", "a")
    (out / "sub").mkdir(parents=True)
    names = [".a.pdf.json.tmp-1a2b3c4d", ".something.tmp-x", "sub/.b.pdf.json.tmp-deadbeef", "7-0123abcd.tmp"]
    for name in names:
        (out / name).write_text("mine")
        os.utime(out / name, (0, 0))  # very old: the former clean-up removed those after a minute
    for _ in range(2):
        assert _read(docs, "--out", out).exit_code == 0
    assert all((out / name).read_text() == "mine" for name in names)


def test_a_killed_runs_work_folder_is_cleared_of_its_temps_only_and_a_live_ones_kept(tmp_path, never_load):
    docs, out = tmp_path / "docs", tmp_path / "out"
    text_pdf(docs / "a.pdf", "a")
    dead, live = OutputFolder(out), OutputFolder(out)
    dead.write("x.json", b"1")
    live.write("y.json", b"2")
    dead_work, live_work = out / dead._work_name, out / live._work_name
    (dead_work / "3-0123abcd.tmp").write_bytes(b"half a document")
    (dead_work / "keep.txt").write_text("not monkey's name: kept")
    (live_work / "4-0123abcd.tmp").write_bytes(b"being written")
    dead._work.close()  # killed: its lock is gone, its folder stays
    dead._work = None
    assert _read(docs, "--out", out).exit_code == 0
    assert not (dead_work / "3-0123abcd.tmp").exists() and (dead_work / "keep.txt").exists()
    assert (live_work / "4-0123abcd.tmp").exists(), "a running run's temp file was removed"
    live.close()
    assert not live_work.exists()


@pytest.mark.parametrize("wrote", [True, False])
def test_a_run_ending_clears_a_killed_workers_work_folder_and_keeps_a_live_one(tmp_path, wrote: bool) -> None:
    """Workers share --out: one killed mid-run leaves its work folder; the run's end (its driver's folder
    closing, whether it wrote through it or not) removes it, and never a worker's that is still going."""
    out = tmp_path / "out"
    killed, live = OutputFolder(out), OutputFolder(out)
    killed.write("x.json", b"1")
    live.write("y.json", b"2")
    killed_work, live_work = out / killed._work_name, out / live._work_name
    (killed_work / "3-0123abcd.tmp").write_bytes(b"half a document")
    killed._work.close()  # killed: its lock is gone, its folder stays
    killed._work = None
    driver = OutputFolder(out)
    if wrote:
        driver.write("z.json", b"3")
    driver.close()
    assert not killed_work.exists(), "a killed worker's work folder outlived the run"
    assert live_work.is_dir(), "a live worker's work folder was removed"
    live.close()
    assert not list(out.glob(".monkey-work-*"))
    expected = ["x.json", "y.json", MANIFEST_NAME, *(["z.json"] if wrote else [])]
    assert sorted(path.name for path in out.iterdir()) == sorted(expected)  # nothing else removed or left


def test_a_work_folder_name_taken_by_a_link_is_left_alone(tmp_path, never_load):
    docs, out, outside = tmp_path / "docs", tmp_path / "out", tmp_path / "outside"
    text_pdf(docs / "a.pdf", "a")
    (outside).mkdir()
    (outside / "1-0123abcd.tmp").write_text("precious")
    folder = OutputFolder(out)
    folder.write("x.json", b"1")
    name = folder._work_name
    folder._work.close()
    folder._work = None
    os.rmdir(out / name)
    (out / name).symlink_to(outside, target_is_directory=True)  # planted where the work folder was
    assert _read(docs, "--out", out).exit_code == 0
    assert (outside / "1-0123abcd.tmp").read_text() == "precious"


# -------------------------------------------------------------------------- --out inside the inputs


def test_out_inside_the_input_folder_is_never_read_back(tmp_path, never_load):
    """`read` used to nest out/out/out, and `render` multiplied its files six-fold per run."""
    texts, docs = tmp_path / "texts", tmp_path / "docs"
    text_pdf(texts / "a.pdf", "a")
    text_pdf(texts / "sub" / "b.pdf", "b")
    for run in range(3):
        result = _read(texts, "--out", texts / "out")
        assert result.exit_code == 0, result.stderr
        assert ("2 already done" in result.stderr) == (run > 0)
    assert _outputs(texts / "out") == ["a.pdf.json", "sub", os.path.join("sub", "b.pdf.json")]
    text_pdf(docs / "a.pdf", "a")
    sample("chart.png", docs / "chart.png")
    renders = []
    for _ in range(3):
        assert cli("render", docs, "--out", docs / "seen").exit_code == 0
        renders.append(len(files_under(docs / "seen")))
    assert renders[0] == renders[1] == renders[2] and not (docs / "seen" / "seen").exists()


def test_out_equal_to_the_input_folder_reads_only_the_users_files(tmp_path, never_load):
    docs = tmp_path / "docs"
    text_pdf(docs / "a.pdf", "a")
    sample("chart.png", docs / "chart.png")
    counts = []
    for _ in range(3):
        result = cli("render", docs, "--out", docs)
        assert result.exit_code == 0, result.stderr
        counts.append(len(files_under(docs)))
    assert counts[0] == counts[1] == counts[2]
    result = _read(docs / "a.pdf", "--out", docs)
    assert result.exit_code == 0 and _records(docs / "a.pdf.json")[0]["answer"] == "a"
    again = cli("read", docs, "--out", docs, "--model", tiny_model(), "-f", "jsonl")
    assert "a.pdf.json" not in again.stderr  # the output is not an input: no "unsupported type" for it


def test_an_output_named_explicitly_is_refused_as_input(tmp_path, never_load):
    docs, out = tmp_path / "docs", tmp_path / "out"
    text_pdf(docs / "a.pdf", "a")
    assert _read(docs / "a.pdf", "--out", out).exit_code == 0
    result = cli("read", out / "a.pdf.json", "--model", tiny_model())
    assert result.exit_code == 1 and "is an output monkey wrote" in result.stderr


# -------------------------------------------------------------------------- one output per input


def test_inputs_that_would_share_an_output_get_distinct_stable_names(tmp_path, monkeypatch, never_load):
    monkeypatch.chdir(tmp_path)
    text_pdf(tmp_path / "stdin", "the file named stdin")
    text_pdf(tmp_path / ".monkey-manifest", "named like the manifest")
    text_pdf(tmp_path / "x.pdf", "x beside a folder")
    text_pdf(tmp_path / "x.pdf.json" / "y.pdf", "y inside the folder")
    text_pdf(tmp_path / "Case.pdf", "upper")
    text_pdf(tmp_path / "case.pdf", "lower")
    piped = text_pdf(tmp_path / "piped.pdf", "from stdin").read_bytes()
    args = ["-", "stdin", ".monkey-manifest", "x.pdf", "x.pdf.json", "Case.pdf", "case.pdf", "--out", "out"]
    result = cli("read", *args, "--model", tiny_model(), "-f", "json", input=piped)
    assert result.exit_code == 0, result.stderr
    answers = {}
    for name in _outputs(tmp_path / "out"):
        if name.endswith(".json") and os.path.isfile(tmp_path / "out" / name):
            (record,) = _records(tmp_path / "out" / name)
            answers[record["answer"]] = name
    assert len(answers) == 7, answers  # every document has its own file
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["schema_version"] == 1 and len(manifest["entries"]) == 7
    again = cli("read", *args, "--model", tiny_model(), "-f", "json", input=piped)
    assert again.exit_code == 0 and "7 already done" in again.stderr  # the same names on a rerun


def test_render_folders_that_would_clash_are_kept_apart(tmp_path):
    docs, out = tmp_path / "docs", tmp_path / "out"
    sample("chart.png", docs / "a:b.png")
    sample("scan.png", docs / "a?b.png")
    sample("chart.png", docs / "A_B.png")
    result = cli("render", docs, "--out", out)
    assert result.exit_code == 0, result.stderr
    folders = {name.split(os.sep)[0] for name in _outputs(out)}
    assert len(folders) == 3 and all(name.casefold().startswith("a_b") for name in folders)


# --------------------------------------------------------------------------------------- full disk


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_names_the_file_stops_and_leaves_nothing_half_written(tmp_path):
    docs, out = tmp_path / "docs", tmp_path / "out"
    text_pdf(docs / "1-small.pdf", "small")
    text_pdf(docs / "2-big.pdf", *["a line of text on a page\n" * 40] * 60)
    text_pdf(docs / "3-after.pdf", "after")
    limit = 16 << 10  # the big document's JSON is about 38 KiB; the others and the manifest a few hundred bytes
    result = monkey("read", docs, "--out", out, "-f", "json", "--model", tiny_model(),
                    preexec_fn=_limit_file_size(limit), env={"PYTHONDONTWRITEBYTECODE": "1"}, text=True)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"error: cannot write {out / '2-big.pdf.json'}: File too large; stopping" in result.stderr
    assert "Traceback" not in result.stderr
    assert _outputs(out) == ["1-small.pdf.json"]  # whole; nothing of the big one, nothing after it
    assert _records(out / "1-small.pdf.json")[0]["answer"] == "small"


def test_no_space_left_stops_the_run_in_python_too(tmp_path, monkeypatch, never_load):
    docs, out = tmp_path / "docs", tmp_path / "out"
    for name in ("a", "b", "c"):
        text_pdf(docs / f"{name}.pdf", name)
    real_fsync, calls = os.fsync, []

    def fail_on_b(fd: int) -> None:
        calls.append(fd)
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp") and len(calls) > 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(output_folder.os, "fsync", fail_on_b)
    result = _read(docs, "--out", out)
    assert result.exit_code == 2 and "No space left on device; stopping" in result.stderr
    for name in _outputs(out):
        _records(out / name)  # whatever exists is whole
    assert not [name for name in files_under(out) if name.endswith(".tmp")]


# ----------------------------------------------------------------------------- damaged outputs, resume


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "folder", "fifo"])
def test_an_emptied_or_damaged_output_is_never_counted_as_done(tmp_path, damage, never_load):
    docs, out = tmp_path / "docs", tmp_path / "out"
    text_pdf(docs / "a.pdf", "a")
    assert _read(docs / "a.pdf", "--out", out).exit_code == 0
    target = out / "a.pdf.json"
    if damage == "empty":
        target.write_bytes(b"")
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:20])
    elif damage == "garbage":
        target.write_bytes(b"x" * len(target.read_bytes()))
    elif damage == "folder":
        target.unlink()
        target.mkdir()
    else:
        target.unlink()
        os.mkfifo(target)
    result = _read(docs / "a.pdf", "--out", out)
    assert "already done" not in result.stderr, damage
    written = [name for name in _outputs(out) if os.path.isfile(out / name) and not os.path.islink(out / name)]
    assert any(_records(out / name)[0]["answer"] == "a" for name in written if name.startswith("a.pdf"))


def test_a_permanent_failure_is_recorded_and_not_redone_unless_asked(tmp_path, monkeypatch, never_load):
    docs, out = tmp_path / "docs", tmp_path / "out"
    text_pdf(docs / "one-page.pdf", "only page")
    args = (docs / "one-page.pdf", "--pages", "1-2", "--out", out)
    first = _read(*args)
    assert first.exit_code == 1 and "--pages 1-2: not in this document (1 page)" in first.stderr
    opened = []
    real_open = pages_module.open_document
    monkeypatch.setattr(pages_module, "open_document", lambda *a: opened.append(1) or real_open(*a))
    second = _read(*args)
    assert second.exit_code == 1, "a rerun must still say it failed"
    assert "as in an earlier run with these settings (--retry-failed redoes it)" in second.stderr
    assert opened == [], "a document that failed for good was opened again"
    for flag in ("--retry-failed", "--overwrite"):
        assert _read(*args, flag).exit_code == 1
    assert len(opened) == 2
    assert _read(docs / "one-page.pdf", "--pages", "1", "--out", out).exit_code == 0  # other settings: redone


def test_an_error_of_the_moment_is_redone_on_the_next_run(tmp_path, monkeypatch, never_load):
    docs, out = tmp_path / "docs", tmp_path / "out"
    text_pdf(docs / "a.pdf", "a")
    real_open = pages_module.open_document

    def flaky(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(pages_module, "open_document", flaky)
    assert _read(docs / "a.pdf", "--out", out).exit_code == 1
    monkeypatch.setattr(pages_module, "open_document", real_open)
    result = _read(docs / "a.pdf", "--out", out)
    assert result.exit_code == 0 and "already done" not in result.stderr
    assert _records(out / "a.pdf.json")[0]["answer"] == "a"


@pytest.mark.parametrize(
    "manifest",
    [b'{"schema_version": 1, "entries": {', b"[" * 100_000, b'{"schema_version": 1, "entries": ' + b"9" * 5000 + b"}",
     b'{"schema_version": 1, "entries": {"a.pdf.json": 7}}', b"\xff\xfe", b"{}"],
)  # fmt: skip
def test_an_unreadable_manifest_is_a_warning_and_nothing_is_replaced(tmp_path, manifest, never_load):
    docs, out = tmp_path / "docs", tmp_path / "out"
    text_pdf(docs / "a.pdf", "a")
    assert _read(docs / "a.pdf", "--out", out).exit_code == 0
    (out / MANIFEST_NAME).write_bytes(manifest)
    result = _read(docs / "a.pdf", "--out", out)
    assert f"warning: {out / MANIFEST_NAME}: " in result.stderr and "Traceback" not in result.stderr
    assert result.exit_code == 1 and "exists and was not written by monkey" in result.stderr
    assert _read(docs / "a.pdf", "--out", out, "--overwrite").exit_code == 0
    assert _read(docs / "a.pdf", "--out", out).exit_code == 0  # a valid manifest again


def test_a_folder_in_place_of_the_manifest_fails_each_document_not_the_run(tmp_path, never_load):
    docs, out = tmp_path / "docs", tmp_path / "out"
    text_pdf(docs / "a.pdf", "a")
    (out / MANIFEST_NAME).mkdir(parents=True)
    result = _read(docs / "a.pdf", "--out", out)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert f"cannot write {out / MANIFEST_NAME}" in result.stderr


def test_out_naming_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "file").write_text("x")
    result = _read(tmp_path / "file", "--out", tmp_path / "file")
    assert result.exit_code == 2 and "is a file, not a folder" in result.stderr


def test_the_folder_lock_never_hangs_a_run(tmp_path, monkeypatch, never_load):
    docs, out = tmp_path / "docs", tmp_path / "out"
    text_pdf(docs / "a.pdf", "a")
    out.mkdir()
    holder = os.open(out, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another process stopped while holding the manifest lock
    monkeypatch.setattr(output_folder, "_LOCK_TIMEOUT_S", 0.2)
    try:
        assert _read(docs / "a.pdf", "--out", out).exit_code == 0
    finally:
        os.close(holder)


def test_a_manifest_planted_by_another_user_hides_no_input(tmp_path, monkeypatch):
    """A manifest lists files not to read as inputs; one in a shared folder (/tmp) must not hide anyone's."""
    shared = tmp_path / "shared"
    text_pdf(shared / "victim" / "report.pdf", "report")
    (shared / MANIFEST_NAME).write_text(json.dumps({"schema_version": 1, "entries": {"victim/report.pdf": {}}}))
    hidden = _read(shared / "victim" / "report.pdf")
    assert hidden.exit_code == 1 and "is an output monkey wrote" in hidden.stderr  # the user's own manifest counts
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 4242)  # the manifest's owner is now someone else
    result = _read(shared / "victim")
    assert result.exit_code == 0 and json.loads(result.stdout)["records"][0]["answer"] == "report"


def test_two_runs_sharing_out_know_each_others_files(tmp_path):
    """xargs -P: a run that started before another wrote a file still knows that file is monkey's."""
    first, second = OutputFolder(tmp_path / "out"), OutputFolder(tmp_path / "out")
    first.write("shared.json", b"first")
    second.write("shared.json", b"second")  # not refused as "not written by monkey"
    first.write("only-first.json", b"1")
    second.write("only-second.json", b"2")
    first.close()
    second.close()
    entries = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["entries"]
    assert sorted(entries) == ["only-first.json", "only-second.json", "shared.json"]
    assert (tmp_path / "out" / "shared.json").read_bytes() == b"second"

"""Hostile inputs: reads stay inside their bounds, nothing hangs, memory stays bounded.

Classes attacked: special files (FIFOs, sockets, devices) in folders, globs and named explicitly; streams
(standard input, process substitution) read once with a limit; symbolic-link loops and links to folders in
walks and recursive globs; decompression bombs counted in bytes; warnings that name their file.
"""

from __future__ import annotations

import io
import json
import os
import pty
import socket
import warnings
from pathlib import Path

import pytest
from hostile import cli, monkey, png_header, python, text_pdf, tiny_model
from PIL import Image

from monkey_cli.documents import (
    MAX_STREAM_BYTES_ENV,
    PageError,
    expand_inputs,
    iter_pages,
    load_documents,
    open_regular,
    stream_limit,
)
from monkey_cli.documents import inputs as inputs_module
from monkey_cli.errors import DocumentError, MonkeyWarning, UsageError


def _names(sources) -> list[str]:
    return [Path(source.name).name for source in sources]


def _errors(sources) -> dict[str, str]:
    return {Path(source.name).name: source.error for source in sources if source.error}


def _hostile_folder(tmp_path: Path) -> Path:
    """A folder with one good PDF and every kind of special entry next to it."""
    folder = tmp_path / "in"
    text_pdf(folder / "good.pdf", "good")
    os.mkfifo(folder / "fifo.pdf")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(folder / "socket.pdf"))
    listener.close()
    (folder / "zero.pdf").symlink_to("/dev/zero")  # a device behind an innocent name
    (folder / "here").symlink_to(".", target_is_directory=True)  # a -> . loop
    (folder / "again").symlink_to(".", target_is_directory=True)
    (folder / "loop.pdf").symlink_to("loop.pdf")  # a link to itself
    (folder / "dangling.pdf").symlink_to("gone.pdf")
    return folder


# --------------------------------------------------------------------------------------- special files


def test_special_files_in_a_folder_are_skipped_with_a_note_and_never_opened(tmp_path):
    folder = _hostile_folder(tmp_path)
    # In a subprocess: if the FIFO were opened for reading, it would wait for a writer forever.
    code = f"""
import warnings, json
from monkey_cli.documents import expand_inputs
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    sources = expand_inputs([{str(folder)!r}])
print(json.dumps({{"sources": [[s.name, s.error] for s in sources], "notes": [str(w.message) for w in caught]}}))
"""
    result = python(code, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    names = {Path(name).name: error for name, error in report["sources"]}
    assert names["good.pdf"] is None
    assert "symbolic link loop" in names["loop.pdf"] and "broken symbolic link" in names["dangling.pdf"]
    assert not {"fifo.pdf", "socket.pdf", "zero.pdf", "here", "again"} & set(names)
    notes = " | ".join(report["notes"])
    for expected in ("fifo.pdf: skipped: a FIFO", "socket.pdf: skipped: a socket", "zero.pdf: skipped: a character"):
        assert expected in notes
    assert "here: skipped: a symbolic link to a folder" in notes and "again: skipped" in notes


@pytest.mark.parametrize("pattern", ["in/*", "in/**", "in/**/*.pdf", "in/*/*/*.pdf", "in/**/**/*"])
def test_globs_do_not_follow_folder_links_nor_open_special_files(tmp_path, pattern):
    _hostile_folder(tmp_path)
    # `here -> .` and `again -> .` made Python's glob run forever (2**depth paths): a subprocess guards it.
    code = f"""
import json, os, warnings
warnings.simplefilter("ignore")
os.chdir({str(tmp_path)!r})
from monkey_cli.documents import expand_inputs
print(json.dumps(sorted(s.name for s in expand_inputs([{pattern!r}]) if s.error is None)))
"""
    result = python(code, timeout=60)
    assert result.returncode == 0, result.stderr
    good = json.loads(result.stdout)
    assert good in ([os.path.join("in", "good.pdf")], []), good  # never a path through a link or a device
    if pattern != "in/*/*/*.pdf":
        assert good == [os.path.join("in", "good.pdf")]


def test_special_files_named_explicitly_are_refused_with_one_error_each(tmp_path):
    folder = _hostile_folder(tmp_path)
    code = f"""
from monkey_cli.documents import expand_inputs
for s in expand_inputs([{str(folder / "fifo.pdf")!r}, {str(folder / "zero.pdf")!r}, "/dev/null",
                        {str(folder / "socket.pdf")!r}, {str(folder / "loop.pdf")!r}]):
    print(s.error)
"""
    result = python(code, timeout=60)
    assert result.returncode == 0, result.stderr
    fifo, zero, null, sock, loop = result.stdout.splitlines()
    assert fifo.startswith("is a FIFO (named pipe): only files and folders are read")
    assert zero.startswith("is a character device") and null.startswith("is a character device")
    assert sock.startswith("is a socket") and "symbolic link loop" in loop


def test_a_file_swapped_for_a_fifo_after_the_walk_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "swapped.pdf"
    os.mkfifo(fifo)
    code = f"""
from monkey_cli.documents import open_regular
try:
    open_regular({str(fifo)!r})
except Exception as exc:
    print(type(exc).__name__, exc)
"""
    result = python(code, timeout=60)
    assert "DocumentError a FIFO (named pipe), not a regular file" in result.stdout
    with pytest.raises(DocumentError, match="character device"):
        open_regular("/dev/zero")


def test_cli_folder_with_special_files_processes_the_rest_and_exits_1(tmp_path):
    folder = _hostile_folder(tmp_path)
    result = monkey("read", folder, "--model", tiny_model(), "-f", "jsonl", timeout=120, text=True)
    assert result.returncode == 1, result.stderr  # the loop and the dangling link are errors
    records = {Path(r["source"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert records["good.pdf"]["answer"] == "good"
    assert set(records) == {"good.pdf", "loop.pdf", "dangling.pdf"}
    assert "warning: " in result.stderr and "fifo.pdf: skipped" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------- streams


def test_process_substitution_is_read_once_and_works_with_out(tmp_path):
    """`monkey read <(cat x.pdf) --out DIR`: the hash used to drain the pipe and the document read empty."""
    pdf = text_pdf(tmp_path / "x.pdf", "from a pipe")
    read_end, write_end = os.pipe()
    os.write(write_end, pdf.read_bytes())
    os.close(write_end)
    try:
        result = monkey(
            "read", f"/dev/fd/{read_end}", "--out", tmp_path / "out", "-f", "json", "--model", tiny_model(),
            pass_fds=(read_end,), text=True,
        )  # fmt: skip
    finally:
        os.close(read_end)
    assert result.returncode == 0, result.stderr
    (written,) = [p for p in (tmp_path / "out").iterdir() if p.suffix == ".json" and not p.name.startswith(".")]
    (record,) = json.loads(written.read_text())["records"]
    assert record["answer"] == "from a pipe" and record["source"] == f"/dev/fd/{read_end}"


def test_an_empty_or_closed_pipe_is_one_error_never_a_wait(tmp_path):
    read_end, write_end = os.pipe()
    os.close(write_end)  # like <(true): the writer is already gone
    try:
        result = monkey("read", f"/dev/fd/{read_end}", "--model", tiny_model(), pass_fds=(read_end,), text=True)
    finally:
        os.close(read_end)
    assert result.returncode == 1 and "empty file" in result.stderr


def test_a_stream_over_the_limit_is_refused_after_reading_only_the_limit(tmp_path):
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    with pytest.raises(BlockingIOError):
        while True:  # fill the pipe: the reader stops at the limit, so this never needs to be drained
            os.write(write_end, b"%PDF-1.4\n" + b"x" * 65536)
    try:
        code = f"from monkey_cli.documents import expand_inputs; print(expand_inputs(['/dev/fd/{read_end}'])[0].error)"
        result = python(code, env={MAX_STREAM_BYTES_ENV: "16K"}, pass_fds=(read_end,), timeout=60)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert result.stdout.startswith("stream is larger than the limit of 16 KiB (MONKEY_MAX_STDIN_BYTES")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory is read from /proc (Linux)")
def test_stdin_limit_is_documented_configurable_and_keeps_memory_bounded(tmp_path):
    """`head -c 3G /dev/zero | monkey render -` used to eat 24 GB: now it stops at the limit."""
    code = """
from monkey_cli.documents import expand_inputs
(source,) = expand_inputs(["-"])
print(source.error)
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""
    zeros = b"\0" * (48 << 20)
    result = python(code, env={MAX_STREAM_BYTES_ENV: "8M"}, input=zeros.decode("latin-1"), timeout=60)
    error, peak_kib = result.stdout.splitlines()
    assert error == (
        "standard input is larger than the limit of 8 MiB (MONKEY_MAX_STDIN_BYTES; files on disk have no limit)"
    )
    assert int(peak_kib) < 100 * 1024, f"{int(peak_kib) // 1024} MiB for an 8 MiB limit"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory is read from /proc (Linux)")
def test_a_flood_of_nul_bytes_or_newlines_on_stdin_costs_no_more_than_its_size():
    """200 MB of NULs took 1.8 GB (a list of 200 million empty names); now names are counted as they come."""
    code = """
from monkey_cli.documents import expand_inputs
print(expand_inputs(["-"])[0].error)
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""
    for flood in ("\0" * (32 << 20), "\n" * (32 << 20)):
        result = python(code, input=flood, timeout=60)
        error, peak_kib = result.stdout.splitlines()
        assert error == "standard input is empty (expected paths or a document)"
        assert int(peak_kib) < 150 * 1024, f"{int(peak_kib) // 1024} MiB for 32 MiB of input"


def test_too_many_paths_on_stdin_is_one_error(monkeypatch):
    monkeypatch.setattr(inputs_module, "MAX_STDIN_PATHS", 5)
    (source,) = expand_inputs(["-"], stdin=b"".join(b"missing-%d.pdf\n" % i for i in range(6)))
    assert source.error == "standard input lists more than 5 paths; split them into several runs"
    assert len(expand_inputs(["-"], stdin=b"a\nb\nc\n")) == 3


def test_stdin_limit_in_python_and_bad_settings():
    (source,) = expand_inputs(["-"], stdin=io.BytesIO(b"%PDF-" + b"x" * 100), max_stream_bytes=64)
    assert "larger than the limit of 64 bytes" in source.error
    assert stream_limit(None) == 1 << 30
    with pytest.raises(UsageError):
        stream_limit(0)


@pytest.mark.parametrize("value", ["lots", "-5", "0", "1.5G", "12Q"])
def test_a_bad_stdin_limit_setting_is_a_usage_error(value, tmp_path):
    result = cli("render", "-", "--out", tmp_path / "out", input=b"x", env={MAX_STREAM_BYTES_ENV: value})
    assert result.exit_code == 2 and f"{MAX_STREAM_BYTES_ENV}=" in result.stderr


@pytest.mark.parametrize(
    "value, size", [("512", 512), ("4K", 4096), ("2m", 2 << 20), ("1GiB", 1 << 30), ("3 MB", 3 << 20)]
)
def test_stdin_limit_sizes(value, size):
    assert inputs_module.parse_byte_size(value) == size


def test_stdin_on_a_terminal_is_refused_instead_of_waiting(tmp_path):
    controller, terminal = pty.openpty()
    try:
        result = monkey("render", "-", "--out", tmp_path / "out", stdin=terminal, timeout=60, text=True)
    finally:
        os.close(controller)
        os.close(terminal)
    assert result.returncode == 1
    assert "standard input is a terminal" in result.stderr


# --------------------------------------------------------------------------------------- folder walks


def test_deep_folders_and_wide_folders_do_not_recurse_or_explode(tmp_path):
    deep = tmp_path / "deep"
    current = deep
    for _ in range(150):
        current = current / "d"
    text_pdf(current / "bottom.pdf", "x")
    assert _names(expand_inputs([deep])) == ["bottom.pdf"]


def test_a_link_to_a_folder_outside_is_not_followed(tmp_path):
    secret = tmp_path / "secret"
    text_pdf(secret / "private.pdf", "private")
    folder = tmp_path / "in"
    text_pdf(folder / "mine.pdf", "mine")
    (folder / "peek").symlink_to(secret, target_is_directory=True)
    with pytest.warns(MonkeyWarning, match="peek: skipped: a symbolic link to a folder"):
        assert _names(expand_inputs([folder])) == ["mine.pdf"]
    with pytest.warns(MonkeyWarning):
        assert _names(expand_inputs([str(folder / "**" / "*.pdf")])) == ["mine.pdf"]


def test_hidden_entries_are_matched_only_when_the_pattern_names_them(tmp_path):
    text_pdf(tmp_path / ".hidden" / "a.pdf", "a")
    text_pdf(tmp_path / "shown" / ".b.pdf", "b")
    text_pdf(tmp_path / "shown" / "c.pdf", "c")
    assert _names(expand_inputs([str(tmp_path / "**" / "*.pdf")])) == ["c.pdf"]
    assert _names(expand_inputs([str(tmp_path / "shown" / ".*.pdf")])) == [".b.pdf"]
    assert _errors(expand_inputs([str(tmp_path / "[unclosed")])) == {"[unclosed": "no files match this pattern"}


# ------------------------------------------------------------------------------------------- memory


def test_a_tiny_png_declaring_a_huge_rgba_image_is_refused_before_decoding(tmp_path):
    """695 KB, 13370x13370 RGBA: under the pixel limit, but 715 MB decoded; it used to take 4.2 GB."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(13370, 13370, color_type=6))
    (error,) = iter_pages([bomb])
    assert isinstance(error, PageError)
    assert error.message.startswith("image is 13370x13370 RGBA, 715,027,600 bytes decoded (4 per pixel)")


@pytest.mark.parametrize(
    "mode, allowed",
    [("RGB", True), ("L", True), ("1", True), ("I;16", True), ("RGBA", False), ("CMYK", False), ("I", False)],
)
def test_the_decoded_image_budget_counts_channels_and_bit_depth(tmp_path, mode, allowed):
    """With max_pixels=500, the budget is 1,500 bytes: 400 RGB pixels fit, 400 RGBA or 32-bit ones do not."""
    path = tmp_path / f"{mode.replace(';', '_')}.tif"
    Image.new(mode, (20, 20)).save(path)
    (record,) = iter_pages([path], max_pixels=500)
    assert isinstance(record, PageError) != allowed, record
    if not allowed:
        assert "bytes decoded" in record.message and "possible decompression bomb" in record.message


def test_every_frame_of_a_multipage_tiff_is_checked(tmp_path):
    path = tmp_path / "frames.tif"
    small, large = Image.new("L", (10, 10)), Image.new("RGBA", (20, 20))
    small.save(path, save_all=True, append_images=[large])
    first, second = iter_pages([path], max_pixels=500)
    assert not isinstance(first, PageError)
    assert isinstance(second, PageError) and second.page == 2 and "bytes decoded" in second.message


# ------------------------------------------------------------------------------- warnings naming files


def _bad_exif_jpeg(path: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, "JPEG", exif=exif.tobytes())
    data = bytearray(buffer.getvalue())
    start = data.find(b"Exif\x00\x00") + 6
    data[start + 8 : start + 10] = b"\xff\x7f"  # the IFD now claims 32767 entries
    path.write_bytes(bytes(data))
    return path


def test_corrupt_exif_is_a_warning_on_each_page_not_an_anonymous_line(tmp_path):
    first, second = _bad_exif_jpeg(tmp_path / "a.jpg"), _bad_exif_jpeg(tmp_path / "b.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may escape as a stray warning
        pages = load_documents([first, second])
    assert all(page.warnings and "Corrupt EXIF data" in page.warnings[0] for page in pages)


def test_warnings_reach_stderr_naming_the_file_and_the_record(tmp_path):
    bad = _bad_exif_jpeg(tmp_path / "bad.jpg")
    truncated = tmp_path / "truncated.pdf"
    data = text_pdf(tmp_path / "whole.pdf", "page one", "page two").read_bytes()
    truncated.write_bytes(data[: int(len(data) * 0.8)])
    result = cli("read", truncated, bad, "-f", "jsonl", "--model", tiny_model(), "--max-new-tokens", "2",
                 "--device", "cpu")  # fmt: skip
    records = [json.loads(line) for line in result.stdout.splitlines()]
    truncated_records = [r for r in records if r["source"] == str(truncated)]
    assert truncated_records and all(r["warnings"] for r in truncated_records if r["error"] is None)
    assert f"warning: {truncated} p.1: " in result.stderr
    assert f"warning: {bad} p.1: Corrupt EXIF data" in result.stderr
    (exif_record,) = [r for r in records if r["source"] == str(bad)]
    assert exif_record["warnings"] == [w for w in exif_record["warnings"] if "Corrupt EXIF" in w] != []
    rendered = cli("render", bad, "--out", tmp_path / "seen")
    assert rendered.exit_code == 0 and f"warning: {bad} p.1: Corrupt EXIF data" in rendered.stderr


def test_a_symlink_loop_or_unreadable_file_is_one_error_and_the_batch_goes_on(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    text_pdf(folder / "a.pdf", "a")
    text_pdf(folder / "c.pdf", "c")
    (folder / "b.pdf").symlink_to("b.pdf")
    result = cli("read", folder, "--out", tmp_path / "out", "-f", "json", "--model", tiny_model())
    assert result.exit_code == 1
    assert "error: " + str(folder / "b.pdf") + ": symbolic link loop" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("[!.]*.json")) == ["a.pdf.json", "c.pdf.json"]


def test_a_permission_error_while_hashing_is_one_error_and_the_batch_goes_on(tmp_path, monkeypatch):
    """Root reads everything, so the refusal is simulated where the file is opened (the class: OSError)."""
    folder = tmp_path / "in"
    for name in ("a", "b", "c"):
        text_pdf(folder / f"{name}.pdf", name)
    real_open = inputs_module.os.open

    def refuse_b(path, *args, **kwargs):
        if str(path).endswith("b.pdf"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(inputs_module.os, "open", refuse_b)
    result = cli("read", folder, "--out", tmp_path / "out", "-f", "json", "--model", tiny_model())
    assert result.exit_code == 1, result.stderr
    assert f"error: {folder / 'b.pdf'}: cannot read: Permission denied" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("[!.]*.json")) == ["a.pdf.json", "c.pdf.json"]


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root reads files whatever their mode; the simulated case above covers the class"
)
def test_an_unreadable_file_is_one_error_as_a_normal_user(tmp_path):
    folder = tmp_path / "in"
    text_pdf(folder / "a.pdf", "a")
    locked = text_pdf(folder / "locked.pdf", "x")
    locked.chmod(0)
    result = cli("read", folder, "-f", "jsonl", "--model", tiny_model())
    assert result.exit_code == 1 and "locked.pdf: cannot read: Permission denied" in result.stderr
    assert json.loads(result.stdout.splitlines()[0])["answer"] == "a"

"""`monkey ask|caption|read --server URL`: the same output through a live `monkey serve` as locally.

One server (tiny-monkey-sharp, an API key, --max-pages 2) for the module. Each case runs the command twice,
locally and with --server, and compares what a user sees: stdout byte for byte (in JSON and JSON lines, every
record's `seconds` aside: the model's time, which no two runs share), stderr line for line (the local run's
`--quant auto` line aside: the server chose its quantization when it started; and the summary's time), the
exit code, and with --out the files, the manifest's resume (nothing sent again) and its error records.

The model is named `tiny-monkey-sharp` in both runs (a link in the workspace for the local one): the server
names a local --model folder by its name alone, where a local run shows the path as the user typed it; that
is the one field of a record that differs by nature when the two name the model differently.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import SAMPLES_DIR
from serve_helpers import LiveServer

from monkey_cli.cli import _register_commands, app

_register_commands()
pytestmark = pytest.mark.slow

KEY = "remote-test-key-7c1d"
MODEL = "tiny-monkey-sharp"
QUESTIONS = ["-q", "What is the title?", "-q", "  Who wrote it? "]  # spaces kept in the records' prompts
BAD_AND_GOOD = ["docs/notes.txt", "docs/report.pdf", "docs/broken.pdf", "docs/chart.png", "docs/missing.png"]
_SECONDS = re.compile(r'"seconds": [0-9.e+-]+')
_SUMMARY_TIME = re.compile(r", [0-9.]+ s(?=$|;)")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_sharp_dir: Path) -> Iterator[LiveServer]:
    live = LiveServer(tmp_path_factory.mktemp("serve-remote"), "--model", str(tiny_sharp_dir), "--max-new-tokens",
                      "8", "--max-pages", "2", env={"MONKEY_API_KEY": KEY})  # fmt: skip
    try:
        yield live.start()
    finally:
        live.stop()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_sharp_dir: Path) -> Path:
    """docs/ with good and bad documents, and the model linked as `tiny-monkey-sharp` (the server's name)."""
    root = tmp_path_factory.mktemp("workspace")
    (root / MODEL).symlink_to(tiny_sharp_dir, target_is_directory=True)
    docs = root / "docs"
    (docs / "sub").mkdir(parents=True)
    for name in ("report.pdf", "chart.png", "invoice.pdf"):
        (docs / name).write_bytes((SAMPLES_DIR / name).read_bytes())
    (docs / "sub" / "scan.png").write_bytes((SAMPLES_DIR / "scan.png").read_bytes())
    (docs / "notes.txt").write_text("not a document\n")
    (docs / "broken.pdf").write_bytes((SAMPLES_DIR / "report.pdf").read_bytes()[:300])
    return root


@contextmanager
def _inside(folder: Path) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _monkey(workspace: Path, *args: str, key: str | None = KEY, stdin: bytes | None = None, env: dict | None = None):
    from typer.testing import CliRunner

    environment = {"MONKEY_API_KEY": key, "MONKEY_SERVER": None, "MONKEY_QUANT": None, **(env or {})}
    with _inside(workspace):
        return CliRunner().invoke(app, list(args), env=environment, input=stdin)


def _local(workspace: Path, *args: str, **options):
    return _monkey(workspace, *args, "--model", MODEL, "--max-new-tokens", "8", **options)


def _remote(server: LiveServer, workspace: Path, *args: str, **options):
    return _monkey(workspace, *args, "--server", server.base, **options)


def _stdout(result) -> str:
    return _SECONDS.sub('"seconds": S', result.stdout)


_TORCH_LOG = re.compile(r"[IWEF]\d{4} \d\d:\d\d:")  # torch's own log lines when it is first imported


def _stderr(result) -> list[str]:
    lines = [line for line in result.stderr.splitlines()
             if not line.startswith("--quant auto: ") and not _TORCH_LOG.match(line)]  # fmt: skip
    return [_SUMMARY_TIME.sub(", T s", line) for line in lines]


def _same(local, remote) -> None:
    assert remote.exit_code == local.exit_code, (local.output, remote.output)
    assert _stdout(remote) == _stdout(local)
    assert _stderr(remote) == _stderr(local)


CASES = {
    "ask json": (["ask", *BAD_AND_GOOD, *QUESTIONS, "-p", "1-2", "-f", "json"], None),
    "ask jsonl": (["ask", *BAD_AND_GOOD, *QUESTIONS, "-p", "1-2", "-f", "jsonl"], None),
    "ask text": (["ask", *BAD_AND_GOOD, *QUESTIONS, "-p", "1-2"], None),
    "ask md": (["ask", "docs/report.pdf", *QUESTIONS, "-p", "2-3", "-f", "md"], None),
    "caption folder": (["caption", "docs/sub", "docs/chart.png", "-f", "jsonl"], None),
    "read text layer and model": (["read", "docs/invoice.pdf", "docs/chart.png", "-f", "md"], None),
    "read --force-ocr": (["read", "docs/invoice.pdf", "--force-ocr", "-f", "json"], None),
    "stdin": (["ask", "-", "-q", "What is it?", "-f", "jsonl"], (SAMPLES_DIR / "chart.png").read_bytes()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_same_output_locally_and_through_the_server(server, workspace, case: str) -> None:
    args, stdin = CASES[case]
    local = _local(workspace, *args, stdin=stdin)
    remote = _remote(server, workspace, *args, stdin=stdin)
    _same(local, remote)
    if "notes.txt" in " ".join(args):  # the bad documents fail alone, the good ones are answered
        assert local.exit_code == 1
        assert "error: docs/notes.txt: unsupported type: text" in remote.stderr
        assert "error: docs/missing.png: no such file or directory" in remote.stderr
    else:
        assert local.exit_code == 0, local.output
    if "json" in args:
        records = json.loads(remote.stdout)["records"]
        assert {record["model"] for record in records if record["answer_source"] != "text_layer"} == {MODEL}


def test_out_files_and_resume_through_the_server(server, workspace, tmp_path) -> None:
    """--out: the same files (atomic, in the manifest) as a local run; a rerun resumes (nothing is sent again,
    the documents that failed for good are reported again); another answer length redoes them."""
    args = ["ask", *BAD_AND_GOOD, *QUESTIONS, "-p", "1-2", "-f", "json"]
    local_out, remote_out = tmp_path / "local", tmp_path / "remote"
    local = _local(workspace, *args, "--out", str(local_out))
    remote = _remote(server, workspace, *args, "--out", str(remote_out))
    assert remote.exit_code == local.exit_code == 1
    assert remote.stdout == local.stdout == ""
    assert _stderr(remote) == [line.replace(str(local_out), str(remote_out)) for line in _stderr(local)]
    files = sorted(path.relative_to(remote_out).as_posix() for path in remote_out.rglob("*") if path.is_file())
    assert files == sorted(path.relative_to(local_out).as_posix() for path in local_out.rglob("*") if path.is_file())
    assert ".monkey-manifest.json" in files and "report.pdf.json" in files  # mirrors docs/
    for name in files:
        if name != ".monkey-manifest.json":
            mine, theirs = [(folder / name).read_text(encoding="utf-8") for folder in (remote_out, local_out)]
            assert _SECONDS.sub("", mine) == _SECONDS.sub("", theirs), name
    before = server.health()["engine"]
    again = _remote(server, workspace, *args, "--out", str(remote_out))
    assert again.exit_code == 1
    assert "1 already done" in again.stderr, again.stderr  # report.pdf
    # notes.txt and broken.pdf (no document), chart.png (no page 2): failed for good, reported, not sent again
    assert again.stderr.count("as in an earlier run with these settings (--retry-failed redoes it)") == 3
    assert server.health()["engine"]["decode_steps"] == before["decode_steps"], "a finished document was sent again"
    local_again = _local(workspace, *args, "--out", str(local_out))
    assert _stderr(again) == [line.replace(str(local_out), str(remote_out)) for line in _stderr(local_again)]
    shorter = _remote(server, workspace, *args, "--out", str(remote_out), "--max-new-tokens", "4")
    assert "already done" not in shorter.stderr and shorter.exit_code == 1


def test_a_servers_own_limit_fails_that_document_only(server, workspace) -> None:
    """report.pdf has 3 pages, more than the server's --max-pages 2: that document is an error record saying
    so (exit 1), the next one is answered."""
    result = _remote(server, workspace, "caption", "docs/report.pdf", "docs/chart.png", "-f", "jsonl")
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["source"], r["page"], r["error"] is None) for r in records] == [
        ("docs/report.pdf", None, False), ("docs/chart.png", 1, True)]  # fmt: skip
    assert result.stderr.splitlines()[0] == (
        "error: docs/report.pdf: 3 pages selected; this server takes at most 2 per request (--max-pages): choose "
        "some with `pages`"
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("problem", ["wrong key", "no key", "nobody there"])
def test_a_server_that_cannot_be_used_is_one_line_and_exit_2(server, workspace, tmp_path, problem: str) -> None:
    url = server.base if problem != "nobody there" else f"http://127.0.0.1:{_free_port()}"
    key = {"wrong key": KEY + "x", "no key": None, "nobody there": KEY}[problem]
    out = tmp_path / "out"
    result = _monkey(workspace, "ask", "docs/chart.png", "-q", "What?", "--server", url, "--out", str(out), key=key)
    assert result.exit_code == 2 and result.stdout == ""
    expected = {
        "wrong key": f"error: --server {url} refused the API key in $MONKEY_API_KEY: set it to the key the server "
                     "was started with",
        "no key": f"error: --server {url} needs an API key: set $MONKEY_API_KEY to the key it was started with",
        "nobody there": f"error: --server {url}: cannot connect (Connection refused); is `monkey serve` running there?",
    }[problem]  # fmt: skip
    assert result.stderr.splitlines() == [expected]
    assert not out.exists(), "nothing is made before the server is known to answer"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--quant", "4bit"], "error: --quant is the server's with --server (set it when starting `monkey serve`): "
                              "drop it, or run without --server"),
        (["--device", "cpu", "--batch-size", "2"], "error: --device is the server's with --server"),
        (["--model", "echo840/Monkey"], "error: --model echo840/Monkey: the server at {url} serves tiny-monkey-sharp"),
        (["--size", "896x896"], "error: --size: not available with --server"),
        (["--ground"], "error: text positions (spot, read --positions, ask --ground) are not available with --server"),
    ],
)  # fmt: skip
def test_model_options_are_the_servers(server, workspace, extra: list[str], message: str) -> None:
    result = _remote(server, workspace, "ask", "docs/chart.png", "-q", "What?", *extra)
    assert result.exit_code == 2 and result.stdout == "", result.output
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(message.format(url=server.base)), result.stderr


def test_the_servers_own_model_name_and_environment_defaults_are_fine(server, workspace) -> None:
    """--model naming the server's model is accepted; a model option from the environment (MONKEY_QUANT set for
    local runs) is left to the server; MONKEY_SERVER is --server, and --server '' runs locally."""
    named = _remote(server, workspace, "caption", "docs/chart.png", "--model", MODEL, env={"MONKEY_QUANT": "4bit"})
    assert named.exit_code == 0, named.output
    from_env = _monkey(workspace, "caption", "docs/chart.png", env={"MONKEY_SERVER": server.base})
    assert from_env.exit_code == 0 and from_env.stdout == named.stdout
    local = _monkey(workspace, "caption", "docs/chart.png", "--server", "", "--model", MODEL, "--max-new-tokens", "8",
                    env={"MONKEY_SERVER": server.base})  # fmt: skip
    assert local.exit_code == 0 and local.stdout == named.stdout
    assert "--quant auto: using" in local.stderr  # it loaded the model itself


def test_a_server_loading_then_warming_up_is_waited_for(monkeypatch) -> None:
    """/health says loading, then warming (the model loaded, its decode step compiling), then ready: the run
    waits (told once), and takes the settings of the ready server."""
    import httpx

    from monkey_cli.remote import Server, client

    states = iter(["loading", "warming", "warming", "ready"])

    def health(request: httpx.Request) -> httpx.Response:
        status = next(states)
        if status != "ready":
            return httpx.Response(503, json={"status": status})
        return httpx.Response(200, json={"status": "ready", "model": MODEL, "quant": None, "slots": 2})

    monkeypatch.setattr(client, "WAIT_FOR_MODEL_SECONDS", 0)
    with Server("http://monkey.test") as server:
        server._client = httpx.Client(base_url=server.url, transport=httpx.MockTransport(health))
        waits: list[int] = []
        info = server.info(on_wait=lambda: waits.append(1))
    assert info.model == MODEL and info.slots == 2 and waits == [1]

# --- monkey extract --server -----------------------------------------------------------------------------------

FIELDS = ["--field", "title:string=What is the title?", "--field", "total:number", "--field", "kind:enum(a|b|c)!"]
EXTRACT_CASES = {
    "json": ["extract", *BAD_AND_GOOD, *FIELDS, "-p", "1-2", "-f", "json"],
    "jsonl, every page, review": ["extract", "docs/report.pdf", "docs/chart.png", *FIELDS, "-p", "1-2", "--all-pages",
                                  "--min-confidence", "0.5", "-f", "jsonl"],
    "csv, no null scoring": ["extract", "docs/chart.png", "docs/sub", *FIELDS, "--no-null-probability", "-f", "csv"],
}  # fmt: skip


@pytest.mark.parametrize("case", list(EXTRACT_CASES))
def test_extract_gives_the_same_records_locally_and_through_the_server(server, workspace, case: str) -> None:
    """Every field's value, answer, confidence and null probability, the schema's fingerprint, the errors of
    the bad documents (alone: the others are answered), stderr and the exit code: as a local run's."""
    args = EXTRACT_CASES[case]
    local = _local(workspace, *args)
    remote = _remote(server, workspace, *args)
    assert remote.exit_code == local.exit_code, (local.output, remote.output)
    assert _stderr(remote) == _stderr(local)
    assert _stdout(remote) == _stdout(local)
    if case == "json":
        assert local.exit_code == 1
        records = json.loads(remote.stdout)["records"]
        assert [(r["source"], r["error"] is None) for r in records] == [
            ("docs/notes.txt", False), ("docs/report.pdf", True), ("docs/broken.pdf", False),
            ("docs/chart.png", False), ("docs/missing.png", False)]  # fmt: skip
        good = records[1]
        assert good["task"] == "extract" and good["model"] == MODEL
        assert list(good["fields"]) == ["title", "total", "kind"]
        assert all(field["value"] is None for field in records[0]["fields"].values())
    elif case.startswith("csv"):
        assert remote.stdout.splitlines()[0].startswith("source,pages,title,total,kind")


def test_extract_out_files_and_resume_through_the_server(server, workspace, tmp_path) -> None:
    """--out: the local run's files; a rerun sends nothing again (done, or failed for good: reported again);
    another schema redoes the documents."""
    args = ["extract", "docs/report.pdf", "docs/notes.txt", "docs/chart.png", *FIELDS, "-p", "1-2"]
    local_out, remote_out = tmp_path / "local", tmp_path / "remote"
    local = _local(workspace, *args, "--out", str(local_out))
    remote = _remote(server, workspace, *args, "--out", str(remote_out))
    assert remote.exit_code == local.exit_code == 1 and remote.stdout == ""
    assert _stderr(remote) == [line.replace(str(local_out), str(remote_out)) for line in _stderr(local)]
    files = sorted(path.relative_to(remote_out).as_posix() for path in remote_out.rglob("*") if path.is_file())
    assert files == sorted(path.relative_to(local_out).as_posix() for path in local_out.rglob("*") if path.is_file())
    assert "report.pdf.json" in files
    for name in files:
        if name != ".monkey-manifest.json":
            mine, theirs = [(folder / name).read_text(encoding="utf-8") for folder in (remote_out, local_out)]
            assert _SECONDS.sub("", mine) == _SECONDS.sub("", theirs), name
    before = server.health()["engine"]["decode_steps"]  # any field answered takes decode steps
    again = _remote(server, workspace, *args, "--out", str(remote_out))
    assert again.exit_code == 1 and "1 already done" in again.stderr, again.stderr
    assert "as in an earlier run with these settings (--retry-failed redoes it)" in again.stderr  # notes.txt
    assert server.health()["engine"]["decode_steps"] == before, "a finished document was sent again"
    other = _remote(server, workspace, *args[:-2], "--field", "date:date", "-p", "1-2", "--out", str(remote_out))
    assert "already done" not in other.stderr
    assert server.health()["engine"]["decode_steps"] > before


def test_extract_a_servers_own_limit_fails_that_document_only(server, workspace) -> None:
    """report.pdf's 3 pages are more than the server's --max-pages 2: its record is the error, every field
    null; chart.png is answered."""
    result = _remote(server, workspace, "extract", "docs/report.pdf", "docs/chart.png", *FIELDS, "-f", "jsonl")
    assert result.exit_code == 1
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert first["source"] == "docs/report.pdf" and "at most 2 per request (--max-pages)" in first["error"]
    assert all(field["value"] is None and field["confidence"] is None for field in first["fields"].values())
    assert second["source"] == "docs/chart.png" and second["error"] is None and second["valid"] is not None
    assert result.stderr.splitlines()[0].startswith("error: docs/report.pdf: 3 pages selected; this server takes")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--quant", "8bit"], "error: --quant is the server's with --server"),
        (["--size", "896x896"], "error: --size: not available with --server"),
        (["--model", "echo840/Monkey"], "error: --model echo840/Monkey: the server at {url} serves tiny-monkey-sharp"),
    ],
)  # fmt: skip
def test_extract_model_options_are_the_servers(server, workspace, extra: list[str], message: str) -> None:
    result = _remote(server, workspace, "extract", "docs/chart.png", *FIELDS, *extra)
    assert result.exit_code == 2 and result.stdout == "", result.output
    assert result.stderr.splitlines() == [result.stderr.splitlines()[0]]
    assert result.stderr.startswith(message.format(url=server.base)), result.stderr


def test_extract_more_fields_than_the_server_takes_is_refused_before_any_work(server, workspace, tmp_path) -> None:
    """33 fields against a server's --max-questions 32 (its /health says so): one line, exit 2, nothing sent
    or made (not an error record per document, and not one sent again by every rerun)."""
    fields = [arg for number in range(33) for arg in ("--field", f"f{number}:string")]
    before = server.health()["engine"]["decode_steps"]
    out = tmp_path / "out"
    result = _remote(server, workspace, "extract", "docs/chart.png", "docs/sub", *fields, "--out", str(out))
    assert result.exit_code == 2 and result.stdout == "", result.output
    assert result.stderr.splitlines() == [
        f"error: 33 fields; --server {server.base} extracts at most 32 per document (its --max-questions): extract "
        "fewer, or start the server with a higher --max-questions"
    ]
    assert not out.exists() and server.health()["engine"]["decode_steps"] == before

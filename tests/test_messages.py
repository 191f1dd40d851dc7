"""What a newcomer reads: each message says one thing once, in the words of whoever is speaking (the CLI's
flags on the command line, the library's own terms from Python), and points the way on."""

from __future__ import annotations

import re
import signal

import pytest
from conftest import SAMPLES_DIR

import monkey_cli.pipeline
from monkey_cli import signals
from monkey_cli.cli import _register_commands, app

_register_commands()
CHART = str(SAMPLES_DIR / "chart.png")


def _cli(*args: str, env: dict | None = None):
    from typer.testing import CliRunner

    return CliRunner().invoke(app, [str(arg) for arg in args], env=env)


@pytest.fixture
def forget_signals():
    yield
    signals.uninstall()  # forget the signal the test delivered


@pytest.mark.parametrize("out", [False, True])
def test_interrupted_is_said_once(tmp_path, monkeypatch, forget_signals, out: bool) -> None:
    """SIGTERM in the middle of a run (as the signal handler raises it): one `interrupted` line, exit 143."""

    def terminated(*_args, **_kwargs):
        signals._handle(signal.SIGTERM, None)

    monkeypatch.setattr(monkey_cli.pipeline, "run", terminated)
    result = _cli("caption", CHART, *(["--out", tmp_path] if out else []))
    assert result.exit_code == 143
    assert result.stderr.count("interrupted") == 1, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_render_folders_are_not_named_like_the_documents(tmp_path) -> None:
    """`find seen -name '*.pdf'` finds no rendered folder: report.pdf's pages go to report.pdf.pages/."""
    import fnmatch

    out = tmp_path / "seen"
    result = _cli("render", SAMPLES_DIR / "report.pdf", SAMPLES_DIR / "chart.png", "--out", out)
    assert result.exit_code == 0, result.stderr
    names = [path.name for path in out.rglob("*")]
    assert not fnmatch.filter(names, "*.pdf") and not fnmatch.filter(names, "*.png.pages/*")
    assert {"report.pdf.pages", "chart.png.pages"} <= set(names)
    assert (out / "report.pdf.pages" / "page-003-grid.png").is_file()


def test_a_folder_with_files_is_never_said_to_have_none(tmp_path) -> None:
    """A folder of monkey's own outputs (a render), or of hidden files only: it says what was skipped."""
    out = tmp_path / "seen"
    assert _cli("render", CHART, "--out", out).exit_code == 0
    result = _cli("read", out)
    assert result.exit_code == 1
    assert "no files" not in result.stderr
    assert f"error: {out}: folder has nothing to read: all its 7 entries were skipped (" in result.stderr
    assert "1 hidden" in result.stderr and "6 written by monkey (its outputs)" in result.stderr
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".secret.png").write_bytes(b"x")
    result = _cli("read", hidden)
    assert f"error: {hidden}: folder has nothing to read: its one entry was skipped (1 hidden)" in result.stderr
    (tmp_path / "empty").mkdir()
    assert f"error: {tmp_path / 'empty'}: folder is empty" in _cli("read", tmp_path / "empty").stderr


def _snapshot(tmp_path, revision: str, main: str):
    """tiny-monkey laid out as a Hugging Face cache snapshot of echo840/Monkey-Chat at `revision`."""
    import shutil

    from conftest import require_parity

    cache = tmp_path / "hub" / "models--echo840--Monkey-Chat"
    snapshot = cache / "snapshots" / revision
    shutil.copytree(require_parity("tiny-monkey"), snapshot)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(main)
    return snapshot


def test_a_cache_snapshot_is_named_by_its_hub_id_never_its_path(tmp_path) -> None:
    import json

    from monkey_cli.model.sources import display_name

    main = "0123456789abcdef0123456789abcdef01234567"
    snapshot = _snapshot(tmp_path, main, main)
    result = _cli("caption", CHART, "--model", snapshot, "-f", "json", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.stderr
    (record,) = json.loads(result.stdout)["records"]
    assert record["model"] == "echo840/Monkey-Chat" and str(tmp_path) not in result.stdout
    assert display_name(str(snapshot) + "/") == "echo840/Monkey-Chat"
    older = snapshot.parent / "fedcba9876543210fedcba9876543210fedcba98"
    older.mkdir()
    assert display_name(older) == "echo840/Monkey-Chat@fedcba987654"  # not what main points to: which one
    assert display_name("checkpoints/mine") == "checkpoints/mine"  # anything else: as the user named it
    assert display_name("echo840/Monkey") == "echo840/Monkey"


@pytest.mark.parametrize(
    ("command", "hint"),
    [(["read"], "monkey read -"), (["ask", "-q", "Total?"], "monkey ask - -q QUESTION"),
     (["caption"], "monkey caption -")],
)  # fmt: skip
def test_a_url_is_never_fetched_and_the_error_says_how_to_pipe_it(command: list[str], hint: str) -> None:
    url = "https://example.com/report.pdf?download=1"
    result = _cli(command[0], url, *command[1:], "--model", "nowhere/at-all")
    assert result.exit_code == 1
    assert f"error: {url}: is a URL, and only local files are read: pipe it in (curl -sL '{url}' | {hint})" in (
        result.stderr
    )


def test_the_summary_of_an_out_run_says_where_the_files_went(tmp_path) -> None:
    from conftest import require_parity

    out = tmp_path / "results"
    args = ["read", SAMPLES_DIR / "invoice.pdf", SAMPLES_DIR / "report.pdf", "--out", out,
            "--model", str(require_parity("tiny-monkey"))]  # fmt: skip
    first = _cli(*args)
    assert first.exit_code == 0 and first.stdout == ""
    assert first.stderr.strip().splitlines()[-1].endswith(f"; results in {out} (2 files written)")
    again = _cli(*args).stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"0 documents, 0 pages, 0 failed, 2 already done, [\d.]+ s; results in {re.escape(str(out))} "
                        r"\(0 files written\)", again)  # fmt: skip
    plain = _cli("read", SAMPLES_DIR / "invoice.pdf", "--model", str(require_parity("tiny-monkey")))
    assert "results in" not in plain.stderr


def test_the_library_logs_its_decisions_in_its_own_words(caplog) -> None:
    """From Python, `Monkey.load` says what it chose with its own keyword arguments; the CLI, with flags."""
    import logging

    from conftest import require_parity

    from monkey_cli import Monkey
    from monkey_cli.model import memory

    tiny = str(require_parity("tiny-monkey"))
    with caplog.at_level(logging.INFO, logger="monkey_cli"):
        Monkey.load(tiny, device="cpu")
    (said,) = [record for record in caplog.records if record.name == "monkey_cli"]
    assert said.getMessage().startswith('quant="auto": using quant="none" in float32: it needs ')
    assert "--" not in said.getMessage()
    assert said.cli_message.startswith("--quant auto: using --quant none in float32: it needs ")
    from monkey_cli.model.configuration import load_config

    # The lowered batch size too, in both spellings.
    plan = memory.plan(load_config(tiny), "none", "float32")
    choice = memory.choose(load_config(tiny), plan.total_bytes + 1, quant="none", batch_size=64, device="cpu",
                           dtype="float32")  # fmt: skip
    assert choice.note.startswith("--batch-size 64 lowered to 1, what fits with --quant none in the ")
    assert choice.api_note.startswith('batch_size=64 lowered to 1, what fits with quant="none" in the ')
    cli = _cli("caption", CHART, "--model", tiny, "--max-new-tokens", "2")
    assert "--quant auto: using --quant none in float32" in cli.stderr and 'quant="auto"' not in cli.stderr


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
@pytest.mark.parametrize("model", ["./no-such-checkpoint", "models/typo/monkey", "FILE"])
def test_a_model_path_that_is_no_folder_nor_hub_id_fails_at_once(tmp_path, model: str, workers: list[str]) -> None:
    """`read` of a born-digital PDF never loads the model: a mistyped --model used to pass unnoticed (the
    released config stood in for it). Now one line before any input is read, exit 2, nothing on stdout."""
    if model == "FILE":
        model = str(tmp_path / "config.json")
        (tmp_path / "config.json").write_text("{}")
    result = _cli("read", SAMPLES_DIR / "invoice.pdf", "--model", model, *workers)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    what = "a file, not a model folder" if model.endswith("config.json") else "model folder not found"
    assert result.stderr.strip().splitlines() == [
        f"error: {model}: {what} (give a checkpoint folder or a hub id like echo840/Monkey)"
    ]


def test_peek_config_refuses_a_path_it_cannot_find() -> None:
    """From Python too: no released config for a path that is not there (a hub id still gets one)."""
    from monkey_cli.model.sources import ModelSourceError, peek_config

    with pytest.raises(ModelSourceError, match="model folder not found"):
        peek_config("./no-such-checkpoint")
    assert peek_config("someone/not-cached-anywhere").vision.input_size == (896, 896)

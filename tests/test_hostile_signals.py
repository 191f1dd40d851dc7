"""Signals: Ctrl-C, SIGTERM and SIGHUP at any moment end a run the same way.

Every finished result reaches stdout or its file, the exit status is 128 + the signal, and there is no
traceback, whether the signal comes while Python imports torch, while the model loads or while it answers.
Each case runs `monkey` in a subprocess with a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import SAMPLES_DIR
from hostile import REPO, TIMEOUT_S, python, sample, text_pdf, tiny_model


class Run:
    """`python -X importtime -m monkey_cli ARGS`, stderr drained in a thread (importtime says when the signals
    module has run, so a signal sent after `ready` is never one Python's default handling sees)."""

    def __init__(self, *args: str, **kwargs) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        command = [sys.executable, "-X", "importtime", "-m", "monkey_cli", *map(str, args)]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs
        )
        self.ready = threading.Event()  # signal handling is installed
        self.first_error = threading.Event()  # an `error: ...` line came
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)
            if "monkey_cli.signals" in line:  # printed once the module ran: `install()` is its next statement
                self.ready.set()
            if line.startswith("error: "):
                self.first_error.set()

    def wait_for(self, event: threading.Event) -> None:
        assert event.wait(TIMEOUT_S), "".join(self.lines)[-2000:]

    def finish(self, signum: int | None = None, after: float = 0.0) -> tuple[int, str, str]:
        if signum is not None:
            time.sleep(after)
            self.process.send_signal(signum)
        stdout = self.process.stdout.read()
        self.process.wait(timeout=TIMEOUT_S)
        self.reader.join(timeout=TIMEOUT_S)
        stderr = "".join(line for line in self.lines if not line.startswith("import time:"))
        return self.process.returncode, stdout, stderr


@pytest.mark.parametrize(
    "signum, fmt",
    [(signal.SIGTERM, "json"), (signal.SIGHUP, "md"), (signal.SIGINT, "json"), (signal.SIGTERM, "jsonl")],
)
def test_finished_results_reach_stdout_whatever_the_signal(tmp_path, signum, fmt):
    """`-f json` and `-f md` to stdout lost everything on SIGTERM: they are written at the end."""
    report = SAMPLES_DIR / "report.pdf"  # three pages answered from the text layer at once
    run = Run("read", report, tmp_path / "missing.pdf", SAMPLES_DIR / "chart.png", "--model", tiny_model(),
                "--device", "cpu", "-f", fmt)  # fmt: skip
    run.wait_for(run.first_error)  # the error for missing.pdf comes after report.pdf's records
    code, stdout, stderr = run.finish(signum)
    assert code == 128 + signum, stderr
    assert "Traceback" not in stderr
    assert "interrupted: the results finished so far were written" in stderr
    assert "finished documents are saved" not in stderr  # only said when there is an --out folder
    if fmt == "json":
        records = json.loads(stdout)["records"]
    elif fmt == "jsonl":
        records = [json.loads(line) for line in stdout.splitlines()]
    else:
        assert stdout.startswith(f"<!-- {report} p.1/3 · ") and f"<!-- {report} p.3/3 · " in stdout  # read as Markdown
        return
    answered = [r for r in records if r["source"] == str(report)]
    assert [r["page"] for r in answered] == [1, 2, 3] and all(r["answer"] for r in answered)


@pytest.mark.parametrize(
    "signum, moment",
    [(signal.SIGINT, 0.0), (signal.SIGTERM, 0.0), (signal.SIGINT, 0.4), (signal.SIGTERM, 1.5),
     (signal.SIGINT, "answering"), (signal.SIGTERM, "answering")],
)  # fmt: skip
def test_a_signal_at_any_moment_exits_128_plus_signal_without_a_traceback(tmp_path, signum, moment):
    """From the first imports (seconds after the start: torch, the model) to the model's answers (once the
    first document is written); with --out, every file written is whole and no work folder is left."""
    inputs = [sample("scan.png" if i % 2 else "chart.png", tmp_path / "in" / f"p{i}.png") for i in range(6)]
    out = tmp_path / "out"
    run = Run("caption", *inputs, "--model", tiny_model(), "--device", "cpu", "--max-new-tokens", "24",
              "--batch-size", "1", "--out", out, "-f", "json")  # fmt: skip
    run.wait_for(run.ready)
    if moment == "answering":
        deadline = time.monotonic() + TIMEOUT_S
        while not list(out.glob("p*.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        moment = 0.0
    code, _stdout, stderr = run.finish(signum, moment)
    assert code == 128 + signum, stderr
    assert "Traceback" not in stderr and "unexpected" not in stderr, stderr
    if out.exists():
        assert "finished documents are saved" in stderr or stderr.strip().endswith("interrupted")
        written = [path for path in out.glob("*.json") if not path.name.startswith(".")]
        for path in written:
            json.loads(path.read_text())  # whole
        assert len(written) < len(inputs) and not list(out.glob(".monkey-work-*")), "work folder left behind"


def test_a_hangup_the_process_was_told_to_ignore_stays_ignored(tmp_path):
    """`nohup monkey ...` must survive the terminal going away."""
    pdf = text_pdf(tmp_path / "a.pdf", "still here")

    def ignore_hangups() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    run = Run("read", pdf, "--model", tiny_model(), "-f", "json", preexec_fn=ignore_hangups)
    run.wait_for(run.ready)
    code, stdout, stderr = run.finish(signal.SIGHUP, 0.2)
    assert code == 0, stderr
    assert json.loads(stdout)["records"][0]["answer"] == "still here"


def test_deferred_holds_a_signal_until_the_block_is_done_and_a_second_one_ends_at_once():
    code = """
import os, signal
from monkey_cli import signals
signals.install()
try:
    with signals.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        print("block finished", flush=True)
    print("not reached", flush=True)
except signals.Interrupted as exc:
    print("raised", exc.exit_code, flush=True)
    os.kill(os.getpid(), signal.SIGINT)  # a second signal during the clean-up: out at once, first status
    print("not reached either", flush=True)
"""
    result = python(code, timeout=60)
    assert result.stdout.splitlines() == ["block finished", "raised 143"]
    assert result.returncode == 143 and "Traceback" not in result.stderr


def test_an_error_a_library_makes_of_the_interrupt_is_still_the_interrupt():
    """transformers turns a KeyboardInterrupt during its lazy imports into ModuleNotFoundError."""
    code = """
import os, signal, time, typer
from monkey_cli import signals
from monkey_cli.cli.common import user_errors
signals.install()
try:
    with user_errors():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except KeyboardInterrupt:
            raise ModuleNotFoundError("Could not import module 'GenerationMixin'") from None
except typer.Exit as exc:
    print(exc.exit_code)
"""
    result = python(code, timeout=60)
    assert result.stdout.strip() == "143"
    assert result.stderr.strip() == "interrupted"


def test_signal_handling_is_set_up_before_the_command_line_is_imported():
    source = (REPO / "monkey_cli" / "__main__.py").read_text()
    assert source.index("signals.install()") < source.index("from monkey_cli.cli import")
    assert 'monkey = "monkey_cli.__main__:main"' in (REPO / "pyproject.toml").read_text()



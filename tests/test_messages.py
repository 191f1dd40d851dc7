"""What a newcomer reads: each message says one thing once, in the words of whoever is speaking (the CLI's
flags on the command line, the library's own terms from Python), and points the way on."""

from __future__ import annotations

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

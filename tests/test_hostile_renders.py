"""Renders that never end: a few-KB PDF of nested Form XObjects takes MuPDF hours to draw, holding the GIL.

Every page is drawn in the renderer process within a budget (--render-timeout): the page over it is an error
record naming it, the other pages and documents go on, signals are acted on at once, and no renderer is left
behind. The server's side (thumbnails, API, /health while a page is drawn) is in test_hostile_serve.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from conftest import SAMPLES_DIR
from hostile import REPO, TIMEOUT_S, _env, files_under, monkey, nested_forms_pdf, render_children

from monkey_cli.documents import PageError, iter_pages


def test_a_page_over_the_budget_is_an_error_record_and_the_rest_goes_on(tmp_path) -> None:
    bomb = nested_forms_pdf(tmp_path / "in" / "bomb.pdf")
    assert bomb.stat().st_size < 8192  # a few KB
    (tmp_path / "in" / "report.pdf").write_bytes((SAMPLES_DIR / "report.pdf").read_bytes())
    started = time.monotonic()
    result = monkey("render", tmp_path / "in", "--out", tmp_path / "out", "--render-timeout", "2", text=True)
    assert time.monotonic() - started < 60
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bomb.pdf: page 1: rendering took longer than 2 s" in errors[0], result.stderr
    assert "--render-timeout" in errors[0] and "Traceback" not in result.stderr
    written = files_under(tmp_path / "out")
    assert sum(name.endswith("-grid.png") for name in written) == 3  # every page of the good document
    assert not any(name.startswith("bomb.pdf") for name in written)


def test_the_budget_is_per_page_and_the_next_document_gets_a_fresh_renderer(tmp_path) -> None:
    bomb = nested_forms_pdf(tmp_path / "bomb.pdf")
    small = nested_forms_pdf(tmp_path / "small.pdf", depth=3)  # a hundred fills: well within the budget
    records = list(iter_pages([bomb, SAMPLES_DIR / "invoice.pdf", small], render_timeout=1.5))
    assert isinstance(records[0], PageError) and records[0].page == 1 and records[0].transient
    assert "rendering took longer than 1.5 s" in records[0].message
    assert [type(r).__name__ for r in records[1:]] == ["Page", "Page"]
    assert records[1].has_text_layer  # the text layer comes from the renderer too


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_is_acted_on_while_a_page_is_drawn(tmp_path, signum: int) -> None:
    """No budget at all (0): the page would take hours; the signal still ends the run at once."""
    bomb = nested_forms_pdf(tmp_path / "bomb.pdf")
    command = [sys.executable, "-m", "monkey_cli", "render", str(bomb), "--out", str(tmp_path / "out"),
               "--render-timeout", "0"]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=_env(None), cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not render_children(process.pid):  # the page is being drawn
            assert time.monotonic() < deadline and process.poll() is None, "the renderer never started"
            time.sleep(0.1)
        time.sleep(1)
        process.send_signal(signum)
        sent = time.monotonic()
        _, stderr = process.communicate(timeout=TIMEOUT_S)
        waited = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signum, stderr
    assert waited < 5, f"the signal took {waited:.1f} s to be acted on"
    assert "interrupted" in stderr and "Traceback" not in stderr
    time.sleep(0.5)
    assert render_children(process.pid) == [], "the renderer outlived monkey"


def test_the_renderer_dies_with_its_parent_even_by_sigkill(tmp_path) -> None:
    bomb = nested_forms_pdf(tmp_path / "bomb.pdf")
    command = [sys.executable, "-m", "monkey_cli", "render", str(bomb), "--out", str(tmp_path / "out"),
               "--render-timeout", "0"]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL, env=_env(None), cwd=REPO)
    deadline = time.monotonic() + 60
    while not render_children(process.pid):
        assert time.monotonic() < deadline and process.poll() is None, "the renderer never started"
        time.sleep(0.1)
    process.kill()
    process.wait(TIMEOUT_S)
    deadline = time.monotonic() + 5
    while render_children(process.pid):
        assert time.monotonic() < deadline, "the renderer went on drawing after its parent was killed"
        time.sleep(0.1)


def test_bad_budgets_are_usage_errors() -> None:
    result = monkey("render", SAMPLES_DIR / "report.pdf", "--out", "unused", "--render-timeout", "soon", text=True)
    assert result.returncode == 2 and "--render-timeout" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(Exception, match="render budget"):
        iter_pages([SAMPLES_DIR / "report.pdf"], render_timeout=-1)

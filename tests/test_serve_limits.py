"""The limits of a live `monkey serve` that need time: queue full (429), per-request timeout (504), a client that
leaves (its work dropped, the others go on); and the server's life: signals, a model that fails to load, an
address in use."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import SAMPLES_DIR
from serve_helpers import LiveServer, data_url, image_message

LONG = 6000  # tokens: far more than any of these requests is let to run
pytestmark = pytest.mark.slow


def _long_request(question: str = "What is the title?") -> dict:
    return {"model": "m", "messages": [image_message(data_url(SAMPLES_DIR / "chart.png"), question)],
            "max_tokens": LONG}  # fmt: skip


def _wait_for(condition, timeout: float = 60, message: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message or "timed out waiting"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory, tiny_sharp_dir: Path):
    """One decode slot and a queue of one: a long answer keeps the server busy."""
    live = LiveServer(
        tmp_path_factory.mktemp("serve-queue"),
        "--model", str(tiny_sharp_dir), "--batch-size", "1", "--max-queue", "1",
        "--max-new-tokens", str(LONG), "--request-timeout", "120",
    )  # fmt: skip
    try:
        yield live.start()
    finally:
        code = live.stop(signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, live.log()  # stopped gracefully, with the status the signal says


def test_a_long_answer_runs_long(one_slot) -> None:
    """The premise of the tests below: this request does not end early (no <|endoftext|> before 1000 tokens)."""
    body = {**_long_request(), "max_tokens": 1000}
    response = httpx.post(f"{one_slot.base}/v1/chat/completions", json=body, timeout=300).json()
    assert response["choices"][0]["finish_reason"] == "length"


def test_a_client_that_leaves_has_its_work_dropped_and_a_full_queue_says_429(one_slot) -> None:
    before = one_slot.health()["engine"]["decoded_tokens"]
    first_piece = threading.Event()
    leave = threading.Event()

    def stream_then_leave() -> None:
        body = {**_long_request(), "stream": True}
        with httpx.stream("POST", f"{one_slot.base}/v1/chat/completions", json=body, timeout=300) as response:
            for line in response.iter_lines():
                chunk = json.loads(line[len("data: "):]) if line.startswith("data: {") else {}
                if any(choice["delta"].get("content") for choice in chunk.get("choices", [])):
                    first_piece.set()
                    leave.wait(60)
                    return  # closes the connection mid-answer

    client = threading.Thread(target=stream_then_leave, daemon=True)
    client.start()
    assert first_piece.wait(60), "the long answer never started"
    health = one_slot.health()
    assert health["requests"] == 1 and health["pending"] == 1
    busy = openai.OpenAI(base_url=f"{one_slot.base}/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.RateLimitError, match="busy") as refused:
        busy.chat.completions.create(**{**_long_request(), "max_tokens": 2})
    assert refused.value.code == "queue_full" and refused.value.response.headers["retry-after"] == "1"
    leave.set()
    client.join(60)
    _wait_for(lambda: one_slot.health()["pending"] == 0, 30, "the request of the client that left still runs")
    decoded = one_slot.health()["engine"]["decoded_tokens"] - before
    # Had it gone on, it would have decoded at least 1000 tokens (see the premise above) and up to 6000.
    assert decoded < 1000, decoded
    # ... and the server goes on with the next client.
    answer = busy.chat.completions.create(**{**_long_request(), "max_tokens": 3})
    assert answer.usage.completion_tokens == 3


@pytest.fixture(scope="module")
def impatient(tmp_path_factory, tiny_sharp_dir: Path):
    """Every request gets half a second: less than any long answer takes."""
    live = LiveServer(
        tmp_path_factory.mktemp("serve-timeout"),
        "--model", str(tiny_sharp_dir), "--max-new-tokens", str(LONG), "--request-timeout", "0.5",
    )  # fmt: skip
    try:
        yield live.start()
    finally:
        live.stop()


def test_a_request_over_its_time_gets_504_and_is_dropped(impatient) -> None:
    response = httpx.post(f"{impatient.base}/v1/chat/completions", json=_long_request(), timeout=120)
    assert response.status_code == 504
    error = response.json()["error"]
    assert error["code"] == "timeout" and "--request-timeout" in error["message"]
    _wait_for(lambda: impatient.health()["pending"] == 0, 30, "the timed-out request still runs")


def test_a_stream_over_its_time_ends_with_an_error_event(impatient) -> None:
    body = {**_long_request(), "stream": True}
    with httpx.stream("POST", f"{impatient.base}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    last = json.loads(events[-1][len("data: "):])
    assert last["error"]["code"] == "timeout"
    _wait_for(lambda: impatient.health()["pending"] == 0, 30, "the timed-out stream still runs")


def test_a_document_over_its_time_gets_504(impatient) -> None:
    files = {"file": ("report.pdf", (SAMPLES_DIR / "report.pdf").read_bytes())}
    data = {"question": "What is the title?", "max_tokens": str(LONG)}
    response = httpx.post(f"{impatient.base}/v1/documents", files=files, data=data, timeout=120)
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    _wait_for(lambda: impatient.health()["pending"] == 0, 30, "the timed-out document still runs")


def test_sigint_stops_the_server_with_130(impatient) -> None:
    """The last test of this module: it stops the server (gracefully: the engine is shut down first)."""
    assert impatient.stop(signal.SIGINT) == 130
    assert "Traceback" not in impatient.log()


def test_sighup_stops_the_server_with_129(tmp_path, tiny_monkey_dir: Path) -> None:
    """uvicorn handles SIGINT and SIGTERM (see the fixtures' teardown); SIGHUP is ours."""
    live = LiveServer(tmp_path, "--model", str(tiny_monkey_dir)).start(wait_ready=False)
    try:
        _wait_for(lambda: _health_status(live) == "ready", 180, live.log())
    finally:
        code = live.stop(signal.SIGHUP)
    assert code == 128 + signal.SIGHUP, live.log()
    assert "interrupted" in live.log() and "Traceback" not in live.log()


def _health_status(live: LiveServer) -> str | None:
    try:
        return httpx.get(f"{live.base}/health", timeout=5).json()["status"]
    except httpx.TransportError:
        return None


def _serve(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "monkey_cli", "serve", *args],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_a_model_that_cannot_load_stops_the_server_with_one_line(tmp_path) -> None:
    result = _serve("--port", "0", "--model", str(tmp_path / "no-such-checkpoint"), "--device", "cpu")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no-such-checkpoint" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_an_address_in_use_is_one_line_and_exit_2() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = _serve("--port", str(port), "--model", "unused", timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{port}: ")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--port", "70000", "--port must be a port number in 0..65535"),
        ("--max-upload", "lots", "--max-upload must be a size such as 64M"),
        ("--request-timeout", "-1", "--request-timeout must be a positive number of seconds"),
        ("--max-queue", "0", "--max-queue must be a positive integer"),
        ("--api-key", " ", "--api-key must not be empty"),
    ],
)
def test_bad_server_options_are_usage_errors(option: str, value: str, message: str) -> None:
    result = _serve(option, value, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {message}"), result.stderr

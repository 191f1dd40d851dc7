"""Bad requests to a live `monkey serve` (with an API key and small limits): each gets its status and a JSON error
in OpenAI's shape, never a traceback, nothing named in a request is fetched or opened, and the server keeps
serving."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import threading
import zipfile
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import SAMPLES_DIR
from serve_helpers import LiveServer, data_url, image_message

KEY = "test-key-3f9a"
LIMIT = 256 * 1024
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_monkey_dir: Path):
    live = LiveServer(
        tmp_path_factory.mktemp("serve-errors"),
        "--model", str(tiny_monkey_dir), "--max-new-tokens", "4", "--max-upload", "256K", "--max-pages", "2",
        env={"MONKEY_API_KEY": KEY},
    )  # fmt: skip
    try:
        yield live.start()
    finally:
        live.stop()


def _post(server: LiveServer, body: Any, path: str = "/v1/chat/completions", **options: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", **options.pop("headers", {})}
    if isinstance(body, (bytes, str)):
        options["content"] = body
        headers.setdefault("Content-Type", "application/json")
    elif body is not None:
        options["json"] = body
    return httpx.post(f"{server.base}{path}", headers=headers, timeout=120, **options)


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The error of `response`, checked: its status, OpenAI's shape, one line, no traceback."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert "Traceback" not in response.text and 'File "' not in response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "\n" not in error["message"]
    return error


def _chat(url: str, question: str = "What is it?") -> dict[str, Any]:
    return {"model": "monkey", "messages": [image_message(url, question)], "max_tokens": 2}


def _still_serving(server: LiveServer) -> None:
    assert server.health()["status"] == "ready"


def _b64(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("word/document.xml", "<w:document/>")
    return buffer.getvalue()


CHART = data_url(SAMPLES_DIR / "chart.png")
SCAN = data_url(SAMPLES_DIR / "scan.png")
BAD_CHATS = {
    "no image": ({"messages": [{"role": "user", "content": "What is the total?"}]}, 400, "missing_image", "messages"),
    "two images": (
        {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": CHART}},
            {"type": "image_url", "image_url": {"url": SCAN}},
            {"type": "text", "text": "Compare them."}]}]},
        400, "too_many_images", "messages",
    ),
    "broken base64": (_chat("data:image/png;base64,iVBORw0KGgo@@@"), 400, "invalid_base64", "url"),
    "not an image": (_chat(_b64(b"just some text, not a picture")), 400, "invalid_image", "url"),
    "a zip file": (_chat(_b64(_zip(), "image/png")), 400, "invalid_image", "url"),
    "a page the PDF lacks": (
        _chat(data_url(SAMPLES_DIR / "invoice.pdf", "application/pdf", page=2)), 400, "invalid_page", "url"
    ),
    "an https URL": (_chat("https://example.com/invoice.png"), 400, "remote_url_refused", "url"),
    "a local path": (_chat("/etc/passwd"), 400, "local_path_refused", "url"),
    "a file URL": (_chat("file:///etc/passwd"), 400, "local_path_refused", "url"),
    "a relative path": (_chat("../samples/chart.png"), 400, "local_path_refused", "url"),
    "a Windows path": (_chat("C:\\Users\\me\\scan.png"), 400, "local_path_refused", "url"),
    "a too-long prompt": (_chat(CHART, "word " * 20000), 400, "context_length_exceeded", "messages"),
    "an unknown part type": (
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
        400, None, "messages.0.content.0",
    ),
    "no messages": ({"messages": []}, 400, None, "messages"),
    "a temperature too high": ({**_chat(CHART), "temperature": 7}, 400, None, "temperature"),
    "more choices than OpenAI allows": ({**_chat(CHART), "n": 129}, 400, None, "n"),
    "five stop strings": ({**_chat(CHART), "stop": ["a", "b", "c", "d", "e"]}, 400, None, "stop"),
    "tool calling": ({**_chat(CHART), "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
                     "unsupported_parameter", "tools"),
    "an unknown field": ({**_chat(CHART), "guided_regex": "a+"}, 400, "unsupported_parameter", "guided_regex"),
    "the assistant last": (
        {"messages": [image_message(CHART, "Hi?"), {"role": "assistant", "content": "Hello"}]},
        400, None, "messages.1.role",
    ),
    "malformed JSON": ('{"messages": [{"role": "user", "content": ', 400, "invalid_json", None),
    "not JSON at all": ("messages=hello", 400, "invalid_json", None),
}


@pytest.mark.parametrize("case", BAD_CHATS, ids=list(BAD_CHATS))
def test_a_bad_chat_request_gets_a_json_error(server, case: str) -> None:
    body, status, code, param = BAD_CHATS[case]
    error = _error(_post(server, body), status)
    assert error["code"] == code
    if param is not None:
        assert error["param"] is not None and error["param"].endswith(param)
    _still_serving(server)


def test_oversized_bodies_get_413_declared_or_streamed(server) -> None:
    big = _chat(_b64(os.urandom(LIMIT)))  # base64 makes it a third larger than the limit
    assert _error(_post(server, big), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is found while the body is read
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(LIMIT // 4096 + 2):
            yield b"A" * 4096
        yield b'"}]}'

    streamed = _post(server, None, content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in streamed.request.headers
    assert _error(streamed, 413)["code"] == "request_too_large"
    files = {"file": ("big.png", os.urandom(LIMIT + 1))}
    assert _error(_post(server, None, "/v1/documents", files=files, data={"question": "q"}), 413)
    _still_serving(server)


def test_a_remote_url_is_never_fetched(server) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(2)
    port = listener.getsockname()[1]
    connections: list[Any] = []
    watcher = threading.Thread(target=lambda: _accept(listener, connections), daemon=True)
    watcher.start()
    try:
        error = _error(_post(server, _chat(f"http://127.0.0.1:{port}/scan.png")), 400)
        watcher.join(3)
    finally:
        listener.close()
    assert error["code"] == "remote_url_refused"
    assert connections == [], "the server connected to the URL it was given"


def _accept(listener: socket.socket, connections: list[Any]) -> None:
    with contextlib.suppress(OSError):  # timed out: nobody connected
        connections.append(listener.accept())


def test_the_api_key_is_required_and_compared(server) -> None:
    good = openai.OpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0, timeout=120)
    wrong = openai.OpenAI(base_url=f"{server.base}/v1", api_key=KEY + "x", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        wrong.chat.completions.create(model="m", messages=[image_message(CHART, "What is it?")], max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    missing = httpx.get(f"{server.base}/v1/models", timeout=30)
    assert _error(missing, 401)["code"] == "invalid_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    # /health answers liveness without the key, and nothing more (the details need the key).
    liveness = httpx.get(f"{server.base}/health", timeout=30)
    assert liveness.status_code == 200 and liveness.json() == {"status": "ready", "key_required": True}
    assert httpx.get(f"{server.base}/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()["engine"]
    # Refused before the body is read: a huge body without the key is a 401, not a 413.
    assert _error(httpx.post(f"{server.base}/v1/chat/completions", content=b"x" * (2 * LIMIT), timeout=30), 401)
    # The web page's own files load without the key (the page asks for it).
    assert httpx.get(f"{server.base}/", timeout=30).status_code == 200
    assert httpx.get(f"{server.base}/static/app.js", timeout=30).status_code == 200
    answer = good.chat.completions.create(model="m", messages=[image_message(CHART, "What is it?")], max_tokens=2)
    assert answer.choices[0].message.content is not None


def test_the_official_client_raises_its_own_errors(server) -> None:
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError, match="remote image URLs are never fetched") as caught:
        client.chat.completions.create(model="m", messages=[image_message("https://x.org/a.png", "?")])
    assert caught.value.code == "remote_url_refused"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_the_same_image_twice_in_a_conversation_is_one_image(server) -> None:
    messages = [image_message(CHART, "What is it?"), {"role": "assistant", "content": "A chart."},
                image_message(CHART, "What is its title?")]  # fmt: skip
    response = _post(server, {"messages": messages, "max_tokens": 2})
    assert response.status_code == 200, response.text


def _upload(server: LiveServer, path: Path | None = None, data: bytes | None = None, **fields: Any) -> httpx.Response:
    content = data if data is not None else path.read_bytes()
    return _post(server, None, "/v1/documents", files={"file": ((path or Path("x")).name, content)}, data=fields)


def test_bad_document_requests_get_json_errors(server) -> None:
    report = SAMPLES_DIR / "report.pdf"
    assert _error(_upload(server, report, question="q"), 400)["code"] == "too_many_pages"  # 3 pages, limit 2
    assert _error(_upload(server, report, question="q", pages="1-x"), 400)["param"] == "pages"
    assert _error(_upload(server, data=b"plain text", question="q"), 400)["code"] == "invalid_document"
    assert "ZIP archive" in _error(_upload(server, data=_zip(), question="q"), 400)["message"]
    assert _error(_upload(server, report, pages="1"), 400)["code"] == "missing_question"
    assert _error(_upload(server, report, pages="1", task="summarize"), 400)["param"] == "task"
    assert _error(_upload(server, report, pages="1", question="word " * 20000), 400)["code"] == (
        "context_length_exceeded"
    )
    assert _error(_post(server, None, "/v1/documents", data={"question": "q"}), 400)["param"] == "file"
    ok = _upload(server, report, pages="1-2", task="read")  # a text layer: no model needed, still a record
    assert ok.status_code == 200 and [r["answer_source"] for r in ok.json()["records"]] == ["text_layer"] * 2


def test_unknown_routes_and_methods_are_json_errors(server) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    assert _error(httpx.get(f"{server.base}/v1/nothing", headers=headers, timeout=30), 404)["code"] == "not_found"
    assert _error(httpx.get(f"{server.base}/v1/chat/completions", headers=headers, timeout=30), 405)


def test_the_server_kept_serving_and_logged_no_traceback(server) -> None:
    response = _post(server, _chat(CHART))
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] is not None
    assert "Traceback" not in server.log()

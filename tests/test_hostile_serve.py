"""A live `monkey serve` against greedy clients and hostile browsers (round 2 of the adversarial pass).

One server (the tiny sharp checkpoint, small limits) answers every case; each test makes its hostile input on
the spot: sampling values that break the sampler's arithmetic, bodies that trickle in, a request with too many
questions, a client probing for another's image, foreign Host headers (DNS rebinding), cross-site POSTs
(CSRF, also from real headless Chromium on a second origin), pages that take hours to draw. Every case is
bounded by timeouts; none may cost the others their answers, and no response carries a traceback or the
model's path on this machine.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SAMPLES_DIR
from hostile import nested_forms_pdf, render_children
from serve_helpers import LiveServer, data_url, image_message

pytestmark = pytest.mark.slow

QUESTION = "What is the title?"  # the tiny sharp checkpoint answers it at length (test_serve_limits' premise)
CHART = data_url(SAMPLES_DIR / "chart.png")
ALLOWED_NAME = "monkey.test"


# --- two other origins: static pages on other ports of this machine ------------------------------------------


class PageServer:
    """Serves `pages` (path -> (content type, bytes)) on 127.0.0.1, another origin than the monkey server."""

    def __init__(self) -> None:
        self.pages: dict[str, tuple[str, bytes]] = {}
        pages = self.pages

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                content_type, body = pages.get(self.path.split("?")[0], ("text/plain", b"not here"))
                self.send_response(200 if self.path.split("?")[0] in pages else 404)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def origins():
    allowed, foreign = PageServer(), PageServer()
    try:
        yield allowed, foreign
    finally:
        allowed.close()
        foreign.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_sharp_dir: Path, origins):
    allowed, _foreign = origins
    live = LiveServer(
        tmp_path_factory.mktemp("serve-hostile"),
        "--model", str(tiny_sharp_dir), "--batch-size", "2", "--max-queue", "3", "--max-new-tokens", "64",
        "--max-pages", "4", "--max-questions", "6", "--max-answers", "8", "--body-timeout", "2",
        "--render-timeout", "2", "--allowed-hosts", ALLOWED_NAME, "--allowed-origins", allowed.origin,
    )  # fmt: skip
    try:
        yield live.start()
    finally:
        live.stop()


def _chat(url: str = CHART, question: str = QUESTION, **fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [image_message(url, question)], "max_tokens": 2, **fields}


def _post(server: LiveServer, body: Any, path: str = "/v1/chat/completions", **options: Any) -> httpx.Response:
    if isinstance(body, (str, bytes)):
        options.setdefault("headers", {})["Content-Type"] = "application/json"
        options["content"] = body
    elif body is not None:
        options["json"] = body
    return httpx.post(f"{server.base}{path}", timeout=120, **options)


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text and 'File "' not in response.text
    error = response.json()["error"]
    assert error["message"] and "\n" not in error["message"]
    return error


def _engine(server: LiveServer) -> dict[str, int]:
    return server.health()["engine"]


# --- one client must never hurt another: sampling values, ranges ---------------------------------------------

BAD_VALUES = [
    ("temperature", 4e-39),  # a denormal: logits / t overflow, probabilities NaN a few steps in
    ("temperature", 1e-300),
    ("temperature", 0.005),
    ("temperature", 2.5),
    ("top_p", 1e-300),
    ("top_p", 0),
    ("top_k", -1),
    ("top_k", 10**7),
    ("seed", 2**64),  # was a 500
    ("seed", -(2**63) - 1),
    ("max_tokens", 0),
    ("max_tokens", 10**12),
    ("max_completion_tokens", 10**12),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_sampling_values_that_break_decoding_are_400s_naming_the_field(server, field: str, value: Any) -> None:
    body = _chat(**{"temperature": 0.7, field: value})
    error = _error(_post(server, body), 400)
    assert error["param"] == field and error["message"].startswith(f"{field}: ")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_numbers_are_400s(server, literal: str) -> None:
    body = json.dumps(_chat()).replace('"max_tokens": 2', f'"max_tokens": 2, "temperature": {literal}')
    assert _error(_post(server, body), 400)["param"] == "temperature"


def test_the_extremes_that_are_allowed_work_beside_a_greedy_client(server) -> None:
    """The smallest temperature and top_p, the largest seed and top_k, decoded in one batch with a greedy
    request: both answered, the greedy one exactly as alone."""
    alone = _post(server, _chat(max_tokens=8)).json()["choices"][0]["message"]["content"]
    extreme = _chat(max_tokens=8, temperature=0.01, top_p=0.001, top_k=10**6, seed=2**64 - 1)
    with ThreadPoolExecutor(2) as pool:
        greedy, sampled = pool.map(lambda body: _post(server, body), [_chat(max_tokens=8), extreme])
    assert sampled.status_code == 200, sampled.text
    assert greedy.status_code == 200 and greedy.json()["choices"][0]["message"]["content"] == alone


def test_a_document_request_bounds_max_tokens_too(server) -> None:
    files = {"file": ("chart.png", (SAMPLES_DIR / "chart.png").read_bytes())}
    response = _post(server, None, "/v1/documents", files=files, data={"question": "q", "max_tokens": str(10**12)})
    assert _error(response, 400)["param"] == "max_tokens"


# --- one request must not take every slot: caps, and turns between requests -----------------------------------


def test_too_many_questions_or_answers_are_refused_before_any_work(server) -> None:
    before = _engine(server)
    files = {"file": ("report.pdf", (SAMPLES_DIR / "report.pdf").read_bytes())}
    many = {"question": [f"Question {i}?" for i in range(1000)]}  # one request, a thousand generations
    error = _error(_post(server, None, "/v1/documents", files=files, data=many), 400)
    assert error["code"] == "too_many_questions" and "--max-questions" in error["message"]
    three = {"question": ["Who?", "What?", "When?"], "pages": "1-3"}  # 9 answers, over --max-answers 8
    error = _error(_post(server, None, "/v1/documents", files=files, data=three), 400)
    assert error["code"] == "too_many_answers" and "--max-answers" in error["message"]
    assert _engine(server)["prefills"] == before["prefills"], "work started for a refused request"


def test_a_request_with_many_questions_takes_turns_with_the_others(server) -> None:
    """Two decode slots; one document asks six questions (64 tokens each), then a chat request asks for 4
    tokens. Taking turns between requests, the chat is admitted as soon as a slot frees up: at most the two
    answers decoding when it came finish before it. First come, first served makes it wait behind the
    document's queued answers (all six finish first). Needs the engine's turns between request groups
    (GenerationRequest.group: the server gives every HTTP request its own)."""
    files = {"file": ("chart.png", (SAMPLES_DIR / "chart.png").read_bytes())}
    data = {"question": [f"{QUESTION} ({i})" for i in range(6)], "max_tokens": "64", "stream": "true"}
    record_times: list[float] = []
    first_delta = threading.Event()

    def document() -> None:
        with httpx.stream("POST", f"{server.base}/v1/documents", files=files, data=data, timeout=300) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[len("data: "):])
                    first_delta.set()
                    if event["type"] == "record":
                        record_times.append(time.monotonic())

    thread = threading.Thread(target=document, daemon=True)
    thread.start()
    assert first_delta.wait(120), "the document never started"
    chat_sent = time.monotonic()
    chat = _post(server, _chat(max_tokens=4))
    chat_done = time.monotonic()
    thread.join(300)
    assert chat.status_code == 200 and len(record_times) == 6
    assert sum(moment < chat_sent for moment in record_times) == 0  # the premise: all six still to come
    meanwhile = sum(chat_sent <= moment < chat_done for moment in record_times)
    assert meanwhile <= 2, f"the chat request waited for {meanwhile} of the document's 6 answers"


# --- slow bodies must not hold the queue ---------------------------------------------------------------------


def _slow_request(server: LiveServer) -> socket.socket:
    """Headers that promise 100 kB of body, then one byte of it, then nothing."""
    port = int(server.base.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100000\r\n\r\n{")  # fmt: skip
    return sock


def _response_of(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_bodies_that_never_come_are_cut_off_and_free_the_queue(server) -> None:
    slow = [_slow_request(server) for _ in range(3)]  # --max-queue 3: every place taken
    try:
        time.sleep(0.5)
        assert _error(_post(server, _chat()), 429)["code"] == "queue_full"  # the premise: they hold the queue
        started = time.monotonic()
        answers = [_response_of(sock) for sock in slow]  # each answered, then closed by the server
        waited = time.monotonic() - started
    finally:
        for sock in slow:
            sock.close()
    assert waited < 10, f"the slow bodies held the queue for {waited:.1f} s"
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:200]
        assert json.loads(body)["error"]["code"] == "body_timeout"
    assert _post(server, _chat()).status_code == 200  # the queue is free again


def test_a_large_body_on_a_slow_link_still_gets_in(server) -> None:
    """300 kB at about 100 kB/s: longer than --body-timeout 2, within its one second per 64 kB received."""
    files = {"file": ("report.pdf", (SAMPLES_DIR / "report.pdf").read_bytes())}
    request = httpx.Request("POST", f"{server.base}/v1/documents/preview", files=files,
                            data={"padding": "x" * 300_000, "pages": "1"})  # fmt: skip
    body = request.read()

    def trickle():
        for start in range(0, len(body), 10_000):
            yield body[start : start + 10_000]
            time.sleep(0.1)

    headers = {"Content-Type": request.headers["content-type"], "Content-Length": str(len(body))}
    started = time.monotonic()
    response = httpx.post(request.url, content=trickle(), headers=headers, timeout=60)
    assert time.monotonic() - started > 2  # the premise: it took longer than --body-timeout
    assert response.status_code == 200, response.text
    assert [page["page"] for page in response.json()["pages"]] == [1]


# --- vision features are shared within one client only ------------------------------------------------------


def test_a_client_cannot_learn_whether_another_sent_an_image(server) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.effect_noise((240, 160), 40).convert("RGB").save(buffer, format="PNG")  # sent by no other test
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=120)
    start = _engine(server)["images_encoded"]
    assert _post(server, _chat(url)).status_code == 200
    first = _engine(server)["images_encoded"]
    assert other.post(f"{server.base}/v1/chat/completions", json=_chat(url)).status_code == 200  # another client
    second = _engine(server)["images_encoded"]
    assert _post(server, _chat(url, "And its colour?")).status_code == 200  # the first client again
    third = _engine(server)["images_encoded"]
    other.close()
    assert first == start + 1
    assert second == first + 1, "the other client's request reused the first client's features"
    assert third == second, "a client's own follow-up should reuse its features"


# --- browsers: Host (DNS rebinding), cross-site POSTs (CSRF), headers, the model's path -----------------------

FOREIGN_HOSTS = ["evil.example", "evil.example:80", "localhost.evil.example", "127.0.0.1.nip.io", "monkey.test.evil"]


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
def test_a_foreign_host_header_is_refused_everywhere(server, host: str) -> None:
    for method, path in (("GET", "/health"), ("GET", "/"), ("GET", "/v1/models"), ("GET", "/static/app.js"),
                         ("POST", "/v1/chat/completions")):  # fmt: skip
        response = httpx.request(method, f"{server.base}{path}", headers={"Host": host}, json=_chat(), timeout=30)
        assert _error(response, 403)["code"] == "host_not_allowed", (method, path)
        assert "tiny" not in response.text


def test_this_servers_own_names_are_accepted(server) -> None:
    port = server.base.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}",
                 f"{ALLOWED_NAME}:{port}", "10.1.2.3"):  # fmt: skip
        assert httpx.get(f"{server.base}/health", headers={"Host": host}, timeout=30).status_code == 200, host


def test_cross_site_posts_are_refused_and_same_origin_ones_served(server, origins) -> None:
    allowed, foreign = origins
    own = server.base
    files = {"file": ("report.pdf", (SAMPLES_DIR / "report.pdf").read_bytes())}
    before = _engine(server)

    def preview(headers: dict[str, str]) -> httpx.Response:
        return _post(server, None, "/v1/documents/preview", files=files, data={"pages": "1"}, headers=headers)

    for headers in ({"Origin": "http://evil.example"}, {"Origin": foreign.origin}, {"Origin": "null"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site", "Origin": foreign.origin},
                    {"Sec-Fetch-Site": "cross-site", "Origin": own}):  # fmt: skip
        assert _error(preview(headers), 403)["code"] == "cross_site_refused", headers
    assert _error(_post(server, _chat(), headers={"Origin": foreign.origin}), 403)["code"] == "cross_site_refused"
    assert _engine(server)["prefills"] == before["prefills"]
    for headers in ({}, {"Origin": own, "Sec-Fetch-Site": "same-origin"}, {"Origin": own},
                    {"Sec-Fetch-Site": "none"}):  # fmt: skip
        assert preview(headers).status_code == 200, headers
    permitted = preview({"Origin": allowed.origin, "Sec-Fetch-Site": "cross-site"})  # --allowed-origins
    assert permitted.status_code == 200 and permitted.headers["access-control-allow-origin"] == allowed.origin
    reading = httpx.get(f"{server.base}/health", headers={"Origin": foreign.origin}, timeout=30)
    assert reading.status_code == 200 and "access-control-allow-origin" not in reading.headers  # unreadable there


def test_every_response_carries_the_pages_security_headers(server) -> None:
    for path in ("/", "/static/index.html", "/static/app.js", "/static/style.css", "/health", "/v1/nothing"):
        response = httpx.get(f"{server.base}{path}", timeout=30)
        policy = response.headers.get("content-security-policy", "")
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy, path
        assert response.headers.get("x-content-type-options") == "nosniff", path


def test_no_response_names_the_models_path(server, tiny_sharp_dir: Path) -> None:
    name = tiny_sharp_dir.name
    secret = str(tiny_sharp_dir.resolve().parent)
    files = {"file": ("chart.png", (SAMPLES_DIR / "chart.png").read_bytes())}
    responses = [
        httpx.get(f"{server.base}/health", timeout=30),
        httpx.get(f"{server.base}/v1/models", timeout=30),
        httpx.get(f"{server.base}/v1/models/{name}", timeout=30),
        _post(server, _chat()),
        _post(server, _chat(stream=True)),
        _post(server, None, "/v1/documents", files=files, data={"question": "q", "max_tokens": "2"}),
        httpx.get(f"{server.base}/openapi.json", timeout=30),
        _post(server, None, "/v1/extract", files=files, data={"field": "total:number", "max_tokens": "4"}),
    ]
    for response in responses:
        assert secret not in response.text, response.request.url
    assert httpx.get(f"{server.base}/v1/models", timeout=30).json()["data"][0]["id"] == name
    assert server.health()["model"] == name
    assert responses[3].json()["model"] == name
    assert {record["model"] for record in responses[5].json()["records"]} == {name}
    assert [record["model"] for record in responses[7].json()["records"]] == [name]


# --- pages that take hours to draw ------------------------------------------------------------------------------


def test_a_page_over_the_budget_is_an_error_and_the_server_keeps_answering(server, tmp_path) -> None:
    bomb = nested_forms_pdf(tmp_path / "bomb.pdf").read_bytes()
    slowest: list[float] = []
    done = threading.Event()

    def watch_health() -> None:
        while not done.is_set():
            started = time.monotonic()
            assert httpx.get(f"{server.base}/health", timeout=30).status_code == 200
            slowest.append(time.monotonic() - started)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch_health, daemon=True)
    watcher.start()
    try:
        files = {"file": ("bomb.pdf", bomb)}
        preview = _post(server, None, "/v1/documents/preview", files=files)  # the web page's thumbnails
        document = _post(server, None, "/v1/documents", files=files, data={"question": "q", "max_tokens": "2"})
        chat = _post(server, _chat("data:application/pdf;base64," + base64.b64encode(bomb).decode()))
    finally:
        done.set()
        watcher.join(30)
    assert preview.status_code == 200 and preview.json()["pages"] == []
    assert preview.json()["errors"] == ["bomb.pdf: page 1: rendering took longer than 2 s, the render budget "
                                        "(--render-timeout)"]  # fmt: skip
    (record,) = document.json()["records"]
    assert record["page"] == 1 and "rendering took longer than 2 s" in record["error"]
    assert _error(chat, 400)["code"] == "render_timeout"
    assert len(slowest) > 10 and max(slowest) < 1.5, f"/health took up to {max(slowest):.1f} s while a page was drawn"
    assert _post(server, _chat()).status_code == 200


def test_the_server_stops_on_a_signal_while_a_page_is_drawn(tmp_path, tiny_monkey_dir: Path) -> None:
    """No render budget: the page would take hours. /health answers meanwhile, and SIGTERM stops the server."""
    live = LiveServer(tmp_path, "--model", str(tiny_monkey_dir), "--render-timeout", "0").start()
    try:
        bomb = nested_forms_pdf(tmp_path / "bomb.pdf").read_bytes()
        threading.Thread(
            target=lambda: httpx.post(f"{live.base}/v1/documents/preview", files={"file": ("b.pdf", bomb)}, timeout=60),
            daemon=True,
        ).start()
        deadline = time.monotonic() + 60
        while not render_children(live.process.pid):
            assert time.monotonic() < deadline, "the renderer never started"
            time.sleep(0.1)
        time.sleep(1)
        started = time.monotonic()
        assert httpx.get(f"{live.base}/health", timeout=30).status_code == 200
        assert time.monotonic() - started < 1.5
        sent = time.monotonic()
        code = live.stop(signal.SIGTERM)
        stopped = time.monotonic() - sent
    finally:
        live.stop(signal.SIGKILL)
    assert code == 128 + signal.SIGTERM, live.log()
    assert stopped < 10, f"the server took {stopped:.1f} s to stop"
    time.sleep(0.5)
    assert render_children(live.process.pid) == []
    assert "Traceback" not in live.log()


# --- real Chromium, pages of other origins ---------------------------------------------------------------------

ATTACK_PAGE = """<!doctype html><html><body>
<form id="form" method="post" enctype="multipart/form-data" action="{target}/v1/documents">
<input name="question" value="What is the total?"><input name="question" value="Who signed it?"></form>
<script>
const bytes = Uint8Array.from(atob("{png}"), (c) => c.charCodeAt(0));
const form = new FormData();
form.append("file", new Blob([bytes], {{type: "image/png"}}), "chart.png");
for (let i = 0; i < 3; i++) form.append("question", "Question " + i + "?");
fetch("{target}/v1/documents", {{method: "POST", mode: "no-cors", body: form}})
  .finally(() => document.getElementById("form").submit());
</script></body></html>"""

ALLOWED_PAGE = """<!doctype html><html><body><script>
(async () => {{
  const pdf = await (await fetch("/report.pdf")).blob();
  const form = new FormData();
  form.append("file", pdf, "report.pdf");
  form.append("task", "read");
  form.append("pages", "1");
  const response = await fetch("{target}/v1/documents", {{method: "POST", body: form}});
  window.result = {{status: response.status, body: await response.json()}};
}})().catch((error) => {{ window.result = {{error: String(error)}}; }});
</script></body></html>"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from test_serve_web import _chromium

    binary, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tmp_path_factory.mktemp("chromium-hostile")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     f"--user-data-dir={profile}", "--host-resolver-rules=MAP evil.example 127.0.0.1"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.set_script_timeout(60)
        yield driver
    finally:
        driver.quit()


def test_chromium_a_rebound_name_cannot_read_the_server(server, browser) -> None:
    """evil.example resolves to 127.0.0.1 (DNS rebinding, simulated by Chromium's resolver rules)."""
    port = server.base.rsplit(":", 1)[1]
    browser.get(f"http://evil.example:{port}/health")
    text = browser.find_element("tag name", "body").text
    assert "host_not_allowed" in text and '"ready"' not in text


def test_chromium_a_page_of_another_origin_cannot_make_the_server_work(server, browser, origins) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    _allowed, foreign = origins
    png = base64.b64encode((SAMPLES_DIR / "chart.png").read_bytes()).decode()
    foreign.pages["/attack.html"] = ("text/html", ATTACK_PAGE.format(target=server.base, png=png).encode())
    before = _engine(server)
    refusals = server.log().count("refused a cross-site POST")
    browser.get(f"{foreign.origin}/attack.html")
    WebDriverWait(browser, 60).until(lambda d: d.current_url.startswith(server.base))  # the form was sent
    assert "cross_site_refused" in browser.find_element("tag name", "body").text
    assert server.log().count("refused a cross-site POST") == refusals + 2  # the fetch, then the form
    after = _engine(server)
    assert after["prefills"] == before["prefills"] and after["decoded_tokens"] == before["decoded_tokens"]


def test_chromium_an_allowed_origin_uses_the_api(server, browser, origins) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    allowed, _foreign = origins
    allowed.pages["/report.pdf"] = ("application/pdf", (SAMPLES_DIR / "report.pdf").read_bytes())
    allowed.pages["/app.html"] = ("text/html", ALLOWED_PAGE.format(target=server.base).encode())
    browser.get(f"{allowed.origin}/app.html")
    result = WebDriverWait(browser, 60).until(lambda d: d.execute_script("return window.result"))
    assert result.get("status") == 200, result
    (record,) = result["body"]["records"]
    assert record["answer_source"] == "text_layer" and record["page"] == 1

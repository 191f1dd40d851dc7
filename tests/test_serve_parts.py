"""The parts of `monkey serve` that need no server: streamed text, data URLs, engines sharing one loop, the
package's page, and a light `monkey serve --help`."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from importlib import resources

import pytest
from conftest import SAMPLES_DIR, require_parity

from monkey_cli import Monkey, tasks
from monkey_cli.documents import iter_pages
from monkey_cli.engine import DocumentEnd, Engine, EngineLoop, Job
from monkey_cli.serve.errors import APIError
from monkey_cli.serve.settings import ServeSettings
from monkey_cli.serve.uploads import ImageRef, parse_image_url


@pytest.fixture(scope="module")
def sharp() -> Monkey:
    return Monkey.load(require_parity("tiny-monkey-sharp"), device="cpu", batch_size=2)


# --- streamed text ----------------------------------------------------------------------------------------


def test_streamed_pieces_join_to_the_final_answer(sharp: Monkey) -> None:
    from monkey_cli.serve.service import AnswerText

    tokenizer = sharp.tokenizer
    ranks = range(tokenizer.eod_id)  # the ordinary (BPE) tokens, which is all a model's answer holds
    spaces = [t for t in ranks if tokenizer.decode([t]).isspace()][:20]
    fragments = [t for t in ranks if "\ufffd" in tokenizer.decode([t])][:20]
    assert spaces and fragments, "the vocabulary should have whitespace and partial-character tokens"
    ordinary = list(ranks)
    rng = random.Random(13)
    held_back = 0
    for _ in range(300):
        tokens = [rng.choice(rng.choice([ordinary, ordinary, spaces, fragments])) for _ in range(rng.randint(1, 30))]
        answer = tasks.clean_answer(tokenizer.decode(tokens, skip_special_tokens=True))
        stream = AnswerText(tokenizer)
        pieces = [stream.push(token) for token in tokens]
        assert all(not piece or not piece[-1].isspace() for piece in pieces)  # whitespace waits for more text
        rest = stream.finish(answer)
        assert "".join(pieces) + rest == answer
        held_back += bool(rest)
    assert held_back < 300 // 2, "most answers should be streamed whole before their end"


# --- data URLs --------------------------------------------------------------------------------------------


def test_data_urls_give_their_bytes_and_page() -> None:
    assert parse_image_url("data:image/png;base64,aGVs bG8=\n", "p") == ImageRef(b"hello", 1)
    assert parse_image_url("DATA:application/pdf;BASE64,aGVsbG8=#page=3", "p") == ImageRef(b"hello", 3)
    assert parse_image_url("data:,hello%20there", "p") == ImageRef(b"hello there", 1)
    assert parse_image_url("data:,a", "p").key == parse_image_url("data:;base64,YQ==", "p").key
    assert parse_image_url("data:,a#page=2", "p").key != parse_image_url("data:,a", "p").key


@pytest.mark.parametrize(
    ("url", "code", "words"),
    [
        ("http://127.0.0.1/a.png", "remote_url_refused", "never fetched"),
        ("HTTPS://example.com/a.png", "remote_url_refused", "never fetched"),
        ("ftp://example.com/a.png", "remote_url_refused", "never fetched"),
        ("file:///etc/passwd", "local_path_refused", "never opened"),
        ("/etc/passwd", "local_path_refused", "never opened"),
        ("~/scan.png", "local_path_refused", "never opened"),
        ("scan.png", "local_path_refused", "never opened"),
        ("C:/scans/a.png", "local_path_refused", "never opened"),
        ("\\\\server\\share\\a.png", "local_path_refused", "never opened"),
        ("blob:abc", None, "only data: URLs"),
        ("data:image/png;base64", None, "no ','"),
        ("data:image/png;base64,", None, "holds no data"),
        ("data:image/png;base64,!!!!", "invalid_base64", "base64"),
        ("data:,a#page=0", None, "#page=N"),
        ("data:,a#zoom=2", None, "#page=N"),
    ],
)
def test_anything_but_a_data_url_is_refused(url: str, code: str | None, words: str) -> None:
    with pytest.raises(APIError) as caught:
        parse_image_url(url, "messages.0.content.0.image_url.url")
    assert caught.value.status == 400 and caught.value.code == code
    assert words in caught.value.message and caught.value.param == "messages.0.content.0.image_url.url"


# --- engines sharing one loop -----------------------------------------------------------------------------


def test_documents_on_one_shared_loop_get_their_own_pages(sharp: Monkey) -> None:
    """A server runs many documents' engines on one scheduler: no page may get another document's features
    (the scheduler caches them by image key)."""
    job = Job(task="ask", questions=("What is it?",), max_new_tokens=6, batch_size=2)
    loop = EngineLoop(sharp.scheduler(2))
    try:
        answers = {}
        for name in ("chart.png", "scan.png", "receipt.jpg"):
            engine = Engine(job, load_model=lambda: sharp, model_name="tiny", quant="none", loop=loop)
            pages = iter_pages([SAMPLES_DIR / name], size=sharp.processor.input_size)
            answers[name] = [r.answer for r in engine.run(pages) if not isinstance(r, DocumentEnd)]
    finally:
        loop.close()
    for name, answer in answers.items():
        (page,) = iter_pages([SAMPLES_DIR / name], size=sharp.processor.input_size)
        assert answer == sharp.generate([page.image], [tasks.vqa_prompt("What is it?")], max_new_tokens=6)
    assert len({answer[0] for answer in answers.values()}) == 3


def test_the_streamer_is_told_the_page_and_the_prompt(sharp: Monkey) -> None:
    seen: list[tuple[int, str]] = []

    def streamer(tokenizer, page, prompt):
        seen.append((page.page, prompt))
        return lambda token: None

    job = Job(task="ask", questions=("Who?", "When?"), max_new_tokens=2, batch_size=2)
    engine = Engine(job, load_model=lambda: sharp, model_name="tiny", quant="none", streamer_factory=streamer)
    list(engine.run(iter_pages([SAMPLES_DIR / "report.pdf"], size=sharp.processor.input_size, pages="1-2")))
    assert seen == [(1, "Who?"), (1, "When?"), (2, "Who?"), (2, "When?")]


# --- the package and the command ---------------------------------------------------------------------------


def test_the_web_page_ships_in_the_package() -> None:
    static = resources.files("monkey_cli.serve") / "static"
    page = (static / "index.html").read_text(encoding="utf-8")
    for asset in ("app.js", "style.css"):
        assert f"/static/{asset}" in page and (static / asset).is_file()
    assert "http://" not in page and "https://" not in page, "the page must load nothing from elsewhere"


def test_serve_help_imports_nothing_heavy() -> None:
    code = (
        "import sys\nfrom monkey_cli.cli import main\nsys.argv = ['monkey', 'serve', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'fastapi', 'uvicorn', 'starlette', 'pymupdf') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "--api-key" in result.stdout and "MONKEY_API_KEY" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_settings_are_checked() -> None:
    assert ServeSettings().host == "127.0.0.1"  # loopback unless told otherwise
    for bad in ({"slots": 0}, {"port": 70000}, {"request_timeout": 0}, {"api_key": " "}, {"max_queue": True}):
        with pytest.raises(ValueError):
            ServeSettings(**bad)


# --- the model's life in the app -----------------------------------------------------------------------------


def test_health_says_loading_until_the_model_is_ready(sharp: Monkey) -> None:
    from fastapi.testclient import TestClient

    from monkey_cli.serve.app import create_app
    from monkey_cli.serve.service import ModelService

    gate = threading.Event()

    def slow_load() -> Monkey:
        assert gate.wait(60)
        return sharp

    service = ModelService(ServeSettings(model="tiny", allowed_hosts=("testserver",)), load_model=slow_load)
    with TestClient(create_app(service)) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        refused = client.get("/v1/models")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_loading"
        gate.set()
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ready = client.get("/health").json()
        assert ready["status"] == "ready" and ready["slots"] == sharp.batch_size and ready["pending"] == 0
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_a_model_that_fails_to_load_is_reported_and_stops_the_server() -> None:
    from fastapi.testclient import TestClient

    from monkey_cli.errors import CheckpointError
    from monkey_cli.serve.app import create_app
    from monkey_cli.serve.service import ModelService

    failures: list[BaseException] = []

    def broken() -> Monkey:
        raise CheckpointError("model.safetensors is truncated")

    service = ModelService(ServeSettings(model="tiny", allowed_hosts=("testserver",)), load_model=broken)
    with TestClient(create_app(service, on_load_failure=failures.append)) as client:
        deadline = time.monotonic() + 30
        while not failures:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        failed = client.get("/health")
        assert failed.status_code == 503 and failed.json()["status"] == "failed"
        error = client.get("/v1/models").json()["error"]
        assert error["code"] == "model_unavailable" and "truncated" not in error["message"]
    assert isinstance(failures[0], CheckpointError)


def test_an_unexpected_error_is_a_json_500_that_names_nothing_internal(caplog) -> None:
    from fastapi.testclient import TestClient

    from monkey_cli.serve.app import create_app
    from monkey_cli.serve.service import ModelService

    settings = ServeSettings(model="tiny", allowed_hosts=("testserver",))  # the TestClient's Host header
    service = ModelService(settings, load_model=lambda: (_ for _ in ()).throw(MemoryError()))

    def broken_health() -> dict:
        raise RuntimeError("/srv/monkey/secret.py: state corrupted")

    service.health = broken_health
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        response = client.get("/health")
    assert response.status_code == 500
    assert response.json()["error"] == {
        "message": "internal error (see the server's log)", "type": "server_error", "param": None,
        "code": "internal_error",
    }  # fmt: skip
    assert "secret" not in response.text and "Traceback" not in response.text
    assert any("state corrupted" in record.getMessage() for record in caplog.records)  # the log says what


# --- /health without the key, and the access log ----------------------------------------------------------

KEY = "k3y-Secret-42"


def _ready(client, headers: dict | None = None) -> None:
    deadline = time.monotonic() + 60
    while client.get("/health", headers=headers or {}).status_code != 200:
        assert time.monotonic() < deadline, "the model did not become ready"
        time.sleep(0.05)


def test_health_answers_liveness_without_the_key_and_keeps_the_details_behind_it(sharp: Monkey) -> None:
    """A load balancer's probe needs no key: it learns whether the server is up, and nothing else (not the
    model, not the queue, not what the engine has done); the key gives the details."""
    from fastapi.testclient import TestClient

    from monkey_cli.serve.app import create_app
    from monkey_cli.serve.service import ModelService

    gate = threading.Event()
    settings = ServeSettings(model="forms", api_key=KEY, allowed_hosts=("testserver",))
    service = ModelService(settings, load_model=lambda: (gate.wait(60), sharp)[1])
    key = {"Authorization": f"Bearer {KEY}"}
    with TestClient(create_app(service)) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json() == {"status": "loading", "key_required": True}
        gate.set()
        _ready(client)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            anonymous = client.get("/health", headers=headers)
            assert anonymous.status_code == 200 and anonymous.json() == {"status": "ready", "key_required": True}
        detailed = client.get("/health", headers=key).json()
        assert detailed["model"] == "forms" and detailed["engine"]["decode_steps"] >= 0  # the engine's counters
        assert "key_required" not in detailed
        assert detailed["max_new_tokens"] == settings.max_new_tokens and detailed["adapter_sha256"] is None
        assert client.get("/v1/models").status_code == 401  # everything else still needs the key
    open_service = ModelService(ServeSettings(model="tiny", allowed_hosts=("testserver",)), load_model=lambda: sharp)
    with TestClient(create_app(open_service)) as client:  # a server without a key: the details for everyone
        _ready(client)
        assert client.get("/health").json()["model"] == "tiny"


def test_the_access_log_has_a_line_per_request_and_no_secret(sharp: Monkey, caplog) -> None:
    """Method, path, status, milliseconds and bytes for every request, refused ones included; never the query
    string, the key or a body."""
    import logging
    import re

    from fastapi.testclient import TestClient

    from monkey_cli.serve.app import create_app
    from monkey_cli.serve.service import ModelService

    settings = ServeSettings(model="tiny", api_key=KEY, allowed_hosts=("testserver",))
    service = ModelService(settings, load_model=lambda: sharp)
    key = {"Authorization": f"Bearer {KEY}"}
    with TestClient(create_app(service)) as client:
        _ready(client)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="monkey_cli.serve"):
            responses = [
                ("GET", "/health", client.get("/health?token=QuerySecret", headers=key)),
                ("GET", "/v1/models", client.get("/v1/models?api_key=QuerySecret")),  # 401
                ("POST", "/v1/documents", client.post("/v1/documents", headers=key, data={"question": "BodySecret"},
                                                      files={"file": ("a.txt", b"FileSecret plain text")})),
                ("GET", "/static/app.js", client.get("/static/app.js")),
                ("GET", "/nowhere", client.get("/nowhere", headers=key)),
            ]  # fmt: skip
    lines = [record.getMessage() for record in caplog.records if re.match(r"(GET|POST) /", record.getMessage())]
    assert len(lines) == len(responses), lines
    for line, (method, path, response) in zip(lines, responses, strict=True):
        assert line == f"{method} {path} {response.status_code} {line.split()[3]} ms {len(response.content)} bytes"
    assert [response.status_code for *_, response in responses] == [200, 401, 400, 200, 404]
    everything = "\n".join(record.getMessage() for record in caplog.records)
    for secret in ("QuerySecret", "BodySecret", "FileSecret", KEY, "token=", "api_key="):
        assert secret not in everything
    quiet = ModelService(ServeSettings(model="tiny", allowed_hosts=("testserver",), access_log=False),
                         load_model=lambda: sharp)  # fmt: skip
    with TestClient(create_app(quiet)) as client:
        _ready(client)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="monkey_cli.serve"):
            client.get("/health")
    assert not [r for r in caplog.records if r.getMessage().startswith("GET /health")]  # --no-access-log

"""`monkey serve` with the official OpenAI client, live on 127.0.0.1: the same answers as `monkey ask`, streamed
or not, the right usage, PDFs, the CLI's records from /v1/documents, and 32 clients at once batched together."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from conftest import REPO_ROOT, SAMPLES_DIR
from serve_helpers import LiveServer, data_url, image_message, monkey_cli

from monkey_cli import tasks
from monkey_cli.model.tokenizer import QWenTokenizer

MAX_TOKENS = 12
QUESTIONS = ("What is the title?", "Who wrote it?")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_sharp_dir: Path):
    live = LiveServer(
        tmp_path_factory.mktemp("serve-api"),
        "--model", str(tiny_sharp_dir), "--batch-size", "8", "--max-new-tokens", "24",
    )  # fmt: skip
    try:
        yield live.start()
    finally:
        live.stop()


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def cli_records(tiny_sharp_dir: Path) -> dict[tuple[str, int, str], dict]:
    """`monkey ask chart.png report.pdf -q ... -q ... -f json`: the records by (source, page, question)."""
    result = monkey_cli(
        "ask", "chart.png", "report.pdf", *(arg for q in QUESTIONS for arg in ("-q", q)),
        "--model", str(tiny_sharp_dir), "--device", "cpu", "--max-new-tokens", str(MAX_TOKENS), "-f", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    return {(r["source"], r["page"], r["prompt"]): r for r in document["records"]}


def _prompt_tokens(model_dir: Path, question: str) -> int:
    tokenizer = QWenTokenizer.from_dir(model_dir)
    prompt = tasks.vqa_prompt(question)
    return len(tokenizer.encode_prompt(prompt.before, prompt.after))


def _ask(client: openai.OpenAI, url: str, question: str, **options) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model="monkey", messages=[image_message(url, question)], max_tokens=MAX_TOKENS, **options
    )


def test_a_chat_completion_answers_as_monkey_ask(client, cli_records, tiny_sharp_dir) -> None:
    completion = _ask(client, data_url(SAMPLES_DIR / "chart.png"), QUESTIONS[0])
    expected = cli_records[("chart.png", 1, QUESTIONS[0])]["answer"]
    assert expected.strip(), "the CLI's answer should not be empty, or the comparison proves little"
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].message.role == "assistant"
    usage = completion.usage
    assert usage.prompt_tokens == _prompt_tokens(tiny_sharp_dir, QUESTIONS[0])
    assert usage.prompt_tokens > 1280  # the image's positions are part of the prompt
    assert 1 <= usage.completion_tokens <= MAX_TOKENS
    assert (usage.completion_tokens == MAX_TOKENS) == (completion.choices[0].finish_reason == "length")
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streaming_yields_the_same_text_token_by_token(client) -> None:
    url = data_url(SAMPLES_DIR / "chart.png")
    whole = _ask(client, url, QUESTIONS[0])
    stream = _ask(client, url, QUESTIONS[0], stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert len(pieces) > 2, "the answer should come in several pieces"
    assert finish == whole.choices[0].finish_reason
    assert usage == whole.usage


def test_pdf_pages_as_the_cli_reads_them(client, cli_records) -> None:
    pdf = SAMPLES_DIR / "report.pdf"
    first = _ask(client, data_url(pdf, "application/pdf"), QUESTIONS[1])
    second = _ask(client, data_url(pdf, "application/pdf", page=2), QUESTIONS[1])
    assert first.choices[0].message.content == cli_records[("report.pdf", 1, QUESTIONS[1])]["answer"]
    assert second.choices[0].message.content == cli_records[("report.pdf", 2, QUESTIONS[1])]["answer"]
    with pytest.raises(openai.BadRequestError, match="the document has 3 pages"):
        _ask(client, data_url(pdf, "application/pdf", page=9), QUESTIONS[1])


def test_models_lists_the_loaded_model(client, tiny_sharp_dir) -> None:
    models = client.models.list()
    name = tiny_sharp_dir.name  # a local folder is named by its name alone, never by its path
    assert [model.id for model in models.data] == [name]
    assert client.models.retrieve(name).id == name


def test_a_follow_up_question_reuses_the_page_features(client, server) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.effect_noise((300, 200), 60).convert("RGB").save(buffer, format="PNG")  # an image no other test sends
    url = "data:image/png;base64," + __import__("base64").b64encode(buffer.getvalue()).decode()
    before = server.health()["engine"]
    first = _ask(client, url, "What is in the picture?")
    middle = server.health()["engine"]
    conversation = [
        image_message(url, "What is in the picture?"),
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And what colour is it?"},
    ]
    follow_up = client.chat.completions.create(model="monkey", messages=conversation, max_tokens=MAX_TOKENS)
    after = server.health()["engine"]
    assert middle["images_encoded"] == before["images_encoded"] + 1
    assert after["images_encoded"] == middle["images_encoded"], "the follow-up should reuse the page's features"
    # The turns rule (docs/serve.md): earlier turns become plain-text lines before the question.
    rule = f"User: What is in the picture?\nAssistant: {first.choices[0].message.content}\nAnd what colour is it?"
    alone = _ask(client, url, rule)
    assert follow_up.choices[0].message.content == alone.choices[0].message.content


def _documents(server: LiveServer, path: Path, questions=QUESTIONS, **fields) -> httpx.Response:
    files = {"file": (path.name, path.read_bytes(), "application/octet-stream")}
    data = {"question": list(questions), "max_tokens": str(MAX_TOKENS), **fields}
    return httpx.post(f"{server.base}/v1/documents", files=files, data=data, timeout=300)


def _without_seconds(document: dict) -> dict:
    return {**document, "records": [{**r, "seconds": None} for r in document["records"]]}


def test_documents_returns_the_records_of_monkey_ask_format_json(server, cli_records) -> None:
    response = _documents(server, SAMPLES_DIR / "report.pdf")
    assert response.status_code == 200, response.text
    document = response.json()
    expected = [r for key, r in cli_records.items() if key[0] == "report.pdf"]
    assert document["schema_version"] == 2 and document["tool"]["name"] == "monkey-cli"
    # The server names a local --model folder by its name alone (its path is none of a client's business).
    shown = [{**r, "seconds": None, "model": r["model"] and Path(r["model"]).name} for r in expected]
    assert _without_seconds(document)["records"] == shown
    assert len(document["records"]) == 3 * len(QUESTIONS)


def test_documents_streams_answers_then_the_same_document(server) -> None:
    events = []
    files = {"file": ("report.pdf", (SAMPLES_DIR / "report.pdf").read_bytes())}
    data = {"question": list(QUESTIONS), "max_tokens": str(MAX_TOKENS), "pages": "2-3", "stream": "true"}
    with httpx.stream("POST", f"{server.base}/v1/documents", files=files, data=data, timeout=300) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
            elif line == "data: [DONE]":
                events.append("[DONE]")
    assert events[-1] == "[DONE]" and events[-2]["type"] == "done"
    streamed: dict[tuple[int, str], str] = {}
    for event in events[:-2]:
        if event["type"] == "delta":
            key = (event["page"], event["prompt"])
            streamed[key] = streamed.get(key, "") + event["text"]
    records = [event["record"] for event in events[:-2] if event["type"] == "record"]
    assert [(r["page"], r["prompt"]) for r in records] == [(p, q) for p in (2, 3) for q in QUESTIONS]
    for record in records:
        assert streamed[(record["page"], record["prompt"])] == record["answer"]
    assert events[-2]["document"]["records"] == records
    plain = _documents(server, SAMPLES_DIR / "report.pdf", pages="2-3").json()
    assert _without_seconds(plain) == _without_seconds(events[-2]["document"])


def _burst_requests() -> list[tuple[str, str]]:
    """32 requests: 8 pages (images, TIFF frames, PDF pages) x 4 questions."""
    pages = [
        data_url(SAMPLES_DIR / "chart.png"),
        data_url(SAMPLES_DIR / "scan.png"),
        data_url(SAMPLES_DIR / "receipt.jpg", "image/jpeg"),
        data_url(SAMPLES_DIR / "forms.tif", "image/tiff", page=2),
        data_url(SAMPLES_DIR / "forms.tif", "image/tiff", page=3),
        data_url(SAMPLES_DIR / "invoice.pdf", "application/pdf"),
        data_url(SAMPLES_DIR / "report.pdf", "application/pdf", page=2),
        data_url(SAMPLES_DIR / "report.pdf", "application/pdf", page=3),
    ]
    questions = ("What is the total?", "Who signed it?", "What is the date?", "Describe it.")
    return [(page, question) for page in pages for question in questions]


def test_32_concurrent_requests_are_answered_together_each_as_alone(client, server) -> None:
    requests = _burst_requests()
    alone = [_ask(client, url, question).choices[0].message.content for url, question in requests]
    assert len(set(alone)) > 8, "answers should differ, or the comparison proves little"
    before = server.health()["engine"]
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        answers = list(pool.map(lambda request: _ask(client, *request), requests))
    after = server.health()["engine"]
    assert [answer.choices[0].message.content for answer in answers] == alone
    tokens = sum(answer.usage.completion_tokens for answer in answers)
    steps = after["decode_steps"] - before["decode_steps"]
    # One at a time, every token after the first is a decode step of its own; together they share steps.
    assert steps < (tokens - len(requests)) / 2, (steps, tokens)
    assert after["busiest_step"] > 4
    assert after["vision_passes"] - before["vision_passes"] < len(requests)
    assert server.health()["pending"] == 0


def test_the_load_benchmark_loses_and_fails_nothing(server, tmp_path) -> None:
    report = tmp_path / "load.json"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "serve.py"), "--url", server.base, "--clients", "4",
         "--seconds", "4", "--max-tokens", "6", "--json", str(report)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads(report.read_text())
    assert figures["failed"] == 0 and figures["lost"] == 0
    assert figures["completed"] >= 4
    latency = figures["latency_s"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]

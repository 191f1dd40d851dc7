"""Structured outputs and `POST /v1/extract` on one live `monkey serve` (the tiny sharp checkpoint, random weights:
its free answers are gibberish, so every shape asserted here is the grammar's doing), with the official OpenAI
client and the exact request shapes docling's and marker's OpenAI-compatible backends send.

- response_format json_schema: the answers parse and validate for several schemas; `parse()` with a pydantic
  model returns its instance; streaming with include_usage; a strict schema the grammar cannot enforce is a 400.
- logprobs / top_logprobs: the engine's own (the same request run in this process), and the model's (a
  teacher-forced float32 forward pass of the same tokens, within 1e-4), streamed too.
- n (greedy: n identical choices; sampled: seeded, each its own stream), stop (the content cut before it).
- The turns rule (system text and earlier turns as plain text before the question).
- docling (its `api_image_request` payloads, plain and streamed) and marker (`beta.chat.completions.parse` with
  a WEBP image and a pydantic schema; its text-only and two-image calls are 400s).
- /v1/extract equals `monkey extract -f json` on the same document and schema, multipart or JSON; its limits.

Schemas bound their strings (maxLength) and numbers (bounds, multipleOf): random weights never end a free
string by themselves, and an answer cut at max_tokens is `finish_reason: "length"` (docs/serve.md).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
import requests
import torch
from conftest import SAMPLES_DIR
from pydantic import BaseModel, Field
from serve_helpers import LiveServer, data_url, image_message, monkey_cli

from monkey_cli import Monkey, tasks
from monkey_cli.documents import load_documents
from monkey_cli.engine import GenerationRequest, SamplingParams

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 160  # the server's --max-new-tokens: room for the schemas' answers
QUESTION = "What is the title?"
CHART = SAMPLES_DIR / "chart.png"
LOGPROB_ATOL = 1e-4  # the server's engine (prefix prefill, static decode step) vs one eager forward pass
ENGINE_ATOL = 1e-5  # the server's engine vs the same engine in this process

INVOICE = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string", "maxLength": 16},
        "total": {"type": "number", "minimum": 0, "maximum": 10000, "multipleOf": 0.01},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "paid": {"type": "boolean"},
        "status": {"enum": ["paid", "unpaid", "overdue"]},
        "tags": {"type": "array", "items": {"enum": ["food", "fuel", "tax"]}, "maxItems": 3},
        "issued": {"type": "string", "format": "date"},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "note": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]},
    },
    "required": ["vendor", "total", "count", "paid", "status", "tags", "issued", "code", "note"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "header": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 10},
                                                    "page": {"type": "integer", "minimum": 1, "maximum": 9}},
                   "required": ["title", "page"], "additionalProperties": False},
        "rows": {"type": "array", "maxItems": 2, "items": {
            "type": "object", "properties": {"label": {"enum": ["a", "b"]}, "value": {"type": "integer", "minimum": 0,
                                                                                     "maximum": 9}},
            "required": ["label", "value"], "additionalProperties": False}},
    },
    "required": ["header", "rows"],
    "additionalProperties": False,
}  # fmt: skip
FLAGS = {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 4}


class Receipt(BaseModel):
    shop: str = Field(max_length=12)
    items: int = Field(ge=0, le=99)
    paid: bool
    kind: Literal["invoice", "receipt"]
    tags: list[Literal["food", "drink"]] = Field(max_length=3)
    note: str | None = Field(max_length=10)


class MergeSchema(BaseModel):
    """marker's llm_table_merge schema, its free strings bounded (random weights would never end them)."""

    table1_description: str = Field(max_length=16)
    table2_description: str = Field(max_length=16)
    explanation: str = Field(max_length=16)
    merge: Literal["true", "false"]
    direction: Literal["bottom", "right"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_sharp_dir: Path):
    live = LiveServer(
        tmp_path_factory.mktemp("serve-structured"),
        "--model", str(tiny_sharp_dir), "--batch-size", "4", "--max-new-tokens", str(MAX_NEW_TOKENS),
        "--max-pages", "3", "--max-questions", "6", "--max-answers", "12",
    )  # fmt: skip
    try:
        yield live.start()
    finally:
        live.stop()


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def sharp(tiny_sharp_dir: Path) -> Monkey:
    return Monkey.load(tiny_sharp_dir, device="cpu", batch_size=1)


def _ask(client: openai.OpenAI, question: str = QUESTION, url: str | None = None, **options: Any) -> Any:
    return client.chat.completions.create(
        model="monkey", messages=[image_message(url or data_url(CHART), question)], **options
    )


def _json_format(schema: dict, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}


def _validate(text: str, schema: dict) -> Any:
    value = json.loads(text)
    jsonschema.validate(value, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    return value


def _stream(client: openai.OpenAI, **options: Any) -> tuple[dict[int, str], dict[int, str], Any, list]:
    """A streamed completion: each choice's text and finish reason, the usage, and the chunks."""
    chunks = list(_ask(client, stream=True, **options))
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return texts, finish, usage, chunks


# --- response_format -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("schema", [INVOICE, NESTED, FLAGS], ids=["invoice", "nested", "array"])
def test_json_schema_answers_parse_and_validate(client, schema: dict) -> None:
    for image in (CHART, SAMPLES_DIR / "receipt.jpg"):
        url = data_url(image, "image/jpeg" if image.suffix == ".jpg" else "image/png")
        completion = _ask(client, "What does it say?", url, response_format=_json_format(schema))
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        _validate(choice.message.content, schema)


def test_json_object_and_a_schema_that_is_not_strict(client) -> None:
    loose = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3,
             "uniqueItems": True}  # fmt: skip
    with pytest.raises(openai.BadRequestError) as refused:
        _ask(client, response_format=_json_format(loose))
    assert refused.value.body["code"] == "invalid_schema" and "uniqueItems" in refused.value.body["message"]
    answer = _ask(client, response_format=_json_format(loose, strict=False)).choices[0]
    assert answer.finish_reason == "stop"
    _validate(answer.message.content, {k: v for k, v in loose.items() if k != "uniqueItems"})
    anything = _ask(client, response_format={"type": "json_object"}, max_tokens=6).choices[0]
    assert anything.message.content.startswith("{"), "a JSON object, cut at max_tokens"


def test_parse_with_a_pydantic_model_returns_its_instance(client) -> None:
    messages = [image_message(data_url(SAMPLES_DIR / "receipt.jpg", "image/jpeg"), "What is on the receipt?")]
    parsed = client.chat.completions.parse(model="monkey", messages=messages, response_format=Receipt)
    beta = client.beta.chat.completions.parse(model="monkey", messages=messages, response_format=Receipt)
    for completion in (parsed, beta):
        assert isinstance(completion.choices[0].message.parsed, Receipt)
    assert beta.choices[0].message.parsed == parsed.choices[0].message.parsed, "greedy: the same answer"


def test_a_streamed_json_answer_with_usage_equals_the_answer(client) -> None:
    whole = _ask(client, response_format=_json_format(INVOICE))
    texts, finish, usage, chunks = _stream(client, response_format=_json_format(INVOICE),
                                           stream_options={"include_usage": True})  # fmt: skip
    assert texts[0] == whole.choices[0].message.content and finish[0] == "stop"
    assert usage == whole.usage and chunks[-1].choices == [] and chunks[-1].usage == usage
    assert sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].delta.content) > 3


# --- logprobs ------------------------------------------------------------------------------------------------


def _engine_answer(sharp: Monkey, question: str, max_tokens: int, top: int) -> tuple[Any, list[int], Any]:
    page = load_documents([CHART], size=sharp.processor.input_size)[0]
    prompt = sharp.check_prompt(tasks.vqa_prompt(question), max_tokens)
    params = SamplingParams(max_new_tokens=max_tokens, top_logprobs=top)
    (result,) = sharp.scheduler(1).run([GenerationRequest(prompt, image=page.image, params=params)])
    return result, prompt, page


def _teacher_forced(sharp: Monkey, page: Any, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    features = sharp.encode_images([page.image])
    alpha = sharp.model.transformer.ntk_alpha_for(len(prompt))
    with torch.inference_mode():
        logits = sharp.model(input_ids=torch.tensor([prompt + tokens]), image_embeds=features, ntk_alphas=[alpha],
                             use_cache=False).logits[0].float()  # fmt: skip
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(tokens))
    return torch.log_softmax(logits, dim=-1)[positions, torch.tensor(tokens)]


def test_logprobs_are_the_engines_and_the_models_own(client, sharp: Monkey) -> None:
    completion = _ask(client, max_tokens=10, logprobs=True, top_logprobs=3)
    content = completion.choices[0].logprobs.content
    result, prompt, page = _engine_answer(sharp, QUESTION, 10, 3)
    tokenizer = sharp.tokenizer
    assert [bytes(entry.bytes or b"") for entry in content] == [tokenizer.token_bytes(t) for t in result.token_ids]
    assert len(content) == completion.usage.completion_tokens == len(result.token_ids)
    got = torch.tensor([entry.logprob for entry in content])
    assert (got - torch.tensor(result.logprobs)).abs().max().item() <= ENGINE_ATOL
    forced = _teacher_forced(sharp, page, prompt, result.token_ids)
    assert (got - forced).abs().max().item() <= LOGPROB_ATOL
    for entry, best in zip(content, result.top_logprobs, strict=True):
        assert [bytes(top.bytes or b"") for top in entry.top_logprobs] == [tokenizer.token_bytes(t) for t, _ in best]
        assert [top.logprob for top in entry.top_logprobs] == pytest.approx([lp for _, lp in best], abs=ENGINE_ATOL)
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6), "greedy: the best token"
    # streamed: one chunk per token, the same entries
    _texts, _finish, _usage, chunks = _stream(client, max_tokens=10, logprobs=True, top_logprobs=3)
    streamed = [entry for chunk in chunks for choice in chunk.choices if choice.logprobs
                for entry in choice.logprobs.content]  # fmt: skip
    assert streamed == content


# --- n, seed, stop -------------------------------------------------------------------------------------------


def test_greedy_choices_are_all_the_same_answer(client) -> None:
    one = _ask(client, max_tokens=12)
    three = _ask(client, max_tokens=12, n=3)
    assert [choice.index for choice in three.choices] == [0, 1, 2]
    assert {choice.message.content for choice in three.choices} == {one.choices[0].message.content}
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens


def test_sampled_choices_are_seeded_streams_of_their_own(client) -> None:
    options = {"max_tokens": 10, "temperature": 1.0, "seed": 11}
    three = [choice.message.content for choice in _ask(client, n=3, **options).choices]
    assert len(set(three)) > 1, "each choice samples its own stream"
    assert [choice.message.content for choice in _ask(client, n=3, **options).choices] == three, "seeded: repeats"
    assert _ask(client, **options).choices[0].message.content == three[0], "choice 0 is the n=1 answer"
    texts, _finish, _usage, _chunks = _stream(client, n=2, **options)
    assert [texts[0], texts[1]] == three[:2]


def test_stop_cuts_the_answer_before_the_stop_string(client) -> None:
    free = _ask(client, max_tokens=24).choices[0].message.content
    start = next(i for i in range(4, len(free) - 3) if free[i:i + 3].strip() == free[i:i + 3]
                 and "\ufffd" not in free[i:i + 3] and free.find(free[i:i + 3]) == i)  # fmt: skip
    stop = free[start : start + 3]
    cut = _ask(client, max_tokens=24, stop=["\u2603 never", stop])
    assert cut.choices[0].message.content == free[:start].rstrip() and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 24
    texts, finish, _usage, _chunks = _stream(client, max_tokens=24, stop=stop)
    assert texts[0] == free[:start].rstrip() and finish[0] == "stop"
    with pytest.raises(openai.BadRequestError, match="stop"):
        _ask(client, max_tokens=4, stop=["a", "b", "c", "d", "e"])


# --- what is refused, what is kept ---------------------------------------------------------------------------


def test_fields_it_cannot_honour_are_400s_and_ignorable_ones_are_accepted(client) -> None:
    accepted = _ask(client, max_tokens=2, user="someone", metadata={"job": "7"}, store=False, tools=[],
                    presence_penalty=0, max_completion_tokens=2)  # fmt: skip
    assert accepted.choices[0].message.content is not None
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    for options, param in (({"tools": [tool]}, "tools"), ({"logit_bias": {"5": 1}}, "logit_bias"),
                           ({"extra_body": {"guided_json": {}}}, "guided_json"),
                           ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as refused:
            _ask(client, **options)
        assert refused.value.body["param"] == param


def test_system_text_and_earlier_turns_are_kept_as_the_rule_says(client) -> None:
    url = data_url(CHART)
    first = _ask(client, max_tokens=6).choices[0].message.content
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        image_message(url, QUESTION),
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Who made it?"},
    ]
    turns = client.chat.completions.create(model="m", messages=conversation, max_tokens=8)
    rule = f"Answer briefly.\nUser: {QUESTION}\nAssistant: {first}\nWho made it?"
    assert turns.choices[0].message.content == _ask(client, rule, url, max_tokens=8).choices[0].message.content
    assert turns.usage.prompt_tokens == _ask(client, rule, url, max_tokens=1).usage.prompt_tokens


# --- docling's and marker's clients --------------------------------------------------------------------------


def _docling_png() -> str:
    """docling's `api_image_request`: the page image converted to RGBA, saved as PNG, base64."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(CHART).convert("RGBA").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("utf-8")


def _docling_messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_docling_png()}"}},
        {"type": "text", "text": prompt},
    ]}]  # fmt: skip


def test_docling_requests_are_answered_as_the_openai_client_is(server, client) -> None:
    url = f"{server.base}/v1/chat/completions"
    prompt = "Convert this page to docling."
    expected = _ask(client, prompt, max_tokens=MAX_NEW_TOKENS).choices[0].message.content
    # ApiVlmEngine with GRANITEDOCLING_VLLM_API: the spec's params, the request's temperature and max_tokens, stop
    vlm = {"messages": _docling_messages(prompt), "model": "ibm-granite/granite-docling-258M", "max_tokens": 8192,
           "skip_special_tokens": True, "temperature": 0.0, "stop": ["</doctag>", "<|end_of_text|>"]}  # fmt: skip
    answer = requests.post(url, headers={}, json=vlm, timeout=300)
    assert answer.ok, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == expected
    # PictureDescriptionApi's documented params (vLLM): model and max_completion_tokens only
    picture = {"messages": _docling_messages(prompt), "model": "HuggingFaceTB/SmolVLM-256M-Instruct",
               "max_completion_tokens": 200}  # fmt: skip
    assert requests.post(url, json=picture, timeout=300).json()["choices"][0]["message"]["content"] == expected
    # api_image_request_streaming: stream, its headers, and its way of reading the events
    headers = {"Accept": "text/event-stream", "X-Temperature": "0.0"}
    pieces = []
    with requests.post(url, headers=headers, json={**vlm, "stream": True}, timeout=300, stream=True) as response:
        response.raise_for_status()
        for line in response.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                break
            choices = json.loads(data)["choices"]
            pieces.append((choices[0].get("delta") or {}).get("content") or "" if choices else "")
    assert "".join(pieces) == expected


def _webp(path: Path) -> str:
    """marker's `img_to_base64`: WEBP bytes whatever the URL's media type says."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(path).save(buffer, format="WEBP")
    return base64.b64encode(buffer.getvalue()).decode("utf-8")


def test_marker_requests_parse_into_its_schema(server) -> None:
    client = openai.OpenAI(api_key="unused", base_url=f"{server.base}/v1", max_retries=0)  # marker's get_client()
    prompt = "Should these two tables be merged?"

    def call(images: list[str], image_format: str = "webp") -> Any:
        parts = [{"type": "image_url", "image_url": {"url": f"data:image/{image_format};base64,{image}"}}
                 for image in images]  # fmt: skip
        return client.beta.chat.completions.parse(
            extra_headers={"X-Title": "Marker", "HTTP-Referer": "https://github.com/datalab-to/marker"},
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}],
            timeout=300,
            response_format=MergeSchema,
        )

    table = _webp(SAMPLES_DIR / "scan.png")
    response = call([table])
    assert isinstance(response.choices[0].message.parsed, MergeSchema)
    assert MergeSchema.model_validate(json.loads(response.choices[0].message.content))  # what marker reads
    assert response.usage.total_tokens > 1280
    # openai_image_format="png": the URL says PNG, the bytes are still WEBP (sniffed, as every upload)
    assert call([table], "png").choices[0].message.content == response.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="no image"):  # marker's extractors send no image
        call([])
    with pytest.raises(openai.BadRequestError, match="2 different images"):  # its table merge sends two
        call([table, _webp(CHART)])


# --- POST /v1/extract ----------------------------------------------------------------------------------------

EXTRACT_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 30, "description": "What is the title?"},
        "year": {"type": "integer"},
        "total": {"type": "number", "description": "What is the total?"},
        "kind": {"enum": ["report", "invoice"]},
        "signed": {"type": "boolean", "description": "Is it signed?"},
    },
    "required": ["kind"],
}
EXTRACT_OPTIONS = {"pages": "1-2", "min_confidence": "0.5", "all_pages": "true", "max_tokens": "24"}


def _extract(server: LiveServer, path: Path | None = None, schema: Any = EXTRACT_SCHEMA, **data: Any) -> Any:
    files = {} if path is None else {"file": (path.name, path.read_bytes())}
    if schema is not None:
        files["schema"] = ("schema.json", json.dumps(schema).encode())  # a file part, as curl -F schema=@s.json
    return httpx.post(f"{server.base}/v1/extract", files=files, data=data, timeout=300)


def _without_seconds(document: dict) -> dict:
    return {**document, "records": [{**r, "seconds": None} for r in document["records"]]}


def test_extract_returns_the_record_of_monkey_extract(server, tiny_sharp_dir: Path, tmp_path: Path) -> None:
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(EXTRACT_SCHEMA))
    cli = monkey_cli(
        "extract", "report.pdf", "--schema", str(schema_file), "--model", str(tiny_sharp_dir), "--device", "cpu",
        "--max-new-tokens", "24", "--pages", "1-2", "--min-confidence", "0.5", "--all-pages", "-f", "json",
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)
    expected["records"] = [{**r, "model": Path(r["model"]).name} for r in expected["records"]]  # no server path
    assert expected["records"][0]["candidates"] and expected["records"][0]["needs_review"] is not None

    response = _extract(server, SAMPLES_DIR / "report.pdf", **EXTRACT_OPTIONS)
    assert response.status_code == 200, response.text
    assert _without_seconds(response.json()) == _without_seconds(expected)
    files = {"file": ("report.pdf", (SAMPLES_DIR / "report.pdf").read_bytes())}
    data = {**EXTRACT_OPTIONS, "schema": json.dumps(EXTRACT_SCHEMA)}  # a text field, as curl -F 'schema={...}'
    as_text = httpx.post(f"{server.base}/v1/extract", files=files, data=data, timeout=300)
    assert _without_seconds(as_text.json()) == _without_seconds(expected)
    pdf = base64.b64encode((SAMPLES_DIR / "report.pdf").read_bytes()).decode()
    body = {"document": f"data:application/pdf;base64,{pdf}", "name": "report.pdf", "schema": EXTRACT_SCHEMA,
            **{**EXTRACT_OPTIONS, "min_confidence": 0.5, "all_pages": True, "max_tokens": 24}}  # fmt: skip
    as_json = httpx.post(f"{server.base}/v1/extract", json=body, timeout=300)
    assert as_json.status_code == 200, as_json.text
    assert _without_seconds(as_json.json()) == _without_seconds(expected)


def _four_pages(tmp_path: Path) -> Path:
    import pymupdf

    document = pymupdf.open()
    for number in range(4):
        document.new_page().insert_text((72, 72), f"page {number + 1}")
    path = tmp_path / "four.pdf"
    document.save(path)
    return path


def test_extract_refuses_bad_requests_before_any_work(server, tmp_path: Path) -> None:
    report, seven = SAMPLES_DIR / "report.pdf", [f"f{i}:integer" for i in range(7)]
    cases = [
        (_extract(server, _four_pages(tmp_path)), 400, "too_many_pages", "pages"),
        (_extract(server, report, pages="1-3"), 400, "too_many_answers", "pages"),  # 3 pages x 5 fields > 12
        (_extract(server, report, schema=None, field=seven), 400, "too_many_questions", "field"),
        (_extract(server, report, schema={"type": "object"}), 400, "invalid_schema", "schema"),
        (_extract(server, report, schema=None, field=["total:nope"]), 400, "invalid_schema", "field"),
        (_extract(server, report, schema=None), 400, "missing_schema", "schema"),
        (_extract(server, SAMPLES_DIR / "../README.md"), 400, "invalid_document", "file"),
        (_extract(server, report, min_confidence="2"), 400, None, "min_confidence"),
        (_extract(server, report, colour="red"), 400, "unsupported_parameter", "colour"),
        (_extract(server, None), 400, None, "file"),
        (httpx.post(f"{server.base}/v1/extract", json={"document": "https://example.com/a.pdf", "field": ["a"]}),
         400, "remote_url_refused", "document"),
        (httpx.post(f"{server.base}/v1/extract", content=b"x", headers={"Content-Type": "text/plain"}),
         415, "unsupported_media_type", None),
    ]  # fmt: skip
    for response, status, code, param in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert (error["code"], error["param"]) == (code, param), error
        assert "Traceback" not in response.text
    assert server.health()["status"] == "ready"

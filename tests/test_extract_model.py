"""monkey extract on the tiny random-weight checkpoints (CPU): their free answers are gibberish, so everything
asserted here about the shape of the values is the grammar's doing, not the weights'.

Relies on the engine's interface only (`GenerationRequest.constraint`, `GenerationResult.logprobs`,
`stop_logprob`): log-probabilities are checked against a teacher-forced float32 forward pass of the same tokens
(the model's eager `forward`, not the engine), within 1e-4.
"""

from __future__ import annotations

import datetime
import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import SAMPLES_DIR, require_parity
from test_extract import ALL_TYPES
from typer.testing import CliRunner

import monkey_cli.api
from monkey_cli import Monkey, tasks
from monkey_cli.cli import _register_commands, app
from monkey_cli.documents import load_documents
from monkey_cli.engine import EngineLoop, GenerationRequest, SamplingParams
from monkey_cli.engine.scheduler import Scheduler
from monkey_cli.extract import NOT_FOUND, ExtractOptions, coerce_schema, extract_pages
from monkey_cli.extract.constraint import CompiledGrammar, ForcedTokens, llguidance_tokenizer
from monkey_cli.extract.extractor import Extractor
from monkey_cli.output import answer_confidence

_register_commands()
RUNNER = CliRunner()
IMAGES = [SAMPLES_DIR / "scan.png", SAMPLES_DIR / "chart.png", SAMPLES_DIR / "receipt.jpg"]
LOGPROB_ATOL = 1e-4  # float32 engine (prefix + suffix prefill, static decode step) vs one eager forward pass
OPTIONAL = {**ALL_TYPES, "required": []}


def _load(checkpoint: str = "tiny-monkey", **kwargs) -> Monkey:
    return Monkey.load(require_parity(checkpoint), device="cpu", **kwargs)


@pytest.fixture(scope="module")
def tiny() -> Monkey:
    return _load()


def _check_shapes(result, schema: dict) -> None:
    """Every field parsed and validated: a value of its type, or null where the schema allows it."""
    assert result.ok and result.valid, result.to_dict()
    fields = {item.name: item for item in coerce_schema(schema).fields}
    for name, field_result in result.fields.items():
        item = fields[name]
        for candidate in field_result.candidates:
            assert candidate.error is None, (name, candidate)
            assert candidate.found or item.nullable, (name, candidate)
            assert 0 < candidate.confidence <= 1 and 0 < candidate.confidence_min <= candidate.confidence
        value = field_result.value
        if value is None:
            assert item.nullable
            continue
        kind = item.kind
        if kind == "number":
            assert isinstance(value, (int, float)) and not isinstance(value, bool)
        elif kind == "integer":
            assert isinstance(value, int) and not isinstance(value, bool) and value >= 0  # "minimum": 0
        elif kind == "boolean":
            assert isinstance(value, bool)
        elif kind == "date":
            assert datetime.date.fromisoformat(value).isoformat() == value
        elif kind == "enum":
            assert value in item.choices
        elif kind == "array":
            assert isinstance(value, list) and all(isinstance(v, str) and v for v in value)
            assert not item.choices or set(value) <= set(item.choices)
        else:
            assert isinstance(value, str) and value.strip() == value and value


@pytest.mark.parametrize("checkpoint", ["tiny-monkey", "tiny-monkey-sharp"])
def test_every_type_parses_and_validates_on_random_weights(checkpoint: str) -> None:
    monkey = _load(checkpoint)
    for number, image in enumerate(IMAGES):
        schema = ALL_TYPES if number % 2 == 0 else OPTIONAL
        result = monkey.extract(image, schema, max_new_tokens=24)
        _check_shapes(result, schema)
        assert result.pages == 1 and result.source == str(image)


def test_a_pydantic_model_comes_back_as_its_instance(tiny: Monkey) -> None:
    from pydantic import BaseModel, Field

    class Receipt(BaseModel):
        total: float = Field(description="What is the total amount due?")
        issued: datetime.date | None = None
        paid: bool

    result = tiny.extract(IMAGES[2], Receipt)
    assert isinstance(result.model, Receipt)
    assert result.model.total == result.values["total"] and isinstance(result.model.paid, bool)


def test_compiled_and_eager_steps_give_the_same_record() -> None:
    eager = _load(compile=False, batch_size=2).extract(IMAGES[0], ALL_TYPES, max_new_tokens=24)
    compiled = _load(compile=True, batch_size=2).extract(IMAGES[0], ALL_TYPES, max_new_tokens=24)
    assert compiled.values == eager.values
    for name, field_result in eager.fields.items():
        other = compiled.fields[name]
        assert other.answer == field_result.answer
        assert other.confidence == pytest.approx(field_result.confidence, rel=1e-4)


def test_several_schemas_at_once_under_continuous_batching_equal_each_alone(tiny: Monkey) -> None:
    pages = load_documents([IMAGES[1]], size=tiny.processor.input_size)
    schemas = [
        coerce_schema(ALL_TYPES),
        coerce_schema(["title:string=What is the title?", "year:integer", "kind:enum(bar|line|pie)!"]),
        coerce_schema({"type": "object", "properties": {"max": {"type": "number"}, "ok": {"type": "boolean"}}}),
    ]
    alone = [extract_pages(tiny, pages, schema, ExtractOptions(batch_size=1, max_new_tokens=24)) for schema in schemas]
    scheduler = tiny.scheduler(4)
    loop = EngineLoop(scheduler)
    together: list = [None] * len(schemas)

    def run(index: int) -> None:
        together[index] = extract_pages(tiny, pages, schemas[index], ExtractOptions(batch_size=4, max_new_tokens=24),
                                        loop=loop)

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(schemas))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
    finally:
        loop.close()
    assert scheduler.stats.busiest_step > 1, "the requests never shared a decode step"
    for single, batched in zip(alone, together, strict=True):
        assert batched.values == single.values
        assert [r.answer for r in batched.fields.values()] == [r.answer for r in single.fields.values()]
        for name, result in single.fields.items():
            assert batched.fields[name].confidence == pytest.approx(result.confidence, rel=1e-4)
            expected = result.null_probability
            assert batched.fields[name].null_probability == (expected and pytest.approx(expected, rel=1e-3))


# --- confidence is the model's own probability ---------------------------------------------------------------


def _teacher_forced(monkey: Monkey, image, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log-probabilities [len(tokens)] of `tokens` after `prompt`, from one eager float32 forward pass."""
    page = load_documents([image], size=monkey.processor.input_size)[0]  # the page as extract renders it
    features = monkey.encode_images([page.image])
    alpha = monkey.model.transformer.ntk_alpha_for(len(prompt))
    with torch.inference_mode():
        logits = monkey.model(
            input_ids=torch.tensor([prompt + tokens]), image_embeds=features, ntk_alphas=[alpha], use_cache=False
        ).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(tokens))
    return logprobs[positions, torch.tensor(tokens)]


@pytest.fixture()
def submitted(monkeypatch) -> list:
    """Every (request, handle) the scheduler is given."""
    seen = []
    real = Scheduler.submit

    def spy(self, request):
        handle = real(self, request)
        seen.append((request, handle))
        return handle

    monkeypatch.setattr(Scheduler, "submit", spy)
    return seen


@pytest.mark.parametrize("checkpoint", ["tiny-monkey", "tiny-monkey-sharp"])
def test_confidence_equals_teacher_forced_log_probabilities(checkpoint: str, submitted: list) -> None:
    image, tiny = IMAGES[2], _load(checkpoint)
    result = tiny.extract(image, OPTIONAL, max_new_tokens=24)
    by_prompt: dict[tuple, tuple] = {}
    worst = 0.0
    null_ids = [*tiny.tokenizer.encode(NOT_FOUND), tiny.tokenizer.eod_id]
    for request, handle in submitted:
        answer = handle.wait()
        ended = answer.stop_logprob is not None
        tokens = answer.token_ids + ([tiny.tokenizer.eod_id] if ended else [])
        expected = _teacher_forced(tiny, image, list(request.prompt_ids), tokens)
        got = torch.tensor(answer.logprobs + ([answer.stop_logprob] if ended else []))
        worst = max(worst, (expected - got).abs().max().item())
        assert list(request.score_ids) == null_ids  # every field is optional: not found is scored with it
        null_expected = _teacher_forced(tiny, image, list(request.prompt_ids), null_ids)
        worst = max(worst, (null_expected - torch.tensor(answer.score_logprobs)).abs().max().item())
        by_prompt[tuple(request.prompt_ids)] = (expected, null_expected)
    assert worst <= LOGPROB_ATOL, f"engine log-probabilities differ from the teacher-forced ones by {worst:.2e}"
    assert len(by_prompt) == len(submitted) == len(result.fields)  # one request per field, nothing else
    for item in coerce_schema(OPTIONAL).fields:
        prompt = tuple(tiny.check_prompt(tasks.vqa_prompt(item.question), 2))
        (candidate,) = result.fields[item.name].candidates
        expected, null_expected = by_prompt[prompt]
        assert candidate.confidence == pytest.approx(math.exp(expected.mean().item()), rel=1e-4)
        assert candidate.confidence_min == pytest.approx(math.exp(expected.min().item()), rel=1e-4)
        assert candidate.null_probability == pytest.approx(math.exp(null_expected.sum().item()), rel=1e-3)


# Not found scored in the value request's prefill (teacher-forced) against the separate forced request it
# replaced (decoded step by step): float32, probabilities in [0, 1].
NULL_PROBABILITY_ATOL = 1e-5
CONFIDENCE_ATOL = 1e-5


def _forced_request_record(monkey: Monkey, schema: dict, submitted: list, slots: int) -> dict[tuple, tuple]:
    """What the extractor computed before not found was scored in the prefill, for the requests it `submitted`
    now: per field, a value request (the same prompt, page and grammar, without score_ids) and a second request
    decoding the forced not-found answer, on one scheduler, sharing the page's prefix."""
    null_ids, eos = monkey.tokenizer.encode(NOT_FOUND), monkey.tokenizer.eod_id
    extractor = Extractor(lambda: monkey, coerce_schema(schema), ExtractOptions(max_new_tokens=24))
    plans = {tuple(plan.prompt_ids): plan for plan in extractor._prepare()}
    requests, key = [], ("old path", object())  # its own page key: the scheduler keeps features by key
    for request, _handle in submitted:
        assert list(request.score_ids) == [*null_ids, eos]
        grammar = plans[tuple(request.prompt_ids)].compiled
        requests.append(GenerationRequest(request.prompt_ids, image=request.image, image_key=key,
                                          params=request.params, constraint=grammar.constraint()))  # fmt: skip
        requests.append(GenerationRequest(request.prompt_ids, image=request.image, image_key=key,
                                          params=SamplingParams(max_new_tokens=len(null_ids) + 1),
                                          constraint=ForcedTokens(null_ids, eos)))  # fmt: skip
    results = monkey.scheduler(slots).run(requests)
    record = {}
    for index, (request, _handle) in enumerate(submitted):
        value, null = results[2 * index], results[2 * index + 1]
        assert null.token_ids == null_ids and null.stop_logprob is not None
        null_probability = math.exp(sum(null.logprobs) + null.stop_logprob)
        record[tuple(request.prompt_ids)] = (value.token_ids, answer_confidence(value.logprobs, value.stop_logprob),
                                             null_probability)  # fmt: skip
    return record


@pytest.mark.parametrize("checkpoint", ["tiny-monkey", "tiny-monkey-sharp"])
def test_not_found_scored_in_the_prefill_equals_its_forced_request(checkpoint: str, submitted: list) -> None:
    """The record's answers, confidences and null probabilities equal what a value request plus a separate
    forced not-found request gave (the extractor's path before), within CONFIDENCE_ATOL / NULL_PROBABILITY_ATOL;
    the greedy answers are identical. Two pages, 4 slots."""
    monkey = _load(checkpoint, batch_size=4)
    for image in IMAGES[:2]:
        submitted.clear()
        result = monkey.extract(image, OPTIONAL, max_new_tokens=24)
        new = {tuple(request.prompt_ids): handle.wait().token_ids for request, handle in submitted}
        asked = list(submitted)
        old = _forced_request_record(monkey, OPTIONAL, asked, slots=4)
        for item in coerce_schema(OPTIONAL).fields:
            prompt = tuple(monkey.check_prompt(tasks.vqa_prompt(item.question), 2))
            tokens, confidence, null_probability = old[prompt]
            candidate = result.fields[item.name]
            assert new[prompt] == tokens, item.name
            assert candidate.confidence == pytest.approx(confidence, abs=CONFIDENCE_ATOL)
            assert candidate.null_probability == pytest.approx(null_probability, abs=NULL_PROBABILITY_ATOL)
            assert candidate.null_probability > 0


def test_free_answers_report_the_same_log_probabilities_as_the_record(tiny: Monkey) -> None:
    """ask's records: confidence from the unconstrained answer's log-probabilities and its <|endoftext|>."""
    prompt = tiny.check_prompt(tasks.vqa_prompt("What is shown?"), 16)
    params = SamplingParams(max_new_tokens=16, top_logprobs=3)
    (answer,) = tiny.scheduler(1).run([GenerationRequest(prompt, image=IMAGES[0], params=params)])
    ended = answer.stop_logprob is not None
    expected = _teacher_forced(tiny, IMAGES[0], prompt, answer.token_ids + ([tiny.tokenizer.eod_id] if ended else []))
    got = torch.tensor(answer.logprobs + ([answer.stop_logprob] if ended else []))
    assert (expected - got).abs().max().item() <= LOGPROB_ATOL
    assert [best[0] for best in answer.top_logprobs] == [(t, pytest.approx(lp, abs=1e-6)) for t, lp in
                                                         zip(answer.token_ids, answer.logprobs, strict=True)]
    assert all(len(best) == 3 and best[0][1] >= best[1][1] >= best[2][1] for best in answer.top_logprobs)
    confidence = answer_confidence(answer.logprobs, answer.stop_logprob)
    assert confidence == pytest.approx(math.exp(expected.mean().item()), rel=1e-4)


def test_a_constraint_that_terminates_ends_the_request_without_endoftext(tiny: Monkey) -> None:
    compiled = CompiledGrammar.from_json_schema(
        {"type": "object", "properties": {"n": {"enum": [1, 22]}}, "required": ["n"], "additionalProperties": False},
        llguidance_tokenizer(tiny.tokenizer, tiny.model.config.vocab_size),
    )
    prompt = tiny.check_prompt(tasks.vqa_prompt("How many?"), 24)
    params = SamplingParams(max_new_tokens=24)
    (answer,) = tiny.scheduler(1).run([GenerationRequest(prompt, image=IMAGES[0], params=params,
                                                         constraint=compiled.constraint())])
    assert answer.finish_reason == "stop" and answer.stop_logprob is None
    assert tiny.tokenizer.eod_id not in answer.token_ids
    assert json.loads(tiny.tokenizer.decode(answer.token_ids))["n"] in (1, 22)
    assert len(answer.logprobs) == len(answer.token_ids)


# --- not found -----------------------------------------------------------------------------------------------


def test_not_found_is_null_where_allowed_and_a_value_where_required() -> None:
    monkey = _load()
    bias = torch.zeros(monkey.model.config.vocab_size)
    bias[monkey.tokenizer.encode(NOT_FOUND)] = 30.0  # the model now wants to say "unanswerable"
    monkey.model.lm_head.register_forward_hook(lambda _module, _inputs, logits: logits + bias)
    schema = {"type": "object", "properties": {
        "total": {"type": "number"}, "code": {"type": "integer"}, "note": {"enum": ["red", "green", None]},
    }, "required": ["code", "note"]}  # fmt: skip
    result = monkey.extract(IMAGES[0], schema, max_new_tokens=24)
    assert result.valid
    for name in ("total", "note"):
        field_result = result.fields[name]
        assert (field_result.value, field_result.page, field_result.answer) == (None, None, NOT_FOUND)
        # Scored in the prefill, the not-found answer has the probability it had when decoded: its tokens and
        # <|endoftext|>, whose mean log-probability is the confidence.
        steps = len(monkey.tokenizer.encode(NOT_FOUND)) + 1
        assert field_result.null_probability == pytest.approx(field_result.confidence**steps, rel=1e-3)
    assert isinstance(result.values["code"], int)  # required: the grammar never offers "not found"
    assert result.fields["code"].null_probability is None


def test_the_most_confident_page_of_a_document_wins(tiny: Monkey) -> None:
    result = tiny.extract(SAMPLES_DIR / "report.pdf", {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 12}, "pages": {"type": "integer"}}}, all_pages=True)  # fmt: skip
    for field_result in result.fields.values():
        candidates = field_result.candidates
        assert [c.page for c in candidates] == [1, 2, 3]
        best = max(c.confidence for c in candidates if c.found)
        assert field_result.page == min(c.page for c in candidates if c.found and c.confidence == best)
    assert result.to_dict()["candidates"]["title"][0]["page"] == 1


# --- the command ---------------------------------------------------------------------------------------------


@pytest.fixture()
def loads(monkeypatch) -> dict:
    real = monkey_cli.api.Monkey.load.__func__
    counts = {"loads": 0}

    def counting(cls, *args, **kwargs):
        counts["loads"] += 1
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(monkey_cli.api.Monkey, "load", classmethod(counting))
    return counts


def test_out_folder_resumes_and_a_changed_schema_redoes_the_documents(tmp_path: Path, loads: dict) -> None:
    tiny = str(require_parity("tiny-monkey"))
    out = tmp_path / "out"
    inputs = [str(IMAGES[0]), str(IMAGES[2])]
    args = ["extract", *inputs, "--field", "total:number=What is the total?", "--model", tiny, "--device", "cpu",
            "--out", str(out), "-f", "jsonl"]
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("*.jsonl"))
    assert [f.name for f in files] == ["receipt.jpg.jsonl", "scan.png.jsonl"] and result.stdout == ""
    before = {f: f.read_bytes() for f in files}
    assert json.loads(before[files[0]])["fields"]["total"]["page"] == 1 and loads["loads"] == 1

    result = RUNNER.invoke(app, args)
    assert result.exit_code == 0 and "2 already done" in result.stderr and loads["loads"] == 1
    assert {f: f.read_bytes() for f in files} == before

    changed = [a.replace("What is the total?", "What is the sum?") for a in args]
    result = RUNNER.invoke(app, changed)
    assert result.exit_code == 0 and "already done" not in result.stderr and loads["loads"] == 2
    records = [json.loads(f.read_text()) for f in files]
    assert all(r["schema_sha256"] == coerce_schema(["total:number=What is the sum?"]).fingerprint for r in records)


def test_csv_on_stdout_and_needs_review_keep_exit_code_0(tiny: Monkey) -> None:
    tiny_dir = str(require_parity("tiny-monkey"))
    result = RUNNER.invoke(app, [
        "extract", str(IMAGES[0]), str(SAMPLES_DIR / "missing.png"), "--field", "total:number", "--field",
        "paid:boolean", "--model", tiny_dir, "--device", "cpu", "-f", "csv", "--min-confidence", "1",
    ])  # fmt: skip
    assert result.exit_code == 1  # the missing file
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(result.stdout, newline="")))
    assert [row["source"] for row in rows] == [str(IMAGES[0]), str(SAMPLES_DIR / "missing.png")]
    assert rows[0]["needs_review"] == "total; paid" and rows[0]["total"] and not rows[0]["error"]
    assert rows[1]["total"] == "" and rows[1]["error"] and "missing.png" in result.stderr
    result = RUNNER.invoke(app, ["extract", str(IMAGES[0]), "--field", "total:number", "--model", tiny_dir,
                                 "--device", "cpu", "--min-confidence", "0.99", "--no-null-probability"])
    (record,) = json.loads(result.stdout)["records"]
    assert result.exit_code == 0 and record["needs_review"] == ["total"]
    assert record["fields"]["total"]["null_probability"] is None  # not scored


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (json.dumps({"type": "object", "properties": {f"f{i}": {} for i in range(10_000)}}), "at most 256"),
        ("[" * 50_000 + "]" * 50_000, "nested"),
        (json.dumps({"type": "string"}), "type object"),
        (json.dumps({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}}}), "look-around"),
        (json.dumps({"type": "object", "properties": {"a": {"enum": list(range(50_000))}}}), "at most 1,000"),
    ],
)
def test_hostile_schema_files_are_usage_errors_without_a_hang(tmp_path: Path, content: str, message: str) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(content)
    done = subprocess.run([sys.executable, "-m", "monkey_cli", "extract", str(IMAGES[0]), "--schema", str(schema)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --schema") and message in lines[0], done.stderr


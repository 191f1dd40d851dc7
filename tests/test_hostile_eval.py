"""Hostile evaluation inputs: one malformed line is an error for that line, never a crash.

Attacked: predictions files for `eval score` (JSON lines and JSON arrays), dataset files and the resume state
of `eval run`, results.json from an earlier run, VQA annotation files, dataset names that would escape the
output folder, image paths that name a FIFO or a decompression bomb.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hostile import cli, png_header, python
from PIL import Image

import monkey_cli
from monkey_cli.evaluation import datasets as datasets_module
from monkey_cli.evaluation.datasets import file_task
from monkey_cli.evaluation.runner import run_task, run_tasks

GOOD = {"question_id": 1, "answer": "cat", "annotation": ["cat"]}
# Lines a hand-edited or hostile JSON-lines file can hold, and what the error for each says.
HOSTILE_LINES = {
    "huge integer": ('{"question_id": ' + "9" * 5000 + ', "answer": "x", "annotation": "x"}', "malformed JSON"),
    "deep nesting": ("[" * 100_000 + "]" * 100_000, "malformed JSON (nested too deeply)"),
    "NaN": ('{"question_id": 3, "answer": NaN, "annotation": "x"}', "NaN is not a JSON value"),
    "Infinity": ('{"question_id": 4, "answer": "x", "annotation": Infinity}', "Infinity is not a JSON value"),
    "missing field": ('{"question_id": 5, "annotation": "x"}', "missing field 'answer'"),
    "not an object": ("[1, 2, 3]", "expected a JSON object"),
    "wrong type": ('{"question_id": 6, "answer": {"a": 1}, "annotation": "x"}', "must be a string"),
    "truncated": ('{"question_id": 7, "answer": "x", "annot', "malformed JSON"),
}


def _lines_file(path: Path, lines: list[str], extra: bytes = b"") -> Path:
    good = json.dumps(GOOD)
    path.write_bytes(("\n".join([good, *lines, json.dumps({**GOOD, "question_id": 99})]) + "\n").encode() + extra)
    return path


def test_eval_score_reports_each_malformed_line_and_scores_the_rest(tmp_path):
    path = _lines_file(tmp_path / "pred.jsonl", [line for line, _ in HOSTILE_LINES.values()], b"\xff\xfe{}\n")
    result = cli("eval", "score", path, "--metric", "accuracy")
    assert result.exit_code == 1, result.output
    assert result.stdout == "accuracy 1.0 over 2 predictions\n"
    assert "Traceback" not in result.stderr
    for number, (_line, message) in enumerate(HOSTILE_LINES.values(), start=2):
        assert f"pred.jsonl:{number}:" in result.stderr and message in result.stderr, message
    assert "not UTF-8 text" in result.stderr


def test_an_overlong_line_is_skipped_without_holding_it_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets_module, "MAX_LINE_BYTES", 1024)
    path = _lines_file(tmp_path / "pred.jsonl", ['{"answer": "' + "x" * 5000 + '"}'])
    result = cli("eval", "score", path, "--metric", "accuracy")
    assert result.exit_code == 1 and "pred.jsonl:2: line longer than" in result.stderr
    assert result.stdout == "accuracy 1.0 over 2 predictions\n"


@pytest.mark.parametrize(
    "document, message",
    [("[" * 100_000, "not valid JSON"), ('[{"answer": 1' + "0" * 5000 + "}]", "not valid JSON"),
     ('[{"a": 1', "not valid JSON")],
)  # fmt: skip
def test_a_broken_json_array_file_is_one_line_exit_2(tmp_path, document, message):
    path = tmp_path / "result.json"
    path.write_text(document)
    result = cli("eval", "score", path, "--metric", "anls")
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1


def test_non_finite_numbers_in_a_json_array_are_errors_for_their_entry(tmp_path):
    path = tmp_path / "result.json"
    path.write_text('[{"answer": "1", "annotation": NaN}, {"answer": "2", "annotation": [Infinity]},'
                    ' {"answer": "3", "annotation": "3"}]')  # fmt: skip
    result = cli("eval", "score", path, "--metric", "relaxed_accuracy")
    assert result.exit_code == 1 and result.stdout == "relaxed_accuracy 1.0 over 1 predictions\n"
    assert result.stderr.count("field 'annotation' must be a string") == 2


def test_annotation_files_that_cannot_be_parsed_are_one_line(tmp_path):
    predictions = _lines_file(tmp_path / "pred.jsonl", [])
    for content in ("[" * 100_000, '{"annotations": [{"question_id": ' + "1" * 5000 + "}]}"):
        annotations = tmp_path / "annotations.json"
        annotations.write_text(content)
        result = cli("eval", "score", predictions, "--metric", "vqa_score", "--annotations", annotations)
        assert result.exit_code == 2 and "not valid JSON" in result.stderr and result.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------- eval run


class EchoModel:
    def __init__(self) -> None:
        self.asked: list[str] = []

    def generate(self, images, prompts, max_new_tokens, min_new_tokens):
        self.asked.extend(prompts)
        return ["cat"] * len(prompts)


def _dataset(tmp_path: Path, bad_lines: list[str]) -> Path:
    Image.new("RGB", (20, 20)).save(tmp_path / "img.png")
    items = [json.dumps({"image": "img.png", "question": f"q{i}", "answer": "cat", "question_id": i}) for i in (1, 2)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([items[0], *bad_lines, items[1]]) + "\n")
    return path


def test_eval_run_records_malformed_dataset_lines_and_answers_the_rest(tmp_path):
    bad = [line for line, _ in HOSTILE_LINES.values()]
    task = file_task(_dataset(tmp_path, bad), "accuracy")
    reports: list[str] = []
    run = run_task(EchoModel(), task, tmp_path / "out", report=reports.append)
    assert run.generated == 2 and run.failed == len(bad) and run.score == 1.0
    errors = [json.loads(line) for line in (tmp_path / "out" / "data.errors.jsonl").read_text().splitlines()]
    assert [error["line"] for error in errors] == list(range(2, 2 + len(bad)))


def test_a_damaged_resume_state_is_reported_and_those_items_asked_again(tmp_path):
    task = file_task(_dataset(tmp_path, []), "accuracy")
    out = tmp_path / "out"
    out.mkdir()
    hostile = [line for line, _ in HOSTILE_LINES.values()] + [
        '{"question_id": [1], "answer": "cat"}',
        '{"question_id": {"a": 1}, "answer": "cat"}',
        '{"question_id": 1.5, "answer": "cat"}',
        '{"question_id": true, "answer": "cat"}',
        json.dumps({"question_id": 1, "answer": "cat"}),  # a real earlier answer: kept
    ]
    (out / "data.predictions.jsonl").write_text("\n".join(hostile) + "\n")
    model, reports = EchoModel(), []
    run = run_task(model, task, out, report=reports.append)
    assert run.resumed == 1 and run.generated == 1 and len(model.asked) == 1 and run.score == 1.0
    assert len([line for line in reports if "line ignored" in line]) == len(hostile) - 1


def test_a_results_entry_without_a_dataset_is_reported_before_any_work(tmp_path):
    task = file_task(_dataset(tmp_path, []), "accuracy")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"schema": "x", "datasets": {
        "old": {"metric": "anls", "n_scored": 1, "n_items": 1, "n_failed": 0},
        "worse": "not an object",
        "odd": {"dataset": "odd", "metric": "anls", "n_scored": "1", "n_items": 1, "n_failed": 0},
        "kept": {"dataset": "kept", "metric": "anls", "n_scored": 1, "n_items": 1, "n_failed": 0, "percent": 50.0},
    }}))  # fmt: skip
    events: list[str] = []

    class Model(EchoModel):
        def generate(self, images, prompts, max_new_tokens, min_new_tokens):
            events.append("generate")
            return super().generate(images, prompts, max_new_tokens, min_new_tokens)

    runs = run_tasks(Model(), [task], out, report=events.append)
    assert runs[0].score == 1.0
    assert "missing field 'dataset'" in events[0] and events.index("generate") == 3, events
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["datasets"]) == ["data", "kept"]
    assert "| kept |" in (out / "results.md").read_text()


@pytest.mark.parametrize("content", ["[" * 100_000, '{"datasets": ' + "1" * 5000 + "}", "\xff", "[]"])
def test_an_unreadable_results_file_is_reported_and_rebuilt(tmp_path, content):
    task = file_task(_dataset(tmp_path, []), "accuracy")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text(content, encoding="latin-1")
    reports: list[str] = []
    run_tasks(EchoModel(), [task], tmp_path / "out", report=reports.append)
    assert any("results.json" in line and "rebuilt" in line for line in reports)
    assert list(json.loads((tmp_path / "out" / "results.json").read_text())["datasets"]) == ["data"]


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "tab\there", "", "x" * 300])
def test_a_dataset_name_cannot_leave_the_output_folder(tmp_path, name, monkeypatch):
    data = _dataset(tmp_path, [])
    monkeypatch.setattr(monkey_cli, "Monkey", None, raising=False)  # never reached: a usage error comes first
    result = cli("eval", "run", "--file", data, "--metric", "accuracy", "--name", name, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "it names the output files" in result.stderr
    assert not (tmp_path / "escape.predictions.jsonl").exists()


def test_a_dataset_file_name_with_control_characters_needs_a_name(tmp_path):
    data = _dataset(tmp_path, [])
    odd = data.rename(tmp_path / "evil\x1b[2J.jsonl")
    with pytest.raises(monkey_cli.errors.UsageError, match="give --name"):
        file_task(odd, "accuracy")


def test_images_that_are_fifos_devices_or_bombs_are_item_errors_never_waits(tmp_path):
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    (tmp_path / "bomb.png").write_bytes(png_header(13370, 13370))
    Image.new("RGB", (20, 20)).save(tmp_path / "img.png")
    lines = [
        {"image": name, "question": "q", "answer": "cat", "question_id": index}
        for index, name in enumerate(["fifo.png", "zero.png", "bomb.png", "img.png"])
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    code = f"""
from pathlib import Path
from monkey_cli.evaluation.datasets import file_task
from monkey_cli.evaluation.runner import run_task
class Model:
    def generate(self, images, prompts, max_new_tokens, min_new_tokens):
        return ["cat"] * len(prompts)
run = run_task(Model(), file_task(Path({str(tmp_path / "data.jsonl")!r}), "accuracy"), Path({str(tmp_path / "out")!r}),
               report=print)
print("done", run.generated, run.failed)
"""
    result = python(code, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("done 1 3")
    assert "image fifo.png not found" in result.stdout and "image zero.png not found" in result.stdout
    assert "possible decompression bomb" in result.stdout

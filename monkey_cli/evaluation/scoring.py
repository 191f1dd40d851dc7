"""Score a set of predictions with no model loaded (the `monkey eval score` path: no torch, no PIL).

A prediction is a JSON object with the model's `answer` and either its `annotation` (string or list;
for vqa_score without annotation files: the human answers) or a `question_id` found in official VQA
annotation files. Predictions files are JSON lines (as `monkey eval run` writes them) or one JSON array
(as the original eval writes `result/<name>/<dataset>.json`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monkey_cli.errors import UsageError
from monkey_cli.evaluation.datasets import (
    ItemError,
    VQAAnnotation,
    check_metric,
    check_vqa_files,
    iter_json_lines,
    load_vqa_annotations,
    normalize_annotations,
    question_key,
)
from monkey_cli.evaluation.metrics import MetricResult, ScoredItem, aggregate, score_item


@dataclass
class ScoreReport:
    """The aggregate, what each prediction scored, and the predictions that could not be scored."""

    result: MetricResult
    items: list[ScoredItem] = field(default_factory=list)
    errors: list[ItemError] = field(default_factory=list)


def record_question_id(record: Mapping[str, Any]) -> Any:
    """The question id of a prediction; the original writes `questionId` for some datasets."""
    if "question_id" in record:
        return record["question_id"]
    return record.get("questionId")


def score_records(
    records: Iterable[tuple[int | None, Any]],
    metric: str,
    *,
    gqa_postprocess: bool = False,
    vqa_annotations: Mapping[str, VQAAnnotation] | None = None,
    source: str = "<predictions>",
) -> ScoreReport:
    """Score `(line, record)` pairs; a record may also be an ItemError (passed through as an error)."""
    check_metric(metric)
    scored: list[ScoredItem] = []
    errors: list[ItemError] = []
    seen: dict[str, int | None] = {}
    for line, record in records:
        if isinstance(record, ItemError):
            errors.append(record)
            continue
        outcome = _score_record(record, metric, line, source, gqa_postprocess, vqa_annotations, seen)
        (errors if isinstance(outcome, ItemError) else scored).append(outcome)
    return ScoreReport(result=aggregate(metric, scored), items=scored, errors=errors)


def _score_record(
    record: Any,
    metric: str,
    line: int | None,
    source: str,
    gqa_postprocess: bool,
    vqa_annotations: Mapping[str, VQAAnnotation] | None,
    seen: dict[str, int | None],
) -> ScoredItem | ItemError:
    if not isinstance(record, dict):
        return ItemError(source, line, f"expected a JSON object, got {type(record).__name__}")
    question_id = record_question_id(record)

    def error(message: str) -> ItemError:
        return ItemError(source, line, message, question_id=question_id)

    answer = record.get("answer")
    if not isinstance(answer, str):
        return error("missing field 'answer'" if "answer" not in record else "field 'answer' must be a string")
    if question_id is not None:
        key = question_key(question_id)
        if key in seen:
            return error(f"duplicate question_id (first on line {seen[key]})")
        seen[key] = line

    if vqa_annotations is not None:
        if question_id is None:
            return error("missing field 'question_id' (needed to find the annotations)")
        annotation = vqa_annotations.get(question_key(question_id))
        if annotation is None:
            return error("question_id not found in the annotation file")
        score, compared = score_item(metric, answer, human_answers=annotation.answers)
        return ScoredItem(question_id, score, compared, annotation.answer_type, annotation.question_type)

    if record.get("annotation") is None:
        hint = " (give the VQA annotation file with --annotations)" if metric == "vqa_score" else ""
        return error(f"missing field 'annotation'{hint}")
    annotations = normalize_annotations(record["annotation"])
    if annotations is None:
        return error("field 'annotation' must be a string or a non-empty list of strings")
    score, compared = score_item(metric, answer, annotations, gqa=gqa_postprocess)
    return ScoredItem(question_id, score, compared)


def read_prediction_records(path: Path) -> Iterator[tuple[int | None, Any]]:
    """`(line, record)` from a JSON-lines file; from a file holding one JSON array, `(position, record)`."""
    if not path.is_file():
        raise UsageError(f"predictions file {path} not found")
    if _starts_with_array(path):
        try:
            document = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSON, integers too long
            raise UsageError(f"{path}: not valid JSON ({' '.join(str(exc).split()) or type(exc).__name__})") from None
        if not isinstance(document, list):
            raise UsageError(f"{path}: expected a JSON array of predictions")
        yield from enumerate(document, start=1)
        return
    yield from iter_json_lines(path)


def _starts_with_array(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip()
    return head.startswith(b"[")


def score_predictions_file(
    path: Path,
    metric: str,
    *,
    gqa_postprocess: bool = False,
    annotations_file: Path | None = None,
    questions_file: Path | None = None,
) -> ScoreReport:
    """Score a predictions file; with annotation files (vqa_score), answers are matched by question id."""
    check_metric(metric)
    check_vqa_files(metric, annotations_file, questions_file)
    if gqa_postprocess and metric != "accuracy":
        raise UsageError("--gqa-postprocess only applies to --metric accuracy")
    vqa_annotations = load_vqa_annotations(annotations_file, questions_file) if annotations_file else None
    return score_records(
        read_prediction_records(path),
        metric,
        gqa_postprocess=gqa_postprocess,
        vqa_annotations=vqa_annotations,
        source=str(path),
    )

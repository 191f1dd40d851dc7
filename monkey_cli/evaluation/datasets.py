"""The VQA JSON-lines format, the VQA annotation files, and the registry of the paper's 14 benchmarks.

One test item per line, as the original evaluation reads it:

    {"image": "data/estvqa/test_image/011364.jpg", "question": "What is this store?",
     "answer": "pizzeria", "question_id": 0}

`answer` is a string or a list of strings (the annotations). For the VQA-score sets the ground truth is
the official annotation file (10 human answers per question), matched by `question_id`.

A bad line never stops a run: reading yields an `ItemError` for it and goes on. Nothing here imports
torch or PIL.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from monkey_cli.errors import UsageError
from monkey_cli.evaluation.metrics import METRICS

DEFAULT_PROMPT = "<img>{image}</img> {question} Answer: "
VIZWIZ_PROMPT = (
    '<img>{image}</img> {question} When the provided information is insufficient, respond with "Unanswerable". Answer:'
)
DEFAULT_MAX_NEW_TOKENS = 100
MAX_LINE_BYTES = 16 << 20  # one question or prediction per line: far more than any real one
_CHUNK = 1 << 20


@dataclass(frozen=True)
class DatasetSpec:
    """One benchmark: its metric, generation length and files, relative to the data root.

    The data root plays the role of the original's `data/` folder (`evaluate_vqa.py`'s `ds_collections`).
    """

    name: str
    metric: str
    max_new_tokens: int
    test_file: str
    questions_file: str | None = None
    annotations_file: str | None = None
    gqa_postprocess: bool = False
    prompt: str = DEFAULT_PROMPT
    original_name: str = ""

    def files(self) -> list[str]:
        return [f for f in (self.test_file, self.questions_file, self.annotations_file) if f]


def _vqa_set(name: str, original: str, test: str, questions: str, annotations: str, prompt: str = DEFAULT_PROMPT):
    return DatasetSpec(name, "vqa_score", 10, test, questions, annotations, prompt=prompt, original_name=original)


REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("estvqa", "anls", 100, "estvqa/estvqa.jsonl", original_name="estvqa_test"),
        DatasetSpec("docvqa", "anls", 100, "docvqa/test_ans.jsonl", original_name="docvqa_test"),
        DatasetSpec("chartqa", "relaxed_accuracy", 100, "chartqa/chartqa_test.jsonl", original_name="chartqa"),
        DatasetSpec("infovqa", "anls", 100, "infographicVQA/infovqa_test.jsonl", original_name="infovqa_test"),
        _vqa_set(
            "vizwiz",
            "vizwiz_val",
            "vizwiz/vizwiz_val.jsonl",
            "vizwiz/vizwiz_val_questions.json",
            "vizwiz/vizwiz_val_annotations.json",
            prompt=VIZWIZ_PROMPT,
        ),
        DatasetSpec("deepform", "accuracy", 100, "test_DeepForm.jsonl", original_name="deepform"),
        DatasetSpec("KLC", "accuracy", 100, "test_KleisterCharity.jsonl", original_name="KLC"),
        DatasetSpec("WTQ", "accuracy", 100, "test_WikiTableQuestions.jsonl", original_name="WTQ"),
        DatasetSpec(
            "gqa", "accuracy", 10, "gqa/gqa_testdev_new.jsonl", gqa_postprocess=True, original_name="gqa_testdev"
        ),
        _vqa_set(
            "okvqa",
            "okvqa_val",
            "okvqa/okvqa_val.jsonl",
            "okvqa/OpenEnded_mscoco_val2014_questions.json",
            "okvqa/mscoco_val2014_annotations.json",
        ),
        _vqa_set(
            "textvqa",
            "textvqa_val",
            "textvqa/textvqa_val.jsonl",
            "textvqa/textvqa_val_questions.json",
            "textvqa/textvqa_val_annotations.json",
        ),
        DatasetSpec("stvqa", "anls", 100, "STVQA/stvqa.jsonl", original_name="stvqa_test"),
        DatasetSpec("ai2diagram", "accuracy", 10, "ai2d/test.jsonl", original_name="ai2diagram_test"),
        _vqa_set(
            "vqav2",
            "vqav2_val",
            "vqav2/vqav2_val.jsonl",
            "vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
            "vqav2/v2_mscoco_val2014_annotations.json",
        ),
    )
}


def get_spec(name: str) -> DatasetSpec:
    """A registry entry by name, case-insensitively (`klc` finds `KLC`)."""
    for spec in REGISTRY.values():
        if spec.name.lower() == name.lower():
            return spec
    raise UsageError(f"unknown dataset {name!r}; known: {', '.join(REGISTRY)} (or 'all')")


# --------------------------------------------------------------------------------------------------
# A dataset resolved to files on disk
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalTask:
    """Everything a run needs to evaluate one dataset file."""

    name: str
    metric: str
    max_new_tokens: int
    prompt: str
    data_file: Path
    annotations_file: Path | None = None
    questions_file: Path | None = None
    gqa_postprocess: bool = False
    image_dirs: tuple[Path, ...] = field(default_factory=tuple)


def registry_task(
    name: str,
    data_root: Path,
    *,
    prompt: str | None = None,
    max_new_tokens: int | None = None,
    image_root: Path | None = None,
) -> EvalTask:
    """The task for a registry dataset under `data_root`; UsageError if its files are not there."""
    spec = get_spec(name)
    check_data_root(data_root)
    missing = [relative for relative in spec.files() if not (data_root / relative).is_file()]
    if missing:
        raise UsageError(f"dataset {spec.name}: {data_root / missing[0]} not found (see docs/evaluation.md)")
    template = prompt if prompt is not None else spec.prompt
    validate_prompt(template)
    data_file = data_root / spec.test_file
    return EvalTask(
        name=spec.name,
        metric=spec.metric,
        max_new_tokens=max_new_tokens or spec.max_new_tokens,
        prompt=template,
        data_file=data_file,
        annotations_file=data_root / spec.annotations_file if spec.annotations_file else None,
        questions_file=data_root / spec.questions_file if spec.questions_file else None,
        gqa_postprocess=spec.gqa_postprocess,
        image_dirs=_image_dirs(image_root, data_file, data_root),
    )


def file_task(
    data_file: Path,
    metric: str,
    *,
    name: str | None = None,
    gqa_postprocess: bool = False,
    annotations_file: Path | None = None,
    questions_file: Path | None = None,
    prompt: str | None = None,
    max_new_tokens: int | None = None,
    image_root: Path | None = None,
) -> EvalTask:
    """A task for any JSON-lines file scored with `metric`; UsageError on a missing file or bad option."""
    check_metric(metric)
    if not data_file.is_file():
        raise UsageError(f"dataset file {data_file} not found")
    check_vqa_files(metric, annotations_file, questions_file)
    if gqa_postprocess and metric != "accuracy":
        raise UsageError("--gqa-postprocess only applies to --metric accuracy")
    template = prompt if prompt is not None else DEFAULT_PROMPT
    validate_prompt(template)
    default_tokens = 10 if metric == "vqa_score" else DEFAULT_MAX_NEW_TOKENS
    return EvalTask(
        name=check_dataset_name(data_file.stem if name is None else name, given=name is not None),
        metric=metric,
        max_new_tokens=max_new_tokens or default_tokens,
        prompt=template,
        data_file=data_file,
        annotations_file=annotations_file,
        questions_file=questions_file,
        gqa_postprocess=gqa_postprocess,
        image_dirs=_image_dirs(image_root, data_file, None),
    )


_UNSAFE_NAME = re.compile(r"[/\\\x00-\x1f\x7f-\x9f]")


def check_dataset_name(name: str, *, given: bool = True) -> str:
    """A dataset name is part of output file names (NAME.predictions.jsonl): no separators, no controls."""
    if name in ("", ".", "..") or name.startswith(".") or _UNSAFE_NAME.search(name) or len(name) > 200:
        what = f"--name {name!r}" if given else f"dataset name {name!r} (from the file name; give --name)"
        raise UsageError(f"{what}: use letters, digits, '-' or '_' (it names the output files)")
    return name


def check_data_root(data_root: Path) -> None:
    if not data_root.is_dir():
        raise UsageError(f"data root {data_root} not found (it holds the datasets, as the original's data/)")


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise UsageError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")


def check_vqa_files(metric: str, annotations_file: Path | None, questions_file: Path | None) -> None:
    if (annotations_file or questions_file) and metric != "vqa_score":
        raise UsageError("--annotations/--questions only apply to --metric vqa_score")
    if questions_file and not annotations_file:
        raise UsageError("--questions needs --annotations")
    for path in (annotations_file, questions_file):
        if path is not None and not path.is_file():
            raise UsageError(f"{path} not found")


def _image_dirs(image_root: Path | None, data_file: Path, data_root: Path | None) -> tuple[Path, ...]:
    """Where relative image paths are looked up, in order (see `resolve_image`)."""
    if image_root is not None:
        return (image_root,)
    dirs: list[Path] = []
    if data_root is not None:
        # The original runs from the folder that CONTAINS data/, and its files say "data/docvqa/...".
        dirs += [data_root.parent, data_root]
    dirs += [data_file.parent, Path.cwd()]
    unique: list[Path] = []
    for directory in dirs:
        if directory not in unique:
            unique.append(directory)
    return tuple(unique)


def resolve_image(image: str, task: EvalTask) -> Path | None:
    """The image file for an item's `image` path, or None.

    Absolute paths are used as they are. A relative path is tried under each of `task.image_dirs`; when
    a data root is in use, a leading `data/` is also tried without it under the data root, so a root
    that is not literally named `data` works with the original jsonl files.
    """
    path = Path(image)
    if path.is_absolute():
        return path if path.is_file() else None
    for candidate in _candidates(path, task):
        if candidate.is_file():
            return candidate
    return None


def _candidates(path: Path, task: EvalTask) -> Iterator[Path]:
    for directory in task.image_dirs:
        yield directory / path
        if path.parts and path.parts[0] == "data" and len(path.parts) > 1:
            yield directory / Path(*path.parts[1:])


def image_search_description(task: EvalTask) -> str:
    return ", ".join(str(directory) for directory in task.image_dirs)


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{(image|question)\}")


def validate_prompt(template: str) -> None:
    """A template must hold one `<img>{image}</img>` span (the model's image slot) and `{question}`."""
    if template.count("<img>") != 1 or template.count("</img>") != 1 or "<img>{image}</img>" not in template:
        raise UsageError(f"prompt {template!r} must contain exactly one '<img>{{image}}</img>'")
    if "{question}" not in template:
        raise UsageError(f"prompt {template!r} must contain '{{question}}'")


def format_prompt(template: str, image: str, question: str) -> str:
    """Fill `{image}` and `{question}` in one pass, so neither value is itself searched for placeholders."""
    values = {"image": image, "question": question}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


# --------------------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VQAItem:
    """One question of a dataset file. `annotations` is the `answer` field as a list, or None if absent."""

    question_id: int | str
    image: str
    question: str
    annotations: list[str] | None
    line: int

    @property
    def key(self) -> str:
        return question_key(self.question_id)


@dataclass(frozen=True)
class ItemError:
    """A data problem with one item (or line), reported and recorded; the run goes on."""

    source: str
    line: int | None
    message: str
    question_id: Any = None
    image: str | None = None

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        question = f" question {self.question_id}:" if self.question_id is not None else ""
        return f"{where}:{question} {self.message}"

    def to_record(self, dataset: str | None = None) -> dict[str, Any]:
        record: dict[str, Any] = {"dataset": dataset} if dataset is not None else {}
        record.update(
            {
                "source": self.source,
                "line": self.line,
                "question_id": self.question_id,
                "image": self.image,
                "error": self.message,
            }
        )
        return record


def question_key(question_id: Any) -> str:
    """Ids are compared as text: 12 in a jsonl file matches 12 or "12" in an annotation file."""
    return str(question_id)


def normalize_annotations(value: Any) -> list[str] | None:
    """`answer` as a list of strings: a string becomes a one-element list (the original wraps estvqa's
    strings; elsewhere it would iterate the characters of a string, which is never intended); numbers
    become their text. None if the value has another type."""
    if isinstance(value, str):
        return [value]
    if _is_number(value):
        return [str(value)]
    if isinstance(value, list) and value and all(isinstance(v, str) or _is_number(v) for v in value):
        return [v if isinstance(v, str) else str(v) for v in value]
    return None


def _is_number(value: Any) -> bool:
    """A finite number (NaN and infinities, which a JSON array parsed leniently can hold, are not answers)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def iter_json_lines(path: Path, *, handle: BinaryIO | None = None) -> Iterator[tuple[int, Any | ItemError]]:
    """(line number, parsed value or ItemError) for every non-blank line of a JSON-lines file.

    Whatever a line holds is an error for that line only: invalid UTF-8 or JSON, NaN or Infinity (not JSON),
    an integer too long to convert, nesting deeper than Python can parse, or more than MAX_LINE_BYTES."""
    source = str(path)
    with contextlib.ExitStack() as stack:
        if handle is None:
            handle = stack.enter_context(path.open("rb"))
        number = 0
        while raw := handle.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := handle.readline(_CHUNK)) and not rest.endswith(b"\n"):
                    pass  # the rest of an overlong line is skipped, never held in memory
                yield number, ItemError(source, number, f"line longer than {MAX_LINE_BYTES >> 20} MiB")
                continue
            if not raw.strip():
                continue
            yield number, _parse_line(raw, source, number)


def _parse_line(raw: bytes, source: str, number: int) -> Any | ItemError:
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        return ItemError(source, number, f"not UTF-8 text ({exc.reason} at byte {exc.start})")
    except json.JSONDecodeError as exc:
        return ItemError(source, number, f"malformed JSON ({exc.msg} at column {exc.colno})")
    except RecursionError:
        return ItemError(source, number, "malformed JSON (nested too deeply)")
    except ValueError as exc:  # NaN/Infinity, or an integer of thousands of digits
        return ItemError(source, number, f"malformed JSON ({' '.join(str(exc).split())})")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def read_items(path: Path, *, require_answer: bool = True) -> Iterator[VQAItem | ItemError]:
    """The items of a dataset file in order; each bad line (or duplicate question id) is an ItemError."""
    source = str(path)
    first_seen: dict[str, int] = {}
    for number, value in iter_json_lines(path):
        if isinstance(value, ItemError):
            yield value
            continue
        item = parse_item(value, source, number, require_answer=require_answer)
        if isinstance(item, VQAItem):
            if item.key in first_seen:
                item = ItemError(
                    source,
                    number,
                    f"duplicate question_id (first on line {first_seen[item.key]})",
                    question_id=item.question_id,
                    image=item.image,
                )
            else:
                first_seen[item.key] = number
        yield item


def parse_item(value: Any, source: str, line: int, *, require_answer: bool = True) -> VQAItem | ItemError:
    """Check one parsed line against the format."""
    if not isinstance(value, dict):
        return ItemError(source, line, f"expected a JSON object, got {type(value).__name__}")
    question_id = value.get("question_id")
    image = value.get("image") if isinstance(value.get("image"), str) else None

    def error(message: str) -> ItemError:
        return ItemError(source, line, message, question_id=question_id, image=image)

    if "question_id" not in value:
        return error("missing field 'question_id'")
    if not (isinstance(question_id, str) or (isinstance(question_id, int) and not isinstance(question_id, bool))):
        return error("field 'question_id' must be an integer or a string")
    for name in ("image", "question"):
        if name not in value:
            return error(f"missing field {name!r}")
        if not isinstance(value[name], str) or not value[name]:
            return error(f"field {name!r} must be a non-empty string")
    annotations = None
    if "answer" in value and value["answer"] is not None:
        annotations = normalize_annotations(value["answer"])
        if annotations is None:
            return error("field 'answer' must be a string or a non-empty list of strings")
    elif require_answer:
        return error("missing field 'answer' (the annotation to score against)")
    return VQAItem(question_id, value["image"], value["question"], annotations, line)


# --------------------------------------------------------------------------------------------------
# Official VQA annotation / question files
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VQAAnnotation:
    """The human answers of one question (records as in the file) and its answer / question type."""

    question_id: Any
    answers: list[dict[str, Any]]
    answer_type: str | None = None
    question_type: str | None = None


def load_vqa_annotations(annotations_file: Path, questions_file: Path | None = None) -> dict[str, VQAAnnotation]:
    """`{question key: VQAAnnotation}` from an official annotation file (`{"annotations": [...]}`).

    With a questions file, only questions present in both are kept (the original needs both files).
    Answer entries may be records (`{"answer": ..., "answer_id": ...}`) or plain strings (TextVQA's
    native form), which get answer_id 1..n.
    """
    document = _load_json(annotations_file)
    entries = document.get("annotations") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise UsageError(f"{annotations_file}: expected a JSON object with an 'annotations' list")
    annotations: dict[str, VQAAnnotation] = {}
    for index, entry in enumerate(entries):
        annotation = _parse_annotation(entry, f"{annotations_file}: annotations[{index}]")
        annotations[question_key(annotation.question_id)] = annotation
    if questions_file is not None:
        asked = _question_keys(questions_file)
        annotations = {key: value for key, value in annotations.items() if key in asked}
    return annotations


def _parse_annotation(entry: Any, where: str) -> VQAAnnotation:
    if not isinstance(entry, dict) or "question_id" not in entry:
        raise UsageError(f"{where}: expected an object with 'question_id' and 'answers'")
    answers = entry.get("answers")
    if not isinstance(answers, list) or not answers:
        raise UsageError(f"{where}: 'answers' must be a non-empty list")
    records = []
    for position, answer in enumerate(answers, start=1):
        if isinstance(answer, str):
            records.append({"answer": answer, "answer_id": position})
        elif isinstance(answer, dict) and isinstance(answer.get("answer"), str):
            records.append(answer)
        else:
            raise UsageError(f"{where}: answers[{position - 1}] must be a string or an object with an 'answer'")
    return VQAAnnotation(
        question_id=entry["question_id"],
        answers=records,
        answer_type=_optional_str(entry.get("answer_type")),
        question_type=_optional_str(entry.get("question_type")),
    )


def _question_keys(questions_file: Path) -> set[str]:
    document = _load_json(questions_file)
    entries = document.get("questions") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "question_id" in e for e in entries):
        raise UsageError(f"{questions_file}: expected a JSON object with a 'questions' list of question objects")
    return {question_key(entry["question_id"]) for entry in entries}


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _load_json(path: Path) -> Any:
    try:
        with path.open("rb") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise UsageError(f"{path} not found") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSON, integers too long
        raise UsageError(f"{path}: not valid JSON ({' '.join(str(exc).split()) or type(exc).__name__})") from None


def human_answers_for(annotations: Mapping[str, VQAAnnotation], question_id: Any) -> Sequence[dict[str, Any]] | None:
    entry = annotations.get(question_key(question_id))
    return entry.answers if entry is not None else None

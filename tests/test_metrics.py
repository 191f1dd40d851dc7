"""The evaluation metrics against the original eval code's own outputs (parity fixtures), and the registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import require_parity

from monkey_cli.errors import UsageError
from monkey_cli.evaluation import metrics
from monkey_cli.evaluation.datasets import (
    REGISTRY,
    VIZWIZ_PROMPT,
    format_prompt,
    get_spec,
    load_vqa_annotations,
    validate_prompt,
)
from monkey_cli.evaluation.scoring import score_records

AGGREGATE_TOLERANCE = 1e-9


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    path = require_parity("metric_cases.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads(require_parity("metric_expected.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def paired(cases, expected) -> list[tuple[dict, dict]]:
    per_case = {entry["id"]: entry for entry in expected["per_case"]}
    assert len(cases) == expected["aggregate"]["n_cases"] == len(per_case)
    return [(case, per_case[case["id"]]) for case in cases]


# --------------------------------------------------------------------------------------------------
# Per case: every number and every processed string the reference produced
# --------------------------------------------------------------------------------------------------


def _vqa_processed_answers(case: dict) -> list[str]:
    records = metrics.vqa_normalize_human_answers(metrics.as_vqa_answer_records(case["vqa_answers"]))
    return [record["answer"] for record in records]


# fixture field -> how this implementation computes it for one case
PER_CASE = {
    "anls": lambda c: metrics.anls(c["prediction"], c["annotations"]),
    "relaxed_accuracy": lambda c: metrics.relaxed_accuracy(c["prediction"], c["annotations"]),
    "exact_match": lambda c: metrics.exact_match(c["prediction"], c["annotations"]),
    "gqa_processed_prediction": lambda c: metrics.gqa_postprocess(c["prediction"]),
    "exact_match_gqa": lambda c: metrics.exact_match(metrics.gqa_postprocess(c["prediction"]), c["annotations"]),
    # VQAEval(n=2).evalQA is round(100 * acc, 2); the fixture stores it / 100. n=10 is effectively unrounded.
    "vqa_accuracy": lambda c: metrics.vqa_round(metrics.vqa_accuracy(c["prediction"], c["vqa_answers"])) / 100,
    "vqa_accuracy_n10": lambda c: metrics.vqa_round(metrics.vqa_accuracy(c["prediction"], c["vqa_answers"]), 10) / 100,
    "vqa_processed_prediction": lambda c: metrics.vqa_normalize_answer(c["prediction"]),
    "vqa_processed_answers": _vqa_processed_answers,
}


@pytest.mark.parametrize("field", list(PER_CASE))
def test_every_case_equals_the_reference(paired, field):
    compute = PER_CASE[field]
    wrong = [
        f"{case['id']} ({case['group']}): {compute(case)!r} != {want[field]!r}"
        for case, want in paired
        if compute(case) != want[field]
    ]
    assert wrong == []


# --------------------------------------------------------------------------------------------------
# Aggregates, through the same scoring path `monkey eval score` and the runner use
# --------------------------------------------------------------------------------------------------


def _records(cases, annotation_field="annotations"):
    return [
        (index, {"question_id": case["id"], "answer": case["prediction"], "annotation": case[annotation_field]})
        for index, case in enumerate(cases, start=1)
    ]


@pytest.mark.parametrize(
    ("metric", "gqa", "key"),
    [
        ("anls", False, "anls"),
        ("relaxed_accuracy", False, "relaxed_accuracy"),
        ("accuracy", False, "exact_match"),
        ("accuracy", True, "exact_match_gqa"),
    ],
)
def test_aggregate_scores(cases, expected, metric, gqa, key):
    report = score_records(_records(cases), metric, gqa_postprocess=gqa)
    assert report.errors == []
    assert report.result.n == len(cases)
    assert abs(report.result.score - expected["aggregate"][key]) <= AGGREGATE_TOLERANCE


def test_aggregate_matches_the_reference_end_to_end_values(cases, expected):
    # The reference's own evaluate() printed these for the same predictions.
    end_to_end = expected["end_to_end"]
    anls = score_records(_records(cases), "anls").result.score
    assert abs(anls - end_to_end["docvqa_test"]["value"]) <= AGGREGATE_TOLERANCE
    gqa = score_records(_records(cases), "accuracy", gqa_postprocess=True).result.score
    assert abs(gqa - end_to_end["gqa_testdev"]["value"]) <= AGGREGATE_TOLERANCE
    vqa = score_records(_records(cases, "vqa_answers"), "vqa_score").result.score
    assert abs(vqa - end_to_end["textvqa_val"]["value"]) <= AGGREGATE_TOLERANCE


def test_vqa_overall_from_human_answer_lists(cases, expected):
    result = score_records(_records(cases, "vqa_answers"), "vqa_score").result
    assert abs(result.score - expected["aggregate"]["vqa_overall_n2"]) <= AGGREGATE_TOLERANCE
    assert abs(result.details["score_unrounded"] - expected["aggregate"]["vqa_overall_n10"]) <= AGGREGATE_TOLERANCE
    assert result.percent == result.score  # the VQA score is already a percentage


def test_vqa_overall_from_official_annotation_files(cases, expected, tmp_path: Path):
    # Same cases, the way vqav2/okvqa/textvqa/vizwiz are scored: annotation + question files, matched by id.
    annotations = {
        "annotations": [
            {
                "question_id": index,
                "image_id": 1,
                "question_type": "what",
                "answer_type": "yes/no" if case["group"] == "yes_no" else "other",
                "answers": [
                    {"answer": answer, "answer_confidence": "yes", "answer_id": number}
                    for number, answer in enumerate(case["vqa_answers"], start=1)
                ],
            }
            for index, case in enumerate(cases)
        ]
    }
    questions = {"questions": [{"question_id": index, "question": "?"} for index in range(len(cases))]}
    (tmp_path / "ann.json").write_text(json.dumps(annotations))
    (tmp_path / "q.json").write_text(json.dumps(questions))
    loaded = load_vqa_annotations(tmp_path / "ann.json", tmp_path / "q.json")
    records = [(index, {"question_id": index, "answer": case["prediction"]}) for index, case in enumerate(cases)]
    result = score_records(records, "vqa_score", vqa_annotations=loaded).result
    assert abs(result.score - expected["aggregate"]["vqa_overall_n2"]) <= AGGREGATE_TOLERANCE
    assert abs(result.details["score_unrounded"] - expected["aggregate"]["vqa_overall_n10"]) <= AGGREGATE_TOLERANCE
    per_type = result.details["per_answer_type"]
    yes_no = [c for c in cases if c["group"] == "yes_no"]
    want = 100 * sum(metrics.vqa_accuracy(c["prediction"], c["vqa_answers"]) for c in yes_no) / len(yes_no)
    assert per_type["yes/no"] == round(want, 2)


# --------------------------------------------------------------------------------------------------
# Quirks worth pinning beyond the fixture (values derived by hand from the documented rules)
# --------------------------------------------------------------------------------------------------


def test_anls_normalises_by_unstripped_annotation_length():
    # distance("pari", "paris") = 1, divided by len("Paris   ") = 8.
    assert metrics.anls("Pari", ["Paris   "]) == 1 - 1 / 8
    assert metrics.anls("", [""]) == 1.0
    assert metrics.anls("abc", ["xyz"]) == 0.0


def test_relaxed_accuracy_uses_the_answer_as_target():
    assert metrics.relaxed_accuracy("100", ["95"]) == 1.0  # |95 - 100| / 100 = 0.05
    assert metrics.relaxed_accuracy("95", ["100"]) == 0.0  # |100 - 95| / 95 > 0.05
    assert metrics.relaxed_accuracy("0", ["0.0"]) == 0.0  # a zero target falls back to string equality
    assert metrics.relaxed_accuracy("50%", ["0.5"]) == 1.0


def test_exact_match_is_containment_after_removing_dots():
    assert metrics.exact_match("3.5", ["35"]) == 1.0
    assert metrics.exact_match("3.5", ["3.5"]) == 0.0
    assert metrics.exact_match("not sure", ["no"]) == 1.0


def test_vqa_leave_one_out_compares_whole_records():
    # With answer ids every human is distinct: 5 "red" humans each see 4 other reds (1.0), blues see 5 (1.0).
    with_ids = [{"answer": a, "answer_id": i} for i, a in enumerate(["red"] * 5 + ["blue"] * 5, start=1)]
    assert metrics.vqa_accuracy("red", with_ids) == 1.0
    # Without ids identical records drop out together: reds see no red (0), blues see 5 reds (1) -> 0.5.
    without_ids = [{"answer": a} for a in ["red"] * 5 + ["blue"] * 5]
    assert metrics.vqa_accuracy("red", without_ids) == 0.5


def test_vqa_human_answers_are_not_lowercased():
    assert metrics.vqa_accuracy("Red", ["Red"] * 10) == 0.0  # the prediction becomes "red"
    assert metrics.vqa_accuracy("two", ["2"] * 10) == 1.0


def test_unknown_metric_is_rejected():
    with pytest.raises(UsageError, match="unknown metric"):
        score_records([], "bleu")


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

EXPECTED_REGISTRY = {
    "estvqa": ("anls", 100),
    "docvqa": ("anls", 100),
    "chartqa": ("relaxed_accuracy", 100),
    "infovqa": ("anls", 100),
    "vizwiz": ("vqa_score", 10),
    "deepform": ("accuracy", 100),
    "KLC": ("accuracy", 100),
    "WTQ": ("accuracy", 100),
    "gqa": ("accuracy", 10),
    "okvqa": ("vqa_score", 10),
    "textvqa": ("vqa_score", 10),
    "stvqa": ("anls", 100),
    "ai2diagram": ("accuracy", 10),
    "vqav2": ("vqa_score", 10),
}


def test_registry_has_the_14_datasets_with_metric_and_length():
    assert {name: (spec.metric, spec.max_new_tokens) for name, spec in REGISTRY.items()} == EXPECTED_REGISTRY


def test_registry_file_layout_follows_the_original_data_folder():
    assert REGISTRY["docvqa"].test_file == "docvqa/test_ans.jsonl"
    assert REGISTRY["infovqa"].test_file == "infographicVQA/infovqa_test.jsonl"
    assert REGISTRY["KLC"].test_file == "test_KleisterCharity.jsonl"
    assert REGISTRY["ai2diagram"].test_file == "ai2d/test.jsonl"
    assert REGISTRY["vqav2"].annotations_file == "vqav2/v2_mscoco_val2014_annotations.json"
    assert REGISTRY["textvqa"].questions_file == "textvqa/textvqa_val_questions.json"
    for spec in REGISTRY.values():
        has_vqa_files = spec.annotations_file is not None and spec.questions_file is not None
        assert has_vqa_files == (spec.metric == "vqa_score"), spec.name
        assert spec.gqa_postprocess == (spec.name == "gqa")


def test_registry_prompts():
    for spec in REGISTRY.values():
        validate_prompt(spec.prompt)
    assert format_prompt(REGISTRY["docvqa"].prompt, "data/x.jpg", "What is this store?") == (
        "<img>data/x.jpg</img> What is this store? Answer: "
    )
    assert REGISTRY["vizwiz"].prompt == VIZWIZ_PROMPT
    assert format_prompt(VIZWIZ_PROMPT, "v.jpg", "Q?") == (
        '<img>v.jpg</img> Q? When the provided information is insufficient, respond with "Unanswerable". Answer:'
    )


def test_prompt_placeholders_are_filled_once():
    assert format_prompt("<img>{image}</img> {question}", "{question}.jpg", "{image}?") == (
        "<img>{question}.jpg</img> {image}?"
    )


@pytest.mark.parametrize("template", ["{question} Answer:", "<img>{image}</img> Answer:", "<img>x</img> {question}"])
def test_bad_prompt_templates_are_usage_errors(template):
    with pytest.raises(UsageError):
        validate_prompt(template)


def test_dataset_lookup_is_case_insensitive():
    assert get_spec("klc").name == "KLC"
    with pytest.raises(UsageError, match="unknown dataset"):
        get_spec("mmlu")

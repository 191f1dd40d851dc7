"""The evaluation runner (batching, resume, bad data, results files) and the `monkey eval` commands.

Most tests drive the runner with a small deterministic fake model; the last one runs the real tiny
checkpoint end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import monkey_cli
import monkey_cli.cli.eval  # noqa: F401  (registers `monkey eval` on the app)
from monkey_cli.cli import app
from monkey_cli.evaluation.datasets import DEFAULT_PROMPT, VIZWIZ_PROMPT, file_task, registry_task
from monkey_cli.evaluation.runner import run_task, run_tasks

# --------------------------------------------------------------------------------------------------
# Fakes and data builders
# --------------------------------------------------------------------------------------------------


class SizeModel:
    """Answers with the image's size, so a test sees which image went with which prompt.

    Raises RuntimeError for a prompt containing `explode` when batched with others, or alone if
    `explode_alone`; raises KeyboardInterrupt on call number `interrupt_on_call` (1-based).
    """

    def __init__(self, interrupt_on_call: int | None = None, explode_alone: bool = False) -> None:
        self.calls: list[dict] = []
        self.interrupt_on_call = interrupt_on_call
        self.explode_alone = explode_alone

    def generate(self, images, prompts, max_new_tokens, min_new_tokens):
        assert min_new_tokens == 1, "the eval must never accept an empty answer (as the original)"
        self.calls.append({"prompts": list(prompts), "max_new_tokens": max_new_tokens})
        if self.interrupt_on_call == len(self.calls):
            raise KeyboardInterrupt
        assert len(images) == len(prompts)
        assert all(isinstance(image, Image.Image) for image in images)
        assert all(prompt.count("<img>") == 1 and prompt.count("</img>") == 1 for prompt in prompts)
        if any("explode" in prompt for prompt in prompts) and (len(prompts) > 1 or self.explode_alone):
            raise RuntimeError("out of memory\nsecond line")
        return [f"{image.width}x{image.height}" for image in images]

    @property
    def asked(self) -> list[str]:
        return [prompt for call in self.calls for prompt in call["prompts"]]


def size_of(index: int) -> tuple[int, int]:
    return 30 + index, 20 + index


def make_items(folder: Path, count: int, *, image_prefix: str = "") -> list[dict]:
    """`count` items with distinct image sizes; the annotation is the size the SizeModel will answer."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for index in range(count):
        Image.new("RGB", size_of(index), (index * 20, 80, 160)).save(folder / "images" / f"img_{index}.png")
        width, height = size_of(index)
        items.append(
            {
                "image": f"{image_prefix}images/img_{index}.png",
                "question": f"What is shown in picture {index}?",
                "answer": f"{width}x{height}",
                "question_id": index,
            }
        )
    return items


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def dataset_file(tmp_path: Path, count: int = 5) -> Path:
    return write_jsonl(tmp_path / "data" / "set.jsonl", make_items(tmp_path / "data", count))


# --------------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------------


def test_run_batches_pairs_images_with_prompts_and_scores(tmp_path):
    items = make_items(tmp_path / "data", 5)
    items[3]["answer"] = "wrong"  # one miss -> accuracy 4/5
    task = file_task(write_jsonl(tmp_path / "data" / "set.jsonl", items), "accuracy", max_new_tokens=7)
    model = SizeModel()
    out = tmp_path / "out"

    run = run_task(model, task, out, batch_size=2, report=pytest.fail)

    assert [len(call["prompts"]) for call in model.calls] == [2, 2, 1]
    assert {call["max_new_tokens"] for call in model.calls} == {7}
    assert model.asked[0] == "<img>images/img_0.png</img> What is shown in picture 0? Answer: "
    records = read_jsonl(out / "set.predictions.jsonl")
    assert [r["question_id"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["answer"] for r in records] == ["{}x{}".format(*size_of(i)) for i in range(5)]
    assert records[3]["annotation"] == ["wrong"]
    assert run.score == pytest.approx(0.8)
    assert (run.generated, run.resumed, run.failed, run.items) == (5, 0, 0, 5)
    assert not (out / "set.errors.jsonl").exists()


def test_registry_defaults_reach_the_model(tmp_path):
    root = tmp_path / "data"
    write_jsonl(root / "gqa" / "gqa_testdev_new.jsonl", make_items(root, 1, image_prefix="data/"))
    model = SizeModel()
    run = run_task(model, registry_task("gqa", root), tmp_path / "out", report=pytest.fail)
    assert model.calls[0]["max_new_tokens"] == 10
    assert run.task.gqa_postprocess and run.score == 1.0


def test_resume_after_an_interruption_asks_only_the_rest(tmp_path):
    task = file_task(dataset_file(tmp_path, 5), "anls")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_task(SizeModel(interrupt_on_call=2), task, out, batch_size=2)
    saved = read_jsonl(out / "set.predictions.jsonl")
    assert [r["question_id"] for r in saved] == [0, 1]  # the first batch was flushed before the interrupt

    model = SizeModel()
    run = run_task(model, task, out, batch_size=2, report=pytest.fail)

    assert [p.split("picture ")[1][0] for p in model.asked] == ["2", "3", "4"]
    records = read_jsonl(out / "set.predictions.jsonl")
    assert sorted(r["question_id"] for r in records) == [0, 1, 2, 3, 4]
    assert (run.resumed, run.generated) == (2, 3)
    assert run.score == 1.0 and run.report.result.n == 5


def test_a_line_cut_short_by_a_kill_is_asked_again(tmp_path):
    task = file_task(dataset_file(tmp_path, 3), "anls")
    out = tmp_path / "out"
    run_task(SizeModel(), task, out)
    predictions = out / "set.predictions.jsonl"
    lines = predictions.read_text(encoding="utf-8").splitlines()
    predictions.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:15], encoding="utf-8")  # no newline

    messages: list[str] = []
    model = SizeModel()
    run = run_task(model, task, out, report=messages.append)

    assert len(model.asked) == 1 and "picture 2" in model.asked[0]
    assert len(messages) == 1 and "set.predictions.jsonl:3" in messages[0] and "malformed JSON" in messages[0]
    assert json.loads(predictions.read_text(encoding="utf-8").splitlines()[-1])["question_id"] == 2
    assert run.report.result.n == 3 and run.failed == 0


def test_bad_items_are_recorded_and_the_run_goes_on(tmp_path):
    folder = tmp_path / "data"
    good = make_items(folder, 4)
    (folder / "images" / "broken.png").write_bytes(b"not a png at all")
    rows = [
        good[0],
        '{"image": "images/img_1.png", "question": ',  # line 2: malformed
        {"image": "images/img_1.png", "answer": "x", "question_id": 10},  # line 3: no question
        {**good[1], "image": "images/missing.png"},  # line 4: image not found
        {**good[2], "image": "images/broken.png"},  # line 5: unreadable image
        {**good[3], "question_id": 0},  # line 6: duplicate id
        {**good[3], "question_id": 11, "answer": {"text": "x"}},  # line 7: bad answer type
        good[3],  # line 8
        {**good[2], "question_id": 12},  # line 9
    ]
    task = file_task(write_jsonl(folder / "set.jsonl", rows), "accuracy")
    messages: list[str] = []
    model = SizeModel()

    run = run_task(model, task, tmp_path / "out", batch_size=2, report=messages.append)

    assert [len(call["prompts"]) for call in model.calls] == [2, 1]  # bad items do not shrink batches
    errors = read_jsonl(tmp_path / "out" / "set.errors.jsonl")
    assert [e["line"] for e in errors] == [2, 3, 6, 7, 4, 5]  # read errors first, then image errors
    by_line = {e["line"]: e["error"] for e in errors}
    assert "malformed JSON" in by_line[2]
    assert by_line[3] == "missing field 'question'"
    assert by_line[6] == "duplicate question_id (first on line 1)"
    assert "'answer'" in by_line[7]
    assert "images/missing.png not found" in by_line[4]
    assert by_line[5].endswith("broken.png: unsupported type: text (supported: PDF, PNG, JPEG, TIFF, WEBP, BMP, GIF, "
                               "JPEG 2000, AVIF, PNM)")
    assert len(messages) == 6 and all("\n" not in m for m in messages)
    assert any(m.startswith("set: ") and ":4: question 1: image images/missing.png" in m for m in messages)
    assert sorted(r["question_id"] for r in read_jsonl(tmp_path / "out" / "set.predictions.jsonl")) == [0, 3, 12]
    assert (run.failed, run.items, run.report.result.n) == (6, 9, 3)
    assert run.to_dict()["complete"] is False


def test_pdf_pages_are_images_and_a_bad_image_is_one_clear_line(tmp_path):
    """`doc.pdf` is its first page, `doc.pdf#page=N` its page N, rendered as `monkey ask` renders them; a
    file that is no image, a damaged one, and a page the document lacks each get one line saying so."""
    import shutil

    from conftest import SAMPLES_DIR

    from monkey_cli.documents import DEFAULT_SIZE, iter_pages

    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(SAMPLES_DIR / "report.pdf", folder / "report.pdf")
    (folder / "notes.jpg").write_text("not an image")
    (folder / "cut.png").write_bytes((SAMPLES_DIR / "chart.png").read_bytes()[:300])
    rows = [
        {"image": "report.pdf", "question": "q", "answer": "a", "question_id": 1},
        {"image": "report.pdf#page=3", "question": "q", "answer": "a", "question_id": 2},
        {"image": "report.pdf#page=9", "question": "q", "answer": "a", "question_id": 3},
        {"image": "notes.jpg", "question": "q", "answer": "a", "question_id": 4},
        {"image": "cut.png", "question": "q", "answer": "a", "question_id": 5},
        {"image": "report.pdf#page=0", "question": "q", "answer": "a", "question_id": 6},
    ]
    seen: list = []

    class Recorder:
        def generate(self, images, prompts, max_new_tokens, min_new_tokens):
            seen.extend(images)
            return ["a"] * len(images)

    messages: list[str] = []
    task = file_task(write_jsonl(folder / "set.jsonl", rows), "accuracy")
    run = run_task(Recorder(), task, tmp_path / "out", batch_size=4, report=messages.append)
    first, third = (next(iter_pages([folder / "report.pdf"], size=DEFAULT_SIZE, pages=[n])).image for n in (1, 3))
    assert [image.tobytes() for image in seen] == [first.tobytes(), third.tobytes()]
    assert (run.failed, run.report.result.n) == (4, 2)
    report = str(folder / "report.pdf")
    assert [m.split(": ", 3)[3] for m in messages] == [
        f"image {report}#page=9: no such page (the document has 3)",
        f"image {folder / 'notes.jpg'}: unsupported type: text (supported: PDF, PNG, JPEG, TIFF, WEBP, BMP, GIF, "
        "JPEG 2000, AVIF, PNM)",
        f"image {folder / 'cut.png'}: cannot read it (image file is truncated)",
        "image report.pdf#page=0: pages are numbered from 1",
    ]
    assert all("\n" not in m and "BufferedReader" not in m for m in messages)


def test_a_failing_batch_is_retried_item_by_item(tmp_path):
    items = make_items(tmp_path / "data", 3)
    items[1]["question"] = "Will this explode?"
    task = file_task(write_jsonl(tmp_path / "data" / "set.jsonl", items), "anls")
    out = tmp_path / "out"
    messages: list[str] = []

    run = run_task(SizeModel(explode_alone=True), task, out, batch_size=3, report=messages.append)

    assert sorted(r["question_id"] for r in read_jsonl(out / "set.predictions.jsonl")) == [0, 2]
    [error] = read_jsonl(out / "set.errors.jsonl")
    assert error["question_id"] == 1
    assert error["error"] == "generation failed: RuntimeError: out of memory second line"
    assert run.failed == 1 and len(messages) == 1

    # A rerun retries only the failed item; with no error left the stale errors file goes away.
    model = SizeModel()
    rerun = run_task(model, task, out, batch_size=3, report=pytest.fail)
    assert len(model.asked) == 1 and "explode" in model.asked[0]
    assert rerun.failed == 0 and rerun.score == 1.0
    assert not (out / "set.errors.jsonl").exists()


def test_image_paths_resolve_like_the_original_data_folder(tmp_path):
    # The original's files say "data/docvqa/..." and run from the folder holding data/; a data root under
    # another name still works.
    for root in (tmp_path / "one" / "data", tmp_path / "two" / "bench"):
        items = make_items(root / "docvqa", 2, image_prefix="data/docvqa/")
        write_jsonl(root / "docvqa" / "test_ans.jsonl", items)
        run = run_task(SizeModel(), registry_task("docvqa", root), tmp_path / f"out-{root.name}", report=pytest.fail)
        assert run.report.result.n == 2 and run.score == 1.0


def test_limit_takes_the_first_items(tmp_path):
    task = file_task(dataset_file(tmp_path, 5), "anls")
    model = SizeModel()
    run = run_task(model, task, tmp_path / "out", limit=2, show_progress=True)  # the bar must not get in the way
    assert len(model.asked) == 2 and run.items == 2 and run.report.result.n == 2


def _vqa_root(tmp_path: Path, answers_per_question: list[list[str]]) -> Path:
    root = tmp_path / "data"
    items = make_items(root / "textvqa", len(answers_per_question), image_prefix="data/textvqa/")
    for item in items:
        del item["answer"]  # the VQA sets are scored from the annotation file
    write_jsonl(root / "textvqa" / "textvqa_val.jsonl", items)
    annotations = [
        {
            "question_id": i,
            "answer_type": "other",
            "answers": [{"answer": a, "answer_id": n + 1} for n, a in enumerate(ans)],
        }
        for i, ans in enumerate(answers_per_question)
    ]
    (root / "textvqa" / "textvqa_val_annotations.json").write_text(json.dumps({"annotations": annotations}))
    questions = [{"question_id": i} for i in range(len(answers_per_question))]
    (root / "textvqa" / "textvqa_val_questions.json").write_text(json.dumps({"questions": questions}))
    return root


def test_vqa_score_dataset_uses_the_annotation_file(tmp_path):
    # Item 0: all 10 humans say "30x20" -> 100; item 1: 2 of 10 say "31x21" -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    root = _vqa_root(tmp_path, [["30x20"] * 10, ["31x21"] * 2 + ["other"] * 8])
    run = run_task(SizeModel(), registry_task("textvqa", root), tmp_path / "out", report=pytest.fail)
    assert run.score == 80.0 and run.report.result.details["per_answer_type"] == {"other": 80.0}


def test_vqa_question_missing_from_annotations_is_an_item_error(tmp_path):
    root = _vqa_root(tmp_path, [["30x20"] * 10])
    rows = read_jsonl(root / "textvqa" / "textvqa_val.jsonl") + [{"image": "x.png", "question": "q", "question_id": 99}]
    write_jsonl(root / "textvqa" / "textvqa_val.jsonl", rows)
    messages: list[str] = []
    run = run_task(SizeModel(), registry_task("textvqa", root), tmp_path / "out", report=messages.append)
    assert run.failed == 1 and "question 99: question_id not found in the VQA annotation" in messages[0]
    assert run.score == 100.0


def test_results_files_merge_across_runs(tmp_path):
    out = tmp_path / "out"
    first = file_task(dataset_file(tmp_path / "a", 2), "anls", name="first")
    second = file_task(dataset_file(tmp_path / "b", 3), "relaxed_accuracy", name="second")
    run_tasks(SizeModel(), [first], out, model_name="fake")
    run_tasks(SizeModel(), [second], out, model_name="fake")
    results = json.loads((out / "results.json").read_text())
    assert set(results["datasets"]) == {"first", "second"} and results["model"] == "fake"
    assert results["datasets"]["second"]["n_scored"] == 3 and results["datasets"]["second"]["score"] == 1.0
    table = (out / "results.md").read_text()
    assert "| first | ANLS | 100.00 | 2/2 | 0 |" in table
    assert "| second | Relaxed accuracy | 100.00 | 3/3 | 0 |" in table


# --------------------------------------------------------------------------------------------------
# CLI: monkey eval run
# --------------------------------------------------------------------------------------------------


class FakeMonkey:
    loads: list[tuple] = []
    model: SizeModel = SizeModel()

    @classmethod
    def load(cls, path, device="cpu", dtype=None, quant=None, adapter=None, compile=None, batch_size=None):
        cls.loads.append((path, device, dtype, quant, adapter, compile))
        return cls.model


@pytest.fixture
def fake_monkey(monkeypatch):
    FakeMonkey.loads = []
    FakeMonkey.model = SizeModel()
    monkeypatch.setattr(monkey_cli, "Monkey", FakeMonkey, raising=False)
    return FakeMonkey


def _suite_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_jsonl(root / "docvqa" / "test_ans.jsonl", make_items(root / "docvqa", 3, image_prefix="data/docvqa/"))
    write_jsonl(root / "vizwiz" / "vizwiz_val.jsonl", [])
    answers = {"question_id": 0, "answers": [{"answer": "30x20", "answer_id": n} for n in range(1, 11)]}
    (root / "vizwiz" / "vizwiz_val_annotations.json").write_text(json.dumps({"annotations": [answers]}))
    (root / "vizwiz" / "vizwiz_val_questions.json").write_text(json.dumps({"questions": [{"question_id": 0}]}))
    vizwiz_item = make_items(root / "vizwiz", 1, image_prefix="data/vizwiz/")[0]
    write_jsonl(root / "vizwiz" / "vizwiz_val.jsonl", [vizwiz_item])
    return root


def test_cli_run_on_registry_datasets(tmp_path, fake_monkey):
    root = _suite_root(tmp_path)
    out = tmp_path / "out"
    args = ["eval", "run", "--data-root", str(root), "-d", "docvqa", "-d", "vizwiz", "--out", str(out), "-b", "2"]
    result = CliRunner().invoke(app, [*args, "--model", "some/model", "--quant", "none"])

    assert result.exit_code == 0, result.output
    assert fake_monkey.loads == [("some/model", "auto", "auto", "none", None, None)]  # --dtype auto: the checkpoint's
    assert result.stdout.splitlines() == ["docvqa\tanls\t1.0", "vizwiz\tvqa_score\t100.0"]
    assert "Evaluation results" in result.stderr  # the rich table goes to stderr
    assert fake_monkey.model.asked[-1] == VIZWIZ_PROMPT.format(
        image="data/vizwiz/images/img_0.png", question="What is shown in picture 0?"
    )
    assert fake_monkey.model.asked[0] == DEFAULT_PROMPT.format(
        image="data/docvqa/images/img_0.png", question="What is shown in picture 0?"
    )
    results = json.loads((out / "results.json").read_text())
    assert results["datasets"]["vizwiz"]["score"] == 100.0 and results["datasets"]["docvqa"]["n_scored"] == 3
    assert results["datasets"]["docvqa"]["model_settings"] == {
        "device": "auto",
        "dtype": "auto",
        "quant": "none",
        "adapter": None,
        "adapter_sha256": None,
    }
    assert (out / "results.md").exists() and (out / "docvqa.predictions.jsonl").exists()


def test_cli_run_all_runs_what_is_present(tmp_path, fake_monkey):
    root = _suite_root(tmp_path)
    result = CliRunner().invoke(app, ["eval", "run", "--data-root", str(root), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == ["docvqa", "vizwiz"]
    assert "skipping datasets not found" in result.stderr and "chartqa" in result.stderr


def test_cli_run_file_with_prompt_override_and_bad_items(tmp_path, fake_monkey):
    data = dataset_file(tmp_path, 2)
    with data.open("a") as handle:
        handle.write("{oops\n")
    args = ["eval", "run", "--file", str(data), "--metric", "anls", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--prompt", "Q: {question} <img>{image}</img>", "--max-new-tokens", "3"])
    assert result.exit_code == 1
    assert result.stdout.splitlines() == ["set\tanls\t1.0"]
    assert "set.jsonl:3: malformed JSON" in result.stderr
    assert fake_monkey.model.asked[0] == "Q: What is shown in picture 0? <img>images/img_0.png</img>"
    assert fake_monkey.model.calls[0]["max_new_tokens"] == 3


def test_cli_run_out_must_be_a_folder(tmp_path, fake_monkey):
    data = dataset_file(tmp_path, 1)
    result = CliRunner().invoke(app, ["eval", "run", "--file", str(data), "--metric", "anls", "--out", str(data)])
    assert result.exit_code == 2 and "is a file" in result.stderr and fake_monkey.loads == []


def test_cli_run_interrupted_exits_130_and_keeps_predictions(tmp_path, fake_monkey):
    fake_monkey.model = SizeModel(interrupt_on_call=2)
    out = tmp_path / "out"
    args = ["eval", "run", "--file", str(dataset_file(tmp_path, 3)), "--metric", "anls", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130
    assert len(read_jsonl(out / "set.predictions.jsonl")) == 1



@pytest.mark.parametrize(
    ("changed_args", "changed"),
    [
        (["--max-new-tokens", "5"], "max_new_tokens"),
        (["--quant", "8bit"], "quant"),
        (["--prompt", "Q: {question} <img>{image}</img>"], "prompt"),
        (["--model", "other/model"], "model"),
    ],
)
def test_cli_run_resumes_only_with_the_same_settings(tmp_path, fake_monkey, changed_args, changed):
    """A resume with another model, quantization, prompt or answer length would score two runs' answers as
    one: it is refused (exit 2, one line naming what changed) and the predictions are left as they were;
    the same settings resume."""
    out = tmp_path / "out"
    args = ["eval", "run", "--file", str(dataset_file(tmp_path, 3)), "--metric", "anls", "--out", str(out)]
    first = CliRunner().invoke(app, [*args, "--limit", "1", "--quant", "none"])
    assert first.exit_code == 0, first.output
    kept = (out / "set.predictions.jsonl").read_bytes()
    assert json.loads((out / "set.settings.json").read_text())["quant"] == "none"

    refused = CliRunner().invoke(app, [*args, "--quant", "none", *changed_args])
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.count("\n") == 1 and "holds answers made with other settings" in refused.stderr
    assert f"(changed: {changed})" in refused.stderr
    assert (out / "set.predictions.jsonl").read_bytes() == kept

    resumed = CliRunner().invoke(app, [*args, "--quant", "none", "--device", "cpu"])  # where it runs: no matter
    assert resumed.exit_code == 0, resumed.output
    assert len(read_jsonl(out / "set.predictions.jsonl")) == 3
    assert json.loads((out / "results.json").read_text())["datasets"]["set"]["n_resumed"] == 1

@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data-root", "{tmp}/nowhere"], "data root"),
        (["--data-root", "{tmp}", "-d", "mmlu"], "unknown dataset 'mmlu'"),
        (["--data-root", "{tmp}", "-d", "docvqa"], "docvqa/test_ans.jsonl not found"),
        (["--data-root", "{tmp}"], "no dataset of the registry found"),
        (["--file", "{tmp}/set.jsonl"], "--file needs --metric"),
        (["--file", "{tmp}/none.jsonl", "--metric", "anls"], "none.jsonl not found"),
        (["--file", "{tmp}/set.jsonl", "--metric", "bleu"], "unknown metric 'bleu'"),
        (["--file", "{tmp}/set.jsonl", "--metric", "anls", "--prompt", "{question}"], "must contain exactly one"),
        (["--data-root", "{tmp}", "--metric", "anls"], "--metric only applies to --file"),
        ([], "give --data-root"),
    ],
)
def test_cli_run_usage_errors_exit_2_before_loading_the_model(tmp_path, fake_monkey, args, message):
    write_jsonl(tmp_path / "set.jsonl", [])
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    result = CliRunner().invoke(app, ["eval", "run", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert fake_monkey.loads == []


# --------------------------------------------------------------------------------------------------
# CLI: monkey eval score
# --------------------------------------------------------------------------------------------------


def _predictions(tmp_path: Path) -> Path:
    rows = [
        {"question_id": 1, "answer": "The cat.", "annotation": ["cat"]},
        {"question_id": 2, "answer": "a dog", "annotation": "dog"},
        {"question_id": 3, "answer": "it is a bird", "annotation": ["fish"]},
        {"question_id": 4, "answer": "banana split", "annotation": ["banana"]},
    ]
    return write_jsonl(tmp_path / "pred.jsonl", rows)


def test_cli_score_json_and_text(tmp_path):
    path = _predictions(tmp_path)
    result = CliRunner().invoke(app, ["eval", "score", str(path), "--metric", "accuracy", "--format", "json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["score"] == 0.75 and payload["n"] == 4 and payload["n_failed"] == 0
    # GQA post-processing: "the cat" -> "cat", "a dog" -> "dog", "banana split" -> "split" (a miss).
    result = CliRunner().invoke(app, ["eval", "score", str(path), "--metric", "accuracy", "--gqa-postprocess"])
    assert result.exit_code == 0 and result.stdout == "accuracy 0.5 over 4 predictions\n"


def test_cli_score_reads_the_original_json_array_output(tmp_path):
    rows = [
        {"questionId": 1, "answer": "Paris", "annotation": ["Paris"]},
        {"questionId": 2, "answer": "x", "annotation": ["Rome"]},
    ]
    path = tmp_path / "docvqa_test.json"
    path.write_text(json.dumps(rows, indent=2))
    result = CliRunner().invoke(app, ["eval", "score", str(path), "--metric", "anls"])
    assert result.exit_code == 0 and result.stdout == "anls 0.5 over 2 predictions\n"


def test_cli_score_with_vqa_annotation_files(tmp_path):
    answers = [{"answer": a, "answer_id": n} for n, a in enumerate(["2"] * 3 + ["3"] * 7, start=1)]
    (tmp_path / "ann.json").write_text(json.dumps({"annotations": [{"question_id": 7, "answers": answers}]}))
    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"question_id": 7}]}))
    path = write_jsonl(tmp_path / "pred.jsonl", [{"question_id": 7, "answer": "Two"}])
    args = ["eval", "score", str(path), "--metric", "vqa_score", "--annotations", str(tmp_path / "ann.json")]
    result = CliRunner().invoke(app, [*args, "--questions", str(tmp_path / "q.json"), "--format", "json"])
    assert result.exit_code == 0, result.output
    # 3 humans said "2": each sees 2 others (2/3), the 7 others see 3 (1) -> (3 * 2/3 + 7) / 10 = 90 %.
    assert json.loads(result.stdout)["score"] == 90.0


def test_cli_score_bad_records_are_reported_and_exit_1(tmp_path):
    path = _predictions(tmp_path)
    with path.open("a") as handle:
        handle.write('{"question_id": 5, "annotation": ["x"]}\nnot json\n')
    result = CliRunner().invoke(app, ["eval", "score", str(path), "--metric", "accuracy"])
    assert result.exit_code == 1
    assert result.stdout == "accuracy 0.75 over 4 predictions\n"
    assert "pred.jsonl:5: question 5: missing field 'answer'" in result.stderr
    assert "pred.jsonl:6: malformed JSON" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/missing.jsonl", "--metric", "anls"], "missing.jsonl not found"),
        (["{tmp}/pred.jsonl", "--metric", "bleu"], "unknown metric"),
        (["{tmp}/pred.jsonl", "--metric", "anls", "--annotations", "{tmp}/pred.jsonl"], "only apply to"),
        (["{tmp}/pred.jsonl", "--metric", "vqa_score", "--annotations", "{tmp}/nope.json"], "nope.json not found"),
        (["{tmp}/pred.jsonl", "--metric", "anls", "--format", "xml"], "--format"),
    ],
)
def test_cli_score_usage_errors(tmp_path, args, message):
    _predictions(tmp_path)
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    result = CliRunner().invoke(app, ["eval", "score", *args])
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1


def test_scoring_path_never_imports_torch(tmp_path):
    path = _predictions(tmp_path)
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "import monkey_cli.cli.eval\n"
        "from monkey_cli.cli import app\n"
        f"result = CliRunner().invoke(app, ['eval', 'score', {str(path)!r}, '--metric', 'anls'])\n"
        "assert result.exit_code == 0, result.output\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy', 'PIL') if m in sys.modules)\n"
        "print(','.join(heavy) or 'none')\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "none"


# --------------------------------------------------------------------------------------------------
# End to end with the real tiny checkpoint
# --------------------------------------------------------------------------------------------------


class InterruptAfterFirstBatch:
    """Wraps a model: the first call goes through, the second raises KeyboardInterrupt (a Ctrl-C)."""

    def __init__(self, model) -> None:
        self.model = model
        self.calls = 0

    def generate(self, images, prompts, max_new_tokens, min_new_tokens=1):
        self.calls += 1
        if self.calls > 1:
            raise KeyboardInterrupt
        return self.model.generate(images, prompts, max_new_tokens=max_new_tokens)


class Recording:
    def __init__(self, model) -> None:
        self.model = model
        self.prompts: list[str] = []

    def generate(self, images, prompts, max_new_tokens, min_new_tokens=1):
        self.prompts += prompts
        return self.model.generate(images, prompts, max_new_tokens=max_new_tokens)


def test_end_to_end_with_the_tiny_checkpoint(tiny_monkey_dir, tmp_path):
    from monkey_cli import Monkey

    model = Monkey.load(str(tiny_monkey_dir), device="cpu")
    data = dataset_file(tmp_path, 3)
    task = file_task(data, "anls", max_new_tokens=4)
    out = tmp_path / "out"

    with pytest.raises(KeyboardInterrupt):
        run_task(InterruptAfterFirstBatch(model), task, out, batch_size=2)
    first = read_jsonl(out / "set.predictions.jsonl")
    assert [r["question_id"] for r in first] == [0, 1]
    assert all(isinstance(r["answer"], str) for r in first)

    recording = Recording(model)
    [run] = run_tasks(recording, [task], out, batch_size=2, model_name=str(tiny_monkey_dir), report=pytest.fail)
    assert recording.prompts == ["<img>images/img_2.png</img> What is shown in picture 2? Answer: "]
    records = read_jsonl(out / "set.predictions.jsonl")
    assert [r["question_id"] for r in records] == [0, 1, 2] and records[:2] == first
    assert (run.resumed, run.generated, run.failed) == (2, 1, 0)
    assert 0.0 <= run.score <= 1.0 and run.report.result.n == 3

    results = json.loads((out / "results.json").read_text())
    entry = results["datasets"]["set"]
    assert results["model"] == str(tiny_monkey_dir)
    assert entry["n_scored"] == 3 and entry["score"] == run.score and entry["max_new_tokens"] == 4
    assert "| set | ANLS |" in (out / "results.md").read_text()

    # The CLI loads the same checkpoint itself; same batches, so the same greedy answers.
    args = ["eval", "run", "--model", str(tiny_monkey_dir), "--device", "cpu", "--file", str(data), "--metric", "anls"]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "4", "-b", "2", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    cli_records = read_jsonl(tmp_path / "cli" / "set.predictions.jsonl")
    assert [r["answer"] for r in cli_records] == [r["answer"] for r in records]
    assert result.stdout == f"set\tanls\t{round(run.score, 4)!r}\n"


def test_scores_on_a_line_are_rounded_and_json_keeps_every_digit(tmp_path):
    rows = [{"question_id": n, "answer": "yes" if n else "no", "annotation": ["yes"]} for n in range(3)]
    path = write_jsonl(tmp_path / "pred.jsonl", rows)
    text = CliRunner().invoke(app, ["eval", "score", str(path), "--metric", "accuracy"])
    assert text.stdout == "accuracy 0.6667 over 3 predictions\n"
    as_json = CliRunner().invoke(app, ["eval", "score", str(path), "--metric", "accuracy", "--format", "json"])
    assert json.loads(as_json.stdout)["score"] == 2 / 3


def test_results_md_names_the_adapter(tmp_path):
    from monkey_cli.evaluation.runner import results_markdown

    entry = {"dataset": "docvqa", "metric": "anls", "n_scored": 3, "n_items": 3, "n_failed": 0, "percent": 50.0}
    plain = results_markdown({"model": "m", "datasets": {"docvqa": entry}})
    assert "Adapter" not in plain
    tuned = {**entry, "dataset": "forms", "model_settings": {"adapter": "runs/forms", "adapter_sha256": "ab" * 32}}
    both = results_markdown({"model": "m", "datasets": {"docvqa": entry, "forms": tuned}})
    assert "| Dataset | Metric | Score (%) | Scored | Failed | Adapter |" in both
    assert "| forms | ANLS | 50.00 | 3/3 | 0 | `runs/forms` (sha256 abababababab) |" in both
    assert "| docvqa | ANLS | 50.00 | 3/3 | 0 | - |" in both

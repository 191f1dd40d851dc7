"""Hostile model folders and oversized questions: the loader reads only regular files inside the model
folder, config values are bounded before anything is sized from them, questions are checked against the
model's context before it runs, and a bad line of a questions file fails alone."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from conftest import SAMPLES_DIR, require_parity
from typer.testing import CliRunner

import monkey_cli.model.memory
from monkey_cli import Monkey, tasks
from monkey_cli.api import PromptTooLongError
from monkey_cli.cli import _register_commands, app
from monkey_cli.errors import CheckpointError, ConfigError, MonkeyError, TokenizerError
from monkey_cli.model.configuration import MonkeyConfig, load_config
from monkey_cli.model.memory import parameter_counts, plan
from monkey_cli.model.sources import model_file
from monkey_cli.model.tokenizer import QWenTokenizer

_register_commands()
CHART = str(SAMPLES_DIR / "chart.png")
SCAN = str(SAMPLES_DIR / "scan.png")


@pytest.fixture()
def folder(tiny_monkey_dir: Path, tmp_path: Path) -> Path:
    """A private copy of tiny-monkey to damage."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_monkey_dir, dst)
    return dst


def _load_fails(folder: Path, error: type[MonkeyError], match: str) -> str:
    """Loading fails with one line (within seconds: a FIFO must never be waited on)."""
    outcome: dict = {}

    def load() -> None:
        try:
            Monkey.load(folder, device="cpu")
        except Exception as exc:  # noqa: BLE001  (the assertion below names what was expected)
            outcome["error"] = exc

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "loading hung"
    exc = outcome.get("error")
    assert isinstance(exc, error), repr(exc)
    message = str(exc)
    assert match in message and "\n" not in message, message
    return message


def _index(folder: Path, names: list[str]) -> None:
    """Replace the single safetensors file by an index that maps keys onto `names` (the first is the real file)."""
    (folder / "model.safetensors").rename(folder / "real.safetensors")
    weight_map = {"lm_head.weight": names[0], **{f"k{i}": name for i, name in enumerate(names[1:])}}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


# --- files the loader reads ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../../etc/passwd", "/etc/passwd", "..\\..\\secret", "sub/../../x"])
def test_weight_index_naming_files_outside_is_refused(folder: Path, name: str) -> None:
    _index(folder, ["real.safetensors", name])
    _load_fails(folder, CheckpointError, "a model file must be named inside the model folder")


def test_symlinks_leading_outside_are_refused(folder: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.safetensors"
    (folder / "model.safetensors").rename(outside)
    (folder / "model.safetensors").symlink_to(outside)
    _load_fails(folder, CheckpointError, "leads outside the model folder")


def test_symlinked_vocabulary_and_config_outside_are_refused(folder: Path, tmp_path: Path) -> None:
    (folder / "qwen.tiktoken").rename(tmp_path / "qwen.tiktoken")
    (folder / "qwen.tiktoken").symlink_to(tmp_path / "qwen.tiktoken")
    _load_fails(folder, TokenizerError, "leads outside the model folder")
    (folder / "config.json").rename(tmp_path / "config.json")
    (folder / "config.json").symlink_to(tmp_path / "config.json")
    _load_fails(folder, ConfigError, "leads outside the model folder")


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("qwen.tiktoken", TokenizerError),
        ("config.json", ConfigError),
        ("model.safetensors", CheckpointError),
        ("generation_config.json", CheckpointError),
    ],
)
def test_fifos_are_refused_not_waited_on(folder: Path, name: str, error: type[MonkeyError]) -> None:
    path = folder / name
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    _load_fails(folder, error, "not a regular file (a FIFO)")


def test_an_adapter_config_fifo_is_refused_as_an_adapter_without_being_read(folder: Path) -> None:
    os.mkfifo(folder / "adapter_config.json")  # never opened: a model folder holding an adapter is refused
    _load_fails(folder, CheckpointError, "holds a LoRA adapter")


def test_devices_and_folders_are_refused(folder: Path) -> None:
    (folder / "qwen.tiktoken").unlink()
    (folder / "qwen.tiktoken").mkdir()
    _load_fails(folder, TokenizerError, "not a regular file (a folder)")
    with pytest.raises(CheckpointError, match="leads outside the model folder"):
        (folder / "dev").symlink_to("/dev/zero")
        model_file(folder, "dev")


def test_vocabulary_is_read_with_a_size_limit(folder: Path, monkeypatch) -> None:
    monkeypatch.setattr("monkey_cli.model.sources.MAX_VOCAB_BYTES", 1000)
    _load_fails(folder, TokenizerError, "larger than")


def test_a_hugging_face_cache_snapshot_links_into_its_blobs(tiny_monkey_dir: Path, tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--someone--Monkey-Chat"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for item in tiny_monkey_dir.iterdir():
        blob = repo / "blobs" / f"blob-{item.name}"
        shutil.copy(item, blob)
        (snapshot / item.name).symlink_to(Path("../../blobs") / blob.name)
    monkey = Monkey.load(snapshot, device="cpu")
    assert monkey.chat  # "Monkey-Chat" in the cache path
    assert isinstance(monkey.caption(CHART, max_new_tokens=2), str)


def test_vocabulary_must_match_the_config(folder: Path) -> None:
    data = json.loads((folder / "config.json").read_text())
    data["vocab_size"] = 2100  # fewer ids than qwen.tiktoken + specials
    data["visual"]["image_start_id"] = 2000
    (folder / "config.json").write_text(json.dumps(data))
    _load_fails(folder, TokenizerError, "puts <img> at id 2214")


# --- config values ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.__setitem__("num_hidden_layers", 10**9), "field 'num_hidden_layers' must be between 1 and 512"),
        (lambda d: d.__setitem__("num_attention_heads", 0), "field 'num_attention_heads' must be between 1"),
        (lambda d: d.__setitem__("hidden_size", 10**7), "field 'hidden_size' must be between 1 and 65536"),
        (lambda d: d.__setitem__("vocab_size", 10**12), "field 'vocab_size' must be between"),
        (lambda d: d.__setitem__("seq_length", -5), "field 'seq_length' must be between 1"),
        (lambda d: d.__setitem__("max_position_embeddings", 2**40), "field 'max_position_embeddings' must be"),
        (lambda d: d.__setitem__("layer_norm_epsilon", float("nan")), "field 'layer_norm_epsilon' must be a finite"),
        (lambda d: d.__setitem__("layer_norm_epsilon", float("inf")), "field 'layer_norm_epsilon' must be a finite"),
        (lambda d: d.__setitem__("layer_norm_epsilon", 0), "field 'layer_norm_epsilon' must be a finite"),
        (lambda d: d.__setitem__("rotary_emb_base", float("nan")), "field 'rotary_emb_base' must be between"),
        (lambda d: d["visual"].__setitem__("layers", 10**6), "field 'visual.layers' must be between 1 and 512"),
        (lambda d: d["visual"].__setitem__("heads", 0), "field 'visual.heads' must be between 1"),
        (lambda d: d["visual"].__setitem__("patch_size", 0), "field 'visual.patch_size' must be between 1"),
        (lambda d: d["visual"].__setitem__("width", 10**9), "field 'visual.width' must be between"),
        (lambda d: d["visual"].__setitem__("mlp_ratio", 1e9), "field 'visual.mlp_ratio' must be between"),
        (lambda d: d["visual"].__setitem__("image_size", 448 * 100), "must be a positive multiple of 448"),
        (lambda d: d["visual"].__setitem__("image_size", [896, True]), "must be an integer or [height, width]"),
    ],
)
def test_config_values_are_bounded(folder: Path, edit, message: str) -> None:
    data = json.loads((folder / "config.json").read_text())
    edit(data)
    (folder / "config.json").write_text(json.dumps(data))
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        Monkey.load(folder, device="cpu")
    assert time.perf_counter() - started < 5
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("text", ["1" * 5000, "[" * 100_000 + "]" * 100_000])
def test_hostile_json_is_one_line(folder: Path, text: str) -> None:
    (folder / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(folder)


def test_the_planner_does_not_grow_with_the_layer_count() -> None:
    """Plans are arithmetic on the distinct tensors: an absurd layer count costs no time or memory."""
    config = MonkeyConfig(num_hidden_layers=10**9, visual={**MonkeyConfig().visual, "layers": 10**9})
    started = time.perf_counter()
    huge = plan(config, "4bit", "bfloat16")
    assert time.perf_counter() - started < 1
    assert huge.total_bytes > 10**17 and sum(parameter_counts(config).values()) > 10**17


# --- questions against the context -------------------------------------------------------------------------


def test_a_question_longer_than_the_context_is_refused_before_the_model_runs(tiny_monkey_dir: Path) -> None:
    monkey = Monkey.load(tiny_monkey_dir, device="cpu")
    long = tasks.vqa_prompt("word " * 20_000)
    with pytest.raises(PromptTooLongError, match="over the model's context of 8,192 tokens") as caught:
        monkey.check_prompt(long, 512)
    assert "\n" not in str(caught.value)
    calls = []
    monkey.model.transformer.visual.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(PromptTooLongError):
        monkey.generate([CHART], [long], max_new_tokens=4)
    assert calls == [], "the vision tower ran for a prompt that could not fit"
    fits = tasks.vqa_prompt("word " * 1000)
    assert len(monkey.check_prompt(fits, 512)) < 8192
    with pytest.raises(PromptTooLongError):  # the answer's room counts too
        monkey.check_prompt(fits, 8192 - 1000)


def test_cli_fails_the_long_question_alone(tiny_monkey_dir: Path) -> None:
    long = "word " * 20_000
    args = ["ask", CHART, SCAN, "-q", "What?", "-q", long, "--model", str(tiny_monkey_dir), "-f", "jsonl"]
    started = time.perf_counter()
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "2", "--device", "cpu"])
    assert time.perf_counter() - started < 60
    assert result.exit_code == 1, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["source"], r["error"] is None) for r in records] == [(CHART, True), (CHART, False), (SCAN, True),
                                                                    (SCAN, False)]  # fmt: skip
    assert all("over the model's context" in r["error"] for r in records if r["error"])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("over the model's context of 8,192 tokens" in line for line in errors)
    assert "unexpected" not in result.stderr


def test_the_memory_plan_uses_the_real_prompt_length(tiny_monkey_dir: Path, monkeypatch) -> None:
    seen: list[dict] = []
    real = monkey_cli.model.memory.choose

    def spy(config, budget, **options):
        seen.append(options)
        return real(config, budget, **options)

    monkeypatch.setattr(monkey_cli.model.memory, "choose", spy)
    prompts = [tasks.vqa_prompt("short"), tasks.vqa_prompt("word " * 3000), tasks.vqa_prompt("word " * 20_000)]
    monkey = Monkey.load(tiny_monkey_dir, device="cpu", prompts=prompts, batch_size=3, max_new_tokens=16)
    (options,) = seen
    lengths = [len(monkey.tokenizer.encode(str(p))) for p in prompts]
    assert options["prompt_tokens"] == lengths[1]  # the longest that fits; the third is refused per item
    assert options["batch_size"] == 3 and options["max_new_tokens"] == 16


def test_batch_size_is_capped_by_what_fits(tiny_monkey_dir: Path, monkeypatch, tmp_path: Path) -> None:
    config = load_config(tiny_monkey_dir)
    one = plan(config, "none", "float32", batch_size=1).total_bytes
    two = plan(config, "none", "float32", batch_size=2).total_bytes
    monkeypatch.setattr("monkey_cli.model.memory.device_budget", lambda device: (one + two) // 2)
    images = []
    for i in range(3):
        images.append(str(tmp_path / f"page{i}.png"))
        shutil.copy(CHART if i % 2 else SCAN, images[-1])
    passes = []
    real_load = Monkey.load.__func__

    def counting_load(cls, *args, **kwargs):
        monkey = real_load(cls, *args, **kwargs)
        monkey.model.transformer.visual.register_forward_hook(lambda _m, inputs, _o: passes.append(len(inputs[0])))
        return monkey

    monkeypatch.setattr(Monkey, "load", classmethod(counting_load))
    args = ["caption", *images, "--model", str(tiny_monkey_dir), "-b", "3", "--max-new-tokens", "2", "-f", "jsonl"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "--batch-size" in line]
    assert len(notes) == 1 and "--batch-size 3 lowered to 1" in notes[0], result.stderr
    assert len(result.stdout.splitlines()) == 3
    assert passes == [1, 1, 1], "one page per vision pass once the batch is capped"


# --- a questions file ----------------------------------------------------------------------------------------


def test_bad_lines_of_a_questions_file_fail_alone(tiny_monkey_dir: Path, tmp_path: Path) -> None:
    questions = tmp_path / "questions.txt"
    questions.write_bytes(b"What is shown?\n\xff\xfe broken \xc3\n" + b"x" * 70_000 + b"\n\nHow many bars?\r\n")
    args = ["ask", CHART, "--questions", str(questions), "--model", str(tiny_monkey_dir), "-f", "jsonl"]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "2"])
    assert result.exit_code == 1, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["error"] is None for r in records] == [True, False, False, True]
    assert records[0]["prompt"] == "What is shown?" and records[3]["prompt"] == "How many bars?"
    assert records[1]["error"] == f"{questions}:2: not valid UTF-8 (byte 1)"
    assert records[2]["error"] == f"{questions}:3: longer than 64 KiB"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {CHART} p.1: {questions}:2: not valid UTF-8 (byte 1)",
                      f"error: {CHART} p.1: {questions}:3: longer than 64 KiB"]  # fmt: skip


def test_a_questions_file_is_read_with_a_limit(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("monkey_cli.cli.run.MAX_QUESTIONS_FILE_BYTES", 100)
    questions = tmp_path / "questions.txt"
    questions.write_text("What?\n" * 50)
    result = CliRunner().invoke(app, ["ask", CHART, "--questions", str(questions)])
    assert result.exit_code == 2 and "larger than" in result.stderr
    result = CliRunner().invoke(app, ["ask", CHART, "--questions", str(tmp_path)])
    assert result.exit_code == 2 and "cannot read it" in result.stderr


def test_vocabulary_files_must_be_regular(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(TokenizerError, match="not a regular file"):
        QWenTokenizer(tmp_path / "fifo")
    with pytest.raises(TokenizerError, match="vocabulary file not found"):
        QWenTokenizer(require_parity("tiny-monkey") / "missing.tiktoken")

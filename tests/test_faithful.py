"""Fidelity with the original's call sites: min_new_tokens=1, Monkey-Chat's caption prompt, the checkpoint's
generation_config.json for sampling, and --dtype auto following the checkpoint's precision flags."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SAMPLES_DIR
from typer.testing import CliRunner

from monkey_cli import Monkey, tasks
from monkey_cli.cli import _register_commands, app
from monkey_cli.engine.scheduler import Scheduler
from monkey_cli.errors import CheckpointError
from monkey_cli.model.configuration import MonkeyConfig
from monkey_cli.model.loading import resolve_dtype

_register_commands()
CHART = str(SAMPLES_DIR / "chart.png")
SCAN = str(SAMPLES_DIR / "scan.png")


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for item in src.iterdir():
        shutil.copy(item, dst / item.name)
    return dst


def _cli_records(*args: str) -> list[dict]:
    result = CliRunner().invoke(app, [*args, "-f", "json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["records"]


# --- min_new_tokens=1 ---------------------------------------------------------------------------------------


def test_an_answer_is_never_empty_api(eager_eos_dir: Path) -> None:
    monkey = Monkey.load(eager_eos_dir, device="cpu")
    prompts = [tasks.vqa_prompt("What is the title?")] * 2
    assert monkey.generate_ids([CHART, SCAN], prompts, max_new_tokens=8, min_new_tokens=0) == [[], []]
    ids = monkey.generate_ids([CHART, SCAN], prompts, max_new_tokens=8)
    assert [len(row) for row in ids] == [1, 1]
    assert monkey.tokenizer.eod_id not in ids[0]
    assert monkey.model.generation_config.min_new_tokens == 1  # also for model.generate called directly
    assert monkey.ask(CHART, "What is the title?") == monkey.tokenizer.decode(ids[0], skip_special_tokens=True).strip()


def test_an_answer_is_never_empty_cli(eager_eos_dir: Path) -> None:
    monkey = Monkey.load(eager_eos_dir, device="cpu")
    (expected,) = monkey.generate_ids([CHART], [tasks.vqa_prompt("What is the title?")], max_new_tokens=8)
    assert len(expected) == 1
    (record,) = _cli_records("ask", CHART, "-q", "What is the title?", "--model", str(eager_eos_dir))
    assert record["answer"] == monkey.tokenizer.decode(expected, skip_special_tokens=True).strip()


# --- Monkey-Chat's caption prompt ---------------------------------------------------------------------------


def test_caption_prompt_forms_are_the_originals(tiny_sharp_dir: Path) -> None:
    monkey = Monkey.load(tiny_sharp_dir, device="cpu")
    encode = monkey.tokenizer.encode
    chat = tasks.caption_prompt(chat=True)
    base = tasks.caption_prompt(chat=False)
    assert str(chat) == "<img></img> Generate the detailed caption in English: Answer: "
    assert str(base) == "<img></img> Generate the detailed caption in English: "
    assert monkey.check_prompt(chat) == encode(str(chat))
    assert monkey.check_prompt(base) == encode(str(base))


@pytest.mark.parametrize(
    ("names", "style", "chat"),
    [
        (("echo840/Monkey-Chat",), "auto", True),
        (("echo840/Monkey",), "auto", False),
        (("/models/Monkey-Chat",), "auto", True),
        (("mine", "/root/.cache/huggingface/hub/models--echo840--Monkey-Chat/snapshots/0123abc"), "auto", True),
        (("/models/Monkey-Chat",), "base", False),
        (("/models/Monkey",), "chat", True),
    ],
)
def test_chat_detection_follows_the_name_or_path(names: tuple[str, ...], style: str, chat: bool) -> None:
    assert tasks.is_chat_checkpoint(*names, style=style) is chat


def test_a_monkey_chat_folder_captions_with_the_vqa_form(tiny_sharp_dir: Path, tmp_path: Path, prompt_ids) -> None:
    chat_dir = str(_copy_checkpoint(tiny_sharp_dir, tmp_path / "Monkey-Chat"))
    base_dir = str(_copy_checkpoint(tiny_sharp_dir, tmp_path / "plain"))
    common = ["--max-new-tokens", "12"]
    (caption,) = _cli_records("caption", CHART, "--model", chat_dir, *common)
    (asked,) = _cli_records("ask", CHART, "-q", tasks.CAPTION_QUESTION, "--model", chat_dir, *common)
    (base,) = _cli_records("caption", CHART, "--model", base_dir, *common)
    (overridden,) = _cli_records("caption", CHART, "--model", chat_dir, "--prompt-style", "base", *common)
    (forced,) = _cli_records("caption", CHART, "--model", base_dir, "--prompt-style", "chat", *common)
    caption_ids, asked_ids, base_ids, overridden_ids, forced_ids = prompt_ids
    assert caption_ids == asked_ids and caption["answer"] == asked["answer"] and caption["answer"]
    assert base_ids != caption_ids and base_ids == overridden_ids and forced_ids == caption_ids
    assert overridden["answer"] == base["answer"] and forced["answer"] == caption["answer"]

    monkey = Monkey.load(chat_dir, device="cpu")
    assert monkey.chat and not Monkey.load(base_dir, device="cpu").chat
    assert monkey.caption(CHART, max_new_tokens=12) == caption["answer"]


# --- generation_config.json ---------------------------------------------------------------------------------


def test_generation_config_gives_sampling_defaults_and_greedy_stays(tiny_monkey_dir: Path, tmp_path: Path) -> None:
    folder = _copy_checkpoint(tiny_monkey_dir, tmp_path / "with-generation-config")
    shipped = {"do_sample": True, "top_p": 0.5, "top_k": 0, "max_new_tokens": 7, "chat_format": "raw"}
    (folder / "generation_config.json").write_text(json.dumps(shipped))
    monkey = Monkey.load(folder, device="cpu")
    plain = Monkey.load(tiny_monkey_dir, device="cpu")
    assert monkey.sampling == {"top_p": 0.5, "top_k": 0}
    assert monkey.model.generation_config.do_sample is False
    prompt = [tasks.vqa_prompt("What?")]
    greedy = monkey.generate_ids([CHART], prompt, max_new_tokens=9)
    assert greedy == plain.generate_ids([CHART], prompt, max_new_tokens=9)

    seen: list = []
    real_submit = Scheduler.submit

    def spy(self, request):
        seen.append(request.params)
        return real_submit(self, request)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Scheduler, "submit", spy)
        monkey.generate_ids([CHART], prompt, max_new_tokens=2)
        monkey.generate_ids([CHART], prompt, max_new_tokens=2, do_sample=True)
        monkey.generate_ids([CHART], prompt, max_new_tokens=2, do_sample=True, top_p=0.9)
    assert seen[0].greedy and seen[0].min_new_tokens == 1
    assert not seen[1].greedy and (seen[1].top_p, seen[1].top_k) == (0.5, 0)
    assert (seen[2].top_p, seen[2].top_k) == (0.9, 0)


def test_bad_generation_config_is_one_line(tiny_monkey_dir: Path, tmp_path: Path) -> None:
    folder = _copy_checkpoint(tiny_monkey_dir, tmp_path / "bad")
    (folder / "generation_config.json").write_text(json.dumps({"top_p": "half"}))
    with pytest.raises(CheckpointError, match="field 'top_p' must be a non-negative number"):
        Monkey.load(folder, device="cpu")


# --- --dtype auto ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "device", "bf16_gpu", "expected"),
    [
        ({"bf16": True}, "cpu", True, torch.bfloat16),
        ({"fp32": True}, "cpu", True, torch.float32),
        ({"fp16": True}, "cpu", True, torch.float32),  # float16 is not a CPU precision
        ({"bf16": True}, "cuda:0", True, torch.bfloat16),
        ({"bf16": True}, "cuda:0", False, torch.float16),  # a GPU before Ampere
        ({"fp16": True}, "cuda:0", True, torch.float16),
        ({}, "cuda:0", True, torch.float32),
    ],
)
def test_dtype_auto_follows_the_checkpoint(monkeypatch, flags: dict, device: str, bf16_gpu: bool, expected) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_: bf16_gpu)
    assert resolve_dtype("auto", device, MonkeyConfig(**flags)) is expected
    assert resolve_dtype("float16", device, MonkeyConfig(**flags)) is torch.float16  # asked for: as asked


def test_tiny_fixture_loads_in_its_float32(tiny_monkey_dir: Path) -> None:
    assert Monkey.load(tiny_monkey_dir, device="cpu").model.lm_head.weight.dtype is torch.float32

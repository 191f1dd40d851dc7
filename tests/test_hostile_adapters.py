"""Hostile adapter folders: `--adapter` with a config or weights made to hang, exhaust memory or surprise peft,
and a `--model` folder that smuggles an adapter in (transformers would apply it unchecked and unhashed).

Every case is one line naming the file and the field, quickly, before peft sees anything; a genuine adapter
still loads. Each hostile folder is made on the spot from a fresh adapter of the tiny checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
from conftest import SAMPLES_DIR, require_parity
from hostile import monkey

from monkey_cli import Monkey
from monkey_cli.errors import CheckpointError
from monkey_cli.finetune.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    add_lora,
    check_adapter_dir,
    load_adapter,
    lora_config,
    save_adapter,
)


@pytest.fixture(scope="module")
def tiny() -> Path:
    return require_parity("tiny-monkey")


@pytest.fixture(scope="module")
def genuine(tiny, tmp_path_factory) -> Path:
    """A fresh rank-4 adapter of the tiny checkpoint, as `monkey finetune` saves one."""
    monkey_model = Monkey.load(str(tiny), device="cpu")
    folder = tmp_path_factory.mktemp("adapter")
    windows = monkey_model.model.config.vision.num_windows
    model = add_lora(monkey_model.model, lora_config(r=4, alpha=8, windows=windows))
    save_adapter(model, folder)
    return folder


@pytest.fixture(scope="module")
def model(tiny):
    return Monkey.load(str(tiny), device="cpu").model


def _copy(genuine: Path, target: Path) -> Path:
    shutil.copytree(genuine, target)
    return target


def _with_config(genuine: Path, target: Path, **changes) -> Path:
    folder = _copy(genuine, target)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    config.update(changes)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))
    return folder


CATASTROPHIC = r"(.*a){1,40}(.*)*(.*)*(.*)*x$"  # backtracks for ages on any long module name without an 'x'
BAD_CONFIGS = {
    "catastrophic target pattern": ({"target_modules": CATASTROPHIC}, "target_modules"),
    "a pattern of our shape with more in it": (
        {"target_modules": r"transformer\.h\.\d+\.(?:attn\.c_attn|(a+)+$)"}, "target_modules"),
    "an unknown layer": ({"target_modules": ["attn.c_attn", "visual.conv1"]}, "target_modules"),
    "a non-string layer": ({"target_modules": [7]}, "target_modules"),
    "a number for layers": ({"target_modules": 123}, "target_modules"),
    "a huge rank": ({"r": 10**9}, "'r'"),
    "a rank as text": ({"r": "16"}, "'r'"),
    "a rank as a boolean": ({"r": True}, "'r'"),
    "alpha as text": ({"lora_alpha": "x"}, "lora_alpha"),
    "an infinite alpha": ({"lora_alpha": 1e309}, "lora_alpha"),
    "dropout above one": ({"lora_dropout": 5}, "lora_dropout"),
    "other modules saved": ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    "DoRA switched on": ({"use_dora": True}, "use_dora"),
    "a rank pattern": ({"rank_pattern": {"attn": 4096}}, "rank_pattern"),
    "an unknown field": ({"custom_code": "import os; os.system('id')"}, "custom_code"),
    "another adapter type": ({"peft_type": "PREFIX_TUNING"}, "peft_type"),
    "a bias": ({"bias": "all"}, "bias"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=list(BAD_CONFIGS))
def test_a_hostile_config_is_one_line_naming_the_field(genuine, tmp_path, case: str) -> None:
    changes, field = BAD_CONFIGS[case]
    folder = _with_config(genuine, tmp_path / "adapter", **changes)
    started = time.monotonic()
    with pytest.raises(CheckpointError) as caught:
        check_adapter_dir(folder)
    assert time.monotonic() - started < 2
    message = str(caught.value)
    assert "\n" not in message and ADAPTER_CONFIG in message and field in message, message


def test_broken_config_files_are_refused(genuine, tmp_path) -> None:
    folder = _copy(genuine, tmp_path / "nested")
    (folder / ADAPTER_CONFIG).write_text("[" * 100_000 + "]" * 100_000)  # nesting deeper than any parser recursion
    with pytest.raises(CheckpointError, match="not valid JSON"):
        check_adapter_dir(folder)
    big = _copy(genuine, tmp_path / "big")
    text = (big / ADAPTER_CONFIG).read_text()
    (big / ADAPTER_CONFIG).write_text(text[:-1] + " " * (2 << 20) + "}")
    with pytest.raises(CheckpointError, match="larger than"):
        check_adapter_dir(big)


def test_the_weights_must_have_the_configs_rank_and_this_models_shapes(genuine, model, tmp_path) -> None:
    """r=512 in the config with rank-4 weights: refused from the header alone, before any 512 x width matrix
    exists (peft would allocate one per targeted layer first)."""
    folder = _with_config(genuine, tmp_path / "rank", r=512)
    check_adapter_dir(folder)  # well formed on its own
    with pytest.raises(CheckpointError, match=r"has shape \[4, \d+\]; the config \(r=512\)"):
        load_adapter(model, folder)
    assert not hasattr(model, "peft_config"), "the model was changed before the check"


def _rewrite_weights(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / ADAPTER_WEIGHTS))
    change(state)
    save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def test_unrelated_or_missing_tensors_are_refused(genuine, model, tmp_path) -> None:
    import torch

    extra = _copy(genuine, tmp_path / "extra")
    _rewrite_weights(extra, lambda state: state.update({"base_model.model.lm_head.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'base_model.model.lm_head.weight'"):
        load_adapter(model, extra)
    missing = _copy(genuine, tmp_path / "missing")
    _rewrite_weights(missing, lambda state: state.pop(sorted(state)[0]))
    with pytest.raises(CheckpointError, match="missing tensor"):
        load_adapter(model, missing)
    renamed = _copy(genuine, tmp_path / "renamed")
    _rewrite_weights(renamed, lambda state: state.update({"junk": state.pop(sorted(state)[0])}))
    with pytest.raises(CheckpointError, match="missing tensor|unexpected tensor 'junk'"):
        load_adapter(model, renamed)


def test_a_malformed_weights_file_is_refused(genuine, tmp_path) -> None:
    huge = _copy(genuine, tmp_path / "huge-header")
    data = (huge / ADAPTER_WEIGHTS).read_bytes()
    (huge / ADAPTER_WEIGHTS).write_bytes(struct.pack("<Q", 1 << 40) + data[8:])  # a terabyte of header
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        check_adapter_dir(huge)
    cut = _copy(genuine, tmp_path / "truncated")
    (cut / ADAPTER_WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="does not match its header"):
        check_adapter_dir(cut)
    padded = _copy(genuine, tmp_path / "padded")
    (padded / ADAPTER_WEIGHTS).write_bytes(data + b"\0" * 4096)
    with pytest.raises(CheckpointError, match="does not match its header"):
        check_adapter_dir(padded)


def test_links_out_and_special_files_are_refused_without_waiting(genuine, tmp_path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(genuine / ADAPTER_WEIGHTS, outside)
    linked = _copy(genuine, tmp_path / "linked")
    (linked / ADAPTER_WEIGHTS).unlink()
    (linked / ADAPTER_WEIGHTS).symlink_to(outside)
    with pytest.raises(CheckpointError, match="leads outside"):
        check_adapter_dir(linked)
    fifo = _copy(genuine, tmp_path / "fifo")
    (fifo / ADAPTER_CONFIG).unlink()
    os.mkfifo(fifo / ADAPTER_CONFIG)
    with pytest.raises(CheckpointError, match="FIFO"):
        check_adapter_dir(fifo)


def test_a_genuine_adapter_still_loads(genuine, tiny) -> None:
    model = Monkey.load(str(tiny), device="cpu").model
    peft_model = load_adapter(model, genuine)
    assert any("lora_A" in name for name, _ in peft_model.named_parameters())
    assert not any(parameter.requires_grad for parameter in peft_model.parameters())


def test_the_cli_says_it_in_one_line(genuine, tiny, tmp_path) -> None:
    folder = _with_config(genuine, tmp_path / "adapter", target_modules=CATASTROPHIC)
    result = monkey("ask", SAMPLES_DIR / "chart.png", "-q", "What?", "--model", tiny, "--adapter", folder,
                    "--device", "cpu", text=True)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "target_modules" in result.stderr
    assert "Traceback" not in result.stderr


# --- a --model folder that holds an adapter -------------------------------------------------------------------


def _model_with_adapter(tiny: Path, genuine: Path, target: Path) -> Path:
    shutil.copytree(tiny, target)
    shutil.copyfile(genuine / ADAPTER_CONFIG, target / ADAPTER_CONFIG)
    return target


def test_a_model_folder_with_an_adapter_is_refused_before_anything_is_read(tiny, genuine, tmp_path) -> None:
    folder = _model_with_adapter(tiny, genuine, tmp_path / "smuggled")
    os.mkfifo(folder / ADAPTER_WEIGHTS)  # transformers would wait on it forever
    result = monkey("ask", SAMPLES_DIR / "chart.png", "-q", "What?", "--model", folder, "--device", "cpu", text=True)
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and ADAPTER_CONFIG in error and "--adapter" in error, result.stderr
    assert "Traceback" not in result.stderr


def test_an_adapter_linked_out_of_the_model_folder_is_refused_too(tiny, genuine, tmp_path) -> None:
    folder = _model_with_adapter(tiny, genuine, tmp_path / "linked")
    (folder / ADAPTER_WEIGHTS).symlink_to(genuine / ADAPTER_WEIGHTS)
    with pytest.raises(CheckpointError, match="holds a LoRA adapter"):
        Monkey.load(str(folder), device="cpu")

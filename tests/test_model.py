"""The native model beyond single-case parity: real key manifest, batching, checkpoint layouts, load errors."""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path

import pytest
import torch
from conftest import require_parity
from PIL import Image
from safetensors.torch import load_file, save_file

from monkey_cli import Monkey
from monkey_cli.errors import CheckpointError
from monkey_cli.model.configuration import real_monkey_config
from monkey_cli.model.loading import load_model
from monkey_cli.model.modeling import MonkeyForCausalLM

IMAGES = ("doc_page_1240x1754.png", "shapes_640x480.png", "rgba_700x500.png")


@cache
def _sharp() -> Monkey:
    return Monkey.load(require_parity("tiny-monkey-sharp"), device="cpu", dtype="float32")


def _image(name: str) -> Path:
    return require_parity("tiny_cases/images") / name


def test_real_config_has_exactly_the_released_keys_and_shapes() -> None:
    manifest = require_parity("monkey_real_keys.tsv").read_text().splitlines()
    expected = {}
    for line in manifest:
        key, shape, _dtype = line.split("\t")
        expected[key] = tuple(int(n) for n in shape.split(","))
    with torch.device("meta"):
        model = MonkeyForCausalLM(real_monkey_config())
    actual = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    assert sorted(set(expected) - set(actual)) == []
    assert sorted(set(actual) - set(expected)) == []
    assert {k: v for k, v in actual.items() if expected[k] != v} == {}
    assert sum(torch.Size(s).numel() for s in expected.values()) == 9_708_053_824


def test_left_padded_batch_equals_single_runs() -> None:
    """Three different images and prompts of different lengths: batched greedy tokens = one at a time."""
    monkey = _sharp()
    images = [_image(name) for name in IMAGES]
    prompts = [
        "<img></img> What is the title? Answer: ",
        "<img></img> Generate the detailed caption in English: ",
        "<img></img> How many coloured shapes are in this picture, and which one is largest? Answer: ",
    ]
    singles = [monkey.generate_ids([img], [p], max_new_tokens=12)[0] for img, p in zip(images, prompts, strict=True)]
    batched = monkey.generate_ids(images, prompts, max_new_tokens=12)
    assert batched == singles
    assert len({tuple(s) for s in singles}) == 3, "the three answers should differ, or the test proves little"


def test_vision_tower_runs_once_per_batch() -> None:
    monkey = _sharp()
    calls = []
    hook = monkey.model.transformer.visual.register_forward_hook(lambda *_: calls.append(1))
    try:
        monkey.generate([_image(n) for n in IMAGES], ["<img></img> What? Answer: "] * 3, max_new_tokens=4)
    finally:
        hook.remove()
    assert len(calls) == 1


def test_image_embeds_reuse_matches_pixels() -> None:
    """Encoding a page once and reusing its features gives the same answer as passing the image."""
    monkey = _sharp()
    image = _image(IMAGES[0])
    features = monkey.encode_images([image])
    prompts = ["<img></img> What is the title? Answer: ", "<img></img> Who wrote it? Answer: "]
    reused = monkey.generate(None, prompts, image_embeds=features.expand(2, -1, -1), max_new_tokens=8)
    direct = [monkey.generate([image], [p], max_new_tokens=8)[0] for p in prompts]
    assert reused == direct


def test_transparent_pixels_are_white_by_default() -> None:
    """Deliberate difference from the original: RGBA is flattened onto white, not stripped of alpha."""
    monkey = _sharp()
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # red under full transparency
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    assert torch.equal(monkey.processor([rgba]).windows, monkey.processor([white]).windows)
    assert not torch.equal(monkey.processor([rgba], drop_alpha=True).windows, monkey.processor([white]).windows)


def _prefill_logits(model) -> torch.Tensor:
    torch.manual_seed(0)
    ids = torch.randint(0, 1990, (1, 40))
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


def _copy_config_and_vocab(src: Path, dst: Path) -> None:
    dst.mkdir()
    for name in ("config.json", "qwen.tiktoken"):
        shutil.copy(src / name, dst / name)


def _shard(state: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    keys = sorted(state)
    return [{k: state[k] for k in keys[i::parts]} for i in range(parts)]


def test_sharded_safetensors_and_bin_shards_load_identically(tmp_path: Path) -> None:
    src = require_parity("tiny-monkey")
    state = load_file(src / "model.safetensors")
    reference = _prefill_logits(load_model(src))

    sharded = tmp_path / "sharded"
    _copy_config_and_vocab(src, sharded)
    weight_map = {}
    for i, part in enumerate(_shard(state, 3)):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file(part, sharded / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert torch.equal(_prefill_logits(load_model(sharded)), reference)

    bins = tmp_path / "bins"
    _copy_config_and_vocab(src, bins)
    weight_map = {}
    for i, part in enumerate(_shard(state, 2)):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save(part, bins / name)
        weight_map.update(dict.fromkeys(part, name))
    (bins / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert torch.equal(_prefill_logits(load_model(bins)), reference)

    single_bin = tmp_path / "single_bin"
    _copy_config_and_vocab(src, single_bin)
    torch.save(state, single_bin / "pytorch_model.bin")
    assert torch.equal(_prefill_logits(load_model(single_bin)), reference)


@pytest.fixture()
def broken_checkpoint(tmp_path: Path):
    """A copy of tiny-monkey whose state dict a test edits before saving."""
    src = require_parity("tiny-monkey")
    folder = tmp_path / "ckpt"
    _copy_config_and_vocab(src, folder)
    state = load_file(src / "model.safetensors")

    def write(edit) -> Path:
        edit(state)
        save_file(state, folder / "model.safetensors")
        return folder

    return write


def test_missing_key_is_named(broken_checkpoint) -> None:
    folder = broken_checkpoint(lambda s: s.pop("transformer.h.1.mlp.w2.weight"))
    with pytest.raises(CheckpointError, match=r"missing weight 'transformer\.h\.1\.mlp\.w2\.weight'"):
        load_model(folder)


def test_unexpected_key_is_named(broken_checkpoint) -> None:
    folder = broken_checkpoint(lambda s: s.__setitem__("transformer.h.9.attn.extra", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected weight 'transformer\.h\.9\.attn\.extra'"):
        load_model(folder)


def test_known_buffers_of_old_checkpoints_are_ignored(broken_checkpoint) -> None:
    folder = broken_checkpoint(lambda s: s.__setitem__("transformer.h.0.attn.masked_bias", torch.tensor(-1e4)))
    assert load_model(folder) is not None


def test_wrong_shape_is_named(broken_checkpoint) -> None:
    folder = broken_checkpoint(lambda s: s.__setitem__("lm_head.weight", torch.zeros(10, 256)))
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight' has shape \[10, 256\], the config expects"):
        load_model(folder)


def test_truncated_file_is_named(tmp_path: Path) -> None:
    src = require_parity("tiny-monkey")
    folder = tmp_path / "truncated"
    _copy_config_and_vocab(src, folder)
    data = (src / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read weights .*truncated"):
        load_model(folder)


def test_missing_weights_and_shards_are_named(tmp_path: Path) -> None:
    src = require_parity("tiny-monkey")
    folder = tmp_path / "empty"
    _copy_config_and_vocab(src, folder)
    with pytest.raises(CheckpointError, match="no weights found"):
        load_model(folder)
    index = {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="names shard model-00001-of-00002.safetensors, which is missing"):
        load_model(folder)


def test_checkpoint_code_is_never_run(tmp_path: Path) -> None:
    """A checkpoint folder with the original's .py files (and auto_map) loads without importing them."""
    src = require_parity("tiny-monkey")
    folder = tmp_path / "with_code"
    shutil.copytree(src, folder)
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('x')\n"
    for name in ("modeling_monkey.py", "configuration_qwen.py", "tokenization_qwen.py"):
        (folder / name).write_text(code)
    Monkey.load(folder, device="cpu")
    assert not marker.exists()

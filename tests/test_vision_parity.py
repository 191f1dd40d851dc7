"""VisionTransformer (ViT + per-window LoRA + resampler) against the original on tiny-monkey."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from monkey_cli.model.configuration import load_config, real_monkey_config
from monkey_cli.model.processor import ImageBatch, MonkeyImageProcessor
from monkey_cli.model.vision import VisionTransformer, interpolate_pos_embed, sincos_pos_embed_2d

PREFIX = "transformer.visual."
FEATURE_ATOL = 1e-5  # README: window_features / global_features / image_embeds, rtol 0
IMAGES = {"a": "doc_page_1240x1754.png", "b": "shapes_640x480.png", "c": "rgba_700x500.png"}


def _max_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape
    return (actual.float() - expected.float()).abs().max().item()


@pytest.fixture(scope="module")
def tiny_visual_weights(tiny_monkey_dir: Path) -> dict[str, torch.Tensor]:
    weights = load_file(tiny_monkey_dir / "model.safetensors")
    return {key.removeprefix(PREFIX): value for key, value in weights.items() if key.startswith(PREFIX)}


@pytest.fixture(scope="module")
def tower(tiny_monkey_dir: Path, tiny_visual_weights: dict[str, torch.Tensor]) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(load_config(tiny_monkey_dir).vision).eval()
    result = model.load_state_dict(tiny_visual_weights, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


@pytest.fixture(scope="module")
def pages(tiny_monkey_dir: Path, parity_dir: Path) -> dict[str, ImageBatch]:
    processor = MonkeyImageProcessor(load_config(tiny_monkey_dir).vision)
    images = parity_dir / "tiny_cases" / "images"
    # The reference drops alpha (image c); the default white flattening is tested in test_processor.py.
    return {name: processor(images / file, drop_alpha=True) for name, file in IMAGES.items()}


@pytest.fixture(scope="module")
def expected(parity_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(parity_dir / "tiny_cases" / f"vision_{name}.safetensors") for name in IMAGES}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_view_features_match_reference(name: str, tower: VisionTransformer, pages: dict[str, ImageBatch],
                                       expected: dict[str, dict[str, torch.Tensor]]) -> None:
    page, reference = pages[name], expected[name]
    with torch.no_grad():
        windows = tower.encode_views(page.windows[0], torch.arange(4))
        global_view = tower.encode_views(page.global_view, torch.tensor([-1]))
        embeds = tower(page.windows, page.global_view)
    assert windows.shape == (4, 256, 256)
    assert _max_diff(windows, reference["window_features"]) <= FEATURE_ATOL
    assert _max_diff(global_view, reference["global_features"]) <= FEATURE_ATOL
    assert embeds.shape == (1, 1280, 256)
    assert _max_diff(embeds, reference["image_embeds"]) <= FEATURE_ATOL


def test_lora_follows_index_not_position(tower: VisionTransformer, pages: dict[str, ImageBatch],
                                         expected: dict[str, dict[str, torch.Tensor]]) -> None:
    page, reference = pages["a"], expected["a"]
    views = torch.stack([page.global_view[0], page.windows[0, 3], page.windows[0, 1]])
    with torch.no_grad():
        features = tower.encode_views(views, torch.tensor([-1, 3, 1]))
    assert _max_diff(features[0], reference["global_features"][0]) <= FEATURE_ATOL
    assert _max_diff(features[1], reference["window_features"][3]) <= FEATURE_ATOL
    assert _max_diff(features[2], reference["window_features"][1]) <= FEATURE_ATOL
    # The LoRA effect is 1-4 % of the features: the wrong adapter must be far outside the tolerance.
    with torch.no_grad():
        wrong = tower.encode_views(page.windows[0, 3:4], torch.tensor([0]))
    assert _max_diff(wrong[0], reference["window_features"][3]) > 100 * FEATURE_ATOL


def test_batch_of_two_pages_equals_each_alone(tower: VisionTransformer, pages: dict[str, ImageBatch]) -> None:
    first, second = pages["a"], pages["b"]
    with torch.no_grad():
        together = tower(torch.cat([first.windows, second.windows]),
                         torch.cat([first.global_view, second.global_view]))
        alone = [tower(page.windows, page.global_view) for page in (first, second)]
    assert together.shape == (2, 1280, 256)
    assert _max_diff(together[0], alone[0][0]) <= 1e-6
    assert _max_diff(together[1], alone[1][0]) <= 1e-6


def test_interpolated_vit_position_embedding(tower: VisionTransformer, parity_dir: Path) -> None:
    reference = load_file(parity_dir / "tiny_cases" / "vision_internals.safetensors")["vit_pos_embed_1024"]
    with torch.no_grad():
        interpolated = interpolate_pos_embed(tower.positional_embedding, 1024)
    assert _max_diff(interpolated, reference) <= 1e-6


def test_fresh_resampler_pos_embed_is_the_checkpoints_sincos(
        tiny_monkey_dir: Path, tiny_visual_weights: dict[str, torch.Tensor]) -> None:
    stored = tiny_visual_weights["attn_pool.pos_embed"]
    assert _max_diff(sincos_pos_embed_2d(256, 16), stored) <= 1e-6
    fresh = VisionTransformer(load_config(tiny_monkey_dir).vision)
    assert _max_diff(fresh.attn_pool.pos_embed.detach(), stored) <= 1e-6


def test_pixels_cast_to_the_towers_dtype(tower: VisionTransformer, pages: dict[str, ImageBatch]) -> None:
    half = VisionTransformer(tower.config).to(torch.bfloat16).eval()
    half.load_state_dict(tower.state_dict())
    page = pages["b"]  # float32 pixels
    with torch.no_grad():
        features = half.encode_views(page.global_view, torch.tensor([-1]))
        reference = tower.encode_views(page.global_view, torch.tensor([-1]))
    assert features.dtype == torch.bfloat16
    assert _max_diff(features, reference) < 0.1 * reference.abs().max().item()


def test_real_size_meta_build_has_the_checkpoint_keys(parity_dir: Path) -> None:
    manifest = {}
    for line in (parity_dir / "monkey_real_keys.tsv").read_text().splitlines():
        key, shape, _dtype = line.split("\t")
        if key.startswith(PREFIX):
            manifest[key.removeprefix(PREFIX)] = tuple(int(size) for size in shape.split(","))
    with torch.device("meta"):
        model = VisionTransformer(real_monkey_config().vision)
    built = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    assert sorted(built) == sorted(manifest)
    assert built == manifest

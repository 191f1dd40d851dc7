"""MonkeyImageProcessor against the original preprocessing (tiny_cases/vision_*.safetensors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from monkey_cli.errors import DocumentError
from monkey_cli.model.configuration import MonkeyConfig, VisionConfig
from monkey_cli.model.processor import CLIP_MEAN, CLIP_STD, MonkeyImageProcessor, to_rgb

IMAGES = {
    "a": "doc_page_1240x1754.png",
    "b": "shapes_640x480.png",
    "c": "rgba_700x500.png",  # the reference drops alpha: compared with drop_alpha=True
}
PIXEL_ATOL = 1e-6


def _vision(image_size: int | list[int] = 896, windows: int = 4) -> VisionConfig:
    visual = {"heads": 4, "image_size": image_size, "image_start_id": 2214, "layers": 2, "mlp_ratio": 4.9231,
              "output_dim": 256, "patch_size": 14, "width": 64, "lora_repeat_num": windows}
    return MonkeyConfig(visual=visual).vision


def _normalise(uint8_hwc: np.ndarray) -> torch.Tensor:
    """The test's own ToTensor + Normalize: [H, W, 3] uint8 -> [3, H, W] float32."""
    pixels = torch.from_numpy(uint8_hwc.copy()).permute(2, 0, 1).float() / 255
    return (pixels - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def _denormalise_to_uint8(windows: torch.Tensor) -> np.ndarray:
    """Stored 2x2 normalised windows [4, 3, 448, 448] -> the 896x896 uint8 page they came from."""
    pixels = windows * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    top = torch.cat([pixels[0], pixels[1]], dim=2)
    bottom = torch.cat([pixels[2], pixels[3]], dim=2)
    page = torch.cat([top, bottom], dim=1)  # [3, 896, 896]
    return (page * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def processor() -> MonkeyImageProcessor:
    return MonkeyImageProcessor(_vision())


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_matches_reference_preprocessing(
        name: str, parity_dir: Path, processor: MonkeyImageProcessor) -> None:
    cases = parity_dir / "tiny_cases"
    expected = load_file(cases / f"vision_{name}.safetensors")
    image = cases / "images" / IMAGES[name]
    drop_alpha = name == "c"

    resized = np.asarray(processor.resize(image, drop_alpha=drop_alpha))
    if "windows" in expected:
        expected_uint8 = _denormalise_to_uint8(expected["windows"])
        expected_windows = expected["windows"]
    else:
        expected_uint8 = expected["resized_896_uint8"].numpy()
        page = _normalise(expected_uint8)
        expected_windows = torch.stack([page[:, :448, :448], page[:, :448, 448:],
                                        page[:, 448:, :448], page[:, 448:, 448:]])
    assert resized.shape == (896, 896, 3)
    np.testing.assert_array_equal(resized, expected_uint8)

    batch = processor(image, drop_alpha=drop_alpha)
    assert batch.windows.shape == (1, 4, 3, 448, 448)
    assert batch.global_view.shape == (1, 3, 448, 448)
    assert batch.windows.dtype == batch.global_view.dtype == torch.float32
    assert (batch.windows[0] - expected_windows).abs().max().item() <= PIXEL_ATOL
    assert (batch.global_view - expected["global_448"]).abs().max().item() <= PIXEL_ATOL


def test_default_flattens_transparency_on_white(parity_dir: Path, processor: MonkeyImageProcessor) -> None:
    image = parity_dir / "tiny_cases" / "images" / IMAGES["c"]
    with Image.open(image) as rgba:
        alpha = np.asarray(rgba.convert("RGBA"))[..., 3]
    assert (alpha == 0).any(), "fixture image c is expected to have transparent pixels"
    flattened = processor(image).windows
    dropped = processor(image, drop_alpha=True).windows
    assert (flattened - dropped).abs().max().item() > 0.5


def test_to_rgb_composites_alpha_on_white() -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (10, 20, 30, 0))  # hidden colour under full transparency
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black
    rgba.putpixel((2, 0), (40, 50, 60, 255))  # opaque
    flat = np.asarray(to_rgb(rgba)).astype(int)
    np.testing.assert_array_equal(flat[0, 0], [255, 255, 255])
    assert np.all(np.abs(flat[0, 1] - round(255 * 127 / 255)) <= 1)
    np.testing.assert_array_equal(flat[0, 2], [40, 50, 60])
    # The original's behaviour: alpha dropped, the hidden colour shows.
    np.testing.assert_array_equal(np.asarray(to_rgb(rgba, drop_alpha=True))[0, 0], [10, 20, 30])


@pytest.mark.parametrize("mode", ["LA", "P"])
def test_to_rgb_handles_other_transparent_modes(mode: str) -> None:
    if mode == "LA":
        image = Image.new("LA", (2, 1), (0, 255))
        image.putpixel((0, 0), (0, 0))
    else:
        image = Image.new("P", (2, 1), 0)
        image.putpalette([0, 0, 0, 200, 0, 0])
        image.putpixel((1, 0), 1)
        image.info["transparency"] = 0  # palette entry 0 is transparent
    flat = np.asarray(to_rgb(image))
    assert to_rgb(image).mode == "RGB"
    np.testing.assert_array_equal(flat[0, 0], [255, 255, 255])
    assert tuple(flat[0, 1]) != (255, 255, 255)


def test_rectangular_input_gives_six_row_major_windows(parity_dir: Path) -> None:
    processor = MonkeyImageProcessor(_vision([896, 1344], windows=6))
    image = parity_dir / "tiny_cases" / "images" / IMAGES["b"]
    resized = processor.resize(image)
    assert resized.size == (1344, 896)  # PIL reports (width, height)
    page = _normalise(np.asarray(resized))  # [3, 896, 1344]
    batch = processor(image)
    assert batch.windows.shape == (1, 6, 3, 448, 448)
    for k in range(6):
        row, col = divmod(k, 3)
        crop = page[:, row * 448:(row + 1) * 448, col * 448:(col + 1) * 448]
        assert torch.equal(batch.windows[0, k], crop), f"window {k} is not the crop at row {row}, col {col}"
    expected_global = F.interpolate(page[None], size=(448, 448), mode="bicubic", align_corners=False)
    assert (batch.global_view - expected_global).abs().max().item() <= PIXEL_ATOL


def test_accepts_paths_and_pil_images_in_one_batch(parity_dir: Path, processor: MonkeyImageProcessor) -> None:
    path = parity_dir / "tiny_cases" / "images" / IMAGES["b"]
    with Image.open(path) as opened:
        opened.load()
        batch = processor([str(path), path, opened])
    assert batch.windows.shape == (3, 4, 3, 448, 448)
    assert len(batch) == 3
    assert torch.equal(batch.windows[0], batch.windows[1])
    assert torch.equal(batch.windows[0], batch.windows[2])
    assert torch.equal(batch.global_view[0], batch.global_view[2])


def test_unreadable_inputs_raise_document_error(tmp_path: Path, processor: MonkeyImageProcessor) -> None:
    missing = tmp_path / "missing.png"
    with pytest.raises(DocumentError, match="missing.png: image file not found"):
        processor(missing)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("plain text, not a PNG")
    with pytest.raises(DocumentError, match="notes.png: not an image"):
        processor(not_an_image)

"""Image preprocessing for Monkey: one page -> a grid of 448px windows plus one 448px global view.

The pipeline matches the original checkpoint's training-time transform (PIL bicubic resize to the
config's input size, aspect ratio not kept, /255, CLIP mean/std), with one deliberate difference:
transparent pixels are flattened onto white instead of having their alpha dropped (which turns a
transparent background into whatever colour happens to sit under alpha = 0, usually black).
`drop_alpha=True` reproduces the original exactly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from monkey_cli.errors import DocumentError
from monkey_cli.model.configuration import WINDOW_SIZE, VisionConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Image.Image | str | os.PathLike

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


@dataclass
class ImageBatch:
    """Pixels for the vision tower, already normalised (float32 unless moved with `to`)."""

    windows: torch.Tensor  # [B, W, 3, 448, 448], row-major: window k runs with LoRA k
    global_view: torch.Tensor  # [B, 3, 448, 448], the whole page downsampled; runs with no LoRA

    def __len__(self) -> int:
        return self.windows.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ImageBatch:
        return ImageBatch(self.windows.to(device, dtype), self.global_view.to(device, dtype))


def open_image(source: ImageInput) -> Image.Image:
    """A PIL image as given, or the file at a path fully read (so the file handle is closed)."""
    if isinstance(source, Image.Image):
        return source
    path = Path(source)
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise DocumentError(f"{path}: image file not found") from None
    except UnidentifiedImageError:
        raise DocumentError(f"{path}: not an image format Pillow can read") from None
    except OSError as exc:
        raise DocumentError(f"{path}: cannot read image ({exc})") from None


def to_rgb(image: Image.Image, drop_alpha: bool = False) -> Image.Image:
    """RGB version of `image`; transparency is composited onto white unless `drop_alpha`."""
    has_alpha = image.mode in _ALPHA_MODES or "transparency" in image.info
    if drop_alpha or not has_alpha:
        return image if image.mode == "RGB" else image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


class MonkeyImageProcessor:
    """Turns pages into the windows + global view tensors that `VisionTransformer.forward` takes."""

    def __init__(self, vision: VisionConfig) -> None:
        self.input_size = vision.input_size  # (height, width)
        self.grid = vision.grid  # (rows, cols) of windows
        self.mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, images: ImageInput | Sequence[ImageInput], drop_alpha: bool = False) -> ImageBatch:
        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        if not images:
            raise ValueError("MonkeyImageProcessor needs at least one image")
        windows, global_views = [], []
        for image in images:
            page_windows, page_global = self.split(self.normalize(self.resize(image, drop_alpha)))
            windows.append(page_windows)
            global_views.append(page_global)
        return ImageBatch(windows=torch.stack(windows), global_view=torch.stack(global_views))

    def resize(self, image: ImageInput, drop_alpha: bool = False) -> Image.Image:
        """The RGB page at the model's input size (PIL bicubic, aspect ratio not kept): uint8 pixels."""
        rgb = to_rgb(open_image(image), drop_alpha)
        height, width = self.input_size
        return rgb.resize((width, height), Image.Resampling.BICUBIC)

    def normalize(self, image: Image.Image) -> torch.Tensor:
        """uint8 RGB [H, W, 3] -> CLIP-normalised float32 [3, H, W]."""
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return (pixels.float() / 255 - self.mean) / self.std

    def split(self, page: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[3, H, W] -> windows [rows*cols, 3, 448, 448] (row-major) and the global view [3, 448, 448]."""
        rows, cols = self.grid
        windows = (
            page.view(3, rows, WINDOW_SIZE, cols, WINDOW_SIZE)
            .permute(1, 3, 0, 2, 4)  # [rows, cols, 3, 448, 448]
            .reshape(rows * cols, 3, WINDOW_SIZE, WINDOW_SIZE)
        )
        # The original interpolates the normalised tensor (not a second PIL resize) without antialiasing.
        global_view = F.interpolate(
            page[None], size=(WINDOW_SIZE, WINDOW_SIZE), mode="bicubic", align_corners=False
        )[0]
        return windows, global_view

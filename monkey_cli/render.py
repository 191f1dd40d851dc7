"""What the model sees: each page at input size with its 448-pixel window grid, each window, the global view.

Monkey cuts the input image (896x896 for the released checkpoints) into 448x448 windows, row-major, window k
read by LoRA k, and adds a 448x448 global view of the whole page. Writing those exact pixels lets a user
check whether small print survives before running the model:

    out/<path relative to the inputs' common folder>.pages/     (report.pdf -> out/report.pdf.pages/)
        page-001-grid.png        the page at input size, window borders drawn and numbered
        page-001-window-0.png    window 0 (top left), 1, ... in row-major order
        page-001-global.png      the global view

The `.pages` suffix keeps a folder from passing for the document it shows (`find -name '*.pdf'`).

The global view is computed as the model computes it: a bicubic interpolation (cubic coefficient -0.75,
half-pixel centres, no antialiasing) of the input-size image, not a second Pillow resize. Because the
interpolation is linear and the model's normalisation is an affine map per channel, interpolating pixels
and then normalising equals the model's normalise-then-interpolate, up to rounding to 8 bits.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Literal

from monkey_cli.documents import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_SIZE,
    Page,
    PageError,
    Source,
    expand_inputs,
    iter_pages,
    parse_pages,
    parse_size,
    prefetch,
)
from monkey_cli.errors import MonkeyWarning, UsageError
from monkey_cli.output import distinct_paths
from monkey_cli.output_folder import OutputError, OutputFolder, OutputFull, OutputsFilter

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

__all__ = [
    "WINDOW",
    "RenderedPage",
    "check_window_size",
    "crop_windows",
    "draw_window_grid",
    "global_view",
    "output_dirs",
    "page_views",
    "render_documents",
    "window_boxes",
]

WINDOW = 448  # side of one window and of the global view, in pixels
_CUBIC_A = -0.75  # torch's bicubic coefficient (Pillow uses -0.5)
_GRID_COLOUR = (255, 0, 200)
_UNSAFE_CHARACTERS = set('<>:"/\\|?*')
FOLDER_SUFFIX = ".pages"  # a document's folder is its name plus this: report.pdf -> report.pdf.pages/


@dataclass(frozen=True)
class RenderedPage:
    """The files written for one page."""

    source: str
    page: int
    pages: int
    directory: Path
    files: tuple[Path, ...]

    @property
    def grid(self) -> Path:
        return self.files[0]


# --------------------------------------------------------------------------------------------- views


def check_window_size(size: tuple[int, int] | str) -> tuple[int, int]:
    """(height, width) from "HxW" or a tuple, both multiples of the 448-pixel window; UsageError otherwise."""
    parsed = parse_size(size)
    assert parsed is not None
    height, width = parsed
    if height % WINDOW or width % WINDOW:
        raise UsageError(f"size {height}x{width}: height and width must be multiples of {WINDOW} (e.g. 896x1344)")
    return parsed


def window_boxes(size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of each window of a (height, width) image, in the model's row-major order."""
    height, width = size
    return [
        (column * WINDOW, row * WINDOW, (column + 1) * WINDOW, (row + 1) * WINDOW)
        for row in range(height // WINDOW)
        for column in range(width // WINDOW)
    ]


def crop_windows(image: Image.Image) -> list[Image.Image]:
    """The 448x448 windows of an input-size image, row-major (window k is read with LoRA k)."""
    return [image.crop(box) for box in window_boxes((image.height, image.width))]


def global_view(image: Image.Image) -> Image.Image:
    """The 448x448 global view, interpolated as the model does (see the module docstring)."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    rows = _bicubic_matrix(image.height, WINDOW)
    columns = _bicubic_matrix(image.width, WINDOW)
    # Separable: interpolate down the rows, then along the columns, each channel at once.
    resized = np.tensordot(rows, pixels, axes=(1, 0))  # (448, width, 3)
    resized = np.tensordot(columns, resized, axes=(1, 1)).transpose(1, 0, 2)  # (448, 448, 3)
    return Image.fromarray(np.clip(np.rint(resized), 0, 255).astype(np.uint8), "RGB")


def _bicubic_matrix(source: int, target: int):  # -> numpy.ndarray (target x source)
    """Weights of torch's bicubic interpolation (align_corners=False, no antialias) along one axis."""
    import numpy as np

    scale = source / target
    centres = (np.arange(target) + 0.5) * scale - 0.5
    floor = np.floor(centres)
    fraction = centres - floor
    weights = np.zeros((target, source))
    for tap in range(-1, 3):
        distance = np.abs(fraction - tap)
        tap_weight = np.where(
            distance <= 1,
            ((_CUBIC_A + 2) * distance - (_CUBIC_A + 3)) * distance**2 + 1,
            ((_CUBIC_A * distance - 5 * _CUBIC_A) * distance + 8 * _CUBIC_A) * distance - 4 * _CUBIC_A,
        )
        index = np.clip(floor + tap, 0, source - 1).astype(int)  # torch clamps at the borders
        np.add.at(weights, (np.arange(target), index), tap_weight)
    return weights


def draw_window_grid(image: Image.Image) -> Image.Image:
    """A copy of the input-size image with window borders drawn and each window labelled with its index."""
    from PIL import ImageDraw, ImageFont

    grid = image.convert("RGB")  # always a copy, even of an RGB image
    draw = ImageDraw.Draw(grid)
    line = max(2, min(grid.size) // 300)
    try:
        font = ImageFont.load_default(size=max(16, WINDOW // 14))
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        font = ImageFont.load_default()
    for index, (left, top, right, bottom) in enumerate(window_boxes((grid.height, grid.width))):
        draw.rectangle((left, top, right - 1, bottom - 1), outline=_GRID_COLOUR, width=line)
        label = str(index)
        x0, y0, x1, y1 = draw.textbbox((0, 0), label, font=font)
        pad = 6
        box = (left + line, top + line, left + line + (x1 - x0) + 2 * pad, top + line + (y1 - y0) + 2 * pad)
        draw.rectangle(box, fill=_GRID_COLOUR)
        draw.text((box[0] + pad - x0, box[1] + pad - y0), label, font=font, fill=(255, 255, 255))
    return grid


# ---------------------------------------------------------------------------------------------- files


def output_dirs(sources: Iterable[Source], out_dir: Path) -> dict[str, Path]:
    """Folder under `out_dir` for each source name: its path relative to the sources' common folder, plus
    FOLDER_SUFFIX (a folder named `report.pdf` would pass for a PDF with `find -name '*.pdf'`).

    Every part is sanitised (no separators, no '..', no control characters, nothing hidden), so nothing
    derived from an input can point outside `out_dir`; folders that would clash (equal up to case, or one
    inside another's) get their source's hash added (`output.distinct_paths`), the same on every run.
    """
    return {name: out_dir / relative for name, relative in _relative_dirs(sources).items()}


def _relative_dirs(
    sources: Iterable[Source], *, blocked: Callable[[PurePosixPath], bool] | None = None
) -> dict[str, PurePosixPath]:
    usable = [source for source in sources if source.error is None]
    located = [source for source in usable if source.path is not None]
    absolute = {source.name: os.path.abspath(source.path) for source in located}  # type: ignore[arg-type]
    common = os.path.commonpath([os.path.dirname(path) for path in absolute.values()]) if absolute else ""
    planned: dict[str, PurePosixPath] = {}
    for source in usable:
        if source.name in absolute:
            parts = Path(os.path.relpath(absolute[source.name], common)).parts
        else:
            parts = (source.name,)  # <stdin>, /dev/fd/63: one folder named after the stream
        *folders, name = (_safe_part(part) for part in parts)
        planned[source.name] = PurePosixPath(*folders, name + FOLDER_SUFFIX)
    return distinct_paths(planned, blocked=blocked)


def _safe_part(part: str) -> str:
    cleaned = "".join("_" if not ch.isprintable() or ch in _UNSAFE_CHARACTERS else ch for ch in part).strip()
    if cleaned in ("", ".", ".."):
        return "_"
    if cleaned.startswith("."):  # keep outputs visible
        cleaned = "_" + cleaned[1:]
    return cleaned[:200]


def page_views(page: Page) -> list[tuple[str, Image.Image]]:
    """File name and image of the grid, each window and the global view of one input-size page."""
    stem = f"page-{page.page:0{max(3, len(str(page.pages)))}d}"
    windows = crop_windows(page.image)
    digits = len(str(len(windows) - 1))
    views = [(f"{stem}-grid.png", draw_window_grid(page.image))]
    views += [(f"{stem}-window-{index:0{digits}d}.png", window) for index, window in enumerate(windows)]
    views.append((f"{stem}-global.png", global_view(page.image)))
    return views


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def render_documents(
    inputs: Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    size: tuple[int, int] | str = DEFAULT_SIZE,
    pages: str | None = None,
    password: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    stdin: bytes | IO[bytes] | None = None,
    prefetch_depth: int = 2,
    overwrite: bool = False,
    render_timeout: float | None | Literal["default"] = "default",
) -> Iterator[RenderedPage | PageError]:
    """Render every page of the inputs into `out_dir`; one record per page written or per problem.

    Arguments are checked now (UsageError: bad size or pages, `out_dir` not a folder); pages are rendered
    in a background thread while the previous one is being written. Files are written through
    `monkey_cli.output_folder`: nothing outside `out_dir`, no file monkey did not write replaced (unless
    `overwrite`), each file whole or not at all; files monkey wrote are never read as inputs. A PDF page that
    takes longer than `render_timeout` seconds to render is an error record (see `documents.iter_pages`).
    """
    window_size = check_window_size(size)
    selection = parse_pages(pages)
    folder = OutputFolder(out_dir, overwrite=overwrite)
    try:
        sources = expand_inputs(
            list(inputs), stdin, exclude=OutputsFilter(folder), pipe_hint=f"monkey render - --out {out_dir}"
        )
        records = iter_pages(  # pixels only: no text layer is read
            sources, size=window_size, pages=selection, password=password, max_pixels=max_pixels,
            text_layer=False, render_timeout=render_timeout,
        )  # fmt: skip
        directories = _relative_dirs(sources, blocked=lambda path: folder.blocked(path, folder=True))
    except BaseException:
        folder.close()
        raise
    return _write_all(prefetch(records, prefetch_depth), directories, folder)


def _write_all(
    records: Iterator[Page | PageError], directories: dict[str, PurePosixPath], folder: OutputFolder
) -> Iterator[RenderedPage | PageError]:
    try:
        for record in records:
            if isinstance(record, PageError):
                yield record
                continue
            for note in record.warnings:  # a repaired PDF, unreadable EXIF: the user hears of it, per page
                warnings.warn(f"{record.source} p.{record.page}: {note}", MonkeyWarning, stacklevel=2)
            directory = directories[record.source]
            try:
                files = [(directory / name, _png(image)) for name, image in page_views(record)]
                written = folder.write_files(files, {str(relative): {"render": True} for relative, _ in files})
            except OutputFull:
                raise
            except OutputError as exc:
                yield PageError(record.source, record.page, str(exc), pages=record.pages, path=record.path)
                continue
            yield RenderedPage(
                record.source, record.page, record.pages, folder.root / directory, tuple(written)
            )
    finally:
        folder.close()

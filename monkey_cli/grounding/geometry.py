"""From the model's 0..1000 frame to a page's pixels and PDF points.

The model sees the page stretched to its input size (896 x 896 for TextMonkey, the aspect ratio not kept), and
its coordinates are fractions of that square times 1000. So a coordinate maps to a fraction of the page on each
axis: x / 1000 * width, y / 1000 * height, the origin at the top left, for any page size.

Pixels are those of the page as `documents` reads it (`Page.original_size`: an image after its EXIF orientation,
a PDF page at `DEFAULT_PDF_DPI`); points are PDF points (1/72 inch), measured from the page's top-left corner as
PyMuPDF does (PDF's own user space has y pointing up: y_pdf = page height - y): a PDF page's displayed size, an
image's size at its stored resolution (72 dpi, one point per pixel, when it has none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from monkey_cli.grounding.parse import FRAME, FrameSpan

DEFAULT_IMAGE_DPI = 72.0  # an image without a stored resolution: one PDF point per pixel


@dataclass(frozen=True)
class PageGeometry:
    """A page's size in pixels and in PDF points (width, height)."""

    pixels: tuple[int, int]
    points: tuple[float, float]

    @classmethod
    def of(cls, page: Any) -> PageGeometry:
        """From a `documents.Page` (its original pixels; its points, or its pixels at its dpi)."""
        width, height = page.original_size
        if page.points is not None:
            return cls((width, height), (float(page.points[0]), float(page.points[1])))
        dpi = page.dpi or (DEFAULT_IMAGE_DPI, DEFAULT_IMAGE_DPI)
        x_dpi, y_dpi = (d if d and d > 0 else DEFAULT_IMAGE_DPI for d in dpi)
        return cls((width, height), (round(width * 72 / x_dpi, 3), round(height * 72 / y_dpi, 3)))

    @classmethod
    def of_image(cls, size: tuple[int, int], dpi: tuple[float, float] | None = None) -> PageGeometry:
        """From an image's (width, height) in pixels and its resolution (72 dpi when unknown)."""
        x_dpi, y_dpi = dpi or (DEFAULT_IMAGE_DPI, DEFAULT_IMAGE_DPI)
        return cls(size, (round(size[0] * 72 / x_dpi, 3), round(size[1] * 72 / y_dpi, 3)))

    def to_dict(self) -> dict[str, list[float]]:
        return {"pixels": list(self.pixels), "points": list(self.points)}

    @classmethod
    def from_dict(cls, data: Any) -> PageGeometry:
        pixels, points = data["pixels"], data["points"]
        return cls((int(pixels[0]), int(pixels[1])), (float(points[0]), float(points[1])))


@dataclass(frozen=True)
class Span:
    """A text and where it is on its page: `bbox` in page pixels (x0, y0, x1, y1; x1 and y1 the first pixel past
    the box, never beyond the page), `points` the same box in PDF points, `frame` the model's own coordinates."""

    text: str
    bbox: tuple[int, int, int, int]
    points: tuple[float, float, float, float]
    frame: tuple[int, int, int, int]
    kind: str
    page: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "bbox": list(self.bbox),
            "points": list(self.points),
            "frame": list(self.frame),
            "kind": self.kind,
            "page": self.page,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Span:
        return cls(
            text=str(data["text"]),
            bbox=tuple(int(v) for v in data["bbox"]),  # type: ignore[arg-type]
            points=tuple(float(v) for v in data["points"]),  # type: ignore[arg-type]
            frame=tuple(int(v) for v in data["frame"]),  # type: ignore[arg-type]
            kind=str(data.get("kind", "box")),
            page=int(data["page"]),
        )


def to_page(span: FrameSpan, geometry: PageGeometry, page: int) -> Span:
    """`span`'s frame box on a page of `geometry` (page number `page`, 1-based)."""
    width, height = geometry.pixels
    x0, y0, x1, y1 = span.box
    bbox = (
        _pixel(x0, width, math.floor),
        _pixel(y0, height, math.floor),
        _pixel(x1, width, math.ceil),
        _pixel(y1, height, math.ceil),
    )
    width_pt, height_pt = geometry.points
    points = (
        round(x0 / FRAME * width_pt, 2),
        round(y0 / FRAME * height_pt, 2),
        round(x1 / FRAME * width_pt, 2),
        round(y1 / FRAME * height_pt, 2),
    )
    return Span(span.text, bbox, points, span.box, span.kind, page)


def _pixel(coordinate: int, size: int, rounding: Any) -> int:
    return min(max(int(rounding(coordinate / FRAME * size)), 0), size)


# A point (TextMonkey's `<point>`, or a box whose corners meet) gives no extent: writers draw and place its text
# in a box of this height (a fraction of the page height), as wide as the text, centred on the point.
POINT_TEXT_HEIGHT = 0.015
CHARACTER_WIDTH = 0.55  # an average glyph's advance, in text heights


def text_box(box: tuple[float, float, float, float], text: str, page_height: float) -> tuple[float, ...]:
    """Where `text` goes for a span `box` (pixels or points, the same unit as `page_height`): the box itself,
    or for a box without area a text-sized box centred on it."""
    x0, y0, x1, y1 = box
    if x1 > x0 and y1 > y0:
        return box
    height = max(POINT_TEXT_HEIGHT * page_height, 1.0)
    width = max(len(text), 1) * CHARACTER_WIDTH * height
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return (max(cx - width / 2, 0.0), max(cy - height / 2, 0.0), cx + width / 2, cy + height / 2)


def word_boxes(text: str, box: tuple[float, ...]) -> list[tuple[str, tuple[float, float, float, float]]]:
    """The words of `text` with a box each: the span's box cut across its width in proportion to each word's
    characters (a word and its following space), an estimate (the model gives one box per text)."""
    words = text.split()
    if not words:
        return []
    x0, y0, x1, y1 = box
    total = sum(len(word) + 1 for word in words) - 1
    step = (x1 - x0) / max(total, 1)
    result, cursor = [], 0
    for word in words:
        left = x0 + cursor * step
        result.append((word, (left, y0, left + len(word) * step, y1)))
        cursor += len(word) + 1
    return result

"""An overlay: the page with each spotted text's box drawn and labelled, for a person to check at a glance.

The page is drawn at its own pixels (an image as it is, a PDF page at `DEFAULT_PDF_DPI`), scaled down so that
its longer side is at most MAX_SIDE. Each box gets an outline and a light tint, numbered in reading order; its
number and text go on a label in the box's colour, placed where it hides the least of the other boxes (above the
box, below it, to its right, or over its corner). A point (a box without area) is a dot with its label. Colours
cycle so that neighbouring boxes stay apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from monkey_cli.grounding.geometry import Span, text_box

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

MAX_SIDE = 2000
COLOURS = ((220, 20, 60), (30, 110, 230), (0, 150, 70), (230, 120, 0), (150, 40, 200), (0, 150, 160))
LABEL_CHARS = 60  # longer texts are cut in the label (the record keeps them whole)


def draw_overlay(image: Image, spans: Sequence[Span]) -> Image:
    """A copy of `image` (the page at the pixels the spans' `bbox` refer to) with every span drawn."""
    from PIL import Image, ImageDraw

    canvas = image.convert("RGB")
    scale = min(1.0, MAX_SIDE / max(canvas.size))
    if scale < 1.0:
        canvas = canvas.resize((max(1, round(canvas.width * scale)), max(1, round(canvas.height * scale))))
    boxes = [_scaled(text_box(span.bbox, span.text, image.height), scale) for span in spans]
    tint = canvas.copy()
    tint_draw = ImageDraw.Draw(tint)
    for index, box in enumerate(boxes):
        tint_draw.rectangle(box, fill=COLOURS[index % len(COLOURS)])
    canvas = Image.blend(canvas, tint, 0.18)
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(min(canvas.size) / 500))
    for index, (span, box) in enumerate(zip(spans, boxes, strict=True)):
        colour = COLOURS[index % len(COLOURS)]
        if span.bbox[2] > span.bbox[0] and span.bbox[3] > span.bbox[1]:
            draw.rectangle(box, outline=colour, width=line)
        else:
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            draw.ellipse((cx - 3 * line, cy - 3 * line, cx + 3 * line, cy + 3 * line), fill=colour)
    # Labels on a layer of their own, slightly see-through, each where it covers the least of the other boxes
    # and labels (above its box, below it, to its right, or over its own top left corner).
    labels = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    label_draw = ImageDraw.Draw(labels)
    font = _font(max(12, round(min(canvas.size) / 70)))
    taken: list[tuple[float, ...]] = list(boxes)
    for index, (span, box) in enumerate(zip(spans, boxes, strict=True)):
        text = f"{index + 1} {_short(span.text)}"
        left, top, right, bottom = label_draw.textbbox((0, 0), text, font=font)
        size = (right - left + 6, bottom - top + 6)
        others = taken[:index] + taken[index + 1 :]
        where = min(_placements(box, size, canvas.size), key=lambda rect: _covered(rect, others))
        label_draw.rectangle(where, fill=(*COLOURS[index % len(COLOURS)], 225))
        label_draw.text((where[0] + 3 - left, where[1] + 3 - top), text, font=font, fill=(255, 255, 255, 255))
        taken.append(where)
    return Image.alpha_composite(canvas.convert("RGBA"), labels).convert("RGB")


def _scaled(box: tuple[float, ...], scale: float) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (value * scale for value in box)
    return x0, y0, max(x1 - 1, x0), max(y1 - 1, y0)


def _placements(box: tuple[float, ...], size: tuple[int, int], canvas: tuple[int, int]) -> list[tuple[float, ...]]:
    """Where a label of `size` may go for `box`, in order of preference, kept on the canvas."""
    width, height = size
    x0, y0, x1, y1 = box
    spots = [(x0, y0 - height - 1), (x0, y1 + 1), (x1 + 2, y0), (x0, y0)]
    placed = []
    for x, y in spots:
        x = min(max(x, 0), max(canvas[0] - width, 0))
        y = min(max(y, 0), max(canvas[1] - height, 0))
        placed.append((x, y, x + width, y + height))
    return placed


def _covered(rect: tuple[float, ...], others: Sequence[tuple[float, ...]]) -> float:
    """How much of the other boxes and labels `rect` would hide (area)."""
    total = 0.0
    for other in others:
        width = min(rect[2], other[2]) - max(rect[0], other[0])
        height = min(rect[3], other[3]) - max(rect[1], other[1])
        if width > 0 and height > 0:
            total += width * height
    return total


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"

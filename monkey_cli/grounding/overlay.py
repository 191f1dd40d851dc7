"""An overlay: the page with each spotted text's box drawn and labelled, for a person to check at a glance.

The page is drawn at its own pixels (an image as it is, a PDF page at `DEFAULT_PDF_DPI`), scaled down so that
its longer side is at most MAX_SIDE. Each box gets an outline and a light tint, numbered in reading order; the
text is written above it on a solid label (below when there is no room above). A point (a box without area)
is a dot with its label. Colours cycle so that neighbouring boxes stay apart.
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
    tint = canvas.copy()
    tint_draw = ImageDraw.Draw(tint)
    boxes = [_scaled(text_box(span.bbox, span.text, image.height), scale) for span in spans]
    for index, box in enumerate(boxes):
        tint_draw.rectangle(box, fill=COLOURS[index % len(COLOURS)])
    canvas = Image.blend(canvas, tint, 0.18)
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(min(canvas.size) / 500))
    font = _font(max(12, round(min(canvas.size) / 70)))
    for index, (span, box) in enumerate(zip(spans, boxes, strict=True)):
        colour = COLOURS[index % len(COLOURS)]
        if span.bbox[2] > span.bbox[0] and span.bbox[3] > span.bbox[1]:
            draw.rectangle(box, outline=colour, width=line)
        else:
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            draw.ellipse((cx - 3 * line, cy - 3 * line, cx + 3 * line, cy + 3 * line), fill=colour)
        _label(draw, f"{index + 1} {_short(span.text)}", box, colour, font, canvas.size)
    return canvas


def _scaled(box: tuple[float, ...], scale: float) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (value * scale for value in box)
    return x0, y0, max(x1 - 1, x0), max(y1 - 1, y0)


def _label(draw: Any, text: str, box: tuple[float, ...], colour: tuple[int, int, int], font: Any,
           size: tuple[int, int]) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height, pad = right - left, bottom - top, 3
    x = min(max(box[0], 0), max(size[0] - width - 2 * pad, 0))
    y = box[1] - height - 2 * pad
    if y < 0:
        y = box[3] + 1
    draw.rectangle((x, y, x + width + 2 * pad, y + height + 2 * pad), fill=colour)
    draw.text((x + pad - left, y + pad - top), text, font=font, fill=(255, 255, 255))


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"

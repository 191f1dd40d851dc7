"""A PDF page's text layer: judged first, then converted to Markdown (headings, lists, tables, reading order).

`read` answers a page from its text layer when the layer is the page's real text: exact, instant, no model.
Not every text layer is. `judge` sets one aside, with the reason, in three cases (the page then goes to the
model, and the reason becomes a warning on its record):

1. **Glyphs without a Unicode mapping.** A font embedded without a ToUnicode table gives MuPDF glyph ids,
   not characters: the text comes out as `)FMMP\\x01XPSME` or as U+FFFD. Set aside when at least
   `UNMAPPED_SHARE` of the page's characters (spaces aside) have no Unicode (U+FFFD in MuPDF's text trace)
   or only a private-use code point.
2. **An invisible text layer far from what the page shows.** OCR software lays its text over a scan in
   invisible ink (PDF text render mode 3, or zero opacity). When the page's text is mostly invisible, the
   page is rendered and each invisible character's box is looked at: set aside when less than `INKED_SHARE`
   of those characters lie over any ink (the layer belongs to another page, or is shifted off the words).
3. **A scanned page with a stray line of text.** Images cover at least `SCAN_COVER` of the page and its
   visible text (not an OCR layer: rule 2 judges those) holds fewer than `STRAY_WORDS` words (a scanner's
   "Scanned with ...", a Bates number, a date stamp): the text describes only a corner of what the page
   shows.

What it cannot tell: an OCR layer in the right places whose words are wrong but still look like words; that
takes reading the page (`--force-ocr` asks the model whatever the text layer holds).

A usable layer is converted with pymupdf4llm (by PyMuPDF's authors, on MuPDF's own layout analysis): headings
as `#`, bullet and numbered lists, tables as Markdown tables, multi-column text in reading order, page
headers and footers kept. Its own OCR is never used (the model is this tool's OCR).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

UNMAPPED_SHARE = 0.10  # rule 1: this share of unmappable characters sets the layer aside
INVISIBLE_SHARE = 0.5  # rule 2 applies when at least this share of the text is invisible (an OCR layer)
INKED_SHARE = 0.5  # rule 2: less than this share of the invisible characters over ink sets it aside
SCAN_COVER = 0.5  # rule 3: images cover at least this share of the page ...
STRAY_WORDS = 30  # ... and the text layer has fewer words than this

_INK_DPI = 72  # the render rule 2 looks at: enough to see a letter's strokes, cheap for a whole page
_INK_LEVEL = 160  # a pixel darker than this (of 255) is ink
_INK_FRACTION = 0.02  # a character's box is over ink when this share of its pixels is
_COVER_GRID = 64  # image coverage is counted on a grid of this many cells per side
_INVISIBLE_RENDER_MODE = 3  # PDF text render mode 3: neither filled nor stroked
_REPLACEMENT = 0xFFFD
_WORD = re.compile(r"\S+")

# pymupdf4llm's layout analysis keeps models and state at module level: one page at a time per process.
_CONVERTER_LOCK = threading.Lock()


@dataclass(frozen=True)
class TextLayer:
    """A page's text layer. `markdown` is the page as Markdown when the layer is usable ("" otherwise, and
    for a page without text); `problem` says why a layer that has text was set aside (None when it is used)."""

    markdown: str
    problem: str | None = None

    @property
    def usable(self) -> bool:
        return self.problem is None and bool(self.markdown.strip())


@dataclass
class _Census:
    """What a page's text is made of, from MuPDF's text trace."""

    characters: int = 0  # spaces aside
    unmapped: int = 0
    invisible: list[tuple[float, float, float, float]] | None = None  # boxes of invisible characters
    words: int = 0

    @property
    def invisible_count(self) -> int:
        return len(self.invisible or [])


def read_text_layer(page: Any) -> TextLayer:
    """The text layer of a PyMuPDF page, judged (`judge`) and, when usable, converted to Markdown."""
    census = _census(page)
    if census.characters == 0:
        return TextLayer("")
    problem = judge(page, census)
    if problem is not None:
        return TextLayer("", problem)
    return TextLayer(to_markdown(page))


def judge(page: Any, census: _Census | None = None) -> str | None:
    """Why the page's text layer is not its real text (see the module doc), or None when it is."""
    census = census or _census(page)
    if census.characters == 0:
        return None
    if census.unmapped >= UNMAPPED_SHARE * census.characters:
        return (
            f"text layer not used: {census.unmapped} of its {census.characters} characters have no Unicode "
            "mapping (a font without a ToUnicode table); the model reads the page"
        )
    if census.invisible_count >= INVISIBLE_SHARE * census.characters:  # an OCR layer: is it over the words?
        inked = _inked_share(page, census.invisible or [])
        if inked < INKED_SHARE:
            return (
                f"text layer not used: it is invisible text (an OCR layer) and only {inked:.0%} of it lies over "
                "anything the page shows; the model reads the page"
            )
        return None
    if census.words >= STRAY_WORDS:
        return None
    cover = _image_cover(page)
    if cover >= SCAN_COVER:
        noun = "word" if census.words == 1 else "words"
        return (
            f"text layer not used: the page is a scan (images cover {cover:.0%} of it) and its text layer is "
            f"only {census.words} {noun}; the model reads the page"
        )
    return None


def to_markdown(page: Any) -> str:
    """The page as Markdown through pymupdf4llm, tidied: no trailing spaces, at most one blank line in a row."""
    import pymupdf4llm

    with _CONVERTER_LOCK:
        text = pymupdf4llm.to_markdown(
            page.parent, pages=[page.number], use_ocr=False, show_progress=False, header=True, footer=True
        )
    lines = [line.rstrip() for line in text.splitlines()]
    tidy = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    return tidy.strip("\n")


# --- the facts the rules look at ---------------------------------------------------------------------------


def _census(page: Any) -> _Census:
    census = _Census(invisible=[])
    assert census.invisible is not None
    text: list[str] = []
    for span in page.get_texttrace():
        invisible = span.get("type") == _INVISIBLE_RENDER_MODE or span.get("opacity", 1.0) == 0
        for char in span["chars"]:
            code = char[0]
            if code in (32, 9, 10, 13, 0xA0):
                text.append(" ")
                continue
            text.append(chr(code) if 0 <= code <= 0x10FFFF else "?")
            census.characters += 1
            if _unmappable(code):
                census.unmapped += 1
            if invisible:
                census.invisible.append(tuple(char[3]))
        text.append(" ")  # spans are at least a word apart
    census.words = len(_WORD.findall("".join(text)))
    return census


def _unmappable(code: int) -> bool:
    """U+FFFD (MuPDF found no Unicode for the glyph) or a private-use code point (a symbol font's own)."""
    return code == _REPLACEMENT or 0xE000 <= code <= 0xF8FF


def _inked_share(page: Any, boxes: list[tuple[float, float, float, float]]) -> float:
    """The share of `boxes` (unrotated page coordinates) that lie over ink in the rendered page."""
    import numpy as np
    import pymupdf

    if not boxes:
        return 1.0
    pixmap = page.get_pixmap(dpi=_INK_DPI, colorspace=pymupdf.csGRAY, alpha=False)
    pixels = np.frombuffer(pixmap.samples, dtype=np.uint8).reshape(pixmap.height, pixmap.stride)[:, : pixmap.width]
    ink = pixels < _INK_LEVEL
    to_pixels = page.rotation_matrix * pymupdf.Matrix(_INK_DPI / 72, _INK_DPI / 72)
    inked = 0
    for box in boxes:
        rect = (pymupdf.Rect(box) * to_pixels).irect & pymupdf.IRect(0, 0, pixmap.width, pixmap.height)
        if rect.is_empty:
            continue
        if ink[rect.y0 : rect.y1, rect.x0 : rect.x1].mean() >= _INK_FRACTION:
            inked += 1
    return inked / len(boxes)


def _image_cover(page: Any) -> float:
    """The share of the page that images cover (overlaps counted once), on a coarse grid."""
    import numpy as np
    import pymupdf

    area = page.rect
    if area.is_empty:
        return 0.0
    grid = np.zeros((_COVER_GRID, _COVER_GRID), dtype=bool)
    to_grid = page.rotation_matrix * pymupdf.Matrix(_COVER_GRID / area.width, _COVER_GRID / area.height)
    for info in page.get_image_info():
        rect = (pymupdf.Rect(info["bbox"]) * to_grid).round() & pymupdf.IRect(0, 0, _COVER_GRID, _COVER_GRID)
        if not rect.is_empty:
            grid[rect.y0 : rect.y1, rect.x0 : rect.x1] = True
    return float(grid.mean())

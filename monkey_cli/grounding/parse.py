"""TextMonkey's grounded output -> text and positions, never failing on what the model writes.

The syntax is the one `demo_textmonkey.py` parses from an answer decoded with the special tokens kept:
`<ref>TEXT</ref>` names a text, `<box>(x1,y1),(x2,y2)</box>` gives its position as two corners, integers in a
0..1000 frame per axis (the image stretched to 1000 x 1000, origin top left; the demo draws their midpoint).
`<ref>`, `</ref>`, `<box>`, `</box>` are single special tokens; the coordinates are ordinary text. The demo
pairs the i-th `<ref>` with the i-th `<box>`; a `<box>` with no `<ref>` before it (an answer to a question
asked with its position) belongs to the text just before it. `eval/evaluate_vqa_doc.py` also strips
`<point>...</point>` (plain text, not a special token) from answers: one `(x,y)` pair, read as a point.

Anything else is kept as text with a warning: an unclosed tag, a box with fewer than two pairs, coordinates
outside the frame (clamped), a `<ref>` that never gets a box, a box that names no text (left out).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

FRAME = 1000  # coordinates are in a 0..1000 frame on each axis

_TAG = re.compile(r"<(/?)(ref|box|quad|point)>")
_PAIR = re.compile(r"\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)")
_MAX_WARNINGS = 20  # a long answer full of broken tags gets this many warnings, then one summary
_SHOWN = 40  # characters of a piece of text quoted in a warning


@dataclass(frozen=True)
class FrameSpan:
    """One positioned text: `box` (x0, y0, x1, y1) in the model's 0..1000 frame, x0 <= x1 and y0 <= y1.

    `kind` is "box" (two corners) or "point" (x0 == x1, y0 == y1)."""

    text: str
    box: tuple[int, int, int, int]
    kind: str = "box"

    @property
    def center(self) -> tuple[float, float]:
        """The box's midpoint, the point the original demo draws."""
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass
class GroundedText:
    """What a grounded answer says: `text` with the markup removed (tags and coordinates, as the original eval
    scores answers), `pieces` (each text in reading order, positioned or not), `spans` (those with a
    position) and `warnings` about what could not be read."""

    text: str
    pieces: list[str] = field(default_factory=list)
    spans: list[FrameSpan] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> str:
        """One text per line, in reading order: the answer of text spotting."""
        return "\n".join(self.pieces)


def parse_grounded(raw: str, unnamed: str | None = None) -> GroundedText:
    """Read `raw` (an answer decoded with the grounding tags kept) into texts and positions. `unnamed` is the text
    of a position that names none (the text asked for with `<ref>TEXT</ref>`, whose answer is a bare box)."""
    parser = _Parser(unnamed)
    position = 0
    for match in _TAG.finditer(raw):
        if match.start() < position:
            continue  # inside a tag pair already consumed
        parser.plain(raw[position : match.start()])
        closing, name = match.group(1) == "/", match.group(2)
        if closing:
            parser.warn(f"'</{name}>' without '<{name}>'; kept as text")
            parser.plain(match.group(0))
            position = match.end()
            continue
        end = raw.find(f"</{name}>", match.end())
        if end < 0:
            parser.warn(f"unclosed '<{name}>' (the answer ends inside it); its content kept as text")
            parser.plain(raw[match.end() :])
            position = len(raw)
            break
        content = raw[match.end() : end]
        if name == "ref":
            parser.ref(content)
        else:
            parser.position(name, content)
        position = end + len(f"</{name}>")
    parser.plain(raw[position:])
    return parser.finish()


class _Parser:
    def __init__(self, unnamed: str | None = None) -> None:
        self.unnamed = unnamed
        self.inline: list[str] = []  # the text as the eval would read it
        self.pieces: list[str] = []
        self.spans: list[FrameSpan] = []
        self.warnings: list[str] = []
        self.refs: deque[str] = deque()  # refs still waiting for their box (the demo pairs them in order)
        self.pending = ""  # plain text since the last position: what a box without a ref names
        self.dropped_warnings = 0

    def warn(self, message: str) -> None:
        if len(self.warnings) < _MAX_WARNINGS:
            self.warnings.append(message)
        else:
            self.dropped_warnings += 1

    def plain(self, text: str) -> None:
        if not text:
            return
        self.inline.append(text)
        self.pending += text

    def ref(self, text: str) -> None:
        self._flush_pending()
        if self.inline and not self.inline[-1][-1:].isspace():
            self.inline.append(" ")  # two spotted texts in a row stay two words once their boxes are gone
        self.inline.append(text)
        text = _TAG.sub("", text).strip()  # a tag inside a <ref> is noise
        self.refs.append(text)
        if text:
            self.pieces.append(text)

    def position(self, name: str, content: str) -> None:
        pairs = [(int(x), int(y)) for x, y in _PAIR.findall(content)]
        needed = 1 if name == "point" else 2
        if len(pairs) < needed:
            shown = _short(content)
            self.warn(f"'<{name}>{shown}</{name}>' has {len(pairs)} of the {needed} (x,y) pairs it needs; no position")
            return
        pairs = [self._clamped(name, pair) for pair in pairs]
        if name == "point":
            (x0, y0), (x1, y1) = pairs[0], pairs[0]
        else:
            # The demo reads the first two pairs as corners (a <quad> has four: their bounding box).
            chosen = pairs if name == "quad" else pairs[:2]
            xs, ys = [x for x, _ in chosen], [y for _, y in chosen]
            x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
        if self.refs:
            text = self.refs.popleft()
        else:
            text = self.pending.strip() or (self.unnamed or "").strip()
            self.pending = ""
            if text:
                self.pieces.append(text)
        if not text:
            self.warn(f"the position ({x0},{y0}),({x1},{y1}) names no text; left out")
            return
        self.spans.append(FrameSpan(text, (x0, y0, x1, y1), "point" if name == "point" else "box"))

    def _clamped(self, name: str, pair: tuple[int, int]) -> tuple[int, int]:
        x, y = pair
        inside = (min(max(x, 0), FRAME), min(max(y, 0), FRAME))
        if inside != pair:
            self.warn(f"'<{name}>' coordinate ({x},{y}) is outside the 0..{FRAME} frame; clamped to {inside}")
        return inside

    def _flush_pending(self) -> None:
        text = self.pending.strip()
        if text:
            self.pieces.append(text)
        self.pending = ""

    def finish(self) -> GroundedText:
        self._flush_pending()
        for text in self.refs:
            self.warn(f"'<ref>{_short(text)}</ref>' has no position after it; kept as text")
        if self.dropped_warnings:
            self.warnings.append(f"and {self.dropped_warnings} more problems with positions")
        return GroundedText("".join(self.inline).strip(), self.pieces, self.spans, self.warnings)


def _short(text: str) -> str:
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."

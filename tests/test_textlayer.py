"""`read` as a document converter: a born-digital page's text layer becomes Markdown; a text layer that is not
the page's real text is set aside (with the reason as a warning) and the page goes to the model.

Every PDF is made here with PyMuPDF, one per kind the rules of `monkey_cli.documents.textlayer` tell apart.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pymupdf
import pytest
from conftest import SAMPLES_DIR, require_parity

from monkey_cli.documents import iter_pages
from monkey_cli.documents.textlayer import STRAY_WORDS, judge, read_text_layer

A4 = pymupdf.paper_rect("a4")  # 595 x 842 pt


def _save(doc: pymupdf.Document, path: Path) -> Path:
    doc.save(path)
    return path


def _born_digital(path: Path) -> Path:
    """A heading, a paragraph, a bullet list, a numbered list, a ruled table, then two columns."""
    doc = pymupdf.open()
    page = doc.new_page(width=A4.width, height=A4.height)
    html = (
        "<h1>Field report</h1><p>The survey covered three sites in the northern valley this spring.</p>"
        "<h2>Findings</h2><ul><li>Water levels rose at every site</li><li>Two wells ran dry in June</li></ul>"
        "<ol><li>Repair the pumps</li><li>Measure again in autumn</li></ol>"
    )
    page.insert_htmlbox(pymupdf.Rect(50, 50, 545, 330), html)
    rows = [("Site", "Depth", "Wells"), ("North", "12 m", "4"), ("South", "9 m", "2")]
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            rect = pymupdf.Rect(72 + c * 120, 340 + r * 24, 192 + c * 120, 364 + r * 24)
            page.draw_rect(rect, color=(0, 0, 0), width=0.8)
            page.insert_text((rect.x0 + 6, rect.y1 - 8), cell, fontsize=11)
    page.insert_htmlbox(pymupdf.Rect(50, 460, 290, 800), "<p>" + "The left column comes first. " * 8 + "</p>")
    page.insert_htmlbox(pymupdf.Rect(305, 460, 545, 800), "<p>" + "The right column comes second. " * 8 + "</p>")
    return _save(doc, path)


def _unmapped(path: Path) -> Path:
    """Text in an embedded font whose ToUnicode table is gone: MuPDF sees glyph ids, not characters."""
    doc = pymupdf.open()
    page = doc.new_page(width=A4.width, height=A4.height)
    page.insert_font(fontname="F0", fontbuffer=pymupdf.Font("cjk").buffer)
    for line in range(12):
        page.insert_text((72, 100 + 20 * line), "The quarterly figures are in the table below.", fontname="F0")
    font = next(xref for xref, *_ in page.get_fonts())
    doc.xref_set_key(font, "ToUnicode", "null")
    return _save(doc, path)


def _scan_image(words: list[tuple[str, tuple[int, int]]], size: tuple[int, int] = (1240, 1754)) -> bytes:
    """A 150-dpi A4 "scan": black words at the given pixel positions on white."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("L", size, 255)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=40)
    for text, where in words:
        draw.text(where, text, fill=0, font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


SCAN_WORDS = [("Invoice 4711 for services rendered", (100, 150)), ("Total due within thirty days", (100, 300))]


def _scan_with_ocr(path: Path, over_the_words: bool) -> Path:
    """A full-page scan with an invisible OCR layer (text render mode 3) of its words: laid over them, or (a
    layer that belongs elsewhere) over the page's blank lower half."""
    doc = pymupdf.open()
    page = doc.new_page(width=A4.width, height=A4.height)
    page.insert_image(A4, stream=_scan_image(SCAN_WORDS))
    scale = A4.width / 1240  # scan pixels to points
    for text, (x, y) in SCAN_WORDS:
        y += 0 if over_the_words else 1000
        page.insert_text((x * scale, (y + 34) * scale), text, fontsize=36 * scale, render_mode=3)
    return _save(doc, path)


def _scan_with_stray_line(path: Path) -> Path:
    doc = pymupdf.open()
    page = doc.new_page(width=A4.width, height=A4.height)
    page.insert_image(A4, stream=_scan_image(SCAN_WORDS))
    page.insert_text((40, 830), "Scanned with FooScan 2.1", fontsize=7)
    return _save(doc, path)


def _page(path: Path) -> pymupdf.Page:
    return pymupdf.open(path)[0]


# --- the conversion --------------------------------------------------------------------------------------------


def test_a_born_digital_page_becomes_markdown(tmp_path: Path) -> None:
    layer = read_text_layer(_page(_born_digital(tmp_path / "report.pdf")))
    assert layer.usable and layer.problem is None
    lines = layer.markdown.splitlines()
    assert any(line.startswith("# ") and "Field report" in line for line in lines)
    assert any(line.startswith("## ") and "Findings" in line for line in lines)
    assert "- Water levels rose at every site" in lines and "- Two wells ran dry in June" in lines
    assert "1. Repair the pumps" in lines and "2. Measure again in autumn" in lines
    assert "|Site|Depth|Wells|" in lines and "|North|12 m|4|" in lines and "|---|---|---|" in lines
    text = layer.markdown
    assert text.index("Field report") < text.index("Findings") < text.index("|Site|")
    assert text.index("left column") < text.index("right column")  # reading order: a column, then the next
    assert "\n\n\n" not in text and not any(line != line.rstrip() for line in lines)


def test_the_samples_tables_are_markdown_tables() -> None:
    (invoice,) = iter_pages([SAMPLES_DIR / "invoice.pdf"])
    assert "|Oscilloscope probe set P-200|2|EUR 189.00|EUR 378.00|" in invoice.text.splitlines()
    assert invoice.has_text_layer and invoice.warnings == ()


def test_pages_are_made_without_text_when_nothing_reads_it(tmp_path: Path, capsys) -> None:
    path = _born_digital(tmp_path / "report.pdf")
    (without,) = iter_pages([path], text_layer=False)
    assert without.text is None and not without.has_text_layer
    (with_text,) = iter_pages([path])
    assert with_text.text.startswith("# ")
    assert capsys.readouterr().out == ""  # the converter prints nothing: stdout carries results only


# --- text layers that are not the page's text ------------------------------------------------------------------


def test_glyphs_without_a_unicode_mapping_are_set_aside(tmp_path: Path) -> None:
    page = _page(_unmapped(tmp_path / "unmapped.pdf"))
    assert page.get_text().strip()  # MuPDF does give "text" (glyph ids): that is what must not reach a user
    problem = judge(page)
    assert problem is not None and "have no Unicode mapping" in problem and "the model reads the page" in problem
    (made,) = iter_pages([tmp_path / "unmapped.pdf"])
    assert made.text is None and not made.has_text_layer and made.warnings == (problem,)


def test_an_invisible_ocr_layer_over_blank_paper_is_set_aside(tmp_path: Path) -> None:
    problem = judge(_page(_scan_with_ocr(tmp_path / "elsewhere.pdf", over_the_words=False)))
    assert problem is not None and "invisible text (an OCR layer)" in problem and "only 0% of it" in problem


def test_an_invisible_ocr_layer_over_the_words_is_used(tmp_path: Path) -> None:
    layer = read_text_layer(_page(_scan_with_ocr(tmp_path / "ocr.pdf", over_the_words=True)))
    assert layer.problem is None and layer.usable
    assert "Invoice 4711" in layer.markdown and "thirty days" in layer.markdown


def test_a_scan_with_a_stray_line_of_text_is_set_aside(tmp_path: Path) -> None:
    problem = judge(_page(_scan_with_stray_line(tmp_path / "stray.pdf")))
    assert problem is not None and "the page is a scan (images cover 100% of it)" in problem
    assert "its text layer is only 4 words" in problem and STRAY_WORDS > 4


def test_a_page_with_a_picture_and_real_text_keeps_its_text(tmp_path: Path) -> None:
    """Half the page a photo, the other half an article: the text layer is the page's text."""
    doc = pymupdf.open()
    page = doc.new_page(width=A4.width, height=A4.height)
    page.insert_image(pymupdf.Rect(0, 0, A4.width, A4.height * 0.6), stream=_scan_image([], (1240, 1052)))
    page.insert_htmlbox(pymupdf.Rect(50, 520, 545, 820), "<p>" + "A caption and an article below it. " * 20 + "</p>")
    path = _save(doc, tmp_path / "article.pdf")
    assert judge(_page(path)) is None


# --- through the command line ----------------------------------------------------------------------------------


def test_read_sends_a_garbage_layer_to_the_model_with_a_note(tmp_path: Path) -> None:
    from hostile import cli

    model = str(require_parity("tiny-monkey"))
    garbage = _unmapped(tmp_path / "unmapped.pdf")
    clean = _born_digital(tmp_path / "report.pdf")
    result = cli("read", garbage, clean, "--model", model, "-f", "jsonl", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.stderr
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert first["answer_source"] == "model" and first["model"] == model
    assert len(first["warnings"]) == 1 and "no Unicode mapping" in first["warnings"][0]
    assert f"warning: {garbage} p.1: text layer not used" in result.stderr
    assert second["answer_source"] == "text_layer" and second["answer"].startswith("# ")
    assert second["warnings"] == []
    asked = cli("ask", garbage, "-q", "What?", "--model", model, "-f", "jsonl", "--max-new-tokens", "2")
    assert json.loads(asked.stdout)["warnings"] == []  # ask never reads the text layer: nothing to say about it


@pytest.mark.parametrize("flag", ["--force-ocr", None])
def test_force_ocr_skips_the_conversion(flag: str | None, monkeypatch) -> None:
    from hostile import cli

    from monkey_cli.documents.renderer import Renderer

    # The renderer process converts a page's text layer only when the page request asks for it.
    converted = []
    real = Renderer.request

    def spy(self, header, payload, timeout):  # noqa: ANN001, ANN202 - Renderer.request's own signature
        if header.get("op") == "page" and header.get("text_layer"):
            converted.append(header["number"] - 1)
        return real(self, header, payload, timeout)

    monkeypatch.setattr(Renderer, "request", spy)
    model = str(require_parity("tiny-monkey"))
    args = ["read", str(SAMPLES_DIR / "invoice.pdf"), "--model", model, "--max-new-tokens", "2", "-f", "json"]
    result = cli(*args, *([flag] if flag else []))
    assert result.exit_code == 0, result.stderr
    assert converted == ([] if flag else [0])
    assert json.loads(result.stdout)["records"][0]["answer_source"] == ("model" if flag else "text_layer")


def test_read_md_is_a_markdown_document(tmp_path: Path) -> None:
    """`monkey read report.pdf -f md > report.md`: the page's Markdown with a comment before it, nothing else;
    with --out, each document's file is the same document."""
    from hostile import cli

    model = str(require_parity("tiny-monkey"))
    path = _born_digital(tmp_path / "report.pdf")
    result = cli("read", path, "--model", model, "-f", "md")
    assert result.exit_code == 0, result.stderr
    first, rest = result.stdout.split("\n\n", 1)
    assert first == f"<!-- {path} p.1/1 · the PDF's text layer -->"
    assert rest.startswith("# ") and "|Site|Depth|Wells|" in rest and "```" not in rest
    out = tmp_path / "out"
    assert cli("read", path, "--model", model, "-f", "md", "--out", out).exit_code == 0
    assert (out / "report.pdf.md").read_text().split("\n\n", 1)[1] == rest

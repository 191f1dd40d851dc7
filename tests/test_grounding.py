"""Grounded reading without a model: TextMonkey's output syntax parsed (well-formed, malformed and partial),
mapped to pages, and written as hOCR, a searchable PDF and an overlay.

The tiny checkpoint's random weights never emit a box, so these tests feed text in the model's exact syntax
(`demo_textmonkey.py`: `<ref>TEXT</ref><box>(x1,y1),(x2,y2)</box>`, a 0..1000 frame per axis) to the parser and
the writers; test_textmonkey_cli.py runs the same writers behind the real model.
"""

from __future__ import annotations

import io
import random
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pymupdf
import pytest
from conftest import SAMPLES_DIR, require_parity
from PIL import Image, ImageDraw

from monkey_cli import documents
from monkey_cli.grounding import FRAME, Grounded, ground_record, parse_grounded, record_spans
from monkey_cli.grounding.geometry import text_box, word_boxes
from monkey_cli.grounding.hocr import render_hocr
from monkey_cli.grounding.overlay import draw_overlay
from monkey_cli.grounding.pdf import searchable_pdf
from monkey_cli.output import Record, make_writer, render

SPOTTED = (
    "<ref>QUARTERLY REPORT 2024</ref><box>(120,40),(880,80)</box>"
    "<ref>Revenue grew 12%</ref><box>(100,200),(500,230)</box>"
    "<ref>Total: 1,234 €</ref><box>(600,900),(950,940)</box>"
)
XHTML = "{http://www.w3.org/1999/xhtml}"


# --- parsing -------------------------------------------------------------------------------------------


def test_text_spotting_in_the_demos_syntax() -> None:
    grounded = parse_grounded(SPOTTED)
    assert [(s.text, s.box) for s in grounded.spans] == [
        ("QUARTERLY REPORT 2024", (120, 40, 880, 80)),
        ("Revenue grew 12%", (100, 200, 500, 230)),
        ("Total: 1,234 €", (600, 900, 950, 940)),
    ]
    assert grounded.lines() == "QUARTERLY REPORT 2024\nRevenue grew 12%\nTotal: 1,234 €"
    assert grounded.text == "QUARTERLY REPORT 2024 Revenue grew 12% Total: 1,234 €"
    assert grounded.warnings == []
    assert grounded.spans[0].center == (500.0, 60.0)  # the point demo_textmonkey.py draws


def test_refs_and_boxes_pair_in_order_as_the_demo_pairs_them() -> None:
    grounded = parse_grounded("<ref>A</ref><ref>B</ref><box>(1,2),(3,4)</box> and <box>(5,6),(7,8)</box>")
    assert [(s.text, s.box) for s in grounded.spans] == [("A", (1, 2, 3, 4)), ("B", (5, 6, 7, 8))]
    assert grounded.pieces == ["A", "B", "and"]


def test_a_grounded_answer_and_a_located_text() -> None:
    # "... Provide the location coordinates of the answer": the box follows the text it locates.
    answer = parse_grounded("The total is 1,234<box>(600,900),(950,940)</box>.")
    assert answer.text == "The total is 1,234."
    assert [(s.text, s.box) for s in answer.spans] == [("The total is 1,234", (600, 900, 950, 940))]
    # "<ref>TEXT</ref>" asks where TEXT is: the answer is a bare box, named after the text asked for.
    located = parse_grounded("<box>(120,40),(880,80)</box>", unnamed="QUARTERLY REPORT 2024")
    assert [(s.text, s.box) for s in located.spans] == [("QUARTERLY REPORT 2024", (120, 40, 880, 80))]


def test_corners_in_any_order_points_and_quads() -> None:
    grounded = parse_grounded(
        "<ref>x</ref><box>(900,80),(100,20)</box><ref>p</ref><point>(500,250)</point>"
        "<ref>q</ref><quad>(10,10),(90,12),(88,40),(12,38)</quad><ref>s</ref><box>( 1 , 2 ),( 3 , 4 ), (9,9)</box>"
    )
    assert [(s.text, s.box, s.kind) for s in grounded.spans] == [
        ("x", (100, 20, 900, 80), "box"),
        ("p", (500, 250, 500, 250), "point"),
        ("q", (10, 10, 90, 40), "box"),
        ("s", (1, 2, 3, 4), "box"),  # the first two pairs are the corners, as in the demo
    ]
    assert grounded.warnings == []


@pytest.mark.parametrize(
    ("raw", "spans", "pieces", "warning"),
    [
        # Generation stopped by max_new_tokens inside a box: the text is kept, no position made up.
        ("<ref>Total</ref><box>(600,900),(95", [], ["Total", "(600,900),(95"], "unclosed '<box>'"),
        ("<ref>Total</ref><box>(600,900)</box>", [], ["Total"], "has 1 of the 2 (x,y) pairs"),
        ("<ref>Total</ref><box>(a,b),(c,d)</box>", [], ["Total"], "has 0 of the 2 (x,y) pairs"),
        ("<ref>Total</ref>", [], ["Total"], "has no position after it"),
        ("<ref>Total", [], ["Total"], "unclosed '<ref>'"),
        ("Total</box> here", [], ["Total</box> here"], "'</box>' without '<box>'"),
        ("<box>(1,2),(3,4)</box>", [], [], "names no text; left out"),
        ("<ref>T</ref><box>(-5,20),(1200,30)</box>", [("T", (0, 20, 1000, 30))], ["T"], "outside the 0..1000 frame"),
        ("<ref>a<box>(1,2),(3,4)</box></ref><box>(5,6),(7,8)</box>", [("a(1,2),(3,4)", (5, 6, 7, 8))],
         ["a(1,2),(3,4)"], None),
        ("plain text, no positions at all", [], ["plain text, no positions at all"], None),
        ("", [], [], None),
    ],
)
def test_malformed_and_partial_spans_keep_the_text_and_warn(raw, spans, pieces, warning) -> None:
    grounded = parse_grounded(raw)
    assert [(s.text, s.box) for s in grounded.spans] == spans
    assert grounded.pieces == pieces
    if warning is None:
        assert grounded.warnings == []
    else:
        assert any(warning in line for line in grounded.warnings), grounded.warnings
        assert all("\n" not in line for line in grounded.warnings)


def test_no_answer_ever_crashes_the_parser() -> None:
    """Random soup of the syntax's pieces (what a broken or untrained model writes): never an exception, every
    box inside the frame with ordered corners, no text lost outside the markup."""
    alphabet = ["<ref>", "</ref>", "<box>", "</box>", "<point>", "</point>", "<quad>", "</quad>", "(", ")", ",",
                "12", "999", "-3", "4000", " ", "word", "é", "\n", "<", ">"]
    rng = random.Random(0)
    for _ in range(500):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        grounded = parse_grounded(raw)
        for span in grounded.spans:
            x0, y0, x1, y1 = span.box
            assert 0 <= x0 <= x1 <= FRAME and 0 <= y0 <= y1 <= FRAME
            assert span.text
        assert len(grounded.warnings) <= 21


def test_decoding_keeps_only_the_grounding_tags() -> None:
    from monkey_cli.model.tokenizer import QWenTokenizer

    tokenizer = QWenTokenizer.from_dir(require_parity("tiny-textmonkey"), image_token_span=768)
    plain = tokenizer._plain_ids
    ids = [
        tokenizer.ref_start_id, *plain("Total"), tokenizer.ref_end_id,
        tokenizer.box_start_id, *plain("(600,900),(950,940)"), tokenizer.box_end_id,
        2226,  # an id of the tiny lm_head beyond the tokenizer: the original's decode raises on it
        tokenizer.eod_id, tokenizer.img_start_id,
    ]
    assert tokenizer.decode_grounded(ids) == "<ref>Total</ref><box>(600,900),(950,940)</box>"
    assert tokenizer.decode(ids[:-3], skip_special_tokens=True) == "Total(600,900),(950,940)"  # the eval's view


# --- pages ---------------------------------------------------------------------------------------------


def _page(tmp_path: Path, size=(1240, 1754), dpi=None, kind="png") -> documents.Page:
    image = Image.new("RGB", size, "white")
    path = tmp_path / f"page.{kind}"
    image.save(path, dpi=dpi) if dpi else image.save(path)
    return documents.load_documents([path], size=(896, 896))[0]


def test_frame_maps_to_page_pixels_and_points(tmp_path: Path) -> None:
    page = _page(tmp_path, size=(1240, 1754), dpi=(150, 150))
    assert page.image.size == (896, 896) and page.original_size == (1240, 1754)
    grounded = Grounded.of(SPOTTED, page, lines=True)
    assert grounded.geometry.pixels == (1240, 1754)
    assert grounded.geometry.points == pytest.approx((595.2, 841.92), abs=0.1)  # A4 at 150 dpi (PNG: dots per m)
    first = grounded.spans[0]
    assert first.bbox == (148, 70, 1092, 141)  # 120/1000*1240 = 148.8 -> 148 (floor), 880 -> 1091.2 -> 1092 (ceil)
    width_pt, height_pt = grounded.geometry.points
    assert first.points == (round(0.12 * width_pt, 2), round(0.04 * height_pt, 2), round(0.88 * width_pt, 2),
                            round(0.08 * height_pt, 2))
    assert first.frame == (120, 40, 880, 80) and first.page == 1
    # A PDF page: its own points, its pixels at the documents' PDF resolution.
    pdf = documents.load_documents([SAMPLES_DIR / "report.pdf"], size=(896, 896), pages=[1])[0]
    box = Grounded.of("<ref>x</ref><box>(0,0),(1000,1000)</box>", pdf).spans[0]
    assert box.points == (0.0, 0.0, *pdf.points) and box.bbox == (0, 0, *pdf.original_size)


def test_ground_record_fills_spans_and_keeps_warnings(tmp_path: Path) -> None:
    page = _page(tmp_path)
    record = _record(page, "spot", "raw text (replaced)")
    record.warnings = ["a note from the page"]
    ground_record(record, SPOTTED + "<ref>cut off</ref><box>(1,2", page)
    # A box cut short by the answer's length limit: its text kept as text, no position made up.
    lines = ["QUARTERLY REPORT 2024", "Revenue grew 12%", "Total: 1,234 €", "cut off", "(1,2"]
    assert record.answer.splitlines() == lines
    assert [span["text"] for span in record.spans] == ["QUARTERLY REPORT 2024", "Revenue grew 12%", "Total: 1,234 €"]
    assert record.page_size == {"pixels": [1240, 1754], "points": [1240.0, 1754.0]}  # no dpi: 1 pt per pixel
    assert record.warnings[0] == "a note from the page" and "unclosed '<box>'" in record.warnings[1]
    again = Record.from_dict(record.to_dict())  # JSON round trip (what --out and the workers do)
    assert again.spans == record.spans and again.page_size == record.page_size
    plain = _record(page, "read", "text")
    assert "spans" not in plain.to_dict() and "page_size" not in plain.to_dict()  # other tasks' output unchanged


def test_word_boxes_split_a_line_inside_it() -> None:
    words = word_boxes("ab cdef g", (0.0, 10.0, 90.0, 20.0))
    assert [w for w, _ in words] == ["ab", "cdef", "g"]
    assert [tuple(round(v, 6) for v in box) for _, box in words] == [
        (0.0, 10.0, 20.0, 20.0), (30.0, 10.0, 70.0, 20.0), (80.0, 10.0, 90.0, 20.0)
    ]
    assert text_box((500.0, 500.0, 500.0, 500.0), "abcd", 1000.0) == (483.5, 492.5, 516.5, 507.5)  # a point


def _record(page: documents.Page, task: str, answer: str) -> Record:
    return Record(source=page.source, page=page.page, pages=page.pages, task=task, prompt="OCR with grounding:",
                  answer=answer, answer_source="model", model="tiny-textmonkey", quant="none")


def _spotted_records(path: Path, raws: list[str]) -> tuple[documents.Source, list[Record]]:
    source = documents.expand_inputs([path])[0]
    records = []
    for page, raw in zip(documents.load_documents([path], size=(896, 896)), raws, strict=True):
        record = _record(page, "spot", "")
        ground_record(record, raw, page)
        records.append(record)
    return source, records


# --- hOCR ----------------------------------------------------------------------------------------------


def test_hocr_is_well_formed_with_every_box_inside_its_page(tmp_path: Path) -> None:
    page = _page(tmp_path)
    spotted = _record(page, "spot", "")
    tricky = '<ref><b>&"x"\x07</ref><box>(0,0),(1000,1000)</box><point>(500,500)</point>'
    ground_record(spotted, SPOTTED + tricky, page)
    failed = Record.failure(error="boom", source="other.png", page=1, pages=1, task="spot", prompt="p", model="m",
                            quant="none")
    text = render_hocr([spotted, failed], title='doc "1" & <2>')
    root = ElementTree.fromstring(text.encode("utf-8"))  # well-formed XML (raises otherwise)
    assert root.tag == f"{XHTML}html"
    meta = {m.get("name"): m.get("content") for m in root.iter(f"{XHTML}meta")}
    assert meta["ocr-capabilities"] == "ocr_page ocr_line ocrx_word" and meta["ocr-system"].startswith("monkey-cli")
    pages = [div for div in root.iter(f"{XHTML}div") if div.get("class") == "ocr_page"]
    assert len(pages) == 2
    first = pages[0]
    assert "bbox 0 0 1240 1754" in first.get("title") and "ppageno 0" in first.get("title")
    lines = [span for span in first.iter(f"{XHTML}span") if span.get("class") == "ocr_line"]
    words = [span for span in first.iter(f"{XHTML}span") if span.get("class") == "ocrx_word"]
    assert len(lines) == 4  # three lines and the escaped one; the point names no text: left out
    assert " ".join(w.text for w in words) == "QUARTERLY REPORT 2024 Revenue grew 12% Total: 1,234 € <b>&\"x\""
    for element in lines + words:
        x0, y0, x1, y1 = (int(v) for v in element.get("title").removeprefix("bbox ").split())
        assert 0 <= x0 <= x1 <= 1240 and 0 <= y0 <= y1 <= 1754
    assert not [s for s in pages[1].iter(f"{XHTML}span")]  # the failed page: a page without lines
    # The writer behind -f hocr gives the same document.
    stream = io.StringIO()
    with make_writer("hocr", stream) as writer:
        writer.write(spotted)
    assert stream.getvalue() == render_hocr([spotted])
    assert render([spotted], "hocr") == render_hocr([spotted])


# --- searchable PDF -------------------------------------------------------------------------------------


def _words(pdf_page) -> list[tuple[str, pymupdf.Rect]]:
    """The page's words with their boxes in displayed coordinates (PyMuPDF reports unrotated ones)."""
    return [(w[4], pymupdf.Rect(w[:4]) * pdf_page.rotation_matrix) for w in pdf_page.get_text("words")]


def _check_text_layer(pdf_page, spans) -> None:
    """The extracted words are the spotted ones, in order, each inside its span's box (a little slack for the
    font's ascent and descent); the text is invisible (render mode 3)."""
    words = _words(pdf_page)
    assert [w for w, _ in words] == [word for span in spans for word in span.text.split()]
    for span in spans:
        box = pymupdf.Rect(span.points)
        mine, words = words[: len(span.text.split())], words[len(span.text.split()) :]
        neighbourhood = pymupdf.Rect(box.x0 - 1, box.y0 - 1, box.x1 + 1, box.y1 + 1)
        for word, rect in mine:
            assert neighbourhood.contains(rect), (word, rect, box)
        line = pymupdf.Rect(mine[0][1]) | mine[-1][1]
        assert line.height >= 0.9 * box.height or line.width >= 0.9 * box.width  # fills its box one way
    assert b"3 Tr" in pdf_page.read_contents()


def test_searchable_pdf_from_an_image(tmp_path: Path) -> None:
    image = Image.new("RGB", (1240, 1754), "white")
    ImageDraw.Draw(image).rectangle((100, 100, 600, 300), fill="black")
    path = tmp_path / "scan.png"
    image.save(path, dpi=(150, 150))
    source, records = _spotted_records(path, [SPOTTED])
    pdf = pymupdf.open(stream=searchable_pdf(records, source))
    assert pdf.page_count == 1
    page = pdf[0]
    assert (page.rect.width, page.rect.height) == pytest.approx((595.2, 841.92), abs=0.1)  # the image at 150 dpi
    assert len(page.get_images()) == 1  # the scan itself, under the text
    _check_text_layer(page, record_spans(records[0])[1])
    assert "QUARTERLY REPORT 2024" in page.get_text() and page.search_for("Revenue")  # searchable


def test_searchable_pdf_keeps_a_pdfs_pages_on_the_right_page_even_rotated(tmp_path: Path) -> None:
    """A two-page scan PDF (the second page turned by /Rotate 90): the original pages kept, each text on its page,
    upright as displayed."""
    scan = pymupdf.open()
    picture = io.BytesIO()
    Image.new("RGB", (400, 300), (200, 220, 240)).save(picture, format="PNG")
    for rotation in (0, 90):
        page = scan.new_page(width=400, height=300)
        page.insert_image(page.rect, stream=picture.getvalue())
        page.set_rotation(rotation)
    path = tmp_path / "scan.pdf"
    scan.save(path)
    raws = [
        "<ref>first page</ref><box>(100,100),(600,200)</box>",
        "<ref>sideways page text</ref><box>(50,700),(900,760)</box>",
    ]
    source, records = _spotted_records(path, raws)
    pdf = pymupdf.open(stream=searchable_pdf(records, source))
    assert pdf.page_count == 2 and [p.rotation for p in pdf] == [0, 90]
    assert all(len(p.get_images()) == 1 for p in pdf)
    for pdf_page, record in zip(pdf, records, strict=True):
        _check_text_layer(pdf_page, record_spans(record)[1])
    assert pdf[1].rect.width == 300  # displayed size of the rotated page


def test_searchable_pdf_of_selected_pages_and_non_latin_text(tmp_path: Path) -> None:
    report = SAMPLES_DIR / "report.pdf"
    source = documents.expand_inputs([report])[0]
    page = documents.load_documents([report], size=(896, 896), pages=[2])[0]
    record = _record(page, "spot", "")
    raw = "<ref>Отчёт 2024</ref><box>(100,100),(400,140)</box><ref>報告</ref><box>(500,100),(700,140)</box>"
    ground_record(record, raw, page)
    pdf = pymupdf.open(stream=searchable_pdf([record], source))
    assert pdf.page_count == 1  # only the page the records cover
    words = [w for w, _ in _words(pdf[0])]
    assert "Отчёт" in words and "2024" in words and "報告" in words  # with the report's own text layer around them


# --- overlay -------------------------------------------------------------------------------------------


def test_overlay_draws_each_box_and_its_label(tmp_path: Path) -> None:
    page = _page(tmp_path, size=(1000, 800))
    grounded = Grounded.of(SPOTTED + "<ref>dot</ref><point>(500,500)</point>", page)
    white = Image.new("RGB", (1000, 800), "white")
    overlay = draw_overlay(white, grounded.spans)
    assert overlay.size == (1000, 800) and white.getpixel((120, 32)) == (255, 255, 255)
    for span in grounded.spans[:3]:
        x0, y0, x1, y1 = span.bbox
        assert overlay.getpixel((x0, (y0 + y1) // 2)) != (255, 255, 255)  # the outline
        inside = overlay.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))
        assert inside != (255, 255, 255) and min(inside) > 150  # a light tint, the page still readable
        label = overlay.crop((x0, max(y0 - 30, 0), x1, y0))
        assert label.getcolors(100000) and len(label.getcolors(100000)) > 2  # coloured label with white text
    assert overlay.getpixel((500, 400)) != (255, 255, 255)  # the point is a dot
    big = draw_overlay(Image.new("RGB", (4000, 3000), "white"), grounded.spans)
    assert max(big.size) == 2000

"""`monkey spot`, `read --positions`, `ask --ground` on the tiny TextMonkey: the wiring from the command line to
records with spans, hOCR, searchable PDFs and overlays; and the refusals.

The tiny checkpoint's random weights emit no box. One run is the real thing end to end (whatever the model says,
every output must be valid); the others replace only the decoded answer (`QWenTokenizer.decode_grounded`) by
text in TextMonkey's syntax, so that positions flow through the engine, the records and every writer.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pymupdf
import pytest
from conftest import SAMPLES_DIR, require_parity
from PIL import Image
from typer.testing import CliRunner

import monkey_cli.api
from monkey_cli.cli import _register_commands, app
from monkey_cli.model.tokenizer import QWenTokenizer

_register_commands()
RUNNER = CliRunner()
FAST = ["--max-new-tokens", "6", "--device", "cpu"]
SPOTTED = (
    "<ref>QUARTERLY REPORT 2024</ref><box>(120,40),(880,80)</box>"
    "<ref>Revenue grew 12%</ref><box>(100,200),(500,230)</box>"
    "<ref>Total: 1,234</ref><box>(600,900),(950,940)</box><ref>cut off</ref><box>(1,"
)
XHTML = "{http://www.w3.org/1999/xhtml}"


@pytest.fixture(scope="module")
def tiny() -> str:
    return str(require_parity("tiny-textmonkey"))


def _cli(*args: str):
    return RUNNER.invoke(app, list(args))


def _stderr_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_spot_end_to_end_on_the_tiny_checkpoint(tiny: str, tmp_path: Path) -> None:
    """Loads the checkpoint (family from its config), reads an image and a PDF page, writes a searchable PDF per
    document and the overlay folder: whatever the untrained model answered, every file is valid."""
    out, overlays = tmp_path / "out", tmp_path / "overlays"
    result = _cli(
        "spot", str(SAMPLES_DIR / "scan.png"), str(SAMPLES_DIR / "report.pdf"), "--pages", "1", "-m", tiny, *FAST,
        "-f", "pdf", "--out", str(out), "--overlay", str(overlays),
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # with --out, results go to the files only
    for name, pages in (("scan.png.pdf", 1), ("report.pdf.pdf", 1)):
        with pymupdf.open(out / name) as pdf:
            assert pdf.page_count == pages
            page = pdf[0]
            assert page.get_images() or page.get_text()  # the original page is there
    with pymupdf.open(out / "scan.png.pdf") as pdf:
        assert (pdf[0].rect.width, pdf[0].rect.height) == pytest.approx((612, 792), abs=0.5)  # 850x1100 at 100 dpi
    assert overlays.is_dir()  # (no box from random weights: nothing to draw)
    manifest = json.loads((out / ".monkey-manifest.json").read_text())
    assert set(manifest["entries"]) == {"scan.png.pdf", "report.pdf.pdf"}


@pytest.fixture(scope="module")
def shared_textmonkey(tiny: str):
    """One loaded tiny TextMonkey for the in-process runs below (loading is what the test above covers)."""
    return monkey_cli.api.Monkey.load(tiny, device="cpu", quant="none")


@pytest.fixture()
def spotting(monkeypatch, shared_textmonkey, tiny: str):
    """The CLI on the shared model, every answer decoded as SPOTTED (TextMonkey's syntax, one span cut off)."""
    real_load = monkey_cli.api.Monkey.load.__func__

    def load(cls, source, *args, **kwargs):
        return shared_textmonkey if str(source) == tiny else real_load(cls, source, *args, **kwargs)

    monkeypatch.setattr(monkey_cli.api.Monkey, "load", classmethod(load))
    monkeypatch.setattr(QWenTokenizer, "decode_grounded", lambda self, ids: SPOTTED)


def test_spot_records_carry_spans_in_pixels_and_points(spotting, tiny: str) -> None:
    result = _cli("spot", str(SAMPLES_DIR / "scan.png"), "-m", tiny, *FAST, "-f", "jsonl")
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["task"] == "spot" and record["prompt"] == "OCR with grounding:"
    assert record["answer"].splitlines() == ["QUARTERLY REPORT 2024", "Revenue grew 12%", "Total: 1,234", "cut off",
                                             "(1,"]
    assert record["page_size"] == {"pixels": [850, 1100], "points": [612.0, 792.0]}
    first = record["spans"][0]
    assert first == {
        "text": "QUARTERLY REPORT 2024", "bbox": [102, 44, 748, 88], "points": [73.44, 31.68, 538.56, 63.36],
        "frame": [120, 40, 880, 80], "kind": "box", "page": 1,
    }
    assert len(record["spans"]) == 3
    assert any("unclosed '<box>'" in warning for warning in record["warnings"])
    assert any("unclosed '<box>'" in line for line in _stderr_lines(result))  # the user hears of it too
    # read --positions is the same run.
    again = _cli("read", "--positions", str(SAMPLES_DIR / "scan.png"), "-m", tiny, *FAST, "-f", "jsonl")
    assert again.exit_code == 0 and json.loads(again.stdout)["spans"] == record["spans"]


def test_hocr_pdf_and_overlay_from_the_cli(spotting, tiny: str, tmp_path: Path) -> None:
    report = SAMPLES_DIR / "report.pdf"
    hocr = _cli("spot", str(report), "--pages", "1,3", "-m", tiny, *FAST, "-f", "hocr")
    assert hocr.exit_code == 0, hocr.output
    root = ElementTree.fromstring(hocr.stdout.encode("utf-8"))
    pages = [div for div in root.iter(f"{XHTML}div") if div.get("class") == "ocr_page"]
    assert [p.get("title").split("ppageno ")[1] for p in pages] == ["0", "2"]
    for page in pages:
        width, height = (int(v) for v in page.get("title").split("bbox 0 0 ")[1].split(";")[0].split())
        for span in page.iter(f"{XHTML}span"):
            x0, y0, x1, y1 = (int(v) for v in span.get("title").removeprefix("bbox ").split())
            assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height

    out, overlays, inputs = tmp_path / "out", tmp_path / "overlays", tmp_path / "in"
    inputs.mkdir()
    for name in ("report.pdf", "scan.png"):
        (inputs / name).write_bytes((SAMPLES_DIR / name).read_bytes())
    notes = inputs / "notes.txt"
    notes.write_text("not a document")
    result = _cli("spot", str(inputs), "--pages", "1,-1", "-m", tiny, *FAST, "-f", "pdf", "--out", str(out),
                  "--overlay", str(overlays))
    assert result.exit_code == 1, result.output  # the text file failed; the others are written
    (error,) = [line for line in _stderr_lines(result) if line.startswith("error:")]
    assert error.startswith(f"error: {notes}: unsupported type: text")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["report.pdf.pdf", "scan.png.pdf"]
    with pymupdf.open(out / "report.pdf.pdf") as pdf:
        assert pdf.page_count == 2
        for page in pdf:
            hits = page.search_for("QUARTERLY REPORT 2024")
            assert hits, "the spotted text is searchable"
            top = 0.04 * page.rect.height
            assert any(abs(hit.y0 - top) < 0.02 * page.rect.height for hit in hits)  # where the model put it
    pngs = sorted(p.relative_to(overlays).as_posix() for p in overlays.rglob("*.png") if p.is_file())
    expected = ["report.pdf.pages/page-001-spots.png", "report.pdf.pages/page-003-spots.png"]
    assert pngs == [*expected, "scan.png.pages/page-001-spots.png"]
    with Image.open(overlays / "scan.png.pages" / "page-001-spots.png") as image:
        assert image.size == (850, 1100)
        image.load()
    # Overlays are outputs: a later run over the folder holding them does not read them as inputs.
    shutil.rmtree(inputs)
    shutil.rmtree(out)
    (tmp_path / "scan.png").write_bytes((SAMPLES_DIR / "scan.png").read_bytes())
    again = _cli("spot", str(tmp_path), "-m", tiny, *FAST, "-f", "jsonl", "--overlay", str(overlays))
    assert again.exit_code == 0, again.output
    sources = [json.loads(line)["source"] for line in again.stdout.splitlines()]
    assert sources == [str(tmp_path / "scan.png")]


def test_ask_ground_answers_with_where(monkeypatch, spotting, tiny: str) -> None:
    answer = "The total is 1,234<box>(600,900),(950,940)</box>."
    monkeypatch.setattr(QWenTokenizer, "decode_grounded", lambda self, ids: answer)
    result = _cli("ask", "--ground", str(SAMPLES_DIR / "scan.png"), "-q", "What is the total?", "-m", tiny, *FAST,
                  "-f", "json")
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)["records"]
    assert record["answer"] == "The total is 1,234." and record["prompt"] == "What is the total?"
    assert [span["text"] for span in record["spans"]] == ["The total is 1,234"]
    assert record["spans"][0]["bbox"] == [510, 990, 808, 1034]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["spot", "{img}", "-m", "{monkey}"], "Monkey checkpoints give no text positions"),
        (["ask", "--ground", "{img}", "-q", "Q?", "-m", "{monkey}"], "Monkey checkpoints give no text positions"),
        (["caption", "{img}", "-m", "{tiny}"], "TextMonkey has no caption prompt"),
        (["spot", "{img}", "-m", "{tiny}", "-f", "pdf"], "--format pdf writes one searchable PDF per document"),
        (["read", "{img}", "-m", "{tiny}", "-f", "hocr"], "--format hocr shows text positions"),
        (["ask", "{img}", "-q", "Q?", "-m", "{tiny}", "--overlay", "{out}"], "--overlay shows text positions"),
        (["spot", "{img}", "-m", "{monkey}", "--family", "textmonkey"], "'visual.layers' must be over 46"),
        (["spot", "{img}", "-m", "{tiny}", "--family", "qwen"], "--family must be one of auto, monkey, textmonkey"),
    ],
)
def test_what_cannot_work_is_refused_in_one_line_before_any_work(
    args: list[str], message: str, tiny: str, tmp_path: Path, monkeypatch
) -> None:
    def no_loading(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(monkey_cli.api.Monkey, "load", no_loading)
    values = {"img": str(SAMPLES_DIR / "scan.png"), "tiny": tiny, "monkey": str(require_parity("tiny-monkey")),
              "out": str(tmp_path / "o")}
    result = _cli(*(arg.format(**values) for arg in args))
    assert result.exit_code == 2, result.output
    lines = _stderr_lines(result)
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("error: "), lines


def test_help_shows_the_new_options() -> None:
    result = _cli("spot", "--help")
    assert result.exit_code == 0
    for text in ("--family", "--overlay", "hocr", "pdf", "auto|monkey|textmonkey"):
        assert text in result.stdout
    assert "--ground" in _cli("ask", "--help").stdout and "--positions" in _cli("read", "--help").stdout
    assert "spot" in _cli("--help").stdout

"""The Python API takes what the CLI takes (PDFs, multi-page TIFFs, Page objects), with one answer per page
of a multi-page document; and the README's Python example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, SAMPLES_DIR
from PIL import Image

from monkey_cli import Monkey, load_documents
from monkey_cli.errors import DocumentError

REPORT = str(SAMPLES_DIR / "report.pdf")  # three pages
FORMS = str(SAMPLES_DIR / "forms.tif")  # a multi-page TIFF


@pytest.fixture(scope="module")
def monkey(tiny_sharp_dir: Path) -> Monkey:
    return Monkey.load(tiny_sharp_dir, device="cpu", batch_size=2)


def test_documents_give_one_answer_per_page(monkey: Monkey) -> None:
    pages = load_documents(REPORT, size=monkey.processor.input_size)
    expected = [monkey.generate([p.image], ["<img></img> Who wrote it? Answer: "], max_new_tokens=6)[0] for p in pages]
    assert len(set(expected)) > 1, "the pages should answer differently, or the test proves little"
    assert monkey.ask(REPORT, "Who wrote it?", max_new_tokens=6) == expected
    assert monkey.ask(REPORT, "Who wrote it?", max_new_tokens=6, page=2) == expected[1]
    assert monkey.ask(REPORT, "Who wrote it?", max_new_tokens=6, page=-1) == expected[2]
    assert monkey.ask(pages[0], "Who wrote it?", max_new_tokens=6) == expected[0]  # a Page object
    assert monkey.ask(pages[0].image, "Who wrote it?", max_new_tokens=6) == expected[0]  # a PIL image


def test_multi_page_tiff_and_single_page_files(monkey: Monkey) -> None:
    frames = Image.open(FORMS).n_frames
    assert frames > 1
    captions = monkey.caption(FORMS, max_new_tokens=4)
    assert isinstance(captions, list) and len(captions) == frames
    assert isinstance(monkey.read(SAMPLES_DIR / "invoice.pdf", max_new_tokens=4), str)  # a one-page PDF
    assert isinstance(monkey.caption(str(SAMPLES_DIR / "chart.png"), max_new_tokens=4), str)


def test_bad_documents_and_pages_raise_clearly(monkey: Monkey, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a document")
    with pytest.raises(DocumentError, match="unsupported type"):
        monkey.ask(tmp_path / "notes.txt", "What?")
    with pytest.raises(DocumentError, match="not in this document"):
        monkey.ask(REPORT, "What?", page=9)
    with pytest.raises(ValueError, match="only page 1"):
        monkey.ask(Image.new("RGB", (8, 8)), "What?", page=2)
    with pytest.raises(TypeError, match="expected a PIL image, a Page or a path"):
        monkey.ask(b"%PDF-", "What?")


def test_the_readme_python_example_runs_as_written(eager_eos_dir: Path) -> None:
    """The README's example, with the checkpoint swapped for a tiny one (whose answers are one token long)."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    (example,) = re.findall(r"From Python:\s*```python\n(.*?)```", readme, re.DOTALL)
    (engine_example,) = re.findall(r"drive the scheduler yourself:\s*```python\n(.*?)```", readme, re.DOTALL)
    example += engine_example  # it goes on with the same `m`
    assert 'Monkey.load("echo840/Monkey-Chat")' in example
    code = example.replace('"echo840/Monkey-Chat"', repr(str(eager_eos_dir)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stderr


def test_the_readme_engine_example_decodes_any_answer(tiny_sharp_dir: Path) -> None:
    """The scheduler example on the sharp checkpoint, whose answers are long and include ids past its
    vocabulary file (special ids): the README decodes with skip_special_tokens, as `generate` does."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    (engine_example,) = re.findall(r"drive the scheduler yourself:\s*```python\n(.*?)```", readme, re.DOTALL)
    code = f"from monkey_cli import Monkey, tasks\nm = Monkey.load({str(tiny_sharp_dir)!r})\n" + engine_example
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "the example prints the answer"

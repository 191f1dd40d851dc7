"""`monkey render` and monkey_cli.render: what the model sees, written safely under --out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, SAMPLES_DIR
from PIL import Image
from typer.testing import CliRunner

import monkey_cli.cli.render  # noqa: F401  (registers the command on `app`)
from monkey_cli.cli import app
from monkey_cli.documents import PageError, Source
from monkey_cli.errors import UsageError
from monkey_cli.render import (
    RenderedPage,
    check_window_size,
    crop_windows,
    draw_window_grid,
    global_view,
    output_dirs,
    render_documents,
    window_boxes,
)

SAMPLE_PAGES = {"chart.png": 1, "forms.tif": 3, "invoice.pdf": 1, "receipt.jpg": 1, "report.pdf": 3, "scan.png": 1}
SAMPLE_FILES = [str(SAMPLES_DIR / name) for name in SAMPLE_PAGES]


def expected_files(windows: int) -> dict[int, list[str]]:
    """File names for page n of a document, given the number of windows per page."""

    def names(page: int) -> list[str]:
        stem = f"page-{page:03d}"
        return sorted([f"{stem}-grid.png", f"{stem}-global.png"] + [f"{stem}-window-{k}.png" for k in range(windows)])

    return {page: names(page) for page in range(1, 4)}


def listing(folder: Path) -> dict[str, list[str]]:
    return {
        directory.relative_to(folder).as_posix(): sorted(path.name for path in directory.iterdir())
        for directory in sorted(folder.rglob("*"))
        if directory.is_dir()
    }


def invoke(*args: str, input: bytes | None = None):
    return CliRunner().invoke(app, ["render", *args], input=input)


# ------------------------------------------------------------------------------------------------- views


def test_window_boxes_are_row_major():
    assert window_boxes((896, 896)) == [(0, 0, 448, 448), (448, 0, 896, 448), (0, 448, 448, 896), (448, 448, 896, 896)]
    boxes = window_boxes((896, 1344))
    assert len(boxes) == 6
    assert boxes[2] == (896, 0, 1344, 448) and boxes[3] == (0, 448, 448, 896)


def test_check_window_size():
    assert check_window_size("896x1344") == (896, 1344)
    for bad in ["900x900", "448x100", "nope"]:
        with pytest.raises(UsageError):
            check_window_size(bad)


def test_windows_are_the_exact_pixels_of_each_region():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (896, 1344, 3), dtype=np.uint8))
    windows = crop_windows(image)
    pixels = np.asarray(image)
    assert len(windows) == 6
    for index, window in enumerate(windows):
        row, column = divmod(index, 3)
        expected = pixels[row * 448 : (row + 1) * 448, column * 448 : (column + 1) * 448]
        assert np.array_equal(np.asarray(window), expected)


@pytest.mark.parametrize("size", [(896, 896), (896, 1344)])
def test_global_view_matches_the_models_interpolation(size):
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    ours = np.asarray(global_view(Image.fromarray(pixels))).astype(int)
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None].double()
    # The model: F.interpolate(images, size=(448, 448), mode="bicubic") on the input-size page.
    reference = F.interpolate(tensor, size=(448, 448), mode="bicubic").clamp(0, 255).round()
    assert np.abs(ours - reference[0].permute(1, 2, 0).numpy().astype(int)).max() == 0


def test_grid_is_drawn_on_a_copy():
    page = Image.new("RGB", (896, 896), (255, 255, 255))
    grid = draw_window_grid(page)
    assert page.getpixel((448, 700)) == (255, 255, 255)
    assert grid.size == page.size
    assert grid.getpixel((448, 700)) != (255, 255, 255)  # the border between windows 2 and 3
    assert grid.getpixel((300, 300)) == (255, 255, 255)  # inside window 0, away from border and label


# ------------------------------------------------------------------------------------------------ layout


def test_output_dirs_mirror_the_tree_and_stay_inside(tmp_path):
    out = tmp_path / "out"
    sources = [
        Source("in/a/x.pdf", Path("/data/in/a/x.pdf")),
        Source("in/b/.x.pdf", Path("/data/in/b/.x.pdf")),
        Source("in/b/we\x1bird:name?.png", Path("/data/in/b/we\x1bird:name?.png")),
        Source("<stdin>", data=b"%PDF-"),
        Source("missing.pdf", Path("missing.pdf"), error="no such file or directory"),
    ]
    planned = output_dirs(sources, out)
    assert planned == {
        "in/a/x.pdf": out / "a" / "x.pdf.pages",
        "in/b/.x.pdf": out / "b" / "_x.pdf.pages",
        "in/b/we\x1bird:name?.png": out / "b" / "we_ird_name_.png.pages",
        "<stdin>": out / "_stdin_.pages",
    }
    clash = output_dirs([Source("a:b", Path("/d/a:b")), Source("a?b", Path("/d/a?b"))], out)
    first, second = clash.values()  # both renamed, each by its own source: the same names on every run
    assert first != second and first.parent == second.parent == out
    assert first.name.startswith("a_b.") and second.name.startswith("a_b.")
    assert output_dirs([Source("a?b", Path("/d/a?b")), Source("a:b", Path("/d/a:b"))], out) == clash


def test_single_file_goes_straight_under_out(tmp_path):
    assert output_dirs([Source("x.png", Path("/some/where/x.png"))], tmp_path) == {"x.png": tmp_path / "x.png.pages"}


# ------------------------------------------------------------------------------------------- the command


def test_render_samples_writes_every_view(tmp_path):
    out = tmp_path / "out"
    result = invoke(*SAMPLE_FILES, "--out", str(out))
    assert result.exit_code == 0, result.output
    per_page = expected_files(windows=4)
    assert listing(out) == {
        f"{name}.pages": sum((per_page[p] for p in range(1, n + 1)), []) for name, n in SAMPLE_PAGES.items()
    }
    for name, count in SAMPLE_PAGES.items():
        for page in range(1, count + 1):
            stem = out / f"{name}.pages" / f"page-{page:03d}"
            assert Image.open(f"{stem}-grid.png").size == (896, 896)
            assert Image.open(f"{stem}-global.png").size == (448, 448)
            for k in range(4):
                assert Image.open(f"{stem}-window-{k}.png").size == (448, 448)
    printed = result.stdout.splitlines()
    assert printed[0] == str(out / "chart.png.pages" / "page-001-grid.png")
    assert len(printed) == sum(SAMPLE_PAGES.values())
    assert "rendered 10 pages" in result.stderr
    assert not list(out.rglob("*.tmp"))


def test_render_windows_are_the_pages_model_pixels(tmp_path):
    out = tmp_path / "out"
    assert invoke(str(SAMPLES_DIR / "invoice.pdf"), "--out", str(out)).exit_code == 0
    from monkey_cli.documents import iter_pages

    (page,) = iter_pages([SAMPLES_DIR / "invoice.pdf"])
    window = np.asarray(Image.open(out / "invoice.pdf.pages" / "page-001-window-1.png"))
    assert np.array_equal(window, np.asarray(page.image)[0:448, 448:896])


def test_render_wide_size_and_page_selection(tmp_path):
    out = tmp_path / "out"
    result = invoke(str(SAMPLES_DIR / "report.pdf"), "--out", str(out), "--size", "896x1344", "--pages", "-1")
    assert result.exit_code == 0, result.output
    assert listing(out) == {"report.pdf.pages": expected_files(windows=6)[3]}
    assert Image.open(out / "report.pdf.pages" / "page-003-grid.png").size == (1344, 896)


def test_render_mirrors_folders(tmp_path):
    tree = tmp_path / "in"
    for relative in ["a/one.png", "b/c/two.png"]:
        (tree / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), "white").save(tree / relative)
    out = tmp_path / "out"
    assert invoke(str(tree), "--out", str(out)).exit_code == 0
    assert sorted(listing(out)) == ["a", "a/one.png.pages", "b", "b/c", "b/c/two.png.pages"]


def test_render_reports_bad_items_and_exits_1(tmp_path):
    good = tmp_path / "chart.png"
    good.write_bytes((SAMPLES_DIR / "chart.png").read_bytes())
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    out = tmp_path / "out"
    result = invoke(str(good), str(bad), str(tmp_path / "missing.pdf"), "--out", str(out))
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {bad}: unsupported type: text (supported: PDF, PNG, JPEG, TIFF, WEBP, BMP, GIF, JPEG 2000, AVIF, PNM)",
        f"error: {tmp_path / 'missing.pdf'}: no such file or directory",
    ]
    assert sorted(listing(out)) == ["chart.png.pages"]
    assert "Traceback" not in result.output


def test_render_stdin_document(tmp_path):
    out = tmp_path / "out"
    result = invoke("-", "--out", str(out), input=(SAMPLES_DIR / "scan.png").read_bytes())
    assert result.exit_code == 0, result.output
    assert listing(out) == {"_stdin_.pages": expected_files(windows=4)[1]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pages", "1-x"], "--pages"),
        (["--size", "900x900"], "multiples of 448"),
        (["--pages", "0"], "numbered from 1"),
    ],
)
def test_render_usage_errors_exit_2(tmp_path, args, message):
    result = invoke(str(SAMPLES_DIR / "chart.png"), "--out", str(tmp_path / "out"), *args)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_render_out_must_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    result = invoke(str(SAMPLES_DIR / "chart.png"), "--out", str(tmp_path / "file"))
    assert result.exit_code == 2 and "not a folder" in result.stderr


def test_render_never_follows_a_link_out_of_out(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "chart.png.pages").symlink_to(outside, target_is_directory=True)
    records = list(render_documents([str(SAMPLES_DIR / "chart.png")], out))
    (error,) = records
    assert isinstance(error, PageError) and "is a symbolic link; monkey never writes through one" in error.message
    assert list(outside.iterdir()) == []


def test_render_documents_library_call(tmp_path):
    records = list(render_documents([str(SAMPLES_DIR / "forms.tif")], tmp_path, pages="2"))
    (rendered,) = records
    assert isinstance(rendered, RenderedPage)
    assert rendered.page == 2 and rendered.pages == 3
    assert [path.name for path in rendered.files] == [
        "page-002-grid.png",
        "page-002-window-0.png",
        "page-002-window-1.png",
        "page-002-window-2.png",
        "page-002-window-3.png",
        "page-002-global.png",
    ]
    assert all(path.parent == tmp_path / "forms.tif.pages" for path in rendered.files)


def test_python_m_monkey_cli_render(tmp_path):
    """Through the real entry point: needs "render" in monkey_cli.cli._COMMAND_MODULES."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "monkey_cli", "render", str(SAMPLES_DIR / "receipt.jpg"), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out / "receipt.jpg.pages" / "page-001-grid.png")
    assert listing(out) == {"receipt.jpg.pages": expected_files(windows=4)[1]}

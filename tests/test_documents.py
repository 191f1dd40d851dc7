"""Documents in: discovery, type sniffing, every supported type, every bad input, page selection, pipeline."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import random
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pymupdf
import pytest
from conftest import SAMPLES_DIR
from PIL import Image

from monkey_cli.documents import (
    STDIN_NAME,
    Page,
    PageError,
    Source,
    expand_inputs,
    iter_pages,
    load_documents,
    parse_pages,
    parse_size,
    prefetch,
    sniff_type,
)
from monkey_cli.errors import DocumentError, UsageError

SAMPLE_PAGES = {
    "chart.png": 1,
    "forms.tif": 3,
    "invoice.pdf": 1,
    "receipt.jpg": 1,
    "report.pdf": 3,
    "scan.png": 1,
}
SAMPLE_FILES = [str(SAMPLES_DIR / name) for name in SAMPLE_PAGES]


# ----------------------------------------------------------------------------------------------- helpers


def make_pdf(
    path: Path,
    pages: int = 1,
    size: tuple[float, float] = (595, 842),
    text: str | None = "Hello",
    password: str | None = None,
) -> Path:
    doc = pymupdf.open()
    for number in range(1, pages + 1):
        page = doc.new_page(width=size[0], height=size[1])
        if text:
            page.insert_text((2, min(size[1] - 1, 40)), f"{text} {number}", fontsize=min(12, size[1] / 2))
    options = {}
    if password:
        options = {"encryption": pymupdf.PDF_ENCRYPT_AES_256, "user_pw": password, "owner_pw": password + "!"}
    doc.save(path, **options)
    doc.close()
    return path


def save_image(path: Path, image: Image.Image, format: str, **options) -> Path:
    image.save(path, format=format, **options)
    return path


def png(path: Path, size=(40, 30), colour=(10, 200, 30)) -> Path:
    return save_image(path, Image.new("RGB", size, colour), "PNG")


def run(inputs, **options) -> list[Page | PageError]:
    return list(iter_pages(inputs, **options))


def only_pages(records) -> list[Page]:
    return [record for record in records if isinstance(record, Page)]


def only_errors(records) -> list[PageError]:
    return [record for record in records if isinstance(record, PageError)]


def single_error(records) -> PageError:
    assert len(records) == 1, records
    assert isinstance(records[0], PageError), records
    return records[0]


def native(path: Path, **options) -> Image.Image:
    """The page's pixels at their own size (no resize), for pixel checks."""
    (page,) = run([path], size=None, **options)
    assert isinstance(page, Page), page
    return page.image


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size but holds almost no data: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


# -------------------------------------------------------------------------------------------- samples


def test_samples_are_small_and_every_sample_type_gives_its_pages():
    assert sum((SAMPLES_DIR / name).stat().st_size for name in SAMPLE_PAGES) < 1_000_000
    records = run(SAMPLE_FILES)
    pages = only_pages(records)
    assert len(pages) == len(records) == sum(SAMPLE_PAGES.values())
    counts = {Path(page.source).name: page.pages for page in pages}
    assert counts == SAMPLE_PAGES
    kinds = {Path(page.source).name: page.kind for page in pages}
    assert kinds == {
        "chart.png": "png",
        "forms.tif": "tiff",
        "invoice.pdf": "pdf",
        "receipt.jpg": "jpeg",
        "report.pdf": "pdf",
        "scan.png": "png",
    }
    for page in pages:
        assert page.image.mode == "RGB"
        assert page.image.size == (896, 896)
        assert page.warnings == ()


def test_make_samples_is_deterministic(tmp_path):
    # Run as a script (not imported) so that no __pycache__ folder appears among the samples.
    for run_dir in ("one", "two"):
        script = SAMPLES_DIR.parent / "scripts" / "make_samples.py"
        subprocess.run([sys.executable, str(script), str(tmp_path / run_dir)], check=True)
    first, second = sorted((tmp_path / "one").iterdir()), sorted((tmp_path / "two").iterdir())
    assert [path.name for path in first] == sorted(SAMPLE_PAGES)
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_tiff_gives_every_frame_with_its_own_size():
    pages = only_pages(run([SAMPLES_DIR / "forms.tif"], size=None))
    assert [page.page for page in pages] == [1, 2, 3]
    assert [page.original_size for page in pages] == [(600, 780), (600, 780), (780, 600)]
    # Frame 3 is the colour form with a red header band; frame 2 is 1-bit black and white.
    assert pages[2].image.getpixel((10, 10)) == (200, 30, 30)
    assert set(pages[1].image.convert("L").tobytes()) <= {0, 255}


# -------------------------------------------------------------------------------------- sizes and PDFs


@pytest.mark.parametrize("size", [(896, 896), (896, 1344), (999, 333), (1, 1)])
@pytest.mark.parametrize("name", ["invoice.pdf", "scan.png", "receipt.jpg", "forms.tif"])
def test_exact_output_size(name, size):
    for page in only_pages(run([SAMPLES_DIR / name], size=size)):
        assert page.image.size == (size[1], size[0])
        assert page.image.mode == "RGB"


def test_size_as_text_and_validation():
    assert parse_size("896x1344") == (896, 1344)
    assert parse_size("448") == (448, 448)
    assert parse_size(None) is None
    for bad in ["", "x", "896x", "0x896", "-1x2", "a by b"]:
        with pytest.raises(UsageError):
            parse_size(bad)
    (page,) = run([SAMPLES_DIR / "invoice.pdf"], size="448x896")
    assert page.image.size == (896, 448)
    with pytest.raises(UsageError, match="at least 1 pixel"):
        iter_pages([SAMPLES_DIR / "invoice.pdf"], size=(0, 10))


def test_pdf_page_record_and_text_layer():
    (page,) = run([SAMPLES_DIR / "invoice.pdf"])
    assert page.kind == "pdf" and page.page == 1 and page.pages == 1
    assert page.points == (595.0, 842.0)
    assert page.original_size == (1190, 1684)  # the page at 144 dpi
    assert page.dpi == pytest.approx((72 * 896 / 595, 72 * 896 / 842), abs=1e-3)
    assert "INV-2024-0417" in page.text and "Northwind Labs" in page.text
    assert page.has_text_layer
    assert page.sha256 == hashlib.sha256((SAMPLES_DIR / "invoice.pdf").read_bytes()).hexdigest()


def test_pdf_native_size_and_landscape_page():
    pages = only_pages(run([SAMPLES_DIR / "report.pdf"], size=None))
    assert [page.image.size for page in pages] == [(1190, 1684), (1190, 1684), (1684, 1190)]
    assert pages[2].points == (842.0, 595.0)
    assert pages[2].dpi == (144.0, 144.0)
    assert [page.has_text_layer for page in pages] == [True, True, True]
    assert "Page 3 of 3" in pages[2].text


def test_pdf_without_text_has_no_text_layer_and_images_have_none(tmp_path):
    (blank,) = run([make_pdf(tmp_path / "blank.pdf", text=None)])
    assert blank.text is not None and not blank.has_text_layer
    (image_page,) = run([SAMPLES_DIR / "scan.png"])
    assert image_page.text is None and not image_page.has_text_layer


def test_pdf_rotation_is_rendered_as_displayed(tmp_path):
    path = tmp_path / "rotated.pdf"
    doc = pymupdf.open()
    doc.new_page(width=200, height=100).set_rotation(90)
    doc.save(path)
    (page,) = run([path], size=None, pdf_dpi=72)
    assert page.points == (100.0, 200.0)
    assert page.image.size == (100, 200)


def test_pdf_renders_page_content_not_blank(tmp_path):
    path = tmp_path / "box.pdf"
    doc = pymupdf.open()
    page = doc.new_page(width=100, height=100)
    page.draw_rect(pymupdf.Rect(0, 0, 50, 100), color=None, fill=(1, 0, 0))  # left half red
    doc.save(path)
    image = run([path], size=(896, 1344))[0].image
    assert image.getpixel((100, 448)) == (255, 0, 0)
    assert image.getpixel((1200, 448)) == (255, 255, 255)


# ----------------------------------------------------------------------------------------- image types


def test_type_is_sniffed_from_content_not_extension(tmp_path):
    pdf_as_png = tmp_path / "really_a_pdf.png"
    pdf_as_png.write_bytes((SAMPLES_DIR / "invoice.pdf").read_bytes())
    no_extension = tmp_path / "noextension"
    no_extension.write_bytes((SAMPLES_DIR / "receipt.jpg").read_bytes())
    png_as_pdf = png(tmp_path / "image.pdf")
    pages = only_pages(run([pdf_as_png, no_extension, png_as_pdf]))
    assert [page.kind for page in pages] == ["pdf", "jpeg", "png"]
    assert "INV-2024-0417" in pages[0].text


def test_sniff_type_signatures():
    assert sniff_type(b"%PDF-1.7\n") == "pdf"
    assert sniff_type(b"junk before the header %PDF-1.4") == "pdf"
    assert sniff_type(b"\x89PNG\r\n\x1a\n....") == "png"
    assert sniff_type(b"GIF89a....") == "gif"
    assert sniff_type(b"II*\x00....") == "tiff"
    assert sniff_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert sniff_type(b"P6\n12 7\n255\n") == "pnm"
    # A list of paths that happens to start like a bitmap or a PNM header is not one.
    assert sniff_type(b"BMW/report.pdf\nP6 files/a.png\n") is None
    assert sniff_type(b"P6 files/a.png\n") is None


@pytest.mark.parametrize(
    ("format", "kind", "options"),
    [
        ("WEBP", "webp", {"lossless": True}),
        ("BMP", "bmp", {}),
        ("PPM", "pnm", {}),
        ("JPEG2000", "jpeg2000", {"irreversible": False}),
        ("TIFF", "tiff", {}),
        ("PNG", "png", {}),
    ],
)
def test_lossless_image_types_keep_their_pixels(tmp_path, format, kind, options):
    original = Image.new("RGB", (31, 17), (255, 255, 255))
    original.paste((200, 20, 40), (0, 0, 10, 17))
    path = save_image(tmp_path / "picture", original, format, **options)
    (page,) = run([path], size=None)
    assert page.kind == kind
    assert page.image.size == (31, 17)
    assert page.image.getpixel((2, 5)) == (200, 20, 40)
    assert page.image.getpixel((25, 5)) == (255, 255, 255)


def test_gif_and_animated_webp_give_their_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 20), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    webp = tmp_path / "anim.webp"
    frames[0].save(webp, save_all=True, append_images=frames[1:], duration=100, lossless=True)
    for path in (gif, webp):
        (page,) = run([path], size=None)
        assert page.pages == 1
        assert page.image.getpixel((10, 10)) == (255, 0, 0)


@pytest.mark.parametrize(
    ("orientation", "stored_transpose"),
    [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)],
)
def test_exif_orientation_is_applied(tmp_path, orientation, stored_transpose):
    upright = Image.new("RGB", (60, 30), (255, 255, 255))
    upright.paste((255, 0, 0), (0, 0, 15, 10))  # red mark in the top-left corner when upright
    stored = upright.transpose(stored_transpose)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save_image(tmp_path / "photo.jpg", stored, "JPEG", exif=exif.tobytes(), quality=95)
    image = native(path)
    assert image.size == (60, 30)
    red, green, blue = image.getpixel((5, 4))
    assert red > 200 and green < 60 and blue < 60
    assert min(image.getpixel((50, 25))) > 200


def test_receipt_sample_is_turned_upright():
    (page,) = run([SAMPLES_DIR / "receipt.jpg"], size=None)
    assert Image.open(SAMPLES_DIR / "receipt.jpg").size == (760, 360)  # stored sideways
    assert page.original_size == (360, 760)
    assert max(page.image.getpixel((180, 20))) < 60  # the dark header band is at the top
    assert min(page.image.getpixel((180, 740))) > 200


def test_alpha_is_flattened_onto_white(tmp_path):
    rgba = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 255))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    rgba.putpixel((3, 0), (255, 0, 0, 255))
    image = native(save_image(tmp_path / "rgba.png", rgba, "PNG"))
    assert image.getpixel((0, 0)) == (255, 255, 255)  # the original pipeline would give black here
    assert image.getpixel((1, 0)) == (0, 0, 0)
    assert all(abs(value - 127) <= 1 for value in image.getpixel((2, 0)))
    assert image.getpixel((3, 0)) == (255, 0, 0)

    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (50, 255))
    image = native(save_image(tmp_path / "la.png", la, "PNG"))
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((1, 0)) == (50, 50, 50)

    (chart,) = run([SAMPLES_DIR / "chart.png"], size=None)
    assert Image.open(SAMPLES_DIR / "chart.png").mode == "RGBA"
    assert chart.image.getpixel((2, 2)) == (255, 255, 255)


def test_palette_images_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 128, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    opaque = native(save_image(tmp_path / "opaque.png", palette, "PNG"))
    assert opaque.getpixel((0, 0)) == (0, 0, 0) and opaque.getpixel((1, 0)) == (0, 128, 255)
    transparent = native(save_image(tmp_path / "transparent.gif", palette, "GIF", transparency=0))
    assert transparent.getpixel((0, 0)) == (255, 255, 255) and transparent.getpixel((1, 0)) == (0, 128, 255)


def test_cmyk_is_converted(tmp_path):
    cmyk = Image.new("CMYK", (3, 1))
    for x, value in enumerate([(0, 0, 0, 0), (0, 255, 255, 0), (0, 0, 0, 255)]):
        cmyk.putpixel((x, 0), value)
    image = native(save_image(tmp_path / "cmyk.tif", cmyk, "TIFF"))
    assert [image.getpixel((x, 0)) for x in range(3)] == [(255, 255, 255), (255, 0, 0), (0, 0, 0)]

    block = Image.new("CMYK", (32, 16), (0, 0, 0, 0))
    block.paste((0, 255, 255, 0), (16, 0, 32, 16))
    jpeg = native(save_image(tmp_path / "cmyk.jpg", block, "JPEG", quality=95))
    assert all(value > 240 for value in jpeg.getpixel((4, 8)))
    red, green, blue = jpeg.getpixel((28, 8))
    assert red > 230 and green < 30 and blue < 30


@pytest.mark.parametrize("format", ["PNG", "TIFF"])
def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path, format):
    deep = Image.new("I;16", (3, 1))
    for x, value in enumerate([0, 257 * 100, 65535]):
        deep.putpixel((x, 0), value)
    image = native(save_image(tmp_path / "deep", deep, format))
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]


def test_1_bit_images_become_black_and_white(tmp_path):
    bits = Image.new("1", (2, 1), 0)
    bits.putpixel((1, 0), 1)
    image = native(save_image(tmp_path / "bits.png", bits, "PNG"))
    assert image.getpixel((0, 0)) == (0, 0, 0) and image.getpixel((1, 0)) == (255, 255, 255)
    fax = native(save_image(tmp_path / "fax.tif", bits, "TIFF", compression="group4"))
    assert fax.getpixel((0, 0)) == (0, 0, 0) and fax.getpixel((1, 0)) == (255, 255, 255)


def test_image_record_keeps_original_size_and_dpi():
    (page,) = run([SAMPLES_DIR / "scan.png"])
    assert page.original_size == (850, 1100)
    assert page.dpi == (100.0, 100.0)
    assert page.points is None
    assert page.image.size == (896, 896)


@pytest.mark.parametrize("size", [(1, 1), (1, 5000), (5000, 1)])
def test_tiny_and_extreme_aspect_images(tmp_path, size):
    path = png(tmp_path / "odd.png", size=size)
    (page,) = run([path])
    assert page.image.size == (896, 896)
    assert page.original_size == size
    assert page.image.getpixel((448, 448)) == (10, 200, 30)


def test_extreme_pdf_page_shapes(tmp_path):
    path = make_pdf(tmp_path / "strip.pdf", size=(3, 2000), text=None)
    (page,) = run([path])
    assert page.image.size == (896, 896)


# ---------------------------------------------------------------------------------------------- bad input


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.pdf").write_bytes(b"")
    error = single_error(run([tmp_path / "empty.pdf"]))
    assert error.message == "empty file" and error.page is None
    assert str(error) == f"{tmp_path / 'empty.pdf'}: empty file"


def test_random_bytes_and_text_are_unsupported(tmp_path):
    noise = tmp_path / "noise.png"
    noise.write_bytes(random.Random(7).randbytes(3000))
    text = tmp_path / "notes.pdf"
    text.write_text("these are notes, not a PDF\n")
    first, second = run([noise, text])
    assert first.message.startswith("unsupported type: unrecognised binary data (supported: PDF, PNG")
    assert second.message.startswith("unsupported type: text")


def test_missing_path_and_broken_link(tmp_path):
    (tmp_path / "link.pdf").symlink_to(tmp_path / "gone.pdf")
    missing, broken = run([tmp_path / "nope.pdf", tmp_path / "link.pdf"])
    assert missing.message == "no such file or directory"
    assert broken.message == "broken symbolic link"


def test_truncated_pdf_is_repaired_with_warnings_and_nothing_printed(tmp_path, capfd):
    good = make_pdf(tmp_path / "good.pdf", pages=3).read_bytes()
    damaged = tmp_path / "damaged.pdf"
    damaged.write_bytes(good[:-150])  # the xref table and trailer are gone
    records = run([damaged])
    pages = only_pages(records)
    assert [page.page for page in pages] == [1, 2, 3]
    assert "Hello 3" in pages[2].text
    assert any("repair" in warning for warning in pages[0].warnings)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_pdf_damaged_beyond_repair(tmp_path):
    good = make_pdf(tmp_path / "good.pdf").read_bytes()
    (tmp_path / "stub.pdf").write_bytes(good[:60])
    error = single_error(run([tmp_path / "stub.pdf"]))
    assert error.message.startswith("cannot open PDF: damaged beyond repair")


def test_truncated_png_is_an_error_for_that_page(tmp_path):
    path = tmp_path / "cut.png"
    noisy = Image.frombytes("L", (200, 200), random.Random(3).randbytes(40_000))
    data = io.BytesIO()
    noisy.save(data, format="PNG")
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    error = single_error(run([path]))
    assert error.page == 1
    assert "truncated" in error.message


def test_encrypted_pdf(tmp_path):
    path = make_pdf(tmp_path / "secret.pdf", password="s3cret")
    assert "encrypted" in single_error(run([path])).message and "--password" in single_error(run([path])).message
    assert single_error(run([path], password="wrong")).message == "wrong password for this encrypted PDF"
    (page,) = run([path], password="s3cret")
    assert "Hello 1" in page.text


def test_decompression_bomb_is_refused(tmp_path):
    small = png(tmp_path / "small.png", size=(100, 100))
    error = single_error(run([small], max_pixels=5_000))
    assert "10,000 pixels" in error.message and "limit of 5,000" in error.message
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(30_000, 30_000))
    assert "decompression bomb" in single_error(run([bomb])).message
    assert len(only_pages(run([small], max_pixels=10_000))) == 1


def test_absurd_pdf_page_size_is_refused_only_at_native_size(tmp_path):
    path = make_pdf(tmp_path / "huge.pdf", size=(14_400, 14_400), text=None)
    error = single_error(run([path], size=None))
    assert error.page == 1 and "over the limit" in error.message
    (page,) = run([path])  # rendered straight to 896x896, nothing large is ever allocated
    assert page.image.size == (896, 896)


def test_folder_mixing_good_and_bad_files(tmp_path):
    folder = tmp_path / "inbox"
    (folder / "sub").mkdir(parents=True)
    (folder / ".cache").mkdir()
    make_pdf(folder / "a.pdf", pages=2)
    png(folder / "b.png")
    (folder / "c.pdf").write_bytes(b"%PDF-1.4\n%broken")
    (folder / "d.txt").write_text("hello")
    (folder / "e.png").write_bytes(b"")
    png(folder / "sub" / "f.png")
    png(folder / ".hidden.png")
    png(folder / ".cache" / "g.png")
    records = run([folder])
    summary = [(Path(record.source).relative_to(folder).as_posix(), type(record).__name__) for record in records]
    assert summary == [
        ("a.pdf", "Page"),
        ("a.pdf", "Page"),
        ("b.png", "Page"),
        ("c.pdf", "PageError"),
        ("d.txt", "PageError"),
        ("e.png", "PageError"),
        ("sub/f.png", "Page"),
    ]


def test_folder_order_is_natural_and_names_keep_the_users_spelling(tmp_path):
    for name in ["scan10.png", "scan2.png", "Scan1.png", "a/z.png", "b.png"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        png(tmp_path / name)
    sources = expand_inputs([str(tmp_path) + "/"])
    names = [source.name.removeprefix(str(tmp_path) + "/") for source in sources]
    assert names == ["a/z.png", "b.png", "Scan1.png", "scan2.png", "scan10.png"]


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    assert single_error(run([tmp_path / "empty"])).message == "folder is empty"


def test_globs(tmp_path):
    (tmp_path / "deep" / "er").mkdir(parents=True)
    for name in ["one.png", "two.png", "skip.pdf", "deep/three.png", "deep/er/four.png", ".hidden.png"]:
        png(tmp_path / name)
    flat = expand_inputs([str(tmp_path / "*.png")])
    assert [Path(source.name).name for source in flat] == ["one.png", "two.png"]
    recursive = expand_inputs([str(tmp_path / "**" / "*.png")])
    assert sorted(Path(source.name).name for source in recursive) == ["four.png", "one.png", "three.png", "two.png"]
    (nothing,) = expand_inputs([str(tmp_path / "*.webp")])
    assert nothing.error == "no files match this pattern"


def test_same_file_twice_is_read_once(tmp_path):
    path = png(tmp_path / "a.png")
    assert len(expand_inputs([str(path), str(tmp_path), str(tmp_path / "*.png")])) == 1


# -------------------------------------------------------------------------------------------------- stdin


def test_stdin_lines_of_paths(tmp_path):
    a, b = png(tmp_path / "a.png"), make_pdf(tmp_path / "b.pdf")
    listing = f"{a}\r\n\n  {b}  \n{tmp_path / 'missing.png'}\n".encode()
    sources = expand_inputs(["-"], stdin=io.BytesIO(listing))
    assert [source.name for source in sources] == [str(a), str(b), str(tmp_path / "missing.png")]
    assert sources[2].error == "no such file or directory"
    text_stream = io.StringIO(f"{a}\n")
    assert [source.path for source in expand_inputs(["-"], stdin=text_stream)] == [a]


def test_stdin_nul_separated_paths(tmp_path):
    odd = png(tmp_path / " spaced\nname.png")
    other = png(tmp_path / "plain.png")
    sources = expand_inputs(["-"], stdin=os.fsencode(odd) + b"\0" + os.fsencode(other) + b"\0")
    assert [source.path for source in sources] == [odd, other]


def test_stdin_document_bytes():
    data = (SAMPLES_DIR / "report.pdf").read_bytes()
    records = run(["-"], stdin=io.BytesIO(data), pages="2")
    (page,) = records
    assert page.source == STDIN_NAME and page.path is None
    assert page.page == 2 and page.pages == 3
    assert page.sha256 == hashlib.sha256(data).hexdigest()
    (image_page,) = run(["-"], stdin=(SAMPLES_DIR / "receipt.jpg").read_bytes())
    assert image_page.kind == "jpeg" and image_page.original_size == (360, 760)


def test_stdin_problems():
    garbage = random.Random(1).randbytes(500)
    assert "neither a document nor paths" in single_error(run(["-"], stdin=garbage)).message
    assert "standard input is empty" in single_error(run(["-"], stdin=b"\n \n")).message
    with pytest.raises(UsageError, match="only once"):
        expand_inputs(["-", "-"], stdin=b"")


# ---------------------------------------------------------------------------------------- page selection


def test_parse_pages_syntax():
    assert parse_pages(None) is None
    assert parse_pages("1-3, 7,-1").items == (("1-3", 1, 3), ("7", 7, 7), ("-1", -1, -1))
    assert parse_pages("5-").items == (("5-", 5, None),)
    assert parse_pages("-3--1").items == (("-3--1", -3, -1),)
    assert parse_pages([2, 4]).spec == "2,4"
    for bad in ["", "1,,2", "a", "1-2-3", "0", "2-0", "3-1", "1.5", "--1", "1:3"]:
        with pytest.raises(UsageError):
            parse_pages(bad)


@pytest.mark.parametrize(
    ("spec", "count", "wanted", "missing"),
    [
        ("1-3,7,-1", 10, [1, 2, 3, 7, 10], []),
        ("-1", 1, [1], []),
        ("3,1,3", 5, [1, 3], []),
        ("5-", 7, [5, 6, 7], []),
        ("-3--1", 5, [3, 4, 5], []),
        ("2-9", 4, [2, 3, 4], ["2-9"]),
        ("6,-9", 5, [], ["6", "-9"]),
    ],
)
def test_page_selection_resolves_per_document(spec, count, wanted, missing):
    assert parse_pages(spec).resolve(count) == (wanted, missing)


def test_pages_out_of_range_give_an_error_record_and_the_pages_that_exist():
    records = run([SAMPLES_DIR / "report.pdf"], pages="2-5")
    error, *pages = records
    assert isinstance(error, PageError)
    assert error.message == "--pages 2-5: not in this document (3 pages)"
    assert [page.page for page in pages] == [2, 3]
    assert single_error(run([SAMPLES_DIR / "scan.png"], pages="2")).message.endswith("(1 page)")


def test_bad_page_syntax_fails_before_anything_is_read(tmp_path):
    with pytest.raises(UsageError):
        iter_pages([tmp_path / "does-not-matter.pdf"], pages="1-x")


def test_pdf_pages_are_rendered_lazily_one_at_a_time(tmp_path):
    path = make_pdf(tmp_path / "long.pdf", pages=40)
    records = iter_pages([path])
    first = next(records)
    assert first.page == 1 and first.pages == 40
    assert "Hello 1" in first.text
    records.close()  # closes the document without rendering the other 39 pages


# ------------------------------------------------------------------------------------- python interface


def test_load_documents_convenience(tmp_path):
    import monkey_cli

    assert monkey_cli.load_documents is load_documents
    pages = load_documents(SAMPLES_DIR / "report.pdf", pages="1,-1", size="448x448")
    assert [(page.page, page.image.size) for page in pages] == [(1, (448, 448)), (3, (448, 448))]
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"nope")
    with pytest.raises(DocumentError, match=r"bad\.pdf: unsupported type"):
        load_documents([SAMPLES_DIR / "scan.png", bad])
    assert len(load_documents([SAMPLES_DIR / "scan.png", bad], errors="skip")) == 1


def test_sources_can_be_passed_back_in():
    sources = expand_inputs([str(SAMPLES_DIR / "invoice.pdf")])
    assert isinstance(sources[0], Source)
    (page,) = run(sources)
    assert page.source == str(SAMPLES_DIR / "invoice.pdf")


def test_importing_documents_and_the_render_command_stays_light():
    code = (
        "import sys, monkey_cli.documents, monkey_cli.cli.render\n"
        "heavy = {'pymupdf', 'fitz', 'PIL', 'numpy', 'torch', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------ prefetch


def test_prefetch_runs_ahead_of_the_consumer():
    second_started = threading.Event()

    def producer():
        yield 1
        second_started.set()  # reached while the consumer still holds item 1 only if the thread runs ahead
        yield 2

    items = prefetch(producer(), depth=2)
    assert next(items) == 1
    assert second_started.wait(timeout=30)
    assert list(items) == [2]


def test_prefetch_reraises_after_the_items_before_the_error():
    def producer():
        yield "a"
        yield "b"
        raise ValueError("boom")

    received = []
    with pytest.raises(ValueError, match="boom"):
        for item in prefetch(producer()):
            received.append(item)
    assert received == ["a", "b"]


def test_prefetch_stops_and_closes_the_producer_when_the_consumer_stops():
    closed = threading.Event()

    def producer():
        try:
            yield from itertools.count()
        finally:
            closed.set()

    items = prefetch(producer(), depth=1)
    assert next(items) == 0
    worker = next(thread for thread in threading.enumerate() if thread.name == "monkey-prefetch")
    assert worker.daemon
    items.close()
    assert closed.wait(timeout=30)
    worker.join(timeout=30)
    assert not worker.is_alive()


def test_prefetch_gives_the_same_records_and_validates_depth():
    direct = [(record.source, record.page) for record in iter_pages(SAMPLE_FILES)]
    ahead = [(record.source, record.page) for record in prefetch(iter_pages(SAMPLE_FILES), depth=3)]
    assert ahead == direct
    with pytest.raises(ValueError):
        prefetch([], depth=0)

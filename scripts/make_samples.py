"""Make the sample documents in this folder (deterministic: same bytes on every run with the same libraries).

    python scripts/make_samples.py [OUT_DIR]

Writes a born-digital invoice PDF (with a text layer), a 3-page report PDF (the last page landscape), a
scanned-looking PNG (slightly rotated, noisy, grayscale), a receipt JPEG whose pixels are stored sideways
with an EXIF orientation tag that turns them upright, a chart PNG with a transparent background, and a
3-page TIFF (grayscale, 1-bit fax-style and colour frames). Only Pillow and PyMuPDF are needed.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pymupdf
from PIL import Image, ImageDraw, ImageFilter, ImageFont

HERE = Path(__file__).resolve().parents[1] / "samples"
A4 = (595, 842)  # points

INVOICE_ITEMS = [
    ("Oscilloscope probe set P-200", 2, 189.00),
    ("Bench power supply 30V/5A", 1, 349.50),
    ("Calibration service (annual)", 1, 120.00),
    ("USB logic analyser, 16 channels", 3, 74.90),
]
REPORT_PARAGRAPHS = [
    "This report summarises the third quarter for the instrument division. Revenue grew by 12 percent "
    "against the same quarter last year, driven by bench power supplies and the new probe sets.",
    "Costs rose more slowly than revenue: freight prices fell, and the calibration lab ran at full "
    "capacity for the first time. Headcount is unchanged at 48.",
    "Risks for the fourth quarter are the supply of display panels and a possible delay of the "
    "firmware release for the logic analysers.",
]
REGIONS = [("North", 412, 455), ("South", 298, 341), ("East", 187, 240), ("West", 356, 349)]
RECEIPT_LINES = [
    ("Flat white", "3.80"),
    ("Croissant", "2.90"),
    ("Sparkling water", "2.20"),
    ("Banana bread", "3.40"),
]


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


# ------------------------------------------------------------------------------------------------ PDFs


def save_pdf(doc: pymupdf.Document, path: Path) -> None:
    # Fixed metadata and no fresh /ID keep the bytes identical from run to run.
    doc.set_metadata({"title": path.stem, "producer": "monkey-cli samples", "creator": "make_samples.py"})
    doc.save(path, garbage=4, deflate=True, no_new_id=True)
    doc.close()


def make_invoice(path: Path) -> None:
    doc = pymupdf.open()
    page = doc.new_page(width=A4[0], height=A4[1])
    page.draw_rect(pymupdf.Rect(0, 0, A4[0], 90), color=None, fill=(0.12, 0.23, 0.42))
    page.insert_text((50, 55), "ACME Instruments GmbH", fontname="hebo", fontsize=22, color=(1, 1, 1))
    page.insert_text((400, 55), "INVOICE", fontname="hebo", fontsize=26, color=(1, 1, 1))
    details = [
        ("Invoice no.", "INV-2024-0417"),
        ("Date", "14 March 2024"),
        ("Due", "13 April 2024"),
        ("Customer", "Northwind Labs Ltd"),
    ]
    for row, (label, value) in enumerate(details):
        y = 130 + row * 18
        page.insert_text((50, y), label, fontname="hebo", fontsize=10)
        page.insert_text((140, y), value, fontname="helv", fontsize=10)
    page.insert_textbox(
        pymupdf.Rect(360, 118, 545, 190),
        "Bill to:\nNorthwind Labs Ltd\n22 Harbour Road\nBristol BS1 4QA\nUnited Kingdom",
        fontname="helv",
        fontsize=10,
    )
    top = 230
    columns = [(50, "Description"), (330, "Qty"), (390, "Unit price"), (480, "Amount")]
    page.draw_rect(pymupdf.Rect(45, top - 14, 550, top + 6), color=None, fill=(0.9, 0.92, 0.96))
    for x, title in columns:
        page.insert_text((x, top), title, fontname="hebo", fontsize=10)
    subtotal = 0.0
    for row, (description, quantity, price) in enumerate(INVOICE_ITEMS, start=1):
        y = top + row * 22
        amount = quantity * price
        subtotal += amount
        page.insert_text((50, y), description, fontname="helv", fontsize=10)
        page.insert_text((330, y), str(quantity), fontname="helv", fontsize=10)
        page.insert_text((390, y), f"EUR {price:.2f}", fontname="helv", fontsize=10)
        page.insert_text((480, y), f"EUR {amount:.2f}", fontname="helv", fontsize=10)
        page.draw_line((45, y + 7), (550, y + 7), color=(0.8, 0.8, 0.8), width=0.5)
    vat = round(subtotal * 0.19, 2)
    totals = [("Subtotal", subtotal), ("VAT 19%", vat), ("Total due", subtotal + vat)]
    for row, (label, value) in enumerate(totals):
        y = top + (len(INVOICE_ITEMS) + 2) * 22 + row * 20
        bold = "hebo" if label == "Total due" else "helv"
        page.insert_text((390, y), label, fontname=bold, fontsize=11)
        page.insert_text((480, y), f"EUR {value:.2f}", fontname=bold, fontsize=11)
    # Small print: the kind of text a user checks with `monkey render` (does it survive at 896 px?).
    page.insert_textbox(
        pymupdf.Rect(50, 760, 545, 800),
        "Payment by bank transfer to IBAN DE89 3704 0044 0532 0130 00, BIC COBADEFFXXX. "
        "Please quote the invoice number. Late payments incur interest of 5% above the base rate.",
        fontname="helv",
        fontsize=6.5,
    )
    save_pdf(doc, path)


def make_report(path: Path) -> None:
    doc = pymupdf.open()
    page = doc.new_page(width=A4[0], height=A4[1])
    page.insert_text((60, 90), "Quarterly Report Q3", fontname="hebo", fontsize=24)
    page.insert_text((60, 115), "Instrument division", fontname="helv", fontsize=12, color=(0.4, 0.4, 0.4))
    y = 150
    for paragraph in REPORT_PARAGRAPHS:
        page.insert_textbox(pymupdf.Rect(60, y, 535, y + 90), paragraph, fontname="helv", fontsize=11)
        y += 90
    page.insert_text((60, 800), "Page 1 of 3", fontname="helv", fontsize=9)

    page = doc.new_page(width=A4[0], height=A4[1])
    page.insert_text((60, 90), "Sales by region (units)", fontname="hebo", fontsize=18)
    header = ["Region", "Q2", "Q3", "Change"]
    for column, title in enumerate(header):
        page.insert_text((60 + column * 120, 140), title, fontname="hebo", fontsize=11)
    for row, (region, before, after) in enumerate(REGIONS, start=1):
        y = 140 + row * 24
        change = f"{(after - before) / before * 100:+.1f}%"
        for column, value in enumerate([region, str(before), str(after), change]):
            page.insert_text((60 + column * 120, y), value, fontname="helv", fontsize=11)
        page.draw_line((55, y + 8), (540, y + 8), color=(0.75, 0.75, 0.75), width=0.5)
    page.insert_text((60, 800), "Page 2 of 3", fontname="helv", fontsize=9)

    page = doc.new_page(width=A4[1], height=A4[0])  # landscape
    page.insert_text((60, 70), "Units sold in Q3", fontname="hebo", fontsize=18)
    base, scale = 500, 0.8
    for index, (region, _, after) in enumerate(REGIONS):
        left = 120 + index * 160
        page.draw_rect(pymupdf.Rect(left, base - after * scale, left + 90, base), color=None, fill=(0.2, 0.45, 0.7))
        page.insert_text((left + 20, base + 22), region, fontname="helv", fontsize=12)
        page.insert_text((left + 28, base - after * scale - 8), str(after), fontname="helv", fontsize=11)
    page.draw_line((100, base), (760, base), color=(0, 0, 0), width=1)
    page.insert_text((60, 560), "Page 3 of 3", fontname="helv", fontsize=9)
    save_pdf(doc, path)


# ---------------------------------------------------------------------------------------------- images


def make_scan(path: Path) -> None:
    """A letter page 'scanned' at 100 dpi: grayscale, a little crooked, paper tone and speckles."""
    width, height = 850, 1100
    page = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(page)
    draw.text((80, 80), "MEMORANDUM", font=font(40), fill=20)
    draw.text((80, 150), "To: All laboratory staff      From: Facilities", font=font(20), fill=30)
    draw.text((80, 180), "Date: 2 May 2024      Subject: Building access", font=font(20), fill=30)
    draw.line((80, 220, 770, 220), fill=60, width=2)
    body = [
        "The east entrance will be closed from 13 May to 24 May",
        "while the doors are replaced. Please use the north",
        "entrance during this period. Badge readers on the",
        "second floor will be updated on 20 May; badges issued",
        "before 2022 must be renewed at reception.",
        "",
        "Questions: facilities@example.org, extension 4417.",
    ]
    for line_number, line in enumerate(body):
        draw.text((80, 260 + line_number * 34), line, font=font(22), fill=25)
    scan = page.rotate(1.3, resample=Image.Resampling.BICUBIC, expand=False, fillcolor=255)
    scan = scan.filter(ImageFilter.GaussianBlur(0.6))
    # Paper tone and scanner speckles from a seeded generator (Image.effect_noise is not seedable).
    rng = random.Random(20240502)
    pixels = scan.load()
    for y in range(height):
        for x in range(width):
            pixels[x, y] = min(pixels[x, y], 242)
    for _ in range(9000):
        x, y = rng.randrange(width), rng.randrange(height)
        pixels[x, y] = rng.choice((90, 140, 180))
    scan.save(path, format="PNG", dpi=(100, 100), optimize=True)


def make_receipt(path: Path) -> None:
    """A till receipt photographed sideways: the stored pixels are rotated, EXIF orientation 6 fixes them."""
    width, height = 360, 760
    receipt = Image.new("RGB", (width, height), (250, 248, 240))
    draw = ImageDraw.Draw(receipt)
    draw.rectangle((0, 0, width, 90), fill=(30, 30, 30))
    draw.text((40, 25), "CORNER CAFE", font=font(36), fill=(255, 255, 255))
    draw.text((30, 110), "12 Mill Street  -  Table 4", font=font(18), fill=(40, 40, 40))
    total = 0.0
    for row, (item, price) in enumerate(RECEIPT_LINES):
        y = 160 + row * 40
        draw.text((30, y), item, font=font(22), fill=(20, 20, 20))
        draw.text((260, y), price, font=font(22), fill=(20, 20, 20))
        total += float(price)
    draw.line((30, 330, 330, 330), fill=(60, 60, 60), width=2)
    draw.text((30, 345), "TOTAL", font=font(28), fill=(0, 0, 0))
    draw.text((240, 345), f"{total:.2f}", font=font(28), fill=(0, 0, 0))
    draw.text((30, 420), "Card payment  **** 4417", font=font(18), fill=(40, 40, 40))
    draw.text((30, 700), "Thank you!", font=font(22), fill=(40, 40, 40))
    # Orientation 6 means "rotate 90 degrees clockwise to display", so store it turned counter-clockwise.
    stored = receipt.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, format="JPEG", quality=80, exif=exif.tobytes(), dpi=(150, 150))


def make_chart(path: Path) -> None:
    """A bar chart on a transparent background (alpha must be flattened onto white, not black)."""
    width, height = 640, 420
    chart = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(chart)
    draw.text((40, 20), "Units sold per region, Q3", font=font(24), fill=(20, 20, 20, 255))
    base = 360
    colours = [(31, 119, 180, 255), (255, 127, 14, 255), (44, 160, 44, 255), (214, 39, 40, 255)]
    for index, ((region, _, after), colour) in enumerate(zip(REGIONS, colours, strict=True)):
        left = 80 + index * 135
        draw.rectangle((left, base - int(after * 0.6), left + 80, base), fill=colour)
        draw.text((left + 10, base + 12), region, font=font(18), fill=(20, 20, 20, 255))
        draw.text((left + 20, base - int(after * 0.6) - 26), str(after), font=font(18), fill=(20, 20, 20, 255))
    draw.line((60, base, 620, base), fill=(0, 0, 0, 255), width=2)
    draw.line((60, 70, 60, base), fill=(0, 0, 0, 255), width=2)
    chart.save(path, format="PNG", optimize=True)


def make_tiff(path: Path) -> None:
    """Three pages in one TIFF: a grayscale letter, a 1-bit fax page and a colour landscape form."""
    letter = Image.new("L", (600, 780), 255)
    draw = ImageDraw.Draw(letter)
    draw.text((60, 60), "Delivery note 88231", font=font(30), fill=0)
    for row, line in enumerate(["Pallets: 3", "Boxes: 41", "Received by: J. Ortega", "Condition: good"]):
        draw.text((60, 140 + row * 40), line, font=font(22), fill=40)

    fax = Image.new("L", (600, 780), 255)
    draw = ImageDraw.Draw(fax)
    draw.text((60, 60), "FAX  +44 117 496 0000", font=font(30), fill=0)
    draw.text((60, 140), "Order confirmed: 12 units, ships Monday.", font=font(20), fill=0)
    draw.rectangle((60, 600, 540, 700), outline=0, width=4)
    fax = fax.convert("1", dither=Image.Dither.NONE)

    form = Image.new("RGB", (780, 600), (255, 255, 255))
    draw = ImageDraw.Draw(form)
    draw.rectangle((0, 0, 780, 70), fill=(200, 30, 30))
    draw.text((30, 18), "INSPECTION FORM", font=font(30), fill=(255, 255, 255))
    for row, line in enumerate(["Site: Dock B", "Inspector: M. Chen", "Result: PASS"]):
        draw.text((30, 110 + row * 50), line, font=font(24), fill=(20, 20, 20))

    letter.save(
        path, format="TIFF", save_all=True, append_images=[fax, form], compression="tiff_deflate", dpi=(100, 100)
    )


MAKERS = {
    "invoice.pdf": make_invoice,
    "report.pdf": make_report,
    "scan.png": make_scan,
    "receipt.jpg": make_receipt,
    "chart.png": make_chart,
    "forms.tif": make_tiff,
}


def main(out_dir: Path = HERE) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in MAKERS.items():
        make(out_dir / name)
        written.append(out_dir / name)
    return written


if __name__ == "__main__":
    for written_path in main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(f"{written_path}  {written_path.stat().st_size:,} bytes")

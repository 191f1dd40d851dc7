"""Benchmark: how fast documents become model-size pages, and how much memory a long PDF takes.

    python benchmarks/documents.py [--rounds 5] [--pdf-pages 200] [--no-list]

1. Pages per second turning the sample documents (samples/: PDFs, scan, photo, chart, TIFF) into pages,
   at 896x896, at 896x1344 and at native size, and the same through `prefetch` (a consumer that does
   nothing, so this measures the hand-off cost, not overlap).
2. A PDF of N text-and-vector pages made in a temporary folder, streamed through `iter_pages` at 896x896
   in a fresh process: pages/s, peak resident memory (ru_maxrss) over the resident memory after imports, and
   tracemalloc's peak of Python allocations. For comparison, the same with every page kept in a list
   (`load_documents`), which is what streaming avoids.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
SAMPLE_DOCUMENTS = ["invoice.pdf", "report.pdf", "scan.png", "receipt.jpg", "chart.png", "forms.tif"]


def make_long_pdf(path: Path, pages: int) -> None:
    import pymupdf

    doc = pymupdf.open()
    for number in range(1, pages + 1):
        page = doc.new_page(width=595, height=842)
        page.insert_text((60, 80), f"Chapter {number}", fontname="hebo", fontsize=20)
        body = " ".join(f"Line {line} of page {number}: the quick brown fox jumps." for line in range(30))
        page.insert_textbox(pymupdf.Rect(60, 110, 535, 700), body, fontname="helv", fontsize=10)
        for bar in range(8):
            height = 20 + (number * 7 + bar * 13) % 80
            page.draw_rect(pymupdf.Rect(80 + bar * 50, 800 - height, 110 + bar * 50, 800), fill=(0.2, 0.4, 0.7))
    doc.save(path, garbage=3, deflate=True)
    doc.close()


def time_samples(rounds: int, size, use_prefetch: bool = False) -> tuple[int, float]:
    from monkey_cli.documents import Page, iter_pages, prefetch

    inputs = [str(SAMPLES / name) for name in SAMPLE_DOCUMENTS]
    count = 0
    started = time.perf_counter()
    for _ in range(rounds):
        records = iter_pages(inputs, size=size)
        for record in prefetch(records) if use_prefetch else records:
            assert isinstance(record, Page), record
            count += 1
    return count, time.perf_counter() - started


def child(mode: str, pdf: str) -> None:
    """Runs in a fresh process so that ru_maxrss is this measurement's own peak."""
    import pymupdf  # noqa: F401  (imported before the baseline is taken)
    from PIL import Image  # noqa: F401

    from monkey_cli.documents import iter_pages, load_documents

    baseline_kib = current_rss_kib()
    tracemalloc.start()
    started = time.perf_counter()
    if mode == "stream":
        count = sum(1 for _ in iter_pages([pdf]))
    else:
        kept = load_documents([pdf])
        count = len(kept)
    seconds = time.perf_counter() - started
    _, traced_peak = tracemalloc.get_traced_memory()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "pages": count,
                "seconds": seconds,
                "baseline_kib": baseline_kib,
                "peak_kib": peak_kib,
                "traced_peak": traced_peak,
            }
        )
    )


def current_rss_kib() -> int:
    """Resident memory now (ru_maxrss is a high-water mark that may come from a transient during imports)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_child(mode: str, pdf: Path) -> dict:
    command = [sys.executable, __file__, "--child", mode, str(pdf)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="passes over samples/ per measurement")
    parser.add_argument("--pdf-pages", type=int, default=200, help="pages of the generated PDF")
    parser.add_argument("--no-list", action="store_true", help="skip the keep-every-page comparison")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PDF"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    time_samples(1, (896, 896))  # warm-up: imports, font loading, file cache
    print(f"samples/ ({', '.join(SAMPLE_DOCUMENTS)}), {args.rounds} rounds")
    print(f"{'measurement':<34} {'pages':>6} {'seconds':>8} {'pages/s':>8}")
    for label, size, ahead in [
        ("896x896", (896, 896), False),
        ("896x1344", (896, 1344), False),
        ("native size (PDFs at 144 dpi)", None, False),
        ("896x896 through prefetch()", (896, 896), True),
    ]:
        count, seconds = time_samples(args.rounds, size, ahead)
        print(f"{label:<34} {count:>6} {seconds:>8.2f} {count / seconds:>8.1f}")

    with tempfile.TemporaryDirectory() as folder:
        pdf = Path(folder) / "long.pdf"
        make_long_pdf(pdf, args.pdf_pages)
        size_mib = pdf.stat().st_size / 2**20
        print(f"\n{args.pdf_pages}-page PDF ({size_mib:.1f} MiB) at 896x896, each in a fresh process")
        print(f"{'mode':<34} {'pages/s':>8} {'RSS base':>9} {'RSS peak':>9} {'growth':>8} {'py peak':>8}")
        for mode in ["stream"] + ([] if args.no_list else ["list"]):
            row = measure_child(mode, pdf)
            label = "iter_pages (streamed)" if mode == "stream" else "load_documents (all kept)"
            growth = (row["peak_kib"] - row["baseline_kib"]) / 1024
            print(
                f"{label:<34} {row['pages'] / row['seconds']:>8.1f} {row['baseline_kib'] / 1024:>7.0f}MB "
                f"{row['peak_kib'] / 1024:>7.0f}MB {growth:>6.0f}MB {row['traced_peak'] / 2**20:>6.1f}MB"
            )


if __name__ == "__main__":
    main()

"""End-to-end `monkey` throughput: pages/s and seconds to the first record, per batch size.

    python benchmarks/cli.py --model ../shared/parity/tiny-monkey [--pages 16] [--batch-sizes 1 4 8]

Runs the real command (`python -m monkey_cli ask ... -f jsonl`) on copies of the sample images, reads stdout
as it streams, and reports wall time including model loading, the time to the first JSONL line, and pages/s
after the first line (steady state). Also times `monkey --help` (the import-cost budget is 0.5 s).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(folder: Path, count: int) -> list[str]:
    sources = [ROOT / "samples" / name for name in ("scan.png", "chart.png", "receipt.jpg")]
    paths = []
    for i in range(count):
        target = folder / f"page{i:03d}{sources[i % len(sources)].suffix}"
        shutil.copy(sources[i % len(sources)], target)
        paths.append(str(target))
    return paths


def run_once(model: str, inputs: list[str], batch_size: int, max_new_tokens: int, device: str) -> dict:
    command = [sys.executable, "-m", "monkey_cli", "ask", *inputs, "-q", "What is written here?", "--model", model,
               "-f", "jsonl", "--batch-size", str(batch_size), "--max-new-tokens", str(max_new_tokens),
               "--device", device]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    arrivals = [time.perf_counter() - started for line in proc.stdout if json.loads(line)]
    proc.wait()
    total = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(proc.stderr.read())
    steady = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else float("nan")
    return {"batch_size": batch_size, "pages": len(arrivals), "wall_s": total, "first_record_s": arrivals[0],
            "pages_per_s": len(arrivals) / total, "steady_pages_per_s": steady}  # fmt: skip


def help_time(repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "monkey_cli", "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT.parent / "shared" / "parity" / "tiny-monkey"))
    parser.add_argument("--pages", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    machine = f"{platform.platform()}, {platform.machine()}, python {platform.python_version()}"
    print(f"machine: {machine}")
    results = {"help_s": help_time(), "runs": []}
    print(f"monkey --help: {results['help_s'] * 1000:.0f} ms (median of 7, python -m monkey_cli --help)")
    with tempfile.TemporaryDirectory() as folder:
        inputs = make_inputs(Path(folder), args.pages)
        print("| batch size | pages | wall s | first record s | pages/s (wall) | pages/s (after first) |")
        print("|---|---|---|---|---|---|")
        for batch_size in args.batch_sizes:
            r = run_once(args.model, inputs, batch_size, args.max_new_tokens, args.device)
            results["runs"].append(r)
            print(f"| {batch_size} | {r['pages']} | {r['wall_s']:.1f} | {r['first_record_s']:.1f} | "
                  f"{r['pages_per_s']:.2f} | {r['steady_pages_per_s']:.2f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

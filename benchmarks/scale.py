"""Scale-out: pages/s with 1, 2 and 4 workers (`monkey caption --workers N`), and what a worker costs to start.

    python benchmarks/scale.py --model ../shared/parity/tiny-monkey                  # CPU worker processes
    python benchmarks/scale.py --model echo840/Monkey-Chat --device cuda --workers 1 2 4 8   # one per GPU

Runs the real command on folders of single-page images (copies of the samples) and reads its JSONL stdout
as it streams. For each worker count N it times two runs:

* one page per worker: the run is all start-up but one page's work (the driver, N worker processes, their
  imports and model loads): the wall time and the time to the first record show what the workers cost
  before they answer;
* `--pages` pages: the wall time, and pages/s over the whole run, start-up included.

The steady-state throughput is the difference of the two: (pages - N) / (wall - start-up wall), which neither
the start-up nor the order the records are released in (a document waits for the ones before it) distorts.
Each figure is the median of `--repeats` runs after one untimed warm-up run; the runs go round by round over
every worker count, so that a change in the machine's load meanwhile touches them all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ("scan.png", "chart.png", "receipt.jpg")


def make_pages(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        source = ROOT / "samples" / SAMPLES[index % len(SAMPLES)]
        shutil.copy(source, folder / f"page{index:03d}{source.suffix}")
    return folder


def run_once(args: argparse.Namespace, folder: Path, workers: int) -> dict:
    command = [sys.executable, "-m", "monkey_cli", "caption", str(folder), "--model", args.model, "--device",
               args.device, "--workers", str(workers), "--max-new-tokens", str(args.max_new_tokens),
               "--batch-size", str(args.batch_size), "-f", "jsonl"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    arrivals = [time.perf_counter() - started for line in process.stdout if json.loads(line)["answer"] is not None]
    stderr = process.stderr.read()
    process.wait()
    wall = time.perf_counter() - started
    if process.returncode != 0 or not arrivals:
        raise SystemExit(f"--workers {workers} failed (exit {process.returncode}):\n{stderr}")
    return {"pages": len(arrivals), "wall_s": wall, "first_record_s": arrivals[0]}


def _medians(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def machine() -> dict:
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": cpus,
        "gpus": [torch.cuda.get_device_name(index) for index in range(count)],
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT.parent / "shared" / "parity" / "tiny-monkey"))
    parser.add_argument("--device", default="cpu", help="cpu: worker processes sharing the cores; cuda: one per GPU")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--pages", type=int, default=32, help="single-page images in the throughput run")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()

    settings = {key: str(value) for key, value in vars(args).items()}
    results = {"machine": machine(), "args": settings, "runs": []}
    print(f"machine: {results['machine']}")
    print(f"\n{args.pages} pages, --max-new-tokens {args.max_new_tokens}, medians of {args.repeats} runs")
    print("| workers | start-up wall s (a page each) | first record s | wall s | pages/s (wall) | pages/s (steady) |")
    print("|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as temp:
        pages = make_pages(Path(temp) / "pages", args.pages)
        folders = {n: (make_pages(Path(temp) / f"one-each-{n}", n), pages) for n in args.workers}
        for n, (one_each, full) in folders.items():  # warm-up: page cache, bytecode
            run_once(args, one_each, n)
            run_once(args, full, n)
        timed: dict[int, dict[str, list[dict]]] = {n: {"startup": [], "full": []} for n in args.workers}
        for _ in range(args.repeats):
            for n, (one_each, full) in folders.items():
                timed[n]["startup"].append(run_once(args, one_each, n))
                timed[n]["full"].append(run_once(args, full, n))
        for n in args.workers:
            startup, full = (_medians(timed[n][kind]) for kind in ("startup", "full"))
            extra = full["wall_s"] - startup["wall_s"]
            steady = (args.pages - n) / extra if extra > 0 else float("nan")
            row = {"workers": n, "startup": startup, "full": full, "steady_pages_per_s": steady,
                   "pages_per_s": args.pages / full["wall_s"], "runs": timed[n]}  # fmt: skip
            results["runs"].append(row)
            print(f"| {n} | {startup['wall_s']:.1f} | {startup['first_record_s']:.1f} | {full['wall_s']:.1f} | "
                  f"{row['pages_per_s']:.2f} | {steady:.2f} |", flush=True)  # fmt: skip
    results["machine"]["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

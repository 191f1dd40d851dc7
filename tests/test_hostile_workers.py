"""`--workers` and `--ray` against hostile numbers and a driver killed outright.

--workers N is capped by memory (each worker holds its own model), as --batch-size is, and says so; Ray actors
end with their driver, even when it is SIGKILLed, instead of going on writing into --out; and without
--verbose no Ray log line reaches stderr.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import require_parity
from hostile import TIMEOUT_S, _env, monkey, text_pdf
from PIL import Image

from monkey_cli.distributed.workers import memory_cap

RAY_LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\]|^\((raylet|pid=)")


def test_the_memory_cap_counts_whole_workers() -> None:
    gib = 10**9
    fits, note = memory_cap(64, 2 * gib, 20 * gib, "in RAM")
    assert fits == 10
    assert note == "--workers 64 lowered to 10: what fits in the 20.0 GB available in RAM (each worker holds its own " \
        "model: about 2.0 GB)"
    assert memory_cap(4, 2 * gib, 20 * gib, "x") == (4, None)
    assert memory_cap(4, 2 * gib, None, "x") == (4, None)  # the budget cannot be known: no cap
    assert memory_cap(4, 30 * gib, 20 * gib, "x")[0] == 1  # never none


def test_more_workers_than_memory_holds_are_lowered_and_said(tmp_path) -> None:
    """Three workers, each planned for a batch of 512 pages (the plan lowers it to what this machine's RAM
    holds, so one such model takes most of it): the run starts fewer workers, says so, and answers all."""
    model = require_parity("tiny-monkey")
    for name in ("a", "b", "c"):
        text_pdf(tmp_path / f"{name}.pdf", f"page of {name}")
    result = monkey("read", tmp_path, "--workers", "3", "--batch-size", "512", "--device", "cpu", "--model", model,
                    "-f", "jsonl", text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "--workers 3 lowered to" in line]
    assert len(notes) == 1 and "each worker holds its own model" in notes[0], result.stderr
    assert len(result.stdout.splitlines()) == 3


# --- Ray -------------------------------------------------------------------------------------------------------


def _ray_or_skip() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        if os.environ.get("MONKEY_REQUIRE_RAY"):
            raise
        pytest.skip("Ray is not installed (pip install 'monkey-cli[ray]'); CI runs these in its Ray stage")


def _actors_in(folder: Path) -> list[int]:
    """Pids of Ray's DocumentActor processes working in `folder` (actors work in the driver's folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"DocumentActor" in (entry / "cmdline").read_bytes() and os.readlink(entry / "cwd") == str(folder):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


@pytest.mark.slow
def test_ray_actors_end_with_a_driver_killed_outright_and_ray_stays_quiet(tmp_path) -> None:
    _ray_or_skip()
    model = require_parity("tiny-monkey")
    (tmp_path / "images").mkdir()
    for number in range(12):
        pixels = np.random.default_rng(number).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(tmp_path / "images" / f"p{number:02d}.png")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "monkey_cli", "ask", "images", "-q", "What is it?", "--model", str(model),
               "--device", "cpu", "--ray", "--workers", "1", "--out", str(out), "--max-new-tokens", "200",
               "-b", "1"]  # fmt: skip
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as sink:
        driver = subprocess.Popen(command, cwd=tmp_path, stderr=sink, stdout=subprocess.DEVNULL,
                                  env=_env({"RAY_USAGE_STATS_ENABLED": "0"}))  # fmt: skip
        try:
            deadline = time.monotonic() + 3 * TIMEOUT_S  # Ray starts its cluster first: minutes on a loaded machine
            while not list(out.rglob("*.txt")):  # the actor is writing answers
                assert driver.poll() is None and time.monotonic() < deadline, stderr.read_text()
                time.sleep(0.2)
            assert _actors_in(tmp_path), "the premise: an actor is at work"
            driver.kill()
            driver.wait(30)
            killed = time.monotonic()
            while _actors_in(tmp_path):
                assert time.monotonic() - killed < 2, "an actor went on after its driver was killed"
                time.sleep(0.1)
            written = sorted(out.rglob("*.txt"))
            time.sleep(3)
            assert sorted(out.rglob("*.txt")) == written, "something went on writing into --out"
        finally:
            if driver.poll() is None:
                driver.kill()
    ray_lines = [line for line in stderr.read_text().splitlines() if RAY_LOG_LINE.search(line)]
    assert ray_lines == [], ray_lines

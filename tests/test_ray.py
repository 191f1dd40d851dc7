"""`--ray`: the same run on a local Ray cluster (CPU actors), checked against a single-process run.

Ray is an optional extra: without it these tests skip, saying so. CI installs `.[ray]` in a stage of its
own and runs this file with MONKEY_REQUIRE_RAY=1, where a missing Ray is a failure rather than a skip.
Each run starts its own small local cluster (two CPUs, no dashboard) and shuts it down; the tests check that
no Ray process is left behind.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

try:
    import ray  # noqa: F401 - only whether it is there
except ImportError:
    if os.environ.get("MONKEY_REQUIRE_RAY"):
        raise
    pytest.skip("Ray is not installed (pip install 'monkey-cli[ray]'); CI runs these in its Ray stage",
                allow_module_level=True)  # fmt: skip

from test_workers import (  # noqa: E402 - after the skip above
    TIMEOUT_S,
    _env,
    command,
    documents,  # noqa: F401 - a fixture
    files,
    manifest_entries,
    records,
    single_process,
    started,
)

# A Ray cluster that cannot start or be reached must not hang CI: every run is bounded.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


def ray_processes() -> set[int]:
    """Ray's own processes on this machine (its GCS server and raylet: a local cluster's core)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                name = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if name in ("gcs_server", "raylet"):
                found.add(int(entry.name))
    return found


def monkey_on_ray(folder: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    before = ray_processes()
    result = subprocess.run(command(folder, "--ray", *args), capture_output=True, text=True, timeout=TIMEOUT_S,
                            env=_env({**RAY_ENV, **(env or {})}))  # fmt: skip
    assert ray_processes() <= before, "the run left a Ray cluster running"
    return result


@pytest.fixture(scope="module")
def single(documents, tmp_path_factory) -> dict:  # noqa: F811 - the fixture imported above
    """A single-process run: its JSONL records (--quant auto), and its --out files with --quant none."""
    listed, _ = single_process(documents, "-f", "jsonl")
    out = tmp_path_factory.mktemp("single") / "out"
    single_process(documents, "--quant", "none", "--out", str(out))
    return {"records": records(listed), "files": files(out), "entries": manifest_entries(out)}


def test_ray_gives_the_same_records_as_one_process(documents, single):  # noqa: F811
    """Two CPU actors; --quant auto is planned on the cluster (a Ray task) before the actors start."""
    result = monkey_on_ray(documents, "--workers", "2", "-f", "jsonl")
    assert result.returncode == 0, result.stderr
    assert records(result.stdout) == single["records"]
    assert "7 documents, 11 pages, 0 failed" in result.stderr
    said = [line for line in result.stderr.splitlines() if line.startswith("--quant auto: using --quant")]
    assert len(said) == 1, result.stderr  # the cluster's choice, said once by the driver as one process says it


def test_an_actor_killed_mid_run_is_replaced_and_nothing_is_lost(documents, single, tmp_path):  # noqa: F811
    """The actor reading report.pdf dies (SIGKILL) at its first page; a new actor takes its slot, the
    documents it held are redone once by other actors, and the files and manifest entries the actors wrote
    equal the single-process run's; a rerun skips everything (and, with nothing to do, starts no cluster)."""
    out, log = tmp_path / "out", tmp_path / "started.log"
    hooks = {"MONKEY_TEST_KILL_WORKER": "report.pdf", "MONKEY_TEST_WORKER_LOG": str(log)}
    result = monkey_on_ray(documents, "--workers", "2", "--quant", "none", "--out", str(out), env=hooks)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "", "stdout carries results only (Ray's messages about its workers included)"
    deaths = [line for line in result.stderr.splitlines() if line.startswith("warning: actor ")]
    assert len(deaths) == 1 and "died" in deaths[0] and "a new actor takes its place" in deaths[0], result.stderr
    assert "7 documents, 11 pages, 0 failed" in result.stderr
    assert files(out) == single["files"]
    assert manifest_entries(out) == single["entries"]
    assert not list(out.glob(".monkey-work-*")), "every actor removed its work folder"

    runs = started(log)
    killed = next(pid for pid, attempt, name in runs if name.endswith("report.pdf") and attempt == 0)
    redone = [(pid, name) for pid, attempt, name in runs if attempt == 1]
    assert any(name.endswith("report.pdf") and pid != killed for pid, name in redone)
    first_tries = [name for _, attempt, name in runs if attempt == 0]
    assert sorted(first_tries) == sorted(set(first_tries)) and len(first_tries) == 7

    before = ray_processes()
    again = subprocess.run(command(documents, "--ray", "--workers", "2", "--quant", "none", "--out", str(out)),
                           capture_output=True, text=True, timeout=TIMEOUT_S, env=_env(RAY_ENV))  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "0 documents, 0 pages, 0 failed, 7 already done" in again.stderr
    assert ray_processes() == before


@pytest.mark.parametrize(
    "address, expected",
    [("127.0.0.1:9", "error: --ray 127.0.0.1:9: cannot reach the Ray cluster there (Connection refused)"),
     ("auto", "error: --ray auto: cannot start or reach the Ray cluster (Could not find any running Ray instance")],
)  # fmt: skip
def test_a_cluster_that_is_not_there_is_a_one_line_error_at_once(documents, tmp_path, address, expected):  # noqa: F811
    """Ray itself retries an unreachable address for minutes; monkey says so at once."""
    if address == "auto" and ray_processes():
        pytest.skip("a Ray cluster is running on this machine")
    result = subprocess.run(command(documents, "--ray", address, "--out", str(tmp_path / "out")),
                            capture_output=True, text=True, timeout=60, env=_env(RAY_ENV))  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith(expected)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())

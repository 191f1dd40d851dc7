"""Shared fixtures. The parity fixtures are required under CI=true and optional elsewhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = REPO_ROOT / "samples"


def _parity_root() -> Path:
    configured = os.environ.get("MONKEY_PARITY_DIR")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "parity"


def require_parity(relative: str = "") -> Path:
    """Path inside the parity fixtures; fails under CI=true when missing, skips (with the reason) elsewhere."""
    path = _parity_root() / relative
    if not path.exists():
        reason = f"parity fixture {path} not found (set MONKEY_PARITY_DIR)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true requires it")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return require_parity()


@pytest.fixture(scope="session")
def tiny_monkey_dir(parity_dir: Path) -> Path:
    return require_parity("tiny-monkey")


@pytest.fixture(scope="session")
def tiny_sharp_dir(parity_dir: Path) -> Path:
    return require_parity("tiny-monkey-sharp")


# Greedy divergences that the bfloat16 parity tests excused as near-ties, reported at the end of the run.
NEAR_TIES: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest's hook signature
    if NEAR_TIES:
        terminalreporter.section("bfloat16 near-ties (greedy divergence within the logits error)")
        for line in sorted(set(NEAR_TIES)):
            terminalreporter.write_line(line)

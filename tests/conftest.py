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

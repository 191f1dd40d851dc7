"""Shared fixtures. The parity fixtures are required under CI=true and optional elsewhere."""

from __future__ import annotations

import os
import shutil
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


@pytest.fixture(scope="session")
def eager_eos_dir(tmp_path_factory) -> Path:
    """A copy of tiny-monkey whose lm_head row for <|endoftext|> points along the final hidden states,
    scaled up: <|endoftext|> wins every step by a wide margin, so only min_new_tokens=1 keeps an answer
    from being empty, and every answer is exactly one token (fast end-to-end runs)."""
    import torch
    from safetensors.torch import load_file, save_file

    from monkey_cli import Monkey, tasks

    src = require_parity("tiny-monkey")
    monkey = Monkey.load(src, device="cpu")
    hidden = []
    hook = monkey.model.transformer.ln_f.register_forward_hook(lambda _m, _i, out: hidden.append(out.flatten(0, 1)))
    images = [SAMPLES_DIR / "chart.png", SAMPLES_DIR / "scan.png"]
    monkey.generate_ids(images, [tasks.vqa_prompt("What?")] * 2, max_new_tokens=3)
    hook.remove()
    direction = torch.cat(hidden).mean(0)
    dst = tmp_path_factory.mktemp("checkpoints") / "eager-eos"
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    state["lm_head.weight"][monkey.tokenizer.eod_id] = 1000 * direction / direction.norm()
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture()
def prompt_ids(monkeypatch) -> list[list[int]]:
    """Every prompt the model is given, as token ids, in order (every request reaches Scheduler.submit)."""
    from monkey_cli.engine.scheduler import Scheduler

    seen: list[list[int]] = []
    real = Scheduler.submit

    def spy(self, request):
        seen.append(list(request.prompt_ids))
        return real(self, request)

    monkeypatch.setattr(Scheduler, "submit", spy)
    return seen

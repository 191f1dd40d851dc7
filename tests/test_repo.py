"""The README's install and test commands are exactly what CI runs, and the install reads in the right order."""

from __future__ import annotations

import re

from conftest import REPO_ROOT


def _section(readme: str, heading: str) -> str:
    return readme.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def _blocks(section: str, language: str) -> list[list[str]]:
    """The command lines of each ```language block, comments dropped."""
    blocks = re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)
    return [[line.split("  #")[0].strip() for line in block.splitlines() if line.strip()] for block in blocks]


def _section_commands(readme: str, heading: str) -> list[str]:
    """The section's ```bash blocks: the commands CI runs (the user's own choices are ```sh blocks)."""
    blocks = _blocks(_section(readme, heading), "bash")
    assert blocks, f"README section {heading!r} has no bash block"
    return [line for block in blocks for line in block]


def test_ci_runs_the_readme_install_and_test_commands() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    install, test = _section_commands(readme, "Install"), _section_commands(readme, "Test")
    assert install and test
    for command in install + test:
        assert command in ci, f"CI does not run the README's {command!r}"
    assert ci.index(install[-1]) < ci.index(test[0])
    assert ci.index("python -m pip install --quiet torch==2.13.0") < ci.index(install[0])


def test_the_install_clones_then_installs_torch_for_the_machine_then_the_package() -> None:
    """A newcomer's order: the code, PyTorch for the machine (CPU-only or CUDA, with sizes), then the package
    for users (`-e .` plus extras) apart from the developers' `.[dev]`, which is what CI runs."""
    section = _section((REPO_ROOT / "README.md").read_text(encoding="utf-8"), "Install")
    user = [line for block in _blocks(section, "sh") for line in block]
    clone = next(i for i, line in enumerate(user) if line.startswith("git clone "))
    cpu = user.index("python -m pip install torch --index-url https://download.pytorch.org/whl/cpu")
    cuda = user.index("python -m pip install torch")
    package = user.index("python -m pip install -e .")
    assert clone < cpu < package and cuda < package
    assert any(line.startswith("python -m pip install -e \".[") and "dev" not in line for line in user)
    for size in ("MB download", "GB download"):
        assert size in section
    assert ["python -m pip install -e \".[dev]\""] in _blocks(section, "bash")
    assert section.index("### Developer install") > section.index("python -m pip install -e .")


def test_the_readme_says_what_resolution_the_model_sees() -> None:
    """The figures follow from the released checkpoints' input size (896x896) and the paper sizes."""
    from monkey_cli.documents import DEFAULT_SIZE
    from monkey_cli.model.configuration import real_monkey_config

    section = _section((REPO_ROOT / "README.md").read_text(encoding="utf-8"), "What the model sees")
    side = real_monkey_config().vision.input_size
    assert side == DEFAULT_SIZE == (896, 896) and "896x896" in section
    a4 = round(896 / (210 / 25.4)), round(896 / (297 / 25.4))
    letter = round(896 / 8.5), round(896 / 11)
    assert f"about {a4[0]} dpi across and {a4[1]}" in section and f"about {letter[0]} x {letter[1]} dpi" in section
    assert "--size" in section and "monkey render" in section

"""The README's install and test commands are exactly what CI runs."""

from __future__ import annotations

import re

from conftest import REPO_ROOT


def _section_commands(readme: str, heading: str) -> list[str]:
    section = readme.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert block, f"README section {heading!r} has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_install_and_test_commands() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    install, test = _section_commands(readme, "Install"), _section_commands(readme, "Test")
    assert install and test
    for command in install + test:
        assert command in ci, f"CI does not run the README's {command!r}"
    assert ci.index(install[-1]) < ci.index(test[0])
    assert ci.index("python -m pip install --quiet torch==2.13.0") < ci.index(install[0])

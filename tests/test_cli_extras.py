"""A command whose optional extra is missing says which one to install, in one line, with exit code 2.

The extra is made missing as it is on a machine without it: `sys.modules[name] = None` makes `import name`
(and `importlib.util.find_spec(name)`) fail in a fresh interpreter, before the command runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SAMPLES_DIR, require_parity

REPO = Path(__file__).resolve().parents[1]


def _monkey_without(modules: list[str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        f"for name in {modules!r}:\n    sys.modules[name] = None\n"
        f"sys.argv = ['monkey', *{list(args)!r}]\n"
        "from monkey_cli.__main__ import main\n"
        "main()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


def _one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("module", ["uvicorn", "fastapi"])
def test_serve_without_the_serve_extra(module: str) -> None:
    line = _one_line(_monkey_without([module], "serve", "--model", "nowhere", "--port", "0"))
    install = "pip install 'monkey-cli[serve]'"
    assert line == f"error: monkey serve needs the 'serve' extra ({module} is not installed): {install}"


def test_a_module_an_extra_brings_along_names_that_extra_too() -> None:
    """fastapi and uvicorn are there, but starlette (which fastapi needs) is not: found at the import itself."""
    line = _one_line(_monkey_without(["starlette"], "serve", "--model", "nowhere", "--port", "0"))
    assert line.startswith("error: monkey serve needs the 'serve' extra (starlette is not installed)")


def test_finetune_without_peft(tmp_path: Path) -> None:
    data = tmp_path / "train.json"
    data.write_text("[]")
    line = _one_line(_monkey_without(["peft"], "finetune", str(data), "--out", str(tmp_path / "run")))
    assert line == (
        "error: monkey finetune train needs the 'finetune' extra (peft is not installed): "
        "pip install 'monkey-cli[finetune]'"
    )
    assert not (tmp_path / "run").exists()
    merge = _one_line(_monkey_without(["peft"], "finetune", "merge", str(tmp_path), "--out", str(tmp_path / "m")))
    assert "needs the 'finetune' extra (peft is not installed)" in merge


def test_an_adapter_without_peft_fails_before_any_model_loads(tmp_path: Path) -> None:
    model = str(require_parity("tiny-monkey"))
    args = ["caption", str(SAMPLES_DIR / "chart.png"), "--model", model, "--adapter", str(tmp_path)]
    line = _one_line(_monkey_without(["peft"], *args))
    assert line == (
        "error: monkey caption needs the 'finetune' extra (peft is not installed): pip install 'monkey-cli[finetune]'"
    )


def test_ray_without_ray() -> None:
    line = _one_line(_monkey_without(["ray"], "read", str(SAMPLES_DIR / "invoice.pdf"), "--ray"))
    assert line == "error: monkey read needs the 'ray' extra (ray is not installed): pip install 'monkey-cli[ray]'"


def test_mcp_without_the_mcp_extra(tmp_path: Path) -> None:
    line = _one_line(_monkey_without(["mcp"], "mcp", "--root", str(tmp_path)))
    assert line == "error: monkey mcp needs the 'mcp' extra (mcp is not installed): pip install 'monkey-cli[mcp]'"


def test_a_missing_module_of_no_extra_is_still_unexpected() -> None:
    """A broken installation is not fixed by an extra: it stays an unexpected error (exit 1), not advice."""
    import typer
    from typer.testing import CliRunner

    from monkey_cli.cli.common import missing_extra, user_errors

    assert missing_extra(ModuleNotFoundError("x", name="numpy")) is None
    assert missing_extra(ModuleNotFoundError("x", name="mcp.server")) == "mcp"
    probe = typer.Typer()

    @probe.command()
    def broken() -> None:
        with user_errors():
            raise ModuleNotFoundError("No module named 'numpy'", name="numpy")

    result = CliRunner().invoke(probe, [])
    assert result.exit_code == 1 and "unexpected ModuleNotFoundError" in result.stderr


def test_serve_with_an_adapter_without_peft(tmp_path: Path) -> None:
    """Checked before the server starts (the model loads in the background, where it would stop the server)."""
    model = str(require_parity("tiny-monkey"))
    line = _one_line(_monkey_without(["peft"], "serve", "--model", model, "--adapter", str(tmp_path), "--port", "0"))
    assert line == (
        "error: monkey serve needs the 'finetune' extra (peft is not installed): pip install 'monkey-cli[finetune]'"
    )


@pytest.mark.parametrize("needs", ["peft", "ray"])
def test_the_librarys_missing_extra_reads_as_the_clis_line(needs: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the library finds the extra missing itself (require_peft, import_ray), Python callers get its
    own sentence, and a command the CLI's line naming the command and the extra."""
    import typer
    from typer.testing import CliRunner

    from monkey_cli.cli.common import user_errors
    from monkey_cli.distributed.ray_runner import import_ray
    from monkey_cli.errors import MissingExtra
    from monkey_cli.finetune.adapters import require_peft

    monkeypatch.setitem(sys.modules, needs, None)
    need = require_peft if needs == "peft" else import_ray
    with pytest.raises(MissingExtra, match="need"):
        need()
    probe = typer.Typer()

    @probe.command()
    def lazy() -> None:
        with user_errors():
            need()

    result = CliRunner().invoke(probe, [])
    extra = "finetune" if needs == "peft" else "ray"
    assert result.exit_code == 2
    assert result.stderr.strip().endswith(
        f"needs the '{extra}' extra ({needs} is not installed): pip install 'monkey-cli[{extra}]'"
    ), result.stderr

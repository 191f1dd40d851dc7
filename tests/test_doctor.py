"""`monkey doctor`: runs on this machine, reports what it finds, and survives failing probes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import monkey_cli.cli.doctor  # noqa: F401  (registers the command on `app`)
from monkey_cli import __version__, doctor
from monkey_cli.cli import app
from monkey_cli.model.memory import AUTO_OPTIONS

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {
    "monkey_cli", "model", "python", "torch", "devices", "bitsandbytes", "torchao", "compile", "transformers",
    "huggingface_hub", "memory", "memory_textmonkey", "problems",
}


@pytest.fixture(scope="module")
def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def json_report() -> dict:
    result = CliRunner().invoke(app, ["doctor", "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_report_has_every_section(json_report: dict, cuda: bool) -> None:
    assert set(json_report) == SECTIONS
    assert json_report["monkey_cli"]["version"] == __version__
    assert json_report["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert json_report["torch"]["cuda_available"] is cuda
    assert len(json_report["devices"]["cuda"]) == json_report["torch"]["device_count"]
    assert json_report["transformers"]["tested_range"] == doctor.TESTED_TRANSFORMERS
    assert set(json_report["huggingface_hub"]["models"]) == {"echo840/Monkey-Chat", "echo840/Monkey"}


def test_json_report_plans_every_quant_for_every_device(json_report: dict) -> None:
    plans = json_report["memory"]["plans"]
    devices = {p["device"] for p in plans}
    assert "cpu" in devices
    assert len(plans) == len(devices) * len(AUTO_OPTIONS)
    for p in plans:
        if p["budget_bytes"] is not None:
            assert p["fits"] is (p["total_bytes"] <= p["budget_bytes"])
    cpu = {p["flags"]: p for p in plans if p["device"] == "cpu"}
    assert cpu["--quant 4bit --quant-vision"]["total_bytes"] < cpu["--quant none"]["total_bytes"]


def test_json_report_plans_textmonkey_too(json_report: dict) -> None:
    """TextMonkey's plans come from its own sizes: 768 image tokens, its window layers and token resampler
    (7.8 M parameters more than Monkey, whose 9.4 M ViT LoRA values it has not)."""
    monkey, textmonkey = json_report["memory"], json_report["memory_textmonkey"]
    assert (monkey["image_tokens"], textmonkey["image_tokens"]) == (1280, 768)
    assert "TextMonkey" in textmonkey["model"]
    assert len(textmonkey["plans"]) == len(monkey["plans"])
    weights = {(p["device"], p["flags"]): p["weight_bytes"] for p in monkey["plans"]}
    for p in textmonkey["plans"]:
        # bf16: 2 bytes per value; TextMonkey has 9,715,823,361 values, Monkey 9,708,053,824.
        if p["flags"] == "--quant none" and p["dtype"] == "bfloat16":
            assert p["weight_bytes"] == 2 * 9_715_823_361
            assert p["weight_bytes"] - weights[(p["device"], p["flags"])] == 2 * (9_715_823_361 - 9_708_053_824)


def test_no_gpu_is_reported(json_report: dict, cuda: bool) -> None:
    if cuda:
        pytest.skip("this machine has a CUDA device")  # the check below is about CPU-only machines
    assert json_report["devices"]["cuda"] == []
    assert any("no CUDA device" in line for line in json_report["problems"])
    assert all(p["device"] == "cpu" for p in json_report["memory"]["plans"])


def test_text_report(cuda: bool) -> None:
    result = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    headings = ("Environment", "Devices", "Memory needed by echo840/Monkey-Chat", "Memory needed by TextMonkey")
    for heading in (*headings, "HF_HUB_OFFLINE"):
        assert heading in out
    assert "--quant 4bit --quant-vision" in out
    if not cuda:
        assert "CUDA" in out and "not available" in out
        assert "off (CPU; --compile to force)" in out  # the engine's default here, and what it needs


def test_compile_probe_finds_what_the_backend_needs(json_report: dict, cuda: bool) -> None:
    import shutil

    probe = json_report["compile"]
    assert probe["default"] == ("on" if cuda else "off")
    assert bool(probe["cxx"]) == bool(shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"))


def test_bad_format_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["doctor", "--format", "xml"])
    assert result.exit_code == 2


def test_uncached_model_with_offline_hub(tmp_path: Path) -> None:
    # A fresh process, so that huggingface_hub reads HF_HOME and HF_HUB_OFFLINE as the loader would.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    code = "from monkey_cli.cli import app; import monkey_cli.cli.doctor; app(['doctor', '--format', 'json'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    hub = json.loads(result.stdout)["huggingface_hub"]
    assert hub["offline"] is True
    assert Path(hub["cache_dir"]) == tmp_path / "hf" / "hub"
    assert hub["models"]["echo840/Monkey-Chat"]["status"] == "absent"
    assert hub["models"]["echo840/Monkey"]["status"] == "absent"
    problems = json.loads(result.stdout)["problems"]
    assert any("echo840/Monkey-Chat is not cached and HF_HUB_OFFLINE is set" in line for line in problems)


def _fake_snapshot(cache: Path, repo: str, files: dict[str, str]) -> Path:
    """A Hugging Face cache entry laid out as huggingface_hub writes it (refs/main -> snapshots/<hash>)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


def test_cached_model_complete_and_incomplete(tmp_path: Path) -> None:
    index = json.dumps({"weight_map": {"a": "pytorch_model-1.bin", "b": "pytorch_model-2.bin"}})
    snapshot = _fake_snapshot(
        tmp_path,
        "echo840/Monkey-Chat",
        {"config.json": "{}", "qwen.tiktoken": "", "pytorch_model.bin.index.json": index,
         "pytorch_model-1.bin": "", "pytorch_model-2.bin": ""},
    )
    found = doctor.cached_model("echo840/Monkey-Chat", tmp_path)
    assert found == {"status": "complete", "path": str(snapshot), "missing": []}
    (snapshot / "pytorch_model-2.bin").unlink()
    found = doctor.cached_model("echo840/Monkey-Chat", tmp_path)
    assert found["status"] == "incomplete"
    assert found["missing"] == ["pytorch_model-2.bin"]
    assert doctor.cached_model("echo840/Monkey", tmp_path)["status"] == "absent"


def test_a_failing_probe_is_recorded_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> dict:
        raise RuntimeError("driver exploded\nsecond line")

    monkeypatch.setattr(doctor, "_torch", broken)
    monkeypatch.setattr(doctor, "_version", lambda name: None if name == "bitsandbytes" else "5.99.0")
    result = CliRunner().invoke(app, ["doctor", "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["torch"] == {"error": "RuntimeError: driver exploded"}
    assert "not installed" in report["bitsandbytes"]["error"]
    assert report["transformers"]["in_tested_range"] is False
    problems = "\n".join(report["problems"])
    assert "torch: RuntimeError: driver exploded" in problems
    assert "bitsandbytes is not usable (not installed" in problems and "--quant 4bit does not work" in problems
    assert "torchao is not usable" not in problems  # --quant 8bit still works
    assert "transformers 5.99.0 is outside the tested range" in problems
    # The text form renders the same broken report without crashing.
    text = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "200"})
    assert text.exit_code == 0, text.output
    assert "error: RuntimeError: driver exploded" in text.stdout


def test_tested_range_matches_pyproject() -> None:
    # tomllib is 3.11+: a regex over the dependency line is enough here.
    pins = re.findall(r'^\s*"transformers([^"]*)"', (REPO_ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert [pin.replace(" ", "") for pin in pins] == [doctor.TESTED_TRANSFORMERS]


def test_default_dtype() -> None:
    assert doctor.default_dtype("cpu") == "bfloat16"  # the released checkpoints' precision runs on a CPU
    assert doctor.default_dtype("cuda:0", bf16=True) == "bfloat16"
    assert doctor.default_dtype("cuda:1", bf16=False) == "float16"


@pytest.mark.parametrize("how", ["flag", "env"])
def test_doctor_sizes_the_model_it_is_given(how: str) -> None:
    """`monkey doctor --model X` (or MONKEY_MODEL=X) plans memory for X from its config.json, in its own
    precision, not for the default checkpoint."""
    from conftest import require_parity

    from monkey_cli.model.configuration import load_config
    from monkey_cli.model.memory import plan

    tiny = str(require_parity("tiny-monkey"))
    args, env = (["--model", tiny], {}) if how == "flag" else ([], {"MONKEY_MODEL": tiny})
    result = CliRunner().invoke(app, ["doctor", "--format", "json", *args], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"] == report["memory"]["model"] == tiny
    cpu_none = next(p for p in report["memory"]["plans"] if p["device"] == "cpu" and p["flags"] == "--quant none")
    assert cpu_none["dtype"] == "float32"  # tiny-monkey is a float32 checkpoint
    assert cpu_none["total_bytes"] == plan(load_config(tiny), "none", "float32").total_bytes
    assert cpu_none["total_bytes"] < 2e9  # not the 7B model's figure
    assert not any("is not cached" in line for line in report["problems"])  # a local folder needs no download


def test_doctor_with_a_model_that_is_not_there_says_so() -> None:
    result = CliRunner().invoke(app, ["doctor", "--format", "json", "--model", "no/such/folder/here"])
    report = json.loads(result.stdout)
    assert "no such checkpoint folder" in report["memory"]["error"]
    assert any("no such checkpoint folder" in line for line in report["problems"])


def test_bench_measures_the_engine_here(tiny_sharp_dir: Path) -> None:
    """`monkey doctor --bench`: the engine's speed with --model on this machine, eager (JSON) and compiled (text:
    how the decode step runs and what it compiled)."""
    args = ["doctor", "--bench", "--model", str(tiny_sharp_dir), "--device", "cpu", "-b", "2", "--bench-tokens", "4"]
    result = CliRunner().invoke(app, [*args, "--format", "json", "--no-compile"])
    assert result.exit_code == 0, result.output
    bench = json.loads(result.stdout)["bench"]
    assert bench["device"] == "cpu" and bench["dtype"] == "float32" and bench["quant"] == "none"
    assert [row["batch"] for row in bench["decode"]] == [1, 2]
    for row in bench["decode"]:
        assert row["ms_per_token"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["batch"] * 1000 / row["ms_per_token"])
        assert row["host_syncs_per_step"] is None  # counted on CUDA only
    assert bench["first_token_ms"] > 0 and bench["compile"]["mode"] == "eager"
    text = CliRunner().invoke(app, [*args, "--compile"], env={"COLUMNS": "200"})
    assert text.exit_code == 0, text.output
    assert "Engine speed:" in text.stdout and "ms/token" in text.stdout
    assert re.search(r"Decode step: inductor, \d+ graph\(s\) compiled, 0 recompile\(s\) after warm-up", text.stdout)

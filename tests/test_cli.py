"""`monkey ask|caption|read` end to end on samples/ with the tiny parity checkpoint (CPU)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SAMPLES_DIR, require_parity
from typer.testing import CliRunner

import monkey_cli.api
from monkey_cli.cli import _register_commands, app

_register_commands()
RUNNER = CliRunner()
FAST = ["--max-new-tokens", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny() -> str:
    return str(require_parity("tiny-monkey"))


@pytest.fixture()
def load_counter(monkeypatch):
    """Counts Monkey.load calls and vision-tower passes while delegating to the real implementations."""
    real_load = monkey_cli.api.Monkey.load.__func__
    counts = {"loads": 0, "vision": 0}

    def counting_load(cls, *args, **kwargs):
        counts["loads"] += 1
        monkey = real_load(cls, *args, **kwargs)
        monkey.model.transformer.visual.register_forward_hook(
            lambda *_: counts.__setitem__("vision", counts["vision"] + 1)
        )
        return monkey

    monkeypatch.setattr(monkey_cli.api.Monkey, "load", classmethod(counting_load))
    return counts


def _cli(*args: str, env: dict | None = None):
    result = RUNNER.invoke(app, list(args), env=env)
    return result


def _monkey(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monkey_cli", *args], capture_output=True, text=True, **kwargs)


def _images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        target = folder / f"page{i:02d}.png"
        shutil.copy(SAMPLES_DIR / ("chart.png" if i % 2 else "scan.png"), target)
        paths.append(str(target))
    return paths


# --- formats ----------------------------------------------------------------------------------------------


def test_json_jsonl_md_text_formats(tiny: str) -> None:
    inputs = [str(SAMPLES_DIR / "chart.png"), str(SAMPLES_DIR / "scan.png")]
    keys = [
        "source",
        "page",
        "pages",
        "task",
        "prompt",
        "answer",
        "answer_source",
        "model",
        "quant",
        "seconds",
        "error",
    ]

    result = _cli("ask", *inputs, "-q", "What is shown?", "--model", tiny, "--format", "json", *FAST)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["schema_version"] == 2
    assert [r["source"] for r in document["records"]] == inputs
    for record in document["records"]:
        assert list(record)[: len(keys)] == keys
        assert record["task"] == "ask" and record["answer_source"] == "model" and record["error"] is None
        assert isinstance(record["answer"], str) and record["model"] == tiny and record["quant"] == "none"

    result = _cli("caption", *inputs, "--model", tiny, "--format", "jsonl", *FAST)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["source"] for line in lines] == inputs
    assert all(line["schema_version"] == 2 and line["task"] == "caption" for line in lines)
    assert all(0 < line["confidence"] <= 1 for line in lines)

    result = _cli("ask", *inputs, "-q", "What?", "--model", tiny, "--format", "md", *FAST)
    assert result.exit_code == 0
    assert result.stdout.count("## ") >= 2 and "What?" in result.stdout

    result = _cli("ask", *inputs, "-q", "What?", "--model", tiny, "--format", "text", *FAST)
    assert result.exit_code == 0
    assert f"{inputs[0]} p.1" in result.stdout and f"{inputs[1]} p.1" in result.stdout
    assert "2 documents, 2 pages, 0 failed" in result.stderr


def test_jsonl_lines_arrive_while_the_run_goes_on(tiny: str, tmp_path: Path) -> None:
    inputs = _images(tmp_path / "in", 8)
    proc = subprocess.Popen(
        [sys.executable, "-m", "monkey_cli", "ask", *inputs, "-q", "What?", "--model", tiny, "-f", "jsonl",
         "--batch-size", "1", "--max-new-tokens", "24", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first = json.loads(proc.stdout.readline())
    still_running = proc.poll() is None
    rest = [json.loads(line) for line in proc.stdout]
    proc.wait(timeout=300)
    assert first["source"] == inputs[0]
    assert still_running, "the first record only arrived when the process ended"
    assert [r["source"] for r in rest] == inputs[1:]


# --- resume and interruption --------------------------------------------------------------------------------


def test_resume_skips_finished_documents(tiny: str, tmp_path: Path, load_counter: dict) -> None:
    out = tmp_path / "out"
    inputs = [str(SAMPLES_DIR / "chart.png"), str(SAMPLES_DIR / "receipt.jpg")]
    args = ["caption", *inputs, "--model", tiny, "--out", str(out), "--format", "json", *FAST]
    assert _cli(*args).exit_code == 0
    files = sorted(p for p in out.rglob("*.json") if not p.name.startswith("."))
    assert len(files) == 2
    before = {p: p.read_bytes() for p in files}
    assert load_counter["loads"] == 1

    result = _cli(*args)
    assert result.exit_code == 0
    assert load_counter["loads"] == 1, "an identical rerun must not load the model"
    assert {p: p.read_bytes() for p in files} == before
    assert "2 already done" in result.stderr

    result = _cli(*[a if a != "4" else "6" for a in args])  # --max-new-tokens 6: a setting that changes answers
    assert result.exit_code == 0
    assert load_counter["loads"] == 2
    assert "already done" not in result.stderr

    result = _cli(*args, "--batch-size", "2")  # batch size does not change answers: still done
    assert load_counter["loads"] == 3  # the 6-token run replaced the 4-token outputs, so this redoes them


def test_sigint_keeps_finished_documents_and_rerun_completes(tiny: str, tmp_path: Path) -> None:
    inputs = _images(tmp_path / "in", 6)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "monkey_cli", "ask", *inputs, "-q", "What?", "--model", tiny, "--out", str(out),
               "-f", "json", "--batch-size", "1", "--max-new-tokens", "24", "--device", "cpu"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.rglob("page*.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    done = sorted(p.name for p in out.rglob("page*.json"))
    assert 1 <= len(done) < 6
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "a temp file was left behind"
    for path in out.rglob("page*.json"):
        json.loads(path.read_text())  # every file that exists is whole

    rerun = _monkey(*command[3:])
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done)} already done" in rerun.stderr
    assert len(list(out.rglob("page*.json"))) == 6


# --- errors -------------------------------------------------------------------------------------------------


def test_folder_with_good_and_bad_files(tiny: str, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    _images(folder, 2)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not a document\n")
    (folder / "broken.pdf").write_bytes((SAMPLES_DIR / "report.pdf").read_bytes()[:200])
    result = _monkey("ask", str(folder), "-q", "What?", "--model", tiny, "-f", "jsonl", *FAST)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    records = {Path(r["source"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert records["page00.png"]["answer"] is not None and records["page01.png"]["answer"] is not None
    for bad in ("empty.png", "notes.txt", "broken.pdf"):
        assert records[bad]["answer"] is None and records[bad]["error"], bad
        assert f"error: {records[bad]['source']}" in result.stderr
    assert "4 documents" in result.stderr or "5 documents" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ask", "x.png"], "needs at least one question"),
        (["ask", "x.png", "-q", "q", "--pages", "1-x"], "--pages"),
        (["caption", "x.png", "--format", "yaml"], "--format"),
        (["caption", "x.png", "--quant", "3bit", "--device", "cpu"], "--quant"),
        (["caption", "x.png", "--device", "tpu"], "--device"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = _cli(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


def test_unknown_model_folder_is_one_line(tmp_path: Path) -> None:
    result = _cli("caption", str(SAMPLES_DIR / "chart.png"), "--model", str(tmp_path / "nope"), *FAST)
    assert result.exit_code == 2
    assert "model folder not found" in result.stderr and "Traceback" not in result.output


# --- inputs, text layers, vision reuse ----------------------------------------------------------------------


def test_pdf_paths_on_stdin(tiny: str) -> None:
    pdfs = sorted(str(p) for p in SAMPLES_DIR.glob("*.pdf"))
    result = _monkey("read", "-", "--format", "jsonl", "--model", tiny, *FAST, input="\n".join(pdfs) + "\n")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted({r["source"] for r in records}) == pdfs
    assert all(r["answer"] for r in records)


def test_read_uses_the_text_layer_without_the_model(tiny: str, monkeypatch) -> None:
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model must not be loaded for a PDF with a text layer")

    monkeypatch.setattr(monkey_cli.api.Monkey, "load", classmethod(refuse))
    invoice = str(SAMPLES_DIR / "invoice.pdf")
    result = _cli("read", invoice, "--format", "json", "--model", tiny, *FAST)
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)["records"]
    assert record["answer_source"] == "text_layer"
    assert record["confidence"] is None  # no model took part
    import pymupdf

    from monkey_cli.documents.textlayer import to_markdown

    with pymupdf.open(invoice) as pdf:
        assert record["answer"] == to_markdown(pdf[0])  # the page's text layer as Markdown


def test_force_ocr_uses_the_model(tiny: str, load_counter: dict) -> None:
    result = _cli("read", str(SAMPLES_DIR / "invoice.pdf"), "--force-ocr", "-f", "json", "--model", tiny, *FAST)
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)["records"]
    assert record["answer_source"] == "model" and load_counter["loads"] == 1


def test_two_questions_on_one_page_run_the_vision_tower_once(tiny: str, load_counter: dict) -> None:
    result = _cli(
        "ask", str(SAMPLES_DIR / "chart.png"), "-q", "What is the title?", "-q", "How many bars?",
        "--model", tiny, "-f", "jsonl", *FAST,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in records] == ["What is the title?", "How many bars?"]
    assert load_counter["vision"] == 1


def test_environment_supplies_defaults_and_flags_win(tiny: str, tmp_path: Path) -> None:
    env = {"MONKEY_MODEL": tiny, "MONKEY_DEVICE": "cpu", "MONKEY_QUANT": "none"}
    result = _cli("caption", str(SAMPLES_DIR / "chart.png"), "-f", "json", "--max-new-tokens", "2", env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["records"][0]["model"] == tiny
    result = _cli("caption", str(SAMPLES_DIR / "chart.png"), "--model", str(tmp_path / "x"), env=env)
    assert result.exit_code == 2 and "model folder not found" in result.stderr


def test_help_is_fast_to_import() -> None:
    """`monkey --help` must not import torch, transformers or pymupdf."""
    code = "import sys; from monkey_cli.cli import main; sys.argv=['monkey','--help']\n"
    code += "try: main()\nexcept SystemExit: pass\n"
    code += "print(sorted(m for m in ('torch','transformers','pymupdf','fitz','numpy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_text_format_headers_only_when_there_are_several_pages(tiny: str) -> None:
    single = _cli("read", str(SAMPLES_DIR / "invoice.pdf"), "--model", tiny, *FAST)
    assert single.exit_code == 0 and "==>" not in single.stdout and single.stdout.strip()
    several = _cli("read", str(SAMPLES_DIR / "report.pdf"), "--model", tiny, *FAST)
    assert several.exit_code == 0
    assert [line for line in several.stdout.splitlines() if line.startswith("==>")] == [
        f"==> {SAMPLES_DIR / 'report.pdf'} p.{n} <==" for n in (1, 2, 3)
    ]

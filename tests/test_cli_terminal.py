"""A newcomer's first hour: option values checked first (one line, exit 2, no torch), help that reads well,
progress on a real terminal, quiet third-party libraries, honest records and summaries."""

from __future__ import annotations

import json
import logging
import os
import re
import select
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from conftest import REPO_ROOT, SAMPLES_DIR, require_parity
from typer.testing import CliRunner

import monkey_cli.api
import monkey_cli.doctor
import monkey_cli.pipeline
from monkey_cli.cli import _register_commands, app

_register_commands()
CHART = str(SAMPLES_DIR / "chart.png")
SCAN = str(SAMPLES_DIR / "scan.png")
DOCUMENT_COMMANDS = ("ask", "caption", "read", "render")


@pytest.fixture(scope="module")
def tiny() -> str:
    return str(require_parity("tiny-monkey"))


def _cli(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, list(args), env=env)


# --- validation first ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--dtype", "fp8"], {}, "--dtype must be one of auto, bfloat16, float16, float32; got 'fp8'"),
        (["--quant", "3bit"], {}, "--quant must be one of auto, none, 8bit, 4bit; got '3bit'"),
        ([], {"MONKEY_QUANT": "3bit"}, "--quant (from $MONKEY_QUANT) must be one of auto, none, 8bit, 4bit; got "),
        (["--device", "gpu0"], {}, "--device must be auto, cpu, cuda or cuda:N; got 'gpu0'"),
        (["--device", "cuda:x"], {}, "--device must be auto, cpu, cuda or cuda:N; got 'cuda:x'"),
        ([], {"MONKEY_DEVICE": "tpu"}, "--device (from $MONKEY_DEVICE) must be auto, cpu, cuda or cuda:N; got 'tpu'"),
        (["--pages", "1-x"], {}, "--pages: cannot read '1-x'"),
        (["--pages", "0"], {}, "--pages: pages are numbered from 1"),
        (["--pages", "3-1"], {}, "--pages: range '3-1' runs backwards"),
        (["-f", "yaml"], {}, "--format must be one of text, json, jsonl, md, hocr, pdf; got 'yaml'"),
        (["--size", "900x900"], {}, "--size must be multiples of 448 per side (e.g. 896x1344); got '900x900'"),
        (["--size", "big"], {}, "--size must be HEIGHTxWIDTH in pixels, e.g. 896x896; got 'big'"),
        (["--batch-size", "0"], {}, "--batch-size must be a positive integer; got '0'"),
        (["-b", "many"], {}, "--batch-size must be a positive integer; got 'many'"),
        (["--max-new-tokens", "-3"], {}, "--max-new-tokens must be a positive integer; got '-3'"),
        (["--prompt-style", "chatty"], {}, "--prompt-style must be one of auto, chat, base; got 'chatty'"),
        (["--quant", "none", "--quant-vision"], {}, "--quant-vision needs --quant auto, 8bit or 4bit"),
    ],
)
def test_bad_option_values_are_one_line_and_exit_2(args: list[str], env: dict, message: str) -> None:
    for command in ("ask", "caption", "read"):
        extra = ["-q", "What?"] if command == "ask" else []
        result = _cli(command, "missing.png", *extra, *args, env=env)
        assert result.exit_code == 2, (command, result.output)
        assert result.stderr == f"error: {message}\n" or result.stderr.startswith(f"error: {message}")
        assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_validation_is_fast_and_imports_no_torch() -> None:
    code = (
        "import sys, time\n"
        "sys.argv = ['monkey', 'ask', 'x.png', '-q', 'q', '--dtype', 'fp8']\n"
        "started = time.perf_counter()\n"
        "from monkey_cli.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
        "print(code, round(time.perf_counter() - started, 3), 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    exit_code, seconds, torch_loaded, transformers_loaded = result.stdout.split()
    # Fast by construction: a usage error is found before torch or transformers are imported (seconds of
    # import); times are the CLI benchmark's (benchmarks/cli.py times `monkey --help`), never a unit test's.
    assert exit_code == "2" and torch_loaded == "False" and transformers_loaded == "False"
    assert float(seconds) >= 0
    assert result.stderr == "error: --dtype must be one of auto, bfloat16, float16, float32; got 'fp8'\n"


def test_out_naming_an_existing_file_is_a_usage_error(tmp_path: Path) -> None:
    existing = tmp_path / "results.json"
    existing.write_text("{}")
    for args in (["ask", CHART, "-q", "q"], ["caption", CHART], ["read", CHART], ["render", CHART]):
        result = _cli(*args, "--out", str(existing))
        assert result.exit_code == 2 and "--out must be a folder" in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1
    assert existing.read_text() == "{}"


def test_missing_arguments_and_unknown_options_are_one_line() -> None:
    for args, needle in ((["caption"], "Missing argument 'INPUT...'"), (["read", "x", "--nope"], "--nope")):
        result = _cli(*args)
        assert result.exit_code == 2 and needle in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


# --- help ------------------------------------------------------------------------------------------------------


def _help(command: str) -> str:
    result = _cli(command, "--help")
    assert result.exit_code == 0
    return result.stdout


@pytest.mark.parametrize("command", DOCUMENT_COMMANDS)
def test_help_reads_well(command: str) -> None:
    text = _help(command)
    assert re.search(r"<(str|int|float|path|list|bool|file|text)\b", text) is None, "a Python type as a metavar"
    assert "{" not in text.splitlines()[0], "the usage line shows a Python-ish placeholder"
    assert text.splitlines()[0].endswith(f"{command} [OPTIONS] INPUT...")
    assert "Input:" in text and "Output:" in text
    flat = " ".join(text.split())  # help is wrapped to the terminal's width
    for flag in ("-p, --pages RANGE", "--size HxW", "--password TEXT", "env var: MONKEY_PDF_PASSWORD",
                 "-o, --out DIR", "-v, --verbose"):  # fmt: skip
        assert flag in flat, (command, flag)
    if command != "render":
        for flag in ("-f, --format text|json|jsonl|md", "--quant auto|none|8bit|4bit", "-m, --model PATH|HUB-ID",
                     "--dtype auto|bfloat16|float16|float32", "--device auto|cpu|cuda|cuda:N", "-b, --batch-size N",
                     "--prompt-style auto|chat|base", "env var: MONKEY_MODEL", "env var: MONKEY_QUANT",
                     "env var: MONKEY_DEVICE", "env var: MONKEY_DTYPE", "Model:", "Prompt:"):  # fmt: skip
            assert flag in flat, (command, flag)
        assert text.index("Input:") < text.index("Prompt:") < text.index("Model:") < text.index("Output:")


def test_the_same_option_reads_the_same_everywhere() -> None:
    """One definition per shared option: each shared flag's help entry is identical in every command."""
    entries = {}
    for command in ("ask", "caption", "read"):
        text = _help(command)
        for flag in ("--pages", "--size", "--password", "--model", "--quant", "--dtype", "--device", "--format"):
            block = re.search(rf"^  (-\w, )?{flag} .*?(?=^  -|\Z|^\S)", text, re.MULTILINE | re.DOTALL)
            assert block, (command, flag)
            entries.setdefault(flag, set()).add(" ".join(block.group(0).split()))
    assert all(len(versions) == 1 for versions in entries.values()), entries


# --- progress on a terminal ------------------------------------------------------------------------------------


def _screen(raw: str) -> list[str]:
    """What a terminal shows after `raw`: carriage returns, erase-line and newlines applied."""
    lines, line, column = [], [], 0
    for token in re.findall(r"\x1b\[2K|\x1b\[[0-9;]*[A-Za-z]|\r\n|\n|\r|.", raw, re.DOTALL):
        if token == "\x1b[2K":
            line = []
        elif token.startswith("\x1b"):
            continue
        elif token in ("\n", "\r\n"):
            lines.append("".join(line))
            line, column = [], 0
            continue
        elif token == "\r":
            column = 0
            continue
        else:
            line = line + [" "] * (column - len(line))
            line[column : column + 1] = [token]
            column += 1
            continue
        column = 0 if token == "\x1b[2K" else column
    if line:
        lines.append("".join(line))
    return lines


def _run_on_a_terminal(args: list[str], columns: int = 100) -> tuple[int, str]:
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "xterm"}
    process = subprocess.Popen(
        [sys.executable, "-m", "monkey_cli", *args], stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
        env=env, cwd=REPO_ROOT,
    )  # fmt: skip
    os.close(follower)
    chunks = []
    deadline = time.time() + 300
    while time.time() < deadline:
        ready, _, _ = select.select([leader], [], [], 1)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the follower side closed: the process is done
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    os.close(leader)
    return process.wait(timeout=60), b"".join(chunks).decode("utf-8", errors="replace")


def test_progress_on_a_terminal_leaves_nothing_behind(tiny: str, tmp_path: Path) -> None:
    images = []
    for i in range(3):
        images.append(str(tmp_path / f"page{i}.png"))
        Path(images[-1]).write_bytes(Path(CHART if i % 2 else SCAN).read_bytes())
    args = ["ask", *images, "-q", "What?", "--model", tiny, "-b", "1", "--max-new-tokens", "24"]
    code, raw = _run_on_a_terminal(args)
    assert code == 0, raw
    for stage in ("rendering", "loading the model", "answering"):
        assert stage in raw, stage
    assert "/3 documents" in raw and "pages/s" in raw and "ETA" in raw
    screen = [line.rstrip() for line in _screen(raw)]
    assert not [line for line in screen if "pages/s" in line or "answering" in line or "documents ·" in line], screen
    headers = [line for line in screen if "<==" in line]
    assert headers == [f"==> {image} p.1 <==" for image in images], screen
    assert screen[-1].startswith("3 documents, 3 pages, 0 failed")
    assert all(len(line) < 100 for line in _screen(raw.split("==>")[0]))  # the status line never wraps


def test_messages_never_glue_onto_the_status_line(tiny: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code, raw = _run_on_a_terminal(["caption", CHART, str(broken), SCAN, "--model", tiny, "-b", "1",
                                    "--max-new-tokens", "8"])  # fmt: skip
    assert code == 1
    screen = _screen(raw)
    errors = [line for line in screen if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: {broken}"), screen
    assert not [line for line in screen if "pages/s" in line or "answering" in line]


# --- --out, records, summaries ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "json", "jsonl", "md"])
def test_out_prints_nothing_on_stdout(tiny: str, tmp_path: Path, fmt: str) -> None:
    result = _cli("caption", CHART, "--model", tiny, "-f", fmt, "--out", str(tmp_path), "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert len([p for p in tmp_path.rglob("*") if p.is_file() and not p.name.startswith(".")]) == 1
    assert "1 document, 1 page, 0 failed" in result.stderr


def test_text_layer_records_name_no_model(tiny: str) -> None:
    invoice = str(SAMPLES_DIR / "invoice.pdf")
    (record,) = json.loads(_cli("read", invoice, "--model", tiny, "-f", "json").stdout)["records"]
    assert record["answer_source"] == "text_layer" and record["model"] is None and record["quant"] is None
    markdown = _cli("read", invoice, "--model", tiny, "-f", "md").stdout
    assert "· the PDF's text layer -->" in markdown and "read by" not in markdown
    forced = json.loads(_cli("read", invoice, "--model", tiny, "-f", "json", "--force-ocr",
                             "--max-new-tokens", "2").stdout)["records"][0]  # fmt: skip
    assert forced["model"] == tiny and forced["quant"] == "none"


def test_summary_plurals(tiny: str) -> None:
    one = _cli("caption", CHART, "--model", tiny, "--max-new-tokens", "2")
    assert "1 document, 1 page, 0 failed" in one.stderr
    two = _cli("caption", CHART, SCAN, "--model", tiny, "--max-new-tokens", "2")
    assert "2 documents, 2 pages, 0 failed" in two.stderr


def test_interrupted_says_saved_only_with_out(tmp_path: Path, monkeypatch) -> None:
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(monkey_cli.pipeline, "run", interrupted)
    result = _cli("caption", CHART)
    assert result.exit_code == 130 and result.stderr.startswith("interrupted")
    assert "saved" not in result.stderr and "run the same command again" not in result.stderr
    result = _cli("caption", CHART, "--out", str(tmp_path))
    assert result.exit_code == 130 and "finished documents are saved" in result.stderr


# --- third-party noise -----------------------------------------------------------------------------------------


def test_third_party_noise_only_with_verbose(tiny: str, monkeypatch) -> None:
    real_load = monkey_cli.api.Monkey.load.__func__

    def noisy_load(cls, *args, **kwargs):
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s", "no kernels"
        )
        warnings.warn_explicit("torch.foo is deprecated", FutureWarning, "/site-packages/somelib/x.py", 3)
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(monkey_cli.api.Monkey, "load", classmethod(noisy_load))
    args = ["caption", CHART, "--model", tiny, "--max-new-tokens", "2"]
    quiet = _cli(*args)
    assert quiet.exit_code == 0
    assert "gemm_4bit" not in quiet.stderr and "deprecated" not in quiet.stderr
    assert "--quant auto: using --quant none" in quiet.stderr  # monkey-cli's own notes still show
    loud = _cli(*args, "--verbose")
    assert "warning: Failed to load CPU gemm_4bit_forward from kernels-community: no kernels" in loud.stderr
    assert "warning: torch.foo is deprecated" in loud.stderr


def test_doctor_text_shows_what_bitsandbytes_said(monkeypatch) -> None:
    said = "Failed to load CPU gemm_4bit_forward from kernels-community: no kernels"
    fake = {"version": "0.50.2", "imports": True, "warnings": [said], "native_backend": "cpu", "usable": {}}
    monkeypatch.setattr(monkey_cli.doctor, "_bitsandbytes", lambda: fake)
    result = _cli("doctor")
    assert result.exit_code == 0
    assert "bitsandbytes said" in result.stdout and "gemm_4bit_forward" in result.stdout


def test_a_streamed_answer_takes_the_terminal_cleanly(tiny: str) -> None:
    """One image on a terminal: the answer's tokens stream to stdout; the status line is gone before."""
    code, raw = _run_on_a_terminal(["caption", CHART, "--model", tiny, "--max-new-tokens", "8"])
    assert code == 0
    assert "loading the model" in raw
    screen = [line for line in _screen(raw) if line.strip()]
    assert not [line for line in screen if "loading the model" in line or "answering" in line], screen
    assert screen[-1].startswith("1 document, 1 page, 0 failed")


def test_quant_auto_on_the_command_line_with_a_fake_budget(tiny: str, monkeypatch) -> None:
    from monkey_cli import tasks
    from monkey_cli.model.configuration import load_config
    from monkey_cli.model.memory import format_bytes, plan
    from monkey_cli.model.tokenizer import QWenTokenizer

    config = load_config(tiny)
    prompt = tasks.caption_prompt(chat=False)
    length = len(QWenTokenizer.from_dir(tiny).encode_prompt(prompt.before, prompt.after))  # what the plan uses
    none, eight, four = (plan(config, q, "float32", prompt_tokens=length, max_new_tokens=2).total_bytes
                         for q in ("none", "8bit", "4bit"))  # fmt: skip
    assert four < eight < none
    budget = (eight + four) // 2  # 4bit fits, 8bit (tried before it) does not
    monkeypatch.setattr("monkey_cli.model.memory.device_budget", lambda device: budget)
    result = _cli("caption", CHART, "--model", tiny, "--max-new-tokens", "2", "-f", "json", "-b", "1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["records"][0]["quant"] == "4bit"
    notes = [line for line in result.stderr.splitlines() if line.startswith("--quant auto")]
    assert notes == [
        f"--quant auto: using --quant 4bit in float32: --quant none would need {format_bytes(none)} and cpu has "
        f"{format_bytes(budget)} available (this needs {format_bytes(four)})"
    ]
    monkeypatch.setattr("monkey_cli.model.memory.device_budget", lambda device: four // 4)
    refused = _cli("caption", CHART, "--model", tiny, "--max-new-tokens", "2")
    assert refused.exit_code == 2
    assert "error: the model does not fit: even --quant 4bit --quant-vision needs" in refused.stderr

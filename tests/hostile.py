"""Helpers for the adversarial suites (tests/test_hostile_*.py): hostile files made on the spot, bounded runs.

Everything that could hang if a regression came back (a FIFO opened for reading, a symbolic-link loop in a
glob, a signal lost) runs in a subprocess with a timeout, so a regression fails the test instead of CI.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

from conftest import SAMPLES_DIR, require_parity
from typer.testing import CliRunner

from monkey_cli.cli import _register_commands, app

_register_commands()
RUNNER = CliRunner()
REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120  # far above any case's normal time: a hang is a failure, never a stuck CI job


def tiny_model() -> str:
    return str(require_parity("tiny-monkey"))


def cli(*args: str, input: bytes | str | None = None, env: dict | None = None):
    """`monkey ARGS` in this process (fast: torch stays imported); result has exit_code, stdout, stderr."""
    return RUNNER.invoke(app, [str(arg) for arg in args], input=input, env=env)


def _env(extra: dict | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def monkey(*args: str, timeout: float = TIMEOUT_S, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`python -m monkey_cli ARGS` in a subprocess, killed after `timeout` seconds."""
    command = [sys.executable, "-m", "monkey_cli", *map(str, args)]
    kwargs.setdefault("capture_output", True)
    return subprocess.run(command, timeout=timeout, env=_env(env), **kwargs)


def python(code: str, *, timeout: float = TIMEOUT_S, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`python -c CODE` in a subprocess (text output), killed after `timeout` seconds."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run([sys.executable, "-c", code], timeout=timeout, env=_env(env), **kwargs)


def text_pdf(path: Path, *pages: str) -> Path:
    """A born-digital PDF whose text layer holds `pages` (`monkey read` answers from it, no model)."""
    import pymupdf

    document = pymupdf.open()
    for text in pages or ("hello",):
        page = document.new_page(width=300, height=200)
        page.insert_text((20, 40), text, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    document.save(path)
    document.close()
    return path


def sample(name: str, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes((SAMPLES_DIR / name).read_bytes())
    return target


def png_header(width: int, height: int, *, color_type: int = 6, bit_depth: int = 8) -> bytes:
    """A PNG that declares `width` x `height` pixels but holds almost nothing (a bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def files_under(folder: Path) -> list[str]:
    """Every entry under `folder` (links not followed), relative, sorted."""
    found = []
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            found.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(found)


def nested_forms_pdf(path: Path, depth: int = 8, fanout: int = 10) -> Path:
    """A few-KB PDF whose one page draws a Form XObject that draws the next one `fanout` times, `depth` levels
    deep: fanout**(depth-1) full-page fills (at 8 x 10, ten million: hours of MuPDF, holding the GIL)."""
    forms = list(range(5, 5 + depth))

    def stream(entries: str, data: bytes) -> bytes:
        return f"<< {entries} /Length {len(data)} >>\nstream\n".encode() + data + b"\nendstream"

    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        3: f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        f"/Resources << /XObject << /X0 {forms[0]} 0 R >> >> >>".encode(),
        4: stream("", b"q /X0 Do Q"),
    }
    for level, number in enumerate(forms):
        if level + 1 < depth:
            body = b" ".join(f"q 0.9 0 0 0.9 {i} {i} cm /X Do Q".encode() for i in range(fanout))
            resources = f"/Resources << /XObject << /X {forms[level + 1]} 0 R >> >>"
        else:
            body, resources = b"0 0 1 rg 0 0 612 792 re f", ""
        objects[number] = stream(f"/Type /XObject /Subtype /Form /BBox [0 0 612 792] {resources}", body)
    out = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += f"{number} 0 obj\n".encode() + objects[number] + b"\nendobj\n"
    xref, size = len(out), max(objects) + 1
    out += f"xref\n0 {size}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offsets[n]:010d} 00000 n \n".encode() for n in range(1, size))
    out += f"trailer\n<< /Size {size} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(out))
    return path


def render_children(parent: int) -> list[int]:
    """Pids of the PDF renderer processes (monkey_cli.documents.render_child) that process `parent` started
    (it is the child's last argument), alive or not yet reaped."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            ours = b"monkey_cli.documents.render_child" in b" ".join(command) and str(parent).encode() in command[-2:]
            if ours and state != "Z":
                found.append(int(entry.name))
    return found

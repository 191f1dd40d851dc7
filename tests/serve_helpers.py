"""A live `monkey serve` for the tests: a real subprocess on a free loopback port, always shut down."""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from conftest import REPO_ROOT, SAMPLES_DIR

STARTUP_SECONDS = 180  # imports and loading on a busy 2-core machine
_URL = re.compile(r"http://127\.0\.0\.1:(\d+)/")


class LiveServer:
    """`python -m monkey_cli serve --port 0 ...`; the port is read from its first stderr line."""

    def __init__(self, log_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log_path = log_dir / "server.log"
        self.args = ["--port", "0", "--device", "cpu", *args]
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.base = ""

    def start(self, wait_ready: bool = True) -> LiveServer:
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "monkey_cli", "serve", *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            cwd=REPO_ROOT,
            env=self.env,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + STARTUP_SECONDS
        while not self.base:
            self._check_alive(deadline)
            match = _URL.search(self.log())
            if match:
                self.base = f"http://127.0.0.1:{match.group(1)}"
            time.sleep(0.1)
        while wait_ready:
            self._check_alive(deadline)
            try:
                if httpx.get(f"{self.base}/health", headers=self.auth(), timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        return self

    def _check_alive(self, deadline: float) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the server exited ({self.process.returncode}) while starting:\n{self.log()}")
        if time.monotonic() > deadline:
            self.stop()
            raise AssertionError(f"the server was not ready within {STARTUP_SECONDS} s:\n{self.log()}")

    def auth(self) -> dict[str, str]:
        key = self.env.get("MONKEY_API_KEY")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.base}/health", headers=self.auth(), timeout=30).json()

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        """Signal the server and wait for it (killed if it does not stop in time); its exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signum)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self._log.close()
        return process.returncode


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if the test process dies without stopping it (killed, say)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def data_url(path: Path | str, media_type: str = "image/png", page: int | None = None) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"data:{media_type};base64,{data}" + (f"#page={page}" if page else "")


def image_message(url: str, question: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": question}]}


def monkey_cli(*args: str, cwd: Path = SAMPLES_DIR, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`monkey ARGS` in a subprocess (what a user runs), in the samples folder by default."""
    return subprocess.run(
        [sys.executable, "-m", "monkey_cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )

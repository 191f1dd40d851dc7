"""Load test for `monkey serve`: N clients for T seconds on loopback, every request counted, latency percentiles.

    python benchmarks/serve.py --model path/to/tiny-monkey-sharp --clients 8 --seconds 30 --json serve.json
    python benchmarks/serve.py --url http://127.0.0.1:8000 --clients 8 --seconds 30

With --model it starts its own server (`python -m monkey_cli serve --port 0 ...`) and stops it at the end;
with --url it uses a running one (loopback addresses only). Each client sends streamed chat completions
(one sample page and one question each, in turn) until the time is up, and records for every request the
time to its first token and to its end. Bounded in time (--seconds, plus the requests in flight then, each
at most --request-timeout) and in count (--max-requests). A request is failed when it gets an error status
or an error event, lost when no complete answer arrived (a dropped connection, a timeout, no [DONE]).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = REPO_ROOT / "samples"
PAGES = [
    ("chart.png", "image/png", None),
    ("scan.png", "image/png", None),
    ("receipt.jpg", "image/jpeg", None),
    ("invoice.pdf", "application/pdf", None),
    ("report.pdf", "application/pdf", 2),
    ("forms.tif", "image/tiff", 3),
]
QUESTIONS = ["What is the total?", "What is the title?", "Who wrote it?", "What is the date?"]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Tally:
    """Every request's outcome, shared by the client threads."""

    sent: int = 0
    completed: int = 0
    failed: int = 0
    lost: int = 0
    tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    first_tokens: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def main() -> None:
    args = _arguments()
    server = None
    if args.model:
        server = _start_server(args)
        url = server[1]
    else:
        url = args.url.rstrip("/")
        if urlsplit(url).hostname not in LOOPBACK:
            raise SystemExit(f"--url {url}: only loopback addresses are load-tested")
    try:
        figures = run_load(url, args)
    finally:
        if server is not None:
            server[0].send_signal(signal.SIGTERM)
            server[0].wait(60)
    _print(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    if figures["failed"] or figures["lost"]:
        raise SystemExit(1)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="start a server with this checkpoint (on the CPU unless --device)")
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8, help="the started server's decode slots")
    parser.add_argument("--threads", type=int, help="the started server's torch CPU threads (OMP_NUM_THREADS)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0, help="how long clients keep sending")
    parser.add_argument("--max-requests", type=int, default=10_000, help="stop sending after this many")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--api-key", default=os.environ.get("MONKEY_API_KEY"))
    parser.add_argument("--json", help="write every figure here")
    return parser.parse_args()


def _start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    command = [sys.executable, "-m", "monkey_cli", "serve", "--port", "0", "--model", args.model,
               "--device", args.device, "--batch-size", str(args.batch_size),
               "--max-new-tokens", str(args.max_tokens)]  # fmt: skip
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=REPO_ROOT, env=env)
    assert process.stderr is not None
    url = None
    deadline = time.monotonic() + 600
    while url is None and time.monotonic() < deadline:
        line = process.stderr.readline().decode("utf-8", "replace")
        if not line and process.poll() is not None:
            raise SystemExit(f"the server exited ({process.returncode}) while starting")
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        url = match.group(0) if match else None
    threading.Thread(target=process.stderr.read, daemon=True).start()  # keep its pipe drained
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server was not ready in time")


def run_load(url: str, args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    bodies = [_body(page, question, args.max_tokens) for page in PAGES for question in QUESTIONS]
    warm = httpx.post(f"{url}/v1/chat/completions", json={**bodies[0], "stream": False}, headers=headers,
                      timeout=args.request_timeout)  # fmt: skip
    warm.raise_for_status()  # one untimed request: first-use costs (allocating the cache) are not load
    health = httpx.get(f"{url}/health", headers=headers, timeout=30).json()
    tally = Tally()
    stop_at = time.monotonic() + args.seconds
    started = time.monotonic()
    threads = [
        threading.Thread(target=_client, args=(i, url, headers, bodies, stop_at, args, tally), daemon=True)
        for i in range(args.clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(args.seconds + args.request_timeout + 30)
    elapsed = time.monotonic() - started
    after = httpx.get(f"{url}/health", headers=headers, timeout=30).json()
    return _figures(tally, elapsed, args, health, after)


def _body(page: tuple[str, str, int | None], question: str, max_tokens: int) -> dict:
    name, media_type, number = page
    data = base64.b64encode((SAMPLES / name).read_bytes()).decode("ascii")
    url = f"data:{media_type};base64,{data}" + (f"#page={number}" if number else "")
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    return {"model": "monkey", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip


def _client(index: int, url: str, headers: dict, bodies: list[dict], stop_at: float, args, tally: Tally) -> None:
    with httpx.Client(timeout=args.request_timeout, headers=headers) as client:
        turn = index
        while time.monotonic() < stop_at:
            with tally.lock:
                if tally.sent >= args.max_requests:
                    return
                tally.sent += 1
            _one_request(client, f"{url}/v1/chat/completions", bodies[turn % len(bodies)], tally)
            turn += args.clients


def _one_request(client: httpx.Client, url: str, body: dict, tally: Tally) -> None:
    start = time.perf_counter()
    first = None
    tokens = 0
    done = False
    try:
        with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                response.read()
                _count_failure(tally, f"{response.status_code}: {response.text[:200]}")
                return
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    _count_failure(tally, event["error"]["message"])
                    return
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                elif first is None and any(c["delta"].get("content") for c in event["choices"]):
                    first = time.perf_counter() - start
    except (httpx.HTTPError, OSError) as exc:
        with tally.lock:
            tally.lost += 1
            tally.errors.append(f"{type(exc).__name__}: {exc}")
        return
    with tally.lock:
        if not done:
            tally.lost += 1
            tally.errors.append("the stream ended without [DONE]")
            return
        tally.completed += 1
        tally.tokens += tokens
        tally.latencies.append(time.perf_counter() - start)
        if first is not None:
            tally.first_tokens.append(first)


def _count_failure(tally: Tally, message: str) -> None:
    with tally.lock:
        tally.failed += 1
        tally.errors.append(message)


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (`share` in 0..1) of `values`; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, round(share * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def _summary(values: list[float]) -> dict:
    return {name: round(percentile(values, share), 4) for name, share in
            (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))}  # fmt: skip


def _figures(tally: Tally, elapsed: float, args: argparse.Namespace, before: dict, after: dict) -> dict:
    engine_before, engine_after = before.get("engine") or {}, after.get("engine") or {}
    engine = {key: engine_after[key] - engine_before.get(key, 0) for key in engine_after if key != "busiest_step"}
    engine["busiest_step"] = engine_after.get("busiest_step")
    return {
        "clients": args.clients,
        "seconds": args.seconds,
        "max_tokens": args.max_tokens,
        "elapsed_s": round(elapsed, 2),
        "sent": tally.sent,
        "completed": tally.completed,
        "failed": tally.failed,
        "lost": tally.lost,
        "requests_per_s": round(tally.completed / elapsed, 3),
        "tokens_per_s": round(tally.tokens / elapsed, 2),
        "latency_s": _summary(tally.latencies),
        "first_token_s": _summary(tally.first_tokens),
        "engine": engine,
        "server": {key: after.get(key) for key in ("model", "quant", "device", "slots")},
        "threads": getattr(args, "threads", None),
        "errors": tally.errors[:20],
        "machine": {
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
    }


def _print(figures: dict) -> None:
    latency, first = figures["latency_s"], figures["first_token_s"]
    print(
        f"{figures['clients']} clients, {figures['elapsed_s']} s: {figures['completed']} answered, "
        f"{figures['failed']} failed, {figures['lost']} lost; {figures['requests_per_s']} requests/s, "
        f"{figures['tokens_per_s']} tokens/s\n"
        f"latency s: p50 {latency['p50']}  p90 {latency['p90']}  p99 {latency['p99']}  max {latency['max']}\n"
        f"first token s: p50 {first['p50']}  p90 {first['p90']}  p99 {first['p99']}  max {first['max']}\n"
        f"engine: {figures['engine']}"
    )


if __name__ == "__main__":
    main()

"""`monkey serve` compiles and captures before it reports ready (issue 21, finding 3): /health says "warming"
meanwhile and carries the compile report afterwards, and requests of different lengths add no graph."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import SAMPLES_DIR
from serve_helpers import LiveServer, data_url, image_message

pytest.importorskip("fastapi")


def test_the_service_warms_up_before_it_is_ready(tiny_sharp_dir: Path, monkeypatch) -> None:
    """In process: the model is loaded, then the state is "warming" while the engine compiles every bucket,
    then "ready" with the compile report in /health's data."""
    from monkey_cli import Monkey
    from monkey_cli.engine.scheduler import Scheduler
    from monkey_cli.serve.errors import APIError
    from monkey_cli.serve.service import ModelService
    from monkey_cli.serve.settings import ServeSettings

    service = ModelService(
        ServeSettings(model=str(tiny_sharp_dir), slots=1),
        load_model=lambda: Monkey.load(tiny_sharp_dir, device="cpu", batch_size=1, compile=True, max_new_tokens=16),
    )
    seen = {}
    real = Scheduler.warm_up

    def watching(scheduler):
        seen["state"] = service.state
        seen["health"] = service.health()
        with pytest.raises(APIError, match="warming up"):
            service.ready()
        return real(scheduler)

    monkeypatch.setattr(Scheduler, "warm_up", watching)
    try:
        service.load()
        assert seen["state"] == "warming" and seen["health"]["status"] == "warming"
        health = service.health()
        assert health["status"] == "ready"
        report = health["compile"]
        assert report["mode"] == "inductor" and report["warmed"] and report["fallbacks"] == []
        assert report["graphs"] >= 1 and report["recompiles"] == 0 and report["cache_allocations"] == 1
    finally:
        service.close()


def test_requests_of_different_lengths_add_no_graph_through_the_server(tmp_path, tiny_sharp_dir: Path) -> None:
    """A live `monkey serve --compile` (1 slot): ready only once warm; then short and long answers, short and
    long questions: /health shows the same graphs, no recompile and one cache allocation."""
    server = LiveServer(tmp_path, "--model", str(tiny_sharp_dir), "--batch-size", "1", "--compile",
                        "--max-new-tokens", "64").start()  # fmt: skip
    try:
        before = server.health()
        assert before["status"] == "ready" and before["compile"]["mode"] == "inductor"
        url = data_url(SAMPLES_DIR / "chart.png")
        for question, tokens in (("Title?", 2), ("What does the chart show, and what is the largest value?", 60),
                                 ("Total?", 30)):  # fmt: skip
            response = httpx.post(
                f"{server.base}/v1/chat/completions",
                json={"model": "monkey", "messages": [image_message(url, question)], "max_tokens": tokens},
                timeout=300,
            )
            assert response.status_code == 200, response.text
        after = server.health()
        assert after["engine"]["decode_steps"] > before["engine"]["decode_steps"]
        assert after["compile"]["graphs"] == before["compile"]["graphs"]
        assert after["compile"]["recompiles"] == 0 and after["compile"]["cache_allocations"] == 1
    finally:
        server.stop()

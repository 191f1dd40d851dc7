"""`--workers N` progress: a total from the start, documents and pages counted as workers finish them (not
when their records go out in input order), and the `--quant auto` choice said once for all workers."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import require_parity

from monkey_cli.distributed import driver
from monkey_cli.distributed.protocol import DocumentDone, Finished, Received
from monkey_cli.engine import Job
from monkey_cli.output import Record
from monkey_cli.pipeline import ModelOptions, RunOptions


def _record(source: str, page: int) -> Record:
    return Record(source=source, page=page, pages=2, task="caption", prompt="caption", answer=f"{source}{page}",
                  answer_source="model", model="m", quant="none")  # fmt: skip


class _Scripted:
    """A backend whose workers say what the script says, one list of events per step."""

    noun, writes, verbose, device, count = "worker", False, False, "cpu", 2

    def __init__(self, script: list[list], log: list) -> None:
        self.script, self.log = script, log

    def resolve_quant(self, options: RunOptions) -> str:
        self.log.append("planning")
        return "none"

    def fit(self, options: RunOptions, quant: str, count: int) -> tuple[int, None]:
        return count, None  # memory is no concern of a script

    def start(self, setup, count: int) -> None:
        self._window = setup.window

    def step(self, queue) -> list:
        list(queue.deal(["w1", "w2"], 2, self._window))
        return self.script.pop(0)

    def close(self, graceful: bool = True) -> None:
        pass


def test_progress_counts_documents_as_workers_finish_them(tmp_path: Path) -> None:
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    from PIL import Image

    for path in (first, second):
        Image.new("RGB", (8, 8)).save(path)
    a, b = str(first), str(second)
    script = [
        # The second document is done first (its worker was faster) ...
        [Received("w2", 1, _record(b, 1)), Received("w2", 1, _record(b, 2)), Finished("w2", DocumentDone(1, [
            _record(b, 1), _record(b, 2)]))],  # fmt: skip
        # ... then the first, a page at a time.
        [Received("w1", 0, _record(a, 1))],
        [Received("w1", 0, _record(a, 2)), Finished("w1", DocumentDone(0, [_record(a, 1), _record(a, 2)]))],
    ]
    log: list = []
    options = RunOptions(
        inputs=(a, b),
        job=Job(task="caption", questions=(), template=None, max_new_tokens=4, batch_size=1, force_ocr=False),
        model=ModelOptions(source=str(require_parity("tiny-monkey")), device="cpu", quant="auto"),
    )
    summary = driver.run(
        options,
        lambda: _Scripted(script, log),
        on_start=lambda n: log.append(("total", n)),
        on_stage=lambda stage: log.append(("stage", stage)),
        on_page=lambda pages: log.append(("page", pages)),
        on_document=lambda name: log.append(("done", Path(name).name)),
        on_record=lambda record: log.append(("out", Path(record.source).name, record.page)),
    )
    assert log == [
        ("total", 2),  # before the memory plan (which may take a worker's start-up on a GPU)
        "planning",
        ("total", 2),  # after resume: what is left
        ("stage", "starting 2 workers"),
        ("page", 2), ("page", 2), ("done", "b.png"),  # counted when its worker finished, before a.png went out
        ("page", 2), ("out", "a.png", 1),
        ("page", 2), ("done", "a.png"), ("out", "a.png", 2), ("out", "b.png", 1), ("out", "b.png", 2),
    ]  # fmt: skip
    assert (summary.documents, summary.pages) == (2, 4)


def test_the_quant_auto_choice_is_said_once_for_all_workers(caplog: pytest.LogCaptureFixture) -> None:
    """The driver plans --quant auto once and says so; every worker then loads the quantization it chose
    (given explicitly: no worker says it again)."""
    from monkey_cli.distributed.workers import LocalWorkers

    options = RunOptions(
        inputs=("x.png",),
        job=Job(task="caption", questions=(), template=None, max_new_tokens=4, batch_size=1, force_ocr=False),
        model=ModelOptions(source=str(require_parity("tiny-monkey")), device="cpu", quant="auto"),
    )
    with caplog.at_level(logging.INFO, logger="monkey_cli"):
        quant = LocalWorkers(2, "cpu").resolve_quant(options)
    said = [record for record in caplog.records if record.name == "monkey_cli"]
    assert quant == "none" and len(said) == 1
    assert said[0].cli_message.startswith("--quant auto: using --quant none")  # what the CLI prints
    setup = driver._setup(options, quant, {}, LocalWorkers(2, "cpu"))
    assert setup.options.model.quant == "none"  # what each worker loads: explicit, so it logs no choice

"""Pages through the engine: continuous batching over documents keeps every answer and the input order."""

from __future__ import annotations

import pytest
from conftest import SAMPLES_DIR, require_parity

from monkey_cli import Monkey, tasks
from monkey_cli.documents import iter_pages
from monkey_cli.engine import DocumentEnd, Engine, EngineLoop, Job

QUESTIONS = ("What is the title?", "What is the total amount?")
INPUTS = [SAMPLES_DIR / name for name in ("report.pdf", "chart.png", "invoice.pdf", "scan.png")]


@pytest.fixture(scope="module")
def sharp() -> Monkey:
    return Monkey.load(require_parity("tiny-monkey-sharp"), device="cpu", batch_size=3)


def _run(monkey: Monkey, job: Job, loop: EngineLoop | None = None) -> list:
    engine = Engine(job, load_model=lambda: monkey, model_name="tiny", quant="none", loop=loop)
    return list(engine.run(iter_pages(INPUTS, size=monkey.processor.input_size)))


def _expected(monkey: Monkey, job: Job) -> list[tuple[str, int, str, str]]:
    """(source, page, question, answer) of every page and question, each answered alone, in input order."""
    rows = []
    for page in iter_pages(INPUTS, size=monkey.processor.input_size):
        for question in job.questions:
            (answer,) = monkey.generate([page.image], [tasks.vqa_prompt(question)], max_new_tokens=job.max_new_tokens)
            rows.append((page.source, page.page, question, answer))
    return rows


def _answers(events: list) -> list[tuple[str, int, str, str]]:
    return [(r.source, r.page, r.prompt, r.answer) for r in events if not isinstance(r, DocumentEnd)]


def test_records_equal_one_at_a_time_in_input_order(sharp: Monkey) -> None:
    job = Job(task="ask", questions=QUESTIONS, max_new_tokens=10, batch_size=3)
    events = _run(sharp, job)
    assert _answers(events) == _expected(sharp, job)
    # Each document's end comes right after its last record, in input order.
    ends = [i for i, event in enumerate(events) if isinstance(event, DocumentEnd)]
    assert [events[i].source for i in ends] == [str(path) for path in INPUTS]
    for i in ends:
        assert events[i - 1].source == events[i].source
    assert len({answer for *_, answer in _answers(events)}) > 2, "answers should differ, or the test proves little"


def test_a_loop_driven_engine_gives_the_same_records(sharp: Monkey) -> None:
    job = Job(task="ask", questions=QUESTIONS, max_new_tokens=10, batch_size=3)
    loop = EngineLoop(sharp.scheduler(3))
    try:
        driven = _run(sharp, job, loop=loop)
    finally:
        loop.close()
    assert _answers(driven) == _answers(_run(sharp, job))


def test_questions_of_a_page_share_its_image_prefix(sharp: Monkey) -> None:
    job = Job(task="ask", questions=QUESTIONS + ("Who wrote it?",), max_new_tokens=4, batch_size=3)
    scheduler = sharp.scheduler(3)
    before = (scheduler.stats.prefix_prefills, scheduler.stats.prefix_reuses, scheduler.stats.images_encoded)
    events = _run(sharp, job)
    pages = len({(r.source, r.page) for r in events if not isinstance(r, DocumentEnd)})
    prefixes = scheduler.stats.prefix_prefills - before[0]
    reuses = scheduler.stats.prefix_reuses - before[1]
    assert prefixes == pages and reuses == 3 * pages
    assert scheduler.stats.images_encoded - before[2] == pages

"""`--workers N`: worker processes on this machine (monkey_cli.distributed), checked on the CPU.

Each run is `python -m monkey_cli` in a subprocess on a folder of mixed documents (PDFs, a multi-frame TIFF,
images in a subfolder) with tiny-monkey-sharp, whose answers differ from page to page, so a record that went
to the wrong document or page would show. Crashes are made exact with the test hooks of
`monkey_cli.distributed.worker` (a worker SIGKILLs itself at a chosen document; a log of what each worker
started), and also done from outside, by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path, PurePosixPath

import pytest
from conftest import SAMPLES_DIR, require_parity

from monkey_cli.distributed.protocol import Task
from monkey_cli.distributed.queue import DocumentQueue
from monkey_cli.documents import Source
from monkey_cli.engine.pages import DocumentEnd
from monkey_cli.output import Record

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # far above a run's normal time: a hang fails the test instead of holding up CI
COLOURS = {"red": (255, 0, 0), "black": (0, 0, 0), "white": (255, 255, 255), "blue": (0, 128, 255)}


# --- helpers ----------------------------------------------------------------------------------------------


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra or {})
    return env


def model() -> str:
    return str(require_parity("tiny-monkey-sharp"))


def command(folder: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "monkey_cli", "caption", str(folder), "--model", model(), "--device", "cpu",
            "--max-new-tokens", "6", *map(str, args)]  # fmt: skip


def monkey(folder: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(folder, *args), capture_output=True, text=True, timeout=TIMEOUT_S, env=_env(env))


def records(stdout: str) -> list[dict]:
    """JSONL records without their timings (the only field that differs between two runs)."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in stdout.splitlines()]


def files(out: Path) -> dict[str, bytes]:
    """Every output file's bytes, by path (the manifest and work folders aside)."""
    return {
        str(path.relative_to(out)): path.read_bytes()
        for path in sorted(out.rglob("*"))
        if path.is_file() and not path.relative_to(out).parts[0].startswith(".monkey")
    }


def manifest_entries(out: Path) -> dict:
    return json.loads((out / ".monkey-manifest.json").read_text())["entries"]


def started(log: Path) -> list[tuple[int, int, str]]:
    """The worker log: (pid, attempt, document) per document a worker started."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [(int(pid), int(attempt), name) for pid, attempt, name in (line.split(" ", 2) for line in lines)]


def children(pid: int, workers_only: bool = True) -> list[int]:
    """Live child processes of `pid` (Linux /proc): its worker processes, or also multiprocessing's resource
    tracker (which the spawn context starts beside them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z" and (not workers_only or b"spawn_main" in cmdline):
                found.append(int(entry.name))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> Path:
    """Seven mixed documents, eleven pages: PDFs (three pages, one page), a three-frame TIFF, a chart, and
    solid-colour images in a subfolder (each colour gets an answer of its own from tiny-monkey-sharp)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("mixed")
    for name in ("report.pdf", "invoice.pdf", "forms.tif", "chart.png"):
        shutil.copy(SAMPLES_DIR / name, folder / name)
    (folder / "colours").mkdir()
    for name, colour in list(COLOURS.items())[:3]:
        Image.new("RGB", (120, 90), colour).save(folder / "colours" / f"{name}.png")
    return folder


def single_process(folder: Path, *args: str) -> tuple[str, str]:
    """The same command in this process, `--workers 1` (fast: torch is imported already); stdout, stderr."""
    from hostile import cli

    result = cli(*command(folder, "--workers", "1", *args)[3:])
    assert result.exit_code == 0, result.stderr
    return result.stdout, result.stderr


@pytest.fixture(scope="module")
def single(documents, tmp_path_factory) -> dict:
    """The single-process run: its JSONL records, and its --out files and manifest."""
    listed, _ = single_process(documents, "-f", "jsonl")
    out = tmp_path_factory.mktemp("single") / "out"
    single_process(documents, "--out", str(out))
    answers = {r["answer"] for r in records(listed)}
    assert len(answers) >= 4, "the checkpoint should answer differently per page for these tests to mean much"
    return {"records": records(listed), "files": files(out), "entries": manifest_entries(out)}


# --- the queue ---------------------------------------------------------------------------------------------


def _tasks(*names: str) -> list[Task]:
    return [Task(index, Source(name)) for index, name in enumerate(names)]


def _record(source: str, page: int, answer: str = "a") -> Record:
    return Record(source=source, page=page, pages=2, task="caption", prompt="p", answer=answer, model="m", quant="none")


def test_the_queue_releases_in_input_order_whatever_order_documents_finish_in():
    queue = DocumentQueue(_tasks("a", "b", "c"))
    assert [queue.take("w1").index, queue.take("w2").index, queue.take("w1").index] == [0, 1, 2]
    queue.finish("w2", 1, [_record("b", 1)])
    queue.finish("w1", 2, [_record("c", 1)])
    assert list(queue.release()) == []  # a is not done: nothing after it may go out
    queue.add_record("w1", 0, _record("a", 1))
    assert [r.source for r in queue.release()] == ["a"]  # the first document streams as its pages come
    queue.finish("w1", 0, [_record("a", 1), _record("a", 2)])
    released = list(queue.release())
    assert [(e.source, getattr(e, "page", "end")) for e in released] == [
        ("a", 2), ("a", "end"), ("b", 1), ("b", "end"), ("c", 1), ("c", "end")
    ]  # fmt: skip
    assert isinstance(released[1], DocumentEnd) and queue.finished


def test_a_lost_document_is_retried_once_alone_then_given_up():
    queue = DocumentQueue(_tasks("a", "b", "c", "d"))
    assert [queue.take("w1").index, queue.take("w1").index, queue.take("w3").index] == [0, 1, 2]
    queue.add_record("w1", 0, _record("a", 1, "from the first try"))
    assert [r.answer for r in queue.release()] == ["from the first try"]
    assert queue.lose("w1", 0) is None and queue.lose("w1", 1) is None  # both go back for one more try
    assert queue.take("w3") is None, "a retry waits for a free worker, and first tries wait for the retries"
    retry = queue.take("w2")
    assert (retry.index, retry.attempt) == (0, 1)
    assert queue.take("w2") is None, "a retried document runs alone"
    assert queue.take("w1").index == 1  # free again: it takes the other retry
    assert queue.take("w3").index == 3  # the retries are placed: first tries go on
    queue.add_record("w2", 0, _record("a", 1, "again"))
    assert list(queue.release()) == [], "a record released from the first try is not released twice"
    given_up = queue.lose("w2", 0)
    assert given_up is not None and given_up.index == 0  # a second loss: no third try
    error = Record.failure(error="died twice", source="a", page=None, pages=None, task="caption", prompt="p",
                           model="m", quant="none")  # fmt: skip
    queue.fail(0, [error])
    assert [r.answer or r.error for r in queue.release() if isinstance(r, Record)] == ["died twice"]
    assert queue.finish("w2", 0, []) is False, "a document given up cannot be finished by a late result"


def test_a_late_result_from_a_lost_worker_is_ignored():
    queue = DocumentQueue(_tasks("a"))
    queue.take("w1")
    queue.lose("w1", 0)
    queue.take("w2")
    assert queue.finish("w1", 0, [_record("a", 1, "stale")]) is False
    assert queue.finish("w2", 0, [_record("a", 1, "fresh")]) is True
    assert [r.answer for r in queue.release() if isinstance(r, Record)] == ["fresh"]


def test_a_worker_holds_no_more_than_its_share_of_what_is_left():
    queue = DocumentQueue(_tasks(*"abcdefg"))
    assert queue.fair_share(workers=2, window=8) == 4
    assert queue.fair_share(workers=2, window=3) == 3
    for _ in range(6):
        queue.finish("w", queue.take("w").index, [])
    assert queue.fair_share(workers=4, window=8) == 1



def test_documents_are_dealt_in_turn_up_to_each_share():
    """Ready workers get one document each in turn, never more than their share; a busy worker gets none."""
    queue = DocumentQueue(_tasks(*"abcdefg"))
    dealt = [(worker, task.index) for worker, task in queue.deal(["w1", "w2"], workers=3, window=8)]
    assert dealt == [("w1", 0), ("w2", 1), ("w1", 2), ("w2", 3), ("w1", 4), ("w2", 5)]  # share: ceil(7/3) = 3
    assert [(worker, task.index) for worker, task in queue.deal(["w3"], workers=3, window=8)] == [("w3", 6)]
    assert list(queue.deal(["w1", "w2", "w3"], workers=3, window=8)) == []

# --- engines sharing one model ------------------------------------------------------------------------------


def test_engines_sharing_a_model_keep_their_pages_apart(tmp_path):
    """A worker runs one Engine per document on one model and one EngineLoop. Image features are cached by
    page key in the model's scheduler: keys numbered per engine made the second document reuse the first
    one's features (the same answer for a red and a black page)."""
    from PIL import Image

    from monkey_cli import Monkey
    from monkey_cli.documents import iter_pages
    from monkey_cli.engine import Engine, EngineLoop, Job

    monkey = Monkey.load(model(), device="cpu")
    job = Job(task="caption", max_new_tokens=6)
    paths = []
    for name in ("red", "black"):
        paths.append(tmp_path / f"{name}.png")
        Image.new("RGB", (64, 64), COLOURS[name]).save(paths[-1])

    def answers(path: Path, loop=None) -> list[str]:
        engine = Engine(job, load_model=lambda: monkey, model_name="m", quant="none", loop=loop)
        return [r.answer for r in engine.run(iter_pages([path])) if isinstance(r, Record)]

    one_after_the_other = [answers(path) for path in paths]
    assert one_after_the_other[0] != one_after_the_other[1]
    loop = EngineLoop(monkey.scheduler(4))
    together: dict[int, list[str]] = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, answers(paths[i], loop))) for i in (0, 1)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT_S)
    finally:
        loop.close()
    assert [together[0], together[1]] == one_after_the_other


# --- options -------------------------------------------------------------------------------------------------


def test_bad_workers_and_ray_values_are_usage_errors(tmp_path):
    from hostile import cli

    for args, expected in [
        (["--workers", "0"], "error: --workers must be auto or a positive integer; got '0'"),
        (["--workers", "many"], "error: --workers must be auto or a positive integer; got 'many'"),
        (["--ray=not an address"], "error: --ray must be auto, local or HOST:PORT"),
    ]:
        result = cli("caption", tmp_path, *args)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr
    from_env = cli("caption", tmp_path, env={"MONKEY_WORKERS": "-3"})
    assert from_env.exit_code == 2 and "--workers (from $MONKEY_WORKERS) must be" in from_env.stderr


def test_ray_takes_the_next_word_as_its_address_only_when_it_reads_as_one():
    from monkey_cli.cli.options import bare_ray_flag

    assert bare_ray_flag(["docs/", "--ray"]) == ["docs/", "--ray="]
    assert bare_ray_flag(["--ray", "docs/"]) == ["--ray=", "docs/"]
    assert bare_ray_flag(["--ray", "--workers", "2", "a"]) == ["--ray=", "--workers", "2", "a"]
    assert bare_ray_flag(["--ray", "auto", "a"]) == ["--ray", "auto", "a"]
    assert bare_ray_flag(["--ray", "10.0.0.5:6379", "a"]) == ["--ray", "10.0.0.5:6379", "a"]
    assert bare_ray_flag(["--ray", "ray://head.example:10001"]) == ["--ray", "ray://head.example:10001"]
    assert bare_ray_flag(["--", "--ray"]) == ["--", "--ray"]  # after --, an input named --ray


def test_without_ray_installed_ray_is_a_one_line_error(tmp_path):
    """`import ray` fails as it does where the extra is not installed; nothing else of the run happens."""
    image = tmp_path / "red.png"
    from PIL import Image

    Image.new("RGB", (32, 32), COLOURS["red"]).save(image)
    code = (
        "import sys; sys.modules['ray'] = None\n"  # makes `import ray` raise ImportError
        "from monkey_cli.__main__ import main\n"
        f"sys.argv = ['monkey', 'caption', {str(image)!r}, '--model', {model()!r}, '--device', 'cpu', '--ray']\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S, env=_env())
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: monkey caption needs the 'ray' extra (ray is not installed): pip install 'monkey-cli[ray]'"
    ]
    assert result.stdout == ""


def test_auto_is_one_worker_without_a_gpu_and_cpu_workers_share_the_cores(monkeypatch):
    from monkey_cli.distributed import ScaleOptions, worker_count, workers

    monkeypatch.setattr(workers, "visible_gpus", lambda: [])
    assert worker_count(ScaleOptions(), "auto", ("docs/",)) == 1
    assert worker_count(ScaleOptions(workers=3), "cpu", ("docs/",)) == 3
    monkeypatch.setattr(workers, "visible_gpus", lambda: ["0", "1", "2"])
    assert worker_count(ScaleOptions(), "auto", ("docs/",)) == 3  # one per GPU
    assert worker_count(ScaleOptions(), "cuda:1", ("docs/",)) == 1  # the user named one GPU
    assert worker_count(ScaleOptions(), "cpu", ("docs/",)) == 1
    monkeypatch.setattr(workers, "cpu_count", lambda: 16)
    places = workers.placements(4, "auto")
    assert [(p.gpu, p.threads) for p in places] == [("0", 4), ("1", 4), ("2", 4), ("0", 4)]
    assert {p.gpu for p in workers.placements(2, "cuda:2")} == {"2"}
    monkeypatch.setattr(workers, "visible_gpus", lambda: [])
    assert [(p.gpu, p.threads) for p in workers.placements(3, "auto")] == [(None, 5)] * 3


# --- runs ----------------------------------------------------------------------------------------------------


def test_two_workers_give_the_same_records_and_files_as_one(documents, single, tmp_path):
    """The acceptance test: same answers in the same order on stdout, the same --out files (byte for byte)
    and the same manifest entries (input hash, settings fingerprint, output hash, status)."""
    listed = monkey(documents, "--workers", "2", "-f", "jsonl")
    assert listed.returncode == 0, listed.stderr
    assert records(listed.stdout) == single["records"]
    assert "7 documents, 11 pages, 0 failed" in listed.stderr
    out = tmp_path / "out"
    written = monkey(documents, "--workers", "2", "--out", out)
    assert written.returncode == 0, written.stderr
    assert written.stdout == ""
    assert files(out) == single["files"]
    assert manifest_entries(out) == single["entries"]
    assert not list(out.glob(".monkey-work-*")), "the run's work folder is removed"


def test_a_worker_killed_mid_document_is_replaced_and_nothing_is_lost_or_redone(documents, single, tmp_path):
    """Worker 1 dies (SIGKILL) at report.pdf's first page: what it held is redone, once, by other workers;
    every document is written once and equals the single-process run; a rerun skips them all."""
    out, log = tmp_path / "out", tmp_path / "started.log"
    hooks = {"MONKEY_TEST_KILL_WORKER": "report.pdf", "MONKEY_TEST_WORKER_LOG": str(log)}
    result = monkey(documents, "--workers", "2", "--out", out, env=hooks)
    assert result.returncode == 0, result.stderr
    deaths = [line for line in result.stderr.splitlines() if "was killed by SIGKILL" in line]
    assert len(deaths) == 1 and "go back to the queue; a new worker takes its place" in deaths[0], result.stderr
    assert "7 documents, 11 pages, 0 failed" in result.stderr
    assert files(out) == single["files"] and manifest_entries(out) == single["entries"]

    runs = started(log)
    killed = next(pid for pid, attempt, name in runs if name.endswith("report.pdf") and attempt == 0)
    retried = {name: pid for pid, attempt, name in runs if attempt == 1}
    assert any(name.endswith("report.pdf") for name in retried) and killed not in retried.values()
    first_tries = [(pid, name) for pid, attempt, name in runs if attempt == 0]
    assert sorted(name for _, name in first_tries) == sorted({name for _, name in first_tries}), "tried once each"
    for name in retried:  # only documents the dead worker held come back, and only once
        assert (killed, name) in first_tries
        assert [n for _, a, n in runs].count(name) == 2

    again = monkey(documents, "--workers", "2", "--out", out, env={"MONKEY_TEST_WORKER_LOG": str(log)})
    assert again.returncode == 0, again.stderr
    assert "0 documents, 0 pages, 0 failed, 7 already done" in again.stderr
    assert started(log) == runs, "a rerun starts no document (and no worker)"


def test_a_worker_killed_from_outside_loses_nothing(documents, single, tmp_path):
    """The same with a real SIGKILL by pid, at a moment the test does not choose exactly (once the first
    document is written)."""
    out = tmp_path / "out"
    process = subprocess.Popen(command(documents, "--workers", "2", "--out", out), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_env())  # fmt: skip
    try:
        wait_for(lambda: files(out) if out.exists() else False, "the first output file")
        workers = children(process.pid)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert f"(pid {workers[0]}) was killed by SIGKILL" in stderr
    assert "0 failed" in stderr and stdout == ""
    assert files(out) == single["files"] and manifest_entries(out) == single["entries"]
    assert not any(alive(pid) for pid in workers)


def test_a_document_that_kills_two_workers_is_an_error_naming_the_cause(documents, single, tmp_path):
    """report.pdf kills every worker that reads it: tried twice, then an error naming the cause (exit 1);
    every other document is written as in one process; report.pdf's manifest entry records the error as
    one of the moment, so a rerun tries it again, and only it."""
    out, log = tmp_path / "out", tmp_path / "started.log"
    result = monkey(documents, "--workers", "2", "--out", out, env={"MONKEY_TEST_KILL_WORKER": "report.pdf:always"})
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {documents / 'report.pdf'}: not done: tried twice, "
                                                     "and both times its worker died (worker "), errors  # fmt: skip
    assert errors[0].count("was killed by SIGKILL") == 2
    assert "7 documents, 8 pages, 1 failed" in result.stderr
    entry = manifest_entries(out)["report.pdf.txt"]
    assert entry["status"] == "incomplete" and entry["errors"] == [errors[0].split(": ", 2)[2]]
    written = files(out)
    assert {name: data for name, data in written.items() if name != "report.pdf.txt"} == {
        name: data for name, data in single["files"].items() if name != "report.pdf.txt"
    }
    again = monkey(documents, "--workers", "2", "--out", out, env={"MONKEY_TEST_WORKER_LOG": str(log)})
    assert again.returncode == 0, again.stderr
    assert [name for _, _, name in started(log)] == [str(documents / "report.pdf")]
    assert files(out) == single["files"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_every_worker_and_keeps_what_is_finished(documents, single, tmp_path, signum):
    out = tmp_path / "out"
    process = subprocess.Popen(command(documents, "--workers", "2", "--out", out), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_env())  # fmt: skip
    try:
        wait_for(lambda: files(out) if out.exists() else False, "the first output file")
        assert len(children(process.pid)) == 2
        workers = children(process.pid, workers_only=False)  # with multiprocessing's resource tracker
        process.send_signal(signum)
        _stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr and "finished documents are saved" in stderr
    wait_for(lambda: not any(alive(pid) for pid in workers), "the workers to end", timeout=10)
    written = files(out)
    assert written and all(single["files"][name] == data for name, data in written.items())
    assert not list(out.glob(".monkey-work-*"))


def test_workers_end_with_their_driver_even_when_it_is_killed(documents, tmp_path):
    process = subprocess.Popen(command(documents, "--workers", "2", "--out", tmp_path / "out"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())  # fmt: skip
    try:
        wait_for(lambda: len(children(process.pid)) == 2, "two workers")
        workers = children(process.pid, workers_only=False)
        process.kill()  # SIGKILL: no clean-up of any kind in the driver
        process.wait(timeout=10)
    finally:
        process.kill()
    wait_for(lambda: not any(alive(pid) for pid in workers), "the orphaned workers to exit", timeout=30)


def test_progress_counts_every_worker_and_leaves_nothing_behind(documents):
    """On a terminal the status line names the workers starting, then counts all workers' documents and
    pages together; nothing of it stays on the screen."""
    from test_cli_terminal import _run_on_a_terminal, _screen

    code, raw = _run_on_a_terminal(command(documents, "--workers", "2")[3:])
    assert code == 0, raw
    for stage in ("starting 2 workers", "loading the model", "answering"):
        assert stage in raw, stage
    assert "/7 documents" in raw and "pages/s" in raw
    assert raw.count("--quant auto: using --quant none") == 1  # said by the driver, for every worker
    screen = [line.rstrip() for line in _screen(raw)]
    assert not [line for line in screen if "pages/s" in line or "documents ·" in line], screen
    assert screen[-1].startswith("7 documents, 11 pages, 0 failed")


def test_a_second_attempt_keeps_the_file_its_first_attempt_wrote(tmp_path):
    """A Ray actor writes its documents itself and can die between writing one and saying so: the retry finds
    the file done (same input, same settings, intact) and does not redo it; with --overwrite it redoes it."""
    import dataclasses

    from PIL import Image

    from monkey_cli import documents
    from monkey_cli.distributed.protocol import Setup
    from monkey_cli.distributed.worker import DocumentWorker
    from monkey_cli.engine import Job
    from monkey_cli.pipeline import ModelOptions, RunOptions, _settings

    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), COLOURS["red"]).save(image)
    out = tmp_path / "out"
    options = RunOptions(inputs=(str(image),), job=Job(task="caption", max_new_tokens=4),
                         model=ModelOptions(source=model(), device="cpu", quant="none"), out_dir=out)  # fmt: skip
    setup = Setup(options=options, quant="none", device="cpu", size=(896, 896), settings=_settings(options, "none"),
                  write=True, window=2, cwd=str(tmp_path))  # fmt: skip
    source = documents.expand_inputs([str(image)])[0]
    task = Task(0, source, target=PurePosixPath("red.png.txt"), sha256=documents.source_sha256(source))
    worker = DocumentWorker(setup)
    try:
        first = worker.process(task)
        assert first.written == out / "red.png.txt" and len(first.records) == 1 and first.records[0].answer
        written = first.written.read_bytes()
        again = worker.process(dataclasses.replace(task, attempt=1))
        assert again.already_written and again.records == [] and again.written is None
        assert (out / "red.png.txt").read_bytes() == written
    finally:
        worker.close()
    overwriting = DocumentWorker(dataclasses.replace(setup, options=dataclasses.replace(options, overwrite=True)))
    try:
        redone = overwriting.process(dataclasses.replace(task, attempt=1))
        assert not redone.already_written and [r.answer for r in redone.records] == [first.records[0].answer]
    finally:
        overwriting.close()
    assert not list(out.glob(".monkey-work-*")), "each worker removed its work folder when closed"


def test_ray_actors_are_sized_from_the_cluster():
    """One actor per GPU with its node's share of CPUs; without GPUs one per node (or N sharing the CPUs)."""
    from monkey_cli.distributed.ray_runner import _actor_plan
    from monkey_cli.errors import UsageError

    class FakeRay:
        def __init__(self, *nodes: dict) -> None:
            self._nodes = [{"Alive": True, "Resources": node} for node in nodes]

        def nodes(self) -> list[dict]:
            return self._nodes

    gpu_cluster = FakeRay({"CPU": 32, "GPU": 8}, {"CPU": 16, "GPU": 2}, {"CPU": 64})
    assert _actor_plan(gpu_cluster, None, "auto") == (10, {"num_gpus": 1.0, "num_cpus": 4}, "cuda:0")
    assert _actor_plan(gpu_cluster, 20, "auto") == (20, {"num_gpus": 0.5, "num_cpus": 4}, "cuda:0")
    assert _actor_plan(gpu_cluster, None, "cpu") == (3, {"num_cpus": 16}, "cpu")
    cpu_cluster = FakeRay({"CPU": 2})
    assert _actor_plan(cpu_cluster, None, "auto") == (1, {"num_cpus": 2}, "cpu")
    assert _actor_plan(cpu_cluster, 2, "auto") == (2, {"num_cpus": 1}, "cpu")
    with pytest.raises(UsageError, match="--device cuda: the Ray cluster has no GPU"):
        _actor_plan(cpu_cluster, None, "cuda")

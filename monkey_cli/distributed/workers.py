"""Worker processes on this machine: one per GPU (pinned with CUDA_VISIBLE_DEVICES), or N on the CPU.

Each worker is a fresh interpreter (multiprocessing's spawn context: no CUDA state or threads inherited)
with its own model, talking to the driver over one pipe. The driver sends it the run's `Setup`, then whole
documents, a few more than it works on (`Setup.window`), and it sends back each record as it is ready and
each document when it is complete; the driver writes the outputs.

A worker never outlives the driver: it exits when the driver's end of its pipe closes or the driver process
ends (it watches the driver's sentinel), and it ignores the terminal's SIGINT and SIGHUP, which the driver
handles for everyone (stopping the workers). A worker that dies (the out-of-memory killer, a signal, a crash)
is replaced in its slot, unless its slot's workers keep dying without finishing a document (3 in a row);
its unfinished documents go back to the queue (see `queue.DocumentQueue`).
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import pickle
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from monkey_cli import pipeline
from monkey_cli.distributed.protocol import (
    Finished,
    Lost,
    Note,
    NoWorkers,
    Placement,
    Received,
    Setup,
    Stage,
    Task,
)
from monkey_cli.distributed.queue import DocumentQueue
from monkey_cli.errors import MonkeyError, UsageError

DEATHS_IN_A_ROW = 3  # a slot whose workers die this many times without finishing a document is given up
_STOP_GRACE_S = 10.0
_POLL_S = 1.0
_TERMINAL_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGHUP") if hasattr(signal, name))
_HANDLED_SIGNALS = (*_TERMINAL_SIGNALS, signal.SIGTERM)


def visible_gpus() -> list[str]:
    """The CUDA devices this process sees, as the CUDA_VISIBLE_DEVICES entries that pin a child to each."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    listed = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    return listed[:count] if listed else [str(index) for index in range(count)]


def cpu_count() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_memory(options: pipeline.RunOptions, quant: str) -> int:
    """Bytes one CPU worker's model is planned to take: the memory plan `Monkey.load` makes on the CPU for the
    run's quantization, dtype and answer length, with --batch-size as it lowers it (runtime overhead
    included); 0 when nothing fits (loading says so)."""
    from monkey_cli.api import Monkey
    from monkey_cli.model.memory import MemoryBudgetError

    model, job = options.model, options.job
    try:
        choice = Monkey.choose(
            model.source, device="cpu", dtype=model.dtype, quant=None if quant == "auto" else quant,
            quant_vision=model.quant_vision, batch_size=job.batch_size, max_new_tokens=job.max_new_tokens,
        )  # fmt: skip
    except MemoryBudgetError:
        return 0
    return choice.plan.total_bytes


def memory_cap(count: int, per_worker: int, budget: int | None, where: str) -> tuple[int, str | None]:
    """How many workers of `per_worker` bytes fit in `budget` (at least 1; `count` when the budget is
    unknown), and the line that says so when that is fewer than `count`."""
    if budget is None or per_worker <= 0 or count * per_worker <= budget:
        return count, None
    from monkey_cli.model.memory import format_bytes

    fits = max(1, budget // per_worker)
    note = (
        f"--workers {count} lowered to {fits}: what fits in the {format_bytes(budget)} available {where} "
        f"(each worker holds its own model: about {format_bytes(per_worker)})"
    )
    return fits, note


def placements(count: int, device: str) -> list[Placement]:
    """Where `count` workers run for `--device`: round-robin over the visible GPUs (auto, cuda), all on one
    (cuda:N), or the CPU (cpu, or auto without a GPU); each gets an equal share of the CPU threads."""
    gpus = [] if device == "cpu" else visible_gpus()
    if device.startswith("cuda:"):
        index = int(device.removeprefix("cuda:"))
        if index >= len(gpus):
            raise UsageError(f"--device {device}: there are {len(gpus)} visible CUDA device(s)")
        gpus = [gpus[index]]
    elif device == "cuda" and not gpus:
        raise UsageError("--device cuda: no CUDA device is visible")
    threads = max(1, cpu_count() // count)
    return [Placement(slot, gpus[(slot - 1) % len(gpus)] if gpus else None, threads) for slot in range(1, count + 1)]


@dataclass
class _Worker:
    id: int
    place: Placement
    process: Any
    conn: Connection
    ready: bool = False  # it has the run's setup


class LocalWorkers:
    """The backend for `--workers N`: N processes on this machine (see the module doc)."""

    noun = "worker"
    writes = False  # the driver writes every output (one writer for the manifest)

    def __init__(self, count: int, device: str, verbose: bool = False) -> None:
        self.count = count
        self.verbose = verbose
        self._places = placements(count, device)
        self.device = "cpu" if self._places[0].gpu is None else "cuda:0"  # inside a pinned worker
        self._context = multiprocessing.get_context("spawn")
        self._ids = itertools.count(1)
        self._live: dict[int, _Worker] = {}
        self._setup: Setup | None = None
        self._deaths_in_a_row: dict[int, int] = {}
        self._early: list[Any] = []  # what a worker said while the memory plan was made
        self._last_cause = "worker died"

    # --- before the run -------------------------------------------------------------------------------
    def resolve_quant(self, options: pipeline.RunOptions) -> str:
        """The quantization every worker loads with (decided once: the same model everywhere)."""
        model, job = options.model, options.job
        if model.quant not in (None, "auto"):
            return model.quant
        if self.device == "cpu":
            quant, choice = pipeline.quant_choice(model, job, "cpu")
            said_once(choice)
            return quant
        # The memory plan for --quant auto needs a GPU's free memory: the first worker makes it, so that this
        # process never holds a CUDA context (memory on a GPU that a worker needs).
        worker = self._spawn(self._places[0])
        self._send(worker, ("plan", model, job))
        while True:
            for message in self._messages(worker, timeout=_POLL_S):
                if message[0] == "plan":
                    said_once(message[2])
                    return message[1]
                self._early.extend(self._events(worker, message))
            if worker.conn.closed:
                worker.process.join(timeout=5)
                raise MonkeyError(f"{worker.place.describe()} {self._death_cause(worker)} while planning memory")

    def fit(self, options: pipeline.RunOptions, quant: str, count: int) -> tuple[int, str | None]:
        """`count` workers, lowered to what fits in this machine's memory, and the line that says so. On the
        CPU every worker holds its own copy of the model in RAM; on GPUs each worker's own memory plan
        quantizes or refuses when its GPU is full."""
        if self.device != "cpu":
            return count, None
        from monkey_cli.model.memory import available_ram

        fits, note = memory_cap(count, worker_memory(options, quant), available_ram(), "in RAM")
        if fits < count:
            self.count = fits
            self._places = placements(fits, "cpu")  # fewer workers: more CPU threads for each
        return fits, note

    def start(self, setup: Setup, count: int) -> None:
        self._setup = setup
        running = {worker.place.slot for worker in self._live.values()}
        for place in self._places[:count]:
            if place.slot not in running:
                self._spawn(place)
        for worker in self._live.values():
            self._send(worker, ("setup", setup))
            worker.ready = True

    # --- the run --------------------------------------------------------------------------------------
    def step(self, queue: DocumentQueue) -> list[Any]:
        """Hand out documents, then wait (at most a second) for what the workers say; returns the events."""
        events, self._early = self._early, []
        self._dispatch(queue)
        live = list(self._live.values())
        ready = set(wait([w.conn for w in live] + [w.process.sentinel for w in live], timeout=_POLL_S))
        for worker in live:
            if worker.conn not in ready and worker.process.sentinel not in ready:
                continue
            for message in self._messages(worker):
                events += self._events(worker, message)
            if not worker.process.is_alive() or worker.conn.closed:
                events += self._bury(worker, queue)
        if not self._live and queue.unfinished:
            events.append(NoWorkers(f"the last {self._last_cause}"))
        return events

    def _dispatch(self, queue: DocumentQueue) -> None:
        assert self._setup is not None
        ready = [worker.id for worker in self._live.values() if worker.ready]
        for worker_id, task in queue.deal(ready, len(self._live), self._setup.window):
            self._send(self._live[worker_id], ("task", task))

    def _messages(self, worker: _Worker, timeout: float = 0.0) -> list[Any]:
        """What `worker` has sent (waiting up to `timeout` for the first); its pipe is closed at its end."""
        messages = []
        try:
            if worker.conn.poll(timeout):
                while worker.conn.poll():
                    messages.append(worker.conn.recv())
        except (EOFError, OSError):
            worker.conn.close()
        return messages

    def _events(self, worker: _Worker, message: tuple[Any, ...]) -> list[Any]:
        kind = message[0]
        if kind == "record":
            return [Received(worker.id, message[1], message[2])]
        if kind == "done":
            self._deaths_in_a_row[worker.place.slot] = 0
            return [Finished(worker.id, message[1])]
        if kind == "lost":
            return [Lost(worker.id, message[1], f"{worker.place.describe()} failed: {message[2]}")]
        if kind == "note":
            return [message[1]]
        if kind == "stage":
            return [Stage(message[1])]
        if kind == "fatal":  # the model cannot load (or the like): the run stops, as it would in one process
            raise message[1]
        raise RuntimeError(f"unexpected message from {worker.place.describe()}: {kind!r}")

    def _bury(self, worker: _Worker, queue: DocumentQueue) -> list[Any]:
        """A worker died: its unfinished documents go back to the queue; a new worker takes its slot."""
        del self._live[worker.id]
        worker.process.join(timeout=5)
        worker.conn.close()
        cause = f"{worker.place.describe()} (pid {worker.process.pid}) {self._death_cause(worker)}"
        self._last_cause = cause
        held = queue.held(worker.id)
        slot = worker.place.slot
        self._deaths_in_a_row[slot] = self._deaths_in_a_row.get(slot, 0) + 1
        work_left = bool(held or queue.waiting)
        replaced = work_left and self._deaths_in_a_row[slot] < DEATHS_IN_A_ROW
        if replaced:
            then = "a new worker takes its place"
        elif work_left:
            then = "it is not replaced: its slot keeps failing"
        else:
            then = "nothing is left for a new one"
        events: list[Any] = [Note(f"{cause}; {len(held)} unfinished document(s) go back to the queue; {then}", True)]
        events += [Lost(worker.id, index, cause) for index in held]
        if replaced:
            new = self._spawn(worker.place)
            self._send(new, ("setup", self._setup))
            new.ready = True
        return events

    def _death_cause(self, worker: _Worker) -> str:
        code = worker.process.exitcode
        if code is None or code >= 0:
            return f"exited (status {code})"
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        if -code == signal.SIGKILL:
            return "was killed by SIGKILL (as the out-of-memory killer does)"
        return f"was killed by {name}"

    # --- processes ------------------------------------------------------------------------------------
    def _spawn(self, place: Placement) -> _Worker:
        ours, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main, args=(theirs, place, self.verbose), name=f"monkey-worker-{place.slot}"
        )
        # The child starts with the signals held (it ignores the terminal's before it lets them in), and an
        # interrupt here waits until the worker is registered, so that closing stops it.
        with _signals_held():
            process.start()
            theirs.close()  # the worker's end lives in the worker alone: its death closes the pipe
            worker = _Worker(next(self._ids), place, process, ours)
            self._live[worker.id] = worker
        return worker

    def _send(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError, ValueError):  # it died: the next step buries it, requeues what it held
            worker.conn.send(message)

    def close(self, graceful: bool = True) -> None:
        """Stop every worker: asked to (it finishes nothing more: there is nothing left) and given a moment,
        else (an interrupt, an error) at once; none is left running."""
        workers = list(self._live.values())
        self._live.clear()
        if graceful:
            for worker in workers:
                self._send(worker, ("stop",))
            deadline = time.monotonic() + _STOP_GRACE_S
            for worker in workers:
                worker.process.join(max(0.0, deadline - time.monotonic()))
        for worker in workers:
            if worker.process.is_alive():
                worker.process.terminate()
        for worker in workers:
            worker.process.join(2)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()


def said_once(choice: Any) -> None:
    """The --quant auto choice, said by the driver for every worker (each then loads what it names)."""
    if choice is not None:
        from monkey_cli.api import say_choice

        say_choice(choice)


@contextlib.contextmanager
def _signals_held() -> Any:
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# --- inside a worker process --------------------------------------------------------------------------------


class _Sender:
    """Messages to the driver from any thread of the worker; if the driver is gone, the worker ends."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def __call__(self, message: tuple[Any, ...]) -> None:
        try:
            with self._lock:
                self._conn.send(message)
        except (OSError, ValueError):
            os._exit(0)


def _worker_main(conn: Connection, place: Placement, verbose: bool) -> None:
    """A worker process: set up its GPU and threads, then do what the driver says until told to stop."""
    for signum in _TERMINAL_SIGNALS:  # Ctrl-C and a closed terminal reach the whole group: the driver decides
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):  # held since the start (and by monkey_cli.__main__ on import)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED_SIGNALS)
    _end_with_the_driver()
    os.dup2(2, 1)  # stdout is the driver's, for results: whatever a library prints here goes to stderr
    if place.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = place.gpu  # before torch is imported
    send = _Sender(conn)
    from monkey_cli.distributed.worker import DocumentWorker, route_notes, set_threads

    route_notes(lambda note: send(("note", note)), verbose)
    set_threads(place.threads)
    worker: DocumentWorker | None = None
    documents: ThreadPoolExecutor | None = None
    try:
        while True:
            message = conn.recv()
            if message[0] == "plan":
                send(_plan(*message[1:]))
            elif message[0] == "setup":
                worker = DocumentWorker(message[1], on_stage=lambda stage: send(("stage", stage)))
                documents = ThreadPoolExecutor(message[1].window, thread_name_prefix="monkey-document")
            elif message[0] == "task" and worker is not None and documents is not None:
                documents.submit(_process, worker, message[1], send)
            elif message[0] == "stop":
                if documents is not None:
                    documents.shutdown(wait=True)
                if worker is not None:
                    worker.close()
                break
    except (EOFError, OSError, KeyboardInterrupt):
        pass  # the driver is gone
    finally:
        os._exit(0)  # no interpreter clean-up to wait for: the work is handed over or abandoned


def _plan(model: pipeline.ModelOptions, job: Any) -> tuple[Any, ...]:
    try:
        return ("plan", *pipeline.quant_choice(model, job, "cuda:0"))
    except MonkeyError as exc:
        return ("fatal", _portable(exc))


def _process(worker: Any, task: Task, send: _Sender) -> None:
    try:
        done = worker.process(task, on_record=lambda record: send(("record", task.index, record)))
        send(("done", done))
    except MonkeyError as exc:
        send(("fatal", _portable(exc)))
    except Exception as exc:  # a bug, or a library's error: this document is redone elsewhere, once
        send(("lost", task.index, f"{type(exc).__name__}: {exc}"))


def _portable(exc: MonkeyError) -> MonkeyError:
    """`exc`, or a MonkeyError with its message when its class cannot cross the pipe."""
    try:
        return pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any pickling problem: the message is what matters
        return MonkeyError(str(exc))


def _end_with_the_driver() -> None:
    """Exit as soon as the driver process ends, however it ends (even SIGKILL, which closes no pipe nicely)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="monkey-driver-watch", daemon=True).start()

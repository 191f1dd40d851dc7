"""`--ray`: the same run on a Ray cluster, one model actor per GPU (or CPU actors), whole documents as tasks.

The driver (this process) lists the inputs and applies the resume rules, then hands each document to an actor
as one task (`DocumentActor.process`). An actor works on several documents at once (a threaded actor: its
documents share the decode batches of its one model), writes each document's output into --out itself, with
the same atomic writes and manifest entries as a single-process run, and returns the records, which the
driver gives out in input order (and prints, without --out). Documents are tasks rather than Ray Data rows
because a document whose actor died must be retried exactly once, alone, and its records kept in order:
per-document tasks make both exact, and need nothing but Ray's core.

An actor that dies is replaced (by the driver: a new actor in its slot); its unfinished documents go back to
the queue (`queue.DocumentQueue`). Ray is imported here only, when `--ray` is used; its background threads'
console messages go to stderr, never into the results on stdout.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from monkey_cli import pipeline
from monkey_cli.distributed.protocol import DocumentDone, Finished, Lost, Note, NoWorkers, Setup, Task
from monkey_cli.distributed.queue import DocumentQueue
from monkey_cli.distributed.workers import DEATHS_IN_A_ROW, cpu_count, said_once
from monkey_cli.errors import MissingExtra, MonkeyError, UsageError

_POLL_S = 1.0
_CLOSE_TIMEOUT_S = 30.0
_DRIVER_WATCH_S = 0.2
_INSTALL = "pip install 'monkey-cli[ray]'"


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingExtra(f"--ray needs Ray, which is not installed here: {_INSTALL}", extra="ray",
                           module="ray") from None  # fmt: skip
    return ray


@dataclass
class _Actor:
    id: int
    slot: int
    handle: Any
    ready: bool = False
    pid: int | None = None

    def describe(self) -> str:
        return f"actor {self.slot}" + (f" (pid {self.pid})" if self.pid else "")


class RayCluster:
    """The backend for `--ray`: connects to (or starts) a cluster, runs the actors, shuts down at the end."""

    noun = "actor"
    writes = True  # every actor writes its documents' outputs (the driver may be on another machine)

    def __init__(self, address: str, workers: int | None, device: str, verbose: bool = False) -> None:
        ray = import_ray()
        self._ray = ray
        self.verbose = verbose
        self._stdout = _ResultsStdout(sys.stdout, others_to_stderr=verbose)
        self._connect(address, workers, device)
        try:
            self.count, self._resources, self.device = _actor_plan(ray, workers, device)
        except BaseException:
            self.close(graceful=False)
            raise
        self._ids = itertools.count(1)
        self._actors: dict[int, _Actor] = {}
        self._pings: dict[Any, _Actor] = {}
        self._in_flight: dict[Any, tuple[int, int]] = {}
        self._deaths_in_a_row: dict[int, int] = {}
        self._setup: Setup | None = None
        self._last_cause = "actor died"

    def _connect(self, address: str, workers: int | None, device: str) -> None:
        ray = self._ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reports to anyone unless the user asks
        options: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,  # actors' own prints stay in Ray's logs; their notes come with results
            "logging_level": logging.WARNING if self.verbose else logging.ERROR,
        }
        local = address == "local" or (address == "" and not os.environ.get("RAY_ADDRESS"))
        if not local:
            _check_reachable(address or os.environ["RAY_ADDRESS"])
        if local:
            # Enough CPUs for the actors asked for, even on a small machine (they then share the cores).
            options["num_cpus"] = max(cpu_count(), workers or 0) if device == "cpu" or workers else None
        handlers = {signum: signal.getsignal(signum) for signum in _handled_signals()}
        self._stdout.install()
        try:
            ray.init(address=address or None, **{key: value for key, value in options.items() if value is not None})
        except (ConnectionError, RuntimeError, ValueError) as exc:
            self.close(graceful=False)
            where = f"--ray {address}" if address else "--ray"
            raise UsageError(f"{where}: cannot start or reach the Ray cluster ({_first_line(exc)})") from None
        except BaseException:
            self.close(graceful=False)
            raise
        finally:
            for signum, handler in handlers.items():  # Ray sets its own SIGTERM handler: keep the caller's
                if handler is not None and threading.current_thread() is threading.main_thread():
                    signal.signal(signum, handler)

    # --- before the run -------------------------------------------------------------------------------
    def resolve_quant(self, options: pipeline.RunOptions) -> str:
        """The quantization every actor loads with, planned on a node like theirs for --quant auto (and said
        here once, as a single-process run says it: the actors then load what it names, saying nothing)."""
        model = options.model
        if model.quant not in (None, "auto"):
            return model.quant
        plan = self._ray.remote(_plan).options(**self._resources)
        try:
            quant, choice = self._ray.get(plan.remote(model, options.job, self.device, os.getcwd()))
        except self._ray.exceptions.RayTaskError as exc:
            raise _user_error(exc) from None
        said_once(choice)
        return quant

    def fit(self, options: pipeline.RunOptions, quant: str, count: int) -> tuple[int, str | None]:
        """`count` actors, lowered to what the cluster's memory (Ray's `memory` resource) holds when they run
        on CPUs, each with its own model; and the line that says so."""
        if self.device != "cpu":
            return count, None
        from monkey_cli.distributed.workers import memory_cap, worker_memory

        budget = self._ray.cluster_resources().get("memory")
        fits, note = memory_cap(count, worker_memory(options, quant), int(budget) if budget else None,
                                "on the Ray cluster")  # fmt: skip
        self.count = min(self.count, fits)
        return fits, note

    def start(self, setup: Setup, count: int) -> None:
        self._setup = setup
        for slot in range(1, count + 1):
            self._launch(slot)

    def _launch(self, slot: int) -> None:
        assert self._setup is not None
        threads = max(1, int(self._resources["num_cpus"]))
        actor_class = self._ray.remote(DocumentActor).options(
            **self._resources,
            max_restarts=0,  # the driver replaces a dead actor itself, and knows which documents it held
            max_concurrency=self._setup.window + 2,  # its documents, plus the ping and close calls
            scheduling_strategy="SPREAD",
        )
        actor = _Actor(next(self._ids), slot, actor_class.remote(self._setup, threads))
        self._actors[actor.id] = actor
        self._pings[actor.handle.ready.remote()] = actor

    # --- the run --------------------------------------------------------------------------------------
    def step(self, queue: DocumentQueue) -> list[Any]:
        """Hand out documents, then wait (at most a second) for results; returns the events."""
        ray = self._ray
        self._dispatch(queue)
        waiting = [*self._pings, *self._in_flight]
        events: list[Any] = []
        if waiting:
            ready, _ = ray.wait(waiting, num_returns=1, timeout=_POLL_S)
            if ready:
                ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0)
            for ref in ready:
                events += self._outcome(ref, queue)
        else:
            time.sleep(_POLL_S / 20)  # nothing out there: the next step hands out what came back meanwhile
        if not self._actors and queue.unfinished:
            events.append(NoWorkers(f"the last {self._last_cause}"))
        return events

    def _dispatch(self, queue: DocumentQueue) -> None:
        assert self._setup is not None
        ready = [actor.id for actor in self._actors.values() if actor.ready]
        for actor_id, task in queue.deal(ready, len(self._actors), self._setup.window):
            self._in_flight[self._actors[actor_id].handle.process.remote(task)] = (actor_id, task.index)

    def _outcome(self, ref: Any, queue: DocumentQueue) -> list[Any]:
        ray = self._ray
        if ref in self._pings:
            actor = self._pings.pop(ref)
            try:
                actor.pid, actor.ready = ray.get(ref), True
            except ray.exceptions.RayActorError as exc:
                return self._bury(actor, _death(exc), queue)
            except ray.exceptions.RayTaskError as exc:
                raise _user_error(exc) from None
            return []
        actor_id, index = self._in_flight.pop(ref)
        actor = self._actors.get(actor_id)
        try:
            done: DocumentDone = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            cause = f"{actor.describe()} {_death(exc)}" if actor else self._last_cause
            events = self._bury(actor, _death(exc), queue) if actor else []
            return [*events, Lost(actor_id, index, cause)]
        except ray.exceptions.RayTaskError as exc:
            error = _user_error(exc)
            if isinstance(error, MonkeyError):  # the model cannot load (or the like): stop, as one process would
                raise error from None
            where = actor.describe() if actor else "an actor"
            return [Lost(actor_id, index, f"{where} failed: {type(error).__name__}: {error}")]
        if actor is not None:
            self._deaths_in_a_row[actor.slot] = 0
        return [Finished(actor_id, done)]

    def _bury(self, actor: _Actor, how: str, queue: DocumentQueue) -> list[Any]:
        """An actor died: a new one takes its slot (unless its slot keeps failing); what it held comes back
        as each of its tasks fails."""
        if self._actors.pop(actor.id, None) is None:
            return []
        with contextlib.suppress(Exception):
            self._ray.kill(actor.handle, no_restart=True)
        cause = f"{actor.describe()} {how}"
        self._last_cause = cause
        self._deaths_in_a_row[actor.slot] = self._deaths_in_a_row.get(actor.slot, 0) + 1
        held = queue.held(actor.id)
        work_left = bool(held or queue.waiting)
        replaced = work_left and self._deaths_in_a_row[actor.slot] < DEATHS_IN_A_ROW
        if replaced:
            then = "a new actor takes its place"
        elif work_left:
            then = "it is not replaced: its slot keeps failing"
        else:
            then = "nothing is left for a new one"
        if replaced:
            self._launch(actor.slot)
        return [Note(f"{cause}; {len(held)} unfinished document(s) go back to the queue; {then}", warning=True)]

    def close(self, graceful: bool = True) -> None:
        """Let the actors remove their work folders from --out, then leave the cluster (a local one stops)."""
        ray = self._ray
        try:
            actors = list(getattr(self, "_actors", {}).values())
            if graceful and actors:
                with contextlib.suppress(Exception):
                    ray.get([actor.handle.close.remote() for actor in actors], timeout=_CLOSE_TIMEOUT_S)
        finally:
            try:
                if ray.is_initialized():
                    ray.shutdown()
            finally:
                self._stdout.remove()


class DocumentActor:
    """A Ray actor: one model on its GPU (or CPUs), many documents at once (see `worker.DocumentWorker`)."""

    def __init__(self, setup: Setup, threads: int) -> None:
        from monkey_cli.distributed.worker import DocumentWorker, route_notes, set_threads

        _end_with_the_driver(setup)
        self._notes: deque[Note] = deque()  # appended by any thread, taken by `process`
        self._problem: str | None = None
        try:
            os.chdir(setup.cwd)  # relative inputs, model and --out mean what they mean on the driver
        except OSError as exc:
            self._problem = (
                f"--ray: a node cannot enter the driver's folder {setup.cwd} ({exc.strerror}): the inputs, the "
                "model and --out must be on a filesystem every node mounts at the same path"
            )
        route_notes(self._notes.append, setup.verbose)
        set_threads(threads)
        self._worker = DocumentWorker(setup)

    def ready(self) -> int:
        if self._problem:
            raise MonkeyError(self._problem)
        return os.getpid()

    def process(self, task: Task) -> DocumentDone:
        done = self._worker.process(task)
        while self._notes:
            done.notes.append(self._notes.popleft())
        return done

    def close(self) -> None:
        self._worker.close()


def _end_with_the_driver(setup: Setup) -> None:
    """On the driver's machine, the actor ends within a fifth of a second of its driver, however the driver
    ended (a SIGKILL included): it must not go on writing into --out for a run nobody waits for. (On other
    machines Ray ends it when the driver's node reports the driver gone.)"""
    driver = setup.driver
    if driver is None or driver.alive() is None:
        return

    def watch() -> None:
        while driver.alive():
            time.sleep(_DRIVER_WATCH_S)
        os._exit(0)  # outputs are written whole or not at all: nothing half-done is left

    threading.Thread(target=watch, name="monkey-driver-watch", daemon=True).start()


def _plan(model: pipeline.ModelOptions, job: Any, device: str, cwd: str) -> tuple[str, Any]:
    """On a node of the cluster: the quantization the memory plan chooses there, and its `Choice` (whose
    notes the driver says; None when nothing fits)."""
    from monkey_cli.model.sources import resolve_device

    with contextlib.suppress(OSError):
        os.chdir(cwd)
    return pipeline.quant_choice(model, job, resolve_device(device))


def _actor_plan(ray: Any, workers: int | None, device: str) -> tuple[int, dict[str, Any], str]:
    """How many actors, the resources each asks for, and the device it loads onto.

    On a cluster with GPUs (unless --device cpu): one actor per GPU (num_gpus=1; --workers N more than the
    GPUs share them), each with its share of its node's CPUs. Without: one actor per node with the CPUs of
    the smallest node, or --workers N actors sharing the cluster's CPUs.
    """
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    gpus = 0 if device == "cpu" else int(sum(node.get("GPU", 0) for node in nodes))
    if device == "cuda" and not gpus:
        raise UsageError("--device cuda: the Ray cluster has no GPU")
    if gpus:
        count = workers or gpus
        gpu_nodes = [node for node in nodes if node.get("GPU")]
        share = min(int(node.get("CPU", 1) // node["GPU"]) for node in gpu_nodes)
        return count, {"num_gpus": min(1.0, gpus / count), "num_cpus": max(1, share)}, "cuda:0"
    cpu_nodes = [int(node.get("CPU", 0)) for node in nodes if node.get("CPU")]
    if not cpu_nodes:
        raise UsageError("--ray: the cluster has no CPU to run an actor on")
    if workers is None:
        return len(cpu_nodes), {"num_cpus": min(cpu_nodes)}, "cpu"
    return workers, {"num_cpus": max(1, min(sum(cpu_nodes) // workers, max(cpu_nodes)))}, "cpu"


def _check_reachable(address: str) -> None:
    """A cluster's HOST:PORT that nothing answers at is an error now: Ray itself retries for minutes."""
    import socket

    match = re.fullmatch(r"(?:ray://)?\[?([^\]]+?)\]?:(\d+)", address.strip())
    if match is None:  # "auto": Ray looks for the cluster on this machine, and says at once if there is none
        return
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UsageError(f"--ray {address}: cannot reach the Ray cluster there ({reason})") from None


def _death(exc: Exception) -> str:
    """How an actor died, in a few words, from Ray's paragraph about it."""
    text = str(exc)
    detail = re.search(r"Worker exit detail: (.+?)(?:\.\s|\.?$)", text)
    if getattr(exc, "actor_init_failed", False):
        return "failed to start"
    return f"died ({detail.group(1)})" if detail else f"died ({_first_line(exc)})"


def _user_error(exc: Any) -> BaseException:
    """The exception an actor's code raised, from Ray's wrapper of it."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else RuntimeError(_first_line(exc))


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _handled_signals() -> list[int]:
    return [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]


class _ResultsStdout:
    """sys.stdout while Ray runs. Ray's background threads print messages about its workers on sys.stdout
    (a dead worker's paragraph, for one); stdout carries results only, so what any other thread writes there
    goes to stderr with --verbose (monkey says what happened in a line of its own) and nowhere without, while
    the installing thread (which prints the results) writes through."""

    def __init__(self, real: Any, others_to_stderr: bool) -> None:
        self._real = real
        self._owner = threading.current_thread()
        self._others_to_stderr = others_to_stderr

    def install(self) -> None:
        sys.stdout = self  # type: ignore[assignment]

    def remove(self) -> None:
        if sys.stdout is self:
            sys.stdout = self._real

    def write(self, text: str) -> int:
        if threading.current_thread() is self._owner:
            return self._real.write(text)
        return sys.stderr.write(text) if self._others_to_stderr else len(text)

    def flush(self) -> None:
        self._real.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

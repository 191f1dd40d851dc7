"""What the driver and its workers (local processes or Ray actors) hand each other: plain picklable values.

A worker gets one `Setup` (the run's options, with the quantization already decided so that every worker
loads the same model) and then `Task`s, one whole document each; it answers each task with a
`DocumentDone`. Nothing here imports anything heavy: a worker unpickles these before it has set up its GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from monkey_cli.documents import PageError, Source
from monkey_cli.output import Record

if TYPE_CHECKING:  # pragma: no cover
    from monkey_cli.pipeline import RunOptions

# How many times a document is tried in all: once, and once more (alone) if its worker died meanwhile.
ATTEMPTS = 2


@dataclass(frozen=True)
class Task:
    """One document to process whole: its place in the run's order, its source and, with an output folder,
    its planned output file and input hash. `attempt` is 0, or 1 when a worker died holding it."""

    index: int
    source: Source
    target: PurePosixPath | None = None
    sha256: str | None = None
    attempt: int = 0


@dataclass
class DocumentDone:
    """A task's result: the document's records in page order and the problems its pages had (they tell a
    permanent failure from one worth retrying). A worker that writes outputs itself (a Ray actor) also says
    what it wrote, or the records of a write that failed; `notes` carry its log lines and warnings."""

    index: int
    records: list[Record]
    page_errors: list[PageError] = field(default_factory=list)
    written: Path | None = None
    write_failures: list[Record] = field(default_factory=list)
    already_written: bool = False  # a second attempt found the file its first attempt wrote
    notes: list[Note] = field(default_factory=list)


@dataclass(frozen=True)
class Note:
    """A line a worker's code logged or warned, shown once by the driver however many workers said it."""

    text: str
    warning: bool = False  # a MonkeyWarning (shown as `warning: ...`), else a log line of this level
    level: int = 20


@dataclass(frozen=True)
class Setup:
    """What every worker needs to answer like a single-process run.

    `options.model.quant` is the quantization decided once for the whole run; `device` is what the worker
    loads onto (`cuda:0`, its own pinned GPU, or `cpu`); `size` the page size; `settings` the resume
    fingerprint's fields; `write` says the worker writes each document's output itself (Ray actors) instead of
    the driver; `window` is how many documents it works on at once; `cwd` is the driver's folder, which
    relative paths are relative to; `driver` names the driver's process (`this_process()`), so that a
    worker on its machine can end the moment it does.
    """

    options: RunOptions
    quant: str
    device: str
    size: Any
    settings: dict[str, Any]
    write: bool
    window: int
    cwd: str
    verbose: bool = False
    driver: ProcessId | None = None


@dataclass(frozen=True)
class ProcessId:
    """A process, unmistakably on this machine: the machine's boot id, its pid and its start time (a pid
    reused after the process ended has another start time)."""

    boot: str
    pid: int
    started: str

    @staticmethod
    def of(pid: int) -> ProcessId | None:
        """The process `pid` now, or None where /proc does not tell (not Linux) or it is gone."""
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) < 20 or fields[0] == "Z":
            return None
        return ProcessId(boot, pid, fields[19])  # field 22 of stat: the start time in clock ticks

    def alive(self) -> bool | None:
        """Whether this process still runs; None when that cannot be known from here (another machine)."""
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            return None
        if boot != self.boot:
            return None
        return ProcessId.of(self.pid) == self


@dataclass(frozen=True)
class Placement:
    """Where a local worker runs: its GPU (a CUDA_VISIBLE_DEVICES entry; None for the CPU) and its share of
    the CPU threads. `slot` numbers the workers from 1 in messages; a replacement keeps its slot."""

    slot: int
    gpu: str | None
    threads: int

    def describe(self) -> str:
        return f"worker {self.slot}" + (f" (GPU {self.gpu})" if self.gpu is not None else "")


# --- what a backend (local processes, Ray) tells the driver ------------------------------------------------


@dataclass(frozen=True)
class Received:
    """A record of a document `worker` is working on, as soon as it is ready (local workers stream them)."""

    worker: Any
    index: int
    record: Record


@dataclass(frozen=True)
class Finished:
    worker: Any
    done: DocumentDone


@dataclass(frozen=True)
class Lost:
    """`worker` will not finish document `index`: it died holding it, or processing it raised (`cause`)."""

    worker: Any
    index: int
    cause: str


@dataclass(frozen=True)
class Stage:
    text: str


@dataclass(frozen=True)
class NoWorkers:
    """Every worker is gone and none can be started again (they kept dying before finishing a document)."""

    cause: str


Event = Received | Finished | Lost | Note | Stage | NoWorkers

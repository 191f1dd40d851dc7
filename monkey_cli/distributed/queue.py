"""The run's documents between the driver and its workers: who holds what, what is redone, what is released.

`DocumentQueue` hands whole documents to workers, takes their records back and gives them out in input order,
whatever order the workers finish in: a document's records are released as soon as every document before it
is complete (the first unfinished document's records stream as they arrive), each document followed by its
`DocumentEnd`.

A document whose worker died (or whose processing raised) goes back to the queue once, to be tried again
alone: it goes to a worker that holds nothing else, and that worker gets nothing else until it is done, so a
second death is that document's doing. A document lost twice is given up with an error record naming the
cause. Finished documents are never handed out again. Greedy decoding makes a retry's records the same as
the first attempt's, so records already released from a first attempt are not released twice.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

from monkey_cli.distributed.protocol import ATTEMPTS, Task
from monkey_cli.engine.pages import DocumentEnd
from monkey_cli.output import Record

Worker = Hashable


@dataclass
class _Document:
    task: Task
    records: list[Record] = field(default_factory=list)  # the current attempt's records so far
    released: list[Record] = field(default_factory=list)  # records given out already (from any attempt)
    holder: Worker | None = None
    finished: bool = False


class DocumentQueue:
    def __init__(self, tasks: list[Task]) -> None:
        self._documents = [_Document(task) for task in tasks]
        self._first_tries: deque[int] = deque(range(len(tasks)))
        self._retries: deque[int] = deque()
        self._held: dict[Worker, set[int]] = {}
        self._next_release = 0
        self._unfinished = len(tasks)

    # --- handing out ----------------------------------------------------------------------------------
    def take(self, worker: Worker) -> Task | None:
        """The next document for `worker`, or None (nothing left for it now)."""
        held = self._held.setdefault(worker, set())
        if any(self._documents[index].task.attempt for index in held):
            return None  # a retried document runs alone
        if self._retries:
            if held:
                return None  # wait until this worker is free, then give it the retry
            return self._give(worker, self._retries.popleft())
        if self._first_tries:
            return self._give(worker, self._first_tries.popleft())
        return None

    def fair_share(self, workers: int, window: int) -> int:
        """How many documents one of `workers` workers may hold at most: `window`, but no more than its
        share of what is left, so that a worker that starts first does not take the others' documents."""
        return max(1, min(window, math.ceil(self._unfinished / max(workers, 1))))

    def deal(self, ready: list[Worker], workers: int, window: int) -> Iterator[tuple[Worker, Task]]:
        """Hand documents to the `ready` ones of `workers` workers, one each in turn (so that a short run is
        spread over every worker), each up to its `fair_share` of `window`."""
        share = self.fair_share(workers, window)
        hungry = list(ready)
        while hungry:
            for worker in list(hungry):
                task = self.take(worker) if len(self.held(worker)) < share else None
                if task is None:
                    hungry.remove(worker)
                else:
                    yield worker, task

    def _give(self, worker: Worker, index: int) -> Task:
        document = self._documents[index]
        document.holder = worker
        document.records = []
        self._held[worker].add(index)
        return document.task

    def held(self, worker: Worker) -> list[int]:
        """The documents `worker` holds (handed out, not finished), in input order."""
        return sorted(self._held.get(worker, ()))

    def holds(self, worker: Worker, index: int) -> bool:
        return index in self._held.get(worker, ())

    def task(self, index: int) -> Task:
        return self._documents[index].task

    @property
    def waiting(self) -> bool:
        """Documents not handed out yet (first tries or retries)."""
        return bool(self._first_tries or self._retries)

    @property
    def unfinished(self) -> list[int]:
        return [index for index, document in enumerate(self._documents) if not document.finished]

    @property
    def finished(self) -> bool:
        """Every document is complete and released."""
        return self._next_release == len(self._documents)

    # --- results --------------------------------------------------------------------------------------
    def add_record(self, worker: Worker, index: int, record: Record) -> None:
        """A record of a document `worker` is working on (ignored if the document is no longer its)."""
        if self.holds(worker, index):
            self._documents[index].records.append(record)

    def finish(self, worker: Worker, index: int, records: list[Record]) -> bool:
        """`worker` completed document `index` with `records` (all of them); False if it was not its to finish."""
        if not self.holds(worker, index):
            return False
        self._held[worker].discard(index)
        document = self._documents[index]
        document.records, document.holder, document.finished = list(records), None, True
        self._unfinished -= 1
        return True

    def lose(self, worker: Worker, index: int) -> Task | None:
        """`worker` can no longer finish document `index` (it died, or processing raised). The document goes
        back to the queue for one more try; returns its task when it has had all its tries (give it up with
        `fail`). None also when it was not `worker`'s."""
        if not self.holds(worker, index):
            return None
        self._held[worker].discard(index)
        document = self._documents[index]
        document.holder, document.records = None, []
        if document.task.attempt + 1 >= ATTEMPTS:
            return document.task
        document.task = dataclasses.replace(document.task, attempt=document.task.attempt + 1)
        self._retries.append(index)
        return None

    def fail(self, index: int, records: list[Record]) -> None:
        """Give document `index` up: what was released of it stays, `records` (its error) follow."""
        document = self._documents[index]
        if document.holder is not None:
            self._held[document.holder].discard(index)
        if index in self._first_tries:
            self._first_tries.remove(index)
        if index in self._retries:
            self._retries.remove(index)
        document.records = [*document.released, *records]
        if not document.finished:
            self._unfinished -= 1
        document.holder, document.finished = None, True

    def released_records(self, index: int) -> list[Record]:
        return list(self._documents[index].released)

    # --- giving out in order --------------------------------------------------------------------------
    def release(self) -> Iterator[Record | DocumentEnd]:
        """Records (and document ends) that can go out now, in input order."""
        while self._next_release < len(self._documents):
            document = self._documents[self._next_release]
            for record in document.records[len(document.released) :]:
                document.released.append(record)
                yield record
            if not document.finished:
                return
            self._next_release += 1
            yield DocumentEnd(document.task.source.name)

"""Beyond one process: a worker per GPU on this machine (`--workers`), or model actors on a Ray cluster (`--ray`).

    from monkey_cli.distributed import ScaleOptions, run
    summary = run(options, ScaleOptions(workers=4), on_record=print)   # options: a pipeline.RunOptions

Whole documents go to workers, each with its own model, so a document's output file is written atomically
and resume works exactly as in a single-process run; the records come back in input order, and equal a
single-process run's. A worker that dies gives its unfinished documents back, to be redone once, alone, by
another worker; finished documents are never lost or redone. docs/scale.md has the details.

Modules: `driver` (the run: inputs, resume, ordered records, outputs), `queue` (who holds which document,
retries, release order), `protocol` (what crosses between driver and workers), `worker` (one model, many
documents at once), `workers` (local processes), `ray_runner` (Ray). Nothing heavy is imported here, and Ray
only when `--ray` is used.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from monkey_cli.output import Record
    from monkey_cli.pipeline import RunOptions, Summary

__all__ = ["ScaleOptions", "run", "worker_count"]


@dataclass(frozen=True)
class ScaleOptions:
    """`workers`: how many workers (None: auto, one per visible GPU); `ray`: None (no Ray), "" (Ray's default:
    the cluster in RAY_ADDRESS, else a new local one), "local" (a new local cluster), "auto" (the cluster
    running on this machine) or a cluster's address. `verbose` lets workers' third-party warnings through."""

    workers: int | None = None
    ray: str | None = None
    verbose: bool = False


def worker_count(scale: ScaleOptions, device: str, inputs: tuple[str, ...] | list[str]) -> int:
    """How many local worker processes a run gets: `--workers N`, or for auto one per visible CUDA GPU (1 on
    a CPU-only machine, with `--device cpu` or `cuda:N`, or for a single input file: nothing to share)."""
    if scale.workers is not None:
        return scale.workers
    if device == "cpu" or device.startswith("cuda:"):
        return 1
    if len(inputs) == 1 and inputs[0] != "-" and os.path.isfile(inputs[0]):
        return 1
    from monkey_cli.distributed.workers import visible_gpus

    return max(1, len(visible_gpus()))


def single_process(scale: ScaleOptions, options: RunOptions) -> bool:
    """Whether the run is an ordinary single-process one (`pipeline.run`)."""
    return scale.ray is None and worker_count(scale, options.model.device, options.inputs) == 1


def run(
    options: RunOptions,
    scale: ScaleOptions,
    *,
    on_record: Callable[[Record], None] = lambda record: None,
    on_document: Callable[[str], None] = lambda name: None,
    on_start: Callable[[int], None] = lambda documents: None,
    on_stage: Callable[[str], None] = lambda stage: None,
    on_page: Callable[[int | None], None] = lambda pages: None,
    stdin: IO[bytes] | bytes | None = None,
) -> Summary:
    """`pipeline.run` on several workers (the same arguments, less the token streamer, which needs one
    process), plus `on_page`. Records reach `on_record` in input order; progress (`on_start`, `on_page`,
    `on_document`) comes as documents finish, in any order; with `--out` each document's file is written as
    soon as it is complete. KeyboardInterrupt stops every worker and propagates, finished documents saved."""
    from monkey_cli.distributed import driver

    def backend():  # noqa: ANN202 - LocalWorkers or RayCluster
        if scale.ray is not None:
            from monkey_cli.distributed.ray_runner import RayCluster

            return RayCluster(scale.ray, scale.workers, options.model.device, scale.verbose)
        from monkey_cli.distributed.workers import LocalWorkers

        count = worker_count(scale, options.model.device, options.inputs)
        return LocalWorkers(count, options.model.device, scale.verbose)

    return driver.run(
        options,
        backend,
        on_record=on_record,
        on_document=on_document,
        on_start=on_start,
        on_stage=on_stage,
        on_page=on_page,
        stdin=stdin,
    )

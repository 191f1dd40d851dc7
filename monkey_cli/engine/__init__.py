"""The generation engine: pages and prompts in, answers out, as fast as the hardware allows.

`pages` turns document pages into records (the CLI's flow); `scheduler` runs generation requests with a static
KV cache, a compiled decode step, continuous batching and prefix reuse; `constraints` is the interface of a
constrained request (`TokenConstraint`). Names are imported lazily, so that the
light parts (`Job`, `Engine`) do not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "BadQuestion": "monkey_cli.engine.pages",
    "DocumentEnd": "monkey_cli.engine.pages",
    "Engine": "monkey_cli.engine.pages",
    "Job": "monkey_cli.engine.pages",
    "EngineLoop": "monkey_cli.engine.loop",
    "GenerationRequest": "monkey_cli.engine.scheduler",
    "GenerationResult": "monkey_cli.engine.scheduler",
    "RequestHandle": "monkey_cli.engine.scheduler",
    "Scheduler": "monkey_cli.engine.scheduler",
    "SamplingParams": "monkey_cli.engine.sampling",
    "TokenConstraint": "monkey_cli.engine.constraints",
}

if TYPE_CHECKING:  # pragma: no cover
    from monkey_cli.engine.constraints import TokenConstraint
    from monkey_cli.engine.loop import EngineLoop
    from monkey_cli.engine.pages import BadQuestion, DocumentEnd, Engine, Job
    from monkey_cli.engine.sampling import SamplingParams
    from monkey_cli.engine.scheduler import GenerationRequest, GenerationResult, RequestHandle, Scheduler

__all__ = [
    "BadQuestion",
    "DocumentEnd",
    "Engine",
    "EngineLoop",
    "GenerationRequest",
    "GenerationResult",
    "Job",
    "RequestHandle",
    "SamplingParams",
    "Scheduler",
    "TokenConstraint",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'monkey_cli.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

"""A rich progress bar for training on stderr: step, loss, steps/s and time left. Terminals only."""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


class TrainingProgress(TrainerCallback):
    """Shown by the main process only; steps/s counts the steps of this session (a resumed run starts mid-bar)."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._task: Any = None
        self._first_step = 0
        self._started = 0.0
        self._loss: float | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  {task.fields[rate]} step/s  ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._bar.start()
        self._first_step = state.global_step
        self._started = time.perf_counter()
        self._task = self._bar.add_task(
            "training", total=state.max_steps, completed=state.global_step, loss="-", rate="-"
        )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._bar is None:
            return
        rate = (state.global_step - self._first_step) / max(time.perf_counter() - self._started, 1e-9)
        self._bar.update(self._task, completed=state.global_step, rate=f"{rate:.2f}")

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._bar is not None and logs and "loss" in logs:
            self._bar.update(self._task, loss=f"{logs['loss']:.4f}")

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

"""`monkey finetune`: LoRA / QLoRA on your own documents with the transformers Trainer.

    from monkey_cli.finetune.trainer import FinetuneOptions, train
    result = train(FinetuneOptions(data="train.json", out="runs/forms", model="echo840/Monkey-Chat"))

The Trainer runs the loop, so `torchrun` / `accelerate launch` run the same command on several GPUs (one
process per GPU, each on the GPU of its rank). What this module adds around it:

* the model, loaded as every other command loads it (`Monkey.load`; `--quant 4bit` gives the QLoRA base),
  LoRA on the decoder (`adapters.py`), gradient checkpointing over the decoder blocks;
* the loss: next-token cross-entropy on the answer tokens and the closing <|endoftext|> only, averaged over
  all such tokens of an optimizer step (so gradient accumulation equals a larger batch);
* the output folder: `adapter_config.json` + `adapter_model.safetensors`, `training_args.json`,
  `loss.jsonl` (one line per step, one per held-out evaluation), `checkpoints/checkpoint-N`;
* resuming from the last complete checkpoint, once the settings and data are checked to be the same;
* Ctrl-C: the current step finishes, a checkpoint is saved, and training stops (a second Ctrl-C: at once).

This module imports torch and transformers: import it only where training happens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

from monkey_cli import tasks
from monkey_cli.errors import UsageError
from monkey_cli.finetune.adapters import (
    ADAPTER_WEIGHTS,
    DECODER_TARGETS,
    TRAINING_ARGS_FILE,
    add_lora,
    lora_config,
    quiet_library_warnings,
    save_adapter,
    target_pattern,
)
from monkey_cli.finetune.collator import MonkeyCollator
from monkey_cli.finetune.data import IGNORE_INDEX, Example, LoadedData, MonkeyDataset, load_data, open_page

if TYPE_CHECKING:  # pragma: no cover
    from peft import PeftModel

    from monkey_cli.api import Monkey

LOSS_LOG_FILE = "loss.jsonl"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_COMPLETE = "trainer_state.json"  # the Trainer writes it last into a checkpoint folder
KEEP_CHECKPOINTS = 2
EVAL_METRICS = ("anls", "accuracy", "relaxed_accuracy")
EVAL_EXTRA_TOKENS = 32  # a held-out answer may run this much longer than the longest expected one
# Options that cannot change the trained weights, so a resume may change them (gradient checkpointing
# recomputes the same activations, with the same dropout masks).
_FREE_ON_RESUME = frozenset({"resume", "save_steps", "device", "gradient_checkpointing"})

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _silent(message: str) -> None:
    pass


@dataclass
class FinetuneOptions:
    """Everything `monkey finetune` takes. LoRA defaults are the original's LoraArguments."""

    data: Path
    out: Path
    model: str = tasks.DEFAULT_MODEL
    eval_data: Path | None = None
    eval_metric: str = "anls"
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    learning_rate: float = 1e-4
    batch_size: int = 1
    grad_accum: int = 1
    warmup_ratio: float = 0.02
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = DECODER_TARGETS
    train_window_lora: bool = False
    max_length: int = 2048
    seed: int = 42
    save_steps: int = 100
    gradient_checkpointing: bool = True
    device: str = "auto"
    dtype: str | None = None
    quant: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self.out = Path(self.out)
        self.eval_data = Path(self.eval_data) if self.eval_data is not None else None
        self.lora_targets = tuple(self.lora_targets)
        target_pattern(self.lora_targets)  # unknown names fail now, before any weight loads
        if self.eval_metric not in EVAL_METRICS:
            raise UsageError(f"--eval-metric must be one of {', '.join(EVAL_METRICS)}; got {self.eval_metric!r}")
        for name in ("batch_size", "grad_accum", "lora_r", "lora_alpha", "max_length", "save_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"--max-steps must be at least 1; got {self.max_steps}")
        if self.max_steps is None and self.epochs <= 0:
            raise UsageError(f"--epochs must be positive; got {self.epochs}")
        if not 0 <= self.lora_dropout < 1 or not 0 <= self.warmup_ratio < 1:
            raise UsageError("--lora-dropout and --warmup-ratio must be in [0, 1)")
        if self.learning_rate <= 0:
            raise UsageError(f"--learning-rate must be positive; got {self.learning_rate}")


@dataclass
class TrainResult:
    """What a run did; `model` is the trained peft model, still in memory."""

    out: Path
    steps: int
    max_steps: int
    interrupted: bool
    main_process: bool  # False in the other processes of a multi-GPU run (they report nothing)
    final_loss: float | None
    train_data: LoadedData
    eval_data: LoadedData | None
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    model: Any = field(default=None, repr=False)


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------
def train(options: FinetuneOptions, *, callbacks: Sequence[TrainerCallback] = (), log: Log = _stderr) -> TrainResult:
    """Train a LoRA adapter as `options` say; returns when done, or after Ctrl-C once a checkpoint is saved."""
    with quiet_library_warnings():
        return _train(options, callbacks, log)


def _train(options: FinetuneOptions, callbacks: Sequence[TrainerCallback], log: Log) -> TrainResult:
    main_process = int(os.environ.get("RANK", "0")) == 0
    fingerprint = run_fingerprint(options)
    checkpoint = prepare_out(options, fingerprint)
    train_data, eval_data = load_datasets(options, log if main_process else _silent)
    monkey = load_base(options)
    model = with_lora(monkey, options)
    args = training_arguments(options, monkey)
    if main_process:
        options.out.mkdir(parents=True, exist_ok=True)
        _write_training_args(options, fingerprint, args, train_data, eval_data)
        _truncate_loss_log(options.out / LOSS_LOG_FILE, checkpoint_step(checkpoint))

    stop = StopOnInterrupt(announce=main_process)
    loss_log = LossLog(options.out / LOSS_LOG_FILE)
    evaluations: list[dict[str, Any]] = []
    all_callbacks: list[TrainerCallback] = [stop, loss_log, *callbacks]
    if eval_data is not None:
        held_out = HeldOutEval(monkey, eval_data.examples, options.eval_metric, loss_log, evaluations, log, stop)
        all_callbacks.append(held_out)
    trainer = AnswerLossTrainer(
        model=model,
        args=args,
        train_dataset=MonkeyDataset(train_data.examples, monkey.processor),
        data_collator=MonkeyCollator(pad_id=monkey.tokenizer.eod_id),
        callbacks=all_callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict on stdout, which carries results only
    with stop.installed():
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if main_process and not stop.requested:
        save_adapter(model, options.out)
    return TrainResult(
        out=options.out,
        steps=trainer.state.global_step,
        max_steps=trainer.state.max_steps,
        interrupted=stop.requested,
        main_process=main_process,
        final_loss=loss_log.last_loss,
        train_data=train_data,
        eval_data=eval_data,
        evaluations=evaluations,
        model=model,
    )


def load_datasets(options: FinetuneOptions, log: Log = _stderr) -> tuple[LoadedData, LoadedData | None]:
    """The training and held-out data, checked with the checkpoint's tokenizer before any weight is loaded."""
    from monkey_cli.model.configuration import load_config
    from monkey_cli.model.sources import resolve_source
    from monkey_cli.model.tokenizer import QWenTokenizer

    folder = resolve_source(options.model)
    config = load_config(folder)
    tokenizer = QWenTokenizer.from_dir(folder, image_token_span=config.tokens_per_image)
    loaded = []
    for path in (options.data, options.eval_data):
        if path is None:
            loaded.append(None)
            continue
        data = load_data(path, tokenizer, max_length=options.max_length, image_size=config.vision.input_size)
        for line in data.skipped:
            log(f"skipped {line}")
        loaded.append(data.require_examples())
    return loaded[0], loaded[1]


def load_base(options: FinetuneOptions) -> Monkey:
    """The base model as the other commands load it (the QLoRA base with --quant 4bit)."""
    from monkey_cli.api import Monkey
    from monkey_cli.model.loading import resolve_dtype

    device = training_device(options.device)
    if resolve_dtype(options.dtype, device) == torch.float16 and not device.startswith("cuda"):
        raise UsageError("float16 training needs a CUDA GPU; use --dtype bfloat16 or float32 on the CPU")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))  # the Trainer places the model on the current GPU
    return Monkey.load(options.model, device=device, dtype=options.dtype, quant=options.quant)


def training_device(device: str) -> str:
    """--device, except under torchrun / accelerate launch, where each process takes the GPU of its rank."""
    from monkey_cli.model.sources import resolve_device

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return resolve_device(device)
    if device == "cpu":
        return "cpu"
    if device not in ("auto", "cuda"):
        raise UsageError(f"--device {device}: with several processes each one uses the GPU of its rank; leave it out")
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"


def with_lora(monkey: Monkey, options: FinetuneOptions) -> PeftModel:
    """The base wrapped with a fresh adapter (seeded), gradient checkpointing on if asked."""
    windows = monkey.model.config.vision.lora_repeat_num  # one LoRA set per window; none in TextMonkey as released
    if options.train_window_lora and not windows:
        raise UsageError("--train-window-lora: this checkpoint's vision tower has no per-window LoRA to train")
    config = lora_config(
        r=options.lora_r,
        alpha=options.lora_alpha,
        dropout=options.lora_dropout,
        targets=options.lora_targets,
        train_window_lora=options.train_window_lora,
        windows=windows,
    )
    set_seed(options.seed)
    if options.gradient_checkpointing:
        monkey.model.activation_checkpointing_enable({"use_reentrant": False})
    return add_lora(monkey.model, config)


def training_arguments(options: FinetuneOptions, monkey: Monkey) -> TrainingArguments:
    weight = monkey.model.transformer.wte.weight
    on_cpu = weight.device.type == "cpu"
    return TrainingArguments(
        output_dir=str(options.out / CHECKPOINTS_DIR),
        num_train_epochs=options.epochs,
        max_steps=options.max_steps or -1,
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        learning_rate=options.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=options.warmup_ratio,  # a float below 1 is a fraction of the steps
        weight_decay=0.0,
        bf16=weight.dtype == torch.bfloat16,
        fp16=weight.dtype == torch.float16,
        use_cpu=on_cpu,
        seed=options.seed,
        data_seed=options.seed,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=KEEP_CHECKPOINTS,
        remove_unused_columns=False,  # pixel_values is not in peft's forward signature
        label_names=["labels"],
        dataloader_pin_memory=not on_cpu,
        ddp_find_unused_parameters=False,
        report_to="none",
        disable_tqdm=True,  # our own progress bar (rich, stderr, terminals only)
        log_level="error",  # the Trainer's notices (checkpoint rotation and the like) are not the user's business
        log_level_replica="error",
    )


# ---------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------
def answer_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """Cross-entropy of each next token at the labelled positions (the answer and its <|endoftext|>).

    The logits may cover only the last columns (`logits_to_keep`); the logit at column p predicts label p + 1.
    Summed, then divided by the labelled tokens of the whole optimizer step when the Trainer counted them
    (all micro-batches and processes), else by this batch's.
    """
    logits = outputs.logits[:, :-1]
    targets = labels[:, labels.shape[1] - logits.shape[1] :].to(logits.device)
    answer = targets != IGNORE_INDEX
    loss = F.cross_entropy(logits[answer].float(), targets[answer], reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else answer.sum()
    return loss / count


class AnswerLossTrainer(Trainer):
    """The Trainer with `answer_loss`, and no KV cache in the training forward (nothing would read it)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(compute_loss_func=answer_loss, **kwargs)

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        return super().compute_loss(model, {**inputs, "use_cache": False}, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# The output folder: resume, fingerprint, training arguments, loss log
# ---------------------------------------------------------------------------------------------------------
def prepare_out(options: FinetuneOptions, fingerprint: dict[str, Any]) -> Path | None:
    """The checkpoint to resume from (None: start fresh); refuses to mix two runs in one folder."""
    checkpoint = last_checkpoint(options.out)
    if not options.resume:
        if checkpoint is not None or (options.out / ADAPTER_WEIGHTS).exists():
            raise UsageError(
                f"{options.out} already holds a training run; pass --resume to continue it, or choose another --out"
            )
        return None
    recorded = options.out / TRAINING_ARGS_FILE
    if recorded.is_file():
        _check_same_run(recorded, fingerprint)
    return checkpoint


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (one cut short by a crash while saving has no trainer_state.json)."""
    folder = out / CHECKPOINTS_DIR
    if not folder.is_dir():
        return None
    complete = [
        path
        for path in folder.iterdir()
        if path.name.startswith(CHECKPOINT_PREFIX)
        and path.name[len(CHECKPOINT_PREFIX) :].isdigit()
        and (path / CHECKPOINT_COMPLETE).is_file()
    ]
    return max(complete, key=checkpoint_step, default=None)


def checkpoint_step(checkpoint: Path | None) -> int:
    return int(checkpoint.name[len(CHECKPOINT_PREFIX) :]) if checkpoint is not None else 0


def run_fingerprint(options: FinetuneOptions) -> dict[str, Any]:
    """What decides the trained weights: every option but those in _FREE_ON_RESUME, and the data's hashes."""
    settings = {k: _jsonable(v) for k, v in asdict(options).items() if k not in _FREE_ON_RESUME}
    settings["model"] = base_model_identity(options.model)
    settings["data_sha256"] = _file_sha256(options.data)
    if options.eval_data is not None:
        settings["eval_data_sha256"] = _file_sha256(options.eval_data)
    return settings


def base_model_identity(model: str) -> str:
    """A local checkpoint as an absolute path (a merge or resume may run from another folder), else the hub id."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def _check_same_run(recorded: Path, fingerprint: dict[str, Any]) -> None:
    try:
        before = json.loads(recorded.read_text(encoding="utf-8"))["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{recorded}: unreadable, so this run cannot be resumed safely; use another --out") from None
    for key in sorted(set(before) | set(fingerprint)):
        if before.get(key) != fingerprint.get(key):
            raise UsageError(
                f"--resume: {recorded.parent} was trained with {key} = {before.get(key)!r}, now "
                f"{fingerprint.get(key)!r}; resume with the same settings and data, or choose another --out"
            )


def _write_training_args(
    options: FinetuneOptions,
    fingerprint: dict[str, Any],
    args: TrainingArguments,
    train_data: LoadedData,
    eval_data: LoadedData | None,
) -> None:
    import peft
    import transformers

    from monkey_cli import __version__

    record = {
        "base_model": base_model_identity(options.model),
        "options": {k: _jsonable(v) for k, v in asdict(options).items()},
        "fingerprint": fingerprint,
        "data": {"items": train_data.total, "used": len(train_data.examples), "skipped": train_data.skipped},
        "eval_data": None
        if eval_data is None
        else {"items": eval_data.total, "used": len(eval_data.examples), "skipped": eval_data.skipped},
        "trainer": json.loads(args.to_json_string()),
        "versions": {
            "monkey-cli": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }
    _write_atomic(options.out / TRAINING_ARGS_FILE, json.dumps(record, indent=2) + "\n")


def _truncate_loss_log(path: Path, step: int) -> None:
    """On resume, drop the lines of steps after the checkpoint: they are about to be trained again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _log_step(line) <= step]
    _write_atomic(path, "".join(line + "\n" for line in kept))


def _log_step(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf  # an unreadable line (cut by a crash mid-write): drop it


def _write_atomic(path: Path, text: str) -> None:
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(text, encoding="utf-8")
    os.replace(scratch, path)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return "unreadable"  # load_data reports the actual problem
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


# ---------------------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------------------
class StopOnInterrupt(TrainerCallback):
    """First Ctrl-C: finish this optimizer step, save a checkpoint, stop. Second Ctrl-C: stop at once.

    With several processes the decision is shared (every process stops after the same step), since a
    process that went on alone would wait forever for the others.
    """

    def __init__(self, announce: bool = True) -> None:
        self.requested = False
        self.announce = announce  # only one process of a multi-GPU run says so

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum: int, frame: Any) -> None:
            if self.requested:
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self.requested = True
            if self.announce:
                _stderr("stopping after this step and saving a checkpoint (Ctrl-C again to stop now)")

        signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if self._anyone_asked(args):
            self.requested = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def _anyone_asked(self, args: TrainingArguments) -> bool:
        if args.world_size == 1:
            return self.requested
        import torch.distributed as dist

        flag = torch.tensor([int(self.requested)], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class LossLog(TrainerCallback):
    """loss.jsonl: one line per optimizer step ({"step", "epoch", "loss", "learning_rate", "grad_norm"})."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last_loss: float | None = None

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or "loss" not in logs:
            return
        self.last_loss = float(logs["loss"])
        if state.is_world_process_zero:
            record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
            record.update({k: logs[k] for k in ("loss", "learning_rate", "grad_norm") if k in logs})
            self.write(record)


class HeldOutEval(TrainerCallback):
    """After each epoch: greedy answers to the held-out questions, scored with the eval metric.

    Not after Ctrl-C (the Trainer ends the epoch early when it stops): the user is waiting to get out.
    """

    def __init__(
        self,
        monkey: Monkey,
        examples: Sequence[Example],
        metric: str,
        loss_log: LossLog,
        evaluations: list[dict[str, Any]],
        log: Log,
        stop: StopOnInterrupt,
    ) -> None:
        self.monkey = monkey
        self.stop = stop
        self.examples = list(examples)
        self.metric = metric
        self.loss_log = loss_log
        self.evaluations = evaluations
        self.log = log

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or self.stop.requested:
            return
        started = time.perf_counter()
        result = evaluate(self.monkey, self.examples, self.metric, batch_size=args.per_device_train_batch_size)
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **result}
        self.evaluations.append(record)
        self.loss_log.write(record)
        seconds = time.perf_counter() - started
        score, items = result["eval_score"], result["eval_items"]
        self.log(f"epoch {record['epoch']:g}: {self.metric} {score:.4f} on {items} held-out items ({seconds:.0f} s)")


def evaluate(monkey: Monkey, examples: Sequence[Example], metric: str, batch_size: int = 1) -> dict[str, Any]:
    """Greedy answers of the model as it is now (adapter included) to the examples, scored against theirs.

    Answers may run EVAL_EXTRA_TOKENS longer than the longest expected one.
    """
    from monkey_cli.evaluation.metrics import ScoredItem, aggregate, score_item

    model = monkey.model
    longest = max(sum(label != IGNORE_INDEX for label in example.labels) for example in examples)
    # As in training: trained float32 window-LoRA copies next to a bfloat16 tower need autocast.
    weight = model.transformer.wte.weight
    autocast = torch.autocast(weight.device.type, dtype=weight.dtype, enabled=weight.dtype != torch.float32)
    was_training = model.training
    model.eval()
    items = []
    try:
        with autocast:
            for start in range(0, len(examples), batch_size):
                batch = examples[start : start + batch_size]
                images = [open_page(e.image, e.page, monkey.processor.input_size) for e in batch]
                prompts = [e.prompt for e in batch]
                answers = monkey.generate(images, prompts, max_new_tokens=longest + EVAL_EXTRA_TOKENS)
                for example, answer in zip(batch, answers, strict=True):
                    score, _ = score_item(metric, answer, [example.answer])
                    items.append(ScoredItem(key=example.name, score=score))
    finally:
        model.train(was_training)
    result = aggregate(metric, items)
    return {"eval_metric": metric, "eval_score": result.score, "eval_items": result.n}

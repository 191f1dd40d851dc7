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
  `loss.jsonl` (one line per step, one per held-out evaluation), `checkpoints/checkpoint-N`, each recorded
  in the folder's manifest (`monkey_cli.output_folder`): a file monkey did not write is never replaced or
  deleted (a run is refused before training, naming it), and the checkpoints are rotated by monkey, which
  deletes only what the Trainer wrote in the checkpoint folders it reserved;
* resuming from the last complete checkpoint, once the settings and data are checked to be the same and
  the checkpoint itself is checked against the run (`check_checkpoint`);
* Ctrl-C: the current step finishes, a checkpoint is saved, and training stops (a second Ctrl-C: at once).

This module imports torch and transformers: import it only where training happens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
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
from monkey_cli.errors import CheckpointError, MonkeyError, UsageError
from monkey_cli.finetune.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DECODER_TARGETS,
    TRAINING_ARGS_FILE,
    AdapterConfig,
    add_lora,
    base_model_identity,
    check_adapter_weights,
    lora_config,
    quiet_library_warnings,
    read_adapter_config,
    save_adapter,
    target_pattern,
)
from monkey_cli.finetune.collator import MonkeyCollator
from monkey_cli.finetune.data import IGNORE_INDEX, Example, LoadedData, MonkeyDataset, load_data, open_page

if TYPE_CHECKING:  # pragma: no cover
    from peft import PeftModel

    from monkey_cli.api import Monkey
    from monkey_cli.output_folder import OutputFolder

LOSS_LOG_FILE = "loss.jsonl"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_COMPLETE = "trainer_state.json"  # the Trainer writes it last into a checkpoint folder
KEEP_CHECKPOINTS = 2
# The files of a run folder that monkey writes itself, and what the Trainer writes into a checkpoint folder
# (only these are ever deleted from one when it is rotated out, and a checkpoint holding anything else is
# not resumed from).
RUN_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINING_ARGS_FILE, "loss.jsonl")
TRAINER_FILES = re.compile(
    r"adapter_model\.safetensors|adapter_config\.json|README\.md|optimizer\.pt|scheduler\.pt|scaler\.pt"
    r"|rng_state(?:_\d{1,5})?\.pth|trainer_state\.json|training_args\.bin"
)
TORCH_FILES = re.compile(r"optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(?:_\d{1,5})?\.pth")
MAX_STATE_BYTES = 64 << 20
EVAL_METRICS = ("anls", "accuracy", "relaxed_accuracy")
EVAL_EXTRA_TOKENS = 32  # a held-out answer may run this much longer than the longest expected one
# Options that cannot change the trained weights, so a resume may change them (gradient checkpointing
# recomputes the same activations, with the same dropout masks; skip_bad only says whether a run that skips
# many items may train at all: the same data trains the same items).
_FREE_ON_RESUME = frozenset({"resume", "save_steps", "device", "gradient_checkpointing", "skip_bad"})

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
    skip_bad: bool = False  # train even when more than data.MAX_SKIPPED_SHARE of the items were skipped

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
    check_run_folder(options.out)
    checkpoint = prepare_out(options, fingerprint)
    train_data, eval_data = load_datasets(options, log if main_process else _silent)
    monkey = load_base(options)
    if checkpoint is not None:
        check_checkpoint(checkpoint, options, monkey.model, _expected_max_steps(options, len(train_data.examples)))
    model = with_lora(monkey, options)
    args = training_arguments(options, monkey)
    folder = open_run_folder(options.out) if main_process else None
    try:
        return _run_trainer(options, callbacks, log, fingerprint, checkpoint, train_data, eval_data, monkey, model,
                            args, folder)  # fmt: skip
    finally:
        if folder is not None:
            folder.close()


def _run_trainer(
    options: FinetuneOptions,
    callbacks: Sequence[TrainerCallback],
    log: Log,
    fingerprint: dict[str, Any],
    checkpoint: Path | None,
    train_data: LoadedData,
    eval_data: LoadedData | None,
    monkey: Monkey,
    model: PeftModel,
    args: TrainingArguments,
    folder: OutputFolder | None,
) -> TrainResult:
    main_process = folder is not None
    if folder is not None:
        _write_training_args(folder, options, fingerprint, args, train_data, eval_data)
        _truncate_loss_log(folder, checkpoint_step(checkpoint))

    stop = StopOnInterrupt(announce=main_process)
    loss_log = LossLog(folder)
    evaluations: list[dict[str, Any]] = []
    all_callbacks: list[TrainerCallback] = [stop, loss_log, *callbacks]
    if folder is not None:
        all_callbacks.append(CheckpointRecords(folder))  # after `stop`: it sees the save an interrupt asks for
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
    if folder is not None and not stop.requested:
        save_adapter(model, options.out, folder=folder)
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
        loaded.append(data.require_examples(options.skip_bad))
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
        save_total_limit=None,  # monkey rotates them (CheckpointRecords): only what it reserved is ever deleted
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
def check_run_folder(out: Path) -> None:
    """Refuse (one line naming the file) a --out that holds, where a run writes, anything monkey's manifest
    does not list: the run's own files (adapter, training_args.json, loss.jsonl) would be replaced, and
    everything under checkpoints/ could be deleted by the checkpoint rotation. Nothing is written here."""
    import warnings

    from monkey_cli.output_folder import OutputFolder

    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    with warnings.catch_warnings(record=True):  # an unreadable manifest: then nothing there is known to be ours
        warnings.simplefilter("always")
        folder = OutputFolder(out)
    try:
        for name in RUN_FILES:
            if os.path.lexists(out / name) and not folder.owns(name):
                raise UsageError(_not_ours(out / name, out))
        checkpoints = out / CHECKPOINTS_DIR
        if not os.path.lexists(checkpoints):
            return
        if checkpoints.is_symlink() or not checkpoints.is_dir():
            raise UsageError(f"--out {out}: {checkpoints} is a symbolic link or not a folder; monkey never writes "
                             "through one (remove it, or choose another --out)")  # fmt: skip
        for entry in sorted(os.scandir(checkpoints), key=lambda entry: entry.name):
            relative = f"{CHECKPOINTS_DIR}/{entry.name}"
            if not folder.owns(relative) or entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                raise UsageError(_not_ours(Path(entry.path), out))
    finally:
        folder.close()


def _not_ours(path: Path, out: Path) -> str:
    return (
        f"--out {out}: {path} was not written by monkey (its manifest does not list it), and a training run there "
        "would replace or delete it: move it away, or choose another --out"
    )


def open_run_folder(out: Path) -> OutputFolder:
    from monkey_cli.output_folder import OutputFolder

    return OutputFolder(out)


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


def _check_same_run(recorded: Path, fingerprint: dict[str, Any]) -> None:
    from monkey_cli.model.sources import read_regular_file

    try:
        before = json.loads(read_regular_file(recorded, MAX_STATE_BYTES, error=UsageError))["fingerprint"]
        if not isinstance(before, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError, RecursionError, MonkeyError):
        raise UsageError(f"{recorded}: unreadable, so this run cannot be resumed safely; use another --out") from None
    for key in sorted(set(before) | set(fingerprint)):
        if before.get(key) != fingerprint.get(key):
            raise UsageError(
                f"--resume: {recorded.parent} was trained with {key} = {before.get(key)!r}, now "
                f"{fingerprint.get(key)!r}; resume with the same settings and data, or choose another --out"
            )


def check_checkpoint(checkpoint: Path, options: FinetuneOptions, model: Any, max_steps: int | None) -> None:
    """Before resuming from `checkpoint`, check that it is one this run saved, and safe to load: only the files
    the Trainer writes, each a regular file; trainer_state.json valid JSON whose step is the folder's and
    within the run's steps; the adapter's config this run's LoRA and its weights exactly the tensors and
    shapes of this run's adapter for this model (`model`: the base, before LoRA is added); every torch file
    loadable as weights only (no pickled code). Each failure is one line naming the file (CheckpointError)."""
    from monkey_cli.model.sources import read_regular_file

    for entry in sorted(os.scandir(checkpoint), key=lambda entry: entry.name):
        if not TRAINER_FILES.fullmatch(entry.name):
            raise CheckpointError(f"{entry.path}: not a file the Trainer writes into a checkpoint; refusing to "
                                  "resume from it (remove it, or the checkpoint folder)")  # fmt: skip
        if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            raise CheckpointError(f"{entry.path}: not a regular file; refusing to resume from it")
    state_path = checkpoint / CHECKPOINT_COMPLETE
    try:
        state = json.loads(read_regular_file(state_path, MAX_STATE_BYTES))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{state_path}: not valid JSON ({type(exc).__name__}); remove {checkpoint} to resume "
                              "from the checkpoint before it") from None  # fmt: skip
    step = state.get("global_step") if isinstance(state, dict) else None
    saved_max = state.get("max_steps") if isinstance(state, dict) else None
    if not _whole(step) or step != checkpoint_step(checkpoint):
        raise CheckpointError(f"{state_path}: its global_step ({_shown(step)}) is not this checkpoint's step "
                              f"({checkpoint_step(checkpoint)}); refusing to resume from it")  # fmt: skip
    if not _whole(saved_max) or step > saved_max or (max_steps is not None and saved_max != max_steps):
        wanted = f" (this run has {max_steps})" if max_steps is not None else ""
        raise CheckpointError(f"{state_path}: step {step} of max_steps {_shown(saved_max)} is not a step of this "
                              f"run{wanted}; refusing to resume from it")  # fmt: skip
    _check_checkpoint_adapter(checkpoint, options, model)
    for entry in sorted(os.scandir(checkpoint), key=lambda entry: entry.name):
        if TORCH_FILES.fullmatch(entry.name):
            _check_weights_only(Path(entry.path))


def _check_checkpoint_adapter(checkpoint: Path, options: FinetuneOptions, model: Any) -> None:
    config = read_adapter_config(checkpoint)
    wanted = AdapterConfig(options.lora_r, float(options.lora_alpha), options.lora_dropout,
                           tuple(options.lora_targets), options.train_window_lora)  # fmt: skip
    differs = {
        "r": config.r != wanted.r,
        "lora_alpha": config.alpha != wanted.alpha,
        "lora_dropout": config.dropout != wanted.dropout,
        "target_modules": set(config.targets) != set(wanted.targets),
        "modules_to_save": config.window_lora != wanted.window_lora,
    }
    for label, different in differs.items():
        if different:
            raise CheckpointError(f"{checkpoint / ADAPTER_CONFIG}: its {label} is not this run's; refusing to "
                                  "resume from it")  # fmt: skip
    check_adapter_weights(checkpoint, model, config)


def _check_weights_only(path: Path) -> None:
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - an UnpicklingError for code, anything else for damage
        import pickle

        if isinstance(exc, pickle.UnpicklingError):
            why = "it holds pickled objects besides tensors, which could run code"
        else:
            why = re.sub(r"[\x00-\x1f\x7f]\[?[0-9;]*m?", "", " ".join(str(exc).split()))[:100] or type(exc).__name__
        raise CheckpointError(f"{path}: not a weights-only torch file, so it is not loaded ({why})") from None


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _expected_max_steps(options: FinetuneOptions, examples: int) -> int | None:
    """The optimizer steps of this run, as the Trainer counts them (one process; None under torchrun, where
    the data is split by the launcher)."""
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        return None
    if options.max_steps is not None:
        return options.max_steps
    batches = math.ceil(examples / options.batch_size)
    per_epoch = max(batches // options.grad_accum + int(batches % options.grad_accum > 0), 1)
    return math.ceil(options.epochs * per_epoch)


def _write_training_args(
    folder: OutputFolder,
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
    folder.write(TRAINING_ARGS_FILE, (json.dumps(record, indent=2) + "\n").encode(), {"finetune": "settings"})


def _truncate_loss_log(folder: OutputFolder, step: int) -> None:
    """On resume, drop the lines of steps after the checkpoint: they are about to be trained again."""
    data = folder.read(LOSS_LOG_FILE, limit=1 << 30) if folder.owns(LOSS_LOG_FILE) else None
    if data is None:
        return
    kept = [line for line in data.decode("utf-8", "replace").splitlines() if _log_step(line) <= step]
    folder.write(LOSS_LOG_FILE, "".join(line + "\n" for line in kept).encode(), {"finetune": "loss"})


def _log_step(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return math.inf  # an unreadable line (cut by a crash mid-write): drop it


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
    """loss.jsonl: one line per optimizer step ({"step", "epoch", "loss", "learning_rate", "grad_norm"}),
    appended through the run folder (recorded as monkey's; None in the other processes of a multi-GPU run)."""

    def __init__(self, folder: OutputFolder | None) -> None:
        self.folder = folder
        self.last_loss: float | None = None

    def write(self, record: dict[str, Any]) -> None:
        if self.folder is None:
            return
        with self.folder.open_file(LOSS_LOG_FILE, append=True) as stream:
            stream.write((json.dumps(record) + "\n").encode("utf-8"))

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


class CheckpointRecords(TrainerCallback):
    """The Trainer's checkpoints, kept by monkey's rules: each checkpoint folder is recorded in the run
    folder's manifest before the Trainer writes it (so everything in it is known to be the Trainer's), and
    after each save all but the newest KEEP_CHECKPOINTS are removed, deleting only the files the Trainer
    writes there (a file of anyone else's keeps its folder)."""

    def __init__(self, folder: OutputFolder) -> None:
        self.folder = folder

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if control.should_save:
            self._reserve(state.global_step)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._reserve(state.global_step)
        steps = sorted(self._recorded())
        for step in steps[:-KEEP_CHECKPOINTS]:
            self.folder.clear_folder(f"{CHECKPOINTS_DIR}/{CHECKPOINT_PREFIX}{step}", TRAINER_FILES)

    def _reserve(self, step: int) -> None:
        relative = f"{CHECKPOINTS_DIR}/{CHECKPOINT_PREFIX}{step}"
        if not self.folder.owns(relative):
            self.folder.record({relative: {"finetune": "checkpoint"}})

    def _recorded(self) -> list[int]:
        prefix = f"{CHECKPOINTS_DIR}/{CHECKPOINT_PREFIX}"
        steps = [key[len(prefix) :] for key in self.folder.recorded() if key.startswith(prefix)]
        return [int(step) for step in steps if step.isdigit()]


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

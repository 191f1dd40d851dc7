"""`monkey finetune DATA --out DIR` (train a LoRA adapter) and `monkey finetune merge DIR --out FOLDER`.

Thin commands over `monkey_cli.finetune`; torch, transformers and peft are imported inside them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import typer
from typer.core import TyperGroup

from monkey_cli.cli import app
from monkey_cli.cli.common import EXIT_INTERRUPTED, needs_extra, user_errors, warn
from monkey_cli.cli.options import RenderTimeout
from monkey_cli.documents.renderer import DEFAULT_RENDER_TIMEOUT
from monkey_cli.finetune.data import MAX_SKIPPED_SHARE
from monkey_cli.tasks import DEFAULT_MODEL


class _TrainByDefault(TyperGroup):
    """`monkey finetune DATA ...` trains (the `train` command); `monkey finetune merge ...` merges."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["train", *args]
        return super().parse_args(ctx, args)


finetune_app = typer.Typer(
    cls=_TrainByDefault,
    help=(
        "Fine-tune Monkey on your own documents (LoRA / QLoRA). `monkey finetune DATA --out DIR` trains (the "
        "`train` command); `monkey finetune merge DIR --out FOLDER` writes a full checkpoint."
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(finetune_app, name="finetune")

TARGETS_HELP = "Decoder layers that get LoRA, comma-separated: attn.c_attn, attn.c_proj, mlp.w1, mlp.w2, mlp.c_proj."


@finetune_app.command("train")
def train_command(
    data: Path = typer.Argument(
        ..., help="Training data: a JSON list or JSON lines of conversations (docs/finetune.md)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the adapter, checkpoints and logs."),
    model: str = typer.Option(
        DEFAULT_MODEL, "--model", envvar="MONKEY_MODEL", help="Base checkpoint folder or hub id."
    ),
    eval_data: Path | None = typer.Option(None, "--eval-data", help="Held-out data (same format), scored each epoch."),
    eval_metric: str = typer.Option("anls", "--eval-metric", help="anls, accuracy or relaxed_accuracy."),
    epochs: float = typer.Option(3.0, "--epochs", help="Passes over the data."),
    max_steps: int | None = typer.Option(
        None, "--max-steps", min=1, help="Stop after this many steps (overrides --epochs)."
    ),
    learning_rate: float = typer.Option(1e-4, "--learning-rate", "--lr", help="Peak learning rate (cosine schedule)."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Items per step on each GPU."),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1, help="Batches accumulated into one optimizer step."),
    warmup_ratio: float = typer.Option(0.02, "--warmup-ratio", help="Fraction of the steps with a linear warm-up."),
    lora_r: int = typer.Option(16, "--lora-r", min=1, help="LoRA rank."),
    lora_alpha: int = typer.Option(32, "--lora-alpha", min=1, help="LoRA alpha (the update is scaled by alpha / r)."),
    lora_dropout: float = typer.Option(0.05, "--lora-dropout", help="Dropout on the LoRA input."),
    lora_target: str = typer.Option(
        ",".join(("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")), "--lora-target", help=TARGETS_HELP
    ),
    train_window_lora: bool = typer.Option(
        False, "--train-window-lora", help="Also train the ViT's per-window LoRA (the original's fix_vit=False)."
    ),
    max_length: int = typer.Option(
        2048, "--max-length", min=1, help="Longest item in tokens (image span included); longer items are skipped."
    ),
    seed: int = typer.Option(42, "--seed", help="Seed for the adapter's initial values, the data order and dropout."),
    save_steps: int = typer.Option(
        100, "--save-steps", min=1, help="Save a checkpoint every N steps (the last 2 are kept)."
    ),
    gradient_checkpointing: bool = typer.Option(
        True,
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute decoder activations in the backward pass (less memory).",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    skip_bad: bool = typer.Option(
        False, "--skip-bad",
        help=f"Train even when more than {MAX_SKIPPED_SHARE:.0%} of the items were skipped (each is named on stderr).",
    ),
    device: str = typer.Option(
        "auto", "--device", envvar="MONKEY_DEVICE", help="auto, cpu, cuda or cuda:N (under torchrun: each rank's GPU)."
    ),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 where supported), bfloat16, float16 or float32."),
    quant: str = typer.Option(
        "auto", "--quant", envvar="MONKEY_QUANT", help="auto (4bit on CUDA, none on CPU), none, 8bit or 4bit (QLoRA)."
    ),
    render_timeout: RenderTimeout = DEFAULT_RENDER_TIMEOUT,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks for errors."),
) -> None:
    """Train a LoRA adapter: monkey finetune train.json --model echo840/Monkey-Chat --out runs/forms."""
    with user_errors(verbose):
        needs_extra("finetune")
        from monkey_cli.documents.renderer import process_budget
        from monkey_cli.finetune.trainer import FinetuneOptions, train

        options = FinetuneOptions(
            data=data,
            out=out,
            model=model,
            eval_data=eval_data,
            eval_metric=eval_metric,
            epochs=epochs,
            max_steps=max_steps,
            learning_rate=learning_rate,
            batch_size=batch_size,
            grad_accum=grad_accum,
            warmup_ratio=warmup_ratio,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            lora_targets=tuple(t.strip() for t in lora_target.split(",") if t.strip()),
            train_window_lora=train_window_lora,
            max_length=max_length,
            seed=seed,
            save_steps=save_steps,
            gradient_checkpointing=gradient_checkpointing,
            device=device,
            dtype=None if dtype == "auto" else dtype,
            quant=quant,
            resume=resume,
            skip_bad=skip_bad,
        )
        callbacks: list[Any] = []
        if sys.stderr.isatty():
            from monkey_cli.finetune.progress import TrainingProgress

            callbacks.append(TrainingProgress())
        try:
            with process_budget(render_timeout):
                result = train(options, callbacks=callbacks)
        finally:
            for callback in callbacks:
                callback.close()
        if result.interrupted:
            if result.main_process:
                warn(
                    f"interrupted after step {result.steps} of {result.max_steps}; checkpoint saved; "
                    "run the same command with --resume to continue"
                )
            raise typer.Exit(EXIT_INTERRUPTED)
        if result.main_process:
            data = result.train_data
            loss = f", last loss {result.final_loss:.4f}" if result.final_loss is not None else ""
            warn(
                f"trained {result.steps} steps on {len(data.examples)} of {data.total} items{loss}; "
                f"adapter in {result.out}"
            )


@finetune_app.command("merge")
def merge_command(
    adapter: Path = typer.Argument(..., help="The --out folder of a finetune run (or any adapter folder it wrote)."),
    out: Path = typer.Option(..., "--out", "-o", help="New folder for the merged checkpoint."),
    model: str | None = typer.Option(
        None, "--model", help="Base checkpoint: the one the adapter was trained on (the default; another is refused)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks for errors."),
) -> None:
    """Write base + adapter as a full checkpoint that --model loads with no adapter."""
    with user_errors(verbose):
        needs_extra("finetune")
        from monkey_cli.finetune.adapters import adapter_model, merge_adapter

        base = adapter_model(adapter, model)
        merge_adapter(base, adapter, out)
        warn(f"wrote the merged model to {out} (base: {base}, adapter: {adapter})")

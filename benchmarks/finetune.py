"""Training speed and memory of `monkey finetune`: LoRA in bf16 and QLoRA on a 4-bit base.

    python benchmarks/finetune.py --tokenizer /path/to/qwen.tiktoken --tiny /path/to/tiny-monkey-sharp

With a CUDA GPU: the released architecture with random weights, written once in the released on-disk format
by benchmarks/quant.py's writer (19.4 GB, /dev/shm when it has room), then trained through the real path
(`monkey_cli.finetune.trainer.train`: `Monkey.load`, peft LoRA on the decoder, the transformers Trainer,
gradient checkpointing) at batch 1 with one page and a ~1,300-token item. Each variant runs in a fresh
process, so every peak is its own: `lora-bf16` (--quant none, bfloat16) and `qlora-4bit` (--quant 4bit, NF4,
bfloat16 compute). Without CUDA: the same on the tiny checkpoint on the CPU (`lora-fp32`, `lora-bf16`,
`qlora-4bit`), which measures our code and the libraries rather than the model's compute.

Figures: the median time of the timed steps (after untimed warm-up steps) and steps/s from it, the weights'
memory and the peak of training (GPU: torch.cuda max allocated; CPU: the process's peak RSS). On the CPU the
load average is recorded too: on a shared machine other jobs slow some steps down, which the median absorbs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

import model as model_bench  # noqa: E402  (machine info, synthetic pages, memory helpers)
import quant as quant_bench  # noqa: E402  (the random-weight checkpoint in the released layout)

# variant -> (--quant, --dtype)
GPU_VARIANTS: dict[str, tuple[str, str]] = {"qlora-4bit": ("4bit", "bfloat16"), "lora-bf16": ("none", "bfloat16")}
CPU_VARIANTS: dict[str, tuple[str, str]] = {
    "lora-fp32": ("none", "float32"),
    "lora-bf16": ("none", "bfloat16"),
    "qlora-4bit": ("4bit", "float32"),
}
QUESTION = "What is the invoice number printed at the top of this page?"
ANSWER = "INV-2024-00417"
QLORA_GOAL_BYTES = 24 * 10**9  # the goal: QLoRA fits a 24 GB card


# ----------------------------------------------------------------------------------------------------
# One variant (runs in its own process)
# ----------------------------------------------------------------------------------------------------
def write_data(folder: Path, items: int) -> Path:
    """`items` copies of one synthetic A4 page with a VQA question and a short answer, in the original's format."""
    page = model_bench.synthetic_pages(1)[0]
    page.save(folder / "page.png")
    conversation = [
        {"from": "user", "value": f"<img>page.png</img> {QUESTION} Answer: "},
        {"from": "assistant", "value": ANSWER},
    ]
    data = [{"id": f"item-{n}", "conversations": conversation} for n in range(items)]
    path = folder / "train.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


class StepTimer:
    """A TrainerCallback noting when each step ends, plus memory at the start and the peak (GPU)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.ends: list[float] = []
        self.memory: dict[str, int] = {}

    def callback(self) -> Any:
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if timer.device.startswith("cuda"):
                    import torch

                    timer.memory["weights_bytes"] = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()

            def on_step_end(self, args, state, control, **kwargs):
                model_bench.synchronize(timer.device)
                timer.ends.append(time.perf_counter())

        return _Callback()


def run_variant(checkpoint: Path, variant: str, device: str, steps: int, warmup: int) -> dict[str, Any]:
    import torch

    from monkey_cli.finetune.trainer import FinetuneOptions, train

    variants = GPU_VARIANTS if device.startswith("cuda") else CPU_VARIANTS
    quant, dtype = variants[variant]
    timer = StepTimer(device)
    with tempfile.TemporaryDirectory() as scratch:
        data = write_data(Path(scratch), warmup + steps)
        options = FinetuneOptions(
            data=data,
            out=Path(scratch) / "run",
            model=str(checkpoint),
            device=device,
            dtype=dtype,
            quant=quant,
            max_steps=warmup + steps,
            batch_size=1,
            save_steps=10**6,  # no checkpoint inside the timed steps (the final adapter is written after them)
        )
        started = time.perf_counter()
        result = train(options, callbacks=[timer.callback()], log=lambda message: None)
        total_s = time.perf_counter() - started
        example = result.train_data.examples[0]
    timed = timer.ends[warmup - 1 :]  # from the end of the last warm-up step
    durations = [end - start for start, end in zip(timed[:-1], timed[1:], strict=True)]
    median = statistics.median(durations)
    row: dict[str, Any] = {
        "variant": variant,
        "quant": quant,
        "dtype": dtype,
        "device": device,
        "tokens_per_item": len(example.input_ids),
        "answer_tokens": sum(label != -100 for label in example.labels),
        "timed_steps": len(durations),
        "step_s": durations,
        "s_per_step": median,
        "steps_per_s": 1 / median,
        "run_s": total_s,
        "final_loss": result.final_loss,
        "trainable_parameters": sum(p.numel() for p in result.model.parameters() if p.requires_grad),
        "machine": model_bench.machine_info(device),
    }
    if device.startswith("cuda"):
        row.update(timer.memory)
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    else:
        row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        row["load_average_1m"] = os.getloadavg()[0]
    return row


def run_in_child(checkpoint: Path, variant: str, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """One variant in a fresh interpreter; a crash or a timeout becomes a row with the error."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        variant,
        "--checkpoint",
        str(checkpoint),
        "--device",
        args.device,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    return quant_bench.run_json_child(command, variant, timeout, env)


# ----------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------
def print_table(rows: Sequence[dict[str, Any]]) -> None:
    gb = model_bench.gb
    print(
        f"\n{'variant':<11} {'device':<7} {'tokens':>6} {'steps/s':>8} {'s/step':>7} {'weights GB':>10} {'peak GB':>8}"
    )
    for row in rows:
        if "error" in row:
            print(f"{row['variant']:<11} FAILED: {row['error']}")
            continue
        peak = row.get("peak_allocated_bytes", row.get("peak_rss_bytes"))
        print(
            f"{row['variant']:<11} {row['device']:<7} {row['tokens_per_item']:>6} {row['steps_per_s']:>8.3f} "
            f"{row['s_per_step']:>7.2f} {gb(row.get('weights_bytes')):>10} {gb(peak):>8}"
        )
    for row in rows:
        if row.get("variant") == "qlora-4bit" and "peak_allocated_bytes" in row:
            verdict = "fits" if row["peak_reserved_bytes"] <= QLORA_GOAL_BYTES else "does not fit"
            print(f"qlora-4bit: peak reserved {gb(row['peak_reserved_bytes'])} GB {verdict} in 24 GB")
    if rows and "peak_rss_bytes" in rows[0]:
        print("(CPU: peak GB is the process's peak resident memory, everything included)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, help="the real qwen.tiktoken (151643 ranks), for the GPU run")
    parser.add_argument("--tiny", type=Path, help="tiny checkpoint for the CPU run (e.g. tiny-monkey-sharp)")
    parser.add_argument("--device", help="cuda (default when available) or cpu")
    parser.add_argument("--variants", help="comma-separated (default: all for the device)")
    parser.add_argument("--steps", type=int, help="timed steps (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    parser.add_argument("--threads", type=int, help="CPU threads (OMP_NUM_THREADS of each variant)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per variant")
    parser.add_argument("--workdir", type=Path, help="where the full-size checkpoint is written")
    parser.add_argument("--keep", action="store_true", help="keep the full-size checkpoint for a later run")
    parser.add_argument("--json", type=Path, help="write every figure here")
    quant_bench.add_child_arguments(parser)
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step includes one-off work)")

    import torch

    if args.device is None:
        args.device = "cuda:0" if torch.cuda.is_available() else "cpu"
    on_gpu = args.device.startswith("cuda")
    if args.steps is None:
        args.steps = 10
    if args.child:
        row = run_variant(args.checkpoint, args.child, args.device, args.steps, args.warmup)
        args.child_out.write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
        return 0

    known = GPU_VARIANTS if on_gpu else CPU_VARIANTS
    variants = quant_bench.chosen_variants(parser, args.variants or ",".join(known), known, f" for {args.device}")
    report: dict[str, Any] = {"device": args.device, "steps": args.steps, "warmup": args.warmup, "rows": []}
    folder: Path | None = None
    if on_gpu:
        if args.tokenizer is None or not args.tokenizer.is_file():
            parser.error("the GPU run needs --tokenizer, the real qwen.tiktoken")
        args.scale = "full"  # what quant.py's checkpoint writer reads
        config = quant_bench.benchmark_config("full")
        from monkey_cli.model.memory import plan

        folder = (args.workdir or quant_bench.default_workdir(plan(config).weight_bytes)) / "checkpoint-full"
        report["checkpoint_write_s"] = quant_bench.write_in_child(args, folder)
        checkpoint = folder
    else:
        if args.tiny is None:
            parser.error("without CUDA, pass --tiny PATH (e.g. tiny-monkey-sharp) for the CPU run")
        checkpoint = args.tiny
    report["checkpoint"] = str(checkpoint)
    try:
        for variant in variants:
            print(f"{variant}: running", file=sys.stderr, flush=True)
            row = run_in_child(checkpoint, variant, args, args.timeout)
            if "error" in row:
                print(f"{variant}: FAILED ({row['error']})\n{row.get('log_tail', '')}", file=sys.stderr, flush=True)
            report["rows"].append(row)
            if args.json:
                args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    finally:
        if folder is not None and not args.keep:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    print_table(report["rows"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

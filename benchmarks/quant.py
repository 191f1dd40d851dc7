"""Memory and speed of --quant none / 8bit / 4bit (with and without --quant-vision), through the real loader.

    python benchmarks/quant.py --tokenizer /path/to/qwen.tiktoken --json quant.json

1. A random-weight checkpoint of the released architecture is written in the released on-disk format:
   config.json (model_type "monkey", the Qwen fields and the nested "visual" dict), qwen.tiktoken and
   bfloat16 safetensors shards with their index (about 19.4 GB). It is written once and reused while its
   folder holds a complete copy (`--workdir`, `--keep`).
2. Each variant runs in a fresh Python process (a clean CUDA context and allocator, so every peak is that
   variant's own): `Monkey.load(folder, device, dtype="bfloat16", quant=..., quant_vision=...)`, the same
   measurements as benchmarks/model.py at batch 1 and 8, and the memory plan
   (`monkey_cli.model.memory.plan`) for the same prompt length, batch and answer length.
3. One table: measured peaks next to the plan, load time, and the speed figures.

`--scale tiny` runs the same pipeline on a small config (CPU friendly) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

import model as model_bench  # noqa: E402  (the shared measurements)

# variant -> (quant, quant_vision)
VARIANTS: dict[str, tuple[str, bool]] = {
    "bf16": ("none", False),
    "8bit": ("8bit", False),
    "8bit+vision": ("8bit", True),
    "4bit": ("4bit", False),
    "4bit+vision": ("4bit", True),
}
DEFAULT_ORDER = "4bit,4bit+vision,8bit,bf16,8bit+vision"  # most wanted first: a time limit cuts the tail
SHARD_BYTES = 5 * 10**9  # the released checkpoints use ~2-5 GB shards; the loader takes any split
COMPLETE_MARKER = ".benchmark-complete"
FOUR_BIT_GOAL_BYTES = 9 * 10**9  # the target for --quant 4bit
MIN_VARIANT_SECONDS = 45  # below this a variant cannot even load the full-size model: skip it


# ----------------------------------------------------------------------------------------------------
# The checkpoint
# ----------------------------------------------------------------------------------------------------
def benchmark_config(scale: str) -> Any:
    """The released config, or (`tiny`) the same layout shrunk so a CPU can load and quantize it quickly.

    The tiny one keeps the real vocabulary and image tag ids, so the same qwen.tiktoken serves both.
    """
    from monkey_cli.model.configuration import REAL_VISUAL, real_monkey_config

    if scale == "full":
        return real_monkey_config()
    visual = {**REAL_VISUAL, "width": 64, "layers": 2, "heads": 4, "output_dim": 128}
    return real_monkey_config(
        hidden_size=128,
        num_attention_heads=2,
        kv_channels=64,
        num_hidden_layers=2,
        intermediate_size=512,
        visual=visual,
    )


def released_config_json(config: Any) -> dict[str, Any]:
    """config.json as the released checkpoints write it (original field names, remote-code map and all)."""
    fields = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "kv_channels",
        "intermediate_size",
        "seq_length",
        "max_position_embeddings",
        "rotary_emb_base",
        "rotary_pct",
        "layer_norm_epsilon",
        "use_dynamic_ntk",
        "use_logn_attn",
    )
    data: dict[str, Any] = {
        "architectures": ["MonkeyLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_monkey.MonkeyLMHeadModel",
        },
        "model_type": "monkey",
        "bf16": True,
        "fp16": False,
        "fp32": False,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
        "use_cache": False,
        "use_flash_attn": False,
        "tokenizer_type": "QWenTokenizer",
    }
    data.update({field: getattr(config, field) for field in fields})
    data["visual"] = dict(config.visual)
    return data


def shard_groups(shapes: dict[str, tuple[int, ...]], bytes_per_value: int, limit: int) -> list[list[str]]:
    """Tensor names in state-dict order, cut into consecutive groups of at most `limit` bytes."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = bytes_per_value
        for dim in shape:
            nbytes *= dim
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def write_random_checkpoint(folder: Path, config: Any, tokenizer_file: Path, device: str) -> float:
    """Write the checkpoint (unless a complete one for the same config is there); returns seconds spent."""
    import torch
    from safetensors.torch import save_file

    from monkey_cli.model.loading import SAFETENSORS_INDEX, expected_shapes

    config_json = released_config_json(config)
    marker = folder / COMPLETE_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == config_json:
        print(f"checkpoint: reusing {folder}", file=sys.stderr, flush=True)
        return 0.0
    started = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config_json, indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(tokenizer_file, folder / "qwen.tiktoken")

    shapes = expected_shapes(config)
    groups = shard_groups(shapes, 2, SHARD_BYTES)
    generator = torch.Generator(device=device).manual_seed(0)
    weight_map: dict[str, str] = {}
    total = 0
    for number, names in enumerate(groups, start=1):
        file_name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        # Drawn on the device (fast), kept on the host only one shard at a time.
        shard = {
            name: model_bench.random_value(name, shapes[name], torch.bfloat16, device, generator).cpu()
            for name in names
        }
        save_file(shard, str(folder / file_name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update(dict.fromkeys(names, file_name))
        print(f"checkpoint: wrote {file_name}", file=sys.stderr, flush=True)
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    marker.write_text(json.dumps(config_json))
    return time.perf_counter() - started


def default_workdir(needed_bytes: int) -> Path:
    """/dev/shm (RAM, no disk traffic) when it has room, else the temp folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 1.2 * needed_bytes:
        return shm / "monkey-bench"
    return Path(tempfile.gettempdir()) / "monkey-bench"


# ----------------------------------------------------------------------------------------------------
# One variant (runs in its own process)
# ----------------------------------------------------------------------------------------------------
def quantization_check(monkey: Any, quant: str, quant_vision: bool) -> dict[str, Any]:
    """Which Linear layers were actually converted (NF4 or int8 weight-only), against the plan's list."""
    from monkey_cli.model.memory import quantized_modules

    expected = set(quantized_modules(monkey.model.config, quant, quant_vision))
    converted = set()
    if quant != "none":
        import bitsandbytes as bnb

        from monkey_cli.model.quantization import is_int8_weight

        converted = {
            name
            for name, module in monkey.model.named_modules()
            if isinstance(module, bnb.nn.Linear4bit) or is_int8_weight(getattr(module, "weight", None))
        }
    return {
        "quantized_linears": len(converted),
        "expected_quantized_linears": len(expected),
        "unexpectedly_quantized": sorted(converted - expected)[:5],
        "unexpectedly_left": sorted(expected - converted)[:5],
    }


def run_variant(
    folder: Path, variant: str, device: str, batches: Sequence[int], new_tokens: int, repeats: int
) -> dict[str, Any]:
    import torch

    from monkey_cli import Monkey
    from monkey_cli.model import memory

    quant, quant_vision = VARIANTS[variant]
    on_gpu = device.startswith("cuda")
    result: dict[str, Any] = {"variant": variant, "quant": quant, "quant_vision": quant_vision}
    if on_gpu:
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info(device)
        result["context_bytes"] = total - free  # the CUDA context alone, before any tensor
        model_bench.reset_peak(device)
    started = time.perf_counter()
    monkey = Monkey.load(folder, device=device, dtype="bfloat16", quant=quant, quant_vision=quant_vision)
    result["load_s"] = time.perf_counter() - started
    if on_gpu:
        result["weights_bytes"] = torch.cuda.memory_allocated(device)
        result["load_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    result.update(quantization_check(monkey, quant, quant_vision))
    result["rows"] = model_bench.measure(monkey, batches, new_tokens, repeats)
    for row in result["rows"]:
        estimate = memory.plan(
            monkey.model.config,
            quant,
            "bfloat16",
            quant_vision=quant_vision,
            batch_size=row["batch"],
            prompt_tokens=row["prompt_tokens"],
            max_new_tokens=1 + new_tokens,
        )
        row["plan_total_bytes"] = estimate.total_bytes
        row["plan_weight_bytes"] = estimate.weight_bytes
        row["plan_activation_bytes"] = estimate.activation_bytes
        row["plan_overhead_bytes"] = estimate.overhead_bytes
    result["machine"] = model_bench.machine_info(device)
    return result


# ----------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------
def write_in_child(args: argparse.Namespace, folder: Path) -> float:
    """Write the checkpoint from another process, so that this one never holds GPU memory (its CUDA
    context and cached blocks would otherwise sit on the device under every variant's measurement)."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "seconds.json"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--write-checkpoint",
            str(folder),
            "--scale",
            args.scale,
            "--tokenizer",
            str(args.tokenizer),
            "--device",
            args.device,
            "--child-out",
            str(out),
        ]
        subprocess.run(command, check=True)
        return float(json.loads(out.read_text()))


def log_tail(text: str, chars: int = 4000) -> str:
    """The end of a child's output with runs of one repeated line (bitsandbytes warns per call) collapsed."""
    lines: list[str] = []
    repeats = 0
    for line in text.splitlines():
        if lines and line == lines[-1]:
            repeats += 1
            continue
        if repeats:
            lines.append(f"[previous line repeated {repeats} more times]")
            repeats = 0
        lines.append(line)
    if repeats:
        lines.append(f"[previous line repeated {repeats} more times]")
    return "\n".join(lines)[-chars:]


def add_child_arguments(parser: argparse.ArgumentParser, variants: Collection[str] | None = None) -> None:
    """The hidden options a benchmark passes to itself to run one variant in a fresh interpreter."""
    parser.add_argument("--child", choices=tuple(variants) if variants else None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)


def chosen_variants(parser: argparse.ArgumentParser, text: str, known: Collection[str], where: str = "") -> list[str]:
    """The comma-separated variants of `text`; any not in `known` is a usage error."""
    variants = [v.strip() for v in text.split(",") if v.strip()]
    if unknown := [v for v in variants if v not in known]:
        parser.error(f"unknown variant(s) {unknown}{where}; choose from {', '.join(known)}")
    return variants


def run_json_child(
    command: list[str], variant: str, timeout: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run `command` (a benchmark's child mode, which writes its result as JSON to the path given after
    --child-out) in a fresh interpreter; a crash or a timeout becomes a result with the error and the log."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "result.json"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        started = time.perf_counter()
        try:
            done = subprocess.run(
                [*command, "--child-out", str(out)], capture_output=True, text=True, timeout=timeout, env=env
            )
        except subprocess.TimeoutExpired as exc:
            tail = exc.stderr or b""
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            return {"variant": variant, "error": f"timed out after {timeout:.0f} s", "log_tail": log_tail(tail)}
        if done.returncode != 0 or not out.is_file():
            return {
                "variant": variant,
                "error": f"exit status {done.returncode} after {time.perf_counter() - started:.0f} s",
                "log_tail": log_tail(done.stdout + done.stderr),
            }
        return json.loads(out.read_text())


def run_in_child(args: argparse.Namespace, variant: str, folder: Path, timeout: float) -> dict[str, Any]:
    """Run one variant in a fresh interpreter; a crash or a timeout becomes a result with the error."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        variant,
        "--checkpoint",
        str(folder),
        "--device",
        args.device,
        "--batches",
        ",".join(map(str, args.batches)),
        "--new-tokens",
        str(args.new_tokens),
        "--repeats",
        str(args.repeats),
    ]
    return run_json_child(command, variant, timeout)


def print_table(results: Sequence[dict[str, Any]]) -> None:
    gb = model_bench.gb
    print(
        f"\n{'variant':<12} {'batch':>5} {'load s':>6} {'weights':>8} {'plan w':>7} {'load pk':>8} "
        f"{'peak':>7} {'plan':>7} {'dev used':>8} {'ViT ms':>7} {'prefill':>8} {'1st tok':>8} {'ms/tok':>7}"
    )
    print(f"{'':<12} {'':>5} {'':>6} {'GB':>8} {'GB':>7} {'GB':>8} {'GB':>7} {'GB':>7} {'GB':>8}")
    for result in results:
        if "error" in result:
            print(f"{result['variant']:<12} FAILED: {result['error']}")
            continue
        for row in result["rows"]:
            print(
                f"{result['variant']:<12} {row['batch']:>5} {result['load_s']:>6.0f} "
                f"{gb(result.get('weights_bytes')):>8} {gb(row['plan_weight_bytes']):>7} "
                f"{gb(result.get('load_peak_bytes')):>8} {gb(row.get('peak_allocated_bytes')):>7} "
                f"{gb(row['plan_total_bytes']):>7} {gb(row.get('device_used_bytes')):>8} {row['vit_ms']:>7.1f} "
                f"{row['prefill_ms']:>8.1f} {row['first_token_ms']:>8.1f} {row['decode_ms_per_token']:>7.2f}"
            )
    for result in results:
        if result.get("unexpectedly_quantized") or result.get("unexpectedly_left"):
            print(
                f"{result['variant']}: quantized layers differ from the plan: "
                f"extra {result['unexpectedly_quantized']}, missing {result['unexpectedly_left']}"
            )
        if result.get("quant") == "4bit" and "load_peak_bytes" in result:
            peak = max(result.get("load_peak_bytes") or 0, result["rows"][0].get("peak_allocated_bytes") or 0)
            verdict = "meets" if peak <= FOUR_BIT_GOAL_BYTES else "misses"
            print(f"{result['variant']}: batch-1 peak {gb(peak)} GB {verdict} the 9 GB goal")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, help="the real qwen.tiktoken (151643 ranks)")
    parser.add_argument("--variants", default=DEFAULT_ORDER, help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    parser.add_argument("--workdir", type=Path, help="where the checkpoint is written (default: /dev/shm or tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint for a later run")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--batches", type=model_bench.parse_batches, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=300, help="seconds allowed per variant")
    parser.add_argument(
        "--deadline", type=int, help="seconds for the whole run: later variants are skipped, the running one cut"
    )
    parser.add_argument("--json", type=Path, help="write the results here (rewritten after every variant)")
    add_child_arguments(parser, VARIANTS)
    parser.add_argument("--write-checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    if args.device is None:
        args.device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if args.write_checkpoint:
        seconds = write_random_checkpoint(
            args.write_checkpoint, benchmark_config(args.scale), args.tokenizer, args.device
        )
        args.child_out.write_text(json.dumps(seconds), encoding="utf-8")
        return 0
    if args.child:
        result = run_variant(args.checkpoint, args.child, args.device, args.batches, args.new_tokens, args.repeats)
        args.child_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return 0

    variants = chosen_variants(parser, args.variants, VARIANTS)
    if args.tokenizer is None or not args.tokenizer.is_file():
        parser.error("--tokenizer must name the real qwen.tiktoken")
    config = benchmark_config(args.scale)
    from monkey_cli.model.memory import plan

    started = time.perf_counter()
    folder = (args.workdir or default_workdir(plan(config).weight_bytes)) / f"checkpoint-{args.scale}"
    report: dict[str, Any] = {"scale": args.scale, "checkpoint": str(folder)}
    report["checkpoint_write_s"] = write_in_child(args, folder)
    report["results"] = []
    try:
        for variant in variants:
            timeout = float(args.timeout)
            if args.deadline is not None:
                timeout = min(timeout, args.deadline - (time.perf_counter() - started))
            if timeout < MIN_VARIANT_SECONDS:
                report["results"].append({"variant": variant, "error": "skipped: no time left", "log_tail": ""})
                continue
            print(f"{variant}: running", file=sys.stderr, flush=True)
            result = run_in_child(args, variant, folder, timeout)
            if "error" in result:
                print(f"{variant}: FAILED ({result['error']})\n{result['log_tail']}", file=sys.stderr, flush=True)
            report["results"].append(result)
            if args.json:
                args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print_table(report["results"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

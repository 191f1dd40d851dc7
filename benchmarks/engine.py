"""The generation engine against today's eager path, side by side, on the same random weights and machine.

    python benchmarks/engine.py                      # GPU: the released architecture; CPU: a deep, narrow stand-in
    python benchmarks/engine.py --json engine.json   # every figure, with the machine

One command, unattended. On a CUDA machine it writes a random-weight checkpoint of the released architecture
(9.7B parameters, bf16 safetensors in the released layout, ~19.4 GB in /dev/shm or the temp folder; a synthetic
vocabulary of the real size unless `--tokenizer` names the real qwen.tiktoken), then runs each variant (bf16,
4bit, 8bit) in a fresh process through the real loader (`Monkey.load`). On a machine without CUDA it does the
same with a stand-in: 32 decoder layers like the real model but 256 wide, so that the figures show the fixed
cost per step (Python, kernel launches, per-step set-up), which is what the engine removes.

Paths compared, per variant:
- eager: transformers' `generate()` with its DynamicCache (today's path, `Monkey.hf_generate_ids`), static
  batches: a batch decodes until its longest answer is done.
- engine: the static slot cache and decode step, eager (`--no-compile`).
- compiled: the same step captured by torch.compile (CUDA graphs on a GPU), with continuous batching.

Figures: decode ms/token at each batch size (median step, answer lengths forced with min/max_new_tokens so
random weights cannot stop early) and the fraction of the memory-bandwidth limit (decoder weight bytes read
per step over the device's measured copy bandwidth, divided by the step time); first-token latency (one page:
preprocessing, ViT, prefill, first token); pages/s for `ask` (short answers) and `read` (uneven answers, e.g.
50-500 tokens); peak memory of each path.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

import model as model_bench  # noqa: E402  (shared measurements)
import quant as quant_bench  # noqa: E402  (the random checkpoint writer)

# variant -> (quant, dtype)
VARIANTS: dict[str, tuple[str, str]] = {
    "bf16": ("none", "bfloat16"),
    "4bit": ("4bit", "bfloat16"),
    "8bit": ("8bit", "bfloat16"),
    "fp32": ("none", "float32"),
}
GPU_DEFAULTS = {"variants": "bf16,4bit,8bit", "batches": "1,8,32", "slots": 32, "pages": 64, "read": "50-500"}
CPU_DEFAULTS = {"variants": "fp32", "batches": "1,8", "slots": 8, "pages": 16, "read": "8-64"}
ASK_TOKENS = (4, 24)  # short answers: a number, a name, a date
STANDIN_LAYERS = 32
STANDIN_WIDTH = 256
REAL_VOCAB_RANKS = 151643  # BPE ranks of the released vocabulary: the image tags' ids follow them


# ----------------------------------------------------------------------------------------------------
# The checkpoint
# ----------------------------------------------------------------------------------------------------
def standin_config() -> Any:
    """32 decoder layers like the released model, 256 wide; a small vision tower; a byte-level vocabulary."""
    from monkey_cli.model.configuration import IMAGE_START_OFFSET, REAL_VISUAL, real_monkey_config

    image_start = 256 + IMAGE_START_OFFSET  # 256 single-byte ranks, then the special tokens
    visual = {**REAL_VISUAL, "width": 64, "layers": 2, "heads": 4, "output_dim": STANDIN_WIDTH}
    visual["image_start_id"] = image_start
    return real_monkey_config(
        hidden_size=STANDIN_WIDTH,
        num_attention_heads=STANDIN_WIDTH // 64,
        kv_channels=64,
        num_hidden_layers=STANDIN_LAYERS,
        intermediate_size=4 * STANDIN_WIDTH,
        vocab_size=512,
        visual=visual,
    )


def synthetic_vocab(path: Path, ranks: int) -> Path:
    """A tiktoken ranks file with `ranks` distinct tokens: the 256 bytes, then byte pairs, then triples.

    Only the count matters to the benchmark (it decides the special tokens' ids); text encodes into somewhat
    more tokens than with the real merges, which changes the ~15 text tokens of a prompt, not its 1280 image
    positions.
    """
    import base64
    import itertools

    def tokens():
        for length in itertools.count(1):
            for combo in itertools.product(range(256), repeat=length):
                yield bytes(combo)

    lines = [f"{base64.b64encode(token).decode()} {rank}" for rank, token in zip(range(ranks), tokens(), strict=False)]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return path


def checkpoint_config(device: str) -> Any:
    from monkey_cli.model.configuration import real_monkey_config

    return real_monkey_config() if device.startswith("cuda") else standin_config()


def write_checkpoint(folder: Path, device: str, tokenizer: Path | None) -> float:
    config = checkpoint_config(device)
    with tempfile.TemporaryDirectory() as scratch:
        if tokenizer is None:
            ranks = REAL_VOCAB_RANKS if device.startswith("cuda") else 256
            tokenizer = synthetic_vocab(Path(scratch) / "qwen.tiktoken", ranks)
        return quant_bench.write_random_checkpoint(folder, config, tokenizer, device)


# ----------------------------------------------------------------------------------------------------
# Measurements (in the variant's own process)
# ----------------------------------------------------------------------------------------------------
def peak_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak RSS (Linux: KiB)


def copy_bandwidth(device: str) -> float:
    """Bytes per second the device moves in a large copy (one read plus one write per byte copied)."""
    import torch

    size = (1 << 30) if device.startswith("cuda") else (256 << 20)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = model_bench.time_ms(lambda: target.copy_(source), device, repeats=5) / 1000
    return 2 * size / seconds


def decoder_bytes(model: Any) -> int:
    """Bytes a decode step must read: every tensor of the decoder blocks, the final norm and lm_head."""
    modules = [model.transformer.h, model.transformer.ln_f, model.lm_head]
    tensors = [t for module in modules for t in (*module.parameters(), *module.buffers())]
    total = sum(t.numel() * t.element_size() for t in tensors)
    for module in modules:  # bitsandbytes keeps 4-bit quantisation state beside the packed weight
        for sub in module.modules():
            state = getattr(getattr(sub, "weight", None), "quant_state", None)
            if state is not None:
                total += sum(t.numel() * t.element_size() for t in vars(state).values() if hasattr(t, "numel"))
    return total


def forced(tokens: int):
    from monkey_cli.engine.sampling import SamplingParams

    return SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens)


def eager_decode_ms(monkey: Any, prompt_ids: list[int], features: Any, batch: int, tokens: int) -> float:
    """Median step of transformers' generate() on `batch` copies of a prompt with precomputed features."""
    import torch
    from transformers import LogitsProcessorList

    device = model_bench.model_device(monkey)
    input_ids = torch.tensor([prompt_ids] * batch, device=device)
    clock = model_bench.StepClock(device)

    def run(count: int) -> None:
        with torch.inference_mode():
            monkey.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                image_embeds=features.expand(batch, -1, -1),
                max_new_tokens=count,
                min_new_tokens=count,
                logits_processor=LogitsProcessorList([clock.restart()]),
            )

    run(3)  # warm-up
    clock.steps_ms.clear()
    run(tokens)
    return clock.median_step_ms()


def engine_decode_ms(scheduler: Any, prompt_ids: list[int], features: Any, batch: int, tokens: int) -> float:
    """Median decode step of the engine with `batch` busy slots (the bucket's graph warmed up first)."""
    from monkey_cli.engine.scheduler import GenerationRequest

    device = str(features.device)

    def requests(count: int) -> list[Any]:
        return [GenerationRequest(prompt_ids, image_embeds=features[0], params=forced(count)) for _ in range(batch)]

    scheduler.run(requests(3))  # warm-up: this bucket's compilation, CUDA graph capture
    handles = [scheduler.submit(request) for request in requests(tokens)]
    scheduler.step()  # admission (prefills) and the first step
    steps = []
    while not all(handle.done() for handle in handles):
        started = time.perf_counter()
        scheduler.step()  # ends in the host reading the new tokens: the step is complete
        model_bench.synchronize(device)
        steps.append((time.perf_counter() - started) * 1000)
    return statistics.median(steps)


def first_token_ms(monkey: Any, page: Any, prompt: Any, scheduler: Any | None) -> float:
    """One page to its first token: preprocessing, ViT, prefill. No scheduler: transformers' generate()."""
    from monkey_cli.engine.scheduler import GenerationRequest

    device = model_bench.model_device(monkey)
    if scheduler is None:
        return model_bench.time_ms(lambda: monkey.hf_generate_ids([page], [prompt], max_new_tokens=1), device, 3)
    prompt_ids = monkey.check_prompt(prompt, 1)
    return model_bench.time_ms(
        lambda: scheduler.run([GenerationRequest(prompt_ids, image=page, params=forced(1))]), device, 3
    )


def answer_lengths(kind: str, pages: int, spread: tuple[int, int]) -> list[int]:
    low, high = ASK_TOKENS if kind == "ask" else spread
    rng = random.Random(f"{kind}-{pages}-{low}-{high}")
    return [rng.randint(low, high) for _ in range(pages)]


def eager_pages_per_s(monkey: Any, pages: list[Any], prompt: str, lengths: list[int], slots: int) -> float:
    """Static batches of `slots` pages through generate(): each batch runs until its longest answer."""
    device = model_bench.model_device(monkey)
    monkey.hf_generate_ids(pages[:1], [prompt], max_new_tokens=2, min_new_tokens=2)  # warm-up
    model_bench.synchronize(device)
    started = time.perf_counter()
    for first in range(0, len(pages), slots):
        chunk = pages[first : first + slots]
        longest = max(lengths[first : first + slots])
        monkey.hf_generate_ids(chunk, [prompt] * len(chunk), max_new_tokens=longest, min_new_tokens=longest)
    model_bench.synchronize(device)
    return len(pages) / (time.perf_counter() - started)


def engine_pages_per_s(scheduler: Any, pages: list[Any], prompt_ids: list[int], lengths: list[int]) -> float:
    """Continuous batching over the scheduler's slots; every bucket is warmed up before the clock starts."""
    from monkey_cli.engine.scheduler import GenerationRequest
    from monkey_cli.engine.step import buckets

    device = str(scheduler.model.transformer.wte.weight.device)
    for size in buckets(scheduler.slots):  # each bucket's graph (and CUDA graph) once, before the clock starts
        scheduler.run([GenerationRequest(prompt_ids, image=pages[0], params=forced(2)) for _ in range(size)])
    model_bench.synchronize(device)
    started = time.perf_counter()
    scheduler.run(
        [GenerationRequest(prompt_ids, image=page, params=forced(n)) for page, n in zip(pages, lengths, strict=True)]
    )
    model_bench.synchronize(device)
    return len(pages) / (time.perf_counter() - started)


def timed_section(device: str, fn: Callable[[], float]) -> tuple[float, int]:
    """fn's figure and the peak memory while it ran."""
    model_bench.reset_peak(device)
    value = fn()
    model_bench.synchronize(device)
    return value, peak_bytes(device)


def run_variant(folder: Path, variant: str, device: str, args: argparse.Namespace) -> dict[str, Any]:
    from monkey_cli import Monkey, tasks
    from monkey_cli.engine.scheduler import Scheduler

    quant, dtype = VARIANTS[variant]
    monkey = Monkey.load(folder, device=device, dtype=dtype, quant=quant)
    model_bench.synchronize(device)
    result: dict[str, Any] = {"variant": variant, "quant": quant, "dtype": dtype}
    result["machine"] = model_bench.machine_info(device)
    bandwidth = copy_bandwidth(device)
    weights = decoder_bytes(monkey.model)
    limit_ms = weights / bandwidth * 1000
    result.update(copy_bandwidth_bytes_per_s=bandwidth, decoder_bytes=weights, bandwidth_limit_ms=limit_ms)

    page = model_bench.synthetic_pages(1)[0]
    prompt = tasks.vqa_prompt(model_bench.QUESTION)
    prompt_ids = monkey.check_prompt(prompt, args.new_tokens)
    features = monkey.encode_images([page])
    result["prompt_tokens"] = len(prompt_ids)
    # One scheduler per path for every figure: one cache (reserved for the longest answer) and so one set of
    # compiled graphs, as a long-running process has.
    slots = max(*args.batches, args.slots)
    engines = {}
    for compile in (False, True):
        engines[compile] = Scheduler(monkey.model, monkey.encode_images, slots=slots, compile=compile)
        engines[compile].reserve(len(prompt_ids) + max(args.new_tokens, args.read[1]))

    rows = []
    for batch in args.batches:
        row: dict[str, Any] = {"batch": batch}
        row["eager_ms"], row["eager_peak"] = timed_section(
            device, lambda b=batch: eager_decode_ms(monkey, prompt_ids, features, b, args.new_tokens)
        )
        for name, compile in (("engine", False), ("compiled", True)):
            engine = engines[compile]
            row[f"{name}_ms"], row[f"{name}_peak"] = timed_section(
                device, lambda b=batch, e=engine: engine_decode_ms(e, prompt_ids, features, b, args.new_tokens)
            )
        row["speedup"] = row["eager_ms"] / row["compiled_ms"]
        row["bandwidth_fraction"] = limit_ms / row["compiled_ms"]
        row["eager_bandwidth_fraction"] = limit_ms / row["eager_ms"]
        rows.append(row)
        print(f"  {variant} batch {batch}: {row['eager_ms']:.2f} -> {row['compiled_ms']:.2f} ms/token", file=sys.stderr)
    result["decode"] = rows

    result["first_token"] = {
        "eager_ms": first_token_ms(monkey, page, prompt, None),
        "compiled_ms": first_token_ms(monkey, page, prompt, engines[True]),
    }
    pages = model_bench.synthetic_pages(args.pages, seed=1)
    for kind in ("ask", "read"):
        lengths = answer_lengths(kind, args.pages, args.read)
        section: dict[str, Any] = {"pages": args.pages, "slots": slots, "mean_tokens": statistics.mean(lengths)}
        section["eager_pages_s"], section["eager_peak"] = timed_section(
            device, lambda lengths=lengths: eager_pages_per_s(monkey, pages, prompt, lengths, slots)
        )
        section["compiled_pages_s"], section["compiled_peak"] = timed_section(
            device, lambda lengths=lengths: engine_pages_per_s(engines[True], pages, prompt_ids, lengths)
        )
        section["speedup"] = section["compiled_pages_s"] / section["eager_pages_s"]
        result[kind] = section
        print(f"  {variant} {kind}: {section['eager_pages_s']:.2f} -> {section['compiled_pages_s']:.2f} pages/s",
              file=sys.stderr)
    return result


# ----------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------
def child_command(args: argparse.Namespace, *extra: str) -> list[str]:
    return [
        sys.executable, str(Path(__file__).resolve()), "--device", args.device,
        "--batches", ",".join(map(str, args.batches)), "--new-tokens", str(args.new_tokens),
        "--slots", str(args.slots), "--pages", str(args.pages), "--read", f"{args.read[0]}-{args.read[1]}",
        *extra,
    ]  # fmt: skip


def run_child(command: list[str], timeout: float) -> tuple[int, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired as exc:
        tail = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return -1, f"timed out after {timeout:.0f} s\n{quant_bench.log_tail(tail)}"
    return done.returncode, quant_bench.log_tail(done.stdout)


def print_report(report: dict[str, Any]) -> None:
    gb = model_bench.gb
    print(f"\nmachine: {report.get('machine', {}).get('gpu') or 'CPU'}; checkpoint: {report['config']}")
    for result in report["results"]:
        if "error" in result:
            print(f"\n{result['variant']}: FAILED: {result['error']}")
            continue
        variant = result["variant"]
        print(
            f"\n{variant}: decoder {gb(result['decoder_bytes'])} GB, copy bandwidth "
            f"{result['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s -> limit {result['bandwidth_limit_ms']:.2f} ms/step"
        )
        print(
            f"{'batch':>5} {'eager ms':>9} {'engine ms':>10} {'compiled ms':>12} {'speedup':>8} {'of limit':>9} "
            f"{'peak GB':>8}"
        )
        for row in result["decode"]:
            print(
                f"{row['batch']:>5} {row['eager_ms']:>9.2f} {row['engine_ms']:>10.2f} {row['compiled_ms']:>12.2f} "
                f"{row['speedup']:>7.1f}x {row['bandwidth_fraction']:>8.0%} {gb(row['compiled_peak']):>8}"
            )
        first = result["first_token"]
        print(f"first token: eager {first['eager_ms']:.1f} ms, compiled {first['compiled_ms']:.1f} ms")
        for kind in ("ask", "read"):
            section = result[kind]
            print(
                f"{kind}: {section['pages']} pages, mean {section['mean_tokens']:.0f} tokens, "
                f"{section['slots']} slots: "
                f"eager {section['eager_pages_s']:.2f} pages/s -> compiled {section['compiled_pages_s']:.2f} pages/s "
                f"({section['speedup']:.1f}x; peak {gb(section['eager_peak'])} -> {gb(section['compiled_peak'])} GB)"
            )


def parse_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--variants", help="comma-separated, from " + ", ".join(VARIANTS))
    parser.add_argument("--batches", help="decode batch sizes (GPU default 1,8,32; CPU 1,8)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per timed decode run")
    parser.add_argument(
        "--slots", type=int, help="decode slots (and static batch size) of the pages/s runs, at least the largest batch"
    )
    parser.add_argument("--pages", type=int, help="pages per pages/s run (GPU 64, CPU 16)")
    parser.add_argument("--read", help="answer lengths of the read run, LOW-HIGH (GPU 50-500, CPU 8-64)")
    parser.add_argument("--tokenizer", type=Path, help="the real qwen.tiktoken (default: a synthetic one)")
    parser.add_argument("--workdir", type=Path, help="where the checkpoint goes (default: /dev/shm or tmp)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed per variant")
    parser.add_argument("--json", type=Path, help="write every figure here (rewritten after every variant)")
    quant_bench.add_child_arguments(parser, VARIANTS)
    parser.add_argument("--write-checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    if args.device is None:
        args.device = "cuda:0" if torch.cuda.is_available() else "cpu"
    defaults = GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS
    args.variants = args.variants or defaults["variants"]
    args.batches = model_bench.parse_batches(args.batches or defaults["batches"])
    args.slots = args.slots or defaults["slots"]
    args.pages = args.pages or defaults["pages"]
    args.read = parse_range(args.read if isinstance(args.read, str) else defaults["read"])

    if args.write_checkpoint:
        write_checkpoint(args.write_checkpoint, args.device, args.tokenizer)
        return 0
    if args.child:
        result = run_variant(args.checkpoint, args.child, args.device, args)
        args.child_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return 0

    variants = quant_bench.chosen_variants(parser, args.variants, VARIANTS)
    from monkey_cli.model.memory import plan

    config = checkpoint_config(args.device)
    scale = "full" if args.device.startswith("cuda") else "standin"
    folder = (args.workdir or quant_bench.default_workdir(plan(config).weight_bytes)) / f"engine-{scale}"
    report: dict[str, Any] = {"config": scale, "checkpoint": str(folder), "results": []}
    extra = ["--tokenizer", str(args.tokenizer)] if args.tokenizer else []
    print(f"checkpoint: {folder}", file=sys.stderr, flush=True)
    status, log = run_child(child_command(args, "--write-checkpoint", str(folder), *extra), args.timeout)
    if status != 0:
        print(f"writing the checkpoint failed:\n{log}", file=sys.stderr)
        return 1
    for variant in variants:
        print(f"{variant}: running", file=sys.stderr, flush=True)
        command = child_command(args, "--child", variant, "--checkpoint", str(folder))
        result = quant_bench.run_json_child(command, variant, args.timeout)
        if "error" in result:
            print(f"{variant}: FAILED ({result['error']})\n{result['log_tail']}", file=sys.stderr, flush=True)
        else:
            report.setdefault("machine", result["machine"])
        report["results"].append(result)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print_report(report)
    return 0 if all("error" not in r for r in report["results"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

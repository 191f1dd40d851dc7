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
- eager: transformers' `generate()` with its DynamicCache (the reference path, `Monkey.hf_generate_ids`),
  static batches: a batch decodes until its longest answer is done.
- engine: the static slot cache and decode step, eager (`--no-compile`).
- compiled: the same step captured by torch.compile (CUDA graphs on a GPU), with continuous batching.

Figures: decode ms/token at each batch size (median step, answer lengths forced with min/max_new_tokens so
random weights cannot stop early) with the cache sized for the job ("short") and in a long cache (4,096
positions) where attention reads the live part only ("live") or, for comparison, the whole cache ("full", what
every step read before issue 21); the fraction of the memory-bandwidth limit (decoder weight bytes read per step
over the device's measured copy bandwidth, divided by the step time); first-token latency (one page:
preprocessing, ViT, prefill, first token); pages/s for `ask` (short answers) and `read` (uneven answers, e.g.
50-500 tokens); peak memory of each path. And what compiling did: warm-up seconds, the compile report (mode,
graphs, CUDA graphs captured, inductor's cudagraph_skips, recompiles after all the measurements, fallbacks),
host syncs per decode step (CUDA: torch.cuda.set_sync_debug_mode), and the warm-up in a fresh process with an
empty and then a warm inductor cache (torch's on-disk FX graph cache: what a second run of the CLI pays).
"""

from __future__ import annotations

import argparse
import contextlib
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
    "8bit-fp32": ("8bit", "float32"),  # int8 weight-only with float32 compute (what a CPU runs fast)
}
GPU_DEFAULTS = {"variants": "bf16,4bit,8bit", "batches": "1,8,32", "slots": 32, "pages": 64, "read": "50-500"}
CPU_DEFAULTS = {"variants": "fp32", "batches": "1,8", "slots": 8, "pages": 16, "read": "8-64"}
LONG_CACHE = 4096  # positions of the long-cache figures (a page's prompt is ~1,300 tokens)
LONG_CACHE_MAX_BATCH = 8  # the long-cache figures stop there (KV of 32 slots x 4,096 positions: 64 GB in bf16)
# Issue 21's goals on one H100 (not tests): decode ms/token at batch 1, and pages/s.
GOALS_MS = {"bf16": 8.0, "4bit": 10.0, "8bit": 10.0}
GOALS_PAGES_S = {"read": 5.0, "ask": 10.0}
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


def tensor_bytes(tensor: Any) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's int8 weights) counts its inner tensors."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def decoder_bytes(model: Any) -> int:
    """Bytes a decode step must read: every tensor of the decoder blocks, the final norm and lm_head."""
    modules = [model.transformer.h, model.transformer.ln_f, model.lm_head]
    tensors = [t for module in modules for t in (*module.parameters(), *module.buffers())]
    total = sum(tensor_bytes(t) for t in tensors)
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


def engine_decode_ms(
    scheduler: Any, prompt_ids: list[int], features: Any, batch: int, tokens: int, full_attention: bool = False
) -> tuple[float, float | None]:
    """Median decode step of the engine with `batch` busy slots, and the host syncs per step (CUDA only).
    `full_attention`: attention reads the whole cache, as every step did before issue 21 (for comparison)."""
    from unittest import mock

    from monkey_cli.doctor import _host_syncs
    from monkey_cli.engine.scheduler import GenerationRequest

    device = features.device

    def requests(count: int) -> list[Any]:
        return [GenerationRequest(prompt_ids, image_embeds=features[0], params=forced(count)) for _ in range(batch)]

    length = mock.patch("monkey_cli.engine.scheduler.length_bucket", lambda needed, longest: longest)
    with length if full_attention else contextlib.nullcontext():
        scheduler.run(requests(3))  # warm-up (the graphs were compiled and captured by scheduler.warm_up())
        handles = [scheduler.submit(request) for request in requests(tokens)]
        scheduler.step()  # admission (prefills) and the first step
        steps, syncs = [], []
        while not all(handle.done() for handle in handles):
            with _host_syncs(device) as counted:
                started = time.perf_counter()
                scheduler.step()  # ends in the host reading the new tokens: the step is complete
            model_bench.synchronize(str(device))  # (nothing left to wait for: outside the count)
            steps.append((time.perf_counter() - started) * 1000)
            syncs.append(counted[0])
    return statistics.median(steps), statistics.median(syncs) if device.type == "cuda" else None


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


def release(device: str) -> None:
    """Give the freed memory back (CUDA's caching allocator keeps it otherwise) before the next engine."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def build_engine(monkey: Any, slots: int, compile: bool, length: int) -> tuple[Any, float]:
    """A scheduler with its cache sized for `length` tokens, warmed up (compiled and captured): it and the
    warm-up seconds."""
    from monkey_cli.engine.scheduler import Scheduler

    engine = Scheduler(monkey.model, monkey.encode_images, slots=slots, compile=compile, max_length=length,
                       vocab_limit=len(monkey.tokenizer))  # fmt: skip
    started = time.perf_counter()
    engine.warm_up()
    return engine, time.perf_counter() - started


def run_variant(folder: Path, variant: str, device: str, args: argparse.Namespace) -> dict[str, Any]:
    from monkey_cli import Monkey, tasks

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
    slots = max(*args.batches, args.slots)
    # The cache of a job: its longest prompt and answer ("short"), as Monkey.load sizes it from the memory plan.
    short = len(prompt_ids) + max(args.new_tokens, args.read[1])
    pages = model_bench.synthetic_pages(args.pages, seed=1)
    lengths = {kind: answer_lengths(kind, args.pages, args.read) for kind in ("ask", "read")}

    # transformers' generate(): decode steps, and pages/s in static batches.
    rows = {batch: {"batch": batch} for batch in args.batches}
    for batch, row in rows.items():
        row["eager_ms"], row["eager_peak"] = timed_section(
            device, lambda b=batch: eager_decode_ms(monkey, prompt_ids, features, b, args.new_tokens)
        )
    result["first_token"] = {"eager_ms": first_token_ms(monkey, page, prompt, None)}
    for kind, kind_lengths in lengths.items():
        result[kind] = {"pages": args.pages, "slots": slots, "mean_tokens": statistics.mean(kind_lengths)}
        result[kind]["eager_pages_s"], result[kind]["eager_peak"] = timed_section(
            device, lambda n=kind_lengths: eager_pages_per_s(monkey, pages, prompt, n, slots)
        )
    release(device)

    # The engine, eager step then compiled, one at a time (two caches of 32 slots would not fit beside the model).
    for name, compile in (("engine", False), ("compiled", True)):
        engine, result[f"{name}_warmup_s"] = build_engine(monkey, slots, compile, short)
        for batch, row in rows.items():
            (row[f"{name}_ms"], row[f"{name}_host_syncs"]), row[f"{name}_peak"] = timed_section(
                device, lambda b=batch, e=engine: engine_decode_ms(e, prompt_ids, features, b, args.new_tokens)
            )
        if compile:
            result["first_token"]["compiled_ms"] = first_token_ms(monkey, page, prompt, engine)
            for kind, kind_lengths in lengths.items():
                result[kind]["compiled_pages_s"], result[kind]["compiled_peak"] = timed_section(
                    device, lambda n=kind_lengths, e=engine: engine_pages_per_s(e, pages, prompt_ids, n)
                )
            result["compile"] = engine.compile_report()  # after every figure: recompiles should be 0
        del engine
        release(device)

    # A long cache: attention over the live part (the engine) against the whole cache (before issue 21).
    long_batches = [batch for batch in args.batches if batch <= LONG_CACHE_MAX_BATCH]
    for name, compile in (("engine", False), ("compiled", True)):
        engine, _ = build_engine(monkey, max(long_batches), compile, LONG_CACHE)
        for batch in long_batches:
            rows[batch][f"{name}_long_ms"] = engine_decode_ms(engine, prompt_ids, features, batch, args.new_tokens)[0]
            rows[batch][f"{name}_long_full_ms"] = engine_decode_ms(
                engine, prompt_ids, features, batch, args.new_tokens, full_attention=True
            )[0]
        if compile:
            result["compile_long_cache"] = engine.compile_report()
        del engine
        release(device)

    for row in rows.values():
        row["speedup"] = row["eager_ms"] / row["compiled_ms"]
        row["bandwidth_fraction"] = limit_ms / row["compiled_ms"]
        row["eager_bandwidth_fraction"] = limit_ms / row["eager_ms"]
        print(f"  {variant} batch {row['batch']}: {row['eager_ms']:.2f} -> {row['compiled_ms']:.2f} ms/token",
              file=sys.stderr)  # fmt: skip
    for kind in lengths:
        result[kind]["speedup"] = result[kind]["compiled_pages_s"] / result[kind]["eager_pages_s"]
    result["decode"] = list(rows.values())
    result["long_cache"] = LONG_CACHE
    return result


def compile_probe(folder: Path, variant: str, device: str, args: argparse.Namespace) -> dict[str, Any]:
    """A fresh process's warm-up of the compiled engine (the parent points TORCHINDUCTOR_CACHE_DIR at an empty
    folder, then at the same one again): what the first and the second run of a job pay for compiling."""
    from monkey_cli import Monkey, tasks

    quant, dtype = VARIANTS[variant]
    started = time.perf_counter()
    monkey = Monkey.load(folder, device=device, dtype=dtype, quant=quant)
    load_s = time.perf_counter() - started
    prompt_ids = monkey.check_prompt(tasks.vqa_prompt(model_bench.QUESTION), args.new_tokens)
    short = len(prompt_ids) + max(args.new_tokens, args.read[1])
    engine, warmup_s = build_engine(monkey, max(*args.batches, args.slots), True, short)
    return {"variant": variant, "load_s": load_s, "warmup_s": warmup_s, "compile": engine.compile_report()}


# ----------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------
def child_command(args: argparse.Namespace, *extra: str) -> list[str]:
    return [
        sys.executable, str(Path(__file__).resolve()), "--device", args.device,
        "--batches", ",".join(map(str, args.batches)), "--new-tokens", str(args.new_tokens),
        "--slots", str(args.slots), "--pages", str(args.pages), "--read", f"{args.read[0]}-{args.read[1]}",
        *(("--threads", str(args.threads)) if args.threads else ()),
        *extra,
    ]  # fmt: skip


def compile_cache_probe(args: argparse.Namespace, variant: str, folder: Path) -> dict[str, Any]:
    """The compiled engine's warm-up in two fresh processes sharing a new inductor cache: cold, then warm."""
    command = child_command(args, "--child", variant, "--checkpoint", str(folder), "--compile-probe")
    with tempfile.TemporaryDirectory() as cache:
        runs = [quant_bench.run_json_child(command, variant, args.timeout, env={"TORCHINDUCTOR_CACHE_DIR": cache})
                for _ in range(2)]  # fmt: skip
    if any("error" in run for run in runs):
        return {"error": next(run["error"] for run in runs if "error" in run)}
    cold, warm = runs
    print(f"  {variant} warm-up: {cold['warmup_s']:.1f} s cold, {warm['warmup_s']:.1f} s warm", file=sys.stderr)
    return {"cold_s": cold["warmup_s"], "warm_s": warm["warmup_s"], "cold": cold["compile"], "warm": warm["compile"]}


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
        print(f"{'batch':>5} {'eager ms':>9} {'engine ms':>10} {'compiled ms':>12} {'speedup':>8} {'of limit':>9} "
              f"{'syncs':>6} {'peak GB':>8}")  # fmt: skip
        for row in result["decode"]:
            syncs = row.get("compiled_host_syncs")
            print(
                f"{row['batch']:>5} {row['eager_ms']:>9.2f} {row['engine_ms']:>10.2f} {row['compiled_ms']:>12.2f} "
                f"{row['speedup']:>7.1f}x {row['bandwidth_fraction']:>8.0%} {'-' if syncs is None else syncs:>6} "
                f"{gb(row['compiled_peak']):>8}"
            )
        long = [row for row in result["decode"] if "compiled_long_ms" in row]
        if long:
            print(f"cache of {result['long_cache']} positions, attention over the live part / the whole cache:")
            for row in long:
                print(f"{row['batch']:>5}  engine {row['engine_long_ms']:.2f} / {row['engine_long_full_ms']:.2f} ms, "
                      f"compiled {row['compiled_long_ms']:.2f} / {row['compiled_long_full_ms']:.2f} ms")  # fmt: skip
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
        compiled = result["compile"]
        print(
            f"compiled step: {compiled['mode']} (asked {compiled['requested']}), "
            f"warm-up {result['compiled_warmup_s']:.1f} s, "
            f"{compiled['graphs']} graphs, {compiled['captured']} CUDA graphs captured, "
            f"{compiled['cudagraph_skips']} skipped, {compiled['recompiles']} recompiles after warm-up"
            + "".join(f"; fell back from {fallback}" for fallback in compiled["fallbacks"])
        )
        probe = result.get("compile_cache")
        if probe:
            print(f"warm-up in a fresh process: {probe['cold_s']:.1f} s with an empty inductor cache, "
                  f"{probe['warm_s']:.1f} s with the cache of the first run")  # fmt: skip
        if report.get("config") == "full":
            print_goals(result)


def print_goals(result: dict[str, Any]) -> None:
    """Issue 21's goals on one H100 (not tests): met or missed."""
    variant = result["variant"]
    batch_one = next((row for row in result["decode"] if row["batch"] == 1), None)
    if variant in GOALS_MS and batch_one is not None:
        goal, measured = GOALS_MS[variant], batch_one["compiled_ms"]
        verdict = "met" if measured <= goal else "missed"
        print(f"goal {variant} <= {goal:g} ms/token at batch 1: {measured:.2f} ({verdict})")
    for kind, goal in GOALS_PAGES_S.items():
        measured = result[kind]["compiled_pages_s"]
        print(f"goal {kind} >= {goal:g} pages/s: {measured:.2f} ({'met' if measured >= goal else 'missed'})")


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
    parser.add_argument("--threads", type=int, help="torch CPU threads (on a shared machine, 1 is steadier)")
    parser.add_argument(
        "--no-compile-cache-probe", action="store_true",
        help="skip the warm-up with an empty and then a warm inductor cache (two more processes per variant)",
    )  # fmt: skip
    quant_bench.add_child_arguments(parser, VARIANTS)
    parser.add_argument("--write-checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

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
        run = compile_probe if args.compile_probe else run_variant
        result = run(args.checkpoint, args.child, args.device, args)
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
            if not args.no_compile_cache_probe:
                result["compile_cache"] = compile_cache_probe(args, variant, folder)
        report["results"].append(result)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print_report(report)
    return 0 if all("error" not in r for r in report["results"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

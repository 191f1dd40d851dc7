"""Speed and memory of the Monkey model: a tiny checkpoint on the CPU, the full-size architecture on a GPU.

    python benchmarks/model.py --tiny /path/to/tiny-monkey-sharp                     # CPU section
    python benchmarks/model.py --tokenizer /path/to/qwen.tiktoken --json out.json    # + GPU section

CPU section: a real (tiny) checkpoint loaded through `Monkey.load`, float32. One synthetic page; batch 1 and 4.
GPU section (when CUDA is available): the released architecture (`real_monkey_config()`, 9.7B parameters)
built straight on the GPU in bfloat16 and filled with random weights. Timings do not depend on the weights'
values, so this measures the real model's speed without downloading 19 GB. It needs the real Qwen vocabulary
(`qwen.tiktoken`, 151643 ranks) so that the prompt's image tags get the ids the config expects.

Every figure goes through the public API (`Monkey.encode_images`, `Monkey.hf_generate_ids`: transformers'
`generate()`, the eager path the engine is measured against in benchmarks/engine.py). The helpers here are
shared with `quant.py` (same measurements, other loaders).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

QUESTION = "What is the title of this document?"  # a typical VQA prompt: ~20 text tokens + the image span
NORM_PREFIXES = ("ln_",)  # LayerNorm / RMSNorm parameters: ln_1, ln_2, ln_f, ln_pre, ln_post, ln_q, ln_kv
RANDOM_STD = 0.02  # small enough that 48 ViT + 32 decoder layers never overflow bfloat16


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------
def synthetic_pages(count: int, size: tuple[int, int] = (1240, 1754), seed: int = 0) -> list[Any]:
    """`count` A4-shaped RGB pages (150 dpi) of deterministic noise over a light background.

    The model's cost does not depend on what the page shows; the size only matters to the preprocessing
    (every page is resized to the config's input size first).
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    pages = []
    for _ in range(count):
        pixels = rng.integers(200, 256, size=(height, width, 3), dtype=np.uint8)
        pages.append(Image.fromarray(pixels, mode="RGB"))
    return pages


def random_value(name: str, shape: Sequence[int], dtype: Any, device: Any, generator: Any = None) -> Any:
    """A stand-in for one checkpoint tensor: norms get weight 1 / bias 0, everything else N(0, RANDOM_STD).

    Unit norm weights keep activations at the scale a trained model has (this matters to LLM.int8, which
    treats inputs above 6.0 as outliers); random values elsewhere keep every matmul a dense, real one.
    """
    import torch

    leaf = name.rsplit(".", 2)
    is_norm = len(leaf) >= 2 and leaf[-2].startswith(NORM_PREFIXES)
    if is_norm and name.endswith(".weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    if is_norm and name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    value = torch.empty(shape, dtype=torch.float32, device=device)
    value.normal_(0.0, RANDOM_STD, generator=generator)
    return value.to(dtype)


# ----------------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: str, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` in milliseconds, after `warmup` untimed calls (kernel choice, caches)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def memory_snapshot(device: str) -> dict[str, int]:
    """Allocated now and at peak (torch's caching allocator), reserved at peak, and what the whole device
    has in use now (CUDA context, other libraries' allocations and the allocator's cache included)."""
    if not device.startswith("cuda"):
        return {}
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return {
        "allocated_bytes": torch.cuda.memory_allocated(device),
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
        "device_used_bytes": total - free,
    }


def gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


class StepClock:
    """A pass-through logits processor that timestamps every decoding step of `generate()`.

    Differences between consecutive steps are the decode cost per token, free of the prefill (which is
    much longer than a step, so subtracting two end-to-end timings would drown the step in its noise).
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.steps_ms: list[float] = []
        self._last: float | None = None

    def restart(self) -> StepClock:
        """Forget the previous generation's last timestamp (keep its steps); returns self for chaining."""
        self._last = None
        return self

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        synchronize(self.device)
        now = time.perf_counter()
        if self._last is not None:
            self.steps_ms.append((now - self._last) * 1000)
        self._last = now
        return scores

    def median_step_ms(self) -> float:
        return statistics.median(self.steps_ms) if self.steps_ms else float("nan")


# ----------------------------------------------------------------------------------------------------
# The measurements (shared with quant.py)
# ----------------------------------------------------------------------------------------------------
def model_device(monkey: Any) -> str:
    return str(monkey.model.transformer.wte.weight.device)


def measure_batch(monkey: Any, batch: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    """All figures for `batch` pages, one question each, through the public API.

    preprocess_ms: PIL pages -> window tensors (CPU). vit_ms: ViT + resampler on the prepared pixels.
    prefill_ms: the decoder over the prompts (image features given) up to the first new token.
    first_token_ms: pages -> first token end to end (`hf_generate_ids(images, ...)`: all of the above).
    decode_ms_per_token: median time between consecutive decoding steps of a generation of 1 + N tokens
    (N forced with min_new_tokens), over all timed runs; a step is one forward pass of the batch and
    transformers' sampling logic, as in any answer.
    peak_*: memory high-water mark over everything above, weights included.
    """
    import torch
    from transformers import LogitsProcessorList

    from monkey_cli import tasks

    device = model_device(monkey)
    pages = synthetic_pages(batch)
    prompts = [tasks.vqa_prompt(QUESTION)] * batch
    prompt_tokens = len(monkey.tokenizer.encode(prompts[0]))
    reset_peak(device)

    def prepare() -> Any:
        processed = monkey.processor(pages)
        return torch.cat([processed.windows, processed.global_view[:, None]], dim=1)

    preprocess_ms = time_ms(prepare, "cpu", repeats)
    pixels = prepare().to(device)

    def encode() -> Any:
        with torch.inference_mode():
            return monkey.model.encode_images(pixels)

    vit_ms = time_ms(encode, device, repeats)
    features = encode()

    def generate(count: int, images: Any = None, clock: StepClock | None = None) -> list[list[int]]:
        embeds = None if images is not None else features
        extra = {"logits_processor": LogitsProcessorList([clock])} if clock is not None else {}
        return monkey.hf_generate_ids(
            images, prompts, image_embeds=embeds, max_new_tokens=count, min_new_tokens=count, **extra
        )

    prefill_ms = time_ms(lambda: generate(1), device, repeats)
    produced = generate(1 + new_tokens, clock=StepClock(device))  # warm-up, and a check of the length
    if any(len(row) != 1 + new_tokens for row in produced):
        raise RuntimeError(f"generate returned {[len(r) for r in produced]} tokens, asked for {1 + new_tokens}")
    clock = StepClock(device)
    for _ in range(repeats):
        generate(1 + new_tokens, clock=clock.restart())
    first_token_ms = time_ms(lambda: generate(1, images=pages), device, repeats)
    result = {
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "preprocess_ms": preprocess_ms,
        "vit_ms": vit_ms,
        "vit_ms_per_page": vit_ms / batch,
        "prefill_ms": prefill_ms,
        "first_token_ms": first_token_ms,
        "decode_ms_per_token": clock.median_step_ms(),
    }
    result.update(memory_snapshot(device))
    return result


def measure(monkey: Any, batches: Sequence[int], new_tokens: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for batch in batches:
        rows.append(measure_batch(monkey, batch, new_tokens, repeats))
        print(f"  batch {batch}: done", file=sys.stderr, flush=True)
    return rows


def machine_info(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except Exception:  # not installed, or no usable backend: only informative here
        info["bitsandbytes"] = None
    return info


# ----------------------------------------------------------------------------------------------------
# The two sections
# ----------------------------------------------------------------------------------------------------
def bench_tiny_cpu(checkpoint: Path, batches: Sequence[int], new_tokens: int, repeats: int) -> dict[str, Any]:
    """The tiny parity checkpoint through the normal loader, on the CPU, float32."""
    from monkey_cli import Monkey

    started = time.perf_counter()
    monkey = Monkey.load(checkpoint, device="cpu", dtype="float32", quant="none")
    load_s = time.perf_counter() - started
    return {
        "checkpoint": str(checkpoint),
        "parameters": monkey.model.num_parameters(),
        "load_s": load_s,
        "machine": machine_info("cpu"),
        "rows": measure(monkey, batches, new_tokens, repeats),
    }


def random_full_size_monkey(tokenizer_file: Path, device: str = "cuda", dtype: str = "bfloat16") -> Any:
    """`Monkey` around the released architecture with random weights, built directly on `device`.

    Built on the meta device, cast, then materialised once on the GPU: never a float32 copy, never a
    host-side copy of 19 GB.
    """
    import torch

    from monkey_cli import Monkey
    from monkey_cli.model.configuration import real_monkey_config
    from monkey_cli.model.loading import DTYPES
    from monkey_cli.model.modeling import MonkeyForCausalLM
    from monkey_cli.model.processor import MonkeyImageProcessor
    from monkey_cli.model.tokenizer import QWenTokenizer

    config = real_monkey_config()
    tokenizer = QWenTokenizer(tokenizer_file, image_token_span=config.tokens_per_image)
    if tokenizer.img_start_id != config.image_start_id:
        raise SystemExit(
            f"{tokenizer_file}: gives <img> the id {tokenizer.img_start_id}, the released config expects "
            f"{config.image_start_id}; pass the real Qwen vocabulary (151643 ranks)"
        )
    with torch.device("meta"):
        model = MonkeyForCausalLM(config)
    model = model.to(DTYPES[dtype]).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(random_value(name, tensor.shape, tensor.dtype, device, generator))
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # drop the float32 scratch of the random fill: reserved memory = the model's
    processor = MonkeyImageProcessor(config.vision)
    return Monkey(model=model.eval(), tokenizer=tokenizer, processor=processor, name="random-full-size")


def bench_full_size_gpu(tokenizer_file: Path, batches: Sequence[int], new_tokens: int, repeats: int) -> dict[str, Any]:
    import torch

    from monkey_cli.model import memory
    from monkey_cli.model.configuration import real_monkey_config

    device = "cuda"
    torch.cuda.init()
    started = time.perf_counter()
    monkey = random_full_size_monkey(tokenizer_file, device)
    build_s = time.perf_counter() - started
    weights = torch.cuda.memory_allocated(device)
    rows = measure(monkey, batches, new_tokens, repeats)
    config = real_monkey_config()
    for row in rows:
        estimate = memory.plan(
            config,
            "none",
            "bfloat16",
            batch_size=row["batch"],
            prompt_tokens=row["prompt_tokens"],
            max_new_tokens=1 + new_tokens,
        )
        row["plan_total_bytes"] = estimate.total_bytes
        row["plan_weight_bytes"] = estimate.weight_bytes
    return {
        "parameters": monkey.model.num_parameters(),
        "dtype": "bfloat16",
        "build_s": build_s,
        "weights_bytes": weights,
        "machine": machine_info(device),
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------
def print_rows(title: str, rows: Sequence[dict[str, Any]], with_memory: bool) -> None:
    print(f"\n{title}")
    header = (
        f"{'batch':>5} {'prompt':>6} {'prep ms':>8} {'ViT ms':>8} {'ViT/page':>8} {'prefill ms':>10} "
        f"{'1st tok ms':>10} {'decode ms/tok':>13}"
    )
    if with_memory:
        header += f" {'peak GB':>8} {'plan GB':>8}"
    print(header)
    for row in rows:
        line = (
            f"{row['batch']:>5} {row['prompt_tokens']:>6} {row['preprocess_ms']:>8.1f} {row['vit_ms']:>8.1f} "
            f"{row['vit_ms_per_page']:>8.1f} {row['prefill_ms']:>10.1f} {row['first_token_ms']:>10.1f} "
            f"{row['decode_ms_per_token']:>13.2f}"
        )
        if with_memory:
            line += f" {gb(row.get('peak_allocated_bytes')):>8} {gb(row.get('plan_total_bytes')):>8}"
        print(line)


def parse_batches(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", type=Path, help="tiny checkpoint folder for the CPU section (e.g. tiny-monkey-sharp)")
    parser.add_argument("--tokenizer", type=Path, help="the real qwen.tiktoken, for the GPU section")
    parser.add_argument("--sections", default="cpu,gpu", help="which sections to run: cpu, gpu or both")
    parser.add_argument("--cpu-batches", type=parse_batches, default=[1, 4])
    parser.add_argument("--gpu-batches", type=parse_batches, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per timed generation")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the median is kept)")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args(argv)
    sections = {s.strip() for s in args.sections.split(",")}

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    report: dict[str, Any] = {}
    if "cpu" in sections:
        if args.tiny is None:
            print("cpu: skipped (pass --tiny PATH)", file=sys.stderr)
        else:
            report["cpu"] = bench_tiny_cpu(args.tiny, args.cpu_batches, args.new_tokens, args.repeats)
            print_rows(f"Tiny checkpoint on the CPU ({args.tiny.name}, float32)", report["cpu"]["rows"], False)
    if "gpu" in sections:
        if not torch.cuda.is_available():
            print("gpu: skipped (no CUDA device)", file=sys.stderr)
        elif args.tokenizer is None:
            print("gpu: skipped (pass --tokenizer PATH to the real qwen.tiktoken)", file=sys.stderr)
        else:
            report["gpu"] = bench_full_size_gpu(args.tokenizer, args.gpu_batches, args.new_tokens, args.repeats)
            gpu = report["gpu"]
            title = f"Full-size Monkey, random weights, bfloat16 on {gpu['machine']['gpu']}"
            print_rows(title, gpu["rows"], True)
            print(f"weights on the GPU: {gb(gpu['weights_bytes'])} GB")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

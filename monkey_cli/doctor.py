"""`monkey doctor`: what this machine can run, found out without loading a model.

`collect(model)` returns a JSON-ready dict of independent probes (Python, torch and its devices,
bitsandbytes and torchao, transformers, the Hugging Face cache, and which --quant fits where for `model`: the
default checkpoint, or the one `monkey doctor --model` / MONKEY_MODEL names, sized from its config.json). A probe
that fails records {"error": "..."} in its section; it never stops the others, so the report is most useful
exactly when something is broken.

`bench()` (`monkey doctor --bench`) loads a model and measures the generation engine on this machine: how
long compiling and capturing took, what the decode step runs as (CUDA graphs, inductor, eager, and what fell
back and why), first-token latency, and decode ms/token and tokens/s at each batch size.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from monkey_cli import __version__, tasks
from monkey_cli.tasks import DEFAULT_MODEL

KNOWN_MODELS = tuple(tasks.KNOWN_MODELS)  # the published checkpoints, default first
# The transformers range the test suite runs against (pyproject.toml pins the same).
TESTED_TRANSFORMERS = ">=5.23,<5.24"

# Files a cached checkpoint needs besides its weights.
_CHECKPOINT_FILES = ("config.json", "qwen.tiktoken")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_SINGLES = ("model.safetensors", "pytorch_model.bin")


def collect(model: str = DEFAULT_MODEL) -> dict[str, Any]:
    """Everything `monkey doctor` reports, as plain JSON-serialisable data; the memory plan is `model`'s."""
    report: dict[str, Any] = {
        "monkey_cli": {"version": __version__},
        "model": model,
        "python": _probe(_python),
        "torch": _probe(_torch),
        "devices": _probe(_devices),
        "bitsandbytes": _probe(_bitsandbytes),
        "torchao": _probe(_torchao),
        "compile": _probe(_compile),
        "transformers": _probe(_transformers),
        "huggingface_hub": _probe(lambda: _huggingface_hub(model)),
    }
    report["memory"] = _probe(lambda: _memory(report["devices"], model))
    report["memory_textmonkey"] = _probe(lambda: _memory(report["devices"], TEXTMONKEY_MODEL))
    report["problems"] = problems(report)
    return report


def _probe(function: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return function()
    except Exception as exc:  # a probe must never take doctor down; the error is the finding
        return {"error": _one_line(exc)}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


# --- probes --------------------------------------------------------------------------------------


def _python() -> dict[str, Any]:
    return {
        "version": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
    }


def _torch() -> dict[str, Any]:
    import torch

    cuda, hip = torch.version.cuda, getattr(torch.version, "hip", None)
    build = f"CUDA {cuda}" if cuda else f"ROCm {hip}" if hip else "CPU"
    mps = getattr(torch.backends, "mps", None)
    return {
        "version": torch.__version__,
        "build": build,
        "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "mps_available": bool(mps is not None and mps.is_available()),
        "threads": torch.get_num_threads(),
    }


def _compile() -> dict[str, Any]:
    """Whether `--compile` can work here: torch.compile's backend needs Triton on a GPU and a C++ compiler
    on the CPU (found, not run: doctor stays quick)."""
    import importlib.util
    import shutil

    import torch

    cuda = torch.cuda.is_available()
    return {
        "default": "on" if cuda else "off",
        "triton": importlib.util.find_spec("triton") is not None,
        "cxx": shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++"),
        "cuda": cuda,
    }


def _devices() -> dict[str, Any]:
    from monkey_cli.model.memory import available_ram, total_ram

    devices: dict[str, Any] = {
        "cpu": {"cores": os.cpu_count(), "total_bytes": total_ram(), "available_bytes": available_ram()},
        "cuda": [],
    }
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        devices["cuda"] = [_probe(lambda i=i: _cuda_device(torch, i)) for i in range(count)]
    return devices


def _cuda_device(torch: Any, index: int) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    return {
        "device": f"cuda:{index}",
        "name": props.name,
        "total_bytes": int(total),
        "free_bytes": int(free),
        "compute_capability": f"{props.major}.{props.minor}",
        # bfloat16 arithmetic needs compute capability 8.0 (Ampere) or newer.
        "bf16": props.major >= 8,
    }


@contextmanager
def _captured_logs(name: str, into: list[str]) -> Iterator[None]:
    """Keep a library's import-time warnings in the report instead of on the user's stderr."""

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            into.append(record.getMessage().strip().splitlines()[0])

    logger = logging.getLogger(name)
    handler, propagate = _Collect(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _bitsandbytes() -> dict[str, Any]:
    info: dict[str, Any] = {"version": _version("bitsandbytes"), "imports": False, "warnings": []}
    if info["version"] is None:
        info["error"] = "not installed (pip install bitsandbytes): --quant 4bit is unavailable"
        return info
    with _captured_logs("bitsandbytes", info["warnings"]):
        try:
            import bitsandbytes  # noqa: F401
            from bitsandbytes import cextension
        except Exception as exc:
            info["error"] = _one_line(exc)
            return info
    info["imports"] = True
    info["native_backend"] = getattr(cextension, "BNB_BACKEND", None)
    mock = getattr(cextension, "ErrorHandlerMockBNBNativeLibrary", None)
    info["native_library"] = not (mock is not None and isinstance(getattr(cextension, "lib", None), mock))
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    targets = ["cpu", *(f"cuda:{i}" for i in range(gpus))]
    with _captured_logs("bitsandbytes", info["warnings"]):
        info["usable"] = {device: _bitsandbytes_roundtrip(device) for device in targets}
    return info


def _bitsandbytes_roundtrip(device: str) -> dict[str, str]:
    """Quantize a small Linear to NF4 (--quant 4bit) on `device` and run it: 'ok' or the error."""
    import torch
    from bitsandbytes.nn import Linear4bit, Params4bit

    torch.manual_seed(0)
    weight = torch.randn(64, 128, dtype=torch.bfloat16)
    x = torch.randn(3, 128, dtype=torch.bfloat16, device=device)
    try:
        layer = Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.weight = Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
        layer = layer.to(device)  # moving the layer is what quantizes its weight
        if layer.weight.dtype not in (torch.uint8, torch.int8):
            return {"4bit": f"weight stayed {layer.weight.dtype} (not quantized)"}
        with torch.no_grad():
            return {"4bit": _roughly_right(layer(x), x, weight)}
    except Exception as exc:
        return {"4bit": _one_line(exc)}


def _roughly_right(out: Any, x: Any, weight: Any) -> str:
    """'ok' when a quantized layer's output is close to the exact product (lossy: only roughly is asked)."""
    expected = x.float() @ weight.to(x.device).float().t()
    error = ((out.float() - expected).norm() / expected.norm()).item()
    return "ok" if error < 0.25 else f"wrong result (relative error {error:.2f})"


def _torchao() -> dict[str, Any]:
    """--quant 8bit (int8 weight-only) needs torchao: its version, and a small Linear quantized and run on
    every device."""
    info: dict[str, Any] = {"version": _version("torchao"), "imports": False}
    if info["version"] is None:
        info["error"] = "not installed (pip install torchao): --quant 8bit is unavailable"
        return info
    try:
        from monkey_cli.model.quantization import import_torchao

        import_torchao()
    except Exception as exc:
        info["error"] = _one_line(exc)
        return info
    info["imports"] = True
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    info["usable"] = {device: _int8_roundtrip(device) for device in ["cpu", *(f"cuda:{i}" for i in range(gpus))]}
    return info


def _int8_roundtrip(device: str) -> dict[str, str]:
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    weight = torch.randn(64, 128, dtype=torch.bfloat16)
    x = torch.randn(3, 128, dtype=torch.bfloat16, device=device)
    try:
        layer = torch.nn.Linear(128, 64, bias=False, dtype=torch.bfloat16, device=device)
        with torch.no_grad():
            layer.weight.copy_(weight)
        quantize_(layer, Int8WeightOnlyConfig(set_inductor_config=False))
        with torch.no_grad():
            return {"8bit": _roughly_right(layer(x), x, weight)}
    except Exception as exc:
        return {"8bit": _one_line(exc)}


def _transformers() -> dict[str, Any]:
    from packaging.specifiers import SpecifierSet

    version = _version("transformers")
    return {
        "version": version,
        "tested_range": TESTED_TRANSFORMERS,
        "in_tested_range": version is not None and version in SpecifierSet(TESTED_TRANSFORMERS),
    }


def _huggingface_hub(model: str = DEFAULT_MODEL) -> dict[str, Any]:
    from huggingface_hub import constants

    from monkey_cli.model.sources import is_hub_id

    # The constants are read from the environment when huggingface_hub is first imported, which is
    # exactly what the loader will use in this process.
    cache = Path(constants.HF_HUB_CACHE)
    return {
        "version": _version("huggingface_hub"),
        "cache_dir": str(cache),
        "offline": bool(constants.HF_HUB_OFFLINE),
        "models": {
            repo: _probe(lambda repo=repo: cached_model(repo, cache))
            for repo in dict.fromkeys([*KNOWN_MODELS, *([model] if _is_repo(model, is_hub_id) else [])])
        },
    }


def cached_model(repo_id: str, cache_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Whether `repo_id`'s main revision is complete in the cache: status complete / incomplete / absent."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    if not isinstance(config, str):
        return {"status": "absent", "path": None}
    snapshot = Path(config).parent
    missing = [name for name in _CHECKPOINT_FILES if not (snapshot / name).is_file()]
    missing += _missing_weights(snapshot)
    status = "incomplete" if missing else "complete"
    return {"status": status, "path": str(snapshot), "missing": missing}


def _missing_weights(snapshot: Path) -> list[str]:
    import json

    for index_name in _WEIGHT_INDEXES:
        index = snapshot / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            return [shard for shard in shards if not (snapshot / shard).is_file()]
    if any((snapshot / name).is_file() for name in _WEIGHT_SINGLES):
        return []
    return ["weights (" + " / ".join(_WEIGHT_SINGLES + _WEIGHT_INDEXES) + ")"]


def _is_repo(model: str, is_hub_id: Callable[[str], bool]) -> bool:
    return is_hub_id(model) and not Path(model).expanduser().is_dir()


def default_dtype(device: str, bf16: bool = True, checkpoint: str = "bfloat16") -> str:
    """The compute dtype --dtype auto gives a checkpoint of precision `checkpoint` (the released Monkeys:
    bfloat16): its own, except float16 for bfloat16 on a GPU without it (`bf16`) and float32 for float16
    on the CPU (as `model.loading.resolve_dtype` decides, without loading torch's device state)."""
    if device.startswith("cuda"):
        return "float16" if checkpoint == "bfloat16" and not bf16 else checkpoint
    return "float32" if checkpoint == "float16" else checkpoint


# TextMonkey's weights are published on ModelScope, not the Hugging Face hub: planned from its derived config.
TEXTMONKEY_MODEL = "TextMonkey (ModelScope lvskiller/TextMonkey)"


def model_config(model: str) -> Any:
    """The config `model` is sized from: a local folder's config.json, the hub cache's copy, or for a hub id
    not cached yet the released checkpoints' shape; a path that is no folder is an error, not a guess.
    TEXTMONKEY_MODEL is the released TextMonkey's derived config."""
    from monkey_cli.errors import ConfigError
    from monkey_cli.model.configuration import real_textmonkey_config
    from monkey_cli.model.sources import is_hub_id, peek_config

    if model == TEXTMONKEY_MODEL:
        return real_textmonkey_config()
    if not Path(model).expanduser().is_dir() and not is_hub_id(model):
        raise ConfigError(f"--model {model}: no such checkpoint folder (and not a hub id such as owner/name)")
    return peek_config(model)


def _memory(devices: dict[str, Any], model: str = DEFAULT_MODEL) -> dict[str, Any]:
    """Which --quant fits on which device for `model` (or the released TextMonkey for TEXTMONKEY_MODEL),
    batch size 1, default lengths."""
    from monkey_cli.model.memory import AUTO_OPTIONS, plan

    config = model_config(model)
    precision = config.checkpoint_dtype
    targets: list[tuple[str, int | None, str]] = []
    for cuda in devices.get("cuda", []):
        if "device" in cuda:
            dtype = default_dtype(cuda["device"], cuda["bf16"], precision)
            targets.append((cuda["device"], cuda["free_bytes"], dtype))
    targets.append(("cpu", devices.get("cpu", {}).get("available_bytes"), default_dtype("cpu", True, precision)))
    plans = []
    for device, budget, dtype in targets:
        auto_found = False
        for quant, quant_vision in AUTO_OPTIONS:  # from the most faithful, as --quant auto tries them
            p = plan(config, quant, dtype, quant_vision=quant_vision, budget_bytes=budget)
            auto = p.fits is not False and not auto_found
            auto_found = auto_found or auto
            plans.append(
                {
                    "device": device,
                    "dtype": dtype,
                    "quant": quant,
                    "quant_vision": quant_vision,
                    "flags": p.flags,
                    "total_bytes": p.total_bytes,
                    "weight_bytes": p.weight_bytes,
                    "budget_bytes": budget,
                    "fits": p.fits,
                    "auto": auto,
                }
            )
    return {"model": model, "batch_size": 1, "image_tokens": config.tokens_per_image, "plans": plans}


# --- findings ------------------------------------------------------------------------------------


def problems(report: dict[str, Any]) -> list[str]:
    """One line per thing that limits what monkey can do here, most important first."""
    # The quantization libraries' failures are reported below with their consequence.
    found = [
        f"{section}: {data['error']}"
        for section, data in report.items()
        if isinstance(data, dict) and "error" in data and section not in ("bitsandbytes", "torchao")
    ]
    torch_info = report.get("torch", {})
    if "error" not in torch_info and not torch_info.get("cuda_available"):
        found.append("no CUDA device: the model runs on the CPU, slowly")
    unusable = []
    for section, quant in (("torchao", "8bit"), ("bitsandbytes", "4bit")):
        library = report.get(section, {})
        if not any("ok" in result.values() for result in library.get("usable", {}).values()):
            unusable.append(quant)
            why = library.get("error", "no device passed its quantization check")
            found.append(f"{section} is not usable ({why}): --quant {quant} does not work")
    if len(unusable) == 2:
        found.append("only --quant none works")
    transformers_info = report.get("transformers", {})
    if transformers_info.get("in_tested_range") is False:
        found.append(
            f"transformers {transformers_info.get('version')} is outside the tested range "
            f"{transformers_info.get('tested_range')}"
        )
    hub = report.get("huggingface_hub", {})
    model = report.get("model", DEFAULT_MODEL)
    cached = hub.get("models", {}).get(model)
    if cached is not None and cached.get("status") != "complete" and "error" not in hub:
        if hub.get("offline"):
            found.append(f"{model} is not cached and HF_HUB_OFFLINE is set: it cannot be downloaded")
        else:
            found.append(f"{model} is not cached: the first run downloads it ({_download_size(model)})")
    plans = report.get("memory", {}).get("plans", [])
    if plans and not any(p["fits"] for p in plans):
        found.append("no --quant option fits in any device's free memory")
    return found


def _download_size(model: str = DEFAULT_MODEL) -> str:
    from monkey_cli.model.memory import DTYPE_BYTES, format_bytes, parameter_counts

    config = model_config(model)
    parameters = sum(parameter_counts(config).values())
    return "about " + format_bytes(parameters * DTYPE_BYTES[config.checkpoint_dtype])


# --- the engine's speed on this machine (monkey doctor --bench) ----------------------------------------

BENCH_QUESTION = "What is the title of this page?"


def bench(
    source: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str | None = None,
    quant: str | None = None,
    compile: bool | None = None,
    batch_size: int = 8,
    tokens: int = 32,
) -> dict[str, Any]:
    """Load `source` and measure the generation engine: warm-up (compiling and capturing), the first token of
    one page, and the median decode step with 1 and `batch_size` busy slots (answers forced to `tokens`
    tokens). compile None: on for CUDA (what a long run gets), off for the CPU."""
    import statistics
    import time

    from monkey_cli.api import Monkey

    started = time.perf_counter()
    monkey = Monkey.load(source, device=device, dtype=dtype, quant=quant, batch_size=batch_size,
                         max_new_tokens=tokens, compile=compile)  # fmt: skip
    load_s = time.perf_counter() - started
    weights = monkey.model.transformer.wte.weight
    if monkey.compile is None:  # a benchmark measures what a long run gets
        monkey.compile = weights.device.type == "cuda"
    scheduler = monkey.scheduler(monkey.batch_size)
    started = time.perf_counter()
    scheduler.warm_up()
    warmup_s = time.perf_counter() - started
    page = bench_page(monkey.processor.input_size)
    prompt_ids = monkey.check_prompt(tasks.vqa_prompt(BENCH_QUESTION), tokens)
    started = time.perf_counter()
    scheduler.run([_forced_request(prompt_ids, tokens=1, image=page)])
    first_token_ms = (time.perf_counter() - started) * 1000
    features = monkey.encode_images([page])[0]
    rows = []
    for batch in sorted({1, scheduler.slots}):
        handles = [scheduler.submit(_forced_request(prompt_ids, tokens, image_embeds=features)) for _ in range(batch)]
        scheduler.step()  # admission (the prefills) and the first token
        steps, syncs = [], []
        while not all(handle.done() for handle in handles):
            with _host_syncs(weights.device) as counted:
                begun = time.perf_counter()
                scheduler.step()  # ends with the host reading the new tokens: the step is complete
                steps.append((time.perf_counter() - begun) * 1000)
            syncs.append(counted[0])
        step_ms = statistics.median(steps)
        rows.append({
            "batch": batch, "ms_per_token": step_ms, "tokens_per_s": batch * 1000 / step_ms,
            "host_syncs_per_step": statistics.median(syncs) if weights.device.type == "cuda" else None,
        })  # fmt: skip
    return {
        "model": str(source),
        "device": str(weights.device),
        "dtype": str(weights.dtype).removeprefix("torch."),
        "quant": monkey.quant,
        "slots": scheduler.slots,
        "answer_tokens": tokens,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "first_token_ms": first_token_ms,
        "decode": rows,
        "compile": scheduler.compile_report(),
    }


def bench_page(size: tuple[int, int]) -> Any:
    """A synthetic document page: a title and lines of text on white (the content does not change the speed)."""
    from PIL import Image, ImageDraw

    page = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(page)
    draw.text((40, 30), "QUARTERLY REPORT", fill="black")
    for line in range(2, 40):
        draw.text((40, 30 + 20 * line), f"{line:>3}  item {line * 7:>5}  amount {line * 113.5:>10.2f}", fill="black")
    return page


def _forced_request(prompt_ids: list[int], tokens: int, **image: Any) -> Any:
    """A request whose answer is exactly `tokens` long (random or unfamiliar weights cannot stop early)."""
    from monkey_cli.engine.sampling import SamplingParams
    from monkey_cli.engine.scheduler import GenerationRequest

    return GenerationRequest(prompt_ids, params=SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens), **image)


@contextmanager
def _host_syncs(device: Any) -> Iterator[list[int]]:
    """Count the host-device synchronisations inside the block (CUDA's sync debug mode; 0 elsewhere)."""
    import warnings

    import torch

    counted = [0]
    if device.type != "cuda":
        yield counted
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counted
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    counted[0] = sum("synchroniz" in str(warning.message) for warning in caught)

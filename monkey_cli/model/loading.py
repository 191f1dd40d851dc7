"""Checkpoint folder -> MonkeyForCausalLM: weight files found and checked, then loaded by name.

Supported layouts (as the original and the Hub publish them): `model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, `pytorch_model.bin`, or `.bin` shards with `pytorch_model.bin.index.json`.
Before any weight is read, every key and shape is checked against the model built from `config.json`, so a
mismatch is one line naming the key and the file. `.bin` files are read with `weights_only=True`: a
checkpoint can never run code, and its own `.py` files are never imported. Every file read (by us or by
transformers' loader) must be a regular file inside the model folder: an index naming `../../etc/passwd`,
a symbolic link leading elsewhere, a FIFO or a device is refused with one line before anything is opened.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monkey_cli.errors import CheckpointError
from monkey_cli.model.configuration import MonkeyConfig, load_config
from monkey_cli.model.families import DISPLAY_NAMES
from monkey_cli.model.sources import MAX_JSON_BYTES, model_file, read_regular_file

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

GENERATION_CONFIG = "generation_config.json"
# Files transformers' from_pretrained opens on its own when they exist (besides config.json and weights).
_TRANSFORMERS_READS = (GENERATION_CONFIG,)
# With peft installed, transformers applies an adapter it finds in the checkpoint folder by itself, reading
# its files unchecked: a checkpoint folder holding one is refused (adapters come only through --adapter).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# What the checkpoint's generation_config.json may set: only the sampling knobs, used when a caller asks
# to sample. Greedy stays the default (as every call site of the original passes do_sample=False).
SAMPLING_FIELDS = ("temperature", "top_k", "top_p")  # what the engine's sampler takes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class WeightFiles:
    """The weight files of a checkpoint folder and the key -> file map they declare."""

    folder: Path
    files: tuple[Path, ...]
    is_safetensors: bool


def find_weight_files(folder: Path) -> WeightFiles:
    """Locate the weights (regular files inside `folder`); an index's shards must all exist."""
    for index_name, single_name, is_safe in ((SAFETENSORS_INDEX, SAFETENSORS, True), (BIN_INDEX, BIN, False)):
        index = model_file(folder, index_name, required=False)
        if index is not None:
            return WeightFiles(folder, tuple(_shards_from_index(folder, index)), is_safe)
        single = model_file(folder, single_name, required=False)
        if single is not None:
            return WeightFiles(folder, (single,), is_safe)
    raise CheckpointError(
        f"{folder}: no weights found (expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or {BIN_INDEX})"
    )


def _shards_from_index(folder: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(read_regular_file(index, MAX_JSON_BYTES).decode("utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
        if not all(isinstance(name, str) for name in names):
            raise TypeError("shard names must be strings")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise CheckpointError(f"{index}: not a valid weight index ({exc})") from None
    shards = []
    for name in names:
        shard = model_file(folder, name, required=False)
        if shard is None:
            raise CheckpointError(f"{index}: names shard {name}, which is missing")
        shards.append(shard)
    return shards


def check_model_files(folder: Path) -> WeightFiles:
    """Every file loading will open, checked to be a regular file inside `folder`; returns the weights. A
    folder with an adapter in it is refused: transformers would apply it silently, unchecked and unhashed."""
    for name in ADAPTER_FILES:
        if os.path.lexists(folder / name):
            raise CheckpointError(
                f"{folder / name}: this checkpoint folder holds a LoRA adapter, which monkey applies only with "
                "--adapter (checked, and part of the resume fingerprint): give the base checkpoint to --model "
                "and the adapter's folder to --adapter, or move the adapter's files out of this folder"
            )
    for name in _TRANSFORMERS_READS:
        model_file(folder, name, required=False)
    return find_weight_files(folder)


def sampling_defaults(folder: Path) -> dict[str, Any]:
    """The sampling settings of the checkpoint's generation_config.json (SAMPLING_FIELDS), if it has one.

    echo840/Monkey ships top_p 0.5 and top_k 0 (no top-k cut). Other fields are not taken: greedy decoding,
    the answer length and the stop token stay as the original's call sites set them.
    """
    path = model_file(folder, GENERATION_CONFIG, required=False)
    if path is None:
        return {}
    try:
        data = json.loads(read_regular_file(path, MAX_JSON_BYTES).decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    defaults = {}
    for field in SAMPLING_FIELDS:
        value = data.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise CheckpointError(f"{path}: field '{field}' must be a non-negative number, got {value!r}")
        defaults[field] = value
    return defaults


def read_shapes(weights: WeightFiles) -> dict[str, tuple[tuple[int, ...], Path]]:
    """key -> (shape, file) without loading tensor data (safetensors headers; .bin memory-mapped)."""
    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for file in weights.files:
        for key, shape in _file_shapes(file, weights.is_safetensors):
            shapes[key] = (shape, file)
    return shapes


def _file_shapes(file: Path, is_safetensors: bool) -> Iterable[tuple[str, tuple[int, ...]]]:
    try:
        if is_safetensors:
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                return [(key, tuple(handle.get_slice(key).get_shape())) for key in handle.keys()]  # noqa: SIM118
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # truncated, corrupt, or not a weights file at all
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{file}: cannot read weights ({reason}); the file may be truncated") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: not a state dict")
    return [(key, tuple(t.shape)) for key, t in state.items() if isinstance(t, torch.Tensor)]


def expected_shapes(config: MonkeyConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model built from `config`, built on the meta device (no memory)."""
    from monkey_cli.model.modeling import MonkeyForCausalLM

    with torch.device("meta"):
        model = MonkeyForCausalLM(config)
    return {key: tuple(t.shape) for key, t in model.state_dict().items()}


def check_weights(config: MonkeyConfig, weights: WeightFiles) -> None:
    """Missing, unexpected or mis-shaped keys -> one line naming the key and the file."""
    from monkey_cli.model.modeling import MonkeyPreTrainedModel

    found = read_shapes(weights)
    expected = expected_shapes(config)
    ignored = [re.compile(p) for p in MonkeyPreTrainedModel._keys_to_ignore_on_load_unexpected]
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{weights.folder}: missing weight '{missing[0]}'{more} of a {DISPLAY_NAMES[config.family]} model"
        )
    for key, (shape, file) in sorted(found.items()):
        if key not in expected:
            if any(p.search(key) for p in ignored):
                continue
            raise CheckpointError(
                f"{file}: unexpected weight '{key}' (not part of a {DISPLAY_NAMES[config.family]} model with this "
                "config; --family chooses the other one)"
            )
        if shape != expected[key]:
            raise CheckpointError(
                f"{file}: weight '{key}' has shape {list(shape)}, the config expects {list(expected[key])}"
            )


def resolve_dtype(dtype: str | torch.dtype | None, device: str, config: MonkeyConfig | None = None) -> torch.dtype:
    """None/'auto' -> the checkpoint's own precision (config.json's bf16 / fp16 / fp32 flags; the released
    Monkeys say bf16) where `device` runs it: a GPU without bfloat16 (before Ampere) takes float16 instead,
    and a CPU takes float32 for a float16 checkpoint (float16 is not a CPU precision). Without a config,
    bfloat16 (the released precision)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        wanted = DTYPES[config.checkpoint_dtype] if config is not None else torch.bfloat16
        if device.startswith("cuda"):
            index = torch.device(device).index or 0
            if wanted is torch.bfloat16 and not torch.cuda.is_bf16_supported(index):
                return torch.float16
            return wanted
        return torch.float32 if wanted is torch.float16 else wanted
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[dtype]


def load_model(
    folder: str | Path,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    quant: str = "none",
    quant_vision: bool = False,
    config_overrides: dict[str, Any] | None = None,
    family: str | None = None,
) -> Any:
    """Build MonkeyForCausalLM from a local checkpoint folder, checked before loading, in eval mode.

    `family` ("monkey", "textmonkey"; None: the config says) picks the vision tower."""
    from transformers.utils import logging as hf_logging

    from monkey_cli.model.quantization import import_torchao_quietly, quantization_config

    import_torchao_quietly()  # before transformers' quantizers import it and log about kernels nobody uses
    from monkey_cli.model.modeling import MonkeyForCausalLM, default_generation_config

    folder = Path(folder)
    config = load_config(folder, family=family)
    for field, value in (config_overrides or {}).items():
        setattr(config, field, value)
    weights = check_model_files(folder)
    check_weights(config, weights)
    torch_dtype = resolve_dtype(dtype, device, config)
    kwargs: dict[str, Any] = {"config": config, "dtype": torch_dtype, "use_safetensors": weights.is_safetensors}
    quantization = quantization_config(config, quant, torch_dtype, quant_vision)
    if quantization is not None:
        # Quantized as each weight is read, on the target device: the full-precision model never exists there.
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": device}
    hf_logging.disable_progress_bar()  # our own progress goes to stderr; keep transformers' bars off it
    try:
        model = MonkeyForCausalLM.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{folder}: cannot load weights ({first})") from None
    finally:
        hf_logging.enable_progress_bar()
    if quantization is None:
        model = model.to(device)
    # from_pretrained derives one from config.json, whose use_cache=false is a training leftover.
    model.generation_config = default_generation_config(config)
    return model.eval()

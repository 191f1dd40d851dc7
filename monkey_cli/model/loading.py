"""Checkpoint folder -> MonkeyForCausalLM: weight files found and checked, then loaded by name.

Supported layouts (as the original and the Hub publish them): `model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, `pytorch_model.bin`, or `.bin` shards with `pytorch_model.bin.index.json`.
Before any weight is read, every key and shape is checked against the model built from `config.json`, so a
mismatch is one line naming the key and the file. `.bin` files are read with `weights_only=True`: a
checkpoint can never run code, and its own `.py` files are never imported.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monkey_cli.errors import CheckpointError
from monkey_cli.model.configuration import MonkeyConfig, load_config

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class WeightFiles:
    """The weight files of a checkpoint folder and the key -> file map they declare."""

    folder: Path
    files: tuple[Path, ...]
    is_safetensors: bool


def find_weight_files(folder: Path) -> WeightFiles:
    """Locate the weights; an index's shards must all exist."""
    for index_name, single_name, is_safe in ((SAFETENSORS_INDEX, SAFETENSORS, True), (BIN_INDEX, BIN, False)):
        index = folder / index_name
        if index.is_file():
            return WeightFiles(folder, tuple(_shards_from_index(index)), is_safe)
        if (folder / single_name).is_file():
            return WeightFiles(folder, (folder / single_name,), is_safe)
    raise CheckpointError(
        f"{folder}: no weights found (expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or {BIN_INDEX})"
    )


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index}: not a valid weight index ({exc})") from None
    shards = [index.parent / name for name in names]
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{index}: names shard {shard.name}, which is missing")
    return shards


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
        raise CheckpointError(f"{weights.folder}: missing weight '{missing[0]}'{more}")
    for key, (shape, file) in sorted(found.items()):
        if key not in expected:
            if any(p.search(key) for p in ignored):
                continue
            raise CheckpointError(f"{file}: unexpected weight '{key}' (not part of a Monkey model with this config)")
        if shape != expected[key]:
            raise CheckpointError(
                f"{file}: weight '{key}' has shape {list(shape)}, the config expects {list(expected[key])}"
            )


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """None/'auto' -> float32 on CPU, bfloat16 on a GPU that has it, else float16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.startswith("cuda"):
            index = torch.device(device).index or 0
            return torch.bfloat16 if torch.cuda.is_bf16_supported(index) else torch.float16
        return torch.float32
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
) -> Any:
    """Build MonkeyForCausalLM from a local checkpoint folder, checked before loading, in eval mode."""
    from transformers.utils import logging as hf_logging

    from monkey_cli.model.modeling import MonkeyForCausalLM, default_generation_config
    from monkey_cli.model.quantization import bitsandbytes_config

    folder = Path(folder)
    config = load_config(folder)
    for field, value in (config_overrides or {}).items():
        setattr(config, field, value)
    weights = find_weight_files(folder)
    check_weights(config, weights)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict[str, Any] = {"config": config, "dtype": torch_dtype, "use_safetensors": weights.is_safetensors}
    quantization_config = bitsandbytes_config(config, quant, torch_dtype, quant_vision)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device}
    if quant == "8bit":
        # LLM.int8 logs "inputs will be cast ... to float16" on every matmul call: thousands of stderr lines.
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()  # our own progress goes to stderr; keep transformers' bars off it
    try:
        model = MonkeyForCausalLM.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{folder}: cannot load weights ({first})") from None
    finally:
        hf_logging.enable_progress_bar()
    if quantization_config is None:
        model = model.to(device)
    # from_pretrained derives one from config.json, whose use_cache=false is a training leftover.
    model.generation_config = default_generation_config(config)
    return model.eval()

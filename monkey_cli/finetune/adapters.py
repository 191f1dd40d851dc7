"""LoRA adapters for Monkey (peft): which layers they train, applying one to a loaded model, merging, hashing.

An adapter folder is peft's own format (`adapter_config.json` + `adapter_model.safetensors`), so
`peft.PeftModel.from_pretrained` reads it too. LoRA goes on the decoder's Linear layers only; the names are
matched by an anchored pattern under `transformer.h.N.`, so the vision tower's own `c_proj` never matches.
With `train_window_lora`, the ViT's per-window LoRA banks (the original's `fix_vit=False` side of the
choice) are trained too, as peft "modules to save": full trained copies stored in the adapter.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monkey_cli.errors import CheckpointError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from peft import LoraConfig, PeftModel

    from monkey_cli.model.modeling import MonkeyForCausalLM

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINING_ARGS_FILE = "training_args.json"  # written by `monkey finetune` next to the adapter
# The decoder's Linear layers, as named under `transformer.h.N.` (the original checkpoint's names).
DECODER_TARGETS: tuple[str, ...] = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
# The vision tower's per-window LoRA banks: one adapter per window in each (peft matches name suffixes).
WINDOW_LORA_BANKS: tuple[str, ...] = ("attn.in_proj_lora", "attn.out_proj_lora", "mlp_lora")
MAX_SHARD_SIZE = "5GB"  # the released checkpoints' shards are 2-5 GB


def require_peft() -> Any:
    """The peft module, or one line saying how to install it (it is an optional extra)."""
    try:
        import peft
    except ImportError:
        raise UsageError("fine-tuning and adapters need peft: pip install 'monkey-cli[finetune]'") from None
    return peft


@contextlib.contextmanager
def quiet_library_warnings() -> Iterator[None]:
    """Deprecation notices that peft and transformers print about each other are not the user's business."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


def target_pattern(targets: Sequence[str] = DECODER_TARGETS) -> str:
    """A regular expression peft matches against whole module names: decoder layers only."""
    unknown = [t for t in targets if t not in DECODER_TARGETS]
    if unknown or not targets:
        raise UsageError(f"--lora-target must be among {', '.join(DECODER_TARGETS)}; got {', '.join(targets) or '-'}")
    alternatives = "|".join(re.escape(t) for t in targets)
    return rf"transformer\.h\.\d+\.(?:{alternatives})"


def lora_config(
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    targets: Sequence[str] = DECODER_TARGETS,
    train_window_lora: bool = False,
    windows: int = 4,
) -> LoraConfig:
    """peft's LoraConfig for Monkey (defaults: the original's LoraArguments).

    With `train_window_lora`, each window's adapter in every ViT block (`windows` of them per bank) is a
    peft module to save: trained as a copy, stored whole in the adapter file.
    """
    return require_peft().LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_pattern(targets),
        modules_to_save=window_lora_modules(windows) if train_window_lora else None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def window_lora_modules(windows: int) -> list[str]:
    """Module-name suffixes of the per-window adapters (peft cannot wrap the banks, which are ModuleLists)."""
    return [f"{bank}.{window}" for bank in WINDOW_LORA_BANKS for window in range(windows)]


def add_lora(model: MonkeyForCausalLM, config: LoraConfig) -> PeftModel:
    """Wrap `model` for training: everything frozen but the adapter, whose parameters are kept in float32
    (an optimizer step on bfloat16 weights would lose most small updates)."""
    with quiet_library_warnings():
        peft_model = require_peft().get_peft_model(model, config)
    for parameter in peft_model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return peft_model


def save_adapter(model: PeftModel, out: str | Path) -> Path:
    """Write the adapter (peft's files) into `out`; each file replaces its old version only once complete."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adapter.", dir=out))
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):  # weights first: a config always has its weights
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------------------
# Reading an adapter folder
# ---------------------------------------------------------------------------------------------------------
def check_adapter_dir(adapter: str | Path) -> Path:
    """The folder, if it holds a LoRA adapter in safetensors; else one line saying what is wrong."""
    folder = Path(adapter)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: adapter folder not found")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: not an adapter folder (no {name})")
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: not a LoRA adapter config")
    return folder


def trained_base(adapter: str | Path) -> str:
    """The base checkpoint a `monkey finetune` run trained this adapter on (from its training_args.json)."""
    record = Path(adapter) / TRAINING_ARGS_FILE
    try:
        return str(json.loads(record.read_text(encoding="utf-8"))["base_model"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(
            f"{adapter}: no readable {TRAINING_ARGS_FILE} says which base it was trained on; give --model"
        ) from None


def adapter_fingerprint(adapter: str | Path) -> str:
    """sha256 over the adapter's config and weights: changes whenever what the adapter does could change."""
    folder = check_adapter_dir(adapter)
    digest = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        digest.update(name.encode() + b"\0")
        with open(folder / name, "rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def load_adapter(model: MonkeyForCausalLM, adapter: str | Path) -> PeftModel:
    """`model` wrapped with the adapter in `adapter` (inference mode: nothing trainable)."""
    folder = check_adapter_dir(adapter)
    peft = require_peft()
    try:
        with quiet_library_warnings():
            peft_model = peft.PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:  # shapes or layers that do not fit this model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{folder}: adapter does not fit this model ({first})") from None
    _match_window_lora_dtype(peft_model)
    return peft_model.eval()


def apply_adapter(model: MonkeyForCausalLM, adapter: str | Path) -> MonkeyForCausalLM:
    """The same model object with the adapter's LoRA layers in place (unmerged: works on a quantized base)."""
    return load_adapter(model, adapter).get_base_model()


def _match_window_lora_dtype(peft_model: PeftModel) -> None:
    """Trained window-LoRA copies are stored in float32; at inference they run in the vision tower's dtype."""
    visual = peft_model.get_base_model().transformer.visual
    dtype = visual.conv1.weight.dtype
    for module in visual.modules():
        if hasattr(module, "modules_to_save"):
            module.modules_to_save.to(dtype)


# ---------------------------------------------------------------------------------------------------------
# Merging into a full checkpoint
# ---------------------------------------------------------------------------------------------------------
def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Write base + adapter as a full checkpoint in the released layout; `--model OUT` then needs no adapter.

    The base is loaded unquantized on the CPU in the dtype it was saved in (about 20 GB of RAM for the
    released model), the LoRA deltas are added to its weights (in float32, then cast back), and the result
    is written as config.json (the base's, byte for byte), qwen.tiktoken and safetensors shards with the
    original's parameter names. The folder appears only when complete.
    """
    from monkey_cli.model.configuration import load_config
    from monkey_cli.model.loading import check_weights, find_weight_files, load_model
    from monkey_cli.model.sources import resolve_source
    from monkey_cli.model.tokenizer import VOCAB_FILE_NAME

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: already exists and is not an empty folder; choose a new --out")
    folder = resolve_source(base)
    config = load_config(folder)
    check_adapter_dir(adapter)
    model = load_model(folder, device="cpu", dtype=config.checkpoint_dtype, quant="none")
    merged = load_adapter(model, adapter).merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_weights(merged.state_dict(), staging)
        for name in ("config.json", VOCAB_FILE_NAME):
            shutil.copyfile(folder / name, staging / name)
        check_weights(config, find_weight_files(staging))  # the loader will accept it: every key, every shape
        _usual_permissions(staging)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _usual_permissions(folder: Path) -> None:
    """mkdtemp makes a private folder; the checkpoint gets the permissions of any folder the user creates."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _write_weights(state: dict[str, Any], folder: Path) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from monkey_cli.model.loading import SAFETENSORS_INDEX

    split = split_torch_state_dict_into_shards(state, max_shard_size=MAX_SHARD_SIZE)
    for file_name, names in split.filename_to_tensors.items():
        shard = {name: state[name].detach().contiguous() for name in names}
        save_file(shard, str(folder / file_name), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

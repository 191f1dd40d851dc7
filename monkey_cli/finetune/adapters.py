"""LoRA adapters for Monkey (peft): which layers they train, applying one to a loaded model, merging, hashing.

An adapter folder is peft's own format (`adapter_config.json` + `adapter_model.safetensors`), so
`peft.PeftModel.from_pretrained` reads it too. Reading one here never lets peft see the folder: the config is
checked field by field (`read_adapter_config`: known fields only, LoRA on this model's own layer names, rank
and sizes bounded), the weights file's header is checked against the shapes the config means for this model
before anything is allocated, and the LoRA layers are built from our own `lora_config`. The files must be
regular files inside the folder (no link out of it, no FIFO), within size limits.

LoRA goes on the decoder's Linear layers only; the names are
matched by an anchored pattern under `transformer.h.N.`, so the vision tower's own `c_proj` never matches.
With `train_window_lora`, the ViT's per-window LoRA banks (the original's `fix_vit=False` side of the
choice) are trained too, as peft "modules to save": full trained copies stored in the adapter.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monkey_cli.errors import CheckpointError, MissingExtra, MonkeyWarning, UsageError
from monkey_cli.model.sources import model_file, read_regular_file

if TYPE_CHECKING:  # pragma: no cover
    from peft import LoraConfig, PeftModel

    from monkey_cli.model.modeling import MonkeyForCausalLM
    from monkey_cli.output_folder import OutputFolder

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINING_ARGS_FILE = "training_args.json"  # written by `monkey finetune` next to the adapter
# The decoder's Linear layers, as named under `transformer.h.N.` (the original checkpoint's names).
DECODER_TARGETS: tuple[str, ...] = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
# The vision tower's per-window LoRA banks: one adapter per window in each (peft matches name suffixes).
WINDOW_LORA_BANKS: tuple[str, ...] = ("attn.in_proj_lora", "attn.out_proj_lora", "mlp_lora")
MAX_SHARD_SIZE = "5GB"  # the released checkpoints' shards are 2-5 GB
MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json is about 2 KB
MAX_RECORD_BYTES = 64 << 20  # a training_args.json lists the skipped items: a few MB for a very bad data file
MAX_HEADER_BYTES = 16 << 20  # a safetensors header names each tensor once: a few hundred kB at most
MAX_RANK = 4096  # far above any useful LoRA rank; the weights' own shapes must agree with the config's
# A saved LoRA's tensor names: peft's prefix, the layer, the adapter matrix ("lora_A"/"lora_B").
PEFT_PREFIX = "base_model.model."
_SAFETENSORS_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
# adapter_config.json fields, as peft 0.21 writes them: those that decide the LoRA (checked one by one in
# `read_adapter_config`), those that only describe it, and those of peft features monkey never trains, which
# must be off (None, False, {} or the value peft writes).
_DESCRIBING = {"base_model_name_or_path", "revision", "peft_version", "inference_mode", "init_lora_weights",
               "qalora_group_size", "megatron_core"}  # fmt: skip
_OFF_FIELDS = {
    "alpha_pattern", "rank_pattern", "layers_pattern", "layers_to_transform", "use_dora", "use_rslora",
    "fan_in_fan_out", "lora_bias", "loftq_config", "layer_replication", "megatron_config", "exclude_modules",
    "target_parameters", "trainable_token_indices", "eva_config", "corda_config", "use_qalora",
    "alora_invocation_tokens", "arrow_config", "ensure_weight_tying", "kasa_config", "lora_ga_config",
    "monteclora_config", "use_bdlora", "velora_config", "auto_mapping",
}  # fmt: skip
_DECIDING = {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "bias"}


def require_peft() -> Any:
    """The peft module, or one line saying how to install it (it is an optional extra)."""
    try:
        import peft
    except ImportError:
        message = "fine-tuning and adapters need peft: pip install 'monkey-cli[finetune]'"
        raise MissingExtra(message, extra="finetune", module="peft") from None
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


def save_adapter(model: PeftModel, out: str | Path, *, folder: OutputFolder | None = None) -> Path:
    """Write the adapter (peft's files) into `out`; each file replaces its old version only once complete.
    With `folder` (the run folder, `out` opened), the files go through it: whole, and recorded as monkey's."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adapter.", dir=out))
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        if folder is not None:
            files = [(name, (staging / name).read_bytes()) for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)]
            folder.write_files(files, {name: {"finetune": "adapter"} for name, _ in files})
        else:
            for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):  # weights first: a config always has its weights
                os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------------------
# Reading an adapter folder
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterConfig:
    """What an adapter_config.json decides, checked (see `read_adapter_config`)."""

    r: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]  # among DECODER_TARGETS
    window_lora: bool  # the ViT's per-window LoRA banks are saved whole (modules_to_save)

    def lora_config(self, windows: int) -> LoraConfig:
        return lora_config(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
                           train_window_lora=self.window_lora, windows=windows)  # fmt: skip


def check_adapter_dir(adapter: str | Path) -> Path:
    """The folder, if it holds a LoRA adapter we can read (config checked, weights' header well formed);
    else one line saying what is wrong."""
    folder = Path(adapter)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: adapter folder not found")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if model_file(folder, name, required=False) is None:
            raise CheckpointError(f"{folder}: not an adapter folder (no {name})")
    read_adapter_config(folder)
    read_safetensors_header(folder / ADAPTER_WEIGHTS)
    return folder


def read_adapter_config(folder: str | Path) -> AdapterConfig:
    """adapter_config.json, checked before peft (or anything else) acts on it: a JSON object of at most
    MAX_CONFIG_BYTES with known fields only; a LoRA on the decoder layers monkey trains (target_modules as
    `monkey finetune` writes them, never compiled as a pattern), a rank of 1..MAX_RANK, the per-window ViT
    LoRA as modules to save or nothing; peft features monkey does not train switched off."""
    path = model_file(Path(folder), ADAPTER_CONFIG)
    assert path is not None
    try:
        config = json.loads(read_regular_file(path, MAX_CONFIG_BYTES).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: not a LoRA adapter config (peft_type must be 'LORA')")

    def bad(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: field '{field}' {why}, got {_shown(config.get(field))}")

    for field, value in config.items():
        if field in _DECIDING or field in _DESCRIBING:
            continue
        if value not in (None, False, {}, [], "megatron.core"):  # a feature switched on that monkey never trains
            known = field in _OFF_FIELDS
            raise CheckpointError(
                f"{path}: field {_shown(field)} {'is a peft feature monkey does not use' if known else 'is unknown'}"
                f" and must be off (null), got {_shown(value)}"
            )
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise bad("task_type", "must be CAUSAL_LM")
    if config.get("bias", "none") != "none":
        raise bad("bias", "must be 'none' (monkey trains no biases)")
    rank = config.get("r")
    if not _is_int(rank) or not 1 <= rank <= MAX_RANK:
        raise bad("r", f"must be a whole number from 1 to {MAX_RANK}")
    alpha = config.get("lora_alpha", 8)
    if not _is_number(alpha) or not 0 < alpha < 1e6:
        raise bad("lora_alpha", "must be a positive number")
    dropout = config.get("lora_dropout", 0.0)
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise bad("lora_dropout", "must be a number in [0, 1)")
    targets = _read_targets(config.get("target_modules"))
    if targets is None:
        raise bad("target_modules", f"must name the decoder's layers ({', '.join(DECODER_TARGETS)}) as "
                  "`monkey finetune` writes them")  # fmt: skip
    saved = config.get("modules_to_save")
    window_lora = saved is not None
    if window_lora and (not isinstance(saved, list) or not saved or not all(_is_window_module(m) for m in saved)):
        raise bad("modules_to_save", "must be null or the ViT's per-window LoRA (attn.in_proj_lora.N, ...)")
    return AdapterConfig(rank, float(alpha), float(dropout), targets, window_lora)


def _read_targets(value: Any) -> tuple[str, ...] | None:
    """The decoder layers of `target_modules`: a list of their names, or the anchored pattern `target_pattern`
    makes (recognised as text, never compiled: a pattern of the file's own could backtrack for hours)."""
    if isinstance(value, list) and value and all(isinstance(name, str) for name in value):
        names = tuple(value)
    elif isinstance(value, str) and len(value) < 1000:
        head, tail = r"transformer\.h\.\d+\.(?:", ")"
        if not (value.startswith(head) and value.endswith(tail)):
            return None
        escaped = {re.escape(name): name for name in DECODER_TARGETS}
        parts = value[len(head) : -len(tail)].split("|")
        if not all(part in escaped for part in parts):
            return None
        names = tuple(escaped[part] for part in parts)
    else:
        return None
    if not names or len(set(names)) != len(names) or not set(names) <= set(DECODER_TARGETS):
        return None
    return names


_WINDOW_MODULE = re.compile(r"(?:attn\.in_proj_lora|attn\.out_proj_lora|mlp_lora)\.\d{1,3}")


def _is_window_module(name: Any) -> bool:
    return isinstance(name, str) and len(name) < 40 and bool(_WINDOW_MODULE.fullmatch(name))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from a safetensors file's header, read without loading (or trusting) any of it:
    a header of at most MAX_HEADER_BYTES, every tensor's bytes inside the file and of its shape's size,
    nothing after the last one."""
    checked = model_file(path.parent, path.name)
    assert checked is not None
    size = checked.stat().st_size
    try:
        with open(checked, "rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8).ljust(8, b"\0"))
            if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(stream.read(length).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file ({_reason(exc)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not an object)")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if dtype not in _SAFETENSORS_DTYPES or not all(_is_int(n) and 0 <= n < 1 << 32 for n in shape):
                raise ValueError
            expected = math.prod(shape) * _SAFETENSORS_DTYPES[dtype]
            if not (_is_int(begin) and _is_int(stop) and 0 <= begin <= stop and stop - begin == expected):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {_shown(name)} is not described as a safetensors tensor") from None
        tensors[name] = (dtype, tuple(shape))
        end = max(end, stop)
    if 8 + length + end != size:
        raise CheckpointError(f"{path}: its size ({size} bytes) does not match its header ({8 + length + end})")
    return tensors


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:100] if text else type(exc).__name__


def expected_adapter_shapes(model: Any, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """The tensors an adapter with `config` has for `model`, by name and shape, from the model's own layers
    (no adapter is built): lora_A [r, in] and lora_B [out, r] per targeted decoder layer, and every tensor of
    the per-window ViT LoRA when it is saved."""
    targeted = re.compile(target_pattern(config.targets))
    shapes: dict[str, tuple[int, ...]] = {}
    windows = set(window_lora_modules(model.config.vision.num_windows)) if config.window_lora else set()
    for name, module in model.named_modules():
        if targeted.fullmatch(name):
            inputs, outputs = int(module.in_features), int(module.out_features)
            shapes[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (config.r, inputs)
            shapes[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (outputs, config.r)
        elif windows and name.startswith("transformer.visual.") and any(name.endswith("." + w) for w in windows):
            for key, tensor in module.state_dict().items():
                shapes[f"{PEFT_PREFIX}{name}.{key}"] = tuple(tensor.shape)
    return shapes


def check_adapter_weights(folder: Path, model: Any, config: AdapterConfig) -> None:
    """The weights file holds exactly the tensors `config` means for `model`, with their shapes; else one
    line naming the first difference (nothing is allocated before this)."""
    path = folder / ADAPTER_WEIGHTS
    found = read_safetensors_header(path)
    expected = expected_adapter_shapes(model, config)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(f"{path}: missing tensor '{missing[0]}'" + (f" (and {len(missing) - 1} more)"
                              if len(missing) > 1 else "") + "; the adapter does not fit this model")  # fmt: skip
    for name in sorted(found):
        if name not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {_shown(name)} (not part of this adapter's LoRA)")
        if found[name][1] != expected[name]:
            raise CheckpointError(
                f"{path}: tensor '{name}' has shape {list(found[name][1])}; the config (r={config.r}) and this "
                f"model's layers make it {list(expected[name])}"
            )


# ---------------------------------------------------------------------------------------------------------
# The base an adapter belongs to
# ---------------------------------------------------------------------------------------------------------
def base_model_identity(model: str | os.PathLike[str]) -> str:
    """A local checkpoint as an absolute path (a merge or resume may run from another folder), else the hub id."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else str(model)


def recorded_base(adapter: str | Path) -> str | None:
    """The base checkpoint an adapter was trained on, as its folder records it: `base_model` of the
    training_args.json `monkey finetune` writes, else peft's `base_model_name_or_path` in adapter_config.json
    (a relative path there is relative to where it was trained: taken only if it is a folder from here too);
    None when neither says. Both files are read as every adapter file is: regular files inside the folder."""
    folder = Path(adapter)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: adapter folder not found")
    for name, key in ((TRAINING_ARGS_FILE, "base_model"), (ADAPTER_CONFIG, "base_model_name_or_path")):
        path = model_file(folder, name, required=False)
        if path is None:
            continue
        try:
            record = json.loads(read_regular_file(path, MAX_RECORD_BYTES).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            continue  # the config is checked as a whole when the adapter loads; here it only may name the base
        value = record.get(key) if isinstance(record, dict) else None
        if not isinstance(value, str) or not value.strip() or len(value) > 4096:
            continue
        if name == ADAPTER_CONFIG and not Path(value).is_absolute() and not Path(value).is_dir():
            from monkey_cli.model.sources import is_hub_id

            if not is_hub_id(value):
                continue
        return value
    return None


def same_base(model: str, recorded: str) -> bool:
    """Whether `model` (as a user names it) is the checkpoint `recorded` names: the same folder, the same hub
    id, or a Hugging Face cache snapshot of that hub id."""
    from monkey_cli.model.sources import display_name

    def names(value: str) -> set[str]:
        return {base_model_identity(value), display_name(value).split("@")[0]}

    return bool(names(model) & names(recorded))


def adapter_model(adapter: str | Path, model: str | None) -> str:
    """The base to apply `adapter` to: `model` when given (which must be the base the adapter records, if it
    records one), else the recorded base. A different base is a UsageError naming both; a recorded local
    base that is no longer there needs `model` (and then accepts it)."""
    recorded = recorded_base(adapter)
    if model is None:
        if recorded is None:
            raise UsageError(f"--adapter {adapter}: neither its {TRAINING_ARGS_FILE} nor its {ADAPTER_CONFIG} says "
                             "which base model it was trained on: give --model")  # fmt: skip
        if Path(recorded).is_absolute() and not Path(recorded).is_dir():
            raise UsageError(f"--adapter {adapter} was trained on {recorded}, which is no longer there: give --model "
                             "(the base, wherever it is now)")  # fmt: skip
        return recorded
    if recorded is None or same_base(model, recorded):
        return model
    if Path(recorded).is_absolute() and not Path(recorded).exists():
        warnings.warn(f"--adapter {adapter} was trained on {recorded}, which is no longer there: using --model {model}",
                      MonkeyWarning, stacklevel=2)  # fmt: skip
        return model
    raise UsageError(
        f"--adapter {adapter} was trained on {recorded}, not on --model {model}: leave --model out to use its base, "
        "or give the adapter trained for this model"
    )


def trained_base(adapter: str | Path) -> str:
    """The base checkpoint this adapter was trained on (`recorded_base`); a UsageError when it says none."""
    return adapter_model(adapter, None)


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
    """`model` wrapped with the adapter in `adapter` (inference mode: nothing trainable). The folder is checked
    (`check_adapter_dir`) and its weights' names and shapes compared with what its config means for this model
    before any LoRA layer is made; the layers come from our own `lora_config`, never from peft reading the
    folder."""
    peft = require_peft()  # first: without peft, its one line (not an ImportError from the line below)
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = check_adapter_dir(adapter)
    config = read_adapter_config(folder)
    check_adapter_weights(folder, model, config)
    lora = config.lora_config(model.config.vision.num_windows)
    lora.inference_mode = True
    with quiet_library_warnings():
        peft_model = peft.get_peft_model(model, lora)
        try:
            state = load_file(str(folder / ADAPTER_WEIGHTS), device="cpu")
        except Exception as exc:  # noqa: BLE001 - checked above; the file changed meanwhile
            raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: cannot read the weights ({_reason(exc)})") from None
        outcome = set_peft_model_state_dict(peft_model, state)
    if getattr(outcome, "unexpected_keys", None):
        raise CheckpointError(f"{folder}: adapter does not fit this model ({outcome.unexpected_keys[0]})")
    for parameter in peft_model.parameters():
        parameter.requires_grad_(False)
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

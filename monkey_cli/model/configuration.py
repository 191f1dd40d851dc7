"""MonkeyConfig: the original checkpoint's `config.json` (Qwen fields + a nested `visual` dict).

The file is read as data only: `auto_map` (which names remote Python code) is ignored, never followed.

Two model families share this format (both say model_type "monkey"): Monkey, and TextMonkey (arXiv
2403.04473), whose `visual` dict adds `add_window`, `use_global`, `resampler`, `r` and `n_queries`. The family
is read from the config (`detect_family`), or forced with `family=`; it decides the vision tower and the
number of image tokens, nothing else (the decoder is the same Qwen-7B).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from monkey_cli.errors import ConfigError
from monkey_cli.model.families import FAMILIES, FAMILY_CHOICES, MONKEY, TEXTMONKEY

WINDOW_SIZE = 448  # every view the ViT sees is 448x448 (the original's visual.image_size per window)
TOKENS_PER_VIEW = 256  # resampler queries (a 16x16 grid)
IMAGE_START_OFFSET = 214  # <img> = <|endoftext|> + 3 chat tokens + 205 extras + 6 grounding tags

# The keys only TextMonkey's `visual` dict has (finetune_multitask_dialouge_doc.py writes them), and the class
# name its save_pretrained() writes into `architectures`.
TEXTMONKEY_VISUAL_KEYS = ("add_window", "use_global", "resampler")
TEXTMONKEY_ARCHITECTURE = "TextMonkeyLMHeadModel"
# A checkpoint folder may carry the sizes the original TextMonkey code hard-codes (visual_text.py:417-428,559,
# window.py:435,569), for checkpoints built with other ones: the tiny parity checkpoint does. Real TextMonkey
# folders have no such file and get the released literals (TextMonkeySizes' defaults).
HARDCODED_SIZES_FILE = "parity_hardcoded_sizes.json"
DEFAULT_KEEP_TOKENS = 512  # TextMonkey's `r` when a config leaves it out: finetune_textmonkey.sh's --remain

# field -> accepted types, for the top-level Qwen fields the model needs.
_QWEN_FIELDS: dict[str, tuple[type, ...]] = {
    "hidden_size": (int,),
    "num_attention_heads": (int,),
    "num_hidden_layers": (int,),
    "kv_channels": (int,),
    "intermediate_size": (int,),
    "vocab_size": (int,),
    "seq_length": (int,),
    "max_position_embeddings": (int,),
    "rotary_emb_base": (int, float),
    "rotary_pct": (int, float),
    "layer_norm_epsilon": (int, float),
    "use_dynamic_ntk": (bool,),
    "use_logn_attn": (bool,),
}
# Bounds checked before anything is sized from a config (a hostile config.json must be refused in one line,
# not allocate or loop in proportion to its numbers). Each is far above any Monkey or Qwen release.
MAX_LAYERS = 512
MAX_WIDTH = 65_536  # hidden sizes, MLP widths, heads x head size
MAX_HEADS = 1024
MAX_VOCAB = 4_194_304
MAX_CONTEXT = 1_048_576  # seq_length and max_position_embeddings, in tokens
MAX_IMAGE_SIDE = WINDOW_SIZE * 8
MAX_MLP_RATIO = 64.0
_BOUNDS: dict[str, tuple[float, float]] = {
    "hidden_size": (1, MAX_WIDTH),
    "num_attention_heads": (1, MAX_HEADS),
    "num_hidden_layers": (1, MAX_LAYERS),
    "kv_channels": (2, MAX_WIDTH),
    "intermediate_size": (2, 4 * MAX_WIDTH),
    "vocab_size": (IMAGE_START_OFFSET + 3, MAX_VOCAB),
    "seq_length": (1, MAX_CONTEXT),
    "max_position_embeddings": (1, MAX_CONTEXT),
    "rotary_emb_base": (1.0, 1e12),
    "visual.width": (1, MAX_WIDTH),
    "visual.layers": (1, MAX_LAYERS),
    "visual.heads": (1, MAX_HEADS),
    "visual.mlp_ratio": (1e-3, MAX_MLP_RATIO),
    "visual.patch_size": (1, WINDOW_SIZE),
    "visual.output_dim": (128, MAX_WIDTH),
    "visual.lora_repeat_num": (1, (MAX_IMAGE_SIDE // WINDOW_SIZE) ** 2),
    "visual.image_start_id": (IMAGE_START_OFFSET, MAX_VOCAB),
}
MAX_EPSILON = 0.1

_VISUAL_FIELDS: dict[str, tuple[type, ...]] = {
    "width": (int,),
    "layers": (int,),
    "heads": (int,),
    "mlp_ratio": (int, float),
    "patch_size": (int,),
    "image_size": (int, list),
    "output_dim": (int,),
    "lora_repeat_num": (int,),
    "image_start_id": (int,),
}


@dataclass(frozen=True)
class TextMonkeySizes:
    """TextMonkey's vision sizes that the original code hard-codes rather than reads from config.json.

    Shifted-window layer k runs before ViT block `window_layers[k]`, `window_widths[k]` wide with
    `window_heads[k]` heads, on windows of `window_size` patches shifted by `shift`; the token resampler
    (`downresampler`, a one-layer perceiver) works `resampler_width` wide with `resampler_heads` heads of
    `resampler_head_dim`. Defaults: the released model's literals.
    """

    window_layers: tuple[int, ...] = (2, 6, 24, 46)
    window_widths: tuple[int, ...] = (128, 256, 512, 1024)
    window_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 12
    shift: int = 6
    resampler_width: int = 1024
    resampler_heads: int = 8
    resampler_head_dim: int = 128


@dataclass(frozen=True)
class VisionConfig:
    """The ViT + resampler hyper-parameters, with the window grid derived from the input size.

    `family` says which tower reads them; TextMonkey's also has `keep_tokens` (config `r`: the local tokens
    its token resampler keeps) and `sizes`.
    """

    width: int
    layers: int
    heads: int
    mlp_ratio: float
    patch_size: int
    input_size: tuple[int, int]  # (height, width) of the page the processor produces
    output_dim: int
    lora_repeat_num: int
    image_start_id: int
    family: str = MONKEY
    keep_tokens: int = 0
    sizes: TextMonkeySizes | None = None

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of 448px windows: 896 -> (2, 2), [896, 1344] -> (2, 3)."""
        return self.input_size[0] // WINDOW_SIZE, self.input_size[1] // WINDOW_SIZE

    @property
    def num_windows(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_views(self) -> int:
        """Local windows plus the one global view."""
        return self.num_windows + 1

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def patches_per_side(self) -> int:
        return WINDOW_SIZE // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        """Image tokens the LLM receives: 256 per view for Monkey; TextMonkey's kept local tokens and the
        global view's 256."""
        if self.family == TEXTMONKEY:
            return self.keep_tokens + TOKENS_PER_VIEW
        return self.num_views * TOKENS_PER_VIEW


class MonkeyConfig(PretrainedConfig):
    """Configuration of a Monkey checkpoint, field names as in the original `config.json`."""

    model_type = "monkey"

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        kv_channels: int = 128,
        intermediate_size: int = 22016,
        seq_length: int = 2048,
        max_position_embeddings: int = 8192,
        rotary_emb_base: float = 10000,
        rotary_pct: float = 1.0,
        layer_norm_epsilon: float = 1e-6,
        use_dynamic_ntk: bool = True,
        use_logn_attn: bool = True,
        visual: dict[str, Any] | None = None,
        model_family: str | None = None,
        hardcoded_sizes: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("auto_map", None)  # names remote code; never used
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.kv_channels = kv_channels
        self.intermediate_size = intermediate_size
        self.seq_length = seq_length
        self.max_position_embeddings = max_position_embeddings
        self.rotary_emb_base = rotary_emb_base
        self.rotary_pct = rotary_pct
        self.layer_norm_epsilon = layer_norm_epsilon
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.visual = dict(visual) if visual is not None else dict(REAL_VISUAL)
        self.model_family = model_family or detect_family(self.visual, kwargs.get("architectures"))
        self.hardcoded_sizes = dict(hardcoded_sizes) if hardcoded_sizes else None  # TextMonkey only
        kwargs.setdefault("tie_word_embeddings", False)
        # The released config.json says use_cache=false (a training setting); inference always wants the
        # KV cache, and decoding without it would also re-pick the NTK alpha at every step.
        kwargs.pop("use_cache", None)
        super().__init__(**kwargs)

    # --- derived values -------------------------------------------------------------------------
    @property
    def family(self) -> str:
        """"monkey" or "textmonkey": which vision tower and image-token count the checkpoint has."""
        return self.model_family

    @property
    def vision(self) -> VisionConfig:
        v = self.visual
        textmonkey = self.family == TEXTMONKEY
        return VisionConfig(
            width=v["width"],
            layers=v["layers"],
            heads=v["heads"],
            mlp_ratio=float(v["mlp_ratio"]),
            patch_size=v["patch_size"],
            input_size=_as_height_width(v["image_size"]),
            output_dim=v["output_dim"],
            lora_repeat_num=v["lora_repeat_num"],
            image_start_id=v["image_start_id"],
            family=self.family,
            keep_tokens=int(v.get("r", DEFAULT_KEEP_TOKENS)) if textmonkey else 0,
            sizes=textmonkey_sizes(self.hardcoded_sizes) if textmonkey else None,
        )

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def ffn_width(self) -> int:
        """The MLP's hidden width: Qwen halves `intermediate_size` (w1 and w2 each take half)."""
        return self.intermediate_size // 2

    @property
    def tokens_per_image(self) -> int:
        """IMG_TOKEN_SPAN: positions between <img> and </img> (1280 for the released Monkeys, 768 for
        TextMonkey: its 512 kept local tokens and 256 of the global view)."""
        return self.vision.tokens_per_image

    @property
    def image_start_id(self) -> int:
        return self.visual["image_start_id"]

    @property
    def image_end_id(self) -> int:
        return self.image_start_id + 1

    @property
    def image_pad_id(self) -> int:
        return self.image_start_id + 2

    @property
    def eod_id(self) -> int:
        return self.image_start_id - IMAGE_START_OFFSET

    @property
    def checkpoint_dtype(self) -> str:
        """The dtype the checkpoint was saved in, from the original's bf16/fp16/fp32 flags."""
        if getattr(self, "bf16", False):
            return "bfloat16"
        if getattr(self, "fp16", False):
            return "float16"
        return "float32"


# The released checkpoints' `visual` dict (echo840/Monkey and echo840/Monkey-Chat).
REAL_VISUAL: dict[str, Any] = {
    "heads": 16,
    "image_size": 896,
    "image_start_id": 151857,
    "layers": 48,
    "mlp_ratio": 4.9231,
    "output_dim": 4096,
    "patch_size": 14,
    "width": 1664,
    "lora_repeat_num": 4,
}


# TextMonkey's, as derived from its training code (the released config.json could not be had; see
# ../shared/parity/README.md "Config values and their source"): Monkey's, with the training arguments of
# finetune_textmonkey.sh written into `visual` and IMG_TOKEN_SPAN (512 + 256) stored as n_queries.
REAL_TEXTMONKEY_VISUAL: dict[str, Any] = {
    **REAL_VISUAL,
    "image_size": [896, 896],
    "lora_repeat_num": 0,
    "add_window": True,
    "use_global": True,
    "resampler": True,
    "r": 512,
    "n_queries": 768,
}


def real_monkey_config(**overrides: Any) -> MonkeyConfig:
    """The released Monkey's configuration (for memory plans and meta-device checks)."""
    fields: dict[str, Any] = {"bf16": True, "visual": dict(REAL_VISUAL)}
    fields.update(overrides)
    return MonkeyConfig(**fields)


def real_textmonkey_config(**overrides: Any) -> MonkeyConfig:
    """The released TextMonkey's configuration (derived from the code, see REAL_TEXTMONKEY_VISUAL)."""
    fields: dict[str, Any] = {
        "bf16": True,
        "visual": dict(REAL_TEXTMONKEY_VISUAL),
        "architectures": [TEXTMONKEY_ARCHITECTURE],
    }
    fields.update(overrides)
    return MonkeyConfig(**fields)


def real_config(family: str = MONKEY) -> MonkeyConfig:
    """The released checkpoint's configuration of `family`."""
    return real_textmonkey_config() if family == TEXTMONKEY else real_monkey_config()


def detect_family(visual: Any, architectures: Any = None) -> str:
    """TextMonkey when its `visual` keys are there or `architectures` names its class; else Monkey (which is
    how the original tells them apart: by the keys its TextMonkey training script writes)."""
    names = architectures if isinstance(architectures, list) else []
    has_keys = isinstance(visual, dict) and any(key in visual for key in TEXTMONKEY_VISUAL_KEYS)
    return TEXTMONKEY if has_keys or TEXTMONKEY_ARCHITECTURE in names else MONKEY


def check_family(family: str | None) -> str | None:
    """None / "auto" -> None (read it from the config); a family name as is; anything else a ConfigError."""
    if family in (None, "auto"):
        return None
    if family not in FAMILIES:
        raise ConfigError(f"model family must be one of {', '.join(FAMILY_CHOICES)}; got {family!r}")
    return family


def textmonkey_sizes(data: dict[str, Any] | None) -> TextMonkeySizes:
    """TextMonkeySizes from a `parity_hardcoded_sizes.json` dict (already validated); the real ones for None."""
    if not data:
        return TextMonkeySizes()
    perceiver = data["perceiver"]
    return TextMonkeySizes(
        window_widths=tuple(data["window_dim"]),
        window_heads=tuple(data["window_head"]),
        resampler_width=perceiver["in_dim"],
        resampler_heads=perceiver["heads"],
        resampler_head_dim=perceiver["dim_head"],
    )


def _as_height_width(image_size: int | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    return int(image_size[0]), int(image_size[1])


def load_config(path: str | os.PathLike[str], family: str | None = None) -> MonkeyConfig:
    """Read and validate `config.json` (or a checkpoint folder holding it). `family` ("monkey", "textmonkey";
    None or "auto": read from the config) forces the model family. A TextMonkey folder's
    `parity_hardcoded_sizes.json`, if any, is read too."""
    path = Path(path)
    folder, name = (path, "config.json") if path.is_dir() else (path.parent, path.name)
    data = _read_json(folder, name, required=True)
    forced = check_family(family)
    validate_config_dict(data, source=str(folder / name), family=forced)
    chosen = forced or detect_family(data.get("visual"), data.get("architectures"))
    sizes = None
    if chosen == TEXTMONKEY:
        sizes = _read_json(folder, HARDCODED_SIZES_FILE, required=False)
        if sizes is not None:
            validate_hardcoded_sizes(sizes, data, source=str(folder / HARDCODED_SIZES_FILE))
    return MonkeyConfig(**{**data, "model_family": chosen, "hardcoded_sizes": sizes})


def _read_json(folder: Path, name: str, required: bool) -> Any:
    from monkey_cli.model.sources import MAX_JSON_BYTES, model_file, read_regular_file

    path = model_file(folder, name, error=ConfigError, required=False)
    if path is None:
        if required:
            raise ConfigError(f"{folder / name}: config file not found")
        return None
    try:
        return json.loads(read_regular_file(path, MAX_JSON_BYTES, error=ConfigError).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, an integer of thousands of digits, deep nesting
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None


def validate_config_dict(data: Any, source: str = "config.json", family: str | None = None) -> None:
    """Raise ConfigError naming the file and field for anything the model cannot be built from (for
    `family`, or the family the config itself says)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level")
    model_type = data.get("model_type")
    if model_type != "monkey":
        raise ConfigError(f"{source}: field 'model_type' must be \"monkey\", got {model_type!r}")
    _check_fields(data, _QWEN_FIELDS, source, prefix="")
    visual = data.get("visual")
    if not isinstance(visual, dict):
        raise ConfigError(f"{source}: field 'visual' must be an object with the vision tower's settings")
    _check_fields(visual, _VISUAL_FIELDS, source, prefix="visual.")

    def fail(field: str, why: str) -> None:
        raise ConfigError(f"{source}: field '{field}' {why}")

    textmonkey = (family or detect_family(visual, data.get("architectures"))) == TEXTMONKEY
    for field, (low, high) in _BOUNDS.items():
        value = visual[field[len("visual.") :]] if field.startswith("visual.") else data[field]
        if field == "visual.lora_repeat_num" and textmonkey:
            low = 0  # the released TextMonkey has no ViT LoRA
        if not _within(value, low, high):
            fail(field, f"must be between {low:g} and {high:g}, got {_short(value)}")
    epsilon = data["layer_norm_epsilon"]
    if not _within(epsilon, 0, MAX_EPSILON) or epsilon == 0:
        fail("layer_norm_epsilon", f"must be a finite number in (0, {MAX_EPSILON}], got {epsilon!r}")
    if data["hidden_size"] != data["num_attention_heads"] * data["kv_channels"]:
        fail(
            "hidden_size",
            "must equal num_attention_heads * kv_channels "
            f"({data['num_attention_heads']} * {data['kv_channels']}), got {data['hidden_size']}",
        )
    if data["kv_channels"] % 2:
        fail("kv_channels", f"must be even for rotary embeddings, got {data['kv_channels']}")
    if data["rotary_pct"] != 1.0:
        fail("rotary_pct", f"must be 1.0 (rotary over the whole head, as every Monkey), got {data['rotary_pct']}")
    if data["intermediate_size"] % 2:
        fail("intermediate_size", f"must be even (the MLP uses half of it), got {data['intermediate_size']}")

    if data["num_attention_heads"] * data["kv_channels"] > MAX_WIDTH:
        fail("num_attention_heads", f"times kv_channels must be at most {MAX_WIDTH}")
    if int(visual["width"] * visual["mlp_ratio"]) < 1:
        fail("visual.mlp_ratio", f"leaves the vision MLP no width (visual.width {visual['width']})")
    size = visual["image_size"]
    is_pair = isinstance(size, list) and len(size) == 2
    if isinstance(size, list) and not (is_pair and all(isinstance(s, int) and not isinstance(s, bool) for s in size)):
        fail("visual.image_size", f"must be an integer or [height, width], got {size!r}")
    height, width = _as_height_width(size)
    sides_ok = 0 < height <= MAX_IMAGE_SIDE and 0 < width <= MAX_IMAGE_SIDE
    if not sides_ok or height % WINDOW_SIZE or width % WINDOW_SIZE:
        fail(
            "visual.image_size",
            f"must be a positive multiple of {WINDOW_SIZE} per side, at most {MAX_IMAGE_SIDE}, got {size!r}",
        )
    windows = (height // WINDOW_SIZE) * (width // WINDOW_SIZE)
    if textmonkey:
        _validate_textmonkey_visual(visual, data, fail)
    elif visual["lora_repeat_num"] != windows:
        fail(
            "visual.lora_repeat_num",
            f"must equal the number of {WINDOW_SIZE}px windows "
            f"({height // WINDOW_SIZE}x{width // WINDOW_SIZE} = {windows}), got {visual['lora_repeat_num']}",
        )
    if WINDOW_SIZE % visual["patch_size"]:
        fail("visual.patch_size", f"must divide {WINDOW_SIZE}, got {visual['patch_size']}")
    if visual["width"] % visual["heads"]:
        fail("visual.width", f"must be divisible by visual.heads ({visual['heads']}), got {visual['width']}")
    if visual["output_dim"] != data["hidden_size"]:
        fail("visual.output_dim", f"must equal hidden_size ({data['hidden_size']}), got {visual['output_dim']}")
    if visual["output_dim"] % 128:
        fail("visual.output_dim", f"must be a multiple of 128 (resampler heads), got {visual['output_dim']}")
    start = visual["image_start_id"]
    if start < IMAGE_START_OFFSET or start + 2 >= data["vocab_size"]:
        fail(
            "visual.image_start_id",
            f"must leave room for </img> and <imgpad> below vocab_size ({data['vocab_size']}), got {start}",
        )


TEXTMONKEY_GRID = (2, 2)  # the original hard-codes a 32x32-patch window on a 64x64 grid (visual_text.py:454,457)


def _validate_textmonkey_visual(visual: dict[str, Any], data: dict[str, Any], fail: Any) -> None:
    """What the original TextMonkey code can run: its fixed 2x2 window grid, its window layers' positions, all
    three TextMonkey parts on, a kept-token count within the 4 x 256 local tokens, and the tokenizer span
    (`n_queries`, where present) equal to what the tower yields."""
    for key in TEXTMONKEY_VISUAL_KEYS:
        if visual.get(key, True) is not True:
            fail(f"visual.{key}", f"must be true (monkey-cli runs TextMonkey as released), got {visual[key]!r}")
    height, width = _as_height_width(visual["image_size"])
    if (height // WINDOW_SIZE, width // WINDOW_SIZE) != TEXTMONKEY_GRID or visual["patch_size"] != 14:
        fail("visual.image_size", f"must be [896, 896] with patch_size 14 for TextMonkey, got {visual['image_size']!r}")
    if visual["lora_repeat_num"] not in (0, 4):
        fail(
            "visual.lora_repeat_num",
            "must be 0 (no ViT LoRA, the released TextMonkey) or 4 (one per window) for TextMonkey, "
            f"got {visual['lora_repeat_num']}",
        )
    last = max(TextMonkeySizes().window_layers)
    if visual["layers"] <= last:
        fail("visual.layers", f"must be over {last} for TextMonkey's shifted-window layers, got {visual['layers']}")
    local = TEXTMONKEY_GRID[0] * TEXTMONKEY_GRID[1] * TOKENS_PER_VIEW  # 256 attn_pool tokens per window
    keep = visual.get("r", DEFAULT_KEEP_TOKENS)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= local:
        fail("visual.r", f"must be an integer from 1 to {local} (the local tokens to keep), got {_short(keep)}")
    span = visual.get("n_queries")
    if span is not None and span != keep + TOKENS_PER_VIEW:
        fail(
            "visual.n_queries",
            f"must be r + {TOKENS_PER_VIEW} = {keep + TOKENS_PER_VIEW} (the image tokens TextMonkey yields), "
            f"got {_short(span)}",
        )


def validate_hardcoded_sizes(sizes: Any, config: dict[str, Any], source: str) -> None:
    """A `parity_hardcoded_sizes.json`: four window widths and heads (each width divisible by its heads), the
    ViT width equal to config.json's, a perceiver whose out_dim is the vision output."""

    def fail(field: str, why: str) -> None:
        raise ConfigError(f"{source}: field '{field}' {why}")

    if not isinstance(sizes, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level")
    visual = config["visual"]
    if sizes.get("vit_width", visual["width"]) != visual["width"]:
        fail("vit_width", f"must equal config.json's visual.width ({visual['width']}), got {sizes['vit_width']!r}")
    layers = len(TextMonkeySizes().window_layers)
    for name in ("window_dim", "window_head"):
        value = sizes.get(name)
        if not (isinstance(value, list) and len(value) == layers and all(_is_size(v) for v in value)):
            fail(name, f"must be a list of {layers} positive integers, got {_short(value)}")
    for width, heads in zip(sizes["window_dim"], sizes["window_head"], strict=True):
        if width % heads:
            fail("window_dim", f"widths must be divisible by their heads (window_head), got {width} and {heads}")
    perceiver = sizes.get("perceiver")
    fields = ("in_dim", "out_dim", "dim_head", "heads")
    if not isinstance(perceiver, dict) or not all(_is_size(perceiver.get(field)) for field in fields):
        fail("perceiver", "must be an object with positive integers in_dim, out_dim, dim_head and heads")
    if perceiver["out_dim"] != visual["output_dim"]:
        fail("perceiver.out_dim", f"must equal visual.output_dim ({visual['output_dim']}), got {perceiver['out_dim']}")


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WIDTH


def _within(value: float, low: float, high: float) -> bool:
    """low <= value <= high for a finite number (ints of any size compare exactly; NaN and inf are out)."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return low <= value <= high


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:20] + "..."


def _check_fields(data: dict[str, Any], fields: dict[str, tuple[type, ...]], source: str, prefix: str) -> None:
    for name, types in fields.items():
        if name not in data:
            raise ConfigError(f"{source}: missing field '{prefix}{name}'")
        value = data[name]
        # bool is an int subclass: accept it only where a bool is asked for.
        wrong_bool = isinstance(value, bool) and bool not in types
        if wrong_bool or not isinstance(value, types):
            expected = " or ".join("array" if t is list else t.__name__ for t in types)
            raise ConfigError(f"{source}: field '{prefix}{name}' must be {expected}, got {type(value).__name__}")

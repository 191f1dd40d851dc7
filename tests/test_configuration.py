"""MonkeyConfig: the original config.json read, validated with one-line errors, and the window grid derived."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monkey_cli.errors import ConfigError
from monkey_cli.model.configuration import REAL_VISUAL, load_config, real_monkey_config


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


def _real_dict() -> dict:
    """A config.json shaped like the released checkpoints' (values from ../shared/DESIGN.md)."""
    return {
        "architectures": ["MonkeyLMHeadModel"],
        "auto_map": {"AutoModelForCausalLM": "modeling_monkey.MonkeyLMHeadModel"},
        "bf16": True,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "kv_channels": 128,
        "layer_norm_epsilon": 1e-6,
        "max_position_embeddings": 8192,
        "model_type": "monkey",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "seq_length": 2048,
        "use_cache": False,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "visual": dict(REAL_VISUAL),
        "vocab_size": 151936,
    }


def test_tiny_parity_config(tiny_monkey_dir: Path) -> None:
    config = load_config(tiny_monkey_dir)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (256, 2, 2304)
    assert config.vision.grid == (2, 2) and config.vision.num_views == 5
    assert config.tokens_per_image == 1280
    assert (config.eod_id, config.image_start_id, config.image_end_id, config.image_pad_id) == (2000, 2214, 2215, 2216)
    assert config.vision.mlp_width == 315  # int(64 * 4.9231), as the original
    assert config.checkpoint_dtype == "float32"
    assert not hasattr(config, "auto_map")


def test_real_shaped_config(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, _real_dict()))
    assert config.vision.grid == (2, 2) and config.tokens_per_image == 1280
    assert config.eod_id == 151643 and config.image_start_id == 151857
    assert config.vision.mlp_width == 8192 and config.ffn_width == 11008
    assert config.checkpoint_dtype == "bfloat16"
    assert config.to_dict()["visual"] == real_monkey_config().visual


def test_rectangular_input_gives_a_2x3_grid(tmp_path: Path) -> None:
    data = _real_dict()
    data["visual"].update(image_size=[896, 1344], lora_repeat_num=6)
    config = load_config(_write(tmp_path, data))
    assert config.vision.input_size == (896, 1344)
    assert config.vision.grid == (2, 3) and config.vision.num_windows == 6
    assert config.tokens_per_image == 7 * 256


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("hidden_size"), "missing field 'hidden_size'"),
        (lambda d: d["visual"].pop("lora_repeat_num"), "missing field 'visual.lora_repeat_num'"),
        (lambda d: d.__setitem__("num_hidden_layers", "32"), "field 'num_hidden_layers' must be int, got str"),
        (lambda d: d.__setitem__("use_logn_attn", 1), "field 'use_logn_attn' must be bool, got int"),
        (lambda d: d["visual"].__setitem__("lora_repeat_num", 3), "'visual.lora_repeat_num' must equal the number"),
        (
            lambda d: d["visual"].__setitem__("image_size", [896, 1000]),
            "'visual.image_size' must be a positive multiple",
        ),
        (lambda d: d.__setitem__("model_type", "qwen"), "'model_type' must be \"monkey\""),
        (lambda d: d.__setitem__("kv_channels", 64), "'hidden_size' must equal num_attention_heads * kv_channels"),
        (lambda d: d.pop("visual"), "field 'visual' must be an object"),
    ],
)
def test_bad_config_is_one_line_naming_file_and_field(tmp_path: Path, edit, message: str) -> None:
    data = _real_dict()
    edit(data)
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)

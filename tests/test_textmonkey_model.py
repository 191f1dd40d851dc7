"""TextMonkey as a second model family: config detection and validation, the real checkpoint's keys by name,
the memory plan's inventory, the prompt table, and what the tower does where the fixtures do not look."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import require_parity

from monkey_cli import tasks
from monkey_cli.errors import CheckpointError, ConfigError
from monkey_cli.model.configuration import (
    REAL_TEXTMONKEY_VISUAL,
    TextMonkeySizes,
    load_config,
    real_monkey_config,
    real_textmonkey_config,
)
from monkey_cli.model.memory import parameter_counts, parameter_manifest, quantized_modules
from monkey_cli.model.textmonkey_vision import TextMonkeyVisionTransformer, select_tokens, selection_scores


def _manifest(name: str) -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in require_parity(name).read_text().splitlines():
        key, shape, dtype = line.split("\t")
        assert dtype == "bfloat16"
        keys[key] = tuple(int(size) for size in shape.split(","))
    return keys


def _config_dict(**visual: object) -> dict:
    """TextMonkey's derived real config.json, with `visual` fields changed."""
    data = json.loads(require_parity("textmonkey_config_derived.json").read_text())
    data["visual"].update(visual)
    return data


def _write(tmp_path: Path, data: dict, sizes: dict | None = None) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(data))
    if sizes is not None:
        (tmp_path / "parity_hardcoded_sizes.json").write_text(json.dumps(sizes))
    return tmp_path


# --- the family and its sizes ----------------------------------------------------------------------------


def test_tiny_checkpoint_is_detected_with_its_own_sizes() -> None:
    config = load_config(require_parity("tiny-textmonkey"))
    assert config.family == "textmonkey"
    assert config.tokens_per_image == 768 == config.visual["n_queries"]
    vision = config.vision
    assert (vision.keep_tokens, vision.num_views, vision.lora_repeat_num) == (512, 5, 0)
    assert vision.sizes == TextMonkeySizes(
        window_widths=(16, 32, 64, 128), window_heads=(1, 2, 4, 8), resampler_width=64, resampler_heads=4,
        resampler_head_dim=16,
    )
    assert load_config(require_parity("tiny-monkey")).family == "monkey"


def test_derived_real_config_is_textmonkey_with_the_released_literals() -> None:
    config = load_config(require_parity("textmonkey_config_derived.json"))
    assert config.family == "textmonkey" and config.tokens_per_image == 768
    assert config.vision.sizes == TextMonkeySizes()  # no parity_hardcoded_sizes.json next to it
    assert config.visual == real_textmonkey_config().visual == REAL_TEXTMONKEY_VISUAL
    assert config.checkpoint_dtype == "bfloat16"


def test_family_comes_from_visual_keys_or_architectures_and_can_be_forced(tmp_path: Path) -> None:
    data = _config_dict()
    for key in ("add_window", "use_global", "resampler", "r", "n_queries"):
        data["visual"].pop(key)
    data["architectures"] = ["MonkeyLMHeadModel"]
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError, match="'visual.lora_repeat_num' must be between 1 and"):
        load_config(path)  # read as a Monkey, whose windows each need a LoRA set
    data["architectures"] = ["TextMonkeyLMHeadModel"]
    _write(tmp_path, data)
    assert load_config(path).family == "textmonkey"
    assert load_config(path).tokens_per_image == 768  # r defaults to the released 512
    with pytest.raises(ConfigError, match="model family must be one of auto, monkey, textmonkey"):
        load_config(path, family="qwen")
    # Forcing the wrong family is a one-line config error, not a crash (tiny-monkey has 2 ViT layers).
    with pytest.raises(ConfigError, match=r"'visual\.layers' must be over 46"):
        load_config(require_parity("tiny-monkey"), family="textmonkey")


@pytest.mark.parametrize(
    ("visual", "message"),
    [
        ({"n_queries": 1280}, "'visual.n_queries' must be r + 256 = 768"),
        ({"r": 2000}, "'visual.r' must be an integer from 1 to 1024"),
        ({"image_size": [896, 1344]}, "'visual.image_size' must be [896, 896]"),
        ({"lora_repeat_num": 2}, "'visual.lora_repeat_num' must be 0"),
        ({"layers": 40}, "'visual.layers' must be over 46"),
        ({"add_window": False}, "'visual.add_window' must be true"),
    ],
)
def test_unrunnable_textmonkey_config_is_one_line(tmp_path: Path, visual: dict, message: str) -> None:
    path = _write(tmp_path, _config_dict(**visual))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert message in text and text.startswith(str(path / "config.json")) and "\n" not in text


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.update(vit_width=64), "'vit_width' must equal config.json's visual.width (32)"),
        (lambda s: s.update(window_dim=[16, 32, 64]), "'window_dim' must be a list of 4 positive integers"),
        (lambda s: s.update(window_head=[3, 2, 4, 8]), "widths must be divisible by their heads"),
        (lambda s: s["perceiver"].update(out_dim=128), "'perceiver.out_dim' must equal visual.output_dim (256)"),
        (lambda s: s.pop("perceiver"), "'perceiver' must be an object"),
    ],
)
def test_bad_hardcoded_sizes_file_is_one_line(tmp_path: Path, edit, message: str) -> None:
    folder = require_parity("tiny-textmonkey")
    sizes = json.loads((folder / "parity_hardcoded_sizes.json").read_text())
    edit(sizes)
    path = _write(tmp_path, json.loads((folder / "config.json").read_text()), sizes)
    with pytest.raises(ConfigError, match="parity_hardcoded_sizes.json: field") as info:
        load_config(path)
    assert message in str(info.value)


def test_a_family_forced_against_the_checkpoint_is_one_line(tmp_path: Path) -> None:
    from monkey_cli.model.loading import load_model

    with pytest.raises(ConfigError, match="'visual.lora_repeat_num' must be between 1 and") as info:
        load_model(require_parity("tiny-textmonkey"), family="monkey")
    assert "\n" not in str(info.value)
    # A TextMonkey config over Monkey's weights: the first key the weights lack, named.
    copy = tmp_path / "monkey-weights"
    shutil.copytree(require_parity("tiny-textmonkey"), copy)
    shutil.copy(require_parity("tiny-monkey") / "model.safetensors", copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing weight .* of a TextMonkey model"):
        load_model(copy)
    # Without its sizes file, tiny-textmonkey's weights do not fit the released sizes: one line naming a key.
    copy = tmp_path / "tiny"
    shutil.copytree(require_parity("tiny-textmonkey"), copy)
    (copy / "parity_hardcoded_sizes.json").unlink()
    with pytest.raises(CheckpointError, match=r"has shape \[.*\], the config expects"):
        load_model(copy)


# --- the real checkpoint by name --------------------------------------------------------------------------


def test_meta_model_has_exactly_the_real_checkpoints_keys_and_shapes() -> None:
    from monkey_cli.model.modeling import MonkeyForCausalLM

    with torch.device("meta"):
        model = MonkeyForCausalLM(real_textmonkey_config())
    built = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    assert built == _manifest("textmonkey_real_keys.tsv")  # 922 keys; buffers are not in the state dict
    assert {name for name, _ in model.named_buffers()} >= {
        f"transformer.visual.transformer.window_attention.{k}.shift_attn.attn_mask" for k in range(4)
    }


def test_memory_inventory_is_the_real_checkpoints() -> None:
    config = real_textmonkey_config()
    assert {t.name: t.shape for t in parameter_manifest(config)} == _manifest("textmonkey_real_keys.tsv")
    assert sum(parameter_counts(config).values()) == 9_715_823_361  # the README's count
    # Quantization converts the decoder (and with --quant-vision the ViT blocks) only: the window layers and
    # the token resampler keep the compute dtype.
    for quant_vision in (False, True):
        converted = quantized_modules(config, "4bit", quant_vision)
        assert converted and not [n for n in converted if "window_attention" in n or "downresampler" in n]
    assert len(quantized_modules(config, "8bit", True)) == 32 * 5 + 48 * 4


def test_tiny_inventory_equals_the_built_model_with_and_without_lora() -> None:
    from monkey_cli.model.modeling import MonkeyForCausalLM

    for lora in (0, 4):
        config = load_config(require_parity("tiny-textmonkey"))
        config.visual["lora_repeat_num"] = lora
        with torch.device("meta"):
            model = MonkeyForCausalLM(config)
        built = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
        assert built == {t.name: t.shape for t in parameter_manifest(config)}
        has_lora = any(".in_proj_lora.3." in key for key in built)
        assert has_lora is (lora == 4)


# --- the tower beyond the fixtures ------------------------------------------------------------------------


def test_a_fresh_tower_is_monkeys_vit_with_identity_extras() -> None:
    """The original zero-initialises the window layers' and the resampler's last projections: a tower built
    from a config alone passes its ViT tokens through them unchanged."""
    torch.manual_seed(0)
    tower = TextMonkeyVisionTransformer(load_config(require_parity("tiny-textmonkey")).vision).eval()
    x = torch.randn(2, 4096, 32)
    for layer in tower.transformer.window_attention:
        assert torch.equal(layer(x), x)
    local = torch.randn(1, 1024, 256)
    kept = local.gather(1, select_tokens(local, 512)[..., None].expand(-1, -1, 256))
    assert torch.equal(tower.downresampler(local), kept)


def test_selection_is_deterministic_on_ties_and_scores_in_float32() -> None:
    """Tied scores at the cut (common in bfloat16) keep the later tokens, on every device; bfloat16 features
    are scored in float32, as fine as their values allow."""
    tied = torch.eye(16)[None]  # orthogonal tokens: every score is exactly 0, but the last one's (-1)
    scores = selection_scores(tied)[0]
    assert scores[:15].eq(0).all() and scores[15] == -1
    assert select_tokens(tied, 10)[0].tolist() == list(range(6, 16))
    features = torch.randn(2, 1024, 64).to(torch.bfloat16)
    assert torch.equal(select_tokens(features, 512), select_tokens(features.float(), 512))
    assert selection_scores(features).dtype == torch.float32


def test_batch_of_pages_equals_each_alone() -> None:
    torch.manual_seed(0)
    vision = load_config(require_parity("tiny-textmonkey")).vision
    tower = TextMonkeyVisionTransformer(vision).eval()
    windows, views = torch.randn(2, 4, 3, 448, 448), torch.randn(2, 3, 448, 448)
    with torch.inference_mode():
        both = tower(windows, views)
        alone = [tower(windows[i : i + 1], views[i : i + 1]) for i in range(2)]
    assert both.shape == (2, 768, 256)
    for i in range(2):
        assert (both[i] - alone[i][0]).abs().max().item() <= 1e-5


# --- prompts ---------------------------------------------------------------------------------------------


def test_prompt_forms_per_family() -> None:
    # Monkey's forms are unchanged: eval/evaluate_vqa.py's "Answer: " (trailing space).
    assert tasks.vqa_prompt("Q?") == tasks.Prompt("", " Q? Answer: ")
    assert tasks.task_prompt("read") == tasks.Prompt("", " Read all the text in the image. Answer: ")
    assert str(tasks.caption_prompt(chat=True)) == "<img></img> Generate the detailed caption in English: Answer: "
    # TextMonkey's are its demo's and eval's.
    assert str(tasks.vqa_prompt("Q?", "textmonkey")) == "<img></img> Q? Answer:"
    assert str(tasks.task_prompt("read", family="textmonkey")) == "<img></img> Read all the text in the image."
    assert str(tasks.spot_prompt()) == "<img></img> OCR with grounding:"
    ground = tasks.vqa_prompt("Q?", "textmonkey", ground=True)
    assert str(ground) == "<img></img> Q? Provide the location coordinates of the answer when answering the question."
    assert str(tasks.locate_prompt("TOTAL")) == "<img></img> <ref>TOTAL</ref>"


def test_what_a_family_was_not_trained_for_is_a_one_line_refusal() -> None:
    with pytest.raises(tasks.UnsupportedTask, match="TextMonkey has no caption prompt"):
        tasks.caption_prompt(family="textmonkey")
    for ask in (
        lambda: tasks.spot_prompt("monkey"),
        lambda: tasks.locate_prompt("x", "monkey"),
        lambda: tasks.vqa_prompt("Q?", "monkey", ground=True),
    ):
        with pytest.raises(tasks.UnsupportedTask, match="Monkey checkpoints give no text positions") as info:
            ask()
        assert "\n" not in str(info.value)


def test_ref_tags_are_special_tokens_only_in_the_locate_form() -> None:
    from monkey_cli.model.tokenizer import QWenTokenizer

    tokenizer = QWenTokenizer.from_dir(require_parity("tiny-textmonkey"), image_token_span=768)
    ids = tokenizer.encode_prompt("", " ", ref="</ref><box>(1,2),(3,4)</box>")
    assert ids[770] == tokenizer.encode_prompt("", " ")[-1]  # <img> 768 x <imgpad> </img>, then " "
    assert ids[771] == tokenizer.ref_start_id and ids[-1] == tokenizer.ref_end_id
    inner = ids[772:-1]  # the user's text in between is plain: no tag can be forged from it
    assert all(token < tokenizer.eod_id for token in inner)
    assert tokenizer.decode(inner) == "</ref><box>(1,2),(3,4)</box>"
    # A user's question typing the tags stays plain text too.
    typed = tokenizer.encode_prompt("", " <ref>x</ref> Answer:")
    assert tokenizer.ref_start_id not in typed


def test_real_monkey_config_is_still_monkey() -> None:
    config = real_monkey_config()
    assert config.family == "monkey" and config.tokens_per_image == 1280 and config.vision.sizes is None


def test_window_lora_training_is_refused_without_window_lora(tmp_path: Path) -> None:
    """`monkey finetune --train-window-lora` trains Monkey's per-window LoRA sets; TextMonkey as released has none
    (its decoder adapters train as Monkey's do)."""
    from types import SimpleNamespace

    from monkey_cli.errors import UsageError
    from monkey_cli.finetune.trainer import FinetuneOptions, with_lora

    base = SimpleNamespace(model=SimpleNamespace(config=load_config(require_parity("tiny-textmonkey"))))
    options = FinetuneOptions(data=tmp_path / "d.json", out=tmp_path / "o", train_window_lora=True)
    with pytest.raises(UsageError, match="no per-window LoRA to train"):
        with_lora(base, options)

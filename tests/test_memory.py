"""Memory plans: the parameter inventory against the real and tiny checkpoints, the byte arithmetic of
each --quant, the refusal message, and device budgets."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from monkey_cli.errors import MonkeyError, UsageError
from monkey_cli.model import memory
from monkey_cli.model.configuration import load_config, real_monkey_config
from monkey_cli.model.memory import (
    AUTO_OPTIONS,
    COMPONENTS,
    MemoryBudgetError,
    available_ram,
    check_fits,
    choose,
    device_budget,
    format_bytes,
    parameter_counts,
    parameter_manifest,
    plan,
    plan_all,
    quantizable,
    quantized_modules,
)

REAL_PARAMETERS = 9_708_053_824  # parity/README: the real checkpoint's state dict, summed

# Independent of memory.py: which component a real checkpoint key belongs to, by its name alone.
_COMPONENT_PATTERNS = [
    (r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.w1|mlp\.w2|mlp\.c_proj)\.", "decoder_linears"),
    (r"(transformer\.wte|lm_head)\.", "embeddings"),
    (r"transformer\.(h\.\d+\.ln_[12]|ln_f)\.", "decoder_norms"),
    (r"resblocks\.\d+\.(attn\.in_proj|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)$", "vit_linears"),
    (r"transformer\.visual\.(attn_pool\.|ln_post\.|proj$)", "resampler"),
    (r"transformer\.visual\.", "vit_other"),
]
# The Linear weights each --quant converts, again by name: decoder linears, and with --quant-vision the
# ViT's four Linear layers per block (never their LoRA adapters).
_DECODER_QUANTIZED = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.w[12]|mlp\.c_proj)\.weight$")
_VIT_QUANTIZED = re.compile(r"resblocks\.\d+\.(attn\.in_proj|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")


def _component(key: str) -> str:
    for pattern, component in _COMPONENT_PATTERNS:
        if re.search(pattern, key):
            return component
    raise AssertionError(f"no component for {key}")


@pytest.fixture(scope="module")
def real_keys(parity_dir: Path) -> dict[str, tuple[int, ...]]:
    rows = (parity_dir / "monkey_real_keys.tsv").read_text().splitlines()
    keys = {}
    for row in rows:
        name, shape, _dtype = row.split("\t")
        keys[name] = tuple(int(n) for n in shape.split(","))
    return keys


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with path.open("rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    header.pop("__metadata__", None)
    return {name: tuple(info["shape"]) for name, info in header.items()}


# --- the parameter inventory ---------------------------------------------------------------------


def test_real_parameter_total() -> None:
    assert sum(parameter_counts(real_monkey_config()).values()) == REAL_PARAMETERS


def test_real_manifest_matches_checkpoint_keys_and_shapes(real_keys: dict[str, tuple[int, ...]]) -> None:
    ours = {t.name: t.shape for t in parameter_manifest(real_monkey_config())}
    assert len(real_keys) == 2581
    assert sorted(set(real_keys) ^ set(ours)) == []
    mismatched = {k: (real_keys[k], ours[k]) for k in real_keys if real_keys[k] != ours[k]}
    assert mismatched == {}


def test_component_counts_match_real_checkpoint(real_keys: dict[str, tuple[int, ...]]) -> None:
    expected = dict.fromkeys(COMPONENTS, 0)
    for name, shape in real_keys.items():
        expected[_component(name)] += _numel(shape)
    assert sum(expected.values()) == REAL_PARAMETERS
    assert parameter_counts(real_monkey_config()) == expected


def test_tiny_manifest_matches_tiny_checkpoint(tiny_monkey_dir: Path) -> None:
    config = load_config(tiny_monkey_dir)
    shapes = _safetensors_shapes(tiny_monkey_dir / "model.safetensors")
    assert {t.name: t.shape for t in parameter_manifest(config)} == shapes


# --- which layers are quantized ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_features", "quant", "expected"),
    [
        (4096, "4bit", True),
        (11008, "4bit", True),  # 172 x 64: the decoder's mlp.c_proj
        (1664, "4bit", True),
        (315, "4bit", False),  # the tiny ViT's mlp.c_proj: not a multiple of 64
        (96, "4bit", False),
        (315, "8bit", True),  # int8 weight-only (a scale per row) has no block constraint
        (4096, "none", False),
    ],
)
def test_quantizable_rule(in_features: int, quant: str, expected: bool) -> None:
    assert quantizable(in_features, quant) is expected


def test_4bit_needs_out_features_in_blocks_of_32() -> None:
    """bitsandbytes 0.50's CPU eval-mode repacking asserts out_features % 32 (the tiny ViT's 64 -> 315 c_fc)."""
    assert quantizable(64, "4bit", out_features=315) is False
    assert quantizable(64, "4bit", out_features=192) is True
    assert quantizable(64, "8bit", out_features=315) is True


def test_unknown_quant_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--quant must be one of none, 8bit, 4bit, got '3bit'"):
        quantizable(64, "3bit")
    with pytest.raises(UsageError, match="3bit"):
        plan(real_monkey_config(), "3bit")


def test_quantized_modules_real(real_keys: dict[str, tuple[int, ...]]) -> None:
    config = real_monkey_config()
    decoder = sorted(k.removesuffix(".weight") for k in real_keys if _DECODER_QUANTIZED.search(k))
    vit = sorted(k.removesuffix(".weight") for k in real_keys if _VIT_QUANTIZED.search(k))
    assert len(decoder) == 32 * 5 and len(vit) == 48 * 4
    assert sorted(quantized_modules(config, "4bit")) == decoder
    assert sorted(quantized_modules(config, "8bit", quant_vision=True)) == sorted(decoder + vit)
    assert quantized_modules(config, "none", quant_vision=True) == []


def test_tiny_4bit_leaves_layers_with_in_features_off_64_unquantized(tiny_monkey_dir: Path) -> None:
    config = load_config(tiny_monkey_dir)
    shapes = _safetensors_shapes(tiny_monkey_dir / "model.safetensors")
    names = set(quantized_modules(config, "4bit", quant_vision=True))
    # The tiny ViT's MLP is 64 -> 315 -> 64: c_proj reads 315 features and c_fc writes 315 rows, so both
    # stay unquantized at 4 bits (bitsandbytes' CPU kernels) and are converted at 8 bits.
    assert "transformer.visual.transformer.resblocks.0.mlp.c_proj" not in names
    assert "transformer.visual.transformer.resblocks.0.mlp.c_fc" not in names
    assert "transformer.visual.transformer.resblocks.0.attn.in_proj" in names
    assert "transformer.visual.transformer.resblocks.0.mlp.c_proj" in quantized_modules(config, "8bit", True)
    expected = sum(
        _numel(shape)
        for name, shape in shapes.items()
        if (_DECODER_QUANTIZED.search(name) or _VIT_QUANTIZED.search(name))
        and shape[1] % 64 == 0
        and shape[0] % 32 == 0
    )
    p = plan(config, "4bit", "float32", quant_vision=True)
    assert p.quantized_params == expected
    assert p.quantized_params + p.unquantized_params == sum(_numel(s) for s in shapes.values())


# --- weight bytes --------------------------------------------------------------------------------


def _quantized_count(real_keys: dict[str, tuple[int, ...]], quant_vision: bool) -> int:
    return sum(
        _numel(shape)
        for name, shape in real_keys.items()
        if _DECODER_QUANTIZED.search(name) or (quant_vision and _VIT_QUANTIZED.search(name))
    )


def test_unquantized_weight_bytes_are_exact() -> None:
    config = real_monkey_config()
    assert plan(config, "none", "bfloat16").weight_bytes == 2 * REAL_PARAMETERS
    assert plan(config, "none", "fp16").weight_bytes == 2 * REAL_PARAMETERS
    assert plan(config, "none", "float32").weight_bytes == 4 * REAL_PARAMETERS


@pytest.mark.parametrize("quant_vision", [False, True])
@pytest.mark.parametrize(("quant", "bytes_per_quantized"), [("8bit", 1.0), ("4bit", 0.5)])
def test_quantized_weight_bytes_near_rule_of_thumb(
    real_keys: dict[str, tuple[int, ...]], quant: str, bytes_per_quantized: float, quant_vision: bool
) -> None:
    n_quantized = _quantized_count(real_keys, quant_vision)
    rough = n_quantized * bytes_per_quantized + (REAL_PARAMETERS - n_quantized) * 2
    p = plan(real_monkey_config(), quant, "bfloat16", quant_vision=quant_vision)
    assert p.quantized_params == n_quantized
    # The scales and absmax values cost something on top of the plain weights, but not much.
    assert rough < p.weight_bytes < 1.10 * rough


def test_stronger_quantization_needs_less() -> None:
    config = real_monkey_config()
    totals = [p.total_bytes for p in plan_all(config)]
    assert totals[0] > totals[1] > totals[2]
    for quant in ("8bit", "4bit"):
        assert plan(config, quant, quant_vision=True).total_bytes < plan(config, quant).total_bytes
    # --quant-vision means nothing without a quantization.
    assert plan(config, "none", quant_vision=True) == plan(config, "none")


# --- activations ---------------------------------------------------------------------------------


def test_kv_cache_and_logits_terms() -> None:
    config = real_monkey_config()
    p = plan(config, "4bit", "bfloat16", batch_size=8, prompt_tokens=1400, max_new_tokens=100)
    # The engine's slots hold 1500 tokens rounded up to whole blocks of 256 (and one spare position), plus one
    # kept image prefix.
    assert p.kv_cache_bytes == 2 * 32 * (8 * (1536 + 1) + 1400) * 4096 * 2
    assert p.logits_bytes >= 8 * 151936 * 4
    default = plan(config)
    assert default.prompt_tokens > 1280  # one image span plus its text


def test_activations_grow_with_batch_and_answer_length() -> None:
    config = real_monkey_config()
    one, eight = plan(config, batch_size=1), plan(config, batch_size=8)
    assert eight.weight_bytes == one.weight_bytes
    assert eight.vision_bytes > 7 * one.vision_bytes  # 40 views instead of 5
    assert eight.total_bytes > one.total_bytes
    assert plan(config, max_new_tokens=2048).total_bytes > plan(config, max_new_tokens=16).total_bytes
    assert one.total_bytes > one.weight_bytes + one.activation_bytes  # overhead is counted


def test_real_bf16_plan_is_in_the_expected_range() -> None:
    # ~9.7B parameters at 2 bytes plus working memory: the model card's 20-25 GB.
    total = plan(real_monkey_config(), "none", "bfloat16").total_bytes
    assert 20e9 < total < 25e9


def test_plan_for_tiny_config(tiny_monkey_dir: Path) -> None:
    config = load_config(tiny_monkey_dir)
    p = plan(config, "none", "float32", batch_size=2, prompt_tokens=1300, max_new_tokens=20)
    n = sum(parameter_counts(config).values())
    assert p.weight_bytes == 4 * n
    assert p.kv_cache_bytes == 2 * config.num_hidden_layers * (2 * (1536 + 1) + 1300) * config.hidden_size * 4
    assert p.total_bytes == p.weight_bytes + p.activation_bytes + p.overhead_bytes
    assert p.fits is None
    data = p.to_dict()
    assert json.loads(json.dumps(data))["total_bytes"] == p.total_bytes


def test_bad_plan_arguments_are_usage_errors() -> None:
    config = real_monkey_config()
    with pytest.raises(UsageError, match="--dtype"):
        plan(config, "none", "int3")
    with pytest.raises(UsageError, match="--batch-size"):
        plan(config, batch_size=0)


# --- fitting and refusing ------------------------------------------------------------------------


def test_check_fits_passes_with_room_or_unknown_budget() -> None:
    config = real_monkey_config()
    assert check_fits(config, "none", 100e9, device="cuda:0").fits is True
    assert check_fits(config, "none", None, device="cuda:0").fits is None


def test_refusal_names_need_budget_and_the_quant_that_fits() -> None:
    config = real_monkey_config()
    plans = {p.quant: p for p in plan_all(config)}
    budget = (plans["4bit"].total_bytes + plans["8bit"].total_bytes) // 2  # 4bit fits, 8bit does not
    with pytest.raises(MemoryBudgetError) as caught:
        check_fits(config, "none", budget, device="cuda:0")
    message = str(caught.value)
    assert isinstance(caught.value, MonkeyError)
    assert "\n" not in message
    assert message.startswith(f"needs {format_bytes(plans['none'].total_bytes)} with --quant none")
    assert f"cuda:0 has {format_bytes(budget)} free" in message
    assert f"--quant 4bit needs {format_bytes(plans['4bit'].total_bytes)} and fits" in message


def test_refusal_prefers_the_mildest_quant_that_fits() -> None:
    config = real_monkey_config()
    budget = plan(config, "8bit").total_bytes + 1
    with pytest.raises(MemoryBudgetError, match=r"; --quant 8bit needs .* and fits$"):
        check_fits(config, "none", budget, device="cuda:0")


def test_refusal_suggests_a_smaller_batch_when_no_quant_helps() -> None:
    config = real_monkey_config()
    smallest = plan(config, "4bit", quant_vision=True, batch_size=2)
    with pytest.raises(MemoryBudgetError, match=r"--quant 4bit --quant-vision --batch-size 2 needs .* fits"):
        check_fits(config, "4bit", smallest.total_bytes + 1, device="cuda:0", quant_vision=True, batch_size=8)


def test_refusal_can_combine_quant_and_batch() -> None:
    config = real_monkey_config()
    budget = plan(config, "4bit", quant_vision=True, batch_size=2).total_bytes + 1
    assert plan(config, "none", batch_size=2).total_bytes > budget  # no single change is enough
    with pytest.raises(MemoryBudgetError, match=r"; --quant 4bit --quant-vision --batch-size 2 needs .* and fits$"):
        check_fits(config, "none", budget, device="cuda:0", batch_size=8)


def test_refusal_when_nothing_fits_says_so() -> None:
    config = real_monkey_config()
    with pytest.raises(MemoryBudgetError) as caught:
        check_fits(config, "none", 2 * 10**9, device="cpu")
    message = str(caught.value)
    assert "cpu has 2.0 GB available" in message
    assert "nothing fits: even --quant 4bit --quant-vision needs" in message
    assert "and fits" not in message


# --- --quant auto and the batch cap (fake budgets) ------------------------------------------------------


def _auto_plans(config, **options) -> dict[tuple[str, bool], memory.MemoryPlan]:
    return {(q, qv): plan(config, q, "bfloat16", quant_vision=qv, **options) for q, qv in AUTO_OPTIONS}


@pytest.mark.parametrize(
    ("fits", "expected"),
    [
        (("none", False), ("none", False)),  # room for the released bf16: nothing is quantized
        (("8bit", False), ("8bit", False)),
        (("4bit", False), ("4bit", False)),
        (("4bit", True), ("4bit", True)),  # the vision tower is quantized only as the last resort
    ],
)
def test_quant_auto_picks_the_most_faithful_option_that_fits(fits, expected) -> None:
    config = real_monkey_config()
    plans = _auto_plans(config)
    budget = plans[fits].total_bytes + 1
    choice = choose(config, budget, device="cuda:0", dtype="bfloat16")
    assert (choice.plan.quant, choice.plan.quant_vision) == expected and choice.batch_size == 1
    # Everything more faithful in the order would not have fitted.
    earlier = AUTO_OPTIONS[: AUTO_OPTIONS.index(expected)]
    assert all(plans[option].total_bytes > budget for option in earlier)
    assert choice.note.startswith(f"--quant auto: using {choice.plan.flags} in bfloat16: ")
    assert f"cuda:0 has {format_bytes(budget)} free" in choice.note
    if earlier:
        assert f"--quant none would need {format_bytes(plans[('none', False)].total_bytes)}" in choice.note
        assert f"(this needs {format_bytes(plans[expected].total_bytes)})" in choice.note
    else:
        assert f": it needs {format_bytes(plans[expected].total_bytes)} and" in choice.note


def test_quant_auto_on_a_24_gb_cpu_machine_is_not_refused() -> None:
    """The issue's case: 24 GB of RAM, the released model, no GPU: auto must choose something that fits."""
    choice = choose(real_monkey_config(), 20 * 10**9, device="cpu", dtype="bfloat16", batch_size=4)
    assert choice.plan.fits and choice.plan.quant == "8bit"
    assert "available on cpu" in choice.note


def test_quant_auto_without_bitsandbytes_offers_only_none() -> None:
    config = real_monkey_config()
    budget = _auto_plans(config)[("4bit", False)].total_bytes + 1
    with pytest.raises(MemoryBudgetError) as caught:
        choose(config, budget, device="cuda:0", dtype="bfloat16", available=("none",))
    message = str(caught.value)
    assert message.startswith("the model does not fit: even --quant none needs")
    assert "pip install torchao bitsandbytes" in message


def test_quant_auto_with_quant_vision_keeps_it() -> None:
    config = real_monkey_config()
    choice = choose(config, 10**12, device="cuda:0", dtype="bfloat16", quant_vision=True)
    assert (choice.plan.quant, choice.plan.quant_vision) == ("8bit", True)


def test_quant_auto_refusal_names_the_smallest_need() -> None:
    config = real_monkey_config()
    smallest = _auto_plans(config)[("4bit", True)]
    with pytest.raises(MemoryBudgetError) as caught:
        choose(config, 2 * 10**9, device="cpu", dtype="bfloat16")
    assert str(caught.value) == (
        f"the model does not fit: even --quant 4bit --quant-vision needs {format_bytes(smallest.total_bytes)} "
        "but cpu has 2.0 GB available"
    )


def test_unknown_budget_takes_the_most_faithful() -> None:
    choice = choose(real_monkey_config(), None, device="mps", dtype="bfloat16", batch_size=4)
    assert choice.plan.quant == "none" and choice.batch_size == 4 and "unknown" in choice.note


@pytest.mark.parametrize("quant", ["auto", "8bit"])
def test_batch_size_is_lowered_to_the_largest_that_fits(quant: str) -> None:
    config = real_monkey_config()
    budget = plan(config, "8bit", "bfloat16", batch_size=4).total_bytes + 1
    assert plan(config, "none", "bfloat16").total_bytes > budget  # auto takes 8bit here
    choice = choose(config, budget, quant=quant, device="cuda:0", dtype="bfloat16", batch_size=64)
    assert (choice.plan.quant, choice.batch_size) == ("8bit", 4)
    assert plan(config, "8bit", "bfloat16", batch_size=5).total_bytes > budget
    assert "--batch-size 64 lowered to 4, what fits with --quant 8bit in the" in choice.note
    untouched = choose(config, budget, quant="8bit", device="cuda:0", dtype="bfloat16", batch_size=4)
    assert untouched.batch_size == 4 and untouched.note is None


def test_explicit_quant_that_does_not_fit_names_what_would() -> None:
    config = real_monkey_config()
    budget = plan(config, "4bit", "bfloat16").total_bytes + 1
    with pytest.raises(MemoryBudgetError, match=r"with --quant none .*; --quant 4bit needs .* and fits$"):
        choose(config, budget, quant="none", device="cuda:0", dtype="bfloat16", batch_size=4)


# --- device budgets and formatting ---------------------------------------------------------------


def test_format_bytes() -> None:
    assert format_bytes(21_300_000_000) == "21.3 GB"
    assert format_bytes(7_949_999_999) == "7.9 GB"
    assert format_bytes(None) == "unknown"


def test_meminfo_parsing(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:  100 kB\nMemAvailable:   16000000 kB\n")
    assert memory._meminfo_bytes("MemAvailable", meminfo) == 16_000_000 * 1024
    assert memory._meminfo_bytes("SwapTotal", meminfo) is None
    assert memory._meminfo_bytes("MemTotal", tmp_path / "absent") is None


def test_cgroup_headroom(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("8000000000\n")
    (tmp_path / "memory.current").write_text("3000000000\n")
    assert memory._cgroup_headroom(tmp_path) == 5_000_000_000
    (tmp_path / "memory.max").write_text("max\n")
    assert memory._cgroup_headroom(tmp_path) is None
    assert memory._cgroup_headroom(tmp_path / "none") is None


def test_device_budget_on_this_machine() -> None:
    import torch

    ram = device_budget("cpu")
    assert ram == available_ram() or abs(ram - available_ram()) < 2**30  # RAM moves a little between calls
    assert ram is None or ram > 0
    if torch.cuda.is_available():
        assert device_budget("cuda:0") > 0
    else:
        assert device_budget("cuda") is None
    assert device_budget("mps") is None


def test_memory_module_does_not_import_torch() -> None:
    code = "import sys, monkey_cli.model.memory; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"

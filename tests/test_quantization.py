"""--quant 8bit (torchao int8 weight-only) / 4bit (bitsandbytes NF4) on the CPU, model sources offline, and the
memory-plan refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from conftest import SAMPLES_DIR, require_parity
from safetensors.torch import load_file
from torch import nn

from monkey_cli import Monkey
from monkey_cli.model import memory
from monkey_cli.model.loading import load_model
from monkey_cli.model.memory import MemoryBudgetError
from monkey_cli.model.processor import MonkeyImageProcessor
from monkey_cli.model.tokenizer import QWenTokenizer

bnb = pytest.importorskip("bitsandbytes")  # declared dependencies: present in CI, so these never skip there
pytest.importorskip("torchao")

DECODER_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")


@cache
def _model(checkpoint: str, quant: str, quant_vision: bool = False):
    return load_model(require_parity(checkpoint), quant=quant, quant_vision=quant_vision)


def _cases(index_dir: str) -> list[dict]:
    return json.loads((require_parity(f"tiny_cases/{index_dir}") / "index.json").read_text())["cases"]


def _inputs(model, case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = QWenTokenizer.from_dir(require_parity("tiny-monkey"))
    ids = torch.tensor([tokenizer.encode(case["prompt"].replace(case["image_path"], ""))])
    batch = MonkeyImageProcessor(model.config.vision)(
        [require_parity("tiny_cases") / case["image_path"]], drop_alpha=True
    )
    return ids, torch.cat([batch.windows, batch.global_view[:, None]], dim=1)


def _greedy(model, ids: torch.Tensor, pixels: torch.Tensor) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, max_new_tokens=24, min_new_tokens=1
        )
    return out[0, ids.shape[1] :].tolist()


def _prefill(model, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, pixel_values=pixels, use_cache=False).logits[0]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    # In float64: float32 sums over ~3M logits carry errors of the size being measured (cosines above 1).
    return nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def _is_int8(layer: nn.Module) -> bool:
    return type(layer) is nn.Linear and type(layer.weight).__name__ == "Int8Tensor"


@pytest.mark.parametrize("number", range(18))
def test_8bit_greedy_tokens_equal_the_reference_on_tiny_monkey(number: int) -> None:
    """int8 weight-only on the CPU: every parity case decodes the original's float32 tokens exactly."""
    case = _cases("")[number]
    model = _model("tiny-monkey", "8bit")
    model.config.seq_length = case["seq_length"]  # the NTK/logn regime of this case
    try:
        ids, pixels = _inputs(model, case)
        assert (
            _greedy(model, ids, pixels)
            == load_file(require_parity("tiny_cases") / case["file"])["generated_ids"].tolist()
        )
    finally:
        model.config.seq_length = 2048


def test_8bit_on_the_sharp_checkpoint_agrees_at_prefill() -> None:
    """tiny-monkey-sharp is built to amplify every per-layer error (fan-in init, README "Sensitivity"): what must
    hold is the prefill itself: logits cosine >= 0.9999 to float32 (measured 1 - 5.8e-5) and the same first
    token, unless float32's two best are a near-tie (closer than the logits' error; c_caption: 551 leads 1221
    by 0.0016, against errors of 0.05 for int8 and 0.1 for bf16)."""
    for case in [c for c in _cases("sharp") if c["seq_length"] == 2048]:
        q8, f32 = _model("tiny-monkey-sharp", "8bit"), _model("tiny-monkey-sharp", "none")
        ids, pixels = _inputs(f32, case)
        quantized, reference = _prefill(q8, ids, pixels), _prefill(f32, ids, pixels)
        assert _cosine(quantized, reference) >= 0.9999
        last = reference[-1].clone()
        last[f32.config.eod_id] = float("-inf")  # min_new_tokens=1, as _greedy
        best, second = last.topk(2).values.tolist()
        error = (quantized[-1] - reference[-1]).abs().max().item()
        assert _greedy(q8, ids, pixels)[0] == _greedy(f32, ids, pixels)[0] or best - second <= 2 * error


@pytest.mark.parametrize("checkpoint", ["tiny-monkey", "tiny-monkey-sharp"])
def test_8bit_prefill_logits_are_as_close_to_float32_as_bf16(checkpoint: str) -> None:
    """The quality check of issue 21, as 4bit's below: prefill logits of every case against float32. int8
    weight-only with float32 compute errs less than running the whole model in bf16 (measured 1 - cosine
    8.6e-6 vs 3.3e-5 on tiny-monkey, 5.8e-5 vs 8.9e-5 on sharp; the largest logit error of a case at most 1.12x
    bf16's, over all cases 0.014 vs 0.014 and 0.054 vs 0.096);
    with bf16 compute (the GPU's) it stays within twice bf16's error (4.1e-5 and 1.5e-4), where NF4 is 45x
    (tiny-monkey) to 140x (sharp) bf16's. LLM.int8, which --quant 8bit used to be, measured 1.5e-5 and 1.1e-4."""
    index = "" if checkpoint == "tiny-monkey" else "sharp"
    f32, bf16 = _model(checkpoint, "none"), load_model(require_parity(checkpoint), dtype="bfloat16")
    q8 = _model(checkpoint, "8bit")
    q8_bf16 = load_model(require_parity(checkpoint), dtype="bfloat16", quant="8bit")
    for case in [c for c in _cases(index) if c["seq_length"] == 2048]:
        ids, pixels = _inputs(f32, case)
        reference = _prefill(f32, ids, pixels)
        bf16_logits = _prefill(bf16, ids, pixels.to(torch.bfloat16)).float()
        q8_logits = _prefill(q8, ids, pixels)
        q8_bf16_logits = _prefill(q8_bf16, ids, pixels.to(torch.bfloat16)).float()
        bf16_error = 1 - _cosine(bf16_logits, reference)
        assert 1 - _cosine(q8_logits, reference) <= bf16_error, case["id"]
        assert (q8_logits - reference).abs().max() <= 1.25 * (bf16_logits - reference).abs().max(), case["id"]
        assert 1 - _cosine(q8_bf16_logits, reference) <= 2 * bf16_error, case["id"]


def test_8bit_decodes_with_no_data_dependent_op_and_no_host_sync() -> None:
    """What makes --quant 8bit capturable as a CUDA graph: its decoder Linear layers hold torchao int8 weights,
    and one decode step runs no operation whose output shape depends on the data (nonzero, argwhere, masked
    select) and reads nothing back to the host (item, bool). LLM.int8, which --quant 8bit was before, finds its
    outlier columns with `outliers.any()` and `torch.argwhere` in every Linear on CUDA
    (bitsandbytes/backends/cuda/ops.py, int8_vectorwise_quant): inductor cannot capture that, and it syncs the
    host twice per Linear. (bitsandbytes' CPU backend dequantises instead, so those syncs cannot be counted on
    this machine; the CUDA benchmark counts them with torch.cuda.set_sync_debug_mode.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    from monkey_cli.engine.cache import SlotCache
    from monkey_cli.engine.step import DecodeStep

    q8 = _model("tiny-monkey", "8bit")
    assert all(_is_int8(block.get_submodule(name)) for block in q8.transformer.h for name in DECODER_LINEARS)
    forbidden = {"aten.nonzero.default", "aten._local_scalar_dense.default", "aten.masked_select.default",
                 "aten.item.default", "aten.argwhere.default"}  # fmt: skip

    class Record(TorchDispatchMode):
        ops: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Record.ops.add(str(func))
            return func(*args, **(kwargs or {}))

    cache = SlotCache(q8.config, 2, 512, torch.float32, "cpu")
    cache.live[:] = True
    cache.positions[:] = torch.tensor([3, 5])
    with torch.inference_mode(), Record():
        DecodeStep(q8, cache)(2, 256)
    assert "aten.mm.default" in Record.ops  # the dispatcher saw the step's matmuls
    assert not Record.ops & forbidden


@pytest.mark.parametrize("quant_vision", [False, True])
def test_4bit_prefill_logits_close_to_float32_and_generation_runs(quant_vision: bool) -> None:
    """NF4 + double quant: prefill logits cosine >= 0.99 to float32 on every tiny-monkey case (measured 0.9986)."""
    q4, f32 = _model("tiny-monkey", "4bit", quant_vision), _model("tiny-monkey", "none")
    for case in [c for c in _cases("") if c["seq_length"] == 2048]:
        ids, pixels = _inputs(f32, case)
        assert _cosine(_prefill(q4, ids, pixels), _prefill(f32, ids, pixels)) >= 0.99, case["id"]
        tokens = _greedy(q4, ids, pixels)
        assert 1 <= len(tokens) <= 24 and all(0 <= t < q4.config.vocab_size for t in tokens)


def _quantized(layer: nn.Module, quant: str) -> bool:
    return _is_int8(layer) if quant == "8bit" else isinstance(layer, bnb.nn.Linear4bit)


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_decoder_linears_are_quantized_vision_untouched_by_default(quant: str) -> None:
    model = _model("tiny-monkey", quant)
    for block in model.transformer.h:
        for name in DECODER_LINEARS:
            assert _quantized(block.get_submodule(name), quant), name
    vit_block = model.transformer.visual.transformer.resblocks[0]
    for name in ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"):
        assert type(vit_block.get_submodule(name)) is nn.Linear, name
    assert type(model.lm_head) is nn.Linear
    assert type(model.transformer.visual.attn_pool.kv_proj) is nn.Linear
    assert model.transformer.visual.conv1.weight.dtype == torch.float32


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_quant_vision_quantizes_the_vit(quant: str) -> None:
    model = _model("tiny-monkey", quant, True)
    vit_block = model.transformer.visual.transformer.resblocks[0]
    assert _quantized(vit_block.attn.in_proj, quant) and _quantized(vit_block.attn.out_proj, quant)
    # The tiny ViT's MLP is 64 -> 315 -> 64. bitsandbytes' CPU 4-bit path crashes in eval mode for it, so
    # at 4 bits both layers stay unquantized (and the forward pass above, with them, runs); 8 bits converts them.
    for layer in (vit_block.mlp.c_fc, vit_block.mlp.c_proj):
        assert _quantized(layer, quant) if quant == "8bit" else type(layer) is nn.Linear and not _is_int8(layer)
    assert type(model.transformer.visual.attn_pool.kv_proj) is nn.Linear  # the resampler stays
    features = Monkey(model, None, MonkeyImageProcessor(model.config.vision)).encode_images([SAMPLES_DIR / "chart.png"])
    assert features.shape == (1, 1280, 256) and torch.isfinite(features).all()


def test_8bit_without_torchao_is_a_usage_error(monkeypatch) -> None:
    from monkey_cli.errors import UsageError
    from monkey_cli.model import quantization

    def missing():
        raise ImportError("No module named 'torchao'")

    monkeypatch.setattr(quantization, "import_torchao", missing)
    with pytest.raises(UsageError, match="--quant 8bit needs torchao, which is not installed here: pip install"):
        load_model(require_parity("tiny-monkey"), quant="8bit")


def test_quant_vision_without_quant_is_a_usage_error() -> None:
    from monkey_cli.errors import UsageError

    with pytest.raises(UsageError, match="--quant-vision needs --quant 8bit or 4bit"):
        load_model(require_parity("tiny-monkey"), quant="none", quant_vision=True)


def test_offline_uncached_hub_id_is_a_clean_error(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run(
        [sys.executable, "-m", "monkey_cli", "caption", str(SAMPLES_DIR / "chart.png"), "--model", "echo840/Monkey"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "echo840/Monkey" in line and "--model PATH" in line and "hf download" in line


def test_memory_refusal_before_loading(monkeypatch) -> None:
    """A fake device budget: Monkey.load (and the CLI) refuse in one line, before reading any weight."""
    plans = {p.quant: p for p in Monkey.plan(require_parity("tiny-monkey"), device="cpu")}
    smallest = min(p.total_bytes for p in plans.values())
    monkeypatch.setattr(memory, "device_budget", lambda device: smallest // 2)
    monkeypatch.setattr("monkey_cli.model.loading.find_weight_files", _never_called)
    with pytest.raises(MemoryBudgetError, match=r"with --quant none but cpu has .* available; nothing fits") as info:
        Monkey.load(require_parity("tiny-monkey"), device="cpu", quant="none")
    assert "\n" not in str(info.value)

    from typer.testing import CliRunner

    from monkey_cli.cli import _register_commands, app

    _register_commands()
    args = ["caption", str(SAMPLES_DIR / "chart.png"), "--model", str(require_parity("tiny-monkey")), "--quant", "none"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "with --quant none but cpu has" in result.stderr
    assert "Traceback" not in result.output


def test_memory_refusal_for_the_released_model_names_the_quant_that_fits(monkeypatch) -> None:
    """The released config on a 14 GB GPU: bf16 and 8bit do not fit, 4bit does, and the message says so."""
    from monkey_cli.model.configuration import real_monkey_config

    with pytest.raises(MemoryBudgetError, match=r"with --quant none but cuda:0 has 14.0 GB free; --quant 4bit needs"):
        memory.check_fits(real_monkey_config(), "none", 14 * 10**9, device="cuda:0", dtype="bfloat16")


def _never_called(*_args, **_kwargs):
    raise AssertionError("weights were looked at although the plan refused")

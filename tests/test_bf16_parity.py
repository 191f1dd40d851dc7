"""bfloat16, the released precision, against the original run in bfloat16 (../shared/parity/tiny_cases/bf16).

Per the fixture README: teacher-forced logits (the stored tokens fed back) within a stated tolerance, and greedy
tokens identical except where they diverge at a step whose stored top-1/top-2 margin is within our logits
error there (a near-tie; the run's summary lists each one). Also: low-precision masks never hold a fully
masked row, and a left-padded bf16 batch decodes like single runs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import NEAR_TIES, require_parity
from parity_cases import (
    BF16_CASES,
    BF16_LOGITS_ATOL,
    case_checkpoint,
    cases,
    empty_span_ids,
    image_path,
    model,
    pixel_values,
    teacher_forced_eager,
)
from safetensors.torch import load_file

from monkey_cli.model.qwen import attention_bias
from monkey_cli.model.tokenizer import QWenTokenizer


def check_bf16_case(case: dict, logits: torch.Tensor, generated: list[int], label: str) -> None:
    """Logits within tolerance; greedy tokens equal, or diverging first at a stored near-tie."""
    checkpoint = case_checkpoint(case, "bf16", "")
    reference = load_file(require_parity("tiny_cases/bf16") / case["file"])
    error = (logits - reference["step_logits"]).abs().amax(-1)
    atol = BF16_LOGITS_ATOL[checkpoint]
    assert error.max().item() <= atol, f"{label}: logits differ by {error.max().item():.4f} (tolerance {atol})"
    expected = case["generated_ids"]
    if generated == expected:
        return
    k = next(i for i, (ours, theirs) in enumerate(zip(generated, expected, strict=False)) if ours != theirs)
    margin = case["step_top1_top2_margins"][k]
    assert margin <= error[k].item(), (
        f"{label}: greedy tokens diverge at step {k}, where the reference margin {margin:.4f} exceeds our "
        f"logits error {error[k].item():.4f}: a bug, not a near-tie"
    )
    NEAR_TIES.append(f"{label} {case['id']}: step {k}, margin {margin:.4f} <= error {error[k].item():.4f}")


@pytest.mark.parametrize("number", range(BF16_CASES))
def test_eager_bf16_case(number: int) -> None:
    case = cases("bf16")[number]
    checkpoint = case_checkpoint(case, "bf16", "")
    bf16 = model(checkpoint, "bfloat16", case["seq_length"])
    assert bf16.transformer.wte.weight.dtype == torch.bfloat16
    ids = torch.tensor([empty_span_ids(checkpoint, case)])
    assert ids.shape[1] == case["prompt_len"]
    pixels = pixel_values(bf16, image_path(case))
    reference = torch.tensor(case["generated_ids"])
    logits = teacher_forced_eager(bf16, ids, pixels, reference)
    with torch.inference_mode():
        out = bf16.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, max_new_tokens=24, min_new_tokens=1
        )
    check_bf16_case(case, logits, out[0, ids.shape[1] :].tolist(), "eager")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_mask_has_no_fully_masked_row(dtype: torch.dtype) -> None:
    """Left padding makes pad queries whose every earlier key is padding: they must still see one key, and
    masked scores must be the dtype's finite minimum (a float32 minimum cast to bf16/fp16 is -inf)."""
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    for query_length in (5, 1):
        bias = attention_bias(mask, query_length, dtype)
        assert bias.dtype == dtype
        assert torch.isfinite(bias).all()
        allowed = bias == 0
        assert allowed.any(-1).all(), "a query row with every key masked"
    # Real tokens see exactly the causal, unpadded keys.
    bias = attention_bias(mask, 5, dtype)[0, 0]
    assert (bias[3] == 0).tolist() == [False, False, False, True, False]
    assert (bias[4] == 0).tolist() == [False, False, False, True, True]


def test_padded_bf16_batch_equals_single_runs() -> None:
    """Three prompts of different lengths, left-padded in one bf16 batch: no NaN, and the same greedy tokens
    and first-step logits (within bf16 resolution) as each prompt alone."""
    sharp = model("tiny-monkey-sharp", "bfloat16")
    tokenizer = QWenTokenizer.from_dir(require_parity("tiny-monkey-sharp"))
    prompts = [
        "<img></img> What is the title? Answer: ",
        "<img></img> Generate the detailed caption in English: ",
        "<img></img> How many coloured shapes are in this picture, and which one is largest? Answer: ",
    ]
    images = ["doc_page_1240x1754.png", "shapes_640x480.png", "rgba_700x500.png"]
    pixels = torch.cat([pixel_values(sharp, require_parity("tiny_cases/images") / name) for name in images])
    input_ids, attention_mask = tokenizer.batch_encode(prompts)
    assert (attention_mask == 0).any(), "the batch must actually be padded"
    with torch.inference_mode():
        batched = sharp(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, use_cache=False)
        assert torch.isfinite(batched.logits).all()
        out = sharp.generate(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, max_new_tokens=8, min_new_tokens=1
        )
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.inference_mode():
            alone = sharp(input_ids=ids, pixel_values=pixels[row : row + 1], use_cache=False).logits[0, -1]
            single = sharp.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels[row : row + 1],
                max_new_tokens=8, min_new_tokens=1,
            )
        assert (batched.logits[row, -1] - alone).abs().max().item() <= BF16_LOGITS_ATOL["tiny-monkey-sharp"]
        assert out[row, input_ids.shape[1] :].tolist() == single[0, ids.shape[1] :].tolist()

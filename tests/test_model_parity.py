"""The native model against the ORIGINAL Monkey's outputs (../shared/parity/tiny_cases, README "How to compare").

Tolerances are the fixture README's: logits atol 1e-5 on tiny-monkey and 1e-4 on tiny-monkey-sharp (rtol 0),
image embeddings atol 1e-5; input ids and greedy tokens exactly equal (a divergence is excused only where the
stored top-1/top-2 margin at that step is below our logits error there).
"""

from __future__ import annotations

import pytest
import torch
from conftest import require_parity
from parity_cases import FP32_LOGITS_ATOL, FP32_SETS, cases, model, pixel_values, teacher_forced_eager, tokenizer
from safetensors.torch import load_file

EMBEDS_ATOL = 1e-5


def _case_params() -> list:
    """(checkpoint, index dir, case number) for every stored case; read lazily so collection never fails."""
    return [
        pytest.param(checkpoint, index_dir, i, id=f"{checkpoint}-{i}")
        for checkpoint, index_dir, count in FP32_SETS
        for i in range(count)
    ]


@pytest.mark.parametrize(("checkpoint", "index_dir", "number"), _case_params())
def test_case_matches_reference(checkpoint: str, index_dir: str, number: int) -> None:
    case = cases(index_dir)[number]
    root = require_parity(f"tiny_cases/{index_dir}")
    ref = load_file(root / case["file"])
    fp32 = model(checkpoint, "float32", case["seq_length"])
    atol = FP32_LOGITS_ATOL[checkpoint]

    # Input ids: identical with the path in the span, and identical outside it with an empty span.
    ids = tokenizer(checkpoint).encode(case["prompt"])
    assert ids == case["input_ids"] == ref["input_ids"][0].tolist()
    start, end = case["image_span"]
    empty = tokenizer(checkpoint).encode(case["prompt"].replace(case["image_path"], ""))
    assert empty[:start] == ids[:start] and empty[end:] == ids[end:]
    assert set(empty[start:end]) == {tokenizer(checkpoint).img_pad_id}

    input_ids = torch.tensor([empty])  # the model must not care what the span holds
    pixels = pixel_values(fp32, require_parity("tiny_cases") / case["image_path"])

    # Prefill: logits at every position outside the image span, and logsumexp over all positions.
    with torch.inference_mode():
        prefill = fp32(input_ids=input_ids, pixel_values=pixels, use_cache=False).logits[0]
    positions = ref["prefill_positions"]
    prefill_err = (prefill[positions] - ref["prefill_logits"]).abs().max().item()
    assert prefill_err <= atol, f"prefill logits differ by {prefill_err:.2e}"
    lse_err = (torch.logsumexp(prefill, -1) - ref["prefill_all_logsumexp"]).abs().max().item()
    assert lse_err <= atol, f"prefill logsumexp differs by {lse_err:.2e}"

    # Every decode step, teacher-forced with the reference's tokens so steps stay comparable.
    step_logits = teacher_forced_eager(fp32, input_ids, pixels, ref["generated_ids"])
    step_err = (step_logits - ref["step_logits"]).abs().amax(-1)
    assert step_err.max().item() <= atol, f"step logits differ by {step_err.max().item():.2e} at {step_err.argmax()}"

    # Greedy decoding through transformers' generate() gives the reference's tokens.
    with torch.inference_mode():
        out = fp32.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=pixels,
            max_new_tokens=24,
            min_new_tokens=1,
        )
    generated = out[0, input_ids.shape[1] :].tolist()
    expected = ref["generated_ids"].tolist()
    if generated != expected:
        k = next(i for i, (a, b) in enumerate(zip(generated, expected, strict=False)) if a != b)
        margin = case["step_top1_top2_margins"][k]
        assert margin < step_err[k].item(), (
            f"greedy tokens diverge at step {k} where the reference margin {margin:.2e} exceeds our error "
            f"{step_err[k].item():.2e}: a bug, not a near-tie"
        )


@pytest.mark.parametrize("image", ["a", "b", "c"])
def test_spliced_image_embeddings(image: str) -> None:
    """What reaches the first decoder layer: <img>, 1280 image vectors (windows then global), </img>."""
    case = next(c for c in cases("") if c["id"] == f"{image}_title_s2048")
    fp32 = model("tiny-monkey", "float32", case["seq_length"])
    vision = load_file(require_parity("tiny_cases") / f"vision_{image}.safetensors")
    captured = {}

    def capture(_module, args):
        captured["x"] = args[0]

    hook = fp32.transformer.h[0].register_forward_pre_hook(capture)
    try:
        with torch.inference_mode():
            fp32(
                input_ids=torch.tensor([case["input_ids"]]),
                pixel_values=pixel_values(fp32, require_parity("tiny_cases") / case["image_path"]),
                use_cache=False,
            )
    finally:
        hook.remove()
    start, end = case["image_span"]
    spliced = captured["x"][0, start:end]
    err = (spliced - vision["image_embeds"][0]).abs().max().item()
    assert err <= EMBEDS_ATOL, f"spliced image embeddings differ by {err:.2e}"
    # The tags keep their word embeddings.
    words = fp32.transformer.wte.weight
    assert torch.equal(captured["x"][0, start - 1], words[fp32.config.image_start_id])
    assert torch.equal(captured["x"][0, end], words[fp32.config.image_end_id])

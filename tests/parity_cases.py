"""The original Monkey's recorded outputs (../shared/parity/tiny_cases) and how to replay them on our model.

Shared by the float32 parity tests, the bfloat16 ones and the engine's: one way to find a case, build its
inputs, and teacher-force the reference tokens (feed the stored tokens, so every step stays comparable even
past a divergence), through the eager model or through the engine's static decode step.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch
from conftest import require_parity

from monkey_cli.engine.cache import SlotCache, length_bucket
from monkey_cli.engine.step import DecodeStep
from monkey_cli.model.loading import load_model
from monkey_cli.model.processor import MonkeyImageProcessor
from monkey_cli.model.tokenizer import QWenTokenizer

FP32_SETS = (("tiny-monkey", "", 18), ("tiny-monkey-sharp", "sharp", 6))
# The fixture README's tolerances (rtol 0): what an honest float32 re-implementation reaches.
FP32_LOGITS_ATOL = {"tiny-monkey": 1e-5, "tiny-monkey-sharp": 1e-4}
# bfloat16 logits move in steps of 1/64..1/32 here; measured worst teacher-forced error of the eager path:
# 0.0078 on tiny-monkey and 0.043 on tiny-monkey-sharp (which amplifies every difference by design).
BF16_LOGITS_ATOL = {"tiny-monkey": 0.02, "tiny-monkey-sharp": 0.06}
BF16_CASES = 24


def cases(index_dir: str) -> list[dict]:
    return json.loads((require_parity(f"tiny_cases/{index_dir}") / "index.json").read_text())["cases"]


def case_checkpoint(case: dict, index_dir: str, default: str) -> str:
    """The checkpoint folder name a case ran on (bf16 cases name theirs; the others are one per index)."""
    return Path(case["checkpoint"]).name if "checkpoint" in case else default


@cache
def tokenizer(checkpoint: str) -> QWenTokenizer:
    return QWenTokenizer.from_dir(require_parity(checkpoint))


@cache
def model(checkpoint: str, dtype: str = "float32", seq_length: int | None = None):
    torch.manual_seed(0)
    overrides = {"seq_length": seq_length} if seq_length else None
    return load_model(require_parity(checkpoint), dtype=dtype, config_overrides=overrides)


@contextmanager
def trained_length(model, seq_length: int):
    """Run `model` as if built with `seq_length` (the original bakes it in at construction; we read it per call)."""
    before = model.config.seq_length
    model.config.seq_length = seq_length
    try:
        yield model
    finally:
        model.config.seq_length = before


def empty_span_ids(checkpoint: str, case: dict) -> list[int]:
    """The case's prompt ids with the image path left out of the span (our model must not care what it holds)."""
    return tokenizer(checkpoint).encode(case["prompt"].replace(case["image_path"], ""))


def pixel_values(model, image_path: Path) -> torch.Tensor:
    # The original drops alpha (image c); compare with the processor's option that does the same.
    batch = MonkeyImageProcessor(model.config.vision)([image_path], drop_alpha=True)
    return torch.cat([batch.windows, batch.global_view[:, None]], dim=1)


def image_path(case: dict) -> Path:
    return require_parity("tiny_cases") / case["image_path"]


def teacher_forced_eager(model, input_ids: torch.Tensor, pixels: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Logits [steps, vocab] of every step through the eager model and transformers' DynamicCache."""
    with torch.inference_mode():
        out = model(input_ids=input_ids, pixel_values=pixels, use_cache=True, logits_to_keep=1)
        steps = [out.logits[0, -1]]
        cache = out.past_key_values
        mask = torch.ones_like(input_ids)
        for token in reference[:-1].tolist():
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            out = model(input_ids=torch.tensor([[token]]), attention_mask=mask, past_key_values=cache, use_cache=True)
            steps.append(out.logits[0, -1])
    return torch.stack(steps)


class StaticTeacher:
    """Teacher-forces reference tokens through the engine's slot cache and (optionally compiled) decode step.

    One cache and one step per model, reused across cases, as the engine reuses them across requests: a
    compiled step must not recompile when the prompt, the NTK alpha or the trained length change.
    """

    def __init__(self, model, compile: bool, max_length: int = 1536) -> None:
        self.model = model
        weights = model.transformer.wte.weight
        self.cache = SlotCache(model.config, 1, max_length, weights.dtype, weights.device)
        self.step = DecodeStep(model, self.cache, compile=compile)

    def run(
        self,
        ids: list[int],
        pixels: torch.Tensor | None,
        reference: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Step logits [steps, vocab]; the image as `pixels`, or as its features `image_embeds` [1, tokens, hidden]."""
        model, cache = self.model, self.cache
        transformer = model.transformer
        alpha = transformer.ntk_alpha_for(len(ids))
        with torch.inference_mode():
            out = model(
                input_ids=torch.tensor([ids]),
                pixel_values=pixels,
                image_embeds=image_embeds,
                past_key_values=cache.writer(0, 0),
                ntk_alphas=[alpha],
                logits_to_keep=1,
            )
            steps = [out.logits[0, -1]]
            cache.inv_freq[0] = transformer.rotary.inv_freq(alpha, cache.inv_freq.device)
            cache.trained_length[0] = float(model.config.seq_length)
            cache.positions[0] = len(ids)
            cache.live[0] = True  # the step advances the position itself
            for position, token in enumerate(reference[:-1].tolist(), start=len(ids)):
                cache.tokens[0] = token
                logits, _scores, _summary = self.step(1, length_bucket(position + 1, cache.max_length))
                steps.append(logits[0].clone())
        return torch.stack(steps)


def greedy_divergence(logits: torch.Tensor, reference: list[int], eos_id: int) -> int | None:
    """First step whose arg-max (with <|endoftext|> forbidden at step 0, min_new_tokens=1) is not the
    reference token: greedy decoding reproduces the reference exactly when this is None."""
    chosen = logits.clone()
    chosen[0, eos_id] = float("-inf")
    argmax = chosen.argmax(-1).tolist()
    return next((k for k, (ours, theirs) in enumerate(zip(argmax, reference, strict=True)) if ours != theirs), None)

"""How the next token is chosen: greedy (the original's setting at every call site) or sampling.

The rules follow transformers' logits processors so that a request answers as `generate()` would: the end of
text is forbidden until `min_new_tokens` tokens exist, then greedy takes the arg-max; sampling divides by the
temperature, keeps the `top_k` best tokens, then the smallest set whose probability reaches `top_p`, and draws
from what is left with the request's own random generator (seeded: reproducible).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """What one request wants from decoding. The defaults are the original's: greedy, at least one token."""

    max_new_tokens: int = 512
    min_new_tokens: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    top_logprobs: int = 0  # report this many most likely tokens (and their log-probabilities) per step

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            limit = self.max_new_tokens
            raise ValueError(f"min_new_tokens must be in 0..max_new_tokens ({limit}), got {self.min_new_tokens}")
        if not self.temperature >= 0:  # also refuses NaN
            raise ValueError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {self.top_logprobs}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A private random stream for sampling (None for greedy): seeded requests repeat exactly."""
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def choose_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generated: Sequence[int],
    eos_id: int,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Next token per row of `logits` [rows, vocab] (float32): row i has produced `generated[i]` tokens so far."""
    too_early = [count < p.min_new_tokens for count, p in zip(generated, params, strict=True)]
    if any(too_early):
        logits = logits.clone()
        rows = torch.tensor(too_early, device=logits.device)
        logits[rows, eos_id] = float("-inf")
    chosen = logits.argmax(dim=-1)
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            chosen[row] = _sample(logits[row], p, generator)
    return chosen


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One draw from `logits` [vocab] after temperature, top-k and top-p."""
    scores = logits / params.temperature
    if params.top_k and params.top_k < scores.shape[-1]:
        kth_best = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # probability mass ahead of each token
        drop = before >= params.top_p  # the best token always stays (nothing is ahead of it)
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probabilities = scores.softmax(-1)
    return torch.multinomial(probabilities, 1, generator=generator)[0]

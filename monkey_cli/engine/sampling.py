"""How the next token is chosen: greedy (the original's setting at every call site) or sampling, batched.

The rules follow transformers' logits processors so that a request answers as `generate()` would: the end of
text is forbidden until `min_new_tokens` tokens exist, a constrained request may choose only what its constraint
allows, then greedy takes the arg-max; sampling divides by the temperature, keeps the `top_k` best tokens, then
the smallest set whose probability reaches `top_p`, and draws from what is left with the request's own random
generator (seeded: reproducible).

Everything works on a batch of rows at once, on the device, with no host sync: the masks are tensors, the
greedy choice and the log-probabilities are computed inside the compiled decode step, and a draw is the arg-max
of the probabilities divided by exponential noise, which is exactly how `torch.multinomial` draws one sample
(the noise comes from the request's generator, one row per request and step, as `multinomial` takes it): the
same seed gives the same tokens as drawing row by row with `multinomial`. Sampling never produces NaN for any
temperature > 0 and top_p in (0, 1]: the temperature is clamped far below any real setting, overflowing scores
keep their order, and the best token always survives top-p.

Log-probabilities are those of the model's raw float32 logits (log-softmax over the whole vocabulary), before
the temperature, the `min_new_tokens` rule or a constraint's mask: what the model thinks of a token, whatever
the request's decoding rules made of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from monkey_cli.engine.constraints import bitmask_words

TOP_LOGPROBS = 20  # the most alternatives a request may ask log-probabilities for (as OpenAI's API allows)
# Below any temperature a person would choose: a smaller one (1e-300 is 0 in float32) is clamped to it, which
# still means "take the best token".
MIN_TEMPERATURE = 1e-30

# Columns of the summary the decode step copies back to the host (one float32 row per slot; token ids are
# exact in float32 below 2**24).
TOKEN, LOGPROB, LOGSUMEXP = 0, 1, 2
TOP_IDS = 3
TOP_VALUES = TOP_IDS + TOP_LOGPROBS
SUMMARY_WIDTH = TOP_VALUES + TOP_LOGPROBS


@dataclass(frozen=True)
class SamplingParams:
    """What one request wants from decoding. The defaults are the original's: greedy, at least one token.

    `top_logprobs` (0..20): also return, for every token, the log-probabilities of that many best tokens.
    """

    max_new_tokens: int = 512
    min_new_tokens: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    top_logprobs: int = 0

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
        if not 0 <= self.top_logprobs <= TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in 0..{TOP_LOGPROBS}, got {self.top_logprobs}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def generator(self, device: torch.device | str) -> torch.Generator | None:
        """A private random stream for sampling (None for greedy): seeded requests repeat exactly."""
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


# --- masks -----------------------------------------------------------------------------------------


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, ceil(vocab/32)] int32 (bit t of a row set: token t allowed) -> [rows, vocab] bool."""
    token = torch.arange(vocab_size, device=bitmask.device)
    words = bitmask[:, token // 32]  # [rows, vocab]
    return ((words >> (token % 32)) & 1).bool()


def blocked_scores(
    logits: torch.Tensor, eos_forbidden: torch.Tensor, bitmask: torch.Tensor, eos_id: int
) -> torch.Tensor:
    """`logits` [rows, vocab] with what a row may not choose at -inf: <|endoftext|> where `eos_forbidden` [rows]
    (too early for min_new_tokens), and every token its `bitmask` [rows, words] leaves out."""
    vocab = logits.shape[-1]
    is_eos = torch.arange(vocab, device=logits.device) == eos_id
    blocked = ~unpack_bitmask(bitmask, vocab) | (eos_forbidden[:, None] & is_eos[None, :])
    return logits.masked_fill(blocked, float("-inf"))


# --- what the step returns -------------------------------------------------------------------------


def summarize(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """One float32 row per sequence: the chosen token, its log-probability, the log-sum-exp of the logits, and
    the TOP_LOGPROBS best tokens with their log-probabilities. `logits` are the raw float32 ones."""
    log_total = logits.logsumexp(-1)  # [rows]
    chosen_logprob = logits.gather(1, chosen[:, None])[:, 0] - log_total
    top_values, top_ids = logits.topk(min(TOP_LOGPROBS, logits.shape[-1]), dim=-1)
    columns = [chosen.float()[:, None], chosen_logprob[:, None], log_total[:, None], top_ids.float(),
               top_values - log_total[:, None]]  # fmt: skip
    if top_ids.shape[-1] < TOP_LOGPROBS:  # a vocabulary smaller than 20 (tests' toy models)
        missing = TOP_LOGPROBS - top_ids.shape[-1]
        pad = logits.new_full((logits.shape[0], missing), float("nan"))
        columns = [*columns[:4], pad, columns[4], pad]
    return torch.cat(columns, dim=1)


def resummarize(summary: torch.Tensor, logits: torch.Tensor, chosen: torch.Tensor, rows: torch.Tensor) -> None:
    """Replace the chosen token (and its log-probability) of the `rows` [n] (bool) with `chosen` [n]."""
    logprob = logits.gather(1, chosen[:, None])[:, 0] - summary[:, LOGSUMEXP]
    summary[:, TOKEN] = torch.where(rows, chosen.float(), summary[:, TOKEN])
    summary[:, LOGPROB] = torch.where(rows, logprob, summary[:, LOGPROB])


# --- sampling --------------------------------------------------------------------------------------


def sample(
    scores: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """One draw per row of `scores` [rows, vocab] (masked logits, float32) after temperature [rows], top-k [rows]
    (0: off) and top-p [rows]; `noise` [rows, vocab] holds Exp(1) draws from each row's generator."""
    vocab = scores.shape[-1]
    scaled = scores / temperature.clamp(min=MIN_TEMPERATURE)[:, None]
    # A tiny temperature may overflow float32: +inf becomes the largest float (the order is kept), never NaN.
    scaled = scaled.nan_to_num(nan=float("-inf"), posinf=torch.finfo(scaled.dtype).max, neginf=float("-inf"))
    ordered, order = scaled.sort(dim=-1, descending=True)
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    kth_best = ordered.gather(1, (k - 1)[:, None])  # [rows, 1]; the smallest score when top-k is off
    scaled = scaled.masked_fill(scaled < kth_best, float("-inf"))
    ordered = ordered.masked_fill(ordered < kth_best, float("-inf"))
    probabilities = ordered.softmax(-1)
    before = probabilities.cumsum(-1) - probabilities  # probability mass ahead of each token
    first = torch.arange(vocab, device=scores.device) == 0
    drop = (before >= top_p[:, None]) & (top_p[:, None] < 1) & ~first  # the best token always stays
    scaled = scaled.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return (scaled.softmax(-1) / noise).argmax(-1)


def draw_noise(noise: torch.Tensor, generator: torch.Generator) -> None:
    """Fill `noise` (one row) with Exp(1) draws from `generator`: what `torch.multinomial` draws for one sample."""
    noise.exponential_(generator=generator)


# --- the whole rule, for one batch (admission and tests) ---------------------------------------------


def choose_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generated: Sequence[int],
    eos_id: int,
    generators: Sequence[torch.Generator | None],
    bitmask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token per row of `logits` [rows, vocab] (float32): row i has produced `generated[i]` tokens so far.

    The same rules as the decode step, on host-given settings (for a one-off batch, not for every step).
    """
    summary = choose_summaries(logits, params, generated, eos_id, generators, bitmask)
    return summary[:, TOKEN].long()


def choose_summaries(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generated: Sequence[int],
    eos_id: int,
    generators: Sequence[torch.Generator | None],
    bitmask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`choose_tokens`, returning the whole summary rows (see `summarize`)."""
    device, rows = logits.device, logits.shape[0]
    if bitmask is None:
        bitmask = torch.full((rows, bitmask_words(logits.shape[-1])), -1, dtype=torch.int32, device=device)
    too_early = torch.tensor([n < p.min_new_tokens for n, p in zip(generated, params, strict=True)], device=device)
    scores = blocked_scores(logits, too_early, bitmask.to(device), eos_id)
    summary = summarize(logits, scores.argmax(-1))
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        noise = torch.ones_like(logits)
        for i in sampled:
            draw_noise(noise[i], generators[i])
        chosen = sample(scores, *sampling_tensors(params, device), noise)
        resummarize(summary, logits, chosen, torch.tensor([not p.greedy for p in params], device=device))
    return summary


def sampling_tensors(
    params: Sequence[SamplingParams], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """temperature, top_p (float32) and top_k (long) tensors, one entry per request."""
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)
    return temperature, top_p, top_k

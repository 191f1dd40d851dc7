"""Constrained decoding: a request may carry a `TokenConstraint` that says which tokens it may choose next.

The interface is the one grammar matchers expose (xgrammar's `GrammarMatcher`, llguidance's `LLMatcher`), so
that one of them plugs in directly:

- `fill_next_token_bitmask(bitmask, index)`: write the allowed tokens into row `index` of `bitmask`, an int32
  tensor [rows, ceil(vocab / 32)] on the CPU: bit t of the row (word t // 32, bit t % 32) set means token t is
  allowed. Ids at or above the tokenizer's vocabulary are never allowed, whatever the row says.
- `accept_token(token_id) -> bool`: the token the engine chose (always one the mask allowed); False means the
  constraint refuses it, which fails the request.
- `is_terminated() -> bool`: the constraint is complete; the request then finishes with reason "stop" (no
  <|endoftext|> is appended).
- optionally `masks_tokens` (a bool attribute, True when absent): False says the constraint never restricts the
  choice, it only ends the answer (stop strings); the engine then asks it for no row, and the request decodes
  exactly as a free one does (ids the tokenizer lacks included, as the original model may choose them).

Before every token of a constrained request (the first one after prefill included) the engine asks for its
row, applies it to the logits on the device (disallowed tokens get -inf), chooses, then calls `accept_token`.
A constraint that raises, refuses the chosen token, or allows no token at all fails only its own request. An
unconstrained request pays nothing: its row stays all ones, and no mask is copied to the device while no
constrained request runs.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TokenConstraint(Protocol):
    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None: ...

    def accept_token(self, token_id: int) -> bool: ...

    def is_terminated(self) -> bool: ...


def bitmask_words(vocab_size: int) -> int:
    """How many int32 words a bitmask row has for a vocabulary of `vocab_size` tokens: ceil(vocab / 32)."""
    return -(-vocab_size // 32)


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """An all-ones bitmask [rows, ceil(vocab/32)] (int32) in pinned memory where a GPU exists."""
    mask = torch.full((rows, bitmask_words(vocab_size)), -1, dtype=torch.int32)
    return mask.pin_memory() if torch.cuda.is_available() else mask


def limit_row(bitmask: torch.Tensor, index: int, vocab_limit: int) -> None:
    """Clear the bits of row `index` at and above `vocab_limit` (ids the tokenizer does not have)."""
    word, bit = divmod(vocab_limit, 32)
    row = bitmask[index]
    if word < row.shape[0]:
        if bit:
            keep = (1 << bit) - 1  # the low `bit` bits of the word are real tokens
            row[word] &= keep if keep < 2**31 else keep - 2**32
            word += 1
        row[word:] = 0


def allows_nothing(bitmask: torch.Tensor, index: int) -> bool:
    return not bool(bitmask[index].any())


def set_bits(bitmask: torch.Tensor, index: int, tokens: list[int] | range) -> None:
    """Row `index` allows exactly `tokens` (a helper for hand-written constraints)."""
    row = torch.zeros(bitmask.shape[1], dtype=torch.int64)
    for token in tokens:
        row[token // 32] |= 1 << (token % 32)
    bitmask[index] = torch.where(row >= 2**31, row - 2**32, row).to(torch.int32)

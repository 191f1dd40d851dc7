"""What constrained decoding asks of a request's constraint (a grammar, a JSON schema, a fixed answer).

The engine holds no grammar of its own: a request may carry any object with these three methods. Before each
of the request's tokens (the first one too, right after its prefill) the engine asks the constraint to fill the
request's row of a bitmask, sends every disallowed token's logit to -inf, chooses the token as usual (greedy or
sampled), and tells the constraint which one it chose. Once the constraint says it is terminated the request
finishes with reason "stop" (no <|endoftext|> is appended to its tokens). Log-probabilities reported with the
result are always the model's own (before any masking), so a forced token still shows how likely it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import torch


def bitmask_words(vocab_size: int) -> int:
    """int32 words per bitmask row: one bit per token id."""
    return (vocab_size + 31) // 32


@runtime_checkable
class TokenConstraint(Protocol):
    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        """Write the allowed next tokens into row `index` of `bitmask` (int32 [rows, ceil(vocab/32)], on the CPU):
        bit t (word t // 32, bit t % 32) set means token t is allowed."""

    def accept_token(self, token_id: int) -> bool:
        """The token the engine chose; False if the constraint cannot take it."""

    def is_terminated(self) -> bool:
        """True once nothing more may follow: the request ends here."""

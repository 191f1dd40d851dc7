"""A static KV cache: one preallocated row of keys and values per decode slot, for every decoder layer.

A slot holds one sequence from position 0 (no padding), so a token's cache index is its rotary position and a
sequence never moves while it decodes. The tensors are allocated once and never resized, which is what lets
the decode step be captured whole by `torch.compile` (and replayed as a CUDA graph): their addresses are
marked static, and the step writes into them in place.

Per-slot state that the decode step reads as data (never as Python numbers, which would be baked into a
compiled graph) lives here too: the next input token, its position, the slot's rotary frequencies (from the
NTK alpha chosen at its prefill) and the trained context length that logn scaling compares against.
"""

from __future__ import annotations

import torch

from monkey_cli.model.configuration import MonkeyConfig
from monkey_cli.model.memory import KV_LENGTH_BLOCK as LENGTH_BLOCK  # the memory plan counts the same blocks


def round_up_length(length: int) -> int:
    return -(-length // LENGTH_BLOCK) * LENGTH_BLOCK


class SlotCache:
    """Keys and values [slots, heads, max_length, head_dim] per layer, plus per-slot decode inputs."""

    def __init__(
        self, config: MonkeyConfig, slots: int, max_length: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        self.slots = slots
        self.max_length = max_length
        shape = (slots, config.num_attention_heads, max_length, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)  # the token each slot feeds next
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)  # where that token goes
        self.inv_freq = torch.zeros(slots, config.head_dim // 2, dtype=torch.float32, device=device)
        self.trained_length = torch.full((slots,), float(config.seq_length), dtype=torch.float64, device=device)
        for tensor in (*self.keys, *self.values, self.tokens, self.positions, self.inv_freq, self.trained_length):
            # A fixed address: the compiled step may mutate these in place, and CUDA graphs need not copy them.
            torch._dynamo.mark_static_address(tensor)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def fits(self, slots: int, length: int, dtype: torch.dtype) -> bool:
        return slots <= self.slots and length <= self.max_length and self.keys[0].dtype == dtype

    def writer(self, slot: int, start: int) -> SlotWriter:
        """A Cache for a prefill that writes slot `slot` from position `start` on (after a copied prefix)."""
        return SlotWriter(self, slot, start)

    def load_prefix(self, slot: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Copy a computed prefix ([1, heads, length, head_dim] per layer) into the start of `slot`."""
        length = keys[0].shape[2]
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            self.keys[layer][slot, :, :length].copy_(k[0])
            self.values[layer][slot, :, :length].copy_(v[0])

    def decode_view(self, batch: int, positions: torch.Tensor) -> DecodeView:
        """A Cache for one decode step over slots [0, batch): each writes its token at its own position."""
        return DecodeView(self, batch, positions)


class SlotWriter:
    """The part of transformers' Cache interface that `MonkeyModel.forward` uses, writing into one slot.

    `update` stores the new keys/values after what the slot already holds and returns everything the
    prompt attends to; `get_seq_length` says how much is already there (0: a fresh prefill).
    """

    def __init__(self, cache: SlotCache, slot: int, start: int) -> None:
        self.cache, self.slot, self.start = cache, slot, start

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        # key, value: [1, heads, seq, head_dim]
        end = self.start + key.shape[2]
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        keys[self.slot, :, self.start : end].copy_(key[0])
        values[self.slot, :, self.start : end].copy_(value[0])
        if self.start == 0:
            return key, value
        return keys[self.slot : self.slot + 1, :, :end], values[self.slot : self.slot + 1, :, :end]


class DecodeView:
    """Cache interface for the static decode step: one new token per slot, written at that slot's position."""

    def __init__(self, cache: SlotCache, batch: int, positions: torch.Tensor) -> None:
        self.cache, self.batch, self.positions = cache, batch, positions
        self.rows = torch.arange(batch, device=positions.device)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        # key, value: [batch, heads, 1, head_dim] -> the whole (masked) cache rows [batch, heads, max_length, d]
        keys = self.cache.keys[layer_idx][: self.batch]
        values = self.cache.values[layer_idx][: self.batch]
        keys[self.rows, :, self.positions] = key[:, :, 0]
        values[self.rows, :, self.positions] = value[:, :, 0]
        return keys, values

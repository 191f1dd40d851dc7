"""A static KV cache: one preallocated row of keys and values per decode slot, for every decoder layer.

A slot holds one sequence from position 0 (no padding), so a token's cache index is its rotary position and a
sequence never moves while it decodes (except when the scheduler moves a whole slot down to keep the busy slots
dense, `move_slot`). The tensors are allocated once and never resized, which is what lets the decode step be
captured whole by `torch.compile` (and replayed as a CUDA graph): their addresses are marked static, and the
step writes into them in place, on the whole tensor (`index_put_` at each slot's row and position), never into
a slice of it, which inductor would copy back whole.

Per-slot state that the decode step reads and advances as data (never as Python numbers, which would be baked
into a compiled graph) lives here too: the next input token, its position, whether the slot is busy, the slot's
rotary frequencies (from the NTK alpha chosen at its prefill), the trained context length that logn scaling
compares against, how many tokens it has chosen and must choose before <|endoftext|> may end it, and the token
mask a constrained request allows (a bitmask, all ones for everyone else).
"""

from __future__ import annotations

import torch

from monkey_cli.engine.constraints import bitmask_words
from monkey_cli.model.configuration import MonkeyConfig
from monkey_cli.model.memory import KV_LENGTH_BLOCK as LENGTH_BLOCK  # the memory plan counts the same blocks

# Attention reads only the live part of the cache, rounded up to one of these lengths (a bounded set of shapes
# for CUDA graphs): whole blocks of 256 up to 2048 positions (where a page's prompt and answer mostly end), then
# whole blocks of 1024.
FINE_LENGTHS_UP_TO = 2048
COARSE_LENGTH_BLOCK = 1024


def round_up_length(length: int) -> int:
    return -(-length // LENGTH_BLOCK) * LENGTH_BLOCK


def length_buckets(max_length: int) -> list[int]:
    """The key lengths decode attention is run at, for a cache of `max_length` positions (the last is it)."""
    sizes = list(range(LENGTH_BLOCK, min(max_length, FINE_LENGTHS_UP_TO) + 1, LENGTH_BLOCK))
    sizes += range(FINE_LENGTHS_UP_TO + COARSE_LENGTH_BLOCK, max_length + 1, COARSE_LENGTH_BLOCK)
    return sorted({size for size in sizes if size < max_length} | {max_length})


def length_bucket(needed: int, max_length: int) -> int:
    """The smallest bucket that holds `needed` key positions."""
    return next(size for size in length_buckets(max_length) if size >= needed)


class SlotCache:
    """Keys and values [slots, heads, max_length, head_dim] per layer, plus per-slot decode state."""

    def __init__(
        self, config: MonkeyConfig, slots: int, max_length: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        self.slots = slots
        self.max_length = max_length
        self.vocab_size = config.vocab_size
        # One spare position past `max_length`, never written or attended: the live part that attention reads is
        # then never the whole tensor, whose contiguity would make a symbolic length specialise to the cache's.
        shape = (slots, config.num_attention_heads, max_length + 1, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)  # the token each slot feeds next
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)  # where that token goes
        self.live = torch.zeros(slots, dtype=torch.bool, device=device)  # idle slots do not advance
        self.inv_freq = torch.zeros(slots, config.head_dim // 2, dtype=torch.float32, device=device)
        self.trained_length = torch.full((slots,), float(config.seq_length), dtype=torch.float64, device=device)
        self.generated = torch.zeros(slots, dtype=torch.long, device=device)  # tokens chosen so far
        self.min_new = torch.zeros(slots, dtype=torch.long, device=device)  # <|endoftext|> forbidden before this
        # bit t of row s set: slot s may choose token t (all ones unless a constraint says otherwise)
        self.bitmask = torch.full((slots, bitmask_words(config.vocab_size)), -1, dtype=torch.int32, device=device)
        # How a sampling slot draws (read by the sampler after the step, never by the compiled graph).
        self.sampled = torch.zeros(slots, dtype=torch.bool, device=device)
        self.temperature = torch.ones(slots, dtype=torch.float32, device=device)
        self.top_p = torch.ones(slots, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(slots, dtype=torch.long, device=device)
        self.noise = torch.ones(slots, config.vocab_size, dtype=torch.float32, device=device)  # Exp(1) draws
        self.rows = torch.arange(slots, device=device)
        self._state = (self.tokens, self.positions, self.live, self.inv_freq, self.trained_length, self.generated,
                       self.min_new, self.bitmask, self.sampled, self.temperature, self.top_p, self.top_k)  # fmt: skip
        for tensor in (*self.keys, *self.values, *self._state, self.rows):
            # A fixed address: the compiled step mutates these in place, and CUDA graphs need not copy them.
            torch._dynamo.mark_static_address(tensor)

    @property
    def nbytes(self) -> int:
        """The bytes of the keys and values (the spare position included)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def fits(self, slots: int, length: int, dtype: torch.dtype) -> bool:
        return slots <= self.slots and length <= self.max_length and self.keys[0].dtype == dtype

    def writer(self, slot: int, start: int) -> SlotWriter:
        """A Cache for a prefill that writes slot `slot` from position `start` on (after a copied prefix)."""
        return SlotWriter(self, slot, start)

    def batch_writer(self, slots: list[int], lengths: list[int], start: int = 0) -> BatchWriter:
        """A Cache for one right-padded prefill of several prompts, prompt i into slot `slots[i]` from `start`."""
        return BatchWriter(self, slots, lengths, start)

    def load_prefix(self, slot: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Copy a computed prefix ([1, heads, length, head_dim] per layer) into the start of `slot`."""
        length = keys[0].shape[2]
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            self.keys[layer][slot, :, :length].copy_(k[0])
            self.values[layer][slot, :, :length].copy_(v[0])

    def move_slot(self, source: int, target: int, length: int) -> None:
        """Move the sequence of slot `source` (its first `length` positions and its state) into slot `target`."""
        for layer in range(len(self.keys)):
            self.keys[layer][target, :, :length].copy_(self.keys[layer][source, :, :length])
            self.values[layer][target, :, :length].copy_(self.values[layer][source, :, :length])
        for tensor in self._state:
            tensor[target] = tensor[source]

    def reset_slot(self, slot: int) -> None:
        """An idle slot: it writes harmlessly at its position 0 when a bucket includes it, and never advances."""
        self.live[slot] = False
        self.positions[slot] = 0
        self.generated[slot] = 0
        self.min_new[slot] = 0
        self.bitmask[slot] = -1
        self.sampled[slot] = False

    def decode_view(self, batch: int, positions: torch.Tensor, length: int) -> DecodeView:
        """A Cache for one decode step over slots [0, batch): each writes its token at its own position and
        attends to the first `length` positions of its row."""
        return DecodeView(self, batch, positions, length)


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


class BatchWriter:
    """Cache interface for one prefill of several right-padded prompts: prompt i (its first `lengths[i]`
    positions, the rest is padding) goes into slot `slots[i]` from position `start`.

    From 0 it returns the new keys and values themselves. After a prefix already in each slot (`start` > 0) it
    writes the whole padded block into every slot (the padding lands past the prompt, where decoding writes over
    it and never looks before) and returns the slots' rows up to the end of the block: a view when the slots are
    consecutive (they are after the busy ones), so the prefixes are read in place, not copied."""

    def __init__(self, cache: SlotCache, slots: list[int], lengths: list[int], start: int = 0) -> None:
        self.cache, self.slots, self.lengths, self.start = cache, slots, lengths, start
        consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
        self._rows = slice(slots[0], slots[0] + len(slots)) if consecutive else torch.tensor(slots, device=cache.device)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        # key, value: [prompts, heads, longest, head_dim]
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        if self.start == 0:
            for row, (slot, length) in enumerate(zip(self.slots, self.lengths, strict=True)):
                keys[slot, :, :length].copy_(key[row, :, :length])
                values[slot, :, :length].copy_(value[row, :, :length])
            return key, value
        end = self.start + key.shape[2]
        for row, slot in enumerate(self.slots):
            keys[slot, :, self.start : end].copy_(key[row])
            values[slot, :, self.start : end].copy_(value[row])
        return keys[self._rows, :, :end], values[self._rows, :, :end]


class DecodeView:
    """Cache interface for the static decode step: one new token per slot, written at that slot's position."""

    def __init__(self, cache: SlotCache, batch: int, positions: torch.Tensor, length: int) -> None:
        self.cache, self.positions, self.length = cache, positions, length
        self.rows = cache.rows[:batch]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        # key, value: [batch, heads, 1, head_dim] -> the live part of the rows [batch, heads, length, head_dim]
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        # On the whole tensor: a write into a slice of it ([:batch]) makes inductor copy the slice back whole.
        keys[self.rows, :, self.positions] = key[:, :, 0]
        values[self.rows, :, self.positions] = value[:, :, 0]
        batch = self.rows.shape[0]
        return keys[:batch, :, : self.length], values[:batch, :, : self.length]

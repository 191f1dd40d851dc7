"""Batches for training: right-padded token ids (as the original), the answer-only labels, stacked pixels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from monkey_cli.finetune.data import IGNORE_INDEX


@dataclass
class MonkeyCollator:
    """Pads each batch to its longest item with `pad_id` (<|endoftext|>), attention 0 and no loss there.

    Right padding keeps every item's positions as they are alone (positions follow the attention mask),
    so a batch trains exactly like its items one at a time.
    """

    pad_id: int

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            length = len(item["input_ids"])
            input_ids[row, :length] = item["input_ids"]
            labels[row, :length] = item["labels"]
            attention_mask[row, :length] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        }

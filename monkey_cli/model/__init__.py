"""The networks (Monkey and TextMonkey), their tokenizer and image processor, loading and memory plans.

Importing this package installs one logging filter and nothing else (no torch): torchao, which transformers
imports whenever it is installed, logs notes at import time that concern its own build (native kernels for
other GPUs, Triton, how it registers enums with torch.compile), not what a user asked for.
"""

from __future__ import annotations

import logging

# logger -> message fragments dropped from it (a logger's filters see only what is logged to it by name)
_IMPORT_NOTES = {
    "torchao": ("Failed to load", "Skipping import of cpp extensions"),
    "torchao.kernel.intmm": ("Detected no triton",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
}


class _ImportNotes(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(fragment in message for fragment in self.fragments)


for _name, _fragments in _IMPORT_NOTES.items():
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, _ImportNotes) for f in _logger.filters):
        _logger.addFilter(_ImportNotes(_fragments))

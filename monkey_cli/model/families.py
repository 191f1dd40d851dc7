"""The model families monkey-cli runs, by name (no heavy imports: the CLI's options and the prompt table use them).

Monkey (arXiv 2311.06607) and TextMonkey (arXiv 2403.04473) share the checkpoint format, the Qwen-7B decoder and
the tokenizer; they differ in their vision tower (`model.vision`, `model.textmonkey_vision`), their number of
image tokens, and the prompts they were trained on (`monkey_cli.tasks`).
"""

from __future__ import annotations

MONKEY, TEXTMONKEY = "monkey", "textmonkey"
FAMILIES = (MONKEY, TEXTMONKEY)
FAMILY_CHOICES = ("auto", *FAMILIES)  # what --family takes: auto reads the family from the checkpoint's config
DISPLAY_NAMES = {MONKEY: "Monkey", TEXTMONKEY: "TextMonkey"}

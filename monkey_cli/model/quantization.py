"""--quant none|8bit|4bit through transformers' BitsAndBytesConfig.

The decoder's Linear layers are quantized; the vision tower, resampler, embeddings and lm_head stay in the
compute dtype unless `quant_vision` also converts the ViT's Linear layers. Which modules convert is decided
once, in `memory.quantized_modules`, so the memory plan and the loader always agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from monkey_cli.errors import UsageError
from monkey_cli.model.memory import quantized_modules

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from monkey_cli.model.configuration import MonkeyConfig


def linear_module_names(config: MonkeyConfig) -> list[str]:
    """Every nn.Linear of the model built from `config` (on the meta device: no memory)."""
    import torch
    from torch import nn

    from monkey_cli.model.modeling import MonkeyForCausalLM

    with torch.device("meta"):
        model = MonkeyForCausalLM(config)
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def bitsandbytes_config(
    config: MonkeyConfig, quant: str, compute_dtype: torch.dtype, quant_vision: bool = False
) -> Any | None:
    """The BitsAndBytesConfig for `quant`, skipping every Linear that must stay in the compute dtype."""
    if quant == "none":
        if quant_vision:
            raise UsageError("--quant-vision needs --quant 8bit or 4bit")
        return None
    from transformers import BitsAndBytesConfig

    converted = set(quantized_modules(config, quant, quant_vision))
    # Exact names (anchored) so "lm_head" or a vision layer never matches a decoder layer by prefix.
    skip = [f"^{name}$" for name in linear_module_names(config) if name not in converted]
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip,
    )

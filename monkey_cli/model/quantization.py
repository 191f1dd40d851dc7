"""--quant none|8bit|4bit: the quantization config transformers' loader applies while it reads the weights.

- `8bit`: int8 weight-only (torchao's `Int8WeightOnlyConfig`: one int8 per weight, a float32 scale per output
  row; activations stay in the compute dtype). Its matmul is plain tensor code (`x @ w.to(dtype) * scale`), no
  data-dependent shapes, no host syncs: the decode step compiles whole, inductor folds the dequantisation into
  the matmul, and the step is captured as a CUDA graph like the bf16 one. It replaced bitsandbytes' LLM.int8,
  whose outlier handling computes data-dependent shapes and syncs the host about twice per Linear (so it
  cannot be captured) and measured 3x slower than bf16 on an H100, for no better quality (see
  docs/benchmarks.md).
- `4bit`: bitsandbytes NF4 with double quantization, compute in the model's dtype.

The decoder's Linear layers are quantized; the vision tower, resampler, embeddings and lm_head stay in the
compute dtype unless `quant_vision` also converts the ViT's Linear layers. Which modules convert is decided
once, in `memory.quantized_modules`, so the memory plan and the loader always agree.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from monkey_cli.errors import UsageError
from monkey_cli.model.memory import quantized_modules

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from monkey_cli.model.configuration import MonkeyConfig

# At import, torchao logs that optional native kernels (for other GPUs and formats) are missing, none of which
# --quant 8bit uses, and torch's pytree logs a deprecation about how torchao registers an enum.
def linear_module_names(config: MonkeyConfig) -> list[str]:
    """Every nn.Linear of the model built from `config` (on the meta device: no memory)."""
    import torch
    from torch import nn

    from monkey_cli.model.modeling import MonkeyForCausalLM

    with torch.device("meta"):
        model = MonkeyForCausalLM(config)
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def quantization_config(
    config: MonkeyConfig, quant: str, compute_dtype: torch.dtype, quant_vision: bool = False
) -> Any | None:
    """The transformers quantization config for `quant`, skipping every Linear that must stay in the compute
    dtype (None for --quant none)."""
    if quant == "none":
        if quant_vision:
            raise UsageError("--quant-vision needs --quant 8bit or 4bit")
        return None
    converted = set(quantized_modules(config, quant, quant_vision))
    skipped = [name for name in linear_module_names(config) if name not in converted]
    if quant == "8bit":
        return _int8_weight_only_config(skipped)
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        # Exact names (anchored) so "lm_head" or a vision layer never matches a decoder layer by prefix.
        llm_int8_skip_modules=[f"^{name}$" for name in skipped],
    )


def _int8_weight_only_config(skipped: list[str]) -> Any:
    from transformers import TorchAoConfig

    try:
        Int8WeightOnlyConfig = import_torchao().quantization.Int8WeightOnlyConfig
    except ImportError:
        raise UsageError("--quant 8bit needs torchao, which is not installed here: pip install torchao") from None
    # set_inductor_config=False: torchao would otherwise switch on inductor's autotuning for the whole process.
    return TorchAoConfig(Int8WeightOnlyConfig(set_inductor_config=False), modules_to_not_convert=skipped)


def import_torchao() -> Any:
    """torchao (its import-time notes are filtered out: see `monkey_cli.model`)."""
    import torchao
    import torchao.quantization  # noqa: F401

    return torchao


def import_torchao_quietly() -> None:
    """Import torchao now when it is installed (before transformers' quantizer registry does, whatever --quant
    says), so that nothing of it is imported later in the middle of a run."""
    with contextlib.suppress(ImportError):  # no torchao: --quant 8bit says so when asked for
        import_torchao()


def is_int8_weight(weight: Any) -> bool:
    """Whether a parameter holds torchao int8 weight-only data (what --quant 8bit makes of a Linear)."""
    return type(weight).__name__ == "Int8Tensor"

"""The Python API: `from monkey_cli import Monkey`.

    m = Monkey.load("path/to/checkpoint", device="cpu")
    m.ask("invoice.png", "What is the total?")
    m.caption(pil_image)
    m.generate([img1, img2], ["<img></img> What is the title? Answer: ", ...])   # batched

Everything the CLI does goes through this class; it holds the model, the tokenizer and the image processor.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monkey_cli import tasks

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from monkey_cli.model.memory import MemoryPlan
    from monkey_cli.model.modeling import MonkeyForCausalLM
    from monkey_cli.model.processor import MonkeyImageProcessor
    from monkey_cli.model.tokenizer import QWenTokenizer

_IMAGE_SPAN = re.compile(r"<img>.*?</img>", re.DOTALL)
DEFAULT_MAX_NEW_TOKENS = 512


@dataclass
class Monkey:
    """A loaded Monkey model ready to answer questions about images."""

    model: MonkeyForCausalLM
    tokenizer: QWenTokenizer
    processor: MonkeyImageProcessor
    name: str = "monkey"
    quant: str = "none"
    caption_as_question: bool = False
    adapter: str | None = None  # the LoRA adapter folder applied on top of the checkpoint, if any

    @classmethod
    def load(
        cls,
        source: str | Path = tasks.DEFAULT_MODEL,
        *,
        device: str = "auto",
        dtype: str | None = None,
        quant: str | None = None,
        quant_vision: bool = False,
        seq_length: int | None = None,
        adapter: str | Path | None = None,
    ) -> Monkey:
        """Load a checkpoint from a local folder or a Hugging Face hub id (downloaded into the HF cache).

        device: "auto" (the GPU with the most free memory, else CPU), "cpu", "cuda" or "cuda:N".
        dtype: "auto"/None, "bfloat16", "float16" or "float32". quant: None/"auto", "none", "8bit", "4bit".
        adapter: a LoRA adapter folder from `monkey finetune`, applied unmerged (so it works on a quantized base).
        """
        from monkey_cli.model.loading import load_model
        from monkey_cli.model.processor import MonkeyImageProcessor
        from monkey_cli.model.quantization import resolve_quant
        from monkey_cli.model.sources import resolve_device, resolve_source, warn_if_slow
        from monkey_cli.model.tokenizer import QWenTokenizer

        if adapter is not None:  # a bad folder fails now, not after loading the weights
            from monkey_cli.finetune.adapters import check_adapter_dir

            check_adapter_dir(adapter)
        folder = resolve_source(source)
        device = resolve_device(device)
        quant = resolve_quant(quant, device)
        _refuse_if_too_big(folder, device, dtype, quant, quant_vision)
        overrides = {"seq_length": seq_length} if seq_length else None
        model = load_model(
            folder, device=device, dtype=dtype, quant=quant, quant_vision=quant_vision, config_overrides=overrides
        )
        if adapter is not None:
            from monkey_cli.finetune.adapters import apply_adapter

            model = apply_adapter(model, adapter)
        warn_if_slow(device, model.num_parameters())
        config = model.config
        tokenizer = QWenTokenizer.from_dir(folder, image_token_span=config.tokens_per_image)
        card = tasks.KNOWN_MODELS.get(str(source))
        return cls(
            model=model,
            tokenizer=tokenizer,
            processor=MonkeyImageProcessor(config.vision),
            name=str(source),
            quant=quant,
            caption_as_question=card.caption_as_question if card else False,
            adapter=str(adapter) if adapter is not None else None,
        )

    @staticmethod
    def plan(
        source: str | Path = tasks.DEFAULT_MODEL,
        *,
        device: str = "auto",
        dtype: str | None = None,
        quant_vision: bool = False,
        batch_size: int = 1,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> list[MemoryPlan]:
        """Memory estimates for --quant none, 8bit and 4bit on `device`, from the config alone (no weights)."""
        from monkey_cli.model.loading import resolve_dtype
        from monkey_cli.model.memory import device_budget, plan_all
        from monkey_cli.model.sources import peek_config, resolve_device

        device = resolve_device(device)
        config = peek_config(source)
        return plan_all(
            config,
            device_budget(device),
            dtype=resolve_dtype(dtype, device),
            quant_vision=quant_vision,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
        )

    # --- tasks --------------------------------------------------------------------------------------
    def ask(self, image: Any, question: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, **kwargs: Any) -> str:
        """Answer one question about one image."""
        return self.generate([image], [tasks.vqa_prompt(question)], max_new_tokens=max_new_tokens, **kwargs)[0]

    def caption(self, image: Any, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, **kwargs: Any) -> str:
        """A detailed caption, in the form the loaded checkpoint was trained on."""
        prompt = tasks.caption_prompt(self.caption_as_question)
        return self.generate([image], [prompt], max_new_tokens=max_new_tokens, **kwargs)[0]

    def read(self, image: Any, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, **kwargs: Any) -> str:
        """Dense text extraction ("Read all the text in the image.")."""
        return self.generate([image], [tasks.task_prompt("read")], max_new_tokens=max_new_tokens, **kwargs)[0]

    # --- batched generation -------------------------------------------------------------------------
    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """Vision features for images (PIL or paths): [images, views*256, hidden]. Reusable across prompts."""
        import torch

        batch = self.processor(list(images))
        pixel_values = torch.cat([batch.windows, batch.global_view[:, None]], dim=1)
        device = self.model.transformer.visual.conv1.weight.device
        with torch.inference_mode():
            return self.model.encode_images(pixel_values.to(device))

    def generate(
        self,
        images: Sequence[Any] | None,
        prompts: Sequence[str],
        *,
        image_embeds: torch.Tensor | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        **generate_kwargs: Any,
    ) -> list[str]:
        """One answer per (image, prompt), greedy by default; each prompt holds one `<img>...</img>` span.

        Pass `image_embeds` (from `encode_images`, one row per prompt) instead of images to reuse vision
        features, e.g. for several questions about one page. Extra keyword arguments go to transformers'
        `generate()` (do_sample, temperature, streamer, stopping_criteria, ...).
        """
        ids = self.generate_ids(
            images, prompts, image_embeds=image_embeds, max_new_tokens=max_new_tokens, **generate_kwargs
        )
        return [tasks.clean_answer(self.tokenizer.decode(row, skip_special_tokens=True)) for row in ids]

    def generate_ids(
        self,
        images: Sequence[Any] | None,
        prompts: Sequence[str],
        *,
        image_embeds: torch.Tensor | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        **generate_kwargs: Any,
    ) -> list[list[int]]:
        """Like `generate`, but returns the new token ids of each answer (without padding or <|endoftext|>)."""
        import torch

        prompts = [_empty_image_span(p) for p in prompts]
        if image_embeds is None:
            if images is None or len(images) != len(prompts):
                raise ValueError("give one image per prompt")
            image_embeds = self.encode_images(images)
        elif image_embeds.shape[0] != len(prompts):
            raise ValueError("give one row of image_embeds per prompt")
        input_ids, attention_mask = self.tokenizer.batch_encode(prompts)
        device = self.model.transformer.wte.weight.device
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                image_embeds=image_embeds.to(device),
                max_new_tokens=max_new_tokens,
                **generate_kwargs,
            )
        new_tokens = output[:, input_ids.shape[1] :].tolist()
        return [_until_eos(row, self.tokenizer.eod_id) for row in new_tokens]


def _refuse_if_too_big(folder: Path, device: str, dtype: str | None, quant: str, quant_vision: bool) -> None:
    """Fail before loading, with the quant that would fit, when the device cannot hold the model."""
    from monkey_cli.model.configuration import load_config
    from monkey_cli.model.loading import resolve_dtype
    from monkey_cli.model.memory import check_fits, device_budget

    config = load_config(folder)
    check_fits(
        config,
        quant,
        device_budget(device),
        device=device,
        dtype=resolve_dtype(dtype, device),
        quant_vision=quant_vision,
    )


def _empty_image_span(prompt: str) -> str:
    """The text between the tags is only a placeholder: drop it (a long path would overflow the span)."""
    spans = _IMAGE_SPAN.findall(prompt)
    if len(spans) != 1:
        raise ValueError(f"a prompt must hold exactly one <img>...</img> span, found {len(spans)}: {prompt[:60]!r}")
    return _IMAGE_SPAN.sub("<img></img>", prompt)


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens

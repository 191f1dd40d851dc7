"""MonkeyForCausalLM: the ViT (windows + global view) feeding a Qwen decoder, as a transformers model.

Registered locally for model_type "monkey" so transformers' `generate()` (greedy, sampling, streamers,
stopping criteria) works without `trust_remote_code`: no code from a checkpoint is ever executed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from monkey_cli.model import textmonkey_vision, vision
from monkey_cli.model.configuration import MonkeyConfig, VisionConfig
from monkey_cli.model.families import TEXTMONKEY
from monkey_cli.model.qwen import (
    QWenBlock,
    RMSNorm,
    RotaryEmbedding,
    attention_bias,
    logn_scale,
    ntk_alpha,
    positions_from_mask,
)
from monkey_cli.model.textmonkey_vision import TextMonkeyVisionTransformer
from monkey_cli.model.vision import VisionTransformer

_VISION_MODULES = frozenset({vision.__name__, textmonkey_vision.__name__})


def build_vision_tower(vision_config: VisionConfig) -> nn.Module:
    """The vision tower of the checkpoint's family (the decoder is the same for both)."""
    if vision_config.family == TEXTMONKEY:
        return TextMonkeyVisionTransformer(vision_config)
    return VisionTransformer(vision_config)


# Where a Cache remembers the NTK alphas chosen at prefill, so decoding keeps them (as the original does).
_NTK_ALPHAS = "monkey_ntk_alphas"


class MonkeyPreTrainedModel(PreTrainedModel):
    config_class = MonkeyConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _no_split_modules = ["QWenBlock", "VisionBlock", "CrossWindowAttention", "TokenResampler"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True  # QWenBlock is a GradientCheckpointingLayer (used by finetune)
    # Keys the original's .bin checkpoints may carry as buffers; they hold nothing the model needs.
    _keys_to_ignore_on_load_unexpected = [r"attn\.masked_bias", r"attn\.bias$", r"rotary_emb\.inv_freq"]

    def _init_weights(self, module: nn.Module) -> None:
        # Only reached for weights a checkpoint did not provide (or a model built from a config alone).
        if isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif hasattr(module, "reset_parameters") and module.__module__ in _VISION_MODULES:
            module.reset_parameters()  # the vision towers' own modules know the original's init
        else:
            super()._init_weights(module)


class MonkeyModel(MonkeyPreTrainedModel):
    """Embeddings with image features spliced in, then the Qwen blocks (`transformer.*` in the checkpoint)."""

    def __init__(self, config: MonkeyConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(QWenBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.visual = build_vision_tower(config.vision)
        self.rotary = RotaryEmbedding(config.head_dim, config.rotary_emb_base)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[images, views, 3, 448, 448] (windows row-major, then the global view) -> [images, tokens_per_image,
        hidden] (Monkey: 256 per view; TextMonkey: its kept local tokens, then the global view's 256)."""
        return self.visual(pixel_values[:, :-1], pixel_values[:, -1])

    def splice_images(self, input_ids: torch.Tensor, embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Replace the positions between each <img> and </img> with that image's features, in reading order.

        <img> and </img> keep their word embeddings; image k of `image_embeds` fills the k-th span found
        scanning the batch row by row (local windows first, then the global view, as the vision tower orders).
        """
        span = self.config.tokens_per_image
        rows, starts = torch.nonzero(input_ids == self.config.image_start_id, as_tuple=True)
        if len(starts) != image_embeds.shape[0]:
            raise ValueError(f"the prompts hold {len(starts)} <img> spans but {image_embeds.shape[0]} images")
        ends = starts + span + 1
        if (ends >= input_ids.shape[1]).any() or (input_ids[rows, ends] != self.config.image_end_id).any():
            raise ValueError(f"every <img> must be followed by exactly {span} positions and </img>")
        span_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        span_mask[rows[:, None], starts[:, None] + torch.arange(1, span + 1, device=input_ids.device)] = True
        return embeds.masked_scatter(span_mask[..., None], image_embeds.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        ntk_alphas: list[float] | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`ntk_alphas` fixes each sample's NTK alpha (a prefix computed for a longer prompt must be rotated as
        that prompt would be); by default it is chosen from each prompt's length at prefill and kept while
        decoding."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        use_cache = True if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        prefill = past_length == 0

        # Images only matter at prefill; on decode steps the cache already holds them.
        if prefill and (pixel_values is not None or image_embeds is not None):
            if input_ids is None:
                raise ValueError("images need input_ids to find the <img> spans")
            if image_embeds is None:
                image_embeds = self.encode_images(pixel_values)
            inputs_embeds = self.splice_images(input_ids, inputs_embeds, image_embeds)

        if attention_mask is None:
            attention_mask = torch.ones(batch, past_length + seq, dtype=torch.long, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, seq)
        alphas = ntk_alphas if ntk_alphas is not None else self._ntk_alphas(attention_mask, past_key_values, prefill)
        if past_key_values is not None:
            setattr(past_key_values, _NTK_ALPHAS, alphas)
        rotary = self.rotary(position_ids, alphas)
        query_scale = logn_scale(position_ids, self.config.seq_length) if self.config.use_logn_attn else None
        bias = attention_bias(attention_mask, seq, inputs_embeds.dtype)
        hidden_states = self.decode_layers(inputs_embeds, rotary, query_scale, bias, past_key_values)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)

    def decode_layers(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        query_scale: torch.Tensor | None,
        bias: torch.Tensor,
        cache: Cache | None,
    ) -> torch.Tensor:
        """The decoder stack and the final norm: [batch, seq, hidden] -> [batch, seq, hidden].

        Shared by `forward` and the engine's static decode step, so both run the very same blocks.
        """
        for block in self.h:
            hidden_states = block(hidden_states, rotary, query_scale, bias, cache)
        return self.ln_f(hidden_states)

    def ntk_alpha_for(self, prompt_length: int) -> float:
        """The NTK alpha the original picks at prefill for a prompt of `prompt_length` tokens."""
        if not self.config.use_dynamic_ntk:
            return 1.0
        return float(ntk_alpha(prompt_length, self.config.seq_length))

    def _ntk_alphas(self, attention_mask: torch.Tensor, cache: Cache | None, prefill: bool) -> list[float]:
        """Per-sample NTK alpha: chosen from each prompt's real length at prefill, then kept while decoding."""
        if not prefill and cache is not None and hasattr(cache, _NTK_ALPHAS):
            return getattr(cache, _NTK_ALPHAS)
        return [self.ntk_alpha_for(int(n)) for n in attention_mask.sum(-1).tolist()]


class MonkeyForCausalLM(MonkeyPreTrainedModel, GenerationMixin):
    def __init__(self, config: MonkeyConfig) -> None:
        super().__init__(config)
        self.transformer = MonkeyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self.generation_config = default_generation_config(config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision features for a batch of processed images: [images, tokens_per_image, hidden]."""
        return self.transformer.encode_images(pixel_values)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        ntk_alphas: list[float] | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            image_embeds=image_embeds,
            use_cache=use_cache,
            ntk_alphas=ntk_alphas,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states.to(self.lm_head.weight.dtype)).float()
        return CausalLMOutputWithPast(logits=logits, past_key_values=outputs.past_key_values)


def default_generation_config(config: MonkeyConfig) -> GenerationConfig:
    """As every call site of the original: greedy with the KV cache, at least one new token (an answer is
    never empty because <|endoftext|> won the first step), stopping at <|endoftext|> (which also pads)."""
    return GenerationConfig(
        eos_token_id=config.eod_id,
        pad_token_id=config.eod_id,
        do_sample=False,
        num_beams=1,
        min_new_tokens=1,
        use_cache=True,
    )


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM know model_type "monkey" (idempotent)."""
    try:
        AutoConfig.register("monkey", MonkeyConfig)
        AutoModelForCausalLM.register(MonkeyConfig, MonkeyForCausalLM)
    except ValueError:  # already registered
        pass


register()

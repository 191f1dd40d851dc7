"""The Qwen-7B decoder that Monkey's language side is made of.

Parameter names follow the original checkpoint (`transformer.h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2,
mlp.w1, mlp.w2, mlp.c_proj}`) so weights load by name. Behaviour follows the original's inference path:
rotate-half rotary over the whole head, dynamic NTK (alpha chosen from the prompt length at prefill and
kept while decoding), logn query scaling past `seq_length`, RMSNorm in float32.

One deliberate difference: positions come from the attention mask (left padding does not shift them) and
the NTK alpha is chosen per sample from its real length, so a padded batch decodes like single samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer

from monkey_cli.model.configuration import MonkeyConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back before the weight (as the original)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x.type_as(hidden_states) * self.weight


def ntk_alpha(prompt_length: int, seq_length: int) -> float:
    """Dynamic-NTK scaling factor for a prompt of `prompt_length` tokens (1 while it fits `seq_length`)."""
    context_value = math.log(prompt_length / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half rotary embeddings, with a per-sample NTK alpha."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.base = base

    def inv_freq(self, alpha: float, device: torch.device) -> torch.Tensor:
        # Same float32 arithmetic as the original, so cos/sin match bit for bit.
        base = self.base * alpha ** (self.head_dim / (self.head_dim - 2))
        exponents = torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim
        return 1.0 / (base**exponents)

    def forward(self, positions: torch.Tensor, alphas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [batch, seq] -> cos, sin: [batch, 1, seq, head_dim]
        inv_freq = torch.stack([self.inv_freq(alpha, positions.device) for alpha in alphas])  # [b, d/2]
        return rotary_tables(positions, inv_freq)


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [batch, 1, seq, head_dim] for positions [batch, seq] and per-sample inv_freq [batch, head_dim/2]."""
    freqs = positions.float()[:, :, None] * inv_freq[:, None, :]  # [b, s, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys ([batch, heads, seq, head_dim]) in float32, as the original."""
    x_float = x.float()
    return (x_float * cos + rotate_half(x_float) * sin).type_as(x)


def logn_scale(positions: torch.Tensor, seq_length: int | torch.Tensor) -> torch.Tensor:
    """log_{seq_length}(p + 1) for positions past the trained length, else 1: [batch, 1, seq, 1].

    `seq_length` is the config's int, or a per-sample tensor [batch] (the static decode step takes it as data so
    that no Python number is baked into the compiled graph).
    """
    lengths = (positions + 1).double()
    if isinstance(seq_length, torch.Tensor):
        trained = seq_length.double()[:, None]  # [b, 1]
        log_trained = torch.log(trained)
    else:
        trained, log_trained = seq_length, math.log(seq_length)
    scale = torch.where(lengths > trained, torch.log(lengths) / log_trained, torch.ones_like(lengths))
    return scale.float()[:, None, :, None]


class QWenAttention(nn.Module):
    def __init__(self, config: MonkeyConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.hidden_size = config.hidden_size
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        query_scale: torch.Tensor | None,
        attention_bias: torch.Tensor,
        past_key_values: Cache | None,
    ) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        qkv = self.c_attn(hidden_states)  # [b, s, 3 * hidden], split as [q; k; v]
        query, key, value = (
            t.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2) for t in qkv.split(self.hidden_size, -1)
        )
        cos, sin = rotary
        query = apply_rotary(query, cos, sin)
        key = apply_rotary(key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        if query_scale is not None:
            query = query * query_scale.to(query.dtype)
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_bias)
        context = context.transpose(1, 2).reshape(batch, seq, self.hidden_size)
        return self.c_proj(context)


class QWenMLP(nn.Module):
    """SwiGLU with Qwen's naming: c_proj(w1(x) * silu(w2(x))), width intermediate_size // 2."""

    def __init__(self, config: MonkeyConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.ffn_width, bias=False)
        self.w2 = nn.Linear(config.hidden_size, config.ffn_width, bias=False)
        self.c_proj = nn.Linear(config.ffn_width, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(hidden_states) * F.silu(self.w2(hidden_states)))


class QWenBlock(GradientCheckpointingLayer):
    """Pre-norm attention + MLP. Recomputed in the backward pass when gradient checkpointing is on (training)."""

    def __init__(self, config: MonkeyConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        query_scale: torch.Tensor | None,
        attention_bias: torch.Tensor,
        past_key_values: Cache | None,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(
            self.ln_1(hidden_states), rotary, query_scale, attention_bias, past_key_values
        )
        return hidden_states + self.mlp(self.ln_2(hidden_states))


def attention_bias(attention_mask: torch.Tensor, query_length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive causal + padding mask [batch, 1, query, key] in `dtype`, from a 2D mask over all key positions.

    Masked scores get `dtype`'s own finite minimum (as the original does), never -inf, and every query may always
    see its own key: a left-pad row whose every other key is masked can then never become a fully masked row,
    which some low-precision kernels turn into NaN. Real tokens' rows are unchanged (their own key is allowed
    anyway); pad rows only feed pad positions, which no real token attends to.
    """
    key_length = attention_mask.shape[-1]
    past = key_length - query_length
    query_pos = torch.arange(query_length, device=attention_mask.device)[:, None] + past
    key_pos = torch.arange(key_length, device=attention_mask.device)[None, :]
    allowed = (key_pos <= query_pos)[None, None] & attention_mask[:, None, None, :].bool()
    allowed = allowed | (key_pos == query_pos)[None, None]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def decode_bias(positions: torch.Tensor, key_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [batch, 1, 1, key_length] for one new token per sequence in a static cache whose sequence
    b occupies keys [0, positions[b]]: later keys (free space or stale entries) get `dtype`'s finite minimum."""
    key_pos = torch.arange(key_length, device=positions.device)
    allowed = key_pos[None, :] <= positions[:, None]  # key 0 is always allowed: never a fully masked row
    bias = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None, None, :]


def positions_from_mask(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """Token positions counting only attended tokens, for the last `query_length` columns: [batch, query]."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -query_length:]

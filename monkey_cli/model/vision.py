"""Monkey's vision tower: a ViT whose blocks carry one LoRA set per window, then a resampler.

Every page becomes W windows (448px each, row-major) and one global view. Window k runs the ViT with
LoRA set k; the global view runs it with no LoRA. All views of a batch go through the ViT together:
the LoRA deltas are a batched matmul over the views that have an adapter.

Parameter names are the original checkpoint's keys under `transformer.visual.`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from monkey_cli.model.configuration import TOKENS_PER_VIEW, VisionConfig

LAYER_NORM_EPS = 1e-6
RESAMPLER_HEAD_DIM = 128
IN_PROJ_LORA_RANK = 16
OUT_PROJ_LORA_RANK = 16
MLP_LORA_RANK = 32


# ----------------------------------------------------------------------------------------------------
# Positional embeddings
# ----------------------------------------------------------------------------------------------------
def sincos_pos_embed_2d(embed_dim: int, grid_side: int) -> torch.Tensor:
    """Fixed 2D sin-cos embedding [grid_side**2, embed_dim] (MAE style), row-major over the grid.

    The first half of the channels encodes the column, the second half the row; each half is
    [sin(pos * omega), cos(pos * omega)] with omega = 1 / 10000^(i / (embed_dim / 4)). float32.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos positional embedding needs embed_dim divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # [D/4]
    coords = torch.arange(grid_side, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # [S, S] each

    def encode(positions: torch.Tensor) -> torch.Tensor:  # [S*S] -> [S*S, D/2]
        angles = positions.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1)


def interpolate_pos_embed(pos_embed: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Resize a square-grid embedding [L, C] to [num_tokens, C] (bicubic, in float32, as trained)."""
    src_side = math.isqrt(pos_embed.shape[0])
    dst_side = math.isqrt(num_tokens)
    if src_side == dst_side:
        return pos_embed
    grid = pos_embed.float().reshape(1, src_side, src_side, -1).permute(0, 3, 1, 2)  # [1, C, S, S]
    grid = F.interpolate(grid, size=(dst_side, dst_side), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(dst_side * dst_side, -1).to(pos_embed.dtype)


# ----------------------------------------------------------------------------------------------------
# Per-window LoRA
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraRouting:
    """Which views of a batch run an adapter, and which one (views without one get no LoRA at all)."""

    views: torch.Tensor  # [M] int64, positions in the batch of views
    adapters: torch.Tensor  # [M] int64, LoRA set of each of those views

    @classmethod
    def from_index(cls, lora_index: torch.Tensor) -> LoraRouting:
        """`lora_index` [N]: the LoRA set of each view, -1 for none."""
        views = torch.nonzero(lora_index >= 0).flatten()
        return cls(views=views, adapters=lora_index[views])


class LoraFactor(nn.Module):
    """One factor of a low-rank adapter: a bias-free weight [out, in].

    Deliberately not an nn.Linear: the adapters are read directly by a batched matmul, and
    quantization (which swaps nn.Linear modules) must leave them in full precision.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))


class LoraAdapter(nn.Module):
    """`lora_b(lora_a(x)) * lora_scale`: a learned scalar scale, no alpha / r factor."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.lora_scale = nn.Parameter(torch.empty(1))
        self.lora_a = LoraFactor(in_features, rank)
        self.lora_b = LoraFactor(rank, out_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A freshly initialised adapter is a no-op (lora_b = 0), as in the original.
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        nn.init.ones_(self.lora_scale)


class LoraBank(nn.ModuleList):
    """One adapter per window for a single projection; applied to a whole batch of views at once."""

    def __init__(self, count: int, in_features: int, out_features: int, rank: int) -> None:
        super().__init__(LoraAdapter(in_features, out_features, rank) for _ in range(count))

    def add_delta(self, output: torch.Tensor, x: torch.Tensor, routing: LoraRouting) -> torch.Tensor:
        """output [N, L, out] + the routed views' adapter applied to x [N, L, in]."""
        if routing.views.numel() == 0:
            return output
        down = torch.stack([adapter.lora_a.weight for adapter in self])[routing.adapters]  # [M, r, in]
        up = torch.stack([adapter.lora_b.weight for adapter in self])[routing.adapters]  # [M, out, r]
        scale = torch.cat([adapter.lora_scale for adapter in self])[routing.adapters]  # [M]
        routed = x.index_select(0, routing.views)  # [M, L, in]
        delta = torch.bmm(torch.bmm(routed, down.transpose(1, 2)), up.transpose(1, 2))  # [M, L, out]
        # .to: a fine-tuned bank may hold float32 weights while the tower runs in bfloat16 (monkey finetune).
        return output.index_add(0, routing.views, (delta * scale.view(-1, 1, 1)).to(output.dtype))


# ----------------------------------------------------------------------------------------------------
# ViT
# ----------------------------------------------------------------------------------------------------
class VisionAttention(nn.Module):
    """Self-attention whose fused qkv rows are grouped per head as (q_h, k_h, v_h)."""

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        width, windows = vision.width, vision.lora_repeat_num  # one LoRA set per window (none in TextMonkey)
        self.num_heads = vision.heads
        self.head_dim = width // vision.heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.in_proj_lora = LoraBank(windows, width, 3 * width, IN_PROJ_LORA_RANK)
        self.out_proj = nn.Linear(width, width)
        self.out_proj_lora = LoraBank(windows, width, width, OUT_PROJ_LORA_RANK)

    def forward(self, x: torch.Tensor, routing: LoraRouting) -> torch.Tensor:  # [N, L, width]
        views, length, width = x.shape
        qkv = self.in_proj_lora.add_delta(self.in_proj(x), x, routing)  # [N, L, 3*width]
        qkv = qkv.view(views, length, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        query, key, value = qkv.split(self.head_dim, dim=-1)  # [N, heads, L, head_dim] each
        context = F.scaled_dot_product_attention(query, key, value)
        context = context.transpose(1, 2).reshape(views, length, width)
        return self.out_proj_lora.add_delta(self.out_proj(context), context, routing)


class VisionMLP(nn.Module):
    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(vision.width, vision.mlp_width)
        self.act = nn.GELU()  # erf form
        self.c_proj = nn.Linear(vision.mlp_width, vision.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class VisionBlock(nn.Module):
    """Pre-LN block. The MLP's adapter reads the residual stream after attention, not ln_2's output."""

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(vision.width, eps=LAYER_NORM_EPS)
        self.attn = VisionAttention(vision)
        self.ln_2 = nn.LayerNorm(vision.width, eps=LAYER_NORM_EPS)
        self.mlp = VisionMLP(vision)
        self.mlp_lora = LoraBank(vision.lora_repeat_num, vision.width, vision.width, MLP_LORA_RANK)

    def forward(self, x: torch.Tensor, routing: LoraRouting) -> torch.Tensor:  # [N, L, width]
        x = x + self.attn(self.ln_1(x), routing)
        return self.mlp_lora.add_delta(x + self.mlp(self.ln_2(x)), x, routing)


class VisionEncoder(nn.Module):
    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(VisionBlock(vision) for _ in range(vision.layers))

    def forward(self, x: torch.Tensor, routing: LoraRouting) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, routing)
        return x


# ----------------------------------------------------------------------------------------------------
# Resampler
# ----------------------------------------------------------------------------------------------------
class ResamplerAttention(nn.Module):
    """Multi-head cross-attention with nn.MultiheadAttention's parameters ([q; k; v] rows, biases)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.num_heads = embed_dim // RESAMPLER_HEAD_DIM
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [..., L, D] -> [..., heads, L, head_dim]
        return x.unflatten(-1, (self.num_heads, RESAMPLER_HEAD_DIM)).transpose(-3, -2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        # query [Q, D] (shared by every view); key, value [N, L, D] -> [N, Q, D]
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._heads(F.linear(query, w_q, b_q)).expand(key.shape[0], -1, -1, -1)
        k = self._heads(F.linear(key, w_k, b_k))
        v = self._heads(F.linear(value, w_v, b_v))
        context = F.scaled_dot_product_attention(q, k, v)  # [N, heads, Q, head_dim]
        return self.out_proj(context.transpose(1, 2).flatten(2))


class Resampler(nn.Module):
    """256 learned queries (on a 16x16 sin-cos grid) cross-attend to the ViT tokens of one view."""

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        dim = vision.output_dim
        self.query = nn.Parameter(torch.empty(TOKENS_PER_VIEW, dim))
        # Fixed, stored in the checkpoint; kept a parameter so it loads (and casts) like the original.
        self.pos_embed = nn.Parameter(torch.empty(TOKENS_PER_VIEW, dim), requires_grad=False)
        # The original projects only when the widths differ (a key-set difference, not an option).
        self.kv_proj = nn.Linear(vision.width, dim, bias=False) if vision.width != dim else nn.Identity()
        self.attn = ResamplerAttention(dim)
        self.ln_q = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ln_kv = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.query, std=0.02)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[1], math.isqrt(TOKENS_PER_VIEW)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, L, width] -> [N, 256, output_dim]
        kv = self.ln_kv(self.kv_proj(x))
        key_pos = interpolate_pos_embed(self.pos_embed, x.shape[1])  # values get no position
        return self.attn(self.ln_q(self.query) + self.pos_embed, kv + key_pos, kv)


# ----------------------------------------------------------------------------------------------------
# The tower
# ----------------------------------------------------------------------------------------------------
class VisionTransformer(nn.Module):
    """Pixels of windows + global views -> 256 visual tokens per view, in the LLM's width."""

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.config = vision
        width = vision.width
        self.conv1 = nn.Conv2d(3, width, kernel_size=vision.patch_size, stride=vision.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(TOKENS_PER_VIEW, width))  # a 16x16 grid
        self.ln_pre = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.transformer = VisionEncoder(vision)
        self.attn_pool = Resampler(vision)
        self.ln_post = nn.LayerNorm(vision.output_dim, eps=LAYER_NORM_EPS)
        self.proj = nn.Parameter(torch.empty(vision.output_dim, vision.output_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.positional_embedding, std=self.config.width**-0.5)
        nn.init.normal_(self.proj, std=self.config.output_dim**-0.5)

    def forward(self, windows: torch.Tensor, global_view: torch.Tensor) -> torch.Tensor:
        """windows [B, W, 3, 448, 448], global_view [B, 3, 448, 448] -> [B, (W+1)*256, output_dim].

        Per image: the tokens of window 0..W-1 (LoRA k for window k), then those of the global view.
        """
        batch, num_windows = windows.shape[:2]
        if num_windows != self.config.num_windows:
            raise ValueError(f"expected {self.config.num_windows} windows per image, got {num_windows}")
        views = torch.cat([windows, global_view.unsqueeze(1)], dim=1).flatten(0, 1)  # [B*(W+1), 3, 448, 448]
        no_lora = torch.tensor([-1])
        per_image = torch.cat([torch.arange(num_windows), no_lora])  # window k -> LoRA k; global -> none
        features = self.encode_views(views, per_image.repeat(batch))  # [B*(W+1), 256, output_dim]
        return features.reshape(batch, -1, features.shape[-1])

    def encode_views(self, pixels: torch.Tensor, lora_index: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, 448, 448], lora_index [N] (LoRA set per view, -1 = none) -> [N, 256, output_dim]."""
        # conv1 is never quantized, so its dtype is the tower's compute dtype.
        x = self.conv1(pixels.to(device=self.conv1.weight.device, dtype=self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # [N, patches, width]
        x = x + interpolate_pos_embed(self.positional_embedding, x.shape[1])
        routing = LoraRouting.from_index(lora_index.to(x.device))
        x = self.transformer(self.ln_pre(x), routing)
        x = self.ln_post(self.attn_pool(x))
        return x @ self.proj

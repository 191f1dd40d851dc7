"""TextMonkey's vision tower (arXiv 2403.04473): Monkey's ViT with shifted-window attention between its windows,
and a token resampler that keeps the most informative local tokens.

Per page: the 2x2 windows (448px, row-major) and the 448px global view run through the ViT's blocks as in
Monkey (no LoRA in the released model). Before four of the blocks (2, 6, 24, 46) the windows' patch tokens are
put back together into the page's 64x64 grid and pass a Swin-style shifted-window layer, so that information
crosses window borders. After attn_pool / ln_post / proj each window gives 256 tokens (1024 local tokens);
the token resampler keeps the 512 that are least similar to any later token, in reading order, and refines
them by attending to all 1024. The LLM gets those 512 and the global view's 256: 768 image tokens.

Parameter names are the original checkpoint's keys under `transformer.visual.`; `TextMonkeySizes` holds the
sizes the original hard-codes. Numerics follow the original where they decide something: the selection's
cosine scores (a 2e-4 gap can decide a token) are computed the same way, in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from monkey_cli.model.configuration import TOKENS_PER_VIEW, TextMonkeySizes, VisionConfig
from monkey_cli.model.vision import LAYER_NORM_EPS, LoraRouting, Resampler, VisionBlock, interpolate_pos_embed

# The shifted-window layers and the token resampler use nn.LayerNorm's default eps, not the ViT's 1e-6.
TORCH_LAYER_NORM_EPS = 1e-5
MASKED = -100.0  # Swin's additive mask value between tokens of different regions (not -inf)


# ----------------------------------------------------------------------------------------------------
# Shifted-window attention
# ----------------------------------------------------------------------------------------------------
def relative_position_index(window: int) -> torch.Tensor:
    """[window^2, window^2] int64: index into the (2w-1)^2 bias table of each (query, key) pair in a window,
    (row_q - row_k + w - 1) * (2w - 1) + (col_q - col_k + w - 1)."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # [2, N]
    delta = coords[:, :, None] - coords[:, None, :] + (window - 1)  # [2, N, N]
    return delta[0] * (2 * window - 1) + delta[1]


def shifted_window_mask(grid: int, window: int, shift: int) -> torch.Tensor:
    """[windows, window^2, window^2] float32: 0 within a region, -100 across regions, as Swin computes it.

    The regions are laid out on the grid padded up to a multiple of the window (64 -> 72 here): rows and
    columns [0, padded - window), [padded - window, padded - shift), [padded - shift, padded). The original
    rolls the 64x64 grid and then pads, so these regions do not line up with the wrapped-around content;
    reproduced as is.
    """
    padded = math.ceil(grid / window) * window
    bounds = (0, padded - window, padded - shift, padded)
    band = torch.zeros(padded, dtype=torch.long)
    for region, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
        band[start:end] = region
    regions = band[:, None] * 3 + band[None, :]  # [padded, padded]
    per_window = _partition(regions[None, :, :, None], window).flatten(1)  # [windows, N]
    different = per_window[:, None, :] != per_window[:, :, None]
    return torch.zeros(different.shape).masked_fill(different, MASKED)


def _partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * (H/w) * (W/w), w, w, C], windows row-major within each image."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, channels)


def _merge(windows: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """The inverse of `_partition`: [B * windows, w, w, C] -> [B, H, W, C]."""
    window, channels = windows.shape[1], windows.shape[-1]
    x = windows.view(batch, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with Swin's learned relative-position bias."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.head_dim = dim // heads
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Not in the checkpoint (non-persistent): transformers' loader leaves it empty until this runs.
        with torch.no_grad():
            self.relative_position_index.copy_(relative_position_index(self.window))

    def position_bias(self) -> torch.Tensor:
        """[heads, N, N] additive bias of each (query, key) pair."""
        area = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.flatten()]  # [N*N, heads]
        return bias.view(area, area, self.heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x [B*windows, N, dim], mask [windows, N, N] (the same for every image) -> [B*windows, N, dim]
        count, tokens, dim = x.shape
        qkv = self.qkv(x).view(count, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)  # [B*windows, heads, N, head_dim] each
        windows = mask.shape[0]
        bias = self.position_bias()[None, None] + mask[None, :, None]  # [1, windows, heads, N, N]
        bias = bias.expand(count // windows, -1, -1, -1, -1).reshape(count, self.heads, tokens, tokens)
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.to(query.dtype))
        return self.proj(context.transpose(1, 2).reshape(count, tokens, dim))


class ShiftedWindowMLP(nn.Module):
    """`scale * fc2(GELU(fc1(x)))`, hidden -> 2 hidden -> ViT width, no biases."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, out_dim, bias=False)
        self.scale = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # "Zero-initialised shifted window attention": a fresh layer adds nothing to the ViT.
        nn.init.zeros_(self.fc2.weight)
        nn.init.ones_(self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.fc2(self.act(self.fc1(x)))


class ShiftedWindowBlock(nn.Module):
    """Down-projection, shifted-window attention with its residual, then an MLP back to the ViT width (without a
    residual of its own: the caller adds the block's input)."""

    def __init__(self, width: int, dim: int, heads: int, grid: int, sizes: TextMonkeySizes) -> None:
        super().__init__()
        self.grid, self.window, self.shift = grid, sizes.window_size, sizes.shift
        self.downsample = nn.Linear(width, dim, bias=False)
        self.norm1 = nn.LayerNorm(dim, eps=TORCH_LAYER_NORM_EPS)
        self.attn = WindowAttention(dim, heads, sizes.window_size)
        self.norm2 = nn.LayerNorm(dim, eps=TORCH_LAYER_NORM_EPS)
        self.mlp = ShiftedWindowMLP(dim, width)
        self.register_buffer("attn_mask", shifted_window_mask(grid, sizes.window_size, sizes.shift), persistent=False)

    def reset_parameters(self) -> None:
        # Not in the checkpoint (non-persistent): transformers' loader leaves it empty until this runs.
        with torch.no_grad():
            self.attn_mask.copy_(shifted_window_mask(self.grid, self.window, self.shift))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, grid*grid, width] -> [B, grid*grid, width]
        batch = x.shape[0]
        h = self.downsample(x).view(batch, self.grid, self.grid, -1)  # [B, G, G, dim]
        h = h + self._attend(self.norm1(h))
        return self.mlp(self.norm2(h.flatten(1, 2)))

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """Roll by -shift, THEN pad bottom/right to whole windows (zeros: their keys and values are the qkv
        biases, and real tokens attend to them), attend per window, crop, roll back."""
        batch, grid, _, dim = x.shape
        x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        pad = (self.window - grid % self.window) % self.window
        x = F.pad(x, (0, 0, 0, pad, 0, pad))
        padded = grid + pad
        windows = _partition(x, self.window).flatten(1, 2)  # [B*windows, N, dim]
        out = self.attn(windows, self.attn_mask.to(x.dtype))
        x = _merge(out.view(-1, self.window, self.window, dim), batch, padded, padded)[:, :grid, :grid]
        return torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))


class CrossWindowAttention(nn.Module):
    """One shifted-window layer over the page's whole patch grid: x + block(x + position_embedding)."""

    def __init__(self, width: int, dim: int, heads: int, grid: int, sizes: TextMonkeySizes) -> None:
        super().__init__()
        self.position_embedding = nn.Parameter(torch.empty(1, grid * grid, width))
        self.shift_attn = ShiftedWindowBlock(width, dim, heads, grid, sizes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.position_embedding, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, grid*grid, width], tokens row-major over the page
        return x + self.shift_attn(x + self.position_embedding.to(x.dtype))


class TextMonkeyEncoder(nn.Module):
    """The ViT blocks (`resblocks`, Monkey's) with the shifted-window layers (`window_attention`) between them."""

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        sizes = vision.sizes or TextMonkeySizes()
        self.window_layers = sizes.window_layers
        self.grid = vision.grid
        self.patches = vision.patches_per_side
        page_grid = vision.grid[0] * self.patches  # 64 patches per side on the whole page
        self.window_attention = nn.ModuleList(
            CrossWindowAttention(vision.width, dim, heads, page_grid, sizes)
            for dim, heads in zip(sizes.window_widths, sizes.window_heads, strict=True)
        )
        self.resblocks = nn.ModuleList(VisionBlock(vision) for _ in range(vision.layers))

    def forward(self, x: torch.Tensor, routing: LoraRouting, local_views: int) -> torch.Tensor:
        """x [views, L, width] with the pages' windows first (`local_views` of them, each page's row-major),
        then any global views (which no window layer sees)."""
        for index, block in enumerate(self.resblocks):
            if index in self.window_layers:
                layer = self.window_attention[self.window_layers.index(index)]
                local = self._from_page(layer(self._to_page(x[:local_views])))
                x = torch.cat([local, x[local_views:]])
            x = block(x, routing)
        return x

    def _to_page(self, windows: torch.Tensor) -> torch.Tensor:
        """[B*rows*cols, P*P, width] (each window's patches row-major) -> [B, (rows*P) * (cols*P), width]."""
        rows, cols, side = self.grid[0], self.grid[1], self.patches
        x = windows.view(-1, rows, cols, side, side, windows.shape[-1])
        return x.permute(0, 1, 3, 2, 4, 5).reshape(x.shape[0], rows * side * cols * side, -1)

    def _from_page(self, page: torch.Tensor) -> torch.Tensor:
        rows, cols, side = self.grid[0], self.grid[1], self.patches
        x = page.view(-1, rows, side, cols, side, page.shape[-1])
        return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, side * side, page.shape[-1])


# ----------------------------------------------------------------------------------------------------
# Token resampler
# ----------------------------------------------------------------------------------------------------
def selection_scores(features: torch.Tensor) -> torch.Tensor:
    """[B, T, D] -> [B, T]: each token's highest cosine similarity to a LATER token (-1 for the last one),
    computed in float32 as the original's `self_soft_matching` does (it subtracts 2 on and below the diagonal)."""
    unit = features.float()
    unit = unit / unit.norm(dim=-1, keepdim=True)
    similarity = unit @ unit.transpose(-1, -2)  # [B, T, T]
    earlier_or_self = torch.ones(similarity.shape[-2:], dtype=torch.bool, device=features.device).tril()
    return (similarity - 2.0 * earlier_or_self).amax(dim=-1)


def select_tokens(features: torch.Tensor, keep: int) -> torch.Tensor:
    """[B, T, D] -> [B, keep] int64: the `keep` tokens least similar to any later token, in ascending order.

    The original keeps the tail of an unstable descending argsort; a stable sort gives the same set whenever
    no two scores tie at the cut, and the same set on every device when they do (the later token wins).
    """
    order = selection_scores(features).sort(dim=-1, descending=True, stable=True).indices
    return order[:, order.shape[1] - keep :].sort(dim=-1).values


class PerceiverAttention(nn.Module):
    """The kept tokens (latents) attend to all local tokens and to themselves; no biases."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_media = nn.LayerNorm(dim, eps=TORCH_LAYER_NORM_EPS)
        self.norm_latents = nn.LayerNorm(dim, eps=TORCH_LAYER_NORM_EPS)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, heads*d] -> [B, heads, L, d]
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # media [B, T, dim], latents [B, keep, dim] -> [B, keep, dim]
        media, latents = self.norm_media(media), self.norm_latents(latents)
        key, value = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        context = F.scaled_dot_product_attention(
            self._heads(self.to_q(latents)), self._heads(key), self._heads(value)
        )
        return self.to_out(context.transpose(1, 2).flatten(2))


class PerceiverFeedForward(nn.Module):
    """`scale * fc2(GELU(fc1(LayerNorm(x))))`, back to the LLM width, no biases."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=TORCH_LAYER_NORM_EPS)
        self.fc1 = nn.Linear(dim, dim, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim, out_dim, bias=False)
        self.scale = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.fc2.weight)  # as the original: a fresh resampler passes the kept tokens unchanged
        nn.init.ones_(self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.fc2(self.act(self.fc1(self.norm(x))))


class TokenResampler(nn.Module):
    """Keeps `keep` of the local tokens and refines them: kept + FeedForward(attention(all, kept))."""

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        sizes = vision.sizes or TextMonkeySizes()
        self.keep = vision.keep_tokens
        dim = sizes.resampler_width
        self.downsample = nn.Linear(vision.output_dim, dim, bias=False)
        self.layers = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        PerceiverAttention(dim, sizes.resampler_heads, sizes.resampler_head_dim),
                        PerceiverFeedForward(dim, vision.output_dim),
                    ]
                )
            ]
        )

    def forward(self, local: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, keep, D]
        kept_index = select_tokens(local, self.keep)
        kept = local.gather(1, kept_index[..., None].expand(-1, -1, local.shape[-1]))
        media, latents = self.downsample(local), self.downsample(kept)
        for attention, feed_forward in self.layers:
            latents = attention(media, latents)  # replaces the latents: no residual here, as the original
            kept = kept + feed_forward(latents)
        return kept


# ----------------------------------------------------------------------------------------------------
# The tower
# ----------------------------------------------------------------------------------------------------
class TextMonkeyVisionTransformer(nn.Module):
    """Pixels of windows + global views -> 512 kept local tokens and 256 global ones per page, LLM-wide."""

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.config = vision
        width = vision.width
        self.conv1 = nn.Conv2d(3, width, kernel_size=vision.patch_size, stride=vision.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(TOKENS_PER_VIEW, width))  # a 16x16 grid
        self.ln_pre = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.transformer = TextMonkeyEncoder(vision)
        self.attn_pool = Resampler(vision)
        self.ln_post = nn.LayerNorm(vision.output_dim, eps=LAYER_NORM_EPS)
        self.proj = nn.Parameter(torch.empty(vision.output_dim, vision.output_dim))
        self.downresampler = TokenResampler(vision)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.positional_embedding, std=self.config.width**-0.5)
        nn.init.normal_(self.proj, std=self.config.output_dim**-0.5)

    def forward(self, windows: torch.Tensor, global_view: torch.Tensor) -> torch.Tensor:
        """windows [B, W, 3, 448, 448] (row-major), global_view [B, 3, 448, 448] -> [B, keep + 256, output_dim]."""
        local, global_features = self.encode(windows, global_view)
        return torch.cat([self.downresampler(local), global_features], dim=1)

    def encode(self, windows: torch.Tensor, global_view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tower before the token resampler: local features [B, W*256, D] (windows row-major) and the global
        view's [B, 256, D]."""
        batch, num_windows = windows.shape[:2]
        if num_windows != self.config.num_windows:
            raise ValueError(f"expected {self.config.num_windows} windows per image, got {num_windows}")
        local_views = batch * num_windows
        x = self.embed(torch.cat([windows.flatten(0, 1), global_view]))  # [B*W + B, 1024, width]
        routing = LoraRouting.from_index(self._lora_index(batch, num_windows).to(x.device))
        x = self.transformer(x, routing, local_views)
        features = self.ln_post(self.attn_pool(x)) @ self.proj  # [B*W + B, 256, D]
        local = features[:local_views].reshape(batch, num_windows * TOKENS_PER_VIEW, -1)
        return local, features[local_views:]

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, 448, 448] -> ViT input [N, 1024, width]: patches + the (interpolated) position embedding."""
        # conv1 is never quantized, so its dtype is the tower's compute dtype.
        x = self.conv1(pixels.to(device=self.conv1.weight.device, dtype=self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        return self.ln_pre(x + interpolate_pos_embed(self.positional_embedding, x.shape[1]))

    def _lora_index(self, batch: int, num_windows: int) -> torch.Tensor:
        """Window k of every page runs LoRA k when the checkpoint has them (lora_repeat_num 4); the global views
        and a checkpoint without them (the released one) run none."""
        per_window = torch.arange(num_windows) if self.config.lora_repeat_num else torch.full((num_windows,), -1)
        return torch.cat([per_window.repeat(batch), torch.full((batch,), -1)])


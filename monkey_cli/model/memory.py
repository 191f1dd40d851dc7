"""Memory plans: how many bytes Monkey needs for a quantization, dtype and batch, before loading it.

Everything here is arithmetic on a `MonkeyConfig` (no torch at import): the parameter inventory is
derived from the config and matches the real checkpoint's state dict key for key (Monkey's, or TextMonkey's with
its shifted-window layers and token resampler, from `config.family`), the weight bytes follow how torchao
stores int8 weight-only and bitsandbytes NF4 weights, and the activation terms are deliberately
conservative working sets (a plan that says "fits" should not run out of memory halfway through a PDF).
Only `device_budget` touches torch, to ask a CUDA device how much memory is free.

Units: bytes everywhere; `format_bytes` prints decimal gigabytes (1 GB = 10^9 bytes).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monkey_cli.errors import MonkeyError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from monkey_cli.model.configuration import MonkeyConfig

QUANTS = ("none", "8bit", "4bit")  # from the least to the most compressed
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_DTYPE_ALIASES = {
    "bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"
}

# Shapes fixed by the original vision code rather than by config.json (monkey_cli.model.vision agrees).
IN_PROJ_LORA_RANK = 16
OUT_PROJ_LORA_RANK = 16
MLP_LORA_RANK = 32
VIT_POS_EMBED_TOKENS = 256  # a 16x16 table, interpolated to the 32x32 patch grid of a 448px view
RESAMPLER_QUERIES = 256  # attn_pool's queries: the tokens each view gives

# bitsandbytes NF4: 64 weights share one absmax; with double quantisation the absmax values are stored
# as uint8 in blocks of 256 that each keep one float32 scale (plus a float32 offset per tensor).
NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256
NF4_CONSTANT_BYTES = (16 + 256 + 1) * 4  # per tensor: the NF4 code, the nested dynamic code, the offset
INT8_ROW_BYTES = 4 + 1  # torchao Int8Tensor: a float32 scale and an int8 zero point per output row

# The generation engine's KV cache (monkey_cli.engine): one row per decode slot, its length rounded up to whole
# blocks so that a slightly longer prompt does not need a new cache (and a new compiled graph); and the image
# prefixes it keeps for the other questions of a page (each the KV of one prompt up to the end of its image).
KV_LENGTH_BLOCK = 256
KV_SPARE_POSITIONS = 1  # past the last block (see SlotCache: attention's view is never the whole tensor)
KEPT_PREFIXES = 1

# Defaults for a plan when the caller does not know the prompt yet.
DEFAULT_MAX_NEW_TOKENS = 512  # long enough for `read` on a dense page
DEFAULT_TEXT_TOKENS = 64  # the words around the image span in a VQA / caption prompt

# Runtime costs that are not tensors of the model: cuBLAS / bitsandbytes workspaces and allocator slack
# on a GPU, or the Python process, torch and the tokenizer on a CPU; plus a proportional margin because
# the caching allocator rounds and fragments.
RUNTIME_OVERHEAD_BYTES = 512 * 2**20
SAFETY_MARGIN = 0.05

# Components of the parameter inventory (what a quantization can touch is decided per component).
DECODER_LINEARS = "decoder_linears"  # transformer.h.N.{attn.c_attn, attn.c_proj, mlp.w1, mlp.w2, mlp.c_proj}
EMBEDDINGS = "embeddings"  # transformer.wte and lm_head (untied)
DECODER_NORMS = "decoder_norms"  # transformer.h.N.{ln_1, ln_2} and transformer.ln_f
VIT_LINEARS = "vit_linears"  # resblocks.N.{attn.in_proj, attn.out_proj, mlp.c_fc, mlp.c_proj}
VIT_OTHER = "vit_other"  # conv1, positional_embedding, ln_pre, resblocks.N.{ln_1, ln_2, *lora*}
RESAMPLER = "resampler"  # attn_pool.*, ln_post and proj (they turn ViT tokens into LLM tokens)
COMPONENTS = (DECODER_LINEARS, EMBEDDINGS, DECODER_NORMS, VIT_LINEARS, VIT_OTHER, RESAMPLER)


CPU_4BIT_ROW_BLOCK = 32  # bitsandbytes' CPU 4-bit repacking works on blocks of 32 output rows


class MemoryBudgetError(MonkeyError):
    """The model, at the asked quantization and batch size, does not fit in the device's memory."""


@dataclass(frozen=True)
class TensorSpec:
    """One parameter of the checkpoint, with the component it belongs to."""

    name: str
    shape: tuple[int, ...]
    component: str
    linear_in: int | None = None  # in_features when this is the weight of a Linear --quant may convert

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# --- parameter inventory -------------------------------------------------------------------------

# In the names of tensors repeated once per layer (see `parameter_groups`), where the layer number goes.
LAYER = "{layer}"


def parameter_groups(config: MonkeyConfig) -> list[tuple[TensorSpec, int]]:
    """Every distinct parameter once, with how many layers repeat it (names hold LAYER where they differ).

    Plans are computed from these, so their cost does not grow with the layer count of a config.
    """
    v = config.vision
    decoder_layer = f"transformer.h.{LAYER}"
    vision_block = f"transformer.visual.transformer.resblocks.{LAYER}"
    return [
        *((tensor, 1) for tensor in _decoder_ends(config)),
        *((tensor, config.num_hidden_layers) for tensor in _decoder_layer(config, decoder_layer)),
        *((tensor, 1) for tensor in _vision_ends(config)),
        *((tensor, v.layers) for tensor in _vision_block(config, vision_block)),
        *((tensor, 1) for tensor in _textmonkey_parts(config)),
    ]


def parameter_manifest(config: MonkeyConfig) -> list[TensorSpec]:
    """Every parameter of the Monkey checkpoint described by `config`: name, shape and component."""
    manifest = []
    for tensor, count in parameter_groups(config):
        if count == 1 and LAYER not in tensor.name:
            manifest.append(tensor)
        else:
            manifest += [dataclasses.replace(tensor, name=tensor.name.replace(LAYER, str(i))) for i in range(count)]
    return sorted(manifest, key=lambda tensor: _natural_key(tensor.name))


def _natural_key(name: str) -> tuple[Any, ...]:
    return tuple(int(part) if part.isdigit() else part for part in name.split("."))


def _linear(
    name: str, out_features: int, in_features: int, component: str, bias: bool
) -> Iterator[TensorSpec]:
    yield TensorSpec(f"{name}.weight", (out_features, in_features), component, linear_in=in_features)
    if bias:
        yield TensorSpec(f"{name}.bias", (out_features,), component)


def _decoder_ends(config: MonkeyConfig) -> Iterator[TensorSpec]:
    hidden, vocab = config.hidden_size, config.vocab_size
    yield TensorSpec("transformer.wte.weight", (vocab, hidden), EMBEDDINGS)
    yield TensorSpec("transformer.ln_f.weight", (hidden,), DECODER_NORMS)
    # lm_head is a Linear, but stays in the compute dtype under every --quant (as transformers does).
    yield TensorSpec("lm_head.weight", (vocab, hidden), EMBEDDINGS)


def _decoder_layer(config: MonkeyConfig, layer: str) -> Iterator[TensorSpec]:
    hidden, ffn = config.hidden_size, config.ffn_width
    yield TensorSpec(f"{layer}.ln_1.weight", (hidden,), DECODER_NORMS)
    yield from _linear(f"{layer}.attn.c_attn", 3 * hidden, hidden, DECODER_LINEARS, bias=True)
    yield from _linear(f"{layer}.attn.c_proj", hidden, hidden, DECODER_LINEARS, bias=False)
    yield TensorSpec(f"{layer}.ln_2.weight", (hidden,), DECODER_NORMS)
    yield from _linear(f"{layer}.mlp.w1", ffn, hidden, DECODER_LINEARS, bias=False)
    yield from _linear(f"{layer}.mlp.w2", ffn, hidden, DECODER_LINEARS, bias=False)
    yield from _linear(f"{layer}.mlp.c_proj", hidden, ffn, DECODER_LINEARS, bias=False)


def _layer_norm(name: str, width: int, component: str) -> Iterator[TensorSpec]:
    yield TensorSpec(f"{name}.weight", (width,), component)
    yield TensorSpec(f"{name}.bias", (width,), component)


def _lora_bank(name: str, count: int, in_features: int, out_features: int, rank: int) -> Iterator[TensorSpec]:
    for k in range(count):
        yield TensorSpec(f"{name}.{k}.lora_a.weight", (rank, in_features), VIT_OTHER)
        yield TensorSpec(f"{name}.{k}.lora_b.weight", (out_features, rank), VIT_OTHER)
        yield TensorSpec(f"{name}.{k}.lora_scale", (1,), VIT_OTHER)


def _vision_block(config: MonkeyConfig, block: str) -> Iterator[TensorSpec]:
    v = config.vision
    width, mlp_width, windows = v.width, v.mlp_width, v.lora_repeat_num  # LoRA sets: one per window, or none
    yield from _layer_norm(f"{block}.ln_1", width, VIT_OTHER)
    yield from _linear(f"{block}.attn.in_proj", 3 * width, width, VIT_LINEARS, bias=True)
    yield from _lora_bank(f"{block}.attn.in_proj_lora", windows, width, 3 * width, IN_PROJ_LORA_RANK)
    yield from _linear(f"{block}.attn.out_proj", width, width, VIT_LINEARS, bias=True)
    yield from _lora_bank(f"{block}.attn.out_proj_lora", windows, width, width, OUT_PROJ_LORA_RANK)
    yield from _layer_norm(f"{block}.ln_2", width, VIT_OTHER)
    yield from _linear(f"{block}.mlp.c_fc", mlp_width, width, VIT_LINEARS, bias=True)
    yield from _linear(f"{block}.mlp.c_proj", width, mlp_width, VIT_LINEARS, bias=True)
    yield from _lora_bank(f"{block}.mlp_lora", windows, width, width, MLP_LORA_RANK)


def _vision_ends(config: MonkeyConfig) -> Iterator[TensorSpec]:
    v = config.vision
    width, out = v.width, v.output_dim
    queries = RESAMPLER_QUERIES
    root = "transformer.visual"
    yield TensorSpec(f"{root}.conv1.weight", (width, 3, v.patch_size, v.patch_size), VIT_OTHER)
    yield TensorSpec(f"{root}.positional_embedding", (VIT_POS_EMBED_TOKENS, width), VIT_OTHER)
    yield from _layer_norm(f"{root}.ln_pre", width, VIT_OTHER)
    pool = f"{root}.attn_pool"
    yield TensorSpec(f"{pool}.query", (queries, out), RESAMPLER)
    yield TensorSpec(f"{pool}.pos_embed", (queries, out), RESAMPLER)
    yield TensorSpec(f"{pool}.kv_proj.weight", (out, width), RESAMPLER)
    yield TensorSpec(f"{pool}.attn.in_proj_weight", (3 * out, out), RESAMPLER)
    yield TensorSpec(f"{pool}.attn.in_proj_bias", (3 * out,), RESAMPLER)
    yield TensorSpec(f"{pool}.attn.out_proj.weight", (out, out), RESAMPLER)
    yield TensorSpec(f"{pool}.attn.out_proj.bias", (out,), RESAMPLER)
    yield from _layer_norm(f"{pool}.ln_q", out, RESAMPLER)
    yield from _layer_norm(f"{pool}.ln_kv", out, RESAMPLER)
    yield from _layer_norm(f"{root}.ln_post", out, RESAMPLER)
    yield TensorSpec(f"{root}.proj", (out, out), RESAMPLER)


def _textmonkey_parts(config: MonkeyConfig) -> Iterator[TensorSpec]:
    """TextMonkey's shifted-window layers (`window_attention.K`) and token resampler (`downresampler`); nothing
    for Monkey. Both stay in the compute dtype under every --quant (as the resampler does)."""
    v = config.vision
    if v.family != "textmonkey" or v.sizes is None:
        return
    width, out, sizes = v.width, v.output_dim, v.sizes
    page_tokens = (v.grid[0] * v.patches_per_side) * (v.grid[1] * v.patches_per_side)  # 64 x 64
    for k, (dim, heads) in enumerate(zip(sizes.window_widths, sizes.window_heads, strict=True)):
        layer = f"transformer.visual.transformer.window_attention.{k}"
        block = f"{layer}.shift_attn"
        yield TensorSpec(f"{layer}.position_embedding", (1, page_tokens, width), VIT_OTHER)
        yield from _linear(f"{block}.downsample", dim, width, VIT_OTHER, bias=False)
        yield from _layer_norm(f"{block}.norm1", dim, VIT_OTHER)
        table = (2 * sizes.window_size - 1) ** 2
        yield TensorSpec(f"{block}.attn.relative_position_bias_table", (table, heads), VIT_OTHER)
        yield from _linear(f"{block}.attn.qkv", 3 * dim, dim, VIT_OTHER, bias=True)
        yield from _linear(f"{block}.attn.proj", dim, dim, VIT_OTHER, bias=True)
        yield from _layer_norm(f"{block}.norm2", dim, VIT_OTHER)
        yield from _linear(f"{block}.mlp.fc1", 2 * dim, dim, VIT_OTHER, bias=False)
        yield from _linear(f"{block}.mlp.fc2", width, 2 * dim, VIT_OTHER, bias=False)
        yield TensorSpec(f"{block}.mlp.scale", (1,), VIT_OTHER)
    root = "transformer.visual.downresampler"
    dim, inner = sizes.resampler_width, sizes.resampler_heads * sizes.resampler_head_dim
    yield from _linear(f"{root}.downsample", dim, out, RESAMPLER, bias=False)
    yield from _layer_norm(f"{root}.layers.0.0.norm_media", dim, RESAMPLER)
    yield from _layer_norm(f"{root}.layers.0.0.norm_latents", dim, RESAMPLER)
    yield from _linear(f"{root}.layers.0.0.to_q", inner, dim, RESAMPLER, bias=False)
    yield from _linear(f"{root}.layers.0.0.to_kv", 2 * inner, dim, RESAMPLER, bias=False)
    yield from _linear(f"{root}.layers.0.0.to_out", dim, inner, RESAMPLER, bias=False)
    yield from _layer_norm(f"{root}.layers.0.1.norm", dim, RESAMPLER)
    yield from _linear(f"{root}.layers.0.1.fc1", dim, dim, RESAMPLER, bias=False)
    yield from _linear(f"{root}.layers.0.1.fc2", out, dim, RESAMPLER, bias=False)
    yield TensorSpec(f"{root}.layers.0.1.scale", (1,), RESAMPLER)


def parameter_counts(config: MonkeyConfig) -> dict[str, int]:
    """Parameters per component (keys: COMPONENTS), e.g. 9,708,053,824 in all for the released Monkey."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for tensor, count in parameter_groups(config):
        counts[tensor.component] += tensor.numel * count
    return counts


# --- which layers get quantized ------------------------------------------------------------------


def normalize_quant(quant: str) -> str:
    if quant not in QUANTS:
        raise UsageError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    return quant


def normalize_dtype(dtype: Any) -> str:
    """'bfloat16' / 'bf16' / torch.bfloat16 -> 'bfloat16' (the names DTYPE_BYTES knows)."""
    name = str(dtype).removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {str(dtype)!r}")
    return name


def quantizable(in_features: int, quant: str, out_features: int | None = None) -> bool:
    """Whether `quant` can hold a Linear of this shape (bitsandbytes for 4bit, torchao for 8bit).

    bitsandbytes' CPU 4-bit kernels need in_features to be a multiple of the NF4 block size (64), and
    0.50's CPU weight repacking for eval mode also asserts out_features % 32 == 0 (seen on the tiny ViT's
    64 -> 315 mlp.c_fc). Such layers stay in the compute dtype on every device, so the memory plan and
    the loader always agree; int8 weight-only (one scale per output row) has no such restriction.
    """
    quant = normalize_quant(quant)
    if quant == "none":
        return False
    if quant == "4bit":
        return in_features % NF4_BLOCKSIZE == 0 and (out_features is None or out_features % CPU_4BIT_ROW_BLOCK == 0)
    return True


def _is_quantized(tensor: TensorSpec, quant: str, quant_vision: bool) -> bool:
    if tensor.linear_in is None or quant == "none":
        return False
    if tensor.component == DECODER_LINEARS or (quant_vision and tensor.component == VIT_LINEARS):
        return quantizable(tensor.linear_in, quant, tensor.shape[0])
    return False


def quantized_modules(config: MonkeyConfig, quant: str, quant_vision: bool = False) -> list[str]:
    """Names of the Linear modules that `--quant` converts (everything else stays in the compute dtype).

    The loader turns this into transformers' skip list: every other Linear goes into
    `llm_int8_skip_modules` so that the vision tower, resampler, embeddings and lm_head stay unquantized.
    """
    quant = normalize_quant(quant)
    manifest = parameter_manifest(config)
    return [t.name.removesuffix(".weight") for t in manifest if _is_quantized(t, quant, quant_vision)]


def _quantized_weight_bytes(numel: int, out_features: int, quant: str) -> int:
    if quant == "8bit":
        # torchao int8 weight-only: int8 weights plus, per output row, a float32 scale and an int8 zero point.
        return numel + INT8_ROW_BYTES * out_features
    # NF4 with double quantisation: two weights per byte; one uint8 absmax per 64 weights; one float32
    # scale per 256 absmax values; and the per-tensor code tables and offset.
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCKSIZE) + NF4_CONSTANT_BYTES


# --- the plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes needed to run one configuration; every term is a peak estimate, `total_bytes` their sum."""

    quant: str
    dtype: str
    quant_vision: bool
    batch_size: int
    prompt_tokens: int  # the whole prompt, image span included
    max_new_tokens: int
    quantized_params: int
    unquantized_params: int
    weight_bytes: int  # quantized weights + everything else in the compute dtype
    vision_bytes: int  # ViT + resampler working set over all views of the batch
    decoder_bytes: int  # working set of one decoder layer at prefill
    kv_cache_bytes: int  # keys and values of every layer at the longest sequence
    logits_bytes: int
    quant_workspace_bytes: int  # temporaries of a quantized matmul (the weight dequantized at prefill)
    overhead_bytes: int  # runtime overhead and safety margin
    budget_bytes: int | None = None  # what the device offered, when known

    @property
    def activation_bytes(self) -> int:
        # The vision tower finishes before the decoder's prefill starts: their working sets never
        # coexist. The KV cache and the logits are counted on top (decoding holds both).
        return (
            max(self.vision_bytes, self.decoder_bytes)
            + self.kv_cache_bytes
            + self.logits_bytes
            + self.quant_workspace_bytes
        )

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool | None:
        """True / False against `budget_bytes`; None when the budget is unknown."""
        return None if self.budget_bytes is None else self.total_bytes <= self.budget_bytes

    @property
    def flags(self) -> str:
        """The command-line spelling of this plan's quantization: '--quant 4bit --quant-vision'."""
        return f"--quant {self.quant}" + (" --quant-vision" if self.quant_vision else "")

    @property
    def keywords(self) -> str:
        """The same in `Monkey.load`'s keyword arguments: 'quant="4bit", quant_vision=True'."""
        return f'quant="{self.quant}"' + (", quant_vision=True" if self.quant_vision else "")

    def spelled(self, api: bool) -> str:
        return self.keywords if api else self.flags

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(activation_bytes=self.activation_bytes, total_bytes=self.total_bytes, fits=self.fits)
        return data


def plan(
    config: MonkeyConfig,
    quant: str = "none",
    dtype: Any = "bfloat16",
    *,
    quant_vision: bool = False,
    batch_size: int = 1,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    prompt_tokens: int | None = None,
    budget_bytes: int | None = None,
) -> MemoryPlan:
    """Estimate the peak memory of generating answers for `batch_size` pages at once.

    `prompt_tokens` is the longest prompt of the batch, image span included; by default one image
    (config.tokens_per_image) plus DEFAULT_TEXT_TOKENS of text. `quant_vision` has no effect without a
    quantization.
    """
    quant, dtype = normalize_quant(quant), normalize_dtype(dtype)
    quant_vision = quant_vision and quant != "none"
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must not be negative, got {max_new_tokens}")
    if prompt_tokens is None:
        prompt_tokens = config.tokens_per_image + DEFAULT_TEXT_TOKENS
    width = DTYPE_BYTES[dtype]

    weight_bytes = quantized = unquantized = 0
    for tensor, count in parameter_groups(config):
        if _is_quantized(tensor, quant, quant_vision):
            quantized += tensor.numel * count
            weight_bytes += _quantized_weight_bytes(tensor.numel, tensor.shape[0], quant) * count
        else:
            unquantized += tensor.numel * count
            weight_bytes += tensor.numel * width * count

    # Each slot's row: the sequence rounded up to whole blocks, plus the cache's one spare position.
    tokens = -(-(prompt_tokens + max_new_tokens) // KV_LENGTH_BLOCK) * KV_LENGTH_BLOCK + KV_SPARE_POSITIONS
    vision = _vision_working_set(config, batch_size, width)
    # The engine prefills the prompts it admits together: up to one per decode slot in one padded batch.
    decoder = _decoder_working_set(config, batch_size, prompt_tokens, width)
    # K and V for every layer: every decode slot (batch_size of them) at every position an answer can reach,
    # and the image prefixes kept for the other questions of a page.
    per_position = 2 * config.num_hidden_layers * config.hidden_size * width
    kv_cache = per_position * (batch_size * tokens + KEPT_PREFIXES * prompt_tokens)
    # Per slot and step, float32 rows over the vocabulary: the logits, the masked scores, the sampler's noise
    # draws, and its sorted copy, sort order (int64) and probabilities.
    logits = 7 * batch_size * config.vocab_size * 4
    workspace = _quant_workspace(config, quant, quant_vision, width)
    margin = int(SAFETY_MARGIN * (weight_bytes + max(vision, decoder) + kv_cache + logits + workspace))
    return MemoryPlan(
        quant=quant,
        dtype=dtype,
        quant_vision=quant_vision,
        batch_size=batch_size,
        prompt_tokens=prompt_tokens,
        max_new_tokens=max_new_tokens,
        quantized_params=quantized,
        unquantized_params=unquantized,
        weight_bytes=weight_bytes,
        vision_bytes=vision,
        decoder_bytes=decoder,
        kv_cache_bytes=kv_cache,
        logits_bytes=logits,
        quant_workspace_bytes=workspace,
        overhead_bytes=RUNTIME_OVERHEAD_BYTES + margin,
        budget_bytes=budget_bytes,
    )


def _vision_working_set(config: MonkeyConfig, batch_size: int, width: int) -> int:
    """Peak of the ViT and resampler when all views of the batch (windows + global) run together."""
    v = config.vision
    views = batch_size * v.num_views
    tokens = v.patches_per_side**2  # 1024 patches per 448px view
    # Live tensors per token inside one residual block: the residual stream in and out (2), the
    # LayerNorm output (1), q/k/v (3) and the LoRA delta added to them (3), the attention output (1),
    # and the MLP's hidden layer before and after GELU (2 x mlp_width).
    per_token = 10 * v.width + 2 * v.mlp_width
    # SDPA's fused kernels never build the [tokens, tokens] score matrix, but its math fallback (CPU,
    # some masks and dtypes) does: count one per head as the conservative case.
    scores = v.heads * tokens * tokens
    pixels = 3 * (v.patches_per_side * v.patch_size) ** 2 * 4  # the normalised float32 input view
    vit = views * ((tokens * per_token + scores) * width + pixels)

    # Resampler (cross-attention of 256 queries on one view's tokens): kv_proj output, its LayerNorm,
    # key input with positions, keys and values (5 x output_dim per ViT token); queries, attention
    # output and result (3 x output_dim per query); and the scores.
    queries = RESAMPLER_QUERIES
    heads = v.output_dim // 128
    per_view = (5 * tokens + 3 * queries) * v.output_dim + heads * queries * tokens
    resampler = views * per_view * width
    # The features handed to the decoder (views x 256 tokens x output_dim) outlive both.
    features = views * queries * v.output_dim * width
    return max(vit, resampler, _textmonkey_working_set(config, batch_size, width)) + features


def _textmonkey_working_set(config: MonkeyConfig, batch_size: int, width: int) -> int:
    """TextMonkey's peaks beside the ViT's: a shifted-window layer on the page's whole patch grid, and the token
    resampler (the selection's float32 similarity matrix, the perceiver over all local tokens)."""
    v = config.vision
    if v.family != "textmonkey" or v.sizes is None:
        return 0
    sizes = v.sizes
    page_tokens = v.num_windows * v.patches_per_side**2
    dim, heads = max(sizes.window_widths), max(sizes.window_heads)
    padded = -(-(v.grid[0] * v.patches_per_side) // sizes.window_size) * sizes.window_size
    area = sizes.window_size**2
    windows = (padded // sizes.window_size) ** 2
    # The ViT stream in and out plus the layer's own tensors (down-projection, norms, q/k/v, MLP hidden: ~8 dim),
    # and the scores with their bias and mask for every window and head.
    window_layer = page_tokens * (3 * v.width + 8 * dim) * width + windows * heads * area * area * (width + 4)
    local = v.num_windows * RESAMPLER_QUERIES
    inner = sizes.resampler_heads * sizes.resampler_head_dim
    similarity = 2 * local * local * 4  # the scores in float32, and their masked copy
    perceiver = (local + v.keep_tokens) * (4 * sizes.resampler_width + 2 * inner + v.output_dim) * width
    perceiver += sizes.resampler_heads * v.keep_tokens * (local + v.keep_tokens) * width
    return batch_size * max(window_layer, similarity + perceiver)


def _decoder_working_set(config: MonkeyConfig, batch_size: int, prompt_tokens: int, width: int) -> int:
    """Peak inside one decoder layer during prefill, the longest step (decoding steps are one token)."""
    hidden, ffn = config.hidden_size, config.ffn_width
    tokens = batch_size * prompt_tokens
    # Per token: input embeddings (1), residual stream in and out (2), RMSNorm output (1), q/k/v (3),
    # rotated q and k (2), attention output (1); the MLP's w1, w2 outputs and their product (3 x ffn);
    # plus the float32 copy RMSNorm computes in.
    per_token = (10 * hidden + 3 * ffn) * width + hidden * 4
    # As in the ViT: the math fallback of SDPA materialises [heads, seq, seq] per sequence.
    scores = batch_size * config.num_attention_heads * prompt_tokens * prompt_tokens * width
    return tokens * per_token + scores


def _quant_workspace(
    config: MonkeyConfig, quant: str, quant_vision: bool, width: int
) -> int:
    """Temporaries of the largest quantized matmul at prefill (zero without quantization)."""
    largest = 0
    for tensor, _count in parameter_groups(config):
        if not _is_quantized(tensor, quant, quant_vision):
            continue
        # NF4 matmuls on more than one row, and int8 weight-only ones outside a compiled graph (the prefill),
        # convert the whole weight to the compute dtype first.
        largest = max(largest, tensor.numel * width)
    return largest


def plan_all(
    config: MonkeyConfig, device_budget_bytes: int | None = None, **options: Any
) -> list[MemoryPlan]:
    """One plan per --quant (none, 8bit, 4bit) with the same options, each judged against the budget."""
    return [plan(config, quant, budget_bytes=device_budget_bytes, **options) for quant in QUANTS]


def check_fits(
    config: MonkeyConfig,
    quant: str,
    budget_bytes: int | None,
    *,
    device: str = "the device",
    **options: Any,
) -> MemoryPlan:
    """The plan for `quant`, or MemoryBudgetError naming what is needed, what is free, and what would fit.

    An unknown budget (None) is not checked. `options` are plan()'s keyword arguments.
    """
    wanted = plan(config, quant, budget_bytes=budget_bytes, **options)
    if wanted.fits is not False:
        return wanted
    assert budget_bytes is not None
    free = "available" if device.split(":")[0] == "cpu" else "free"
    needs = (
        f"needs {format_bytes(wanted.total_bytes)} with {_describe(wanted)} "
        f"but {device} has {format_bytes(budget_bytes)} {free}"
    )
    alternative = _first_fitting(config, wanted, budget_bytes, options)
    if alternative is not None:
        raise MemoryBudgetError(
            f"{needs}; {_describe(alternative)} needs {format_bytes(alternative.total_bytes)} and fits"
        )
    smallest = plan(config, QUANTS[-1], **{**options, "quant_vision": True, "batch_size": 1})
    raise MemoryBudgetError(
        f"{needs}; nothing fits: even {_describe(smallest)} needs {format_bytes(smallest.total_bytes)}"
    )


def _describe(p: MemoryPlan) -> str:
    return p.flags + (f" --batch-size {p.batch_size}" if p.batch_size > 1 else "")


def _first_fitting(
    config: MonkeyConfig, wanted: MemoryPlan, budget: int, options: dict[str, Any]
) -> MemoryPlan | None:
    """The least degrading change that fits: a stronger quantization at the same batch size first
    (quality for memory), then also the vision tower, then fewer pages per batch, then both."""
    lighter = QUANTS[QUANTS.index(wanted.quant) + 1 :]
    candidates: list[tuple[str, bool, int]] = [(q, wanted.quant_vision, wanted.batch_size) for q in lighter]
    if not wanted.quant_vision:
        candidates += [(q, True, wanted.batch_size) for q in QUANTS[1:] if q == wanted.quant or q in lighter]
    smaller_batches = range(wanted.batch_size - 1, 0, -1)
    candidates += [(wanted.quant, wanted.quant_vision, batch) for batch in smaller_batches]
    candidates += [(QUANTS[-1], True, batch) for batch in smaller_batches]  # the lightest model, fewer pages
    for quant, quant_vision, batch in candidates:
        changed = {**options, "quant_vision": quant_vision, "batch_size": batch}
        candidate = plan(config, quant, budget_bytes=budget, **changed)
        if candidate.fits:
            return candidate
    return None


# --- choosing what to run ------------------------------------------------------------------------

# `--quant auto` tries these from the most faithful to the most compressed: the checkpoint's own precision,
# then the decoder in 8 and 4 bits, and quantizing the vision tower too only as the last resort. int8
# weight-only comes before NF4 on quality (prefill logits on the tiny checkpoints: 1 - cosine to float32 of
# 9e-6 and 6e-5 against NF4's 1.5e-3 and 1.2e-2, bf16 itself 3e-5 and 9e-5) and on speed (both read fewer
# bytes than bf16 per step; int8 dequantises with one multiply, inside the compiled step, where NF4 needs a
# table lookup per weight and bitsandbytes' kernels): docs/benchmarks.md.
AUTO_OPTIONS: tuple[tuple[str, bool], ...] = (
    ("none", False),
    ("8bit", False),
    ("4bit", False),
    ("8bit", True),
    ("4bit", True),
)


@dataclass(frozen=True)
class Choice:
    """What to load: the plan (quant, quant_vision, batch size) and, when it differs from what was asked
    (an automatic quant, a lowered batch size), one line saying what and why: `note` in the command line's
    terms (`--quant auto: using --quant 8bit ...`), `api_note` in the library's (`quant="auto": using
    quant="8bit" ...`, what `Monkey.load` logs)."""

    plan: MemoryPlan
    note: str | None = None
    api_note: str | None = None

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size


def choose(
    config: MonkeyConfig,
    budget_bytes: int | None,
    *,
    quant: str = "auto",
    quant_vision: bool = False,
    batch_size: int = 1,
    device: str = "the device",
    available: Sequence[str] = QUANTS,
    **options: Any,
) -> Choice:
    """The quantization and batch size to run with, from the memory plan.

    `quant` "auto" takes the first of AUTO_OPTIONS (among the `available` quantizations; only those with
    the vision tower quantized when `quant_vision` asks for it) that fits the device at batch size 1;
    an explicit quant is checked as given (MemoryBudgetError naming what would fit). Either way the batch
    size is then lowered to the largest that fits. An unknown budget is not checked. `options` are plan()'s.
    """
    if quant != "auto":
        wanted = check_fits(
            config, quant, budget_bytes, device=device, quant_vision=quant_vision, batch_size=1, **options
        )
        return _with_batch(config, wanted, batch_size, budget_bytes, device, options, notes=None)
    candidates = [(q, qv) for q, qv in AUTO_OPTIONS if q in available and (qv or not quant_vision)]
    if not candidates:
        raise UsageError("--quant-vision needs --quant 8bit or 4bit, and those need torchao or bitsandbytes")
    plans = [plan(config, q, quant_vision=qv, budget_bytes=budget_bytes, **options) for q, qv in candidates]
    chosen = next((p for p in plans if p.fits is not False), None)
    if chosen is None:
        raise MemoryBudgetError(_nothing_fits(plans[-1], budget_bytes, device, available))
    skipped = plans[: plans.index(chosen)]

    def auto_note(api: bool) -> str:
        auto = 'quant="auto"' if api else "--quant auto"
        note = f"{auto}: using {chosen.spelled(api)} in {chosen.dtype}"
        if budget_bytes is None:
            return note + f"; the free memory of {device} is unknown"
        if skipped:
            return note + (
                f": {skipped[0].spelled(api)} would need {format_bytes(skipped[0].total_bytes)} and {device} has "
                f"{format_bytes(budget_bytes)} {_free_word(device)} (this needs {format_bytes(chosen.total_bytes)})"
            )
        return note + (
            f": it needs {format_bytes(chosen.total_bytes)} and {device} has "
            f"{format_bytes(budget_bytes)} {_free_word(device)}"
        )

    notes = (auto_note(api=False), auto_note(api=True))
    return _with_batch(config, chosen, batch_size, budget_bytes, device, options, notes=notes)


def _with_batch(
    config: MonkeyConfig,
    fitting: MemoryPlan,
    batch_size: int,
    budget: int | None,
    device: str,
    options: dict[str, Any],
    notes: tuple[str, str] | None,
) -> Choice:
    """`fitting` (a batch-size-1 plan that fits) at the largest batch size up to `batch_size` that fits;
    `notes` says so far what was chosen (command-line and library terms), the lowered batch size is added."""

    def at(batch: int) -> MemoryPlan:
        changed = {**options, "quant_vision": fitting.quant_vision, "batch_size": batch}
        return plan(config, fitting.quant, budget_bytes=budget, **changed)

    best = at(batch_size)
    if best.fits is False:
        low, high = 1, batch_size  # at(low) fits, at(high) does not: the plan grows with the batch
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if at(middle).fits else (low, middle)
        best = at(low)

        def lowered(api: bool) -> str:
            return (
                f"{'batch_size=' if api else '--batch-size '}{batch_size} lowered to {low}, what fits with "
                f"{fitting.spelled(api)} in the {format_bytes(budget)} {_free_word(device)} on {device}"
            )

        cli, api = notes or ("", "")
        notes = (_joined(cli, lowered(False)), _joined(api, lowered(True)))
    return Choice(best, *(notes or (None, None)))


def _joined(before: str, after: str) -> str:
    return f"{before}; {after}" if before else after


def _free_word(device: str) -> str:
    return "available" if device.split(":")[0] == "cpu" else "free"


def _nothing_fits(smallest: MemoryPlan, budget: int | None, device: str, available: Sequence[str]) -> str:
    message = (
        f"the model does not fit: even {smallest.flags} needs {format_bytes(smallest.total_bytes)} "
        f"but {device} has {format_bytes(budget)} {_free_word(device)}"
    )
    if set(QUANTS) - set(available):
        message += "; --quant 8bit needs torchao and 4bit bitsandbytes (pip install torchao bitsandbytes)"
    return message


# --- device memory -------------------------------------------------------------------------------


def device_budget(device: str) -> int | None:
    """Bytes the device can give a new model now: free CUDA memory, or available RAM for 'cpu'.

    None when it cannot be known (no such device, another backend, an unreadable /proc).
    """
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return available_ram()
    if kind != "cuda":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        ordinal = int(index) if index else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(ordinal)
    except (RuntimeError, ValueError, AssertionError):
        return None
    return int(free)


def available_ram() -> int | None:
    """RAM a new process can use: MemAvailable, capped by this container's cgroup limit if any."""
    available = _meminfo_bytes("MemAvailable")
    if available is None:
        try:  # psutil is not a dependency; use it where someone installed it (macOS, Windows)
            import psutil

            available = int(psutil.virtual_memory().available)
        except ImportError:
            available = None
    cgroup = _cgroup_headroom()
    if cgroup is not None:
        available = cgroup if available is None else min(available, cgroup)
    return available


def total_ram() -> int | None:
    return _meminfo_bytes("MemTotal")


def _meminfo_bytes(field: str, meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        lines = meminfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        if name == field:
            number, *unit = value.split()
            return int(number) * (1024 if unit == ["kB"] else 1)
    return None


def _cgroup_headroom(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """cgroup v2 memory.max - memory.current of this process's group; None without a limit."""
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


# --- formatting ----------------------------------------------------------------------------------


def format_bytes(n: int | None) -> str:
    """Decimal gigabytes with one decimal: 21_300_000_000 -> '21.3 GB'; None -> 'unknown'."""
    if n is None:
        return "unknown"
    return f"{n / 1e9:.1f} GB"

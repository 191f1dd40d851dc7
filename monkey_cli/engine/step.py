"""The decode step: one new token for every slot of a `SlotCache`, eager or captured whole by torch.compile.

Everything the step depends on is a tensor read from the cache (tokens, positions, per-slot rotary
frequencies, the trained length for logn scaling), so one compiled graph serves every sequence: nothing in it
is a Python number that would be baked in, nothing syncs the host, and the KV tensors are written in place at
fixed addresses. Batch sizes are bucketed (1, 2, 4, ... up to the slot count) so that a batch of 3 replays the
graph of 4. On CUDA the batch dimension is compiled as a symbolic size (one compile for every bucket of two or
more, one specialised for a single sequence; one per bucket where a kernel library branches on the batch size)
and each bucket is captured once as a CUDA graph ("reduce-overhead"), one launch per step instead of hundreds.
On the CPU each bucket is compiled as a static graph of its own: inductor's C++ kernels for a symbolic batch
ran 2.7 times slower than static ones (batch 8 on the 32-layer stand-in of benchmarks/engine.py: 211 ms
against 77 ms, eager 97 ms).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from monkey_cli.engine.cache import SlotCache
from monkey_cli.model.qwen import decode_bias, logn_scale, rotary_tables

# Every engine (cache, model) compiles its own graphs of the same function; dynamo's default limit of 8 graphs
# per function would silently fall back to eager past it.
RECOMPILE_LIMIT = 64


def buckets(slots: int) -> list[int]:
    """Batch sizes the step is compiled for: powers of two below `slots`, then `slots` itself."""
    sizes, size = [], 1
    while size < slots:
        sizes.append(size)
        size *= 2
    return [*sizes, slots]


def bucket_for(batch: int, slots: int) -> int:
    return next(size for size in buckets(slots) if size >= batch)


class DecodeStep:
    """`step(batch)` -> next-token logits [batch, vocab] (float32) for slots [0, batch) of the cache."""

    def __init__(self, model: torch.nn.Module, cache: SlotCache, compile: bool = False) -> None:
        self.model = model
        self.cache = cache
        self.compiled = compile
        # CUDA: a symbolic batch and CUDA graphs; the CPU: a static graph per bucket (see the module's docstring)
        self._on_cuda = cache.tokens.device.type == "cuda"
        self._proven: set[int] = set()  # batch sizes whose compiled step (and CUDA graph) has run once
        self._forward: Callable[..., torch.Tensor] = self._eager
        if compile:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            self._forward = torch.compile(
                self._eager,
                fullgraph=True,
                mode="reduce-overhead" if self._on_cuda else None,
                dynamic=None if self._on_cuda else False,  # False: never a symbolic batch, even automatically
            )

    def __call__(self, batch: int) -> torch.Tensor:
        cache = self.cache
        inputs = (cache.tokens[:batch], cache.positions[:batch], cache.inv_freq[:batch], cache.trained_length[:batch])
        if not self.compiled:
            return self._eager(*inputs)
        if batch > 1 and self._on_cuda:  # dynamo specialises a size of 1; the others share one graph ...
            for tensor in inputs:
                # ... unless the model's code branches on the batch size (bitsandbytes' kernels do): then each
                # bucket gets a graph of its own, still a bounded few, rather than an error.
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        if self._on_cuda:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits have been consumed
        if batch in self._proven:
            return self._forward(*inputs)
        try:
            logits = self._forward(*inputs)
        except Exception as exc:  # noqa: BLE001 - compiling or capturing failed: the eager step still runs
            # A model or kernel library this torch cannot compile, or whose kernels cannot be captured in a CUDA
            # graph, still answers. Re-running eagerly is safe: the step writes the same keys at the same places.
            reason = _first_line(exc)
            warnings.warn(f"the decode step could not be compiled, running it eagerly ({reason})", stacklevel=2)
            self.compiled = False
            return self._eager(*inputs)
        self._proven.add(batch)
        return logits

    def _eager(
        self, tokens: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, trained_length: torch.Tensor
    ) -> torch.Tensor:
        # tokens, positions: [b]; inv_freq: [b, head_dim/2]; trained_length: [b]
        transformer = self.model.transformer
        hidden = transformer.wte(tokens[:, None])  # [b, 1, hidden]
        rotary = rotary_tables(positions[:, None], inv_freq)
        query_scale = logn_scale(positions[:, None], trained_length) if self.model.config.use_logn_attn else None
        bias = decode_bias(positions, self.cache.max_length, hidden.dtype)
        view = self.cache.decode_view(tokens.shape[0], positions)
        hidden = transformer.decode_layers(hidden, rotary, query_scale, bias, view)
        lm_head = self.model.lm_head
        return lm_head(hidden[:, -1].to(lm_head.weight.dtype)).float()  # [b, vocab]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

"""The decode step: one new token for every slot of a `SlotCache`, eager or captured whole by torch.compile.

One call runs the decoder for one token per busy slot, applies each slot's rules (<|endoftext|> forbidden before
`min_new_tokens`, a constraint's token mask), takes the arg-max, computes the log-probabilities (of the chosen
token, and of the 20 best), and advances the slots' tokens and positions, all on the device: the host copies
one small summary back per step and nothing else syncs. Everything the step reads is a tensor of the cache
(tokens, positions, per-slot rotary frequencies, the trained length for logn, counts, masks), so one graph
serves every sequence: no Python number is baked in, and the KV tensors are written in place, on the whole
tensor, at fixed addresses.

Shapes are bucketed so that the graphs are few and made up front: the batch is rounded up to a power of two
(1, 2, 4, ... up to the slot count) and attention reads only the live part of the cache, rounded up to a length
bucket (`cache.length_buckets`). The length is a symbolic size (one graph for every length); the batch is
symbolic on CUDA (one compile for every bucket of two or more, one specialised for a single sequence) and each
(batch, length) pair is captured as a CUDA graph ("reduce-overhead"), one launch per step. On the CPU each batch
bucket is a static graph of its own: inductor's C++ kernels for a symbolic batch ran 2.7 times slower.

`warm_up()` compiles and captures every bucket with the cache as it is (the engine calls it before its first
request): CUDA graph trees only record on a graph's second call, so a capture that fails must fail there, not
in the middle of someone's answer. Any failure (compiling, a CUDA graph that cannot be captured, or a
"reduce-overhead" graph that inductor would silently run without CUDA graphs) moves the step down one mode -
CUDA graphs, then inductor alone, then eager - with dynamo reset, warned once and recorded in `report`; a step
that fails later is re-run in the next mode after its state is restored. No request ever fails for it.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from monkey_cli.engine.cache import SlotCache, length_buckets
from monkey_cli.engine.sampling import blocked_scores, summarize
from monkey_cli.model.qwen import decode_bias, logn_scale, rotary_tables

# Every engine (cache, model) compiles its own graphs of the same function; dynamo's default limit of 8 graphs
# per function would silently fall back to eager past it.
RECOMPILE_LIMIT = 64
CUDA_GRAPHS, INDUCTOR, EAGER = "cudagraphs", "inductor", "eager"
# Calls per (batch, length) bucket while warming up: CUDA graph trees run a graph once eagerly (warm-up),
# record it on the second call and replay it from the third; inductor compiles on the first.
WARM_CALLS = {CUDA_GRAPHS: 3, INDUCTOR: 1, EAGER: 0}


def buckets(slots: int) -> list[int]:
    """Batch sizes the step is compiled for: powers of two below `slots`, then `slots` itself."""
    sizes, size = [], 1
    while size < slots:
        sizes.append(size)
        size *= 2
    return [*sizes, slots]


def bucket_for(batch: int, slots: int) -> int:
    return next(size for size in buckets(slots) if size >= batch)


def default_modes(device: torch.device | str, compile: bool) -> list[str]:
    if not compile:
        return [EAGER]
    return [CUDA_GRAPHS, INDUCTOR, EAGER] if torch.device(device).type == "cuda" else [INDUCTOR, EAGER]


@dataclass
class CompileReport:
    """What compiling the decode step did: JSON-ready (doctor, /health, the benchmark)."""

    mode: str  # what runs now: cudagraphs, inductor or eager
    requested: str  # what was asked for first
    batches: list[int]
    lengths: list[int]
    warmed: bool = False
    warmup_seconds: float = 0.0
    graphs: int = 0  # dynamo graphs compiled while warming up (process-wide counter)
    recompiles: int = 0  # graphs compiled after warming up: should stay 0
    cudagraph_skips: int = 0  # graphs inductor ran without CUDA graphs (inductor's cudagraph_skips counter)
    captured: int = 0  # (batch, length) pairs recorded as CUDA graphs
    fallbacks: list[str] = field(default_factory=list)  # "mode: why it was given up", in order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _counter(group: str, name: str) -> int:
    from torch._dynamo.utils import counters

    return int(counters[group][name])


class DecodeStep:
    """`step(batch, length)` -> (logits, scores, summary) for slots [0, batch) of the cache, attending to
    `length` positions: the raw logits [batch, vocab] (float32), the same with what each slot may not choose at
    -inf, and the summary rows (`sampling.summarize`) of the greedy choice. The busy slots' tokens, positions and
    counts are advanced. `restore()` (given by the owner) puts those back as they were before a step that
    failed."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache: SlotCache,
        compile: bool = False,
        *,
        modes: Sequence[str] | None = None,
        restore: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.restore = restore
        self._on_cuda = cache.device.type == "cuda"
        self._modes = list(modes or default_modes(cache.device, compile))
        self.batches = buckets(cache.slots)
        self.lengths = length_buckets(cache.max_length)
        self.report = CompileReport(self._modes[0], self._modes[0], self.batches, self.lengths)
        self._forward = self._build(self._modes[0])
        self._graphs_after_warm_up: int | None = None

    @property
    def mode(self) -> str:
        return self._modes[0]

    @property
    def compiled(self) -> bool:
        return self.mode != EAGER

    # --- running -----------------------------------------------------------------------------------
    def __call__(self, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.compiled and not self.report.warmed:
            self.warm_up()
        while True:
            try:
                return self._call(batch, length)
            except Exception as exc:  # noqa: BLE001 - a compiled mode failed: the next one takes this step
                if not self.compiled:
                    raise  # the eager step itself failed (out of memory, say): the caller decides
                self._fall_back(exc)
                if self.restore is not None:
                    self.restore()

    def _call(self, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = self.cache.device
        batch_shape, length_shape = torch.empty(batch, 0, device=device), torch.empty(length, 0, device=device)
        if self.compiled:
            # The length is a symbolic size in every mode; the batch only on CUDA, and not for a single
            # sequence (dynamo specialises a size of 1). A kernel library that branches on the batch size
            # gets a graph per bucket there, a bounded few.
            torch._dynamo.maybe_mark_dynamic(length_shape, 0)
            if self._on_cuda and batch > 1:
                torch._dynamo.maybe_mark_dynamic(batch_shape, 0)
            else:
                torch._dynamo.mark_static(batch_shape, 0)
        if self.mode == CUDA_GRAPHS:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs have been consumed
        result = self._forward(batch_shape, length_shape)
        if self._graphs_after_warm_up is not None:
            self.report.recompiles = _counter("stats", "unique_graphs") - self._graphs_after_warm_up
        return result

    # --- warming up and falling back ---------------------------------------------------------------
    def warm_up(self) -> CompileReport:
        """Compile (and capture) every batch bucket at every length bucket now, inside the fallback."""
        started = time.perf_counter()
        graphs, skips = _counter("stats", "unique_graphs"), _counter("inductor", "cudagraph_skips")
        saved = [tensor.clone() for tensor in self.cache._state]
        try:
            while self.compiled:
                try:
                    self._warm_mode()
                    break
                except Exception as exc:  # noqa: BLE001 - this mode cannot run here: try the next one
                    self._fall_back(exc)
        finally:
            for tensor, value in zip(self.cache._state, saved, strict=True):
                tensor.copy_(value)
        report = self.report
        report.warmed = True
        report.warmup_seconds += time.perf_counter() - started
        report.graphs = _counter("stats", "unique_graphs") - graphs
        report.cudagraph_skips = _counter("inductor", "cudagraph_skips") - skips
        report.captured = len(self.batches) * len(self.lengths) if self.mode == CUDA_GRAPHS else 0
        self._graphs_after_warm_up = _counter("stats", "unique_graphs")
        return report

    def _warm_mode(self) -> None:
        calls = WARM_CALLS[self.mode]
        # A "reduce-overhead" graph that inductor cannot capture (an op CUDA graphs cannot take, a CPU tensor)
        # would silently run without CUDA graphs: make it an error here, where it means "the next mode".
        graphs = self.mode == CUDA_GRAPHS
        # Every (batch, length) pair is a CUDA graph of its own, a bounded set recorded here on purpose: no
        # warning about "too many distinct sizes" for them.
        pairs = len(self.batches) * len(self.lengths)
        options = {"triton.cudagraph_or_error": True, "triton.cudagraph_dynamic_shape_warn_limit": pairs + 1}
        options = options if graphs else {}
        skips = _counter("inductor", "cudagraph_skips")
        with _skip_reasons() as reasons, torch._inductor.config.patch(options), torch.inference_mode():
            for batch in self.batches:
                for length in self.lengths:
                    for _ in range(calls):
                        self._call(batch, length)
        if graphs and _counter("inductor", "cudagraph_skips") > skips:
            raise RuntimeError(reasons[0] if reasons else "inductor skipped CUDA graphs for the decode step")

    def _fall_back(self, error: BaseException) -> None:
        failed = self._modes.pop(0)
        reason = f"{failed}: {_first_line(error)}"
        self.report.fallbacks.append(reason)
        warnings.warn(f"the decode step falls back to {self.mode} ({reason})", stacklevel=3)
        torch._dynamo.reset()  # forget the failed mode's graphs (and CUDA graph trees)
        self.report.mode = self.mode
        self.report.warmed = False
        self._forward = self._build(self.mode)

    def _build(self, mode: str) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
        if mode == EAGER:
            return self._eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        return torch.compile(
            self._eager, fullgraph=True, dynamic=None, mode="reduce-overhead" if mode == CUDA_GRAPHS else None
        )

    # --- the step itself ---------------------------------------------------------------------------
    def _eager(self, batch_shape: torch.Tensor, length_shape: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch, length = batch_shape.shape[0], length_shape.shape[0]
        cache, model = self.cache, self.model
        torch._check(length <= cache.max_length)  # a symbolic length never needs a guard against the cache's
        transformer = model.transformer
        tokens, positions, live = cache.tokens[:batch], cache.positions[:batch], cache.live[:batch]
        hidden = transformer.wte(tokens[:, None])  # [b, 1, hidden]
        rotary = rotary_tables(positions[:, None], cache.inv_freq[:batch])
        query_scale = None
        if model.config.use_logn_attn:
            query_scale = logn_scale(positions[:, None], cache.trained_length[:batch])
        bias = decode_bias(positions, length, hidden.dtype)
        view = cache.decode_view(batch, positions, length)
        hidden = transformer.decode_layers(hidden, rotary, query_scale, bias, view)
        lm_head = model.lm_head
        logits = lm_head(hidden[:, -1].to(lm_head.weight.dtype)).float()  # [b, vocab]
        generated = cache.generated[:batch]
        scores = blocked_scores(logits, generated < cache.min_new[:batch], cache.bitmask[:batch], model.config.eod_id)
        chosen = scores.argmax(-1)
        summary = summarize(logits, chosen)
        # Busy slots feed their token next, one position further; idle ones stay where they are (position 0).
        tokens.copy_(torch.where(live, chosen, tokens))
        positions.add_(live.long())
        generated.add_(live.long())
        return logits, scores, summary


@contextmanager
def _skip_reasons() -> Iterator[list[str]]:
    """Why inductor skipped CUDA graphs inside the block (its "cudagraphs" log artifact, caught here)."""
    reasons: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage().strip()
            if message.startswith("skipping cudagraphs"):  # not the artifact's other notes (sizes, re-records)
                reasons.append(message.splitlines()[0])

    logger = logging.getLogger("torch._inductor.cudagraph_utils.__cudagraphs")
    handler, level = _Collect(logging.WARNING), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield reasons
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

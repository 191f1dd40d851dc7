"""Continuous batching: a fixed number of decode slots kept busy, one request per slot.

Requests wait their turn: round-robin across groups (`GenerationRequest.group`: one HTTP request's many
questions share a group, so they cannot starve another request's single one), in arrival order within a group
(a request without a group is a group of its own, so ungrouped requests are served first come, first served).
Whenever slots are free, the next requests are admitted together: their pages' vision features are computed
(several pages in one ViT pass), their prompts are prefilled in one right-padded batch into their slots, and
their first tokens are chosen from the prefill. Then every `step()` runs one decode step for all busy slots
(the static, optionally compiled `DecodeStep`), appends each slot's token, and frees the slots whose request
is done, so the next request starts while the others go on: nobody waits for the longest answer of a batch.
The busy slots are kept dense (a finished slot in the middle takes the last busy one's sequence), so a step's
batch is the count of busy slots rounded up to a bucket, and attention reads only the live part of the cache.

Several questions about one page share more than the features: the prompt up to the end of the image span
(`<img>` + 1280 image positions + `</img>`, ~99% of a prompt) is prefilled once into a slot, kept as a
prefix, and copied into the slots of the other questions, which prefill only their own few tokens. A prefix
is reused only for prompts that get the same NTK alpha, because the original rotates the keys with the alpha
chosen from the whole prompt's length.

Greedy decoding gives each request the tokens it gets alone (`Scheduler.run([request])`): a slot's sequence
sits at positions 0.. of its own cache row, with its own rotary table, and never sees another slot's keys.

Per step the host does one read: a small summary per slot (the chosen token, its log-probability and the 20
best), copied back together. A failure that belongs to one request (its image, its sampling generator, its
constraint raising or refusing) fails that request alone; the others decoding in the same step go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from monkey_cli.engine import sampling
from monkey_cli.engine.cache import SlotCache, length_bucket, round_up_length
from monkey_cli.engine.constraints import TokenConstraint, allocate_bitmask, allows_nothing, limit_row
from monkey_cli.engine.sampling import SamplingParams
from monkey_cli.engine.step import CompileReport, DecodeStep, bucket_for
from monkey_cli.model.memory import KEPT_PREFIXES

log = logging.getLogger("monkey_cli")

FINISH_STOP = "stop"  # the model wrote <|endoftext|>, or the request's constraint is complete
FINISH_LENGTH = "length"  # max_new_tokens reached
FINISH_CANCELLED = "cancelled"
# compile=None ("auto") compiles on CUDA when the first work the engine sees is more than one round of its slots
# or at least this many tokens: compiling costs tens of seconds, which a one-page question never earns back.
AUTO_COMPILE_TOKENS = 8192


def worth_compiling(device_type: str, answer_tokens: Sequence[int], slots: int) -> bool:
    """compile=None decides here, from the work in sight when the engine starts (the longest answer of each
    waiting request): compile on CUDA when it is more than one round of the slots or AUTO_COMPILE_TOKENS tokens;
    never on the CPU, where compiling the 32-layer stand-in took three minutes for a gain within the noise
    (docs/benchmarks.md)."""
    if device_type != "cuda":
        return False
    return len(answer_tokens) > slots or sum(answer_tokens) >= AUTO_COMPILE_TOKENS


@dataclass
class GenerationRequest:
    """One prompt about one image. `prompt_ids` hold exactly one `<img>` + span + `</img>`.

    Give the image (anything `encode_images` takes) or its features (`image_embeds` [tokens_per_image, hidden]).
    Requests with the same `image_key` share the features and the prefilled image prefix. `on_token` is called
    with each new token id as soon as it is chosen (from the engine's thread). `constraint` limits which tokens
    may come next (see `monkey_cli.engine.constraints`). Requests with the same `group` take turns with other
    groups for free slots (None: a group of its own).

    `score_ids` are tokens scored after the prompt by teacher forcing, in the request's prefill pass (they are
    fed after the prompt in the same forward pass, and cost no decode step): `GenerationResult.score_logprobs[i]`
    is the model's log-probability of `score_ids[i]` after the prompt and `score_ids[:i]`. The answer itself is
    decoded as it would be without them (its keys overwrite theirs; causal attention never lets the prompt see
    them).
    """

    prompt_ids: Sequence[int]
    image: Any = None
    image_embeds: torch.Tensor | None = None
    image_key: Hashable | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    on_token: Callable[[int], None] | None = None
    constraint: TokenConstraint | None = None
    group: Hashable | None = None
    score_ids: Sequence[int] = ()


@dataclass(frozen=True)
class GenerationResult:
    """An answer. `logprobs[i]` is the model's log-probability of `token_ids[i]` (log-softmax of its raw float32
    logits, before temperature, min_new_tokens and constraint masks); `stop_logprob` that of <|endoftext|> at the
    step it was chosen (None if the answer did not end with it); `top_logprobs[i]` the `params.top_logprobs`
    best (token id, log-probability) pairs at step i, best first (None when none were asked for);
    `score_logprobs[i]` that of the request's `score_ids[i]`, teacher-forced after the prompt (None without
    score_ids)."""

    token_ids: list[int]  # the answer, without <|endoftext|>
    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    logprobs: list[float] = field(default_factory=list)
    stop_logprob: float | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    score_logprobs: list[float] | None = None


class RequestHandle:
    """A submitted request: wait for its result, or cancel it (its slot is freed at the next step)."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.stop_logprob: float | None = None
        self.score_logprobs: list[float] | None = None  # set at prefill when the request has score_ids
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.submitted_at = time.perf_counter()
        self.started_at: float | None = None  # when its prefill began
        self.finished_at: float | None = None
        self._done = threading.Event()

    def cancel(self) -> None:
        self.cancelled = True

    def done(self) -> bool:
        return self._done.is_set()

    def wait_done(self, timeout: float | None = None) -> bool:
        """Block until the request is finished (or failed, or cancelled); False if `timeout` s passed first."""
        return self._done.wait(timeout)

    def wait(self, timeout: float | None = None) -> GenerationResult:
        """The result; re-raises what failed this request; TimeoutError if not done within `timeout` s."""
        if not self._done.wait(timeout):
            raise TimeoutError("the request is not finished yet")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    @property
    def seconds(self) -> float:
        """Time from its prefill to its last token (while other requests shared the device), 0 if it never ran."""
        if self.started_at is None or self.finished_at is None:
            return 0.0
        return self.finished_at - self.started_at

    def _finish(self, reason: str) -> None:
        top = list(self.top_logprobs) if self.request.params.top_logprobs else None
        scores = None if self.score_logprobs is None else list(self.score_logprobs)
        self.result = GenerationResult(
            list(self.tokens), reason, len(self.request.prompt_ids), list(self.logprobs), self.stop_logprob, top, scores
        )
        self.finished_at = time.perf_counter()
        self._done.set()

    def _fail(self, error: BaseException) -> None:
        self.error = error
        self.finished_at = time.perf_counter()
        self._done.set()


@dataclass
class SchedulerStats:
    """What the scheduler did: tests and benchmarks read these."""

    vision_passes: int = 0
    images_encoded: int = 0
    prefills: int = 0  # full prompt prefills (requests)
    prefill_passes: int = 0  # forward passes that prefilled them (several prompts each, prefix passes apart)
    prefix_prefills: int = 0  # image prefixes computed once for several requests
    prefix_reuses: int = 0  # requests that started from a stored prefix
    suffix_prefill_passes: int = 0  # passes that prefilled the questions of requests started from a prefix
    scored_tokens: int = 0  # score_ids teacher-forced in prefill passes
    decode_steps: int = 0
    decoded_tokens: int = 0
    busiest_step: int = 0  # the most sequences one decode step advanced together
    slot_moves: int = 0  # sequences moved down to keep the busy slots dense
    cache_allocations: int = 0  # KV caches allocated (more than one: a request outgrew the cache)


@dataclass
class _Prefill:
    """An admitted request about to be prefilled into `slot` from position `start` (0, or the end of its image
    prefix, already in the slot), its prompt rotated with `alpha`; `features` for a prefill from 0."""

    slot: int
    handle: RequestHandle
    alpha: float
    start: int
    features: torch.Tensor | None = None

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request


@dataclass
class _Active:
    """A busy slot, as the host knows it: what the step will feed it next (to restore after a failed step)."""

    handle: RequestHandle
    generator: torch.Generator | None
    position: int  # where `token` goes
    token: int = 0  # the token the slot feeds next

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request


class Scheduler:
    """Runs requests on `model` with `slots` decode slots. Not thread-safe except `submit` and `cancel`.

    `encode_images(images)` -> [n, tokens_per_image, hidden] computes vision features; `vision_batch` caps the
    pages per ViT pass (default: `slots`). `compile` captures the decode step with torch.compile (None: on CUDA
    when the work is large enough, see AUTO_COMPILE_TOKENS; never on the CPU). `max_length` sizes the cache once
    for sequences (prompt + answer) of that many tokens (default: what the first requests need); a longer
    request later still works, after the cache grows and the step compiles again. `vocab_limit` is the
    tokenizer's vocabulary size (constraints never allow ids at or above it).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        encode_images: Callable[[list[Any]], torch.Tensor],
        *,
        slots: int = 4,
        compile: bool | None = False,
        vision_batch: int | None = None,
        keep_prefixes: int = KEPT_PREFIXES,
        keep_features: int = 4,
        max_length: int | None = None,
        vocab_limit: int | None = None,
        compile_modes: Sequence[str] | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.model = model
        self.encode_images = encode_images
        self.slots = slots
        self.compile = compile
        self.compile_modes = compile_modes
        self.vision_batch = vision_batch or slots
        self.max_length = round_up_length(max_length) if max_length else None
        self.stats = SchedulerStats()
        config = model.config
        self.eos_id = config.eod_id
        self.image_end_id = config.image_end_id
        self.vocab_limit = min(vocab_limit or config.vocab_size, config.vocab_size)
        self._weights = model.transformer.wte.weight
        self._cache: SlotCache | None = None
        self._step: DecodeStep | None = None
        self._host_bitmask: torch.Tensor | None = None
        self._host_summary: torch.Tensor | None = None
        self._inbox: deque[RequestHandle] = deque()
        self._inbox_lock = threading.Lock()
        self._waiting = _WaitingQueue()
        self._active: dict[int, _Active] = {}
        self._features = _LRU(keep_features)
        self._prefixes = _LRU(keep_prefixes)

    # --- submitting ---------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request (from any thread); it starts at a later `step()`."""
        if request.image is None and request.image_embeds is None:
            raise ValueError("a request needs an image or its image_embeds")
        _image_end(request.prompt_ids, self.image_end_id)  # a prompt without an image span fails here, not later
        vocab = self.model.config.vocab_size
        bad = next((token for token in request.score_ids if not 0 <= int(token) < vocab), None)
        if bad is not None:
            raise ValueError(f"score_ids: token {bad} is outside the vocabulary (0..{vocab - 1})")
        handle = RequestHandle(request)
        with self._inbox_lock:
            self._inbox.append(handle)
        return handle

    def run(self, requests: Iterable[GenerationRequest]) -> list[GenerationResult]:
        """Submit every request, decode until all are done, and return their results in order."""
        handles = [self.submit(request) for request in requests]
        while not all(handle.done() for handle in handles):
            self.step()
        return [handle.wait() for handle in handles]

    def reserve(self, length: int) -> None:
        """Allocate the cache for sequences (prompt + answer) of up to `length` tokens now, while no request
        runs; a longer request later still grows it."""
        if self._active:
            raise RuntimeError("reserve() needs an idle scheduler")
        self.max_length = round_up_length(length)
        self._allocate(self.max_length)

    def warm_up(self) -> CompileReport:
        """Allocate the cache and compile (and capture) the decode step for every batch and length bucket now,
        before any request (a server does this before it says it is ready). compile=None means yes on CUDA."""
        if self._active:
            raise RuntimeError("warm_up() needs an idle scheduler")
        if self.compile is None:
            self.compile = self._weights.device.type == "cuda"
        if self._cache is None or self._step is None:
            self._allocate(self.max_length or round_up_length(self._default_length()))
        assert self._step is not None
        with torch.inference_mode():
            return self._step.warm_up() if self._step.compiled else self._step.report

    def compile_report(self) -> dict[str, Any]:
        """What the decode step runs as (eager, inductor, CUDA graphs), what fell back and why, recompiles."""
        report: dict[str, Any] = {"compile": self.compile, "slots": self.slots, "max_length": self.max_length}
        report["cache_allocations"] = self.stats.cache_allocations
        if self._step is not None:
            report.update(self._step.report.to_dict())
        return report

    @property
    def idle(self) -> bool:
        return not (self._inbox or self._waiting or self._active)

    # --- one iteration ------------------------------------------------------------------------------
    def step(self) -> list[RequestHandle]:
        """Admit waiting requests into free slots, then one decode step; returns the requests that finished."""
        with self._inbox_lock:
            inbox, self._inbox = list(self._inbox), deque()
        for handle in inbox:
            self._waiting.push(handle)
        finished: list[RequestHandle] = []
        with torch.inference_mode():
            self._drop_cancelled(finished)
            self._admit(finished)
            if self._active:
                self._decode(finished)
            self._compact()
        return finished

    def _drop_cancelled(self, finished: list[RequestHandle]) -> None:
        for handle in [h for h in self._waiting if h.cancelled]:
            self._waiting.remove(handle)
            self._release_image(handle.request)
            handle._finish(FINISH_CANCELLED)
            finished.append(handle)
        for slot, active in list(self._active.items()):
            if active.handle.cancelled:
                self._free_slot(slot)
                active.handle._finish(FINISH_CANCELLED)
                finished.append(active.handle)

    # --- admission: vision, prefill, first token ----------------------------------------------------
    def _admit(self, finished: list[RequestHandle]) -> None:
        """Admit as many waiting requests as there are free slots, all prefilled before the next decode step."""
        self._compact()  # cancelled requests may have left holes: the new ones take the slots after the busy ones
        free = [slot for slot in range(self.slots) if slot not in self._active]
        admitted: list[tuple[int, RequestHandle]] = []
        while self._waiting and len(admitted) < len(free):
            handle = self._waiting.first()
            if not self._ensure_cache(handle.request, busy=bool(self._active or admitted)):
                break  # it needs a longer cache: wait until the busy slots drain, then grow it
            self._waiting.pop_first()
            handle.started_at = time.perf_counter()
            admitted.append((free[len(admitted)], handle))
        if not admitted:
            return
        started = self._prefill_all(admitted, finished)
        if started:
            self._choose_first(started, finished)
        self._compact()  # failed admissions leave holes

    def _ensure_cache(self, request: GenerationRequest, busy: bool) -> bool:
        needed = _needed_length(request)
        if self._cache is not None and self._cache.fits(self.slots, needed, self._weights.dtype):
            return True
        if busy:
            return False
        if self._cache is not None:
            log.warning(
                "the engine's cache grows from %d to %d tokens for a longer request: the decode step compiles again",
                self._cache.max_length, round_up_length(needed),
            )  # fmt: skip
        wanted = max(needed, *(_needed_length(h.request) for h in self._waiting))
        self._allocate(max(round_up_length(wanted), self.max_length or 0))
        return True

    def _default_length(self) -> int:
        from monkey_cli.model.memory import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEXT_TOKENS

        config = self.model.config
        return config.tokens_per_image + 2 + DEFAULT_TEXT_TOKENS + DEFAULT_MAX_NEW_TOKENS

    def _allocate(self, length: int) -> None:
        self._cache = self._step = None  # free the old cache before allocating its successor
        self._prefixes.clear()
        weights = self._weights
        self.max_length = length
        if self.compile is None:
            self.compile = self._worth_compiling()
        cache = SlotCache(self.model.config, self.slots, length, weights.dtype, weights.device)
        self._cache = cache
        self._step = DecodeStep(self.model, cache, bool(self.compile), modes=self.compile_modes, restore=self._restore)
        self._host_bitmask = allocate_bitmask(self.slots, self.model.config.vocab_size)
        shape = (self.slots, sampling.SUMMARY_WIDTH)
        pinned = weights.device.type == "cuda"
        self._host_summary = torch.empty(shape, dtype=torch.float32, pin_memory=pinned) if pinned else None
        self.stats.cache_allocations += 1

    def _worth_compiling(self) -> bool:
        answers = [handle.request.params.max_new_tokens for handle in self._waiting]
        return worth_compiling(self._weights.device.type, answers, self.slots)

    def _prefill_all(
        self, admitted: list[tuple[int, RequestHandle]], finished: list[RequestHandle]
    ) -> list[tuple[int, torch.Tensor]]:
        """Prefill every admitted request into its slot: (slot, logits [vocab] for its first token) of those that
        started, in slot order; a request whose image or prompt fails fails alone.

        Prompts prefilled from position 0 go through one right-padded pass together. Prompts that share their
        page's image prefix get it copied into their slots (computed once, by the first of them, when it is new)
        and then prefill their own few tokens together, in one pass per prefix length (one for a page's
        questions): a page's ten questions admitted at once cost one short pass, not ten."""
        plain: list[_Prefill] = []
        suffixes: list[_Prefill] = []
        for position, (slot, handle) in enumerate(admitted):
            try:
                request = handle.request
                later = [other.request for _, other in admitted[position + 1 :]]
                features = self._image_features(request, later)
                alpha = self.model.transformer.ntk_alpha_for(len(request.prompt_ids))
                prefix_end = _image_end(request.prompt_ids, self.image_end_id) + 1
                shared = request.image_key is not None and prefix_end < len(request.prompt_ids)
                if shared and self._sharers(request, alpha, prefix_end, later):
                    self._load_prefix(request, slot, alpha, prefix_end, features)
                    suffixes.append(_Prefill(slot, handle, alpha, prefix_end))
                else:
                    plain.append(_Prefill(slot, handle, alpha, 0, features))
            except Exception as exc:  # this request fails alone; the others go on
                self._fail_admission(handle, exc, finished)
        starts = sorted({item.start for item in suffixes})
        groups = [plain, *([item for item in suffixes if item.start == start] for start in starts)]
        started = [pair for group in groups if group for pair in self._prefill_group(group, finished)]
        return sorted(started, key=lambda pair: pair[0])

    def _prefill_group(self, items: list[_Prefill], finished: list[RequestHandle]) -> list[tuple[int, torch.Tensor]]:
        """One pass for `items` (all from the same position); if it fails, each alone, so that only the prompt
        that broke it fails."""
        try:
            together = list(self._prefill_batch(items))
        except Exception:  # noqa: BLE001 - which prompt broke the batch? each one alone says
            together = None
        started: list[tuple[int, torch.Tensor]] = []
        for index, item in enumerate(items):
            try:
                logits = together[index] if together is not None else self._prefill_batch([item])[0]
                started.append((item.slot, logits))
                self._start(item.slot, item.handle)
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                self._fail_admission(item.handle, exc, finished)
        return started

    def _fail_admission(self, handle: RequestHandle, error: BaseException, finished: list[RequestHandle]) -> None:
        self._release_image(handle.request)
        handle._fail(error)
        finished.append(handle)

    def _prefill_batch(self, items: list[_Prefill]) -> torch.Tensor:
        """One right-padded forward pass over several prompts, each into its slot from the same position `start`
        (0, or the end of an image prefix already in every slot): logits [prompts, vocab] for each prompt's first
        new token. Padding comes after a prompt, where causal attention never looks. A request's `score_ids` are
        fed after its prompt in the same pass, and their log-probabilities kept on its handle."""
        model, cache, device = self.model, self._cache, self._weights.device
        start = items[0].start
        rows = [[*item.request.prompt_ids[start:], *item.request.score_ids[:-1]] for item in items]
        lengths = [len(ids) for ids in rows]
        longest = max(lengths)
        input_ids = torch.full((len(rows), longest), self.eos_id, dtype=torch.long)
        mask = torch.zeros((len(rows), start + longest), dtype=torch.long)
        mask[:, :start] = 1
        for row, ids in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, start : start + len(ids)] = 1
        features = torch.stack([item.features for item in items]) if start == 0 else None
        out = model.transformer(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device) if len(rows) > 1 else None,
            past_key_values=cache.batch_writer([item.slot for item in items], lengths, start),
            image_embeds=features,
            use_cache=True,
            ntk_alphas=[item.alpha for item in items],  # each prompt's own, whatever its scored tokens add
        )
        # The hidden states that matter: each prompt's last (its first new token), then one per scored token.
        picks = [(row, len(item.request.prompt_ids) - start - 1, max(len(item.request.score_ids), 1))
                 for row, item in enumerate(items)]  # fmt: skip
        row_index = torch.tensor([row for row, _, count in picks for _ in range(count)], device=device)
        position_index = torch.tensor([last + i for _, last, count in picks for i in range(count)], device=device)
        hidden = out.last_hidden_state[row_index, position_index]  # [picked, hidden]
        lm_head = model.lm_head
        logits = lm_head(hidden.to(lm_head.weight.dtype)).float()  # [picked, vocab]
        offsets = [sum(count for _, _, count in picks[:row]) for row in range(len(picks))]
        for item, offset in zip(items, offsets, strict=True):
            score_ids = list(item.request.score_ids)
            if score_ids:
                scored = torch.log_softmax(logits[offset : offset + len(score_ids)], dim=-1)
                chosen = scored.gather(1, torch.tensor(score_ids, device=device)[:, None])[:, 0]
                item.handle.score_logprobs = chosen.tolist()
                self.stats.scored_tokens += len(score_ids)
        if start == 0:
            self.stats.prefills += len(rows)
            self.stats.prefill_passes += 1
            for item in items:
                self._release_image(item.request)
        else:
            self.stats.suffix_prefill_passes += 1
        return logits[torch.tensor(offsets, device=device)]

    def _load_prefix(
        self, request: GenerationRequest, slot: int, alpha: float, prefix_end: int, features: torch.Tensor
    ) -> None:
        """Put `request`'s page's image prefix into `slot`: a copy of the stored one, or (the first time) computed
        there and stored."""
        ids, cache = list(request.prompt_ids), self._cache
        key = (request.image_key, alpha, tuple(ids[:prefix_end]))
        prefix = self._prefixes.get(key)
        if prefix is None:
            self.model.transformer(
                input_ids=torch.tensor([ids[:prefix_end]], dtype=torch.long, device=self._weights.device),
                past_key_values=cache.writer(slot, 0),
                image_embeds=features[None],
                use_cache=True,
                ntk_alphas=[alpha],
            )
            prefix = [(k[slot : slot + 1, :, :prefix_end].clone(), v[slot : slot + 1, :, :prefix_end].clone())
                      for k, v in zip(cache.keys, cache.values, strict=True)]  # fmt: skip
            self._prefixes.put(key, prefix)
            self.stats.prefix_prefills += 1
        else:
            cache.load_prefix(slot, [k for k, _ in prefix], [v for _, v in prefix])
        self.stats.prefix_reuses += 1
        self._release_image(request)

    def _start(self, slot: int, handle: RequestHandle) -> None:
        """Make `slot` busy with `handle`'s request (prefilled): its per-slot state on the device."""
        request, cache, model = handle.request, self._cache, self.model
        params = request.params
        alpha = model.transformer.ntk_alpha_for(len(request.prompt_ids))
        cache.inv_freq[slot] = model.transformer.rotary.inv_freq(alpha, cache.device)
        cache.trained_length[slot] = float(model.config.seq_length)
        cache.positions[slot] = len(request.prompt_ids)
        cache.generated[slot] = 0
        cache.min_new[slot] = params.min_new_tokens
        cache.sampled[slot] = not params.greedy
        cache.temperature[slot] = params.temperature
        cache.top_p[slot] = params.top_p
        cache.top_k[slot] = params.top_k
        cache.bitmask[slot] = -1
        self._active[slot] = _Active(handle, params.generator(cache.device), position=len(request.prompt_ids))

    def _choose_first(self, started: list[tuple[int, torch.Tensor]], finished: list[RequestHandle]) -> None:
        """The first token of each started slot, from its prefill logits, by the same rules as the decode step."""
        started = [(slot, logits) for slot, logits in started if self._fill_mask(slot, finished)]
        if not started:
            return
        cache = self._cache
        slots = [slot for slot, _ in started]
        rows = torch.tensor(slots, device=cache.device)
        logits = torch.stack([logits for _, logits in started])
        scores = sampling.blocked_scores(logits, cache.min_new[rows] > 0, cache.bitmask[rows], self.eos_id)
        summary = sampling.summarize(logits, scores.argmax(-1))
        _, summary = self._sample_rows(slots, rows, logits, scores, summary, finished)
        cache.tokens[rows] = summary[:, sampling.TOKEN].long()
        cache.generated[rows] = 1
        cache.live[rows] = torch.tensor([slot in self._active for slot in slots], device=cache.device)
        self._accept_rows(slots, self._read(summary), finished)

    # --- decoding -----------------------------------------------------------------------------------
    def _decode(self, finished: list[RequestHandle]) -> None:
        slots = [slot for slot in sorted(self._active) if self._fill_mask(slot, finished)]
        if not slots:
            return
        cache = self._cache
        batch = bucket_for(slots[-1] + 1, self.slots)
        length = length_bucket(max(self._active[slot].position for slot in slots) + 1, cache.max_length)
        try:
            logits, scores, summary = self._step(batch, length)
            rows = cache.rows[:batch]
            drawn, summary = self._sample_rows(slots, rows, logits, scores, summary, finished)
            if drawn is not None:
                cache.tokens[:batch] = torch.where(cache.sampled[:batch], drawn, cache.tokens[:batch])
            values = self._read(summary[: slots[-1] + 1])
        except Exception as exc:  # e.g. out of memory: every running request fails, the engine stays usable
            for slot in slots:
                self._fail_slot(slot, exc, finished)
            return
        for slot in slots:
            if slot in self._active:
                self._active[slot].position += 1
        self.stats.decode_steps += 1
        self.stats.busiest_step = max(self.stats.busiest_step, len(slots))
        self._accept_rows(slots, [values[slot] for slot in slots], finished)

    def _sample_rows(
        self,
        slots: list[int],
        rows: torch.Tensor,
        logits: torch.Tensor,
        scores: torch.Tensor,
        summary: torch.Tensor,
        finished: list[RequestHandle],
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The sampling slots among `slots` (the cache rows of `logits`' rows are `rows`) draw from their own
        generators: (the draws, every row of which only the sampling ones count, and the summary with their
        choice in place of the greedy one); (None, summary) when no slot samples. A generator that fails fails
        its request alone. `summary` itself is left as it is (a CUDA graph's output)."""
        cache = self._cache
        drawing = [slot for slot in slots if slot in self._active and self._active[slot].generator is not None]
        if not drawing:
            return None, summary
        for slot in drawing:
            try:
                sampling.draw_noise(cache.noise[slot], self._active[slot].generator)
            except Exception as exc:  # noqa: BLE001 - this request's generator: it fails alone
                self._fail_slot(slot, exc, finished)
        sampled = cache.sampled[rows]  # a freed slot's flag is cleared
        chosen = sampling.sample(
            scores, cache.temperature[rows], cache.top_p[rows], cache.top_k[rows], cache.noise[rows]
        )
        summary = summary.clone()
        sampling.resummarize(summary, logits, chosen, sampled)
        return chosen, summary

    def _read(self, summary: torch.Tensor) -> list[list[float]]:
        """The host's one read per step: the summary rows, copied back together."""
        if self._host_summary is None:
            return summary.tolist()
        host = self._host_summary[: summary.shape[0]]
        host.copy_(summary, non_blocking=True)
        torch.cuda.current_stream(summary.device).synchronize()
        return host.tolist()

    def _fill_mask(self, slot: int, finished: list[RequestHandle]) -> bool:
        """Ask a constrained slot's constraint for its row of the token mask and put it on the device; False
        (and the request failed) if the constraint raised or allows no token at all."""
        active = self._active.get(slot)
        if active is None:
            return False
        constraint = active.request.constraint
        if constraint is None or not getattr(constraint, "masks_tokens", True):
            return True  # the row stays all ones: the free choice
        host = self._host_bitmask
        try:
            host[slot] = 0
            constraint.fill_next_token_bitmask(host, slot)
            limit_row(host, slot, self.vocab_limit)
            if allows_nothing(host, slot):
                raise ValueError("the request's constraint allows no token")
        except Exception as exc:  # noqa: BLE001 - this request's constraint: it fails alone
            self._fail_slot(slot, exc, finished)
            return False
        self._cache.bitmask[slot].copy_(host[slot], non_blocking=True)
        return True

    def _accept_rows(self, slots: list[int], values: list[list[float]], finished: list[RequestHandle]) -> None:
        """Record each slot's new token (`values` holds their summary rows, in the same order)."""
        notices = [self._accept(slot, row, finished) for slot, row in zip(slots, values, strict=True)
                   if slot in self._active]  # fmt: skip
        _notify_all([notice for notice in notices if notice is not None])

    def _accept(self, slot: int, row: list[float], finished: list[RequestHandle]) -> Callable[[], None] | None:
        """Record `slot`'s new token (its summary `row`); free the slot at <|endoftext|>, the length limit or a
        completed constraint.

        Returns what tells the outside world: the request's `on_token` for this token, then (if it is done) its
        result, in that order, so a streaming reader has every token before it sees the end.
        """
        active = self._active[slot]
        handle, request = active.handle, active.request
        token, logprob = int(row[sampling.TOKEN]), row[sampling.LOGPROB]
        active.token = token
        if request.constraint is not None:
            try:
                if not request.constraint.accept_token(token):
                    raise ValueError(f"the request's constraint refused token {token}")
                complete = request.constraint.is_terminated()
            except Exception as exc:  # noqa: BLE001 - this request's constraint: it fails alone
                self._fail_slot(slot, exc, finished)
                return None
        else:
            complete = False
        reason = None
        if token == self.eos_id:
            reason = FINISH_STOP
            handle.stop_logprob = logprob
        else:
            handle.tokens.append(token)
            handle.logprobs.append(logprob)
            if request.params.top_logprobs:
                count = request.params.top_logprobs
                ids = row[sampling.TOP_IDS : sampling.TOP_IDS + count]
                values = row[sampling.TOP_VALUES : sampling.TOP_VALUES + count]
                handle.top_logprobs.append([(int(i), v) for i, v in zip(ids, values, strict=True)])
            self.stats.decoded_tokens += 1
            if len(handle.tokens) >= request.params.max_new_tokens:
                reason = FINISH_LENGTH
            elif complete:
                reason = FINISH_STOP
        if reason is not None:
            self._free_slot(slot)
            finished.append(handle)
        on_token = request.on_token if token != self.eos_id else None

        def notify() -> None:
            try:
                if on_token is not None:
                    on_token(token)
            finally:
                if reason is not None:
                    handle._finish(reason)

        return notify

    def _fail_slot(self, slot: int, error: BaseException, finished: list[RequestHandle]) -> None:
        active = self._active.get(slot)
        if active is None:
            return
        self._free_slot(slot)
        active.handle._fail(error)
        finished.append(active.handle)

    def _free_slot(self, slot: int) -> None:
        del self._active[slot]
        self._cache.reset_slot(slot)

    def _compact(self) -> None:
        """Keep the busy slots dense: move the highest busy slot into the lowest free one, until none is left
        above a free one. A move copies the sequence's live keys and values, once per request that finishes."""
        while self._active:
            highest, free = max(self._active), self._lowest_free()
            if free is None or free > highest:
                return
            active = self._active.pop(highest)
            self._cache.move_slot(highest, free, active.position)
            self._cache.reset_slot(highest)
            if self._host_bitmask is not None:
                self._host_bitmask[free] = self._host_bitmask[highest]
            self._active[free] = active
            self.stats.slot_moves += 1

    def _lowest_free(self) -> int | None:
        return next((slot for slot in range(self.slots) if slot not in self._active), None)

    def _restore(self) -> None:
        """Put the busy slots' tokens, positions and counts back as the host knows them (after a failed step)."""
        cache = self._cache
        for slot in range(self.slots):
            active = self._active.get(slot)
            if active is None:
                cache.reset_slot(slot)
                continue
            cache.tokens[slot] = active.token
            cache.positions[slot] = active.position
            cache.generated[slot] = len(active.handle.tokens)
            cache.live[slot] = True

    # --- vision features ----------------------------------------------------------------------------
    def _image_features(self, request: GenerationRequest, admitted: list[GenerationRequest]) -> torch.Tensor:
        """`request`'s vision features; a ViT pass computes them with those of the next pages to come (the
        requests `admitted` after it, then the waiting ones)."""
        if request.image_embeds is not None:
            return request.image_embeds.to(self._weights.device)
        key = _feature_key(request)
        features = self._features.get(key)
        if features is None:
            self._encode_ahead(request, admitted)
            features = self._features.get(key)
        if isinstance(features, BaseException):
            raise features
        return features

    def _encode_ahead(self, first: GenerationRequest, admitted: list[GenerationRequest]) -> None:
        """One ViT pass for `first` and the next pages that have no features yet. If the pass fails, each page is
        encoded alone, so that only a broken page's own request fails."""
        keys, images = [_feature_key(first)], [first.image]
        for request in [*admitted, *(handle.request for handle in self._waiting)]:
            if len(keys) >= self.vision_batch:
                break
            key = _feature_key(request)
            if request.image_embeds is None and key not in keys and key not in self._features:
                keys.append(key)
                images.append(request.image)
        try:
            rows = list(self.encode_images(images).to(self._weights.device))
        except Exception:  # noqa: BLE001 - find out which page broke the pass
            if len(images) == 1:
                raise
            rows = []
            for image in images:
                try:
                    rows.append(self.encode_images([image]).to(self._weights.device)[0])
                except Exception as exc:  # noqa: BLE001 - kept as that page's outcome
                    rows.append(exc)
        self.stats.vision_passes += 1
        self.stats.images_encoded += len(images)
        for key, row in zip(keys, rows, strict=True):
            self._features.put(key, row, pinned=True)

    def _release_image(self, request: GenerationRequest) -> None:
        """Unpin features no waiting request needs any more (the LRU may still keep them for later requests)."""
        if request.image_embeds is not None:
            return
        key = _feature_key(request)
        if not any(_feature_key(h.request) == key for h in self._waiting if h.request.image_embeds is None):
            self._features.unpin(key)

    def _sharers(
        self, request: GenerationRequest, alpha: float, prefix_end: int, admitted: list[GenerationRequest]
    ) -> bool:
        """Is the image prefix worth keeping: stored already, or wanted by another request admitted with this one
        (`admitted`) or waiting?"""
        key = (request.image_key, alpha, tuple(request.prompt_ids[:prefix_end]))
        if key in self._prefixes:
            return True
        for other in [*admitted, *(handle.request for handle in self._waiting)]:
            ids = other.prompt_ids
            if (
                other.image_key == request.image_key
                and tuple(ids[:prefix_end]) == key[2]
                and len(ids) > prefix_end
                and self.model.transformer.ntk_alpha_for(len(ids)) == alpha
            ):
                return True
        return False


def _notify_all(notices: list[Callable[[], None]]) -> None:
    """Run every notice even if one raises (after all bookkeeping, so the state stays consistent); re-raise."""
    error: BaseException | None = None
    for notice in notices:
        try:
            notice()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, once the others are told
            error = error or exc
    if error is not None:
        raise error


def _needed_length(request: GenerationRequest) -> int:
    """The cache positions a request may write: its prompt, then its answer or its scored tokens."""
    return len(request.prompt_ids) + max(request.params.max_new_tokens, len(request.score_ids))


def _image_end(ids: Sequence[int], image_end_id: int) -> int:
    try:
        return list(ids).index(image_end_id)
    except ValueError:
        raise ValueError("the prompt holds no <img>...</img> span") from None


def _feature_key(request: GenerationRequest) -> Hashable:
    return request.image_key if request.image_key is not None else ("request", id(request))


class _WaitingQueue:
    """Requests waiting for a slot: round-robin across groups, in arrival order within a group. A request
    without a group is a group of its own (so ungrouped requests keep their arrival order)."""

    def __init__(self) -> None:
        self._groups: OrderedDict[Hashable, deque[RequestHandle]] = OrderedDict()

    @staticmethod
    def _key(handle: RequestHandle) -> Hashable:
        group = handle.request.group
        return ("request", id(handle)) if group is None else ("group", group)

    def push(self, handle: RequestHandle) -> None:
        self._groups.setdefault(self._key(handle), deque()).append(handle)

    def first(self) -> RequestHandle:
        return next(iter(self._groups.values()))[0]

    def pop_first(self) -> RequestHandle:
        key, queue = next(iter(self._groups.items()))
        handle = queue.popleft()
        if queue:
            self._groups.move_to_end(key)  # its group waits for the others' turns
        else:
            del self._groups[key]
        return handle

    def remove(self, handle: RequestHandle) -> None:
        key = self._key(handle)
        queue = self._groups[key]
        queue.remove(handle)
        if not queue:
            del self._groups[key]

    def __bool__(self) -> bool:
        return bool(self._groups)

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._groups.values())

    def __iter__(self) -> Iterator[RequestHandle]:
        """In the order they would be admitted if nothing else arrived."""
        queues = [list(queue) for queue in self._groups.values()]
        for turn in range(max((len(queue) for queue in queues), default=0)):
            for queue in queues:
                if turn < len(queue):
                    yield queue[turn]


class _LRU:
    """Least-recently-used store whose pinned entries are never evicted; unpinned ones beyond `keep` are."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._pinned: set[Hashable] = set()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> Any:
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: Hashable, value: Any, pinned: bool = False) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        if pinned:
            self._pinned.add(key)
        self._evict()

    def unpin(self, key: Hashable) -> None:
        self._pinned.discard(key)
        self._evict()

    def clear(self) -> None:
        self._items.clear()
        self._pinned.clear()

    def _evict(self) -> None:
        unpinned = [key for key in self._items if key not in self._pinned]
        for key in unpinned[: max(len(unpinned) - self.keep, 0)]:
            del self._items[key]

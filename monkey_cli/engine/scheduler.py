"""Continuous batching: a fixed number of decode slots kept busy, one request per slot.

Requests wait in arrival order. Whenever a slot is free, the next request is admitted: its page's vision
features are computed (several waiting pages in one ViT pass), its prompt is prefilled eagerly into the slot,
and its first token is chosen from the prefill. Then every `step()` runs one decode step for all busy slots
(the static, optionally compiled `DecodeStep`), appends each slot's token, and frees the slots whose request
is done, so the next request starts while the others go on: nobody waits for the longest answer of a batch.

Several questions about one page share more than the features: the prompt up to the end of the image span
(`<img>` + 1280 image positions + `</img>`, ~99% of a prompt) is prefilled once into a slot, kept as a
prefix, and copied into the slots of the other questions, which prefill only their own few tokens. A prefix
is reused only for prompts that get the same NTK alpha, because the original rotates the keys with the alpha
chosen from the whole prompt's length.

Greedy decoding gives each request the tokens it gets alone (`Scheduler.run([request])`): a slot's sequence
sits at positions 0.. of its own cache row, with its own rotary table, and never sees another slot's keys.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from monkey_cli.engine.cache import SlotCache, round_up_length
from monkey_cli.engine.constraints import TokenConstraint, bitmask_words
from monkey_cli.engine.sampling import SamplingParams, choose_tokens
from monkey_cli.engine.step import DecodeStep, bucket_for
from monkey_cli.model.memory import KEPT_PREFIXES

FINISH_STOP = "stop"  # the model wrote <|endoftext|>
FINISH_LENGTH = "length"  # max_new_tokens reached
FINISH_CANCELLED = "cancelled"


@dataclass
class GenerationRequest:
    """One prompt about one image. `prompt_ids` hold exactly one `<img>` + span + `</img>`.

    Give the image (anything `encode_images` takes) or its features (`image_embeds` [tokens_per_image, hidden]).
    Requests with the same `image_key` share the features and the prefilled image prefix. `on_token` is called
    with each new token id as soon as it is chosen (from the engine's thread). `constraint` restricts every
    token to those it allows (`monkey_cli.engine.constraints`).
    """

    prompt_ids: Sequence[int]
    image: Any = None
    image_embeds: torch.Tensor | None = None
    image_key: Hashable | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    on_token: Callable[[int], None] | None = None
    group: Hashable | None = None  # stub: the engine branch gives it meaning (round-robin between groups)
    constraint: TokenConstraint | None = None


@dataclass(frozen=True)
class GenerationResult:
    """An answer. Log-probabilities are the model's own: log-softmax of its float32 logits at each step, before
    temperature, min_new_tokens or a constraint changed them."""

    token_ids: list[int]  # the answer, without <|endoftext|>
    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    logprobs: list[float] = field(default_factory=list)  # one per token of token_ids
    stop_logprob: float | None = None  # <|endoftext|>'s, at the step it was chosen (None if it was not)
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: the params.top_logprobs best (id, logprob)


class RequestHandle:
    """A submitted request: wait for its result, or cancel it (its slot is freed at the next step)."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.stop_logprob: float | None = None
        self.top_logprobs: list[list[tuple[int, float]]] | None = [] if request.params.top_logprobs else None
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
        self.result = GenerationResult(
            list(self.tokens),
            reason,
            len(self.request.prompt_ids),
            logprobs=list(self.logprobs),
            stop_logprob=self.stop_logprob,
            top_logprobs=None if self.top_logprobs is None else list(self.top_logprobs),
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
    prefills: int = 0  # full prompt prefills
    prefix_prefills: int = 0  # image prefixes computed once for several requests
    prefix_reuses: int = 0  # requests that started from a stored prefix
    decode_steps: int = 0
    decoded_tokens: int = 0
    busiest_step: int = 0  # the most sequences one decode step advanced together


@dataclass
class _Active:
    handle: RequestHandle
    generator: torch.Generator | None


class Scheduler:
    """Runs requests on `model` with `slots` decode slots. Not thread-safe except `submit` and `cancel`.

    `encode_images(images)` -> [n, tokens_per_image, hidden] computes vision features; `vision_batch` caps the
    pages per ViT pass (default: `slots`). `compile` captures the decode step with torch.compile.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        encode_images: Callable[[list[Any]], torch.Tensor],
        *,
        slots: int = 4,
        compile: bool = False,
        vision_batch: int | None = None,
        keep_prefixes: int = KEPT_PREFIXES,
        keep_features: int = 4,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.model = model
        self.encode_images = encode_images
        self.slots = slots
        self.compile = compile
        self.vision_batch = vision_batch or slots
        self.stats = SchedulerStats()
        config = model.config
        self.eos_id = config.eod_id
        self.image_end_id = config.image_end_id
        self._weights = model.transformer.wte.weight
        self._cache: SlotCache | None = None
        self._step: DecodeStep | None = None
        self._inbox: deque[RequestHandle] = deque()
        self._inbox_lock = threading.Lock()
        self._waiting: deque[RequestHandle] = deque()
        self._active: dict[int, _Active] = {}
        self._free: list[int] = list(range(slots))
        self._features = _LRU(keep_features)
        self._prefixes = _LRU(keep_prefixes)

    # --- submitting ---------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request (from any thread); it starts at a later `step()`."""
        if request.image is None and request.image_embeds is None:
            raise ValueError("a request needs an image or its image_embeds")
        _image_end(request.prompt_ids, self.image_end_id)  # a prompt without an image span fails here, not later
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
        self._allocate(length)

    @property
    def idle(self) -> bool:
        return not (self._inbox or self._waiting or self._active)

    # --- one iteration ------------------------------------------------------------------------------
    def step(self) -> list[RequestHandle]:
        """Admit waiting requests into free slots, then one decode step; returns the requests that finished."""
        with self._inbox_lock:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
        finished: list[RequestHandle] = []
        with torch.inference_mode():
            self._drop_cancelled(finished)
            self._admit(finished)
            if self._active:
                self._decode(finished)
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
        while self._free and self._waiting:
            handle = self._waiting[0]
            if not self._ensure_cache(handle.request):
                return  # it needs a longer cache: wait until the busy slots drain, then grow it
            self._waiting.popleft()
            slot = heapq.heappop(self._free)
            handle.started_at = time.perf_counter()
            try:
                logits = self._prefill(handle.request, slot)
                active = _Active(handle, handle.request.params.generator(logits.device))
                _, tokens, details = self._choose(logits[None], [handle], [active.generator])
                token = tokens[0]
            except Exception as exc:  # this request fails alone; the others go on
                heapq.heappush(self._free, slot)
                handle._fail(exc)
                finished.append(handle)
                continue
            self._active[slot] = active
            self._start_decoding(slot, token)
            _notify_all([self._accept(slot, token, finished, *details[0])])

    def _ensure_cache(self, request: GenerationRequest) -> bool:
        needed = len(request.prompt_ids) + request.params.max_new_tokens
        dtype = self._weights.dtype
        if self._cache is not None and self._cache.fits(self.slots, needed, dtype):
            return True
        if self._active:
            return False
        self._allocate(max(len(h.request.prompt_ids) + h.request.params.max_new_tokens for h in self._waiting))
        return True

    def _allocate(self, length: int) -> None:
        self._cache = self._step = None  # free the old cache before allocating its successor
        self._prefixes.clear()
        weights = self._weights
        self._cache = SlotCache(self.model.config, self.slots, round_up_length(length), weights.dtype, weights.device)
        self._step = DecodeStep(self.model, self._cache, compile=self.compile)

    def _prefill(self, request: GenerationRequest, slot: int) -> torch.Tensor:
        """Prefill `request` into `slot`; returns the logits [vocab] for its first new token."""
        ids = list(request.prompt_ids)
        model, cache = self.model, self._cache
        alpha = model.transformer.ntk_alpha_for(len(ids))
        features = self._image_features(request)
        prefix_end = _image_end(ids, self.image_end_id) + 1
        share = request.image_key is not None and prefix_end < len(ids) and self._sharers(request, alpha, prefix_end)
        device = self._weights.device
        if share:
            key = (request.image_key, alpha, tuple(ids[:prefix_end]))
            prefix = self._prefixes.get(key)
            if prefix is None:
                self._forward(ids[:prefix_end], cache.writer(slot, 0), alpha, features)
                prefix = [(k[slot : slot + 1, :, :prefix_end].clone(), v[slot : slot + 1, :, :prefix_end].clone())
                          for k, v in zip(cache.keys, cache.values, strict=True)]
                self._prefixes.put(key, prefix)
                self.stats.prefix_prefills += 1
            else:
                cache.load_prefix(slot, [k for k, _ in prefix], [v for _, v in prefix])
            self.stats.prefix_reuses += 1
            mask = torch.ones(1, len(ids), dtype=torch.long, device=device)
            logits = self._forward(ids[prefix_end:], cache.writer(slot, prefix_end), alpha, None, mask)
        else:
            logits = self._forward(ids, cache.writer(slot, 0), alpha, features)
            self.stats.prefills += 1
        self._release_image(request)
        cache.inv_freq[slot] = model.transformer.rotary.inv_freq(alpha, device)
        cache.trained_length[slot] = float(model.config.seq_length)
        return logits

    def _forward(
        self,
        ids: list[int],
        writer: Any,
        alpha: float,
        features: torch.Tensor | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        input_ids = torch.tensor([ids], dtype=torch.long, device=self._weights.device)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            past_key_values=writer,
            image_embeds=None if features is None else features[None],
            use_cache=True,
            ntk_alphas=[alpha],
            logits_to_keep=1,
        )
        return out.logits[0, -1]

    def _sharers(self, request: GenerationRequest, alpha: float, prefix_end: int) -> bool:
        """Is the image prefix worth keeping: stored already, or wanted by another waiting request?"""
        key = (request.image_key, alpha, tuple(request.prompt_ids[:prefix_end]))
        if key in self._prefixes:
            return True
        for other in self._waiting:
            ids = other.request.prompt_ids
            if (
                other.request.image_key == request.image_key
                and tuple(ids[:prefix_end]) == key[2]
                and len(ids) > prefix_end
                and self.model.transformer.ntk_alpha_for(len(ids)) == alpha
            ):
                return True
        return False

    # --- vision features ----------------------------------------------------------------------------
    def _image_features(self, request: GenerationRequest) -> torch.Tensor:
        if request.image_embeds is not None:
            return request.image_embeds.to(self._weights.device)
        key = _feature_key(request)
        features = self._features.get(key)
        if features is None:
            self._encode_ahead(request)
            features = self._features.get(key)
        return features

    def _encode_ahead(self, first: GenerationRequest) -> None:
        """One ViT pass for `first` and the next waiting pages that have no features yet."""
        keys, images = [_feature_key(first)], [first.image]
        for handle in self._waiting:
            request = handle.request
            if len(keys) >= self.vision_batch:
                break
            key = _feature_key(request)
            if request.image_embeds is None and key not in keys and key not in self._features:
                keys.append(key)
                images.append(request.image)
        features = self.encode_images(images).to(self._weights.device)
        self.stats.vision_passes += 1
        self.stats.images_encoded += len(images)
        for key, row in zip(keys, features, strict=True):
            self._features.put(key, row, pinned=True)

    def _release_image(self, request: GenerationRequest) -> None:
        """Unpin features no waiting request needs any more (the LRU may still keep them for later requests)."""
        if request.image_embeds is not None:
            return
        key = _feature_key(request)
        if not any(_feature_key(h.request) == key for h in self._waiting if h.request.image_embeds is None):
            self._features.unpin(key)

    # --- decoding -----------------------------------------------------------------------------------
    def _start_decoding(self, slot: int, token: int) -> None:
        cache = self._cache
        cache.tokens[slot] = token
        cache.positions[slot] = len(self._active[slot].handle.request.prompt_ids)

    def _decode(self, finished: list[RequestHandle]) -> None:
        slots = sorted(self._active)
        batch = bucket_for(slots[-1] + 1, self.slots)
        handles = [self._active[slot].handle for slot in slots]
        try:
            logits = self._step(batch)
            generators = [self._active[slot].generator for slot in slots]
            chosen, tokens, details = self._choose(logits[slots], handles, generators)
            rows = torch.tensor(slots, device=chosen.device)
            self._cache.positions[rows] += 1
            self._cache.tokens[rows] = chosen
        except Exception as exc:  # e.g. out of memory: every running request fails, the engine stays usable
            for slot, handle in zip(slots, handles, strict=True):
                self._free_slot(slot)
                handle._fail(exc)
                finished.append(handle)
            return
        self.stats.decode_steps += 1
        self.stats.busiest_step = max(self.stats.busiest_step, len(slots))
        notices = [
            self._accept(slot, token, finished, *detail)
            for slot, token, detail in zip(slots, tokens, details, strict=True)
        ]
        _notify_all(notices)

    def _choose(
        self, logits: torch.Tensor, handles: Sequence[RequestHandle], generators: Sequence[torch.Generator | None]
    ) -> tuple[torch.Tensor, list[int], list[tuple[float, list[tuple[int, float]] | None]]]:
        """The next token of each row of `logits` [rows, vocab] (float32), as a tensor and a list (the host sync
        of a step), with its log-probability and the best (id, logprob) pairs where asked: log-probabilities of
        the raw logits, the tokens chosen after each request's constraint masked them."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        constrained = [row for row, handle in enumerate(handles) if handle.request.constraint is not None]
        if constrained:
            allowed = self._allowed(handles, constrained, logits.shape[-1], logits.device)
            logits = logits.masked_fill(~allowed, -torch.inf)
        chosen = choose_tokens(
            logits, [h.request.params for h in handles], [len(h.tokens) for h in handles], self.eos_id, generators
        )
        tokens = chosen.tolist()
        picked = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
        wanted = max(h.request.params.top_logprobs for h in handles)
        best: list[list[tuple[int, float]] | None] = [None] * len(handles)
        if wanted:
            values, ids = torch.topk(logprobs, wanted, dim=-1)
            values, ids = values.tolist(), ids.tolist()
            for row, handle in enumerate(handles):
                count = handle.request.params.top_logprobs
                if count:
                    best[row] = list(zip(ids[row][:count], values[row][:count], strict=True))
        return chosen, tokens, list(zip(picked, best, strict=True))

    def _allowed(
        self, handles: Sequence[RequestHandle], rows: list[int], vocab: int, device: torch.device
    ) -> torch.Tensor:
        """bool [len(handles), vocab]: the tokens each request's constraint allows (every token without one)."""
        bitmask = torch.full((len(handles), bitmask_words(vocab)), -1, dtype=torch.int32)
        for row in rows:
            handles[row].request.constraint.fill_next_token_bitmask(bitmask, row)
        bits = (bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1  # [rows, words, 32]
        return bits.flatten(1)[:, :vocab].bool().to(device)

    def _accept(
        self,
        slot: int,
        token: int,
        finished: list[RequestHandle],
        logprob: float = 0.0,
        best: list[tuple[int, float]] | None = None,
    ) -> Callable[[], None]:
        """Record `slot`'s new token; free the slot at <|endoftext|>, when its constraint terminates, or at the
        length limit.

        Returns what tells the outside world: the request's `on_token` for this token, then (if it is done) its
        result, in that order, so a streaming reader has every token before it sees the end.
        """
        handle = self._active[slot].handle
        constraint = handle.request.constraint
        reason = None
        error: BaseException | None = None
        if constraint is not None and not constraint.accept_token(token) and token != self.eos_id:
            error = ValueError(f"the request's constraint rejected token {token}, which it had allowed")
        elif token == self.eos_id:
            reason = FINISH_STOP
            handle.stop_logprob = logprob
        else:
            handle.tokens.append(token)
            handle.logprobs.append(logprob)
            if handle.top_logprobs is not None:
                handle.top_logprobs.append(best or [])
            self.stats.decoded_tokens += 1
            if constraint is not None and constraint.is_terminated():
                reason = FINISH_STOP
            elif len(handle.tokens) >= handle.request.params.max_new_tokens:
                reason = FINISH_LENGTH
        if reason is not None or error is not None:
            self._free_slot(slot)
            finished.append(handle)
        on_token = handle.request.on_token if reason != FINISH_STOP or token != self.eos_id else None
        on_token = None if error is not None else on_token

        def notify() -> None:
            try:
                if on_token is not None:
                    on_token(token)
            finally:
                if error is not None:
                    handle._fail(error)
                elif reason is not None:
                    handle._finish(reason)

        return notify

    def _free_slot(self, slot: int) -> None:
        del self._active[slot]
        self._cache.positions[slot] = 0  # an idle slot in a bucket writes harmlessly at its position 0
        heapq.heappush(self._free, slot)


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


def _image_end(ids: Sequence[int], image_end_id: int) -> int:
    try:
        return list(ids).index(image_end_id)
    except ValueError:
        raise ValueError("the prompt holds no <img>...</img> span") from None


def _feature_key(request: GenerationRequest) -> Hashable:
    return request.image_key if request.image_key is not None else ("request", id(request))


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

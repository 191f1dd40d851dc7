"""What a request can ask of the engine, and what it cannot break for the others.

Constrained decoding (a token mask is an input of the step), log-probabilities (equal to a teacher-forced
forward pass), fair admission across groups, sampling batched on the device with the same draws as the
row-by-row implementation it replaced (same seeds, same tokens), NaN-free for any temperature > 0 and top_p in
(0, 1], and failures that belong to one request (its sampling, its constraint) failing that request alone.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import pytest
import torch
from parity_cases import model, pixel_values
from test_engine import IMAGES, _alone, _always_stopping, _image, _prompt_ids, _scheduler

from monkey_cli.engine.constraints import TokenConstraint, set_bits
from monkey_cli.engine.sampling import SamplingParams, choose_tokens, sample
from monkey_cli.engine.scheduler import FINISH_LENGTH, FINISH_STOP, GenerationRequest

# tiny-monkey-sharp: the tokenizer has 2,217 ids, the model's vocabulary (lm_head) 2,304.
TOKENIZER_IDS = 2217
# float32 log-probabilities against a teacher-forced forward pass: tiny-monkey-sharp's logits tolerance (the
# fixtures' README: 1e-4) carries over to log-softmax (a difference of logits minus a log-sum-exp).
LOGPROB_ATOL = 1e-4


def _request(question: str = "Title?", image: int = 0, **params) -> GenerationRequest:
    return GenerationRequest(_prompt_ids(question), image=_image(IMAGES[image]), params=SamplingParams(**params))


# --- constraints -------------------------------------------------------------------------------------


class FixedSequence:
    """Allows exactly `tokens`, one after the other; complete after the last."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens, self.done = list(tokens), 0
        self.masks_asked = 0

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        self.masks_asked += 1
        set_bits(bitmask, index, [self.tokens[self.done]])

    def accept_token(self, token_id: int) -> bool:
        if token_id != self.tokens[self.done]:
            return False
        self.done += 1
        return True

    def is_terminated(self) -> bool:
        return self.done == len(self.tokens)


class AllowedSet:
    """Allows a fixed set of tokens, forever (the request ends at its length limit or <|endoftext|>)."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens = list(tokens)

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        set_bits(bitmask, index, self.tokens)

    def accept_token(self, token_id: int) -> bool:
        return token_id in self.tokens

    def is_terminated(self) -> bool:
        return False


class Broken(AllowedSet):
    """Raises at its `when`-th call of `where` ("fill" or "accept"), refuses, or allows nothing."""

    def __init__(self, where: str, when: int = 2) -> None:
        super().__init__(range(50, 60))
        self.where, self.when, self.calls = where, when, 0

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        self.calls += self.where in ("fill", "nothing")
        if self.calls >= self.when and self.where == "fill":
            raise RuntimeError("the grammar exploded")
        if self.calls >= self.when and self.where == "nothing":
            bitmask[index] = 0
            return
        super().fill_next_token_bitmask(bitmask, index)

    def accept_token(self, token_id: int) -> bool:
        self.calls += self.where in ("accept", "refuse")
        if self.calls >= self.when and self.where == "accept":
            raise RuntimeError("the grammar exploded")
        return not (self.calls >= self.when and self.where == "refuse")


def test_hand_written_constraints_fit_the_protocol() -> None:
    assert isinstance(FixedSequence([1]), TokenConstraint) and isinstance(AllowedSet([1]), TokenConstraint)


def test_a_fixed_sequence_constraint_is_followed_from_the_first_token() -> None:
    """The first token (chosen from the prefill) is masked too; the request ends with "stop" when the
    constraint is complete, without <|endoftext|>; an unconstrained request in the same steps is unaffected."""
    sharp = model("tiny-monkey-sharp", "float32")
    free = _request("Colour?", 1, max_new_tokens=8)
    expected_free = _alone(sharp, free)
    wanted = [77, 1500, 3, 2000 - 1, 640]  # ids the model would not choose by itself
    assert _alone(sharp, _request(max_new_tokens=5)) != wanted
    constraint = FixedSequence(wanted)
    constrained = GenerationRequest(_prompt_ids("Title?"), image=_image(IMAGES[0]), params=SamplingParams(20),
                                    constraint=constraint)  # fmt: skip
    scheduler = _scheduler(sharp, slots=2)
    results = scheduler.run([constrained, free])
    assert results[0].token_ids == wanted and results[0].finish_reason == FINISH_STOP
    assert results[0].stop_logprob is None  # it did not end with <|endoftext|>
    assert constraint.masks_asked == len(wanted)
    assert results[1].token_ids == expected_free


def test_a_constraint_never_allows_ids_beyond_the_tokenizer() -> None:
    """A constraint that sets every bit of its row (padding ids of lm_head included): the engine clears the
    ids the tokenizer does not have. The model here prefers id 2300 (not a token) everywhere."""
    sharp = copy.deepcopy(model("tiny-monkey-sharp", "float32"))
    boost = torch.zeros(sharp.config.vocab_size)
    boost[2300] = 50.0
    sharp.lm_head.register_forward_hook(lambda _module, _inputs, logits: logits + boost)
    assert set(_alone(sharp, _request(max_new_tokens=4))) == {2300}
    anything = AllowedSet(range(sharp.config.vocab_size))
    scheduler = _scheduler(sharp, slots=1)
    scheduler.vocab_limit = TOKENIZER_IDS  # what Monkey.scheduler passes (len(tokenizer))
    request = GenerationRequest(_prompt_ids("Title?"), image=_image(IMAGES[0]), params=SamplingParams(6),
                                constraint=anything)  # fmt: skip
    (result,) = scheduler.run([request])
    assert result.token_ids and all(token < TOKENIZER_IDS for token in result.token_ids)


class EndsAfter(AllowedSet):
    """Restricts nothing (`masks_tokens` False), ends the answer after `count` tokens: a stop string's kind."""

    masks_tokens = False

    def __init__(self, count: int) -> None:
        super().__init__([])
        self.count, self.accepted = count, 0

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        raise AssertionError("a constraint that masks nothing is never asked for a row")

    def accept_token(self, token_id: int) -> bool:
        self.accepted += 1
        return True

    def is_terminated(self) -> bool:
        return self.accepted >= self.count


def test_a_constraint_that_masks_nothing_decodes_the_free_tokens() -> None:
    """Stop strings are a constraint that only ends the answer: its tokens are the free answer's, ids beyond
    the tokenizer included (this model prefers id 2300, not a token, where the free answer may take it), and
    it ends with "stop" where it says."""
    sharp = copy.deepcopy(model("tiny-monkey-sharp", "float32"))
    boost = torch.zeros(sharp.config.vocab_size)
    boost[2300] = 4.0
    sharp.lm_head.register_forward_hook(lambda _module, _inputs, logits: logits + boost)
    scheduler = _scheduler(sharp, slots=2)
    scheduler.vocab_limit = TOKENIZER_IDS
    free = scheduler.run([_request(max_new_tokens=8)])[0].token_ids
    assert any(token >= TOKENIZER_IDS for token in free[:5]), free  # the premise: a masked row would differ
    request = GenerationRequest(_prompt_ids("Title?"), image=_image(IMAGES[0]), params=SamplingParams(8),
                                constraint=EndsAfter(5))  # fmt: skip
    (result,) = scheduler.run([request])
    assert result.token_ids == free[:5] and result.finish_reason == FINISH_STOP


def test_an_allowed_set_limits_greedy_and_sampled_tokens() -> None:
    sharp = model("tiny-monkey-sharp", "float32")
    allowed = list(range(300, 340))
    for params in (SamplingParams(10), SamplingParams(10, do_sample=True, temperature=1.5, seed=3)):
        request = GenerationRequest(_prompt_ids("Title?"), image=_image(IMAGES[0]), params=params,
                                    constraint=AllowedSet(allowed))  # fmt: skip
        (result,) = _scheduler(sharp, slots=1).run([request])
        assert len(result.token_ids) == 10 and set(result.token_ids) <= set(allowed)
        assert result.finish_reason == FINISH_LENGTH


@pytest.mark.parametrize("where", ["fill", "accept", "refuse", "nothing"])
def test_a_broken_constraint_fails_its_request_alone(where: str) -> None:
    """A constraint that raises (filling its mask or accepting a token), refuses the chosen token, or allows
    no token at all, at its second call: that request fails with the reason; the two others decoding in the
    same steps get their solo tokens."""
    sharp = model("tiny-monkey-sharp", "float32")
    others = [_request("Colour?", 1, max_new_tokens=8), _request("Shapes?", 2, max_new_tokens=8)]
    expected = [_alone(sharp, r) for r in others]
    broken = GenerationRequest(_prompt_ids("Title?"), image=_image(IMAGES[0]), params=SamplingParams(8),
                               constraint=Broken(where))  # fmt: skip
    scheduler = _scheduler(sharp, slots=3)
    handles = [scheduler.submit(r) for r in (others[0], broken, others[1])]
    while not all(h.done() for h in handles):
        scheduler.step()
    message = {"fill": "exploded", "accept": "exploded", "refuse": "refused token", "nothing": "allows no token"}
    with pytest.raises(Exception, match=message[where]):
        handles[1].wait()
    assert [handles[0].wait().token_ids, handles[2].wait().token_ids] == expected


# --- log-probabilities -------------------------------------------------------------------------------


def _teacher_logprobs(monkey_model, request: GenerationRequest, tokens: list[int]) -> torch.Tensor:
    """log-softmax of the model's float32 logits for each generated position, by one forward pass over the
    prompt and the answer (teacher-forced): [len(tokens) + 1, vocab]."""
    ids = torch.tensor([list(request.prompt_ids) + tokens])
    pixels = pixel_values(monkey_model, request.image)
    with torch.inference_mode():
        logits = monkey_model(input_ids=ids, pixel_values=pixels, use_cache=False).logits[0].float()
    return logits[len(request.prompt_ids) - 1 :].log_softmax(-1)


def test_logprobs_equal_a_teacher_forced_forward_pass() -> None:
    """Every chosen token's log-probability and the 5 best alternatives at every step, for a greedy and a
    sampled request decoding together: equal to the log-softmax of one teacher-forced float32 forward pass over
    the same tokens, within LOGPROB_ATOL; the best alternatives come best first."""
    sharp = model("tiny-monkey-sharp", "float32")
    requests = [
        _request("Title?", 0, max_new_tokens=12, top_logprobs=5),
        _request("Colour?", 1, max_new_tokens=12, do_sample=True, temperature=1.3, seed=11, top_logprobs=5),
    ]
    for request, result in zip(requests, _scheduler(sharp, slots=2).run(requests), strict=True):
        expected = _teacher_logprobs(sharp, request, result.token_ids)
        assert len(result.logprobs) == len(result.token_ids) == len(result.top_logprobs) == 12
        for step, (token, logprob, top) in enumerate(zip(result.token_ids, result.logprobs, result.top_logprobs,
                                                         strict=True)):  # fmt: skip
            assert abs(logprob - expected[step, token].item()) <= LOGPROB_ATOL
            values, ids = expected[step].topk(5)
            assert [v for _, v in top] == pytest.approx(values.tolist(), abs=LOGPROB_ATOL)
            assert [i for i, _ in top] == ids.tolist()
        assert result.stop_logprob is None and result.finish_reason == FINISH_LENGTH


def test_stop_logprob_and_logprobs_before_masks() -> None:
    """A model that always wants to stop, with min_new_tokens=3: the first three tokens are chosen with
    <|endoftext|> masked, but their log-probabilities are the raw model's (the masks do not renormalise them);
    the request then stops with <|endoftext|>, whose log-probability at that step is `stop_logprob`."""
    stopping = _always_stopping()
    request = _request(max_new_tokens=10, min_new_tokens=3)
    (result,) = _scheduler(stopping, slots=1).run([request])
    assert len(result.token_ids) == 3 and result.finish_reason == FINISH_STOP
    expected = _teacher_logprobs(stopping, request, result.token_ids)
    eos = stopping.config.eod_id
    for step, (token, logprob) in enumerate(zip(result.token_ids, result.logprobs, strict=True)):
        assert abs(logprob - expected[step, token].item()) <= LOGPROB_ATOL
        assert logprob < -1000  # <|endoftext|> holds nearly all the probability: the chosen token almost none
    assert result.top_logprobs is None  # none asked for
    assert abs(result.stop_logprob - expected[3, eos].item()) <= LOGPROB_ATOL
    assert result.stop_logprob > -1e-3


def test_top_logprobs_is_validated() -> None:
    for bad in (-1, 21):
        with pytest.raises(ValueError, match="top_logprobs"):
            SamplingParams(top_logprobs=bad)


# --- scored tokens (teacher-forced in the prefill) ----------------------------------------------------

# The same tokens scored in the prefill pass and decoded one step at a time (a FixedSequence answer): float32,
# prefill attention against the static decode step's.
SCORE_ATOL = 1e-5


def _scored(question: str, image: int, score_ids: list[int], key: str | None, **params) -> GenerationRequest:
    request = _request(question, image, **params)
    return GenerationRequest(request.prompt_ids, image=request.image, image_key=key, params=request.params,
                             score_ids=score_ids)  # fmt: skip


def test_score_ids_are_scored_in_the_prefill_and_leave_the_answer_as_it_was() -> None:
    """Three questions on one page (prefilled from its shared prefix, together) and one on another page (from
    position 0), each scoring its own tokens: the answers equal their solo runs without scoring; each
    score_logprobs equals a teacher-forced forward pass (LOGPROB_ATOL) and the log-probabilities of the same
    tokens decoded as a forced answer (SCORE_ATOL); the three questions' own tokens took one prefill pass."""
    sharp = model("tiny-monkey-sharp", "float32")
    eos = sharp.config.eod_id
    scores = [[101, 7, eos], [55], [9, 9, 9, 9, 9], [1500, 42, eos]]
    requests = [
        _scored("Title?", 0, scores[0], "page", max_new_tokens=6),
        _scored("Who wrote this report?", 0, scores[1], "page", max_new_tokens=6),
        _scored("How many rows does the table have?", 0, scores[2], "page", max_new_tokens=3),
        _scored("Colour?", 1, scores[3], None, max_new_tokens=6),
    ]
    scheduler = _scheduler(sharp, slots=4)
    results = scheduler.run(requests)
    assert (scheduler.stats.prefix_prefills, scheduler.stats.suffix_prefill_passes) == (1, 1)
    assert (scheduler.stats.prefills, scheduler.stats.prefill_passes) == (1, 1)
    assert scheduler.stats.scored_tokens == sum(map(len, scores))
    for request, result, score_ids in zip(requests, results, scores, strict=True):
        plain = copy.copy(request)
        plain.score_ids = ()
        (unscored,) = _scheduler(sharp, slots=1).run([plain])
        assert result.token_ids == unscored.token_ids and unscored.score_logprobs is None
        assert result.logprobs == pytest.approx(unscored.logprobs, abs=SCORE_ATOL)
        expected = _teacher_logprobs(sharp, request, score_ids[:-1])
        teacher = [expected[step, token].item() for step, token in enumerate(score_ids)]
        assert result.score_logprobs == pytest.approx(teacher, abs=LOGPROB_ATOL)
        forced = copy.copy(plain)
        forced.params, forced.constraint = SamplingParams(max_new_tokens=len(score_ids)), FixedSequence(score_ids)
        (decoded,) = _scheduler(sharp, slots=1).run([forced])
        ended = [decoded.stop_logprob] if decoded.stop_logprob is not None else []  # 2000 is <|endoftext|>
        assert decoded.token_ids + [sharp.config.eod_id] * len(ended) == score_ids
        assert result.score_logprobs == pytest.approx(decoded.logprobs + ended, abs=SCORE_ATOL)


def test_score_ids_outside_the_vocabulary_are_refused_at_submit() -> None:
    sharp = model("tiny-monkey-sharp", "float32")
    for bad in (-1, sharp.config.vocab_size):
        with pytest.raises(ValueError, match=f"score_ids: token {bad} is outside the vocabulary"):
            _scheduler(sharp, slots=1).submit(_scored("Title?", 0, [5, bad], None))


# --- fair admission ----------------------------------------------------------------------------------


def test_groups_take_turns_for_free_slots() -> None:
    """One slot. Group "big" submits five requests, then group "small" one, then two ungrouped requests:
    admission goes big, small, ungrouped, ungrouped, big, big, ...: the small group's single request waits for
    one of big's, not five; ungrouped requests keep their arrival order (each is a group of its own)."""
    sharp = model("tiny-monkey-sharp", "float32")
    scheduler = _scheduler(sharp, slots=1)
    names = ["big"] * 5 + ["small", None, None]
    handles = []
    for i, group in enumerate(names):
        request = GenerationRequest(_prompt_ids("Title?"), image=_image(IMAGES[0]), image_key="page",
                                    params=SamplingParams(2), group=group)  # fmt: skip
        handles.append((f"{group}-{i}", scheduler.submit(request)))
    while not all(h.done() for _, h in handles):
        scheduler.step()
    order = [name for name, handle in sorted(handles, key=lambda item: item[1].started_at)]
    assert order == ["big-0", "small-5", "None-6", "None-7", "big-1", "big-2", "big-3", "big-4"]
    first = handles[0][1].wait().token_ids
    assert all(handle.wait().token_ids == first for _, handle in handles)  # the same question, the same answer


def test_a_group_arriving_later_is_served_before_the_rest_of_an_earlier_one() -> None:
    sharp = model("tiny-monkey-sharp", "float32")
    scheduler = _scheduler(sharp, slots=1)
    big = [scheduler.submit(GenerationRequest(_prompt_ids("T?"), image=_image(IMAGES[0]), image_key="p",
                                              params=SamplingParams(2), group="big")) for _ in range(4)]  # fmt: skip
    scheduler.step()  # big's first request runs
    late = scheduler.submit(GenerationRequest(_prompt_ids("T?"), image=_image(IMAGES[0]), image_key="p",
                                              params=SamplingParams(2), group="late"))  # fmt: skip
    while not late.done():
        scheduler.step()
    assert sum(h.done() for h in big) <= 2  # at most one more of big's went first


# --- sampling: batched, same draws, NaN-safe ----------------------------------------------------------


def _reference_choose(logits, params, generated, eos_id, generators) -> list[int]:
    """The engine's sampling before it was batched (row by row, torch.multinomial): the reference draws."""
    too_early = [count < p.min_new_tokens for count, p in zip(generated, params, strict=True)]
    if any(too_early):
        logits = logits.clone()
        logits[torch.tensor(too_early), eos_id] = float("-inf")
    chosen = logits.argmax(dim=-1)
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        scores = logits[row] / p.temperature
        if p.top_k and p.top_k < scores.shape[-1]:
            kth_best = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth_best, float("-inf"))
        if p.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=True)
            before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)
            drop = before >= p.top_p
            scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        chosen[row] = torch.multinomial(scores.softmax(-1), 1, generator=generator)[0]
    return chosen.tolist()


def test_batched_sampling_draws_what_row_by_row_multinomial_drew() -> None:
    """200 steps of a batch of six rows (greedy, plain sampling, top-k, top-p, both, min_new_tokens active),
    each sampling row with its own seeded generator: the batched sampler chooses exactly the tokens the old
    row-by-row implementation (kept above as the reference) chose with the same seeds, and leaves each generator
    in the same state. (Bitwise on the CPU; on CUDA the old code multiplied by the reciprocal of the
    temperature, so a draw at an exact tie of the last bit could differ.)"""
    params = [
        SamplingParams(do_sample=False),
        SamplingParams(do_sample=True, temperature=0.7, seed=1),
        SamplingParams(do_sample=True, temperature=1.3, top_k=20, seed=2),
        SamplingParams(do_sample=True, top_p=0.6, seed=3),
        SamplingParams(do_sample=True, temperature=0.9, top_k=50, top_p=0.9, seed=4, min_new_tokens=500),
        SamplingParams(do_sample=True, temperature=2.0, top_p=0.999, seed=5),
    ]
    ours = [p.generator("cpu") for p in params]
    theirs = [p.generator("cpu") for p in params]
    noise = torch.Generator().manual_seed(0)
    eos = 7
    for step in range(200):
        logits = torch.randn(len(params), 1000, generator=noise) * 4
        generated = [step] * len(params)
        new = choose_tokens(logits.clone(), params, generated, eos, ours).tolist()
        old = _reference_choose(logits.clone(), params, generated, eos, theirs)
        assert new == old, f"step {step}"
    for a, b in zip(ours, theirs, strict=True):
        assert a is None or torch.equal(a.get_state(), b.get_state())


def test_sampling_through_the_engine_repeats_and_compiled_equals_eager() -> None:
    sharp = model("tiny-monkey-sharp", "float32")
    requests = [_request(q, i, max_new_tokens=10, do_sample=True, temperature=1.2, top_p=0.9, seed=i + 1)
                for i, q in enumerate(("Title?", "Colour?"))]  # fmt: skip
    eager = _scheduler(sharp, slots=2).run([copy.copy(r) for r in requests])
    again = _scheduler(sharp, slots=1).run([copy.copy(r) for r in requests])
    compiled = _scheduler(sharp, slots=2, compile=True).run([copy.copy(r) for r in requests])
    assert [r.token_ids for r in eager] == [r.token_ids for r in again] == [r.token_ids for r in compiled]


@pytest.mark.parametrize(("temperature", "top_p"), [(1e-300, 1.0), (1.0, 1e-300), (1e-300, 1e-300), (1e-45, 0.5),
                                                     (1e30, 1.0), (5e-39, 1e-38)])  # fmt: skip
def test_sampling_never_makes_nan(temperature: float, top_p: float) -> None:
    """Extreme but valid settings: never NaN, always a token the scores allow; a tiny temperature or top_p
    takes the best token (as greedy). Before, temperature 1e-300 divided the logits into inf and NaN, and
    torch.multinomial raised for the whole batch."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 2304, generator=generator) * 10
    logits[1, 100:] = float("-inf")  # a row that allows only 100 tokens
    rows = logits.shape[0]
    noise = torch.empty_like(logits).exponential_(generator=generator)
    chosen = sample(
        logits, torch.full((rows,), temperature), torch.full((rows,), top_p), torch.zeros(rows, dtype=torch.long),
        noise,
    )
    assert chosen.dtype == torch.long and torch.isfinite(logits.gather(1, chosen[:, None])).all()
    if temperature < 1e-30 or top_p < 1e-30:
        assert torch.equal(chosen, logits.argmax(-1))


def test_tiny_temperature_and_top_p_requests_answer_like_greedy() -> None:
    sharp = model("tiny-monkey-sharp", "float32")
    greedy = _alone(sharp, _request(max_new_tokens=10))
    for extreme in ({"temperature": 1e-300}, {"top_p": 1e-300}, {"temperature": 1e-300, "top_p": 1e-300}):
        assert _alone(sharp, _request(max_new_tokens=10, do_sample=True, seed=1, **extreme)) == greedy


# --- failures that belong to one request --------------------------------------------------------------


class _BrokenGenerator(SamplingParams):
    """Sampling whose random generator cannot draw (a library's generator for another device, say)."""

    def generator(self, device):  # noqa: ANN001 - SamplingParams' signature
        return "not a generator"


class _NoGenerator(SamplingParams):
    def generator(self, device):  # noqa: ANN001
        raise RuntimeError("no random generator for this device")


@pytest.mark.parametrize("params", [_BrokenGenerator(8, do_sample=True), _NoGenerator(8, do_sample=True)],
                         ids=["draw-fails", "generator-fails"])  # fmt: skip
def test_a_failing_sampler_fails_its_request_alone(params: SamplingParams) -> None:
    sharp = model("tiny-monkey-sharp", "float32")
    others = [_request("Colour?", 1, max_new_tokens=8), _request("Shapes?", 2, max_new_tokens=8,
                                                                  do_sample=True, seed=4)]  # fmt: skip
    expected = [_alone(sharp, r) for r in others]
    broken = GenerationRequest(_prompt_ids("Title?"), image=_image(IMAGES[0]), params=params)
    scheduler = _scheduler(sharp, slots=3)
    handles = [scheduler.submit(r) for r in (others[0], broken, others[1])]
    while not all(h.done() for h in handles):
        scheduler.step()
    with pytest.raises(Exception):  # noqa: B017, PT011 - what the library raises is its own
        handles[1].wait()
    assert [handles[0].wait().token_ids, handles[2].wait().token_ids] == expected
    assert not math.isnan(sum(handles[0].wait().logprobs))

"""The generation engine: static KV cache, the (compiled) decode step, continuous batching, prefix reuse.

Parity: every float32 fixture case teacher-forced through the static step, eager and compiled with
torch.compile on the CPU (inductor): logits within the fixture README's tolerance and greedy tokens identical to
the original's; every bfloat16 case within the eager path's tolerance. The compiled step is one graph per batch
bucket: no recompilation across prompts, NTK regimes or trained lengths (dynamo's counters). The scheduler:
continuous batching and prefix reuse give each request exactly the tokens it gets alone.
"""

from __future__ import annotations

import copy
import warnings
from functools import cache

import pytest
import torch
from conftest import require_parity
from parity_cases import (
    BF16_CASES,
    FP32_LOGITS_ATOL,
    FP32_SETS,
    StaticTeacher,
    case_checkpoint,
    cases,
    empty_span_ids,
    greedy_divergence,
    model,
    pixel_values,
    tokenizer,
    trained_length,
)
from safetensors.torch import load_file
from test_bf16_parity import check_bf16_case

from monkey_cli.engine.cache import SlotCache
from monkey_cli.engine.sampling import SamplingParams, choose_tokens
from monkey_cli.engine.scheduler import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, GenerationRequest, Scheduler
from monkey_cli.engine.step import DecodeStep, bucket_for, buckets

IMAGES = ("doc_page_1240x1754.png", "shapes_640x480.png", "rgba_700x500.png")


@cache
def _teacher(checkpoint: str, dtype: str, compiled: bool) -> StaticTeacher:
    """One static cache and step per model, reused by every case (and by every NTK regime)."""
    return StaticTeacher(model(checkpoint, dtype), compile=compiled)


@cache
def _pixels(checkpoint: str, dtype: str, relative: str) -> torch.Tensor:
    return pixel_values(model(checkpoint, dtype), require_parity("tiny_cases") / relative)


def _fp32_params() -> list:
    return [
        pytest.param(checkpoint, index_dir, i, compiled, id=f"{checkpoint}-{i}-{'compiled' if compiled else 'eager'}")
        for compiled in (False, True)
        for checkpoint, index_dir, count in FP32_SETS
        for i in range(count)
    ]


@pytest.mark.parametrize(("checkpoint", "index_dir", "number", "compiled"), _fp32_params())
def test_static_step_matches_fp32_reference(checkpoint: str, index_dir: str, number: int, compiled: bool) -> None:
    case = cases(index_dir)[number]
    reference = load_file(require_parity(f"tiny_cases/{index_dir}") / case["file"])
    teacher = _teacher(checkpoint, "float32", compiled)
    with trained_length(teacher.model, case["seq_length"]):
        pixels = _pixels(checkpoint, "float32", case["image_path"])
        logits = teacher.run(empty_span_ids(checkpoint, case), pixels, reference["generated_ids"])
    error = (logits - reference["step_logits"]).abs().max().item()
    assert error <= FP32_LOGITS_ATOL[checkpoint], f"step logits differ by {error:.2e}"
    eos = teacher.model.config.eod_id
    assert greedy_divergence(logits, case["generated_ids"], eos) is None, "greedy tokens differ from the original"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("number", range(BF16_CASES))
def test_static_step_matches_bf16_reference(number: int, compiled: bool) -> None:
    case = cases("bf16")[number]
    checkpoint = case_checkpoint(case, "bf16", "")
    teacher = _teacher(checkpoint, "bfloat16", compiled)
    reference = torch.tensor(case["generated_ids"])
    with trained_length(teacher.model, case["seq_length"]):
        pixels = _pixels(checkpoint, "bfloat16", case["image_path"])
        logits = teacher.run(empty_span_ids(checkpoint, case), pixels, reference)
    # Greedy decoding follows the reference up to the first step whose arg-max differs (if any).
    k = greedy_divergence(logits, case["generated_ids"], teacher.model.config.eod_id)
    generated = case["generated_ids"] if k is None else [*case["generated_ids"][:k], -1]
    check_bf16_case(case, logits, generated, "compiled" if compiled else "static eager")


# --- compilation -----------------------------------------------------------------------------------


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_buckets() -> None:
    assert buckets(1) == [1]
    assert buckets(6) == [1, 2, 4, 6]
    assert buckets(8) == [1, 2, 4, 8]
    assert [bucket_for(n, 6) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]


def test_compiled_step_never_recompiles_within_a_bucket() -> None:
    """32+ decode steps with 4 and then 3 busy slots (one bucket), sequences in both NTK regimes (alpha 1 and 3)
    and logn past the trained length: one graph, compiled with fullgraph=True, and the eager tokens."""
    sharp = model("tiny-monkey-sharp", "float32")
    short, long_ = "What is the title?", "What is the title of this page, and who wrote it, and when, and why?"
    ids = [_prompt_ids(question) for question in (short, short, long_, long_)]
    with trained_length(sharp, len(ids[0]) + 3):  # short prompts: alpha 1; long ones: alpha 3; logn while decoding
        alphas = {sharp.transformer.ntk_alpha_for(len(i)) for i in ids}
        assert alphas == {1.0, 3.0}
        lengths = (6, 40, 40, 40)  # slot 0 finishes early: batches of 4, then 3, all in bucket 4

        def requests() -> list[GenerationRequest]:
            return [
                GenerationRequest(prompt_ids, image=_image(IMAGES[i % 3]), params=SamplingParams(max_new_tokens=n))
                for i, (prompt_ids, n) in enumerate(zip(ids, lengths, strict=True))
            ]

        eager = _scheduler(sharp, slots=4).run(requests())
        compiled = _scheduler(sharp, slots=4, compile=True)
        handles = [compiled.submit(request) for request in requests()]
        compiled.step()  # admission + the first decode step: compiles the bucket-4 graph
        graphs = _graph_count()
        steps = 0
        while not all(handle.done() for handle in handles):
            compiled.step()
            steps += 1
        assert steps >= 32
        assert _graph_count() == graphs, "the decode step recompiled"
    assert [handle.wait().token_ids for handle in handles] == [result.token_ids for result in eager]
    assert compiled._step.compiled


def test_decode_step_traces_as_one_graph() -> None:
    """fullgraph=True fails on any graph break; check the eager function traces whole with dynamo too."""
    sharp = model("tiny-monkey-sharp", "float32")
    cache_ = SlotCache(sharp.config, 2, 256, torch.float32, "cpu")
    step = DecodeStep(sharp, cache_, compile=False)
    explanation = torch._dynamo.explain(step._eager)(torch.empty(2, 0), torch.empty(256, 0))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# --- scheduling ------------------------------------------------------------------------------------


def _image(name: str):
    return require_parity("tiny_cases/images") / name


def _prompt_ids(question: str) -> list[int]:
    return tokenizer("tiny-monkey-sharp").encode(f"<img></img> {question} Answer: ")


_FEATURES: dict[tuple[int, str], torch.Tensor] = {}


def _encoder(monkey_model):
    """The model's vision tower, memoised per page across tests (the scheduler still counts every call)."""

    def features(image) -> torch.Tensor:
        key = (id(monkey_model), str(image))
        if key not in _FEATURES:
            with torch.inference_mode():
                _FEATURES[key] = monkey_model.encode_images(pixel_values(monkey_model, image))[0]
        return _FEATURES[key]

    def encode(images):
        return torch.stack([features(image) for image in images])

    return encode


def _scheduler(monkey_model, slots: int, compile: bool = False) -> Scheduler:
    return Scheduler(monkey_model, _encoder(monkey_model), slots=slots, compile=compile)


def _alone(monkey_model, request: GenerationRequest) -> list[int]:
    return _scheduler(monkey_model, slots=1).run([copy.copy(request)])[0].token_ids


def _always_stopping():
    """tiny-monkey-sharp whose <|endoftext|> logit always wins once min_new_tokens allows it."""
    stopping = copy.deepcopy(model("tiny-monkey-sharp", "float32"))
    boost = torch.zeros(stopping.config.vocab_size)
    boost[stopping.config.eod_id] = 1e4
    stopping.lm_head.register_forward_hook(lambda _module, _inputs, logits: logits + boost)
    return stopping


def test_continuous_batching_equals_one_at_a_time_in_order() -> None:
    """Seven requests on three pages, answers ending at different steps (by <|endoftext|> right after their
    min_new_tokens, or by their length limit), two slots: every answer equals its solo run, in order."""
    stopping = _always_stopping()
    questions = ["What is the title?", "Who wrote it?", "Describe the page.", "What colour is it?"]
    params = [
        SamplingParams(max_new_tokens=3),
        SamplingParams(max_new_tokens=20, min_new_tokens=9),
        SamplingParams(max_new_tokens=7),
        SamplingParams(max_new_tokens=24, min_new_tokens=2),
        SamplingParams(max_new_tokens=1),
        SamplingParams(max_new_tokens=12, min_new_tokens=12),
        SamplingParams(max_new_tokens=16, min_new_tokens=5),
    ]
    requests = [
        GenerationRequest(_prompt_ids(questions[i % 4]), image=_image(IMAGES[i % 3]), params=p)
        for i, p in enumerate(params)
    ]
    scheduler = _scheduler(stopping, slots=2)
    results = scheduler.run(requests)
    solo = [_alone(stopping, request) for request in requests]
    assert [r.token_ids for r in results] == solo
    reasons = [r.finish_reason for r in results]
    assert FINISH_STOP in reasons and FINISH_LENGTH in reasons
    assert len({len(r.token_ids) for r in results}) >= 4, "answers must end at different steps"
    for result, p in zip(results, params, strict=True):
        assert p.min_new_tokens <= len(result.token_ids) <= p.max_new_tokens


def test_requests_join_while_others_decode() -> None:
    """A request submitted mid-run starts in the freed slot and still gets its solo tokens."""
    sharp = model("tiny-monkey-sharp", "float32")
    scheduler = _scheduler(sharp, slots=2)
    first = [
        scheduler.submit(GenerationRequest(_prompt_ids("Title?"), image=_image(IMAGES[0]), params=SamplingParams(4))),
        scheduler.submit(GenerationRequest(_prompt_ids("Colour?"), image=_image(IMAGES[1]), params=SamplingParams(30))),
    ]
    for _ in range(6):
        scheduler.step()
    assert first[0].done() and not first[1].done()
    late = GenerationRequest(_prompt_ids("Shapes?"), image=_image(IMAGES[2]), params=SamplingParams(10))
    handle = scheduler.submit(late)
    while not (handle.done() and first[1].done()):
        scheduler.step()
    assert handle.wait().token_ids == _alone(sharp, late)
    assert first[1].wait().token_ids == _alone(sharp, first[1].request)


def test_prefix_reuse_equals_separate_runs() -> None:
    """Three questions on one page: one ViT pass, one prefill of the image prefix, the same tokens and (within
    fp32 noise) the same first-step logits as three separate runs."""
    sharp = model("tiny-monkey-sharp", "float32")
    questions = ["What is the title?", "Who wrote this report?", "How many rows does the table have?"]
    requests = [
        GenerationRequest(_prompt_ids(q), image=_image(IMAGES[0]), image_key="page-a", params=SamplingParams(12))
        for q in questions
    ]
    scheduler = _scheduler(sharp, slots=3)
    shared = scheduler.run(requests)
    assert scheduler.stats.vision_passes == 1
    assert scheduler.stats.prefix_prefills == 1 and scheduler.stats.prefix_reuses == 3
    assert scheduler.stats.prefills == 0
    assert scheduler.stats.suffix_prefill_passes == 1  # the three questions' own tokens, in one padded pass
    separate = [_alone(sharp, request) for request in requests]
    assert [r.token_ids for r in shared] == separate
    assert len({tuple(s) for s in separate}) == 3, "the answers should differ, or the test proves little"


def test_a_batch_after_prefixes_writes_every_slot_and_attends_to_its_own_prefix() -> None:
    """BatchWriter from a start position: each prompt's block goes into its own slot after the prefix already
    there, and attention gets each slot's prefix then its new keys, for consecutive slots (a view of the cache)
    and for slots out of order (a gather, after an admission failed)."""
    config = model("tiny-monkey-sharp", "float32").config
    for slots in ([1, 2, 3], [3, 0]):
        cache = SlotCache(config, 4, 64, torch.float32, "cpu")
        for layer in range(config.num_hidden_layers):
            cache.keys[layer].normal_()
            cache.values[layer].normal_()
        before = [k.clone() for k in cache.keys]
        writer = cache.batch_writer(slots, [5, 3, 4][: len(slots)], start=10)
        assert writer.get_seq_length() == 10
        new = torch.randn(len(slots), config.num_attention_heads, 5, config.head_dim)
        keys, values = writer.update(new, new + 1, layer_idx=1)
        assert keys.shape == (len(slots), config.num_attention_heads, 15, config.head_dim)
        for row, slot in enumerate(slots):
            assert torch.equal(keys[row, :, :10], before[1][slot, :, :10])  # its own prefix
            assert torch.equal(keys[row, :, 10:], new[row]) and torch.equal(values[row, :, 10:], new[row] + 1)
            assert torch.equal(cache.keys[1][slot, :, 10:15], new[row])
        untouched = [slot for slot in range(4) if slot not in slots]
        assert all(torch.equal(cache.keys[1][slot], before[1][slot]) for slot in untouched)


def test_prefix_is_not_shared_across_ntk_regimes() -> None:
    """The original rotates keys with the alpha of the whole prompt: questions whose prompts get another alpha
    need their own prefix, and still answer as alone."""
    sharp = model("tiny-monkey-sharp", "float32")
    questions = ["Title?", "Author?", "What is the title of this page, who wrote it, when and why?", "And the date?"]
    ids = [_prompt_ids(q) for q in questions]
    with trained_length(sharp, len(ids[0]) + 2):
        alphas = [sharp.transformer.ntk_alpha_for(len(i)) for i in ids]
        assert alphas[0] == alphas[1] != alphas[2]
        requests = [
            GenerationRequest(i, image=_image(IMAGES[1]), image_key="page-b", params=SamplingParams(8)) for i in ids
        ]
        scheduler = _scheduler(sharp, slots=4)
        results = scheduler.run(requests)
        assert scheduler.stats.vision_passes == 1
        sharing = sum(alphas.count(a) > 1 for a in set(alphas))
        assert scheduler.stats.prefix_prefills == sharing
        assert [r.token_ids for r in results] == [_alone(sharp, r) for r in requests]


def test_vision_runs_once_for_a_batch_of_pages() -> None:
    sharp = model("tiny-monkey-sharp", "float32")
    scheduler = _scheduler(sharp, slots=3)
    scheduler.run(
        [GenerationRequest(_prompt_ids("Title?"), image=_image(name), params=SamplingParams(2)) for name in IMAGES]
    )
    assert scheduler.stats.vision_passes == 1 and scheduler.stats.images_encoded == 3


def test_cancel_frees_the_slot_and_spares_the_others() -> None:
    sharp = model("tiny-monkey-sharp", "float32")
    scheduler = _scheduler(sharp, slots=2)
    keep = GenerationRequest(_prompt_ids("Title?"), image=_image(IMAGES[0]), params=SamplingParams(16))
    drop = GenerationRequest(_prompt_ids("Colour?"), image=_image(IMAGES[1]), params=SamplingParams(16))
    waiting = GenerationRequest(_prompt_ids("Shapes?"), image=_image(IMAGES[2]), params=SamplingParams(6))
    handles = [scheduler.submit(r) for r in (keep, drop, waiting)]
    for _ in range(3):
        scheduler.step()
    handles[1].cancel()
    while not all(h.done() for h in handles):
        scheduler.step()
    assert handles[1].wait().finish_reason == FINISH_CANCELLED
    assert len(handles[1].wait().token_ids) < 16
    assert handles[0].wait().token_ids == _alone(sharp, keep)
    assert handles[2].wait().token_ids == _alone(sharp, waiting)


def test_a_failing_request_fails_alone(tmp_path) -> None:
    sharp = model("tiny-monkey-sharp", "float32")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    scheduler = _scheduler(sharp, slots=2)
    good = GenerationRequest(_prompt_ids("Title?"), image=_image(IMAGES[0]), params=SamplingParams(5))
    handles = [
        scheduler.submit(GenerationRequest(_prompt_ids("Title?"), image=broken, params=SamplingParams(5))),
        scheduler.submit(good),
    ]
    while not all(h.done() for h in handles):
        scheduler.step()
    with pytest.raises(Exception, match="broken.png|image"):
        handles[0].wait()
    assert handles[1].wait().token_ids == _alone(sharp, good)


def test_streaming_callbacks_see_every_token_before_the_end() -> None:
    sharp = model("tiny-monkey-sharp", "float32")
    scheduler = _scheduler(sharp, slots=2)
    seen: list[tuple[int, bool]] = []
    holder = {}

    def on_token(token: int) -> None:
        seen.append((token, holder["handle"].done()))

    holder["handle"] = scheduler.submit(
        GenerationRequest(_prompt_ids("Title?"), image=_image(IMAGES[0]), params=SamplingParams(9), on_token=on_token)
    )
    while not holder["handle"].done():
        scheduler.step()
    assert [token for token, _ in seen] == holder["handle"].wait().token_ids
    assert not any(done for _, done in seen), "a token arrived after the request was marked done"


# --- sampling --------------------------------------------------------------------------------------


def test_sampling_filters_match_transformers() -> None:
    """Our top-k / top-p keep exactly the tokens transformers' warpers keep."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    generator = torch.Generator().manual_seed(0)
    for top_k, top_p in ((5, 1.0), (0, 0.5), (0, 0.9), (20, 0.3), (0, 0.999)):
        logits = torch.randn(1, 300, generator=generator) * 3
        expected = logits.clone()
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p < 1:
            expected = TopPLogitsWarper(top_p)(None, expected)
        params = SamplingParams(do_sample=True, top_k=top_k, top_p=top_p, seed=1)
        kept = torch.isfinite(expected[0])
        draws = {
            choose_tokens(logits.clone(), [params], [5], 299, [torch.Generator().manual_seed(s)]).item()
            for s in range(200)
        }
        assert draws <= set(torch.nonzero(kept).flatten().tolist())
        assert len(draws) > 1 or kept.sum() == 1


def test_greedy_like_sampling_settings_equal_greedy() -> None:
    sharp = model("tiny-monkey-sharp", "float32")
    base = GenerationRequest(_prompt_ids("Title?"), image=_image(IMAGES[0]), params=SamplingParams(10))
    greedy = _alone(sharp, base)
    for params in (
        SamplingParams(10, do_sample=True, top_k=1, seed=3),
        SamplingParams(10, do_sample=True, temperature=0.0),
    ):
        assert _alone(sharp, GenerationRequest(base.prompt_ids, image=base.image, params=params)) == greedy


def test_seeded_sampling_repeats_and_seeds_differ() -> None:
    sharp = model("tiny-monkey-sharp", "float32")

    def sample(seed: int) -> list[int]:
        params = SamplingParams(12, do_sample=True, temperature=1.5, seed=seed)
        return _alone(sharp, GenerationRequest(_prompt_ids("Title?"), image=_image(IMAGES[0]), params=params))

    assert sample(7) == sample(7)
    assert len({tuple(sample(seed)) for seed in range(4)}) > 1


def test_sampling_params_are_validated() -> None:
    for bad in (
        {"max_new_tokens": 0},
        {"min_new_tokens": 5, "max_new_tokens": 4},
        {"temperature": -1.0},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_min_new_tokens_forbids_an_empty_answer() -> None:
    """A model that always wants to stop still answers exactly one token with the default min_new_tokens=1."""
    stopping = _always_stopping()
    request = GenerationRequest(_prompt_ids("Title?"), image=_image(IMAGES[0]), params=SamplingParams(8))
    result = _scheduler(stopping, slots=1).run([request])[0]
    assert len(result.token_ids) == 1 and result.finish_reason == FINISH_STOP
    zero = GenerationRequest(request.prompt_ids, image=request.image, params=SamplingParams(8, min_new_tokens=0))
    assert _scheduler(stopping, slots=1).run([zero])[0].token_ids == []


def test_engine_loop_serves_requests_from_many_threads() -> None:
    """Eight threads submit at once through the background loop: every answer equals its solo run, the
    decode steps batched several sequences together, and closing fails what is left instead of hanging."""
    import threading

    from monkey_cli.engine.loop import EngineLoop

    sharp = model("tiny-monkey-sharp", "float32")
    questions = ["Title?", "Author?", "Date?", "Colour?", "Shapes?", "Rows?", "Total?", "Name?"]
    requests = [
        GenerationRequest(_prompt_ids(q), image=_image(name), image_key=name, params=SamplingParams(6))
        for q, name in zip(questions, IMAGES * 3, strict=False)
    ]
    scheduler = _scheduler(sharp, slots=4)
    loop = EngineLoop(scheduler)
    results: dict[int, list[int]] = {}
    start = threading.Barrier(len(requests))

    def client(i: int) -> None:
        start.wait()
        results[i] = loop.submit(requests[i]).wait(timeout=120).token_ids

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert [results[i] for i in range(len(requests))] == [_alone(sharp, r) for r in requests]
    assert scheduler.stats.busiest_step > 1
    assert loop.pending == 0
    slow = loop.submit(GenerationRequest(_prompt_ids("Title?"), image=_image(IMAGES[0]), params=SamplingParams(500)))
    loop.close()
    with pytest.raises((RuntimeError, TimeoutError)):
        slow.wait(timeout=5)


def test_incremental_decoder_never_splits_a_character() -> None:
    """Token by token, the pieces join to the whole text and none holds a broken character."""
    from monkey_cli.engine.streaming import IncrementalDecoder
    from monkey_cli.model.tokenizer import QWenTokenizer

    tokenizer = QWenTokenizer.from_dir(require_parity("tiny-monkey"))  # 2000 ranks: multi-byte text splits
    text = "  Total: 42 €, 合计 ¥ 300 👍🏽 — done."
    ids = tokenizer.encode(text)
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(token) for token in ids]
    assert "".join(pieces) == text.lstrip()
    assert not any("\ufffd" in piece for piece in pieces)
    assert sum(piece == "" for piece in pieces) > 0, "some tokens end inside a character: the test must see one"


def test_memory_plan_counts_the_engine_cache() -> None:
    """The plan's KV term is what the engine allocates: its slots' cache and the kept image prefixes."""
    from monkey_cli.engine.cache import round_up_length
    from monkey_cli.model.memory import KEPT_PREFIXES, plan

    config = model("tiny-monkey-sharp", "float32").config
    estimate = plan(config, "none", "float32", batch_size=3, prompt_tokens=1300, max_new_tokens=40)
    cache = SlotCache(config, 3, round_up_length(1300 + 40), torch.float32, "cpu")
    prefixes = KEPT_PREFIXES * 2 * config.num_hidden_layers * 1300 * config.hidden_size * 4
    assert estimate.kv_cache_bytes == cache.nbytes + prefixes


def test_a_step_that_cannot_compile_runs_eagerly(monkeypatch) -> None:
    """A backend failure (a kernel library without compile support, a CUDA graph capture refused) is one
    warning, then the eager step: the same tokens, never a failed request."""
    sharp = model("tiny-monkey-sharp", "float32")
    request = GenerationRequest(_prompt_ids("Title?"), image=_image(IMAGES[0]), params=SamplingParams(6))

    def broken_compile(function, **_options):
        def fails(*_args):
            raise RuntimeError("operation not permitted when stream is capturing")

        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    scheduler = _scheduler(sharp, slots=1, compile=True)
    with pytest.warns(UserWarning, match="falls back to eager"):
        result = scheduler.run([copy.copy(request)])[0]
    assert result.token_ids == _alone(sharp, request)
    assert not scheduler._step.compiled


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_compiled_step_on_quantized_layers_gives_the_eager_tokens(quant: str) -> None:
    """bitsandbytes 4bit (NF4) and torchao int8 weight-only (8bit) layers compile whole on the CPU too (no
    fallback warning): the compiled engine answers pages with exactly the eager engine's tokens."""
    from PIL import Image

    from monkey_cli import Monkey

    checkpoint = require_parity("tiny-monkey-sharp")
    pages = [Image.open(_image(name)) for name in IMAGES[:2]] * 2
    prompts = ["<img></img> What is the title? Answer: ", "<img></img> Describe the page. Answer: "] * 2
    answers = {}
    for compile in (False, True):
        monkey = Monkey.load(checkpoint, device="cpu", quant=quant, compile=compile, batch_size=2)
        assert monkey.quant == quant and monkey.compile == compile
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*falls back.*")
            answers[compile] = monkey.generate_ids(pages, prompts, max_new_tokens=12)
        assert monkey.scheduler()._step.compiled == compile, "the compiled step fell back to eager"
    assert answers[True] == answers[False]
    assert all(answers[False]), "every page gets an answer"

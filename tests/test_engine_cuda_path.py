"""The CUDA path, correct by construction, proven on the CPU (issue 21).

Each finding has a test here that failed on the engine before the fix (see the docstrings): the compiled step
writes the KV cache in place (inductor's generated code has no cache-sized copy), attention reads only the live
length, a decode step syncs the host once, prompts admitted together are prefilled together and the busy slots
stay dense, every bucket is compiled and captured up front inside the fallback (failures injected at the first,
second and a later call), the cache is sized once (no new graph across requests of different lengths), and
compiling is decided from the work.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from conftest import require_parity
from parity_cases import model
from test_engine import IMAGES, _alone, _image, _prompt_ids, _scheduler

from monkey_cli.engine.cache import SlotCache, length_bucket, length_buckets
from monkey_cli.engine.sampling import SamplingParams
from monkey_cli.engine.scheduler import GenerationRequest, Scheduler
from monkey_cli.engine.step import DecodeStep, buckets


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _probe_model():
    """The issue's probe: 4 decoder layers, 256 wide (4 heads of 64), a 512-token vocabulary, random weights."""
    from monkey_cli.model.configuration import IMAGE_START_OFFSET, REAL_VISUAL, real_monkey_config
    from monkey_cli.model.modeling import MonkeyForCausalLM

    visual = {**REAL_VISUAL, "width": 64, "layers": 1, "heads": 4, "output_dim": 256}
    visual["image_start_id"] = 256 + IMAGE_START_OFFSET
    config = real_monkey_config(hidden_size=256, num_attention_heads=4, kv_channels=64, num_hidden_layers=4,
                                intermediate_size=1024, vocab_size=512, visual=visual)  # fmt: skip
    torch.manual_seed(0)
    return MonkeyForCausalLM(config).eval()


# --- finding 4: cache writes in place --------------------------------------------------------------


@pytest.mark.parametrize("batch", [4, 8])
def test_compiled_step_never_copies_the_cache(batch: int) -> None:
    """8 slots, 2048 positions, 4 layers (the issue's probe), a bucket of 4 and of 8: inductor's generated code
    has no loop over a cache-sized range, literal or symbolic. Before, the K/V write into a `[:batch]` slice of
    the cache made inductor copy that slice back whole in every layer (loops of 4 x 4 x 2048 x 64 = 2,097,152
    elements for batch 4: 20 ms per step against 5 ms with the write on the whole tensor, CPU, 1 thread)."""
    from torch._inductor.utils import run_and_get_code

    probe = _probe_model()
    config = probe.config
    cache = SlotCache(config, 8, 2048, torch.float32, "cpu")
    cache.positions[:] = torch.arange(8) * 10 + 1300
    cache.live[:] = True
    step = DecodeStep(probe, cache, compile=True)
    with torch.inference_mode():
        _, code = run_and_get_code(lambda: step._call(batch, 1536))
    source = "\n".join(code)
    one_row = config.num_attention_heads * cache.max_length * config.head_dim  # one slot's keys in one layer
    literal = [int(n) for n in re.findall(r"x\d+<static_cast<int64_t>\((\d+)L\)", source)]
    assert literal and max(literal) < one_row, f"a loop over {max(literal)} elements: a copy of the cache"
    # The live length is symbolic (ks0): a loop over it times a head's width would copy the live keys.
    symbolic = [int(n) for n in re.findall(r"x\d+<static_cast<int64_t>\((\d+)L\*ks\d+\)", source)]
    assert all(factor < config.head_dim for factor in symbolic), f"loops over the live keys: {symbolic}"
    assert "index_put" in source  # the write is there, in place, on the whole tensor


# --- finding 7: attention reads what is live -------------------------------------------------------


@contextmanager
def _key_lengths() -> Iterator[list[int]]:
    """The key length of every attention call in the block (eager)."""
    seen: list[int] = []
    real = F.scaled_dot_product_attention

    def recording(query, key, value, **kwargs):
        seen.append(key.shape[2])
        return real(query, key, value, **kwargs)

    F.scaled_dot_product_attention = recording
    try:
        yield seen
    finally:
        F.scaled_dot_product_attention = real


def test_decode_attention_reads_only_the_live_length() -> None:
    """A page's prompt (~1,300 tokens) in a cache sized for 4,096: each decode step attends to the live part
    rounded up to a length bucket (1,536 here), not to all 4,096 positions (what every step read before)."""
    sharp = model("tiny-monkey-sharp", "float32")
    scheduler = Scheduler(sharp, _scheduler(sharp, 1).encode_images, slots=2, max_length=4096)
    request = GenerationRequest(_prompt_ids("Title?"), image=_image(IMAGES[0]), params=SamplingParams(8))
    scheduler.step()  # nothing yet: the cache is allocated by the first request
    handle = scheduler.submit(request)
    scheduler.step()  # admission (prefill) and the first decode step
    with _key_lengths() as lengths:
        while not handle.done():
            scheduler.step()
    prompt = len(request.prompt_ids)
    assert scheduler._cache.max_length == 4096
    assert lengths and set(lengths) == {length_bucket(prompt + 8, 4096)}
    assert max(lengths) < 4096
    assert handle.wait().token_ids == _alone(sharp, request)


def test_length_buckets() -> None:
    assert length_buckets(1536) == [256, 512, 768, 1024, 1280, 1536]
    assert length_buckets(8192) == [256, 512, 768, 1024, 1280, 1536, 1792, 2048, 3072, 4096, 5120, 6144, 7168, 8192]
    assert length_buckets(2300) == [256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2300]
    assert length_bucket(1300, 8192) == 1536 and length_bucket(2049, 8192) == 3072 and length_bucket(8192, 8192) == 8192


def test_one_graph_per_batch_bucket_serves_every_length() -> None:
    """Warming up compiles one graph per batch bucket (the length is a symbolic size) and calls every (batch,
    length) pair; calling them again compiles nothing."""
    sharp = model("tiny-monkey-sharp", "float32")
    cache = SlotCache(sharp.config, 2, 1024, torch.float32, "cpu")
    step = DecodeStep(sharp, cache, compile=True)
    with torch.inference_mode():
        report = step.warm_up()
        graphs = _graphs()
        for batch in buckets(2):
            for length in length_buckets(1024):
                step(batch, length)
    assert report.mode == "inductor" and report.fallbacks == []
    assert report.graphs == len(buckets(2)) == 2
    assert _graphs() == graphs and step.report.recompiles == 0


# --- finding 5: one host sync per step -------------------------------------------------------------


@contextmanager
def _host_reads() -> Iterator[list[str]]:
    """Record every Python-level operation that makes the host wait for (or hand data to) the device: reading a
    tensor's values (tolist, item, bool, int, float, numpy, cpu), a tensor built from host data (torch.tensor,
    as_tensor), and indexing with a Python list (which builds an index tensor from host data). On a GPU each of
    these is a host-device synchronisation or a pageable copy."""
    seen: list[str] = []
    patches = {}

    def counting(owner, name):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            seen.append(name)
            return real(*args, **kwargs)

        patches[(owner, name)] = real
        setattr(owner, name, wrapper)

    def list_indexing(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, index, *rest):
            if isinstance(index, list) or (isinstance(index, tuple) and any(isinstance(i, list) for i in index)):
                seen.append(f"{name}[list]")
            return real(self, index, *rest)

        patches[(torch.Tensor, name)] = real
        setattr(torch.Tensor, name, wrapper)

    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "numpy", "cpu"):
        counting(torch.Tensor, name)
    for name in ("tensor", "as_tensor"):
        counting(torch, name)
    for name in ("__getitem__", "__setitem__"):
        list_indexing(name)
    try:
        yield seen
    finally:
        for (owner, name), real in patches.items():
            setattr(owner, name, real)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_decode_step_reads_from_the_device_once(compile: bool) -> None:
    """Three requests decoding together, one of them sampling and all with min_new_tokens active: every pure
    decode step reads from the device exactly once (the summary rows). Before: the busy slots indexed the logits
    with a Python list, became a tensor again for the position update, the min_new_tokens mask was built from a
    list every step, and the tokens were read back: four per step."""
    sharp = model("tiny-monkey-sharp", "float32")
    scheduler = Scheduler(sharp, _scheduler(sharp, 1).encode_images, slots=4, compile=compile, max_length=1536)
    scheduler.warm_up()
    params = [SamplingParams(12, min_new_tokens=10), SamplingParams(12, min_new_tokens=10),
              SamplingParams(12, min_new_tokens=10, do_sample=True, temperature=0.8, seed=5)]  # fmt: skip
    handles = [
        scheduler.submit(GenerationRequest(_prompt_ids(q), image=_image(name), params=p))
        for q, name, p in zip(("Title?", "Author?", "Date?"), IMAGES, params, strict=True)
    ]
    scheduler.step()  # admission: the prefills and the first tokens
    reads = []
    while not all(handle.done() for handle in handles):
        with _host_reads() as seen:
            scheduler.step()
        reads.append(seen)
    assert len(reads) >= 10
    assert all(seen == ["tolist"] for seen in reads), reads
    assert scheduler._step.compiled == compile


# --- finding 6: prefill together, dense slots, bucket from the live count ---------------------------


def test_requests_admitted_together_are_prefilled_together() -> None:
    """Three pages admitted at once: one ViT pass and one (right-padded) prefill pass for the three prompts of
    different lengths, and every answer equals its solo run. Before: one prefill per request, inside step()."""
    sharp = model("tiny-monkey-sharp", "float32")
    questions = ["Title?", "Who wrote this report and when?", "How many rows does the table have, roughly?"]
    requests = [
        GenerationRequest(_prompt_ids(q), image=_image(name), params=SamplingParams(10))
        for q, name in zip(questions, IMAGES, strict=True)
    ]
    assert len({len(r.prompt_ids) for r in requests}) == 3
    scheduler = _scheduler(sharp, slots=3)
    results = scheduler.run(requests)
    assert scheduler.stats.prefills == 3 and scheduler.stats.prefill_passes == 1
    assert scheduler.stats.vision_passes == 1
    assert [r.token_ids for r in results] == [_alone(sharp, r) for r in requests]


def test_busy_slots_stay_dense_and_the_bucket_follows_their_count(monkeypatch) -> None:
    """Four slots; the requests in slots 0-2 finish after 2 tokens, the one in slot 3 goes on: it moves down to
    slot 0 and the following steps run the graph of batch 1. Before, the bucket followed the highest busy slot
    (batch 4 for one sequence)."""
    sharp = model("tiny-monkey-sharp", "float32")
    scheduler = _scheduler(sharp, slots=4)
    requests = [
        GenerationRequest(_prompt_ids("Title?"), image=_image(IMAGES[i % 3]), params=SamplingParams(n))
        for i, n in enumerate((2, 2, 2, 14))
    ]
    batches = []
    real = DecodeStep.__call__

    def recording(step, batch, length):
        batches.append(batch)
        return real(step, batch, length)

    monkeypatch.setattr(DecodeStep, "__call__", recording)
    results = scheduler.run(requests)
    assert batches[:1] == [4] and batches[-1] == 1 and batches.count(1) >= 10
    assert scheduler.stats.slot_moves == 1
    assert [r.token_ids for r in results] == [_alone(sharp, r) for r in requests]


def test_a_cancelled_middle_slot_is_filled_without_disturbing_the_others() -> None:
    """Three busy slots, the middle one cancelled while a fourth request waits: the last sequence moves into the
    hole, the waiting one takes the slot after the busy ones, and every surviving answer equals its solo run."""
    sharp = model("tiny-monkey-sharp", "float32")
    scheduler = _scheduler(sharp, slots=3)
    requests = [
        GenerationRequest(_prompt_ids(q), image=_image(IMAGES[i % 3]), params=SamplingParams(12))
        for i, q in enumerate(("Title?", "Colour?", "Shapes?", "Author?"))
    ]
    handles = [scheduler.submit(r) for r in requests]
    for _ in range(3):
        scheduler.step()
    assert sorted(scheduler._active) == [0, 1, 2]
    handles[1].cancel()
    scheduler.step()  # the cancellation, the admission of the fourth, one decode step
    assert sorted(scheduler._active) == [0, 1, 2] and scheduler.stats.slot_moves == 1
    while not all(h.done() for h in handles):
        scheduler.step()
    assert handles[1].wait().finish_reason == "cancelled"
    for index in (0, 2, 3):
        assert handles[index].wait().token_ids == _alone(sharp, requests[index])


# --- finding 2: compiled and captured up front, failures fall back ---------------------------------


def _failing_compile(fail_at: int, calls: list[int]):
    """A stand-in for torch.compile whose "compiled" step is the eager one, failing at its `fail_at`-th call
    (counting every call, warm-up included)."""

    def compile(function, **_options):
        def compiled(*args):
            calls.append(1)
            if len(calls) == fail_at:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing (injected)")
            return function(*args)

        return compiled

    return compile


@pytest.mark.parametrize("fail_at", [1, 2, 9], ids=["first-call", "second-call", "later-call"])
def test_a_compile_or_capture_failure_falls_back_without_failing_a_request(monkeypatch, fail_at: int) -> None:
    """The compiled step fails at its first call (compiling), its second (where CUDA graph trees record), or a
    later one (the 9th: after the 6 warm-up calls, while two requests decode): one warning, the step falls
    back to eager, the report says why, and both requests get their eager tokens. Before, only the first call
    of a bucket was guarded: a failure at a later call failed every running request."""
    sharp = model("tiny-monkey-sharp", "float32")
    requests = [
        GenerationRequest(_prompt_ids(q), image=_image(name), params=SamplingParams(8))
        for q, name in (("Title?", IMAGES[0]), ("Colour?", IMAGES[1]))
    ]
    eager = Scheduler(sharp, _scheduler(sharp, 1).encode_images, slots=1, max_length=1536)
    expected = eager.run([copy.copy(r) for r in requests])
    calls: list[int] = []
    monkeypatch.setattr(torch, "compile", _failing_compile(fail_at, calls))
    scheduler = Scheduler(sharp, _scheduler(sharp, 1).encode_images, slots=1, compile=True, max_length=1536)
    handles = [scheduler.submit(copy.copy(r)) for r in requests]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        while not all(handle.done() for handle in handles):
            scheduler.step()
            for slot, active in scheduler._active.items():  # the device's state is what the host knows
                assert scheduler._cache.positions[slot].item() == active.position
    results = [handle.wait() for handle in handles]
    fallbacks = [w for w in caught if "falls back" in str(w.message)]
    assert len(fallbacks) == 1 and "falls back to eager" in str(fallbacks[0].message)
    report = scheduler.compile_report()
    assert report["mode"] == "eager" and len(report["fallbacks"]) == 1
    assert report["fallbacks"][0].startswith("inductor: CUDA error: operation not permitted")
    # The "compiled" step is the eager one here: after the fallback, the very same numbers.
    assert [(r.token_ids, r.logprobs) for r in results] == [(r.token_ids, r.logprobs) for r in expected]
    assert len(calls) == fail_at  # nothing called the failed mode again


def test_a_graph_that_cannot_be_captured_falls_back_to_inductor() -> None:
    """"reduce-overhead" on tensors CUDA graphs cannot take (here the CPU's) would silently run without CUDA
    graphs: warming up makes it an error, records inductor's reason, and the step runs as inductor alone."""
    sharp = model("tiny-monkey-sharp", "float32")
    cache = SlotCache(sharp.config, 1, 512, torch.float32, "cpu")
    step = DecodeStep(sharp, cache, compile=True, modes=["cudagraphs", "inductor", "eager"])
    with pytest.warns(UserWarning, match="falls back to inductor"), torch.inference_mode():
        report = step.warm_up()
    assert report.mode == "inductor" and report.requested == "cudagraphs"
    assert len(report.fallbacks) == 1 and report.fallbacks[0].startswith("cudagraphs: ")
    assert re.search("skipp(ed|ing) (CUDA graphs|cudagraphs)", report.fallbacks[0])
    assert report.cudagraph_skips >= 1 and report.captured == 0


def test_warm_up_calls_every_bucket_three_times_for_cuda_graphs(monkeypatch) -> None:
    """CUDA graph trees warm a graph up on its first call, record on the second and replay from the third:
    warming up makes all three calls for every (batch, length) pair before any request runs."""
    sharp = model("tiny-monkey-sharp", "float32")
    cache = SlotCache(sharp.config, 2, 512, torch.float32, "cpu")
    calls: list[tuple[int, int]] = []
    step = DecodeStep(sharp, cache, compile=True, modes=["cudagraphs", "eager"])

    def recording(batch_shape, length_shape):
        calls.append((batch_shape.shape[0], length_shape.shape[0]))
        return step._eager(batch_shape, length_shape)

    step._forward = recording
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    with torch.inference_mode():
        report = step.warm_up()
    pairs = [(b, n) for b in buckets(2) for n in length_buckets(512)]
    assert calls == [pair for pair in pairs for _ in range(3)]
    assert report.mode == "cudagraphs" and report.captured == len(pairs)


# --- finding 3: the cache is sized once ------------------------------------------------------------


def test_no_new_graph_across_requests_of_different_lengths() -> None:
    """`Monkey.load(max_new_tokens=300, compile=True)`: a 129-token answer, then a 300-token one (longer than
    the first request's cache would hold) and an 8-token one: the cache is allocated once, from the memory
    plan, and no graph is compiled after the warm-up. Before, the cache was sized by the first request and a
    longer one rebuilt it and recompiled (43.6 s against 5.7 s for the same request again, measured)."""
    from monkey_cli import Monkey

    monkey = Monkey.load(require_parity("tiny-monkey-sharp"), device="cpu", compile=True, batch_size=1,
                         max_new_tokens=300)  # fmt: skip
    page = [_image(IMAGES[0])]
    prompt = ["<img></img> What is the title? Answer: "]
    monkey.generate_ids(page, prompt, max_new_tokens=129, min_new_tokens=129)
    graphs = _graphs()
    for tokens in (300, 8):
        (answer,) = monkey.generate_ids(page, prompt, max_new_tokens=tokens, min_new_tokens=tokens)
        assert len(answer) == tokens
    scheduler = monkey.scheduler()
    assert scheduler.stats.cache_allocations == 1
    assert _graphs() == graphs and scheduler.compile_report()["recompiles"] == 0
    assert scheduler.compile_report()["mode"] == "inductor"


# --- finding 8: compile when it pays ---------------------------------------------------------------


def test_compile_auto_follows_the_work() -> None:
    """compile=None: never on the CPU; on CUDA only for more than one round of slots or AUTO_COMPILE_TOKENS of
    answers (a one-page question never pays tens of seconds of compiling). Before, None meant "on" for every
    CUDA run, a one-page `monkey ask` included."""
    from monkey_cli import Monkey
    from monkey_cli.engine.scheduler import AUTO_COMPILE_TOKENS, worth_compiling

    assert not worth_compiling("cuda", [512], slots=4)  # one page, one question
    assert not worth_compiling("cuda", [512] * 4, slots=4)  # one round of the slots
    assert worth_compiling("cuda", [16] * 5, slots=4)  # more than one round
    assert worth_compiling("cuda", [AUTO_COMPILE_TOKENS], slots=4)
    assert not worth_compiling("cpu", [512] * 100, slots=4)
    monkey = Monkey.load(require_parity("tiny-monkey-sharp"), device="cpu", batch_size=2)
    assert monkey.compile is None  # decided when the work arrives
    scheduler = monkey.scheduler()
    requests = [GenerationRequest(_prompt_ids("Title?"), image=_image(IMAGES[0]), params=SamplingParams(2))] * 5
    scheduler.run([copy.copy(r) for r in requests])
    assert scheduler.compile is False and not scheduler._step.compiled  # the CPU, however much work

"""TextMonkey against the ORIGINAL code's outputs (../shared/parity/tiny_cases/textmonkey, README "TextMonkey").

The checkpoint is loaded through the public API (`Monkey.load` on tiny-textmonkey, which carries its own
hard-coded sizes in parity_hardcoded_sizes.json). Tolerances are the README's (rtol 0): input ids exact; the
896 resize exact, the global view <= 1e-6; ViT outputs, shifted-window layers, local features and image
embeddings atol 5e-4; selection scores atol 2e-5 and the kept token indices exact (the smallest score gap at
the cut is 1.3e-4); logits atol 1e-4; greedy tokens identical (every stored top-1/top-2 margin is >= 4.4e-4).
Every case runs through the engine: the API's generate (continuous batching, shared image prefix), and the
static KV cache with its decode step teacher-forced, eager and compiled (torch.compile on the CPU).
"""

from __future__ import annotations

import json
from functools import cache

import numpy as np
import pytest
import torch
from conftest import require_parity
from parity_cases import StaticTeacher, greedy_divergence
from PIL import Image
from safetensors.torch import load_file

from monkey_cli import Monkey, tasks
from monkey_cli.engine.sampling import SamplingParams
from monkey_cli.engine.scheduler import GenerationRequest, Scheduler
from monkey_cli.model.textmonkey_vision import (
    relative_position_index,
    select_tokens,
    selection_scores,
    shifted_window_mask,
)

FIXTURES = "tiny_cases/textmonkey"
IMAGES = ("a", "b", "c")
PIXEL_ATOL = 1e-6
FEATURE_ATOL = 5e-4  # vit_out_*, window_attn_*, local_features, image_embeds
SCORE_ATOL = 2e-5
LOGITS_ATOL = 1e-4
CASES = 18


@cache
def index() -> dict:
    return json.loads((require_parity(FIXTURES) / "index.json").read_text())


def case(number: int) -> dict:
    return index()["cases"][number]


@cache
def reference(name: str) -> dict[str, torch.Tensor]:
    """The vision tensors of image `name` ("a", "b", "c"), or "llm_<case>" for a case's LLM tensors."""
    file = f"{name}.safetensors" if name.startswith("llm_") else f"vision_{name}.safetensors"
    return load_file(require_parity(FIXTURES) / file)


@cache
def page(name: str) -> Image.Image:
    """The image as the original reads it: Image.open(path).convert("RGB") (alpha dropped, not composited)."""
    with Image.open(require_parity("tiny_cases") / index()["images"][name]["path"]) as image:
        return image.convert("RGB")


@cache
def textmonkey() -> Monkey:
    torch.manual_seed(0)
    return Monkey.load(require_parity("tiny-textmonkey"), device="cpu", dtype="float32", quant="none", batch_size=6)


@cache
def features(name: str) -> torch.Tensor:
    """The spliced image embedding of image `name` through the public API: [768, hidden]."""
    return textmonkey().encode_images([page(name)])[0]


def prompt_of(kind: str, question: str) -> tasks.Prompt:
    """The case's prompt as monkey-cli builds it for TextMonkey (tasks' forms, never the raw string)."""
    family = "textmonkey"
    if kind == "read":
        return tasks.task_prompt("read", family=family)
    if kind == "spot":
        return tasks.spot_prompt(family)
    if kind == "ref":
        return tasks.locate_prompt(question.removeprefix("<ref>").removesuffix("</ref>"), family)
    if kind == "vqa":
        return tasks.vqa_prompt(question.removesuffix(" Answer:"), family)
    if kind == "vqa_ground":
        return tasks.vqa_prompt(question.removesuffix(" " + tasks.GROUND_SUFFIX), family, ground=True)
    return tasks.Prompt.parse(f"<img></img> {question}")  # json: the demo's form, given as a --prompt would be


# --- vision -------------------------------------------------------------------------------------------


@cache
def vision_run(name: str) -> dict[str, torch.Tensor]:
    """What the tower computes for image `name`, captured at the points the fixture stores."""
    tower = textmonkey().model.transformer.visual
    captured: dict[str, torch.Tensor] = {}

    def grid(x: torch.Tensor) -> torch.Tensor:  # [1, 4096, width] -> [1, width, 64, 64], the fixture's layout
        return x.reshape(x.shape[0], 64, 64, -1).permute(0, 3, 1, 2)

    hooks = [tower.attn_pool.register_forward_pre_hook(lambda _m, args: captured.setdefault("vit_out", args[0]))]
    for k, layer in enumerate(tower.transformer.window_attention):
        def capture(_module, args, out, k=k):
            captured[f"window_attn_in_{k}"] = grid(args[0])
            captured[f"window_attn_out_{k}"] = grid(out)

        hooks.append(layer.register_forward_hook(capture))
    pixels = textmonkey().preprocess(page(name))[None]
    try:
        with torch.inference_mode():
            local, global_features = tower.encode(pixels[:, :-1], pixels[:, -1])
            embeds = tower(pixels[:, :-1], pixels[:, -1])
    finally:
        for hook in hooks:
            hook.remove()
    vit_out = captured.pop("vit_out")
    return {
        **captured,
        "pixels": pixels,
        "vit_out_windows": vit_out[:4],
        "vit_out_global": vit_out[4:],
        "local_features": local,
        "global_features": global_features,
        "image_embeds": embeds,
    }


def _error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return (ours.float() - theirs.float()).abs().max().item()


@pytest.mark.parametrize("name", IMAGES)
def test_preprocessing_is_the_originals(name: str) -> None:
    resized = textmonkey().processor.resize(page(name))
    assert torch.equal(torch.from_numpy(np.asarray(resized).copy()), reference(name)["resized_896_uint8"])
    if "global_448" in reference(name):
        assert _error(vision_run(name)["pixels"][:, -1], reference(name)["global_448"][0][None]) <= PIXEL_ATOL


@pytest.mark.parametrize("name", IMAGES)
def test_vision_stages_match_the_original_in_pipeline_order(name: str) -> None:
    ours, theirs = vision_run(name), reference(name)
    stages = ["vit_out_windows", "vit_out_global", "local_features", "image_embeds"]
    if name == "a":  # the shifted-window layers are stored for the document page
        stages = ["window_attn_in_0", *(f"window_attn_out_{k}" for k in range(4)), *stages]
    for stage in stages:
        error = _error(ours[stage], theirs[stage])
        assert error <= FEATURE_ATOL, f"{stage} differs by {error:.2e}"
    # The token selection: the scores within 2e-5 of the original's, the same 512 tokens kept.
    scores = selection_scores(ours["local_features"])[0]
    assert _error(scores, theirs["selection_scores"]) <= SCORE_ATOL
    kept = select_tokens(ours["local_features"], 512)[0]
    assert torch.equal(kept, theirs["selected_indices"])
    assert kept[-1] == 1023  # the last token has no later one to resemble: always kept
    # What the LLM gets: the 512 resampled local tokens, then the global view's 256.
    assert _error(ours["image_embeds"][:, 512:], ours["global_features"]) == 0.0


def test_window_buffers_are_the_originals() -> None:
    internals = load_file(require_parity(FIXTURES) / "vision_internals.safetensors")
    assert torch.equal(shifted_window_mask(64, 12, 6).to(torch.int8), internals["swin_attn_mask_int8"])
    assert torch.equal(relative_position_index(12), internals["swin_relative_position_index"])
    # After loading (the buffers are not in the checkpoint, transformers leaves them empty until re-made).
    for layer in textmonkey().model.transformer.visual.transformer.window_attention:
        assert torch.equal(layer.shift_attn.attn_mask.to(torch.int8), internals["swin_attn_mask_int8"])
        assert torch.equal(layer.shift_attn.attn.relative_position_index, internals["swin_relative_position_index"])


def test_api_features_are_the_spliced_embeddings() -> None:
    """`Monkey.encode_images` gives what the original splices into the LLM (768 rows, local then global)."""
    for name in IMAGES:
        embeds = features(name)
        assert embeds.shape == (768, 256)
        assert _error(embeds, reference(name)["image_embeds"][0]) <= FEATURE_ATOL


# --- the LLM, through the public API and the engine ------------------------------------------------------


def _ids(number: int) -> list[int]:
    return textmonkey().check_prompt(prompt_of(case(number)["prompt_kind"], case(number)["question"]), 24)


@cache
def api_tokens(name: str) -> dict[str, list[int]]:
    """Greedy tokens of every prompt of image `name` from one `Monkey.generate_ids` call (the engine: six
    requests on one image, encoded once, the image prefix prefilled once, continuous batching)."""
    image_cases = [c for c in index()["cases"] if c["image"] == name]
    prompts = [prompt_of(c["prompt_kind"], c["question"]) for c in image_cases]
    image = page(name)
    rows = textmonkey().generate_ids([image] * len(prompts), prompts, max_new_tokens=24)
    return {c["id"]: row for c, row in zip(image_cases, rows, strict=True)}


def _teacher_forced(ids: list[int], embeds: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Logits [steps, vocab] of every step, feeding the reference tokens through transformers' DynamicCache."""
    model = textmonkey().model
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), image_embeds=embeds[None], use_cache=True, logits_to_keep=1)
        steps, past, length = [out.logits[0, -1]], out.past_key_values, len(ids)
        for token in tokens[:-1]:
            length += 1
            mask = torch.ones(1, length, dtype=torch.long)
            out = model(input_ids=torch.tensor([[token]]), attention_mask=mask, past_key_values=past, use_cache=True)
            steps.append(out.logits[0, -1])
    return torch.stack(steps)


@pytest.mark.parametrize("number", range(CASES), ids=lambda n: f"case{n}")
def test_case_through_the_public_api(number: int) -> None:
    c = case(number)
    ref = reference(f"llm_{c['id']}")
    ids = _ids(number)
    # The ids of the original's prompt, the image path's bytes aside: our span holds only <imgpad>.
    start, end = c["image_span"]
    assert end - start == 768 and len(ids) == c["prompt_len"]
    assert ids[:start] == c["input_ids"][:start] and ids[end:] == c["input_ids"][end:]
    assert set(ids[start:end]) == {textmonkey().tokenizer.img_pad_id}

    embeds = features(c["image"])
    with torch.inference_mode():
        prefill = textmonkey().model(input_ids=torch.tensor([ids]), image_embeds=embeds[None], use_cache=False)
    logits = prefill.logits[0]
    error = (logits[ref["prefill_positions"]] - ref["prefill_logits"]).abs().max().item()
    assert error <= LOGITS_ATOL, f"prefill logits differ by {error:.2e}"
    lse = (torch.logsumexp(logits, -1) - ref["prefill_all_logsumexp"]).abs().max().item()
    assert lse <= LOGITS_ATOL, f"prefill logsumexp differs by {lse:.2e}"

    steps = _teacher_forced(ids, embeds, c["generated_ids"])
    step_error = (steps - ref["step_logits"]).abs().max().item()
    assert step_error <= LOGITS_ATOL, f"step logits differ by {step_error:.2e}"
    assert greedy_divergence(steps, c["generated_ids"], textmonkey().tokenizer.eod_id) is None

    assert api_tokens(c["image"])[c["id"]] == c["generated_ids"], "Monkey.generate_ids gave other tokens"


@cache
def _teacher(compiled: bool) -> StaticTeacher:
    """One slot cache and decode step for all cases, as the engine reuses them across requests."""
    return StaticTeacher(textmonkey().model, compile=compiled)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("number", range(CASES), ids=lambda n: f"case{n}")
def test_case_through_the_static_decode_step(number: int, compiled: bool) -> None:
    c = case(number)
    ref = reference(f"llm_{c['id']}")
    teacher = _teacher(compiled)
    logits = teacher.run(_ids(number), None, ref["generated_ids"], image_embeds=features(c["image"])[None])
    assert teacher.step.compiled is compiled, "the compiled step fell back to eager"
    error = (logits - ref["step_logits"]).abs().max().item()
    assert error <= LOGITS_ATOL, f"step logits differ by {error:.2e}"
    assert greedy_divergence(logits, c["generated_ids"], textmonkey().tokenizer.eod_id) is None


def test_compiled_scheduler_gives_the_originals_tokens() -> None:
    """All 18 requests through one compiled Scheduler (3 slots, continuous batching): the original's tokens."""
    model = textmonkey().model

    def encode(images):
        return torch.stack([features(name) for name in images])

    requests = [
        GenerationRequest(_ids(n), image=case(n)["image"], image_key=("tm", case(n)["image"]),
                          params=SamplingParams(max_new_tokens=24))
        for n in range(CASES)
    ]
    scheduler = Scheduler(model, encode, slots=3, compile=True)
    results = scheduler.run(requests)
    assert scheduler._step.compiled, "the compiled step fell back to eager"
    assert [r.token_ids for r in results] == [case(n)["generated_ids"] for n in range(CASES)]
    assert scheduler.stats.prefix_reuses > 0  # the six prompts of each image shared its prefix

"""The parts of a chat completion that need no server and no model weights: the turns rule, refusing what cannot be
honoured, each choice's seed, stop strings (the engine's constraint and the streamed text), log-probabilities as
OpenAI names tokens, response formats' grammars, and the page budget of a chat image."""

from __future__ import annotations

import math
import random
import time
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import require_parity

from monkey_cli import tasks
from monkey_cli.model.tokenizer import QWenTokenizer
from monkey_cli.serve import completions
from monkey_cli.serve.errors import APIError
from monkey_cli.serve.schemas import ChatCompletionRequest

IMAGE = {"type": "image_url", "image_url": {"url": "data:,x"}}


@pytest.fixture(scope="module")
def tokenizer() -> QWenTokenizer:
    return QWenTokenizer.from_dir(require_parity("tiny-monkey"))


def _request(**fields: Any) -> ChatCompletionRequest:
    messages = fields.pop("messages", [{"role": "user", "content": [IMAGE, {"type": "text", "text": "What?"}]}])
    return ChatCompletionRequest.model_validate({"messages": messages, **fields})


def _refused(**fields: Any) -> APIError:
    with pytest.raises(APIError) as caught:
        completions.check_supported(_request(**fields))
    assert caught.value.status == 400
    return caught.value


# --- the turns rule ------------------------------------------------------------------------------------------


def test_one_user_message_is_the_question_as_it_is() -> None:
    assert completions.question_text(_request().messages) == "What?"


def test_system_text_and_earlier_turns_are_kept_as_plain_text_in_order() -> None:
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": [IMAGE, {"type": "text", "text": "What is the title?"}]},
        {"role": "assistant", "content": "Report"},
        {"role": "developer", "content": [{"type": "text", "text": "Be exact."}]},
        {"role": "user", "content": [IMAGE]},  # an image alone adds no line
        {"role": "user", "content": [{"type": "text", "text": "Who"}, {"type": "text", "text": "wrote it?"}]},
    ]
    assert completions.question_text(_request(messages=messages).messages) == (
        "Answer in one word.\nBe exact.\nUser: What is the title?\nAssistant: Report\nWho\nwrote it?"
    )


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "user", "content": [IMAGE]}], "messages.0.content"),
        ([{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello"}], "messages.1.role"),
    ],
)
def test_a_conversation_without_a_last_question_is_refused(messages: list, param: str) -> None:
    with pytest.raises(APIError) as caught:
        completions.question_text(_request(messages=messages).messages)
    assert caught.value.param == param


# --- what cannot be honoured ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"logit_bias": {"42": 5}}, "logit_bias"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": -1}, "presence_penalty"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"skip_special_tokens": False}, "skip_special_tokens"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"repetition_penalty": 1.1}, "repetition_penalty"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
    ],
)
def test_fields_that_cannot_be_honoured_are_400s_naming_them(fields: dict, param: str) -> None:
    error = _refused(**fields)
    assert error.param == param and param in error.message


def test_fields_that_change_nothing_and_neutral_values_are_accepted() -> None:
    completions.check_supported(_request(
        user="u", metadata={"a": "b"}, store=False, service_tier="auto", parallel_tool_calls=True, tools=[],
        tool_choice="none", logit_bias={}, frequency_penalty=0, presence_penalty=0.0, modalities=["text"],
        skip_special_tokens=True, audio=None, prediction=None, max_tokens=7, max_completion_tokens=7,
        logprobs=True, top_logprobs=2,
    ))  # fmt: skip


@pytest.mark.parametrize("field", ["n", "stop", "top_logprobs"])
def test_out_of_range_values_are_validation_errors(field: str) -> None:
    from pydantic import ValidationError

    value = {"n": 129, "stop": ["a", "b", "c", "d", "e"], "top_logprobs": 21}[field]
    with pytest.raises(ValidationError) as caught:
        _request(**{field: value})
    assert caught.value.errors()[0]["loc"][0] == field


def test_a_tagged_union_error_names_the_field_once() -> None:
    from pydantic import ValidationError

    from monkey_cli.serve.app import _validation_error

    with pytest.raises(ValidationError) as caught:
        _request(response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    error = _validation_error([{**e, "loc": ("body", *e["loc"])} for e in caught.value.errors()])
    assert error.param == "response_format.json_schema.schema" and error.message.endswith("missing")


# --- each choice's sampling ----------------------------------------------------------------------------------


def test_greedy_choices_sample_nothing_and_seeded_ones_get_their_own_streams() -> None:
    assert completions.choice_sampling(_request(n=3)) == ({}, {}, {})
    sampled = completions.choice_sampling(_request(n=3, temperature=0.8, top_p=0.9, seed=7))
    assert [choice["seed"] for choice in sampled][0] == 7  # choice 0 answers as n=1 with the same seed
    seeds = [choice["seed"] for choice in sampled]
    assert len(set(seeds)) == 3 and all(0 <= s < 2**64 for s in seeds)
    assert seeds == [choice["seed"] for choice in completions.choice_sampling(_request(n=3, temperature=0.8, seed=7))]
    assert all(choice["temperature"] == 0.8 and choice["top_p"] == 0.9 for choice in sampled)
    unseeded = completions.choice_sampling(_request(n=2, temperature=1))
    assert all("seed" not in choice for choice in unseeded)


# --- stop strings --------------------------------------------------------------------------------------------


def _until_stopped(tokenizer: QWenTokenizer, tokens: list[int], stops: list[str]) -> list[int]:
    """The tokens the engine keeps with a StopAt constraint: up to the one after which it is terminated."""
    constraint = completions.StopAt(stops, tokenizer.token_bytes)
    kept = []
    for token in tokens:
        assert constraint.accept_token(token)
        kept.append(token)
        if constraint.is_terminated():
            break
    return kept


def test_stop_strings_end_the_answer_at_the_token_that_completes_them(tokenizer: QWenTokenizer) -> None:
    rng = random.Random(5)
    ordinary = range(tokenizer.eod_id)
    checked = 0
    for _ in range(300):
        tokens = [rng.choice(ordinary) for _ in range(rng.randint(1, 25))]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        start = rng.randrange(len(text))
        stops = [text[start : start + rng.randint(1, 4)], "\x00never"]
        if "\ufffd" in stops[0]:
            continue
        kept = _until_stopped(tokenizer, tokens, stops)
        prefix = tokenizer.decode(kept, skip_special_tokens=True)
        assert stops[0] in prefix, "the constraint ends only once the stop string is in the text"
        assert stops[0] not in tokenizer.decode(kept[:-1], skip_special_tokens=True), "... and at once"
        answer = completions.answer_text(tokenizer, kept, stops)
        assert answer == tasks.clean_answer(text[: text.find(stops[0])])
        # streamed: the pieces never show the stop string, and join to the answer
        stream = completions.ChoiceText(tokenizer, stops)
        pieces = [stream.push(token) for token in kept]
        assert "".join(pieces) + stream.finish(answer) == answer
        assert all(not piece or not piece[-1].isspace() for piece in pieces)
        # no stop string in the answer: the whole of it, streamed
        free = completions.ChoiceText(tokenizer, ["\x00never"] if checked % 2 else [])
        whole = completions.answer_text(tokenizer, tokens, [])
        assert "".join(free.push(token) for token in tokens) + free.finish(whole) == whole
        checked += 1
    assert checked > 200


def test_a_stop_constraint_allows_every_token_or_what_the_grammar_allows(tokenizer: QWenTokenizer) -> None:
    import torch

    from monkey_cli.engine.constraints import bitmask_words

    words = bitmask_words(2304)
    free = completions.StopAt(["x"], tokenizer.token_bytes)
    bitmask = torch.zeros((2, words), dtype=torch.int32)
    free.fill_next_token_bitmask(bitmask, 1)
    assert (bitmask[1] == -1).all() and (bitmask[0] == 0).all()

    class Inner:
        def __init__(self) -> None:
            self.accepted: list[int] = []

        def fill_next_token_bitmask(self, bitmask, index) -> None:
            bitmask[index].zero_()
            bitmask[index, 0] = 1  # token 0 only

        def accept_token(self, token_id: int) -> bool:
            self.accepted.append(token_id)
            return token_id == 0

        def is_terminated(self) -> bool:
            return len(self.accepted) >= 3

    inner = Inner()
    both = completions.StopAt(["never"], tokenizer.token_bytes, inner)
    both.fill_next_token_bitmask(bitmask, 0)
    assert bitmask[0, 0] == 1 and (bitmask[0, 1:] == 0).all()
    assert both.accept_token(0) and not both.accept_token(5) and not both.is_terminated()
    both.accept_token(0)
    assert both.is_terminated() and inner.accepted == [0, 5, 0]


# --- log-probabilities ---------------------------------------------------------------------------------------


def test_tokens_are_named_by_their_bytes_and_special_tokens_by_their_names(tokenizer: QWenTokenizer) -> None:
    names = completions.TokenTexts(tokenizer)
    partial = next(t for t in range(tokenizer.eod_id) if "\ufffd" in tokenizer.decode([t]))
    entry = names.entry(partial, -1.5)
    assert bytes(entry.bytes) == tokenizer.token_bytes(partial) and "\\x" in entry.token
    word = next(t for t in range(tokenizer.eod_id) if tokenizer.decode([t]).strip().isalpha())
    assert names.entry(word, -0.5).token == tokenizer.decode([word])
    end = names.entry(tokenizer.eod_id, -math.inf)
    assert end.token == "<|endoftext|>" and end.bytes is None and end.logprob == completions.UNLIKELY
    result = SimpleNamespace(token_ids=[word, partial], logprobs=[-0.5, -1.5],
                             top_logprobs=[[(word, -0.5), (partial, -2.0)], [(partial, -1.5)]])
    content = names.logprobs(result).content
    assert [(c.token, c.logprob, len(c.top_logprobs)) for c in content] == [
        (tokenizer.decode([word]), -0.5, 2), (entry.token, -1.5, 1)
    ]
    assert names.logprobs(result, 1, 2).content == content[1:]


# --- response formats ----------------------------------------------------------------------------------------


def _monkey(tokenizer: QWenTokenizer) -> Any:
    return SimpleNamespace(tokenizer=tokenizer, model=SimpleNamespace(config=SimpleNamespace(vocab_size=2304)))


def _format(schema: dict, strict: bool | None = True) -> ChatCompletionRequest:
    return _request(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                             "strict": strict}})


def test_response_formats_compile_once_and_strict_refuses_what_it_cannot_enforce(tokenizer) -> None:
    grammars = completions.ResponseGrammars(keep=2)
    monkey = _monkey(tokenizer)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    first = grammars.get(_format(schema), monkey)
    assert grammars.get(_format(dict(schema)), monkey) is first, "the same schema compiles once"
    assert grammars.get(_request(response_format={"type": "text"}), monkey) is None
    assert grammars.get(_request(), monkey) is None
    assert grammars.get(_request(response_format={"type": "json_object"}), monkey) is not None
    unique = {"type": "array", "uniqueItems": True}
    with pytest.raises(APIError) as caught:
        grammars.get(_format(unique), monkey)
    assert caught.value.code == "invalid_schema" and "uniqueItems" in caught.value.message
    assert caught.value.param == "response_format.json_schema.schema"
    assert grammars.get(_format(unique, strict=False), monkey) is not None, "not strict: the keyword is ignored"
    sneaky = {"type": "object", "x-guidance": {"lenient": True}, "properties": {"a": {"not": {}}}}
    with pytest.raises(APIError, match="cannot be enforced"):
        grammars.get(_format(sneaky), monkey)
    with pytest.raises(APIError, match="cannot be enforced"):
        grammars.get(_format({"type": "strin"}, strict=False), monkey)


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "no JSON document satisfies it"),
        ({"enum": [f"v{i}" for i in range(100_000)]}, "too big"),  # llguidance's limits, not a hang
        ({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(20_000)}}, "too large"),
        ({"type": "object", "properties": {"a": {"type": "number", "minimum": float("nan")}}}, "not plain JSON"),
    ],
    ids=["no document", "a huge enum", "a huge object", "NaN"],
)
def test_hostile_schemas_are_400s_in_a_moment(tokenizer, schema: dict, words: str) -> None:
    started = time.monotonic()
    with pytest.raises(APIError, match=words) as caught:
        completions.ResponseGrammars().get(_format(schema), _monkey(tokenizer))
    assert caught.value.code == "invalid_schema" and time.monotonic() - started < 10


def test_a_schema_nested_too_deeply_is_a_400(tokenizer) -> None:
    schema: dict = {"type": "string"}
    for _ in range(3000):
        schema = {"type": "array", "items": schema}
    with pytest.raises(APIError, match="nested too deeply|cannot be enforced"):
        completions.ResponseGrammars().get(_format(schema), _monkey(tokenizer))


# --- a chat image's page budget ------------------------------------------------------------------------------


def test_a_chat_page_is_held_to_the_servers_render_budget(tmp_path, monkeypatch) -> None:
    """The budget given (--render-timeout), not the environment's default, stops a page that would take hours."""
    from hostile import nested_forms_pdf

    from monkey_cli.serve.uploads import ImageRef, open_page

    monkeypatch.setenv("MONKEY_RENDER_TIMEOUT", "600")
    bomb = nested_forms_pdf(tmp_path / "bomb.pdf").read_bytes()
    started = time.monotonic()
    with pytest.raises(APIError) as caught:
        open_page(ImageRef(bomb), (448, 448), "messages.0.content.0.image_url.url", render_timeout=1.0)
    assert caught.value.code == "render_timeout"
    assert time.monotonic() - started < 120

"""What a chat completion request asks of the model, once read: the question (the turns rule), one set of
sampling settings per choice, the response format's grammar, stop strings, and the log-probabilities shown.

The turns rule. Monkey was trained on one-turn prompts (`<img></img> {question} Answer: `): there is no system
part and no history in them. So a conversation becomes one question, as plain text, in this order, lines
joined by a newline:

1. the text of every `system` and `developer` message, as it is;
2. every earlier `user` message's text as `User: {text}` and every `assistant` message's as
   `Assistant: {text}` (messages without text, an image alone say, add no line);
3. the last message (a `user` one)'s text, as it is: the question.

A conversation of one user message is exactly `monkey ask`'s prompt. Nothing a client sends is left out, and
nothing else is added.

Response formats (`json_object`, `json_schema`) constrain every token of the answer to a JSON grammar compiled
by llguidance (`monkey_cli.extract.constraint`), compact (no whitespace between tokens), ending at the
document's last character. `strict: true` takes only schemas whose every keyword the grammar enforces (a 400
names what it cannot); otherwise keywords it cannot enforce are ignored (the answer is still JSON, and follows
the others). Stop strings are a token constraint too: it allows every token (or what the grammar allows) and
ends the answer as soon as its text holds a stop string, which is then cut off.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from monkey_cli import tasks
from monkey_cli.serve.errors import APIError, bad_request
from monkey_cli.serve.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    ChoiceLogprobs,
    JSONSchemaFormat,
    TokenLogprob,
    TopLogprob,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from monkey_cli.extract.constraint import CompiledGrammar

# OpenAI fields this server takes but that change nothing in an answer (they are about storage, billing, caching
# and abuse tracking on OpenAI's side): accepted and ignored.
IGNORED_FIELDS = frozenset({
    "user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
    "prompt_cache_options", "parallel_tool_calls",
})  # fmt: skip
# Fields accepted only at the value that asks for nothing (null always too): any other value is a 400.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "modalities": (["text"],),
    "skip_special_tokens": (True,),  # vLLM's extension (docling sends it): answers never hold special tokens
}
_WHY_NOT = {
    "frequency_penalty": "repetition penalties are not supported",
    "presence_penalty": "repetition penalties are not supported",
    "logit_bias": "logit biases are not supported",
    "tools": "tool calling is not supported (Monkey answers questions about an image)",
    "tool_choice": "tool calling is not supported (Monkey answers questions about an image)",
    "functions": "function calling is not supported (Monkey answers questions about an image)",
    "function_call": "function calling is not supported (Monkey answers questions about an image)",
    "modalities": "the answer is text only",
    "skip_special_tokens": "answers are always decoded without special tokens",
}
_INCOMPLETE = "\ufffd"  # what decoding shows for the first bytes of a character whose last bytes are to come
GRAMMAR_CACHE = 64  # compiled response formats kept (clients such as marker send the same schema again and again)


# --- refusing what cannot be honoured ------------------------------------------------------------------------


def check_supported(body: ChatCompletionRequest) -> None:
    """A 400 naming the first field this server cannot honour: an unknown one, or a known one at a value other
    than its neutral one (`tools`, `logit_bias`, a penalty, ...)."""
    for name, value in (body.model_extra or {}).items():
        if name in IGNORED_FIELDS or value is None:
            continue
        if name in NEUTRAL_VALUES:
            if any(_is_neutral(value, neutral) for neutral in NEUTRAL_VALUES[name]):
                continue
            raise bad_request(f"{name}: {_WHY_NOT[name]}", name, code="unsupported_parameter")
        raise bad_request(
            f"{name}: not supported by this server (it refuses what it cannot honour rather than ignore it; "
            "docs/serve.md lists the fields it takes)",
            name,
            code="unsupported_parameter",
        )
    if body.top_logprobs and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    both = body.max_tokens is not None and body.max_completion_tokens is not None
    if both and body.max_tokens != body.max_completion_tokens:
        raise bad_request(
            f"max_tokens ({body.max_tokens}) and max_completion_tokens ({body.max_completion_tokens}) differ: "
            "give one (they mean the same here)",
            "max_completion_tokens",
        )


def _is_neutral(value: Any, neutral: Any) -> bool:
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral  # True is not 1 here, nor False 0
    return bool(value == neutral)


# --- the question: the turns rule ----------------------------------------------------------------------------


def question_text(messages: Sequence[ChatMessage]) -> str:
    """The one question a conversation becomes (the module's turns rule); a 400 when it has none."""
    index, last = len(messages) - 1, messages[-1]
    if last.role != "user":
        raise bad_request("the last message must be the user's question", f"messages.{index}.role")
    question = message_text(last)
    if not question.strip():
        raise bad_request("the last user message has no text: ask a question about the image",
                          f"messages.{index}.content", code="missing_question")
    lines = [message_text(m) for m in messages[:-1] if m.role in ("system", "developer")]
    for message in messages[:-1]:
        text = message_text(message)
        if message.role in ("user", "assistant") and text.strip():
            lines.append(f"{message.role.capitalize()}: {text}")
    return "\n".join([*(line for line in lines if line.strip()), question.strip()])


def message_text(message: ChatMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    return "\n".join(part.text for part in message.content or [] if part.type == "text")


# --- sampling: one setting per choice ------------------------------------------------------------------------


def choice_sampling(body: ChatCompletionRequest) -> tuple[dict[str, Any], ...]:
    """Each choice's sampling settings: greedy (the original's setting, every choice the same answer) unless a
    temperature above 0 asks for sampling; then choice 0 takes `seed` and choice i a seed derived from it, so
    every choice is a stream of its own and a seeded request repeats."""
    n = body.n or 1
    if not body.temperature:
        return tuple({} for _ in range(n))
    options: dict[str, Any] = {"do_sample": True, "temperature": body.temperature}
    if body.top_p is not None:
        options["top_p"] = body.top_p
    if body.top_k is not None:
        options["top_k"] = body.top_k
    choices = []
    for index in range(n):
        seeded = dict(options)
        if body.seed is not None:
            seeded["seed"] = choice_seed(body.seed, index)
        choices.append(seeded)
    return tuple(choices)


def choice_seed(seed: int, index: int) -> int:
    """Choice 0 keeps `seed` (n=1 answers as before); choice i > 0 gets 64 bits of sha256(seed, i)."""
    if index == 0:
        return seed
    digest = hashlib.sha256(f"monkey-choice:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


# --- response formats ----------------------------------------------------------------------------------------


class ResponseGrammars:
    """The grammars of response formats, compiled for the model's vocabulary once per schema (an LRU)."""

    def __init__(self, keep: int = GRAMMAR_CACHE) -> None:
        self.keep = keep
        self._compiled: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, body: ChatCompletionRequest, monkey: Any) -> CompiledGrammar | None:
        """The grammar `response_format` asks for (None: free text); a 400 for a schema it cannot take."""
        response_format = body.response_format
        if response_format is None or response_format.type == "text":
            return None
        if isinstance(response_format, JSONSchemaFormat):
            spec = response_format.json_schema
            schema, strict, param = spec.schema_, bool(spec.strict), "response_format.json_schema.schema"
        else:
            schema, strict, param = {"type": "object"}, True, "response_format"
        vocabulary = [str(monkey.tokenizer.vocab_file), monkey.model.config.vocab_size]
        try:
            key = json.dumps([schema, strict, vocabulary], sort_keys=True, allow_nan=False)
        except RecursionError:
            raise bad_request("the schema is nested too deeply", param, code="invalid_schema") from None
        except (TypeError, ValueError):
            raise bad_request("the schema is not plain JSON", param, code="invalid_schema") from None
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        compiled = _compile(schema, strict, monkey, param)
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > self.keep:
                self._compiled.popitem(last=False)
        return compiled


def _compile(schema: dict[str, Any], strict: bool, monkey: Any, param: str) -> CompiledGrammar:
    from llguidance import LLMatcher

    from monkey_cli.extract.constraint import CompiledGrammar, llguidance_tokenizer
    from monkey_cli.extract.schema import SchemaError

    if strict and isinstance(schema.get("x-guidance"), dict):
        # llguidance's own options may not relax a strict schema: every keyword enforced, oneOf as oneOf
        schema = {**schema, "x-guidance": {**schema["x-guidance"], "lenient": False, "coerce_one_of": False}}
    options = {"whitespace_flexible": False, "lenient": not strict}
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, defaults=options)
        vocabulary = llguidance_tokenizer(monkey.tokenizer, monkey.model.config.vocab_size)
        compiled = CompiledGrammar(grammar, vocabulary, name="schema", stop_at_end=True)
    except (SchemaError, ValueError, RecursionError) as exc:
        detail = str(exc).removeprefix("schema: cannot constrain answers to it: ")
        hint = " (strict: true takes only what the grammar enforces; without it such keywords are ignored)"
        raise bad_request(
            f"the schema cannot be enforced: {detail[:300]}" + (hint if strict else ""),
            param,
            code="invalid_schema",
        ) from None
    if _admits_nothing(compiled, monkey.model.config.vocab_size):
        raise bad_request("the schema cannot be enforced: no JSON document satisfies it", param, code="invalid_schema")
    return compiled


def _admits_nothing(compiled: CompiledGrammar, vocab_size: int) -> bool:
    """Whether the grammar gives up before its first token (`{"$ref": "#"}`: no document satisfies it); the
    engine would otherwise find every token masked."""
    import torch

    from monkey_cli.engine.constraints import bitmask_words

    constraint = compiled.constraint()
    constraint.fill_next_token_bitmask(torch.zeros((1, bitmask_words(vocab_size)), dtype=torch.int32), 0)
    return constraint.is_terminated()


# --- stop strings --------------------------------------------------------------------------------------------


def stop_strings(body: ChatCompletionRequest) -> tuple[str, ...]:
    if body.stop is None:
        return ()
    return (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)


class StopAt:
    """A token constraint that ends the answer once its text holds one of `stops` (bytes, as UTF-8), and
    otherwise allows what `inner` allows (every token without one). The engine then finishes the request with
    "stop" right after the token that completed the stop string."""

    def __init__(self, stops: Sequence[str], token_bytes: Callable[[int], bytes], inner: Any = None) -> None:
        self._stops = [stop.encode("utf-8") for stop in stops]
        self._token_bytes = token_bytes
        self._inner = inner
        self._keep = max(len(stop) for stop in self._stops) - 1  # bytes of the text a match may start in
        self._tail = b""
        self.stopped = False

    @property
    def masks_tokens(self) -> bool:
        """Only a grammar inside restricts the choice: stop strings alone leave the answer free (the engine asks
        for no mask, so the tokens are the free answer's up to the stop)."""
        return self._inner is not None

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        if self._inner is not None:
            self._inner.fill_next_token_bitmask(bitmask, index)
        else:
            bitmask[index].fill_(-1)  # every bit set: every token allowed

    def accept_token(self, token_id: int) -> bool:
        accepted = self._inner.accept_token(token_id) if self._inner is not None else True
        text = self._tail + self._token_bytes(token_id)
        if any(stop in text for stop in self._stops):
            self.stopped = True
        self._tail = text[max(len(text) - self._keep, 0) :]
        return accepted

    def is_terminated(self) -> bool:
        return self.stopped or (self._inner is not None and self._inner.is_terminated())

    @property
    def error(self) -> str | None:
        return getattr(self._inner, "error", None)


def constraint_factory(
    grammar: CompiledGrammar | None, stops: Sequence[str], tokenizer: Any
) -> Callable[[], Any] | None:
    """What makes each choice's constraint (each keeps its own state), or None when the answer is free."""
    if grammar is None and not stops:
        return None
    if not stops:
        assert grammar is not None
        return grammar.constraint
    return lambda: StopAt(stops, tokenizer.token_bytes, grammar.constraint() if grammar is not None else None)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to its first stop string, and whether there was one."""
    found = [position for position in (text.find(stop) for stop in stops) if position >= 0]
    return (text[: min(found)], True) if found else (text, False)


def answer_text(tokenizer: Any, token_ids: Sequence[int], stops: Sequence[str]) -> str:
    """A choice's content: its tokens decoded without special tokens, cut before the first stop string, trimmed
    as every answer is (`tasks.clean_answer`)."""
    text, _ = cut_at_stop(tokenizer.decode(list(token_ids), skip_special_tokens=True), stops)
    return tasks.clean_answer(text)


class ChoiceText:
    """A choice's text piece by piece as its tokens come: the pieces joined equal its content (`answer_text`).

    Held back until more text shows what it is: the first bytes of a character whose last bytes are still to
    come, whitespace (the content is trimmed), and an end of the text that may begin a stop string."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        self._stops = tuple(stops)
        self._tokens: list[int] = []
        self._sent = ""
        self._stopped = False

    def push(self, token: int) -> str:
        if self._stopped:
            return ""
        self._tokens.append(token)
        text = self._tokenizer.decode(self._tokens, skip_special_tokens=True)
        text, self._stopped = cut_at_stop(text, self._stops)
        if not self._stopped:
            text = text[: len(text) - _stop_prefix(text, self._stops)].rstrip(_INCOMPLETE)
        shown = tasks.clean_answer(text)
        if not shown.startswith(self._sent):  # cannot happen: what is shown only grows
            return ""
        piece, self._sent = shown[len(self._sent) :], shown
        return piece

    def finish(self, answer: str) -> str:
        """What of `answer` (the choice's content) has not been sent yet."""
        return answer[len(self._sent) :] if answer.startswith(self._sent) else ""


def _stop_prefix(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of `text` that begins some stop string (it may still become one)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


# --- log-probabilities ---------------------------------------------------------------------------------------

UNLIKELY = -9999.0  # what OpenAI shows for a log-probability too small to write (JSON has no -infinity)


class TokenTexts:
    """How log-probabilities name tokens: a BPE token by its bytes (decoded, with bytes that are only part of a
    character written as \\xNN escapes) and the bytes themselves; a special token by its name, without bytes."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._special = {token_id: name for name, token_id in tokenizer.special_tokens.items()}

    def entry(self, token_id: int, logprob: float) -> TopLogprob:
        data = self._tokenizer.token_bytes(token_id)
        if data:
            return TopLogprob(token=data.decode("utf-8", "backslashreplace"), logprob=_finite(logprob),
                              bytes=list(data))
        name = self._special.get(token_id, f"<|token_{token_id}|>")
        return TopLogprob(token=name, logprob=_finite(logprob), bytes=None)

    def logprobs(self, result: Any, start: int = 0, stop: int | None = None) -> ChoiceLogprobs:
        """The tokens `start:stop` of a result as OpenAI's `logprobs.content`."""
        content = []
        best = result.top_logprobs
        end = len(result.token_ids) if stop is None else stop
        for position in range(start, end):
            chosen = self.entry(result.token_ids[position], result.logprobs[position])
            top = [self.entry(t, lp) for t, lp in best[position]] if best is not None else []
            content.append(TokenLogprob(**chosen.model_dump(), top_logprobs=top))
        return ChoiceLogprobs(content=content)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else UNLIKELY


def check_grammar_error(handle: Any) -> None:
    """A 500 when a grammar gave up while decoding (a lexer limit of llguidance's, say): its answer was cut
    short and is no JSON document."""
    constraint = getattr(handle.request, "constraint", None)
    error = getattr(constraint, "error", None)
    if error:
        raise APIError(500, f"the response format's grammar failed while decoding: {error[:200]}",
                       code="grammar_failed")

"""Token constraints for the engine (`monkey_cli.engine.constraints.TokenConstraint`) over llguidance.

Why llguidance (docs/extract.md has the figures): it computes a token mask for the real 151,936-token Qwen
vocabulary in 0.03-0.6 ms per token and compiles a field's grammar in about 1 ms, because it walks a token trie
with a lazily built lexer instead of precomputing a state x vocabulary table (outlines-core took 3.2 s to index
a 200-character free-text regex over that vocabulary); it reads tiktoken's byte-level BPE with Qwen's special
tokens directly (`LLTokenizer.from_tiktoken`), so it never offers <img>, <|im_start|> and the like; it takes a
context-free grammar (Lark), JSON Schema and regexes with intersection and negation; and it is one wheel with no
dependencies, running on the CPU between decode steps, so the compiled (CUDA-graph) step stays untouched.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from monkey_cli.extract.schema import SchemaError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from monkey_cli.model.tokenizer import QWenTokenizer

_TOKENIZERS: dict[tuple[str, int, int], Any] = {}
_TOKENIZERS_LOCK = threading.Lock()


def llguidance_tokenizer(tokenizer: QWenTokenizer, vocab_size: int) -> Any:
    """llguidance's view of the model's vocabulary (`vocab_size`: the width of its logits), built once per
    vocabulary file (about 0.7 s for Qwen's 151k tokens) and shared."""
    from llguidance import LLTokenizer

    from monkey_cli.model.tokenizer import QWEN_SPLIT_PATTERN, load_bpe_ranks

    key = (str(tokenizer.vocab_file), vocab_size, tokenizer.eod_id)
    with _TOKENIZERS_LOCK:
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = LLTokenizer.from_tiktoken(  # type: ignore[attr-defined]
                encoder=load_bpe_ranks(tokenizer.vocab_file),
                special_tokens=dict(tokenizer.special_tokens),
                pattern=QWEN_SPLIT_PATTERN,
                eos_token=tokenizer.eod_id,
                n_vocab=vocab_size,
            )
        return _TOKENIZERS[key]


class GrammarConstraint:
    """Tokens limited to what a grammar allows next. By default the answer ends only with <|endoftext|> (which
    the grammar allows once it is complete, and forces once nothing can follow); `stop_at_end` ends it as soon as
    nothing can follow, without one (a JSON object ends at its `}`)."""

    def __init__(self, matcher: Any, stop_at_end: bool = False) -> None:
        self._matcher = matcher
        self._stop_at_end = stop_at_end

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        # llguidance writes the row in place (not through llguidance.torch, whose import pulls in torch.compile)
        row = bitmask[index]
        if bitmask.dtype != _int32() or bitmask.device.type != "cpu" or not row.is_contiguous():
            raise ValueError("the bitmask must be a contiguous int32 tensor on the CPU")
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def accept_token(self, token_id: int) -> bool:
        return bool(self._matcher.consume_token(token_id))

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_error() or (self._stop_at_end and self._matcher.is_stopped()))

    @property
    def error(self) -> str | None:
        """Why the grammar gave up (a lexer limit, say), or None."""
        return self._matcher.get_error() or None if self._matcher.is_error() else None


class CompiledGrammar:
    """A grammar compiled once for a vocabulary; `constraint()` gives each request a fresh copy of its state."""

    def __init__(self, grammar: str, tokenizer: Any, *, name: str = "grammar", stop_at_end: bool = False) -> None:
        from llguidance import LLMatcher

        self._template = LLMatcher(tokenizer, grammar, log_level=0)
        self._stop_at_end = stop_at_end
        if self._template.is_error():
            raise SchemaError(f"{name}: cannot constrain answers to it: {_first_line(self._template.get_error())}")

    @classmethod
    def from_lark(cls, lark: str, tokenizer: Any, **options: Any) -> CompiledGrammar:
        from llguidance import LLMatcher

        return cls(LLMatcher.grammar_from_lark(lark), tokenizer, **options)

    @classmethod
    def from_json_schema(cls, schema: Any, tokenizer: Any, **options: Any) -> CompiledGrammar:
        """Answers that are JSON documents valid for `schema` (compact: no whitespace between tokens), ending at
        the document's last character (what a server's `response_format` asks for)."""
        from llguidance import LLMatcher

        try:
            grammar = LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except ValueError as exc:
            raise SchemaError(f"not a JSON Schema: {_first_line(str(exc))}") from None
        return cls(grammar, tokenizer, **{"stop_at_end": True, **options})

    def constraint(self) -> GrammarConstraint:
        return GrammarConstraint(self._template.deep_copy(), stop_at_end=self._stop_at_end)


class ForcedTokens:
    """Exactly `tokens`, then <|endoftext|>: the engine then reports the model's own probability of that answer
    (how "not found" is scored on a page whose answer was something else)."""

    def __init__(self, tokens: Sequence[int], eos_id: int) -> None:
        self._tokens = [*tokens, eos_id]
        self._position = 0

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        token = self._tokens[min(self._position, len(self._tokens) - 1)]
        row = bitmask[index]
        row.zero_()
        bit = 1 << (token % 32)
        row[token // 32] = bit - (1 << 32) if bit >= 1 << 31 else bit  # int32: bit 31 is the sign

    def accept_token(self, token_id: int) -> bool:
        expected = self._tokens[min(self._position, len(self._tokens) - 1)]
        self._position += 1
        return token_id == expected

    def is_terminated(self) -> bool:
        return self._position > len(self._tokens)


def _int32() -> Any:
    import torch

    return torch.int32


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith("error:")), None)
    return (detail or (lines[0] if lines else "invalid grammar"))[:300]

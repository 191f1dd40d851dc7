"""Text from tokens as they arrive: what a terminal or a server stream prints while an answer is decoded."""

from __future__ import annotations

from typing import Any

_INCOMPLETE = "\ufffd"  # what decoding shows for the first bytes of a character whose last bytes are still to come


class IncrementalDecoder:
    """Feed token ids one by one; get back only the new text, never half of a multi-byte character.

    The pieces joined equal the whole answer's text as `Monkey.generate` returns it: special tokens dropped and
    the leading whitespace (the space that begins most answers) left out.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self._shown = 0  # characters of the decoded text already returned
        self._started = False

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith(_INCOMPLETE):
            return ""  # wait for the rest of the character
        piece, self._shown = text[self._shown :], len(text)
        if not self._started:
            piece = piece.lstrip()
            self._started = bool(piece)
        return piece

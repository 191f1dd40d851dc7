"""Text that is safe to print: what comes from documents, file names and answers never drives a terminal.

A PDF's text layer, a file name or a model's answer can hold control characters: ESC sequences that set the
window title, write the clipboard (OSC 52) or clear the screen, a carriage return that overwrites what a line
showed, C1 controls that some terminals obey, bidirectional overrides that reorder what is shown, and lone
surrogates (names that are not valid UTF-8) that cannot even be encoded. Every writer and every stderr line
goes through one of these functions, so none of that reaches a terminal or a file raw:

  terminal_text(text)   answers and reports: newlines and tabs kept, every other control shown as `\\x1b`,
                        `\\u202e`, ... (a Windows line end `\\r\\n` becomes `\\n`)
  terminal_line(text)   names, headers and messages: the same, and newlines and tabs escaped too, so a file
                        name with a newline cannot start a line of its own (and forge a `==> ... <==` header)
  json_text(value)      JSON as `json.dumps(ensure_ascii=False)` writes it, plus `\\uXXXX` escapes for the
                        characters JSON allows raw but a terminal or a UTF-8 encoder does not take (DEL, C1
                        controls, line/paragraph separators, bidi overrides, lone surrogates); parsing it
                        gives back exactly the same strings.
"""

from __future__ import annotations

import json
import re
from typing import Any

# C0 controls except tab and newline, DEL, C1 controls, the Unicode line and paragraph separators,
# bidirectional embeddings, overrides and isolates, and lone surrogates.
_SHOWN_ESCAPED = "\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE_TEXT = re.compile(f"[{_SHOWN_ESCAPED}]")
_UNSAFE_LINE = re.compile(f"[\t\n{_SHOWN_ESCAPED}]")
# Inside a JSON document these can only occur within strings (everything structural is ASCII), and
# json.dumps already escapes U+0000-U+001F: the rest is escaped here.
_UNSAFE_JSON = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    character = match.group()
    if character in _NAMED:
        return _NAMED[character]
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal_text(text: str) -> str:
    """`text` with line breaks and tabs kept and every other control character made visible."""
    return _UNSAFE_TEXT.sub(_escape, text.replace("\r\n", "\n"))


def terminal_line(text: object) -> str:
    """`text` on one line, every control character (newline and tab included) made visible."""
    return _UNSAFE_LINE.sub(_escape, str(text))


def json_text(value: Any, **options: Any) -> str:
    """`json.dumps(value, ensure_ascii=False, **options)` with no raw control, separator, bidi or surrogate."""
    text = json.dumps(value, ensure_ascii=False, **options)
    return _UNSAFE_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", text)

"""The Qwen tokenizer of Monkey: byte-level BPE (tiktoken) plus special tokens and image spans.

Token ids are those of the original `QWenTokenizer`:

* ranks ``0 .. n-1`` come from the checkpoint's ``qwen.tiktoken`` (one ``base64-token rank`` per line);
* right after them: ``<|endoftext|>`` (end of document, also used as padding), ``<|im_start|>``,
  ``<|im_end|>``, ``<|extra_0|>`` .. ``<|extra_204|>``, then the grounding and image tags
  ``<ref> </ref> <box> </box> <quad> </quad> <img> </img> <imgpad>``.

An image is written in a prompt as ``<img>PATH</img>``. The original encodes PATH's UTF-8 bytes as ids
equal to the byte values (not their BPE ids) and pads them with ``<imgpad>`` to a fixed span, so that the
model can find the path and later overwrite those positions with image features. We keep that id layout
exactly (it is what the checkpoints were trained with) and expose the spans through `image_spans`.
"""

from __future__ import annotations

import base64
import binascii
import os
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tiktoken

from monkey_cli.errors import TokenizerError

if TYPE_CHECKING:
    import torch

VOCAB_FILE_NAME = "qwen.tiktoken"
DEFAULT_IMAGE_TOKEN_SPAN = 1280  # 4 windows + 1 global view, 256 resampler tokens each

# The pre-tokenizer split of Qwen (the same regular expression as the original, written out here):
# English contractions, letters with at most one leading non-letter, single digits, punctuation runs with
# their trailing newlines, newline runs, and whitespace (a trailing space stays with the next word).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
NUM_EXTRA_TOKENS = 205
IMAGE_START_TAG = "<img>"
IMAGE_END_TAG = "</img>"
IMAGE_PAD_TAG = "<imgpad>"
GROUNDING_TAGS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>")

# In id order, starting right after the last BPE rank.
SPECIAL_TOKEN_NAMES: tuple[str, ...] = (
    (ENDOFTEXT, IM_START, IM_END)
    + tuple(f"<|extra_{i}|>" for i in range(NUM_EXTRA_TOKENS))
    + GROUNDING_TAGS
    + (IMAGE_START_TAG, IMAGE_END_TAG, IMAGE_PAD_TAG)
)

_PREVIEW_CHARS = 40


class QWenTokenizer:
    """Encode prompts to ids and decode ids to text exactly as Monkey's original tokenizer does."""

    def __init__(
        self, vocab_file: str | os.PathLike[str], image_token_span: int = DEFAULT_IMAGE_TOKEN_SPAN
    ) -> None:
        is_int = isinstance(image_token_span, int) and not isinstance(image_token_span, bool)
        if not is_int or image_token_span < 1:
            raise TokenizerError(f"image_token_span must be a positive integer, got {image_token_span!r}")
        self.vocab_file = Path(vocab_file)
        self.image_token_span = image_token_span

        ranks = load_bpe_ranks(self.vocab_file)
        self.num_bpe_tokens = len(ranks)
        self.special_tokens: dict[str, int] = {
            name: self.num_bpe_tokens + offset for offset, name in enumerate(SPECIAL_TOKEN_NAMES)
        }
        self._encoding = tiktoken.Encoding(
            name=f"monkey-qwen-{self.vocab_file}",
            pat_str=QWEN_SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        # id -> token for `tokenize`; BPE tokens are bytes, special tokens their text (as the original).
        self._id_to_token: dict[int, bytes | str] = {rank: token for token, rank in ranks.items()}
        self._id_to_token.update({token_id: name for name, token_id in self.special_tokens.items()})

        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IM_START]
        self.im_end_id = self.special_tokens[IM_END]
        self.ref_start_id, self.ref_end_id = self.special_tokens["<ref>"], self.special_tokens["</ref>"]
        self.box_start_id, self.box_end_id = self.special_tokens["<box>"], self.special_tokens["</box>"]
        self.quad_start_id, self.quad_end_id = self.special_tokens["<quad>"], self.special_tokens["</quad>"]
        self.img_start_id = self.special_tokens[IMAGE_START_TAG]
        self.img_end_id = self.special_tokens[IMAGE_END_TAG]
        self.img_pad_id = self.special_tokens[IMAGE_PAD_TAG]

    @classmethod
    def from_dir(
        cls, checkpoint_dir: str | os.PathLike[str], image_token_span: int = DEFAULT_IMAGE_TOKEN_SPAN
    ) -> QWenTokenizer:
        """The tokenizer of a checkpoint folder: its `qwen.tiktoken`, a regular file inside the folder."""
        from monkey_cli.model.sources import model_file

        vocab_file = model_file(checkpoint_dir, VOCAB_FILE_NAME, error=TokenizerError)
        return cls(vocab_file, image_token_span=image_token_span)

    # --- sizes and aliases ------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._encoding.n_vocab

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (BPE ranks + special tokens); the model's embedding
        table may be larger."""
        return self._encoding.n_vocab

    @property
    def eos_token_id(self) -> int:
        return self.eod_id

    @property
    def pad_token_id(self) -> int:
        return self.eod_id

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_file={str(self.vocab_file)!r}, vocab_size={len(self)}, "
            f"image_token_span={self.image_token_span})"
        )

    # --- encoding ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids of a prompt: NFC-normalised, special-token text honoured, each `<img>PATH</img>` expanded
        to `<img>`, PATH's bytes, `<imgpad>` up to `image_token_span`, `</img>`."""
        text = unicodedata.normalize("NFC", text)
        ids = self._encoding.encode(text, allowed_special="all")
        if self.img_start_id not in ids:
            return ids
        return self._expand_image_spans(ids)

    def tokenize(self, text: str) -> list[bytes | str]:
        """Tokens of `encode(text)`: bytes for BPE tokens, text for special tokens. Inside an image span
        the path's bytes show as the BPE tokens whose ids equal those byte values (as the original)."""
        return [self._id_to_token[token_id] for token_id in self.encode(text)]

    def encode_prompt(self, before: str, after: str, ref: str | None = None) -> list[int]:
        """Ids of a prompt built from user text: `before`, one image span, `after`, and, with `ref`, the
        grounding form `<ref>` ref `</ref>` (TextMonkey's "where is this text" prompt; the tags are the special
        tokens, `ref` itself plain text).

        The texts are plain text (NFC, tiktoken's ordinary encoding): `<img>`, `<|endoftext|>`, `<ref>` and
        every other special-token look-alike in them become ordinary BPE pieces, so user text can neither
        end the prompt nor open an image span. The span is `<img>`, `image_token_span` x `<imgpad>`,
        `</img>`. For texts without such look-alikes this equals `encode(before + "<img></img>" + after)`
        (+ `"<ref>" + ref + "</ref>"`).
        """
        span = [self.img_start_id, *[self.img_pad_id] * self.image_token_span, self.img_end_id]
        ids = self._plain_ids(before) + span + self._plain_ids(after)
        if ref is not None:
            ids += [self.ref_start_id, *self._plain_ids(ref), self.ref_end_id]
        return ids

    def _plain_ids(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(unicodedata.normalize("NFC", text))

    def batch_encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both int64 [batch, longest], LEFT-padded with `<|endoftext|>`
        so that every prompt ends at the last column, where generation continues."""
        return self.pad_left([self.encode(text) for text in texts])

    def pad_left(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of ids -> (input_ids, attention_mask) as `batch_encode` makes them."""
        import torch

        longest = max((len(row) for row in rows), default=0)
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                input_ids[i, longest - len(row):] = torch.tensor(row, dtype=torch.long)
                attention_mask[i, longest - len(row):] = 1
        return input_ids, attention_mask

    def _expand_image_spans(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        cursor = 0
        for start, end in self._closed_spans(ids, context="prompt"):
            out.extend(ids[cursor:start])
            out.append(self.img_start_id)
            out.extend(self._path_ids(ids[start + 1 : end]))
            out.append(self.img_end_id)
            cursor = end + 1
        out.extend(ids[cursor:])
        return out

    def _path_ids(self, content: list[int]) -> list[int]:
        """The BPE ids of an `<img>` path -> its UTF-8 byte values padded to the span."""
        for token_id in content:
            if token_id >= self.eod_id:
                raise TokenizerError(
                    f"prompt has the special token {self._id_to_token[token_id]!r} inside "
                    f"{IMAGE_START_TAG}...{IMAGE_END_TAG}; only an image path may stand there"
                )
        path = self._encoding.decode_bytes(content)
        if len(path) > self.image_token_span:
            preview = _preview(path.decode("utf-8", errors="replace"))
            raise TokenizerError(
                f"image path {preview} is {len(path)} bytes long; at most {self.image_token_span} fit "
                f"in {IMAGE_START_TAG}...{IMAGE_END_TAG}"
            )
        return list(path) + [self.img_pad_id] * (self.image_token_span - len(path))

    # --- decoding ---------------------------------------------------------------------------------
    def decode(self, ids: Iterable[int] | Any, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, or a 1-D tensor). Image spans turn back into `<img>PATH</img>`; with
        `skip_special_tokens` every id >= `<|endoftext|>` (special tokens, tags, pads, ids beyond the
        tokenizer) is dropped but image paths stay. Invalid UTF-8 becomes U+FFFD; spaces are kept as is."""
        ids = _as_id_list(ids)
        if self.img_start_id in ids:
            ids = self._collapse_image_spans(ids)
        if skip_special_tokens:
            ids = [token_id for token_id in ids if token_id < self.eod_id]
        for token_id in ids:
            if not 0 <= token_id < len(self):
                raise TokenizerError(
                    f"cannot decode token id {token_id}: the vocabulary has ids 0..{len(self) - 1}"
                )
        return self._encoding.decode(ids, errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a BPE token stands for (part of a UTF-8 character, maybe); b"" for a special token or an id
        beyond the tokenizer, which an answer's text leaves out (`decode(..., skip_special_tokens=True)`)."""
        token = self._id_to_token.get(token_id)
        return token if isinstance(token, bytes) else b""

    def decode_grounded(self, ids: Iterable[int] | Any) -> str:
        """Text of generated `ids` with the grounding tags (`<ref>`, `</ref>`, `<box>`, `</box>`, `<quad>`,
        `</quad>`) written out, as the original demo decodes an answer to find positions in it; every other
        special id (end of text, image tags, ids beyond the vocabulary) is dropped. Never raises."""
        keep = {self.special_tokens[tag] for tag in GROUNDING_TAGS}
        pieces: list[bytes] = []
        for token_id in _as_id_list(ids):
            token = self._id_to_token.get(token_id)
            if isinstance(token, bytes):
                pieces.append(token)
            elif token_id in keep:
                pieces.append(str(token).encode("ascii"))
        return b"".join(pieces).decode("utf-8", errors="replace")

    def batch_decode(
        self, input_ids: Any, attention_mask: Any | None = None, skip_special_tokens: bool = False
    ) -> list[str]:
        """Decode each row of a [batch, length] tensor or nested list; positions whose mask is 0 (the
        left padding of `batch_encode`) are left out even when special tokens are kept."""
        rows = [_as_id_list(row) for row in input_ids]
        if attention_mask is not None:
            masks = [_as_id_list(mask) for mask in attention_mask]
            rows = [
                [token_id for token_id, keep in zip(row, mask, strict=True) if keep]
                for row, mask in zip(rows, masks, strict=True)
            ]
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]

    def _collapse_image_spans(self, ids: list[int]) -> list[int]:
        """Replace each span's byte ids and pads by the BPE ids of the path they spell."""
        out: list[int] = []
        cursor = 0
        for start, end in self._closed_spans(ids, context="token ids"):
            out.extend(ids[cursor:start])
            out.append(self.img_start_id)
            out.extend(self._encoding.encode_ordinary(self._path_of_span(ids, start, end)))
            out.append(self.img_end_id)
            cursor = end + 1
        out.extend(ids[cursor:])
        return out

    def _path_of_span(self, ids: list[int], start: int, end: int) -> str:
        """The path written in the span `ids[start] = <img> .. ids[end] = </img>`: the bytes before the
        first `<imgpad>`. A span without any pad cannot be decoded (the original raises there too)."""
        content = ids[start + 1 : end]
        if self.img_pad_id not in content:
            raise TokenizerError(
                f"cannot decode the image span at position {start}: its {len(content)} positions hold no "
                f"{IMAGE_PAD_TAG}, so the end of the path is unknown"
            )
        path_bytes = content[: content.index(self.img_pad_id)]
        try:
            return bytes(path_bytes).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise TokenizerError(
                f"cannot decode the image span at position {start}: its ids are not the UTF-8 bytes of a path"
            ) from None

    # --- image spans ------------------------------------------------------------------------------
    def image_spans(self, ids: Iterable[int] | Any) -> list[tuple[int, int]]:
        """[start, end) of the content of every `<img>`...`</img>` in `ids` (the positions the model
        fills with image features; `end - start == image_token_span` for ids from `encode`)."""
        return [(start + 1, end) for start, end in self._closed_spans(_as_id_list(ids), context="token ids")]

    def image_paths(self, ids: Iterable[int] | Any) -> list[str]:
        """The path written in each image span (empty for `<img></img>`), in order."""
        ids = _as_id_list(ids)
        spans = self._closed_spans(ids, context="token ids")
        return [self._path_of_span(ids, start, end) for start, end in spans]

    def _closed_spans(self, ids: list[int], context: str) -> list[tuple[int, int]]:
        """(index of `<img>`, index of its `</img>`) pairs, left to right. A `</img>` with no `<img>`
        before it is ordinary text; an `<img>` never closed is an error (as in the original)."""
        spans = []
        search_from = 0
        while True:
            start = _index_or_none(ids, self.img_start_id, search_from)
            if start is None:
                return spans
            end = _index_or_none(ids, self.img_end_id, start + 1)
            if end is None:
                text_after = [t for t in ids[start + 1 :] if 0 <= t < self.eod_id]
                tail = self._encoding.decode(text_after, errors="replace")
                raise TokenizerError(
                    f"unclosed {IMAGE_START_TAG} in the {context}: no {IMAGE_END_TAG} follows "
                    f"{_preview(IMAGE_START_TAG + tail)}"
                )
            spans.append((start, end))
            search_from = end + 1


def load_bpe_ranks(vocab_file: str | os.PathLike[str]) -> dict[bytes, int]:
    """Read a tiktoken ranks file: one `base64(token) rank` per line, ranks 0..n-1 each used once, all
    256 single bytes present (byte-level BPE must be able to spell any input). Blank lines are skipped.
    The file must be a regular file of at most MAX_VOCAB_BYTES."""
    from monkey_cli.model.sources import MAX_VOCAB_BYTES, read_regular_file

    path = Path(vocab_file)
    if not path.exists() and not path.is_symlink():
        raise TokenizerError(f"{path}: vocabulary file not found")
    contents = read_regular_file(path, MAX_VOCAB_BYTES, error=TokenizerError)

    ranks: dict[bytes, int] = {}
    rank_lines: dict[int, int] = {}  # rank -> line number, to name both lines of a duplicate
    for line_number, line in enumerate(contents.splitlines(), start=1):
        if not line.strip():
            continue
        token, rank = _parse_rank_line(line, path, line_number)
        if token in ranks:
            raise TokenizerError(f"{path}:{line_number}: token {token!r} is listed twice")
        if rank in rank_lines:
            raise TokenizerError(
                f"{path}:{line_number}: rank {rank} already given on line {rank_lines[rank]}"
            )
        ranks[token] = rank
        rank_lines[rank] = line_number

    if not ranks:
        raise TokenizerError(f"{path}: vocabulary file has no tokens")
    if max(rank_lines) != len(ranks) - 1:
        # ranks are distinct and non-negative, so the largest one exceeding n-1 means a gap
        raise TokenizerError(
            f"{path}:{rank_lines[max(rank_lines)]}: rank {max(rank_lines)} leaves a gap; "
            f"{len(ranks)} tokens need ranks 0..{len(ranks) - 1}"
        )
    missing = [value for value in range(256) if bytes([value]) not in ranks]
    if missing:
        raise TokenizerError(
            f"{path}: vocabulary lacks {len(missing)} single-byte token(s), e.g. {bytes([missing[0]])!r}"
        )
    return ranks


def _parse_rank_line(line: bytes, path: Path, line_number: int) -> tuple[bytes, int]:
    fields = line.split()
    if len(fields) != 2:
        raise TokenizerError(
            f"{path}:{line_number}: expected 'base64-token rank', "
            f"got {len(fields)} field(s): {_preview(line)}"
        )
    encoded, rank_text = fields
    try:
        token = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise TokenizerError(f"{path}:{line_number}: token {_preview(encoded)} is not valid base64") from None
    if not token:
        raise TokenizerError(f"{path}:{line_number}: empty token")
    if not rank_text.isdigit():
        raise TokenizerError(
            f"{path}:{line_number}: rank {_preview(rank_text)} is not a non-negative integer"
        )
    return token, int(rank_text)


def _preview(value: str | bytes) -> str:
    """A short, single-line repr of user text for error messages."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if len(value) > _PREVIEW_CHARS:
        value = value[:_PREVIEW_CHARS] + "..."
    return repr(value)


def _as_id_list(ids: Iterable[int] | Any) -> list[int]:
    """Accept an int, a list/tuple of ints or a tensor/array (via `tolist`)."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(token_id) for token_id in ids]


def _index_or_none(ids: list[int], value: int, start: int) -> int | None:
    try:
        return ids.index(value, start)
    except ValueError:
        return None

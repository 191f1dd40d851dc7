"""Training data in the original Monkey's format: conversations with one image, one question, one answer.

    [{"id": "form-17",
      "conversations": [
        {"from": "user", "value": "<img>scans/form-17.png</img> What is the invoice number? Answer: "},
        {"from": "assistant", "value": "INV-0042"}]}]

A JSON list, or JSON lines (one such object per line). The turns' roles are the original's ("user",
"assistant") or ShareGPT's / LLaVA's ("human", "gpt"). Image paths are relative to the data file (absolute
paths work too); a PDF page is `scan.pdf#page=3` or a `"page": 3` field on the item (1-based), and a
multi-page document without one is refused rather than guessed.

Like the original's `preprocess`, the question and the answer are tokenized separately and concatenated,
followed by `<|endoftext|>`; the loss covers the answer tokens and that closing `<|endoftext|>` only.
The path between the image tags is only a placeholder (the model receives the pixels separately), so it is
dropped from the prompt exactly as at inference time.

The rule for bad data: a problem with the file itself (missing, not JSON, not a list of objects) is fatal;
a problem with one item (no image, unreadable image, no assistant turn, image span not first, too long, a
path the system cannot take, JSON nested too deeply to read...) skips that item with one line naming it.
No usable item left is fatal, and so is more than MAX_SKIPPED_SHARE of the items skipped, unless the run
says to skip them (`--skip-bad`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monkey_cli.errors import MonkeyError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

    from monkey_cli.model.processor import MonkeyImageProcessor
    from monkey_cli.model.tokenizer import QWenTokenizer

IGNORE_INDEX = -100  # labels of positions that carry no loss (the prompt and the padding)
USER, ASSISTANT = "user", "assistant"
# The turns' "from" values: the original's, and ShareGPT's / LLaVA's names for the same two sides.
USER_ROLES = (USER, "human")
ASSISTANT_ROLES = (ASSISTANT, "gpt")
# More than this share of a data file's items skipped stops the run before training (unless skip_bad): a
# path root or a field name wrong for the whole file skips most items, and training on the few left is
# rarely what was meant.
MAX_SKIPPED_SHARE = 0.1
_LEADING_IMAGE = re.compile(r"<img>(.*?)</img>", re.DOTALL)
_PAGE_SUFFIX = re.compile(r"#page=(\d+)$")
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},]', re.DOTALL)  # strings, brackets and commas of JSON text
_SHOWN_PATH = 160  # characters of a path a message shows


class DataError(MonkeyError):
    """The data file as a whole cannot be used (missing, not JSON, no usable item)."""


@dataclass(frozen=True)
class Example:
    """One training item, checked and tokenized: `labels` is IGNORE_INDEX on the prompt."""

    name: str  # how messages refer to it: "train.json: item 'form-17'"
    image: Path
    page: int | None
    prompt: str  # the user turn with the image span emptied: "<img></img> What is ...? Answer: "
    answer: str
    input_ids: list[int] = field(repr=False)
    labels: list[int] = field(repr=False)


@dataclass
class LoadedData:
    """The usable examples of a data file, and one message per skipped item."""

    path: Path
    examples: list[Example]
    skipped: list[str]
    total: int

    def require_examples(self, skip_bad: bool = False) -> LoadedData:
        """Itself, if at least one item is usable (no usable item is fatal) and, unless `skip_bad`, no more
        than MAX_SKIPPED_SHARE of the items were skipped."""
        if not self.examples:
            why = f"all {self.total} items were skipped" if self.total else "it holds no items"
            raise DataError(f"{self.path}: no usable item ({why})")
        skipped = self.total - len(self.examples)
        if not skip_bad and skipped > MAX_SKIPPED_SHARE * self.total:
            raise DataError(
                f"{self.path}: {skipped} of {self.total} items were skipped, more than {MAX_SKIPPED_SHARE:.0%}: "
                f"fix them (each is named above), or pass --skip-bad to train on the other {len(self.examples)}"
            )
        return self


class ItemProblem(Exception):
    """Why one item is skipped (becomes one line naming the item)."""


def load_data(
    path: str | Path,
    tokenizer: QWenTokenizer,
    *,
    max_length: int,
    image_size: tuple[int, int],
) -> LoadedData:
    """Read, check and tokenize every item of a data file; each bad item is left out with a message."""
    path = Path(path)
    examples: list[Example] = []
    skipped: list[str] = []
    total = 0
    for name, raw in _raw_items(path):
        total += 1
        try:
            if isinstance(raw, ItemProblem):
                raise raw
            examples.append(_example(name, raw, path.parent, tokenizer, max_length, image_size))
        except ItemProblem as problem:
            skipped.append(f"{name}: {problem}")
    return LoadedData(path=path, examples=examples, skipped=skipped, total=total)


# ---------------------------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------------------------
def _raw_items(path: Path) -> Iterator[tuple[str, Any]]:
    """(name, item or ItemProblem) for each item: a JSON list, or one JSON object per line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the data file ({exc})") from None
    if text.lstrip().startswith("["):
        try:
            items: list[Any] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        except RecursionError:  # some item nests too deeply to read: read the items one by one
            items = _list_items(path, text)
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON list of items")
        for number, item in enumerate(items, start=1):
            yield _item_name(path, item, f"item {number}"), item
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            yield f"{path.name}: line {number}", ItemProblem(f"not valid JSON ({exc.msg})")
            continue
        except RecursionError:
            yield f"{path.name}: line {number}", ItemProblem("JSON nested too deeply to read")
            continue
        yield _item_name(path, item, f"line {number}"), item


def _list_items(path: Path, text: str) -> list[Any]:
    """The items of a JSON list read one at a time: an item nested too deeply becomes an ItemProblem (the
    others are read). The list is cut into its items by a scan of its strings and brackets (no recursion)."""
    items: list[Any] = []
    depth, start = 0, None
    for token in _JSON_TOKENS.finditer(text):
        mark = token.group()
        if mark in "[{":
            depth += 1
            if depth == 2 and start is None:
                start = token.start()
        elif mark in "]}":
            depth -= 1
            if depth == 1 and start is not None:
                items.append(_one_item(text[start : token.end()]))
                start = None
            elif depth == 0:
                return items
        elif depth == 1 and start is None and mark == ",":
            continue
        elif depth == 1 and start is None and mark.startswith('"'):
            items.append(_one_item(mark))  # a bare string item (refused later as not an object)
    raise DataError(f"{path}: not valid JSON (the list is not closed)")


def _one_item(text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        return ItemProblem("JSON nested too deeply to read")
    except json.JSONDecodeError as exc:
        return ItemProblem(f"not valid JSON ({exc.msg})")


def _item_name(path: Path, item: Any, position: str) -> str:
    identifier = item.get("id") if isinstance(item, dict) else None
    if identifier is None or isinstance(identifier, (dict, list)):
        return f"{path.name}: {position}"
    shown = repr(identifier)
    return f"{path.name}: {position} (id {shown if len(shown) <= 80 else shown[:77] + '...'})"


def shown_path(path: Path | str) -> str:
    """A path as a message shows it: whole, or its start and end when it is very long."""
    text = str(path)
    return text if len(text) <= _SHOWN_PATH else f"{text[:80]}...{text[-60:]} ({len(text)} characters)"


# ---------------------------------------------------------------------------------------------------------
# One item
# ---------------------------------------------------------------------------------------------------------
def _example(
    name: str,
    item: Any,
    root: Path,
    tokenizer: QWenTokenizer,
    max_length: int,
    image_size: tuple[int, int],
) -> Example:
    question, answer = _turns(item)
    match = _LEADING_IMAGE.match(question)
    if match is None:
        where = "is missing" if "<img>" not in question else "is not the first thing in the user turn"
        raise ItemProblem(f"the <img>PATH</img> span {where}")
    rest = question[match.end() :]
    if "<img>" in rest:
        raise ItemProblem("the user turn holds more than one <img> span (one image per item)")
    if "<img>" in answer:
        raise ItemProblem("the answer holds an <img> tag")
    image, page = _image_path(match.group(1), item, root)
    prompt = "<img></img>" + rest
    input_ids, labels = encode_example(tokenizer, prompt, answer)
    if len(input_ids) > max_length:
        raise ItemProblem(f"is {len(input_ids)} tokens long, more than --max-length {max_length}")
    check_image(image, page, image_size)
    return Example(name, image, page, prompt, answer, input_ids, labels)


def _turns(item: Any) -> tuple[str, str]:
    if not isinstance(item, dict):
        raise ItemProblem(f"expected an object, got {type(item).__name__}")
    turns = item.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ItemProblem('no "conversations" list')
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        raise ItemProblem('every turn must be an object with "from" and a string "value"')
    roles = [t.get("from") for t in turns]
    if roles[0] not in USER_ROLES:
        raise ItemProblem(f'the first turn must be from "user" (or "human"), not {_shown_role(roles[0])}')
    if len(turns) < 2 or roles[1] not in ASSISTANT_ROLES:
        raise ItemProblem("no assistant turn after the question")
    if len(turns) > 2:
        raise ItemProblem(f"has {len(turns)} turns; one question and one answer per item (split it into items)")
    answer = turns[1]["value"]
    if not answer.strip():
        raise ItemProblem("the answer is empty")
    return turns[0]["value"], answer


def _shown_role(role: Any) -> str:
    text = repr(role)
    return text if len(text) <= 40 else text[:37] + "..."


def _image_path(written: str, item: dict[str, Any], root: Path) -> tuple[Path, int | None]:
    """The image file and page of an item: `PATH#page=N` or a "page" field (both must agree)."""
    written = written.strip()
    if not written:
        raise ItemProblem("the <img></img> span names no image")
    page = None
    suffix = _PAGE_SUFFIX.search(written)
    if suffix:
        page = int(suffix.group(1))
        written = written[: suffix.start()]
    field_page = item.get("page")
    if field_page is not None:
        if not isinstance(field_page, int) or isinstance(field_page, bool):
            raise ItemProblem(f'"page" must be a page number, got {field_page!r}')
        if page is not None and page != field_page:
            raise ItemProblem(f'"page": {field_page} disagrees with {written}#page={page}')
        page = field_page
    if page is not None and page < 1:
        raise ItemProblem(f"page numbers start at 1, got {page}")
    path = Path(written)
    return (path if path.is_absolute() else root / path), page


def check_image(image: Path, page: int | None, size: tuple[int, int]) -> None:
    """Open the page once now, so a broken file is skipped up front instead of stopping training later."""
    try:
        found = image.is_file()
    except OSError as exc:  # a name too long for the system, a component that is a file, ...
        raise ItemProblem(f"cannot use the image path {shown_path(image)}: {exc.strerror or exc}") from None
    if not found:
        raise ItemProblem(f"image not found: {shown_path(image)}")
    open_page(image, page, size)


def open_page(image: Path, page: int | None, size: tuple[int, int]) -> Image.Image:
    """The page as the model sees it, through the same document loader as `monkey ask`."""
    from monkey_cli.documents import PageError, iter_pages

    records = iter_pages([image], size=size, pages=[page] if page else None, text_layer=False)  # pixels only
    try:
        record = next(records, None)
    finally:
        records.close()
    if record is None:
        raise ItemProblem(f"{image}: no page")
    if isinstance(record, PageError):
        if page is not None and record.pages is not None and page > record.pages:
            raise ItemProblem(f"{image} has {record.pages} page(s), no page {page}")
        raise ItemProblem(str(record))
    if page is None and record.pages > 1:
        raise ItemProblem(f'{image} has {record.pages} pages: name one with {image.name}#page=N or a "page" field')
    return record.image


def encode_example(tokenizer: QWenTokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """ids = prompt + answer + <|endoftext|>; labels = IGNORE on the prompt, the ids on the rest."""
    from monkey_cli.errors import TokenizerError

    try:
        prompt_ids = tokenizer.encode(prompt)
        answer_ids = tokenizer.encode(answer)
    except TokenizerError as exc:
        raise ItemProblem(str(exc)) from None
    if tokenizer.img_start_id in answer_ids:
        raise ItemProblem("the answer holds an <img> tag")
    target = [*answer_ids, tokenizer.eod_id]
    return prompt_ids + target, [IGNORE_INDEX] * len(prompt_ids) + target


# ---------------------------------------------------------------------------------------------------------
# As a torch Dataset
# ---------------------------------------------------------------------------------------------------------
class MonkeyDataset:
    """Examples -> {"input_ids", "labels", "pixel_values" [views, 3, 448, 448]} (a map-style torch Dataset).

    Pages are opened and preprocessed when an item is read, so memory holds one batch of pixels at a time.
    """

    def __init__(self, examples: Sequence[Example], processor: MonkeyImageProcessor) -> None:
        self.examples = list(examples)
        self.processor = processor

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        import torch

        example = self.examples[index]
        return {
            "input_ids": torch.tensor(example.input_ids, dtype=torch.long),
            "labels": torch.tensor(example.labels, dtype=torch.long),
            "pixel_values": self.pixel_values(example),
        }

    def pixel_values(self, example: Example) -> torch.Tensor:
        import torch

        try:
            image = open_page(example.image, example.page, self.processor.input_size)
        except ItemProblem as problem:  # the file changed since it was checked
            raise DataError(f"{example.name}: {problem}") from None
        batch = self.processor([image])
        return torch.cat([batch.windows, batch.global_view[:, None]], dim=1)[0]

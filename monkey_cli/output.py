"""Results out: one `Record` per page and prompt, stream writers, per-document files, resume.

Streams (stdout carries results only):
  text   the answer alone; with several records each is preceded by a `==> source p.N <==` header
         (plus the question when the caller says there are several). Error records are skipped:
         reporting them on stderr is the caller's job.
  json   one document at close: `{"schema_version": 2, "tool": {...}, "records": [...]}`.
  jsonl  one JSON object per record, written and flushed as soon as the record arrives so pipelines
         stream. Every line carries `"schema_version"` as its first key (rather than a header line),
         so each line stands alone: `grep`, `head`, `jq -c` and concatenating files all keep it valid.
  md     for `read` and `spot`, the documents themselves as one Markdown document: each page's text (a
         PDF's text layer is Markdown already; the model's reading is escaped, its lines kept), each page
         marked by an HTML comment naming its source, page and where its text came from. For ask and
         caption, a report grouped by document and page. Written at close (records of different documents
         may arrive interleaved from a batched engine).
  hocr   the records' pages and text positions as hOCR, written at close (`monkey_cli.grounding.hocr`).
  pdf    no stream: with `--out`, one searchable PDF per document (`monkey_cli.grounding.pdf`).

Writers are context managers; `close()` (also on KeyboardInterrupt) writes what is finished, so Ctrl-C
still leaves a valid JSON document / Markdown report of the records done so far.

`--out DIR` (`monkey_cli.output_folder` does the writing): `plan_outputs()` gives each input one
distinct file that mirrors the input tree (`docs/a/x.pdf` -> `DIR/a/x.pdf.json`), `write_document()`
writes one document's records atomically and records the file in the folder's manifest.

Every text written (stdout and files) goes through `monkey_cli.printing`: no control character or escape
sequence from a document, a file name or an answer reaches a terminal raw; JSON escapes them.

Resume: `ResumeIndex` reads the manifest: each output's input sha256, a fingerprint of the settings that
change answers, the output's own sha256 and a status (done, failed for good with these settings, or
incomplete). A document is skipped when its output is done (or failed for good) for this exact input and
these settings and the file still holds exactly what was written.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import io
import json
import math
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, TextIO

from monkey_cli import __version__
from monkey_cli.documents.records import STDIN_NAME
from monkey_cli.errors import DocumentError, UsageError
from monkey_cli.output_folder import MANIFEST_NAME, WORK_PREFIX, OutputFolder
from monkey_cli.printing import json_text, terminal_line, terminal_text

# 2: records gained `confidence` (version 1 readers take it as null); `monkey extract` writes version 2 records.
SCHEMA_VERSION = 2

TASKS = ("ask", "caption", "read", "spot")
ANSWER_SOURCES = ("model", "text_layer")

FORMATS = ("text", "json", "jsonl", "md", "hocr", "pdf")
EXTENSIONS = {
    "text": ".txt", "json": ".json", "jsonl": ".jsonl", "md": ".md", "hocr": ".hocr", "pdf": ".pdf",
    "csv": ".csv",  # monkey extract
}  # fmt: skip
# hocr and pdf show text positions (records with spans: spot, read --positions, ask --ground; monkey_cli.grounding);
# pdf is bytes made from the document itself, one file per document: written by `write_document` with the source.

EMPTY_ANSWER = "(empty answer)"  # what text and Markdown show for an answer with no text

STDIN = "-"
STDIN_STEM = "stdin"

StrPath = str | os.PathLike[str]
Settings = Mapping[str, Any] | str  # the settings, or their settings_fingerprint()

# Settings that never change an answer. They are dropped from the fingerprint so that, say, a rerun with
# another batch size still resumes. A denylist on purpose: an unknown new setting is fingerprinted, which
# at worst redoes work, whereas an allowlist that forgot one would silently reuse wrong answers.
IGNORED_SETTINGS = frozenset(
    {
        "batch_size",
        "verbose",
        "quiet",
        "progress",
        "overwrite",
        "retry_failed",
        "format",
        "out",
        "out_dir",
        "workers",
        "num_workers",
    }
)

# --------------------------------------------------------------------------------------------- records

CONFIDENCE_DIGITS = 4  # in written records; the objects keep every digit


def answer_confidence(logprobs: Sequence[float], stop_logprob: float | None = None) -> float | None:
    """The model's confidence in an answer: exp of the mean log-probability of its tokens, <|endoftext|>
    included when the model ended the answer with it (the geometric mean of the token probabilities, so the
    length of an answer does not lower it). None for an answer without tokens."""
    values = [*logprobs, *([stop_logprob] if stop_logprob is not None else [])]
    if not values:
        return None
    return math.exp(sum(values) / len(values))



def one_line(message: object) -> str:
    """An error message on one line (whitespace runs collapsed); an exception without text gives its type."""
    text = " ".join(str(message).split())
    if not text and isinstance(message, BaseException):
        return type(message).__name__
    return text or "unknown error"


@dataclass(kw_only=True)
class Record:
    """The result of one prompt on one page. Errors are records too: `answer` None, `error` one line.

    `page` and `pages` are 1-based page number and page count; None for inputs without pages (images).
    `answer_source` says where the answer came from: the model, or a PDF's text layer (`read` on a page
    that already has text); `model` and `quant` are None when no model took part (the text layer).
    `seconds` is the model's time for the record: its batch's time shared equally by the batch's records
    (0 without a model). `confidence` is the model's own: `answer_confidence` of the answer's tokens (None for
    the text layer and for errors).
    """

    source: str
    page: int | None
    pages: int | None
    task: str
    prompt: str
    answer: str | None = None
    answer_source: str | None = None
    model: str | None
    quant: str | None
    seconds: float = 0.0
    error: str | None = None
    # Notes about the page that did not stop it (a PDF MuPDF had to repair, unreadable EXIF data). Added in
    # schema_version 1 as an optional key: readers of older files get an empty list.
    warnings: list[str] = dataclasses.field(default_factory=list)
    # Added in schema_version 2 (readers of version 1 files take it as None).
    confidence: float | None = None
    # Text positions (spot, read --positions, ask --ground: `monkey_cli.grounding`): each span's text, `bbox` in
    # page pixels, `points` in PDF points, `frame` (the model's 0..1000 coordinates), `kind` and `page`; and the
    # page's size they refer to (`{"pixels": [w, h], "points": [w, h]}`). Optional keys, absent otherwise.
    spans: list[dict[str, Any]] | None = None
    page_size: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"Record.task must be one of {TASKS}, got {self.task!r}")
        if self.answer_source is not None and self.answer_source not in ANSWER_SOURCES:
            raise ValueError(f"Record.answer_source must be one of {ANSWER_SOURCES} or None")
        if self.page is not None and self.page < 1:
            raise ValueError(f"Record.page is 1-based, got {self.page}")
        if (self.answer is None) == (self.error is None):
            raise ValueError("a Record has either an answer or an error, not both or neither")
        if self.error is not None:
            self.error = one_line(self.error)

    @classmethod
    def failure(cls, *, error: object, **fields: Any) -> Record:
        """An error record; `error` may be an exception or a message."""
        return cls(error=one_line(error), **fields)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def location(self) -> str:
        """`source p.N`, or just the source for inputs without pages."""
        return self.source if self.page is None else f"{self.source} p.{self.page}"

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-ready dict, keys in declaration order (a stable schema)."""
        data = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        data["seconds"] = round(float(self.seconds), 3)
        data["warnings"] = list(self.warnings)
        data["confidence"] = None if self.confidence is None else round(float(self.confidence), CONFIDENCE_DIGITS)
        for optional in ("spans", "page_size"):
            if data[optional] is None:
                del data[optional]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Record:
        """Read a record back from `to_dict()` output (a `schema_version` key is accepted and ignored)."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = set(data) - names - {"schema_version"}
        if unknown:
            raise ValueError(f"unknown record keys: {sorted(unknown)}")
        return cls(**{key: value for key, value in data.items() if key in names})


# --------------------------------------------------------------------------------------------- writers


class Writer:
    """Writes records to a text stream. `write()` per record, `close()` once (idempotent)."""

    def __init__(self, stream: TextIO, *, multi: bool = False, show_prompt: bool = False) -> None:
        self.stream = stream
        self.multi = multi
        self.show_prompt = show_prompt
        self.closed = False

    def write(self, record: Record) -> None:
        if self.closed:
            raise ValueError("write() on a closed writer")
        if not isinstance(record, Record):
            raise TypeError(f"expected a Record, got {type(record).__name__}")
        self._write(record)

    def close(self) -> None:
        """Write whatever is buffered and flush. The stream itself stays open (it may be stdout)."""
        if self.closed:
            return
        self.closed = True
        self._finish()
        self.stream.flush()

    def _write(self, record: Record) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        pass

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Also on KeyboardInterrupt: what is finished gets written.
        self.close()


class TextWriter(Writer):
    """Answers only, streamed. Headers (`==> source p.N <==`) only when there are several records."""

    def __init__(self, stream: TextIO, *, multi: bool = False, show_prompt: bool = False) -> None:
        super().__init__(stream, multi=multi, show_prompt=show_prompt)
        self._written = 0

    def _write(self, record: Record) -> None:
        if not record.ok:
            return  # errors belong on stderr; the caller reports them
        if self.multi:
            if self._written:
                self.stream.write("\n")
            label = record.location
            if self.show_prompt and record.task == "ask":
                label = f"{label}: {one_line(record.prompt)}"
            self.stream.write(f"==> {terminal_line(label)} <==\n")
        answer = record.answer if record.answer and record.answer.strip() else EMPTY_ANSWER
        self.stream.write(terminal_text(answer.rstrip("\n")) + "\n")
        self.stream.flush()
        self._written += 1


class JsonWriter(Writer):
    """One JSON document written at close: schema version, tool, and every record in arrival order."""

    def __init__(self, stream: TextIO, *, multi: bool = False, show_prompt: bool = False) -> None:
        super().__init__(stream, multi=multi, show_prompt=show_prompt)
        self._records: list[dict[str, Any]] = []

    def _write(self, record: Record) -> None:
        self._records.append(record.to_dict())

    def _finish(self) -> None:
        document = {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "monkey-cli", "version": __version__},
            "records": self._records,
        }
        self.stream.write(json_text(document, indent=2) + "\n")


class JsonlWriter(Writer):
    """One self-describing JSON object per line, flushed per record."""

    def _write(self, record: Record) -> None:
        line = json_text({"schema_version": SCHEMA_VERSION, **record.to_dict()})
        self.stream.write(line + "\n")
        self.stream.flush()


class HocrWriter(Writer):
    """The records' pages and text positions as one hOCR document, written at close (`grounding.hocr`)."""

    def __init__(self, stream: TextIO, *, multi: bool = False, show_prompt: bool = False) -> None:
        super().__init__(stream, multi=multi, show_prompt=show_prompt)
        self._records: list[Record] = []

    def _write(self, record: Record) -> None:
        self._records.append(record)

    def _finish(self) -> None:
        from monkey_cli.grounding.hocr import render_hocr

        self.stream.write(render_hocr(self._records))


class MarkdownWriter(Writer):
    """`read`: the documents as Markdown; ask and caption: a report (`## document`, `### Page N`, question
    and answer, errors marked). Written at close."""

    def __init__(self, stream: TextIO, *, multi: bool = False, show_prompt: bool = False) -> None:
        super().__init__(stream, multi=multi, show_prompt=show_prompt)
        self._records: list[Record] = []

    def _write(self, record: Record) -> None:
        self._records.append(record)

    def _finish(self) -> None:
        self.stream.write(terminal_text(render_markdown(self._records)))


_WRITERS: dict[str, type[Writer]] = {
    "text": TextWriter,
    "json": JsonWriter,
    "jsonl": JsonlWriter,
    "md": MarkdownWriter,
    "hocr": HocrWriter,
}


def make_writer(fmt: str, stream: TextIO, *, multi: bool = False, show_prompt: bool = False) -> Writer:
    """A writer for `fmt` (text, json, jsonl, md) on `stream`.

    multi: there may be several records (several documents, pages or prompts): text shows headers.
    show_prompt: there are several questions: text headers name the question too.
    """
    writer_class = _WRITERS.get(fmt)
    if fmt == "pdf":
        raise UsageError("--format pdf writes one PDF per document: give --out DIR")
    if writer_class is None:
        raise UsageError(f"--format {fmt!r}: unknown format (choose from {', '.join(FORMATS)})")
    return writer_class(stream, multi=multi, show_prompt=show_prompt)


def render(records: Sequence[Record], fmt: str) -> str:
    """All records of one document in `fmt`, as the content of its output file."""
    buffer = io.StringIO()
    prompts = {record.prompt for record in records}
    writer = make_writer(fmt, buffer, multi=len(records) > 1, show_prompt=len(prompts) > 1)
    with writer:
        for record in records:
            writer.write(record)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- markdown


def _code_span(text: str) -> str:
    """`text` as inline code, with a backtick run longer than any inside it."""
    ticks = "`" * (_longest_backtick_run(text) + 1)
    padding = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{padding}{text}{padding}{ticks}"


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def _group(records: Iterable[Record]) -> dict[str, dict[int | None, list[Record]]]:
    """source -> page -> records, each level in order of first appearance."""
    grouped: dict[str, dict[int | None, list[Record]]] = {}
    for record in records:
        grouped.setdefault(record.source, {}).setdefault(record.page, []).append(record)
    return grouped


def render_markdown(records: Sequence[Record]) -> str:
    """`read` and `spot` records as the documents' text in Markdown; any other task's as a report."""
    if records and all(record.task in ("read", "spot") for record in records):
        return render_markdown_document(records)
    grouped = _group(records)
    errors = sum(not record.ok for record in records)
    lines = ["# monkey-cli results", ""]
    summary = f"{len(grouped)} document(s), {len(records) - errors} answer(s)"
    lines += [summary + (f", {errors} error(s)" if errors else ""), ""]
    for source, pages in grouped.items():
        lines += _markdown_document(source, pages)
    return "\n".join(lines).rstrip("\n") + "\n"


def _markdown_document(source: str, pages: dict[int | None, list[Record]]) -> list[str]:
    records = [record for page_records in pages.values() for record in page_records]
    first = records[0]
    details = [f"{first.pages} page(s)"] if first.pages is not None else []
    by_model = next((record for record in records if record.model is not None), None)
    if by_model is not None:
        details.append(f"model {_code_span(terminal_line(by_model.model))} ({by_model.quant})")
    if any(record.answer_source == "text_layer" for record in records):
        details.append("text from the PDF's text layer" + (" on some pages" if by_model is not None else ""))
    lines = [f"## {_code_span(terminal_line(source))}", "", " · ".join(details), ""]
    for page, records in pages.items():
        if page is not None:
            lines += [f"### Page {page}", ""]
        for record in records:
            lines += _markdown_record(record)
    return lines


def _markdown_record(record: Record) -> list[str]:
    lines = []
    if record.task == "ask":
        lines += [f"**Q:** {terminal_line(record.prompt.strip())}", ""]
    if not record.ok:
        return lines + [f"> **Error:** {record.error}", ""]
    answer = (record.answer or "").strip("\n")
    label = {"ask": "**A:**", "caption": "**Caption:**", "read": "**Text:**", "spot": "**Text:**"}[record.task]
    if not answer.strip():
        lines.append(f"{label} _{EMPTY_ANSWER}_")
    else:
        lines.append(f"{label} {answer}")
    lines.append("")
    if record.answer_source == "text_layer":
        lines += ["_(from the PDF's text layer)_", ""]
    lines += [f"> **Warning:** {terminal_line(warning)}" for warning in record.warnings]
    return lines + ([""] if record.warnings else [])


def render_markdown_document(records: Sequence[Record]) -> str:
    """What `read -f md` writes: the pages' text one after the other, a Markdown document to keep or convert.

    Each page starts with an HTML comment (invisible once rendered) that names its source, page and where
    its text came from: `<!-- report.pdf p.2/3 · the PDF's text layer -->`. A text layer is Markdown already
    (headings, lists, tables); what the model read is plain text, so its Markdown characters are escaped and
    its lines kept as lines. An error is a visible quote; a page's warnings are comments.
    """
    blocks: list[str] = []
    for source, pages in _group(records).items():
        for page, page_records in pages.items():
            for record in page_records:
                blocks.append(_page_comment(source, page, record))
                if not record.ok:
                    blocks.append(f"> **Error:** {_escape_markdown(record.error or '')}")
                else:
                    blocks.append(_page_text(record))
                blocks += [_comment(f"warning: {warning}") for warning in record.warnings]
    return "\n\n".join(block for block in blocks if block) + "\n"


def _page_comment(source: str, page: int | None, record: Record) -> str:
    where = source if page is None else f"{source} p.{page}" + (f"/{record.pages}" if record.pages else "")
    if not record.ok:
        origin = "not read"
    elif record.answer_source == "text_layer":
        origin = "the PDF's text layer"
    else:
        origin = f"read by {record.model}" + (f" ({record.quant})" if record.quant else "")
    return _comment(f"{terminal_line(where)} · {origin}")


def _comment(text: str) -> str:
    """An HTML comment holding `text` on one line; nothing in it can end the comment early."""
    text = " ".join(terminal_line(text).split()).replace("-->", "-- >").replace("--!>", "--! >")
    return f"<!-- {text} -->"


def _page_text(record: Record) -> str:
    answer = (record.answer or "").strip("\n")
    if not answer.strip():
        return f"_{EMPTY_ANSWER}_"
    if record.answer_source == "text_layer":
        return answer
    paragraphs = re.split(r"\n\s*\n", answer)
    # Lines of one paragraph stay lines: a backslash at the end of a line is Markdown's hard line break.
    return "\n\n".join(
        "\\\n".join(_escape_markdown(line) for line in paragraph.splitlines() if line.strip())
        for paragraph in paragraphs
        if paragraph.strip()
    )


_MARKDOWN_INLINE = re.compile(r"([\\`*_\[\]<>|~&])")
_MARKDOWN_LINE_START = re.compile(r"^(\s*)([#>+=-]|\d+[.)])")


def _escape_markdown(line: str) -> str:
    """Plain text that reads as itself in Markdown: ASCII punctuation Markdown acts on is backslash-escaped
    (always allowed in CommonMark), and nothing at a line's start can open a heading, quote, list or code."""
    text = _MARKDOWN_INLINE.sub(r"\\\1", line.strip())
    match = _MARKDOWN_LINE_START.match(text)
    if match:
        marker = match.group(2)
        escaped = marker[:-1] + "\\" + marker[-1]
        text = match.group(1) + escaped + text[match.end() :]
    return text


# ------------------------------------------------------------------------------------- output files


def extension_for(fmt: str) -> str:
    try:
        return EXTENSIONS[fmt]
    except KeyError:
        raise UsageError(f"--format {fmt!r}: unknown format (choose from {', '.join(FORMATS)})") from None


def common_root(sources: Iterable[StrPath]) -> Path:
    """The deepest folder holding every file source (stdin excluded); the current folder if there is none."""
    parents = [os.path.dirname(os.path.abspath(source)) for source in sources if str(source) != STDIN]
    if not parents:
        return Path.cwd()
    try:
        return Path(os.path.commonpath(parents))
    except ValueError:  # different drives on Windows: nothing in common
        return Path.cwd()


def output_path(
    out_dir: StrPath,
    source: StrPath,
    fmt: str,
    inputs_root: StrPath | None = None,
) -> Path:
    """Where `source`'s results go under `out_dir` when nothing else claims that name (see `plan_outputs`).

    Its path relative to `inputs_root` (default: the current folder) with the format's extension appended,
    not substituted, so `x.pdf` and `x.png` side by side do not collide (`x.pdf.json`, `x.png.json`). Stdin
    becomes `stdin.EXT`; a source outside `inputs_root` is flattened to `NAME.HASH8.EXT` at the top, the hash
    of its absolute path keeping same-named files apart.
    """
    return Path(out_dir) / _natural_output(source, fmt, inputs_root)


def _natural_output(source: StrPath, fmt: str, inputs_root: StrPath | None) -> PurePosixPath:
    extension = extension_for(fmt)
    if str(source) == STDIN:
        return PurePosixPath(STDIN_STEM + extension)
    # abspath normalises `..` lexically; symlinks on the input side do not matter for the output's name.
    absolute = PurePath(os.path.abspath(source))
    root = PurePath(os.path.abspath(inputs_root if inputs_root is not None else os.getcwd()))
    try:
        relative = absolute.relative_to(root)
    except ValueError:
        relative = None
    if relative is None or not relative.parts:
        return PurePosixPath(f"{absolute.name or 'input'}.{_digest(str(absolute))}{extension}")
    return PurePosixPath(*relative.parts[:-1], relative.name + extension)


def plan_outputs(
    sources: Mapping[str, StrPath | None],
    fmt: str,
    inputs_root: StrPath | None = None,
    *,
    blocked: Callable[[PurePosixPath], bool] | None = None,
) -> dict[str, PurePosixPath]:
    """One distinct output file (relative to the output folder) per source: name -> path (None: a stream).

    Names are those of `output_path` (a stream other than stdin, such as `/dev/fd/63`, is flattened like a
    file outside the root). Outputs that would share a file (`-` and a file named `stdin`, two names that
    differ only in case, a file and a folder that mirror to the same name, the manifest's own name) all get
    `NAME.HASH8.EXT` instead, the hash of their source name keeping them apart: the same inputs always get
    the same names, and no two ever share one. So does an output whose place `blocked` says is taken by
    something that cannot be replaced (a folder where the file goes, a file where a folder must be).
    """
    planned = {
        name: _natural_output(STDIN if path is None and name == STDIN_NAME else (path or name), fmt, inputs_root)
        for name, path in sources.items()
    }
    for name, path in sources.items():
        if path is None and name != STDIN_NAME:  # /dev/fd/63 and the like: never mirrored under their folder
            planned[name] = PurePosixPath(f"{PurePath(name).name or 'stream'}.{_digest(name)}{extension_for(fmt)}")
    return distinct_paths(planned, blocked=blocked)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def distinct_paths(
    planned: Mapping[str, PurePosixPath], *, blocked: Callable[[PurePosixPath], bool] | None = None
) -> dict[str, PurePosixPath]:
    """`planned` (key -> relative path) with every clash renamed: paths equal up to case and Unicode
    normalisation, a path that another one needs as a folder, the output folder's reserved names, and
    paths `blocked` rejects each get their key's hash inserted before the extension, until none is left."""
    result = dict(planned)
    for _ in range(len(result) + 2):
        folded = {key: _folded(path) for key, path in result.items()}
        holders: dict[tuple[str, ...], list[str]] = {}
        for key, parts in folded.items():
            holders.setdefault(parts, []).append(key)
        folders = {parts[:depth] for parts in folded.values() for depth in range(1, len(parts))}
        clashing = {
            key
            for key, parts in folded.items()
            if len(holders[parts]) > 1
            or parts in folders
            or _reserved(result[key])
            or (blocked is not None and blocked(result[key]))
        }
        if not clashing:
            return result
        for key in clashing:
            result[key] = _with_digest(result[key], key)
    raise RuntimeError("output names could not be made distinct")  # pragma: no cover - hashes differ


def _folded(path: PurePosixPath) -> tuple[str, ...]:
    return tuple(unicodedata.normalize("NFC", part).casefold() for part in path.parts)


def _reserved(path: PurePosixPath) -> bool:
    first = path.parts[0]
    return first.casefold() == MANIFEST_NAME or first.casefold().startswith(WORK_PREFIX)


def _with_digest(path: PurePosixPath, key: str) -> PurePosixPath:
    stem, dot, extension = path.name.rpartition(".")
    digest = _digest(key + "|" + str(path))
    name = f"{stem}.{digest}.{extension}" if dot and stem else f"{path.name}.{digest}"
    return path.with_name(name)


def write_document(folder: OutputFolder, relative: str | PurePosixPath, records: Sequence[Record], fmt: str,
                   entry: Mapping[str, Any] | None = None, *, source: Any = None, password: str | None = None) -> Path:
    """Render one document's records in `fmt` and write them into the output folder atomically.

    Rendering happens before anything is touched, so a failure anywhere leaves the old file as it was. The pdf
    format is made from the document itself: give its `source` (and `password`).
    """
    if fmt == "pdf":
        from monkey_cli.grounding.pdf import searchable_pdf

        data = searchable_pdf(records, source, password)
    else:
        data = render(records, fmt).encode("utf-8", "backslashreplace")
    return folder.write(relative, data, {**(entry or {}), **output_fingerprint(data)})


def output_fingerprint(data: bytes) -> dict[str, Any]:
    """What the manifest keeps about an output's bytes, to tell later that the file is still whole."""
    return {"output_sha256": hashlib.sha256(data).hexdigest(), "output_bytes": len(data)}


# ------------------------------------------------------------------------------------------- resume


def file_sha256(path: StrPath, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (documents can be large)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(chunk_size):
                digest.update(chunk)
    except OSError as exc:
        raise DocumentError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return digest.hexdigest()


def settings_fingerprint(settings: Settings) -> str:
    """sha256 of the canonical JSON of the settings that change answers.

    Keys in IGNORED_SETTINGS and keys whose value is None are left out (so adding a new option that
    defaults to None does not invalidate earlier runs). Key order, tuples vs lists, Paths vs strings
    do not matter. A string is taken as an already computed fingerprint.
    """
    if isinstance(settings, str):
        return settings
    relevant = {str(key): value for key, value in settings.items() if value is not None}
    relevant = {key: value for key, value in relevant.items() if key not in IGNORED_SETTINGS}
    canonical = json.dumps(_canonical(relevant), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _canonical(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_canonical(item) for item in value), key=repr)
    if isinstance(value, enum.Enum):
        return _canonical(value.value)
    if isinstance(value, PurePath):
        return value.as_posix()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"setting value of type {type(value).__name__} cannot be fingerprinted")


DONE, FAILED, INCOMPLETE = "done", "failed", "incomplete"
_MAX_RECORDED_ERRORS = 20


class ResumeIndex:
    """What earlier runs finished in an output folder, from its manifest (`monkey_cli.output_folder`).

    Each output's entry keeps the input's sha256, a fingerprint of the settings that change answers, the
    output's own sha256, and a status: `done`; `failed` (every error is one the same input always gives with
    these settings, such as `--pages 2` on a one-page image: not redone unless asked, and reported again);
    or `incomplete` (an error of the moment: redone next time). An output counts only while its file is
    there, a regular file, with exactly the bytes that were written (a truncated or emptied file is redone).
    """

    def __init__(self, folder: OutputFolder) -> None:
        self.folder = folder

    def is_done(self, output: str | PurePosixPath, input_sha256: str, settings: Settings) -> bool:
        """True when `output` was made from this exact input with these settings, completely, and is intact."""
        return self._status(output, input_sha256, settings) == DONE

    def recorded_errors(self, output: str | PurePosixPath, input_sha256: str, settings: Settings) -> list[str] | None:
        """The errors an earlier run recorded as permanent for this input and these settings, else None."""
        if self._status(output, input_sha256, settings) != FAILED:
            return None
        errors = self.folder.entry(output).get("errors")  # type: ignore[union-attr]
        return [str(error) for error in errors] if isinstance(errors, list) and errors else ["failed"]

    def _status(self, output: str | PurePosixPath, input_sha256: str, settings: Settings) -> str | None:
        entry = self.folder.entry(output)
        if (
            entry is None
            or entry.get("input_sha256") != input_sha256
            or entry.get("settings_sha256") != settings_fingerprint(settings)
        ):
            return None
        data = self.folder.read(output)
        if not data:
            return None  # missing, emptied, or not a regular file any more
        expected = entry.get("output_sha256")
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            return None
        status = entry.get("status", DONE)  # manifests written before statuses existed only held done outputs
        return status if status in (DONE, FAILED) else None

    @staticmethod
    def entry(
        input_sha256: str, settings: Settings, records: Sequence[Record], *, permanent: bool
    ) -> dict[str, Any]:
        """The manifest entry for a document about to be written (the output's fingerprint is added then)."""
        errors = [record.error for record in records if record.error is not None]
        status = DONE if not errors else FAILED if permanent else INCOMPLETE
        entry: dict[str, Any] = {
            "status": status,
            "input_sha256": input_sha256,
            "settings_sha256": settings_fingerprint(settings),
        }
        if errors:
            entry["errors"] = errors[:_MAX_RECORDED_ERRORS]
        return entry

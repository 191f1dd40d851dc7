"""Results out: one `Record` per page and prompt, stream writers, per-document files, resume.

Streams (stdout carries results only):
  text   the answer alone; with several records each is preceded by a `==> source p.N <==` header
         (plus the question when the caller says there are several). Error records are skipped:
         reporting them on stderr is the caller's job.
  json   one document at close: `{"schema_version": 1, "tool": {...}, "records": [...]}`.
  jsonl  one JSON object per record, written and flushed as soon as the record arrives so pipelines
         stream. Every line carries `"schema_version"` as its first key (rather than a header line),
         so each line stands alone: `grep`, `head`, `jq -c` and concatenating files all keep it valid.
  md     a readable report, grouped by document and page, written at close (records of different
         documents may arrive interleaved from a batched engine).

Writers are context managers; `close()` (also on KeyboardInterrupt) writes what is finished, so Ctrl-C
still leaves a valid JSON document / Markdown report of the records done so far.

`--out DIR`: `output_path()` mirrors the input tree under DIR (`docs/a/x.pdf` -> `DIR/a/x.pdf.json`)
and refuses any path that would land outside DIR. `write_document()` writes one document's records
atomically: temp file `.NAME.tmp-XXXX` in the same folder, flush + fsync, `os.replace`; on any
exception the temp file is removed and the previous file, if any, is untouched. A process killed
outright can leave a temp file behind; it never looks like an output and `cleanup_stale_temps()`
removes it on the next run.

Resume: `ResumeIndex` keeps `DIR/.monkey-manifest.json` (written atomically too), mapping each output
file to the input's sha256 and a fingerprint of the settings that change answers. An output is done
only when both match and the file exists. Use `ResumeIndex.update()` after writing a document: it marks
the document done only when none of its records is an error, so a rerun retries failures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import io
import json
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, TextIO

from monkey_cli import __version__
from monkey_cli.errors import DocumentError, UsageError

SCHEMA_VERSION = 1

TASKS = ("ask", "caption", "read")
ANSWER_SOURCES = ("model", "text_layer")

FORMATS = ("text", "json", "jsonl", "md")
EXTENSIONS = {"text": ".txt", "json": ".json", "jsonl": ".jsonl", "md": ".md"}

EMPTY_ANSWER = "(empty answer)"  # what text and Markdown show for an answer with no text

STDIN = "-"
STDIN_STEM = "stdin"

MANIFEST_NAME = ".monkey-manifest.json"

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
        "format",
        "out",
        "out_dir",
        "workers",
        "num_workers",
    }
)

_TEMP_MARKER = ".tmp-"
_TEMP_NAME = re.compile(r"^\..+\.tmp-[A-Za-z0-9_]+$")


# --------------------------------------------------------------------------------------------- records


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
    (0 without a model).
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
            self.stream.write(f"==> {label} <==\n")
        answer = record.answer if record.answer and record.answer.strip() else EMPTY_ANSWER
        self.stream.write(answer.rstrip("\n") + "\n")
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
        json.dump(document, self.stream, ensure_ascii=False, indent=2)
        self.stream.write("\n")


class JsonlWriter(Writer):
    """One self-describing JSON object per line, flushed per record."""

    def _write(self, record: Record) -> None:
        line = json.dumps({"schema_version": SCHEMA_VERSION, **record.to_dict()}, ensure_ascii=False)
        self.stream.write(line + "\n")
        self.stream.flush()


class MarkdownWriter(Writer):
    """A report: `## document`, `### Page N`, question and answer, errors marked. Written at close."""

    def __init__(self, stream: TextIO, *, multi: bool = False, show_prompt: bool = False) -> None:
        super().__init__(stream, multi=multi, show_prompt=show_prompt)
        self._records: list[Record] = []

    def _write(self, record: Record) -> None:
        self._records.append(record)

    def _finish(self) -> None:
        self.stream.write(render_markdown(self._records))


_WRITERS: dict[str, type[Writer]] = {
    "text": TextWriter,
    "json": JsonWriter,
    "jsonl": JsonlWriter,
    "md": MarkdownWriter,
}


def make_writer(fmt: str, stream: TextIO, *, multi: bool = False, show_prompt: bool = False) -> Writer:
    """A writer for `fmt` (text, json, jsonl, md) on `stream`.

    multi: there may be several records (several documents, pages or prompts): text shows headers.
    show_prompt: there are several questions: text headers name the question too.
    """
    writer_class = _WRITERS.get(fmt)
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


def _fenced(text: str, info: str = "text") -> str:
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return f"{fence}{info}\n{text.rstrip(chr(10))}\n{fence}"


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def _group(records: Iterable[Record]) -> dict[str, dict[int | None, list[Record]]]:
    """source -> page -> records, each level in order of first appearance."""
    grouped: dict[str, dict[int | None, list[Record]]] = {}
    for record in records:
        grouped.setdefault(record.source, {}).setdefault(record.page, []).append(record)
    return grouped


def render_markdown(records: Sequence[Record]) -> str:
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
        details.append(f"model {_code_span(by_model.model)} ({by_model.quant})")
    if any(record.answer_source == "text_layer" for record in records):
        details.append("text from the PDF's text layer" + (" on some pages" if by_model is not None else ""))
    lines = [f"## {_code_span(source)}", "", " · ".join(details), ""]
    for page, records in pages.items():
        if page is not None:
            lines += [f"### Page {page}", ""]
        for record in records:
            lines += _markdown_record(record)
    return lines


def _markdown_record(record: Record) -> list[str]:
    lines = []
    if record.task == "ask":
        lines += [f"**Q:** {record.prompt.strip()}", ""]
    if not record.ok:
        return lines + [f"> **Error:** {record.error}", ""]
    answer = (record.answer or "").strip("\n")
    label = {"ask": "**A:**", "caption": "**Caption:**", "read": "**Text:**"}[record.task]
    if not answer.strip():
        lines.append(f"{label} _{EMPTY_ANSWER}_")
    elif record.task == "read":
        # OCR text keeps its line layout, and its characters are not Markdown syntax.
        lines += [label, "", _fenced(answer)]
    else:
        lines.append(f"{label} {answer}")
    lines.append("")
    if record.answer_source == "text_layer":
        lines += ["_(from the PDF's text layer)_", ""]
    return lines


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
    """Where `source`'s results go under `out_dir`: its path relative to `inputs_root`, extension appended.

    The format's extension is appended, not substituted, so `x.pdf` and `x.png` side by side do not
    collide (`x.pdf.json`, `x.png.json`). Stdin becomes `stdin.EXT`; a source outside `inputs_root`
    (default: the current folder) is flattened to `NAME.HASH8.EXT` at the top of `out_dir`, the hash of
    its absolute path keeping same-named files apart. Raises UsageError if the result would resolve
    outside `out_dir` (a symlinked folder or file inside it pointing elsewhere).
    """
    extension = extension_for(fmt)
    if str(source) == STDIN:
        relative = PurePath(STDIN_STEM + extension)
    else:
        relative = _mirrored(source, inputs_root, extension)
    target = Path(out_dir) / relative
    ensure_inside(out_dir, target)
    return target


def _mirrored(source: StrPath, inputs_root: StrPath | None, ext: str) -> PurePath:
    # abspath normalises `..` lexically; symlinks on the input side do not matter for the output's name.
    absolute = PurePath(os.path.abspath(source))
    root = PurePath(os.path.abspath(inputs_root if inputs_root is not None else os.getcwd()))
    try:
        relative = absolute.relative_to(root)
    except ValueError:
        relative = None
    if relative is None or not relative.parts:
        digest = hashlib.sha256(str(absolute).encode("utf-8", "surrogateescape")).hexdigest()[:8]
        return PurePath(f"{absolute.name or 'input'}.{digest}{ext}")
    return relative.with_name(relative.name + ext)


def ensure_inside(out_dir: StrPath, path: StrPath) -> Path:
    """`path` with its folders' symlinks resolved, if that stays inside `out_dir`; UsageError otherwise."""
    root = Path(out_dir).resolve()
    candidate = Path(path)
    resolved = candidate.parent.resolve() / candidate.name
    escapes = candidate.name in ("", ".", "..") or not resolved.is_relative_to(root) or resolved == root
    if escapes or candidate.is_symlink():
        raise UsageError(f"--out {out_dir}: refusing to write {path}: it resolves outside the output folder")
    return resolved


def atomic_write_text(path: StrPath, text: str) -> None:
    """Replace `path` with `text` (UTF-8) all at once: readers see the old file or the new one, never half."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    temp, fd = _create_temp(target)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:  # KeyboardInterrupt included: never leave the temp file behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_folder(target.parent)


def _create_temp(target: Path) -> tuple[Path, int]:
    # os.open with mode 0o666 lets the umask decide the permissions, as for any new file
    # (tempfile.mkstemp would make every output 0600).
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temp = target.parent / f".{target.name}{_TEMP_MARKER}{secrets.token_hex(4)}"
        try:
            return temp, os.open(temp, flags, 0o666)
        except FileExistsError:
            continue


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_document(path: StrPath, records: Sequence[Record], fmt: str) -> None:
    """Render one document's records in `fmt` and write them to `path` atomically.

    Rendering happens before the file is touched, so a failure anywhere leaves the old file as it was.
    """
    atomic_write_text(path, render(records, fmt))


def cleanup_stale_temps(out_dir: StrPath, *, min_age_s: float = 60.0) -> list[Path]:
    """Remove temp files (`.NAME.tmp-XXXX`) left under `out_dir` by a killed run; returns those removed.

    Only files untouched for `min_age_s` seconds go, so a second run writing to the same folder right now
    keeps its temp files. Symlinks are neither followed nor removed.
    """
    removed: list[Path] = []
    now = time.time()
    for folder, _dirs, names in os.walk(out_dir, followlinks=False):
        for name in names:
            if not _TEMP_NAME.match(name):
                continue
            candidate = Path(folder) / name
            with contextlib.suppress(FileNotFoundError):
                info = candidate.lstat()
                if not candidate.is_symlink() and now - info.st_mtime >= min_age_s:
                    candidate.unlink()
                    removed.append(candidate)
    return removed


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
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


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


class ResumeIndex:
    """What an earlier run under `out_dir` already finished: `DIR/.monkey-manifest.json`.

    Entries are keyed by the output file's path relative to `out_dir`. The manifest is re-read and merged
    before each save, so two runs sharing a folder lose at most work (an entry), never a valid file.
    An unreadable manifest counts as empty (everything is redone) and `warning` says why.
    """

    def __init__(self, out_dir: StrPath) -> None:
        self.out_dir = Path(out_dir)
        self.manifest_path = self.out_dir / MANIFEST_NAME
        self.warning: str | None = None
        self._entries = self._load()

    def is_done(self, output: StrPath, input_sha256: str, settings: Settings) -> bool:
        """True when `output` exists and was made from this exact input with these settings."""
        key, resolved = self._key(output)
        entry = self._entries.get(key)
        return (
            entry is not None
            and entry.get("input_sha256") == input_sha256
            and entry.get("settings_sha256") == settings_fingerprint(settings)
            and resolved.is_file()
        )

    def mark_done(self, output: StrPath, input_sha256: str, settings: Settings) -> None:
        key, _ = self._key(output)
        entry = {"input_sha256": input_sha256, "settings_sha256": settings_fingerprint(settings)}
        self._save(lambda entries: entries.__setitem__(key, entry))

    def forget(self, output: StrPath) -> None:
        key, _ = self._key(output)
        if key in self._entries:
            self._save(lambda entries: entries.pop(key, None))

    def update(
        self,
        output: StrPath,
        input_sha256: str,
        settings: Settings,
        records: Iterable[Record],
    ) -> bool:
        """After writing `output`: mark it done if every record succeeded, else forget it. Returns done."""
        if all(record.ok for record in records):
            self.mark_done(output, input_sha256, settings)
            return True
        self.forget(output)
        return False

    def _key(self, output: StrPath) -> tuple[str, Path]:
        resolved = ensure_inside(self.out_dir, output)
        return resolved.relative_to(self.out_dir.resolve()).as_posix(), resolved

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            text = self.manifest_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            return self._unreadable(f"cannot read it ({exc})")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            return self._unreadable(f"invalid JSON at line {exc.lineno}")
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            return self._unreadable(f"not a schema_version {SCHEMA_VERSION} manifest")
        entries = data.get("entries")
        if not isinstance(entries, dict) or not all(isinstance(entry, dict) for entry in entries.values()):
            return self._unreadable("'entries' is not a mapping of output files")
        return entries

    def _unreadable(self, cause: str) -> dict[str, dict[str, str]]:
        self.warning = f"{self.manifest_path}: {cause}; ignoring it, so everything will be redone"
        return {}

    def _save(self, change: Any) -> None:
        # The file on disk is the truth: another run may have finished documents since we loaded it.
        entries = self._load()
        change(entries)
        self._entries = entries
        document = {"schema_version": SCHEMA_VERSION, "entries": dict(sorted(entries.items()))}
        atomic_write_text(self.manifest_path, json.dumps(document, indent=1) + "\n")

"""Inputs: files, folders, globs and `-` turned into sources, without reading anything that is not a document.

The rules (docs/inputs.md):
* Only regular files are read from disk. In a folder or a glob match, FIFOs, sockets and devices are skipped
  with a note (a `MonkeyWarning`); named explicitly they are refused (an error for that input), except
  standard input (`-`, `/dev/stdin`) and process substitution (`<(curl ...)`, which the shell passes as
  `/dev/fd/N`): those are read once, into memory, up to the stream limit. Nothing waits on a FIFO without
  a writer, and no device is ever opened.
* Folder walks and globs never follow a symbolic link to a folder (a note says it was skipped) and never
  enter a folder twice, so a link loop (`a -> .`) or a bind mount cannot make them run forever. Symbolic
  links to files are followed; a broken link or a link loop is an error for that entry.
* `exclude` (the output folder's files, see `monkey_cli.output_folder`) leaves paths out: silently inside
  folders and globs, with an error when named explicitly.
* Standard input is limited to `max_stream_bytes` (default 1 GiB, or the `MONKEY_MAX_STDIN_BYTES`
  environment variable, e.g. `512M`); a list of paths on it to `MAX_STDIN_PATHS` entries.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import shlex
import stat
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

from monkey_cli.documents.records import STDIN_NAME, Source
from monkey_cli.documents.types import HEAD_BYTES, describe_unsupported, sniff_type
from monkey_cli.errors import DocumentError, MonkeyWarning, UsageError

DEFAULT_MAX_STREAM_BYTES = 1 << 30
MAX_STREAM_BYTES_ENV = "MONKEY_MAX_STDIN_BYTES"
MAX_STDIN_PATHS = 1_000_000

# A reason to leave a path out of the inputs (it is one of monkey's own outputs), or None to keep it.
Exclude = Callable[[Path], "str | None"]

_CHUNK = 1 << 20
_GLOB_MAGIC = re.compile(r"[*?[]")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # http://, https://, s3://, file://: never fetched
# Bytes no list of file names contains (tab, newline and carriage return excepted): binary data, not paths.
_CONTROL_BYTES = re.compile(rb"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f]")
_NUL_SEPARATED = re.compile(rb"[^\x00]+")
_LINES = re.compile("[^\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]+")  # what str.splitlines() splits on
# What a shell passes for standard input and process substitution: a descriptor this process holds.
_STREAM_PATH = re.compile(r"/dev/(?:fd/(?P<fd>\d+)|(?P<stdin>stdin))|/proc/(?:self|(?P<pid>\d+))/fd/(?P<pfd>\d+)")
_SIZE = re.compile(r"\s*(\d+)\s*(?:([kmgt])(?:i?b)?|b)?\s*", re.IGNORECASE)


class _TooLarge(Exception):
    pass


# ------------------------------------------------------------------------------------------- limits


def parse_byte_size(text: str) -> int:
    """Bytes in "1073741824", "512M", "1G" or "1GiB" (K, M, G, T are powers of 1024); ValueError otherwise."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a size: {text!r}")
    number, unit = int(match.group(1)), (match.group(2) or "").lower()
    size = number * 1024 ** ("kmgt".index(unit) + 1 if unit else 0)
    if size < 1:
        raise ValueError(f"not a positive size: {text!r}")
    return size


def stream_limit(explicit: int | None = None) -> int:
    """The most bytes read from standard input or a stream: `explicit`, else the environment, else 1 GiB."""
    if explicit is not None:
        if explicit < 1:
            raise UsageError(f"max_stream_bytes must be positive, got {explicit}")
        return explicit
    text = os.environ.get(MAX_STREAM_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_STREAM_BYTES
    try:
        return parse_byte_size(text)
    except ValueError:
        raise UsageError(f"{MAX_STREAM_BYTES_ENV}={text!r}: expected a size such as 1073741824, 512M or 1G") from None


def describe_size(size: int) -> str:
    for unit, power in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << power and size % (1 << power) == 0:
            return f"{size >> power} {unit}"
    return f"{size:,} bytes"


def _read_limited(stream: bytes | IO[bytes] | IO[str], limit: int) -> bytes:
    """All of `stream`, in chunks; _TooLarge as soon as it holds more than `limit` bytes."""
    if isinstance(stream, (bytes, bytearray, memoryview)):
        if len(stream) > limit:
            raise _TooLarge
        return bytes(stream)
    buffer = io.BytesIO()
    total = 0
    while True:
        chunk: Any = stream.read(min(_CHUNK, limit + 1 - total))
        if not chunk:
            return buffer.getvalue()
        if isinstance(chunk, str):  # a text stream (tests, embedding)
            chunk = os.fsencode(chunk)
        buffer.write(chunk)
        total += len(chunk)
        if total > limit:
            raise _TooLarge


# ------------------------------------------------------------------------------------ regular files


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """`path` opened for reading, if it is a regular file (symbolic links followed); DocumentError otherwise.

    Checked before opening (a device is never opened: opening some has side effects) and again on the open
    descriptor (the path may have been swapped meanwhile); O_NONBLOCK keeps a swapped-in FIFO from blocking.
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise DocumentError(f"{_special_kind(mode)}, not a regular file")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise DocumentError(f"{_special_kind(mode)}, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def source_sha256(source: Source) -> str:
    """sha256 of a source's bytes (streams in memory, files read in chunks); DocumentError/OSError if unreadable."""
    if source.data is not None:
        return hashlib.sha256(source.data).hexdigest()
    if source.path is None:
        raise DocumentError("nothing to read")
    digest = hashlib.sha256()
    with open_regular(source.path) as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ expanding


def expand_inputs(
    inputs: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
    stdin: bytes | IO[bytes] | IO[str] | None = None,
    *,
    exclude: Exclude | None = None,
    max_stream_bytes: int | None = None,
    pipe_hint: str = "monkey read -",
) -> list[Source]:
    """Resolve files, folders, globs and `-` into sources, in order, each file once.

    Folders are walked recursively in natural order ("page2" before "page10"), skipping hidden files and
    folders; a path that exists is taken literally, otherwise one with *, ? or [ is a glob. `-` reads
    `stdin` (default: the process's standard input): bytes that start like a supported document are that
    document, named `<stdin>`; otherwise they are paths, one per line (or NUL-separated, as `find -print0`
    writes them). Inputs that resolve to nothing become sources with `error` set, not exceptions; skipped
    entries (special files, links to folders) are reported as `MonkeyWarning`s. A URL is never fetched: its
    error says how to pipe it in (`curl -sL URL | ` + `pipe_hint`, the command that reads standard input).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    texts = [os.fspath(raw) for raw in inputs]
    if texts.count("-") > 1:
        raise UsageError("'-' (standard input) can be given only once")
    expander = _Expander(exclude, stream_limit(max_stream_bytes), pipe_hint)
    sources: list[Source] = []
    for text in texts:
        sources.extend(expander.stdin(stdin) if text == "-" else expander.explicit(text))
    return _without_duplicates(sources)


def _note(message: str) -> None:
    warnings.warn(message, MonkeyWarning, stacklevel=4)


class _Expander:
    def __init__(self, exclude: Exclude | None, limit: int, pipe_hint: str = "monkey read -") -> None:
        self.exclude = exclude
        self.limit = limit
        self.pipe_hint = pipe_hint

    # --- standard input and streams ---------------------------------------------------------------------

    def stdin(self, stdin: bytes | IO[bytes] | IO[str] | None) -> list[Source]:
        if stdin is None:
            if sys.stdin is None:
                return [Source(STDIN_NAME, error="there is no standard input")]
            if _isatty(sys.stdin):
                message = "standard input is a terminal: pipe a document or paths in (ls *.pdf | monkey read -)"
                return [Source(STDIN_NAME, error=message)]
            stdin = sys.stdin.buffer
        try:
            data = _read_limited(stdin, self.limit)
        except _TooLarge:
            return [Source(STDIN_NAME, error=f"standard input is larger than {self._limit_text()}")]
        except OSError as exc:
            return [Source(STDIN_NAME, error=f"cannot read standard input: {exc.strerror or exc}")]
        return self._stdin_contents(data)

    def _limit_text(self) -> str:
        return f"the limit of {describe_size(self.limit)} ({MAX_STREAM_BYTES_ENV}; files on disk have no limit)"

    def _stdin_contents(self, data: bytes) -> list[Source]:
        if sniff_type(data[:HEAD_BYTES]) is not None:
            return [Source(STDIN_NAME, data=data)]
        names = self._stdin_names(data)
        if isinstance(names, str):
            return [Source(STDIN_NAME, error=names)]
        if not names:
            return [Source(STDIN_NAME, error="standard input is empty (expected paths or a document)")]
        return [source for name in names for source in self.explicit(name)]

    def _stdin_names(self, data: bytes) -> list[str] | str:
        """The paths listed on standard input, or why it holds none (binary data, too many)."""
        unrecognised = f"standard input is neither a document nor paths ({describe_unsupported(data[:HEAD_BYTES])})"
        if _CONTROL_BYTES.search(data):
            return unrecognised
        found: Iterator[str]
        if b"\x00" in data:  # as `find -print0` writes them: any name, newlines and surrounding spaces included
            found = (os.fsdecode(match.group()) for match in _NUL_SEPARATED.finditer(data))
        else:
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError:
                return unrecognised
            found = (line for match in _LINES.finditer(text) if (line := match.group().strip()))
        names: list[str] = []
        for name in found:  # counted as they come: a flood of names must not build a flood of objects
            if len(names) == MAX_STDIN_PATHS:
                return f"standard input lists more than {MAX_STDIN_PATHS:,} paths; split them into several runs"
            names.append(name)
        return names

    def _stream(self, raw: str, descriptor: int) -> Source:
        """A stream the shell handed over as /dev/fd/N (or /dev/stdin): read once, from the open descriptor."""
        if os.isatty(descriptor):
            return Source(raw, error="is a terminal, not a document")
        try:
            with os.fdopen(os.dup(descriptor), "rb") as stream:
                data = _read_limited(stream, self.limit)
        except _TooLarge:
            return Source(raw, error=f"stream is larger than {self._limit_text()}")
        except OSError as exc:
            return Source(raw, error=f"cannot read: {exc.strerror or exc}")
        return Source(raw, data=data)

    # --- paths the user named -----------------------------------------------------------------------------

    def explicit(self, raw: str) -> list[Source]:
        path = Path(raw)
        if not os.path.lexists(raw) and raw.startswith("~"):
            path = Path(os.path.expanduser(raw))
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            if exc.errno == errno.ENOENT and not os.path.lexists(path) and _URL.match(raw):
                message = f"is a URL, and only local files are read: pipe it in (curl -sL {shlex.quote(raw)} | "
                return [Source(raw, error=message + f"{self.pipe_hint})")]
            if exc.errno == errno.ENOENT and not os.path.lexists(path) and _GLOB_MAGIC.search(raw):
                return self._glob(raw)
            return [Source(raw, path=path, error=_stat_problem(exc, path))]
        if stat.S_ISDIR(mode):
            return self._walk(path, raw)
        if stat.S_ISREG(mode):
            reason = self._excluded(path)
            return [Source(raw, path=path, error=reason)] if reason else [Source(raw, path=path)]
        descriptor = _stream_descriptor(raw)
        if descriptor is not None:
            return [self._stream(raw, descriptor)]
        message = f"is {_special_kind(mode)}: only files and folders are read (give a stream as '-' or <(...))"
        return [Source(raw, path=path, error=message)]

    def _excluded(self, path: Path) -> str | None:
        return self.exclude(path) if self.exclude is not None else None

    # --- folders and globs --------------------------------------------------------------------------------

    def _walk(self, folder: Path, display: str) -> list[Source]:
        found: list[tuple[tuple[Any, ...], Source]] = []
        problems: list[Source] = []
        skipped: dict[str, int] = {}  # why entries were passed over: what an empty result says
        visited: set[tuple[int, int]] = set()
        pending: list[tuple[Path, tuple[str, ...]]] = [(folder, ())]
        while pending:
            directory, parts = pending.pop()
            if not self._first_visit(directory, visited):
                continue
            try:
                with os.scandir(directory) as scan:
                    entries = list(scan)
            except OSError as exc:
                name = os.path.join(display, *parts)
                problems.append(Source(name, path=directory, error=f"cannot read folder: {exc.strerror or exc}"))
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    skipped["hidden"] = skipped.get("hidden", 0) + 1
                    continue
                relative = (*parts, entry.name)
                name = os.path.join(display, *relative)
                kind, source = self._entry(Path(entry.path), name)
                if kind == "folder":
                    pending.append((Path(entry.path), relative))
                elif source is not None and source.error is None:
                    found.append((tuple(_natural_key(part) for part in relative), source))
                elif source is not None:
                    problems.append(source)
                else:
                    skipped[kind] = skipped.get(kind, 0) + 1
        found.sort(key=lambda item: item[0])
        sources = [source for _, source in found]
        if not sources and not problems:
            return [Source(display, path=folder, error=_nothing_to_read(skipped))]
        return sources + problems

    def _first_visit(self, directory: Path, visited: set[tuple[int, int]]) -> bool:
        try:
            info = os.stat(directory)
        except OSError:
            return True  # scandir reports the problem
        key = (info.st_dev, info.st_ino)
        if key in visited:
            _note(f"{directory}: skipped: this folder was already walked (a bind mount or a loop)")
            return False
        visited.add(key)
        return True

    def _entry(self, path: Path, name: str) -> tuple[str, Source | None]:
        """What a path found in a folder or by a glob is: ("folder", None), ("file", source), or why it is
        passed over, with no source: "output" (monkey wrote it), "link" (to a folder), "special" (a FIFO...)."""
        try:
            link = path.is_symlink()
            mode = os.stat(path).st_mode
        except OSError as exc:
            return "file", Source(name, path=path, error=_stat_problem(exc, path))
        if stat.S_ISDIR(mode):
            if link:
                _note(f"{name}: skipped: a symbolic link to a folder (links to folders are not followed)")
                return "link", None
            return ("output", None) if self._excluded(path) else ("folder", None)
        if stat.S_ISREG(mode):
            return ("output", None) if self._excluded(path) else ("file", Source(name, path=path))
        _note(f"{name}: skipped: {_special_kind(mode)}, not a regular file")
        return "special", None

    def _glob(self, pattern: str) -> list[Source]:
        matches = sorted(set(self._glob_matches(os.path.expanduser(pattern))), key=_natural_key)
        sources: list[Source] = []
        for match in matches:
            kind, source = self._entry(Path(match), match)
            if kind == "folder":
                sources.extend(self._walk(Path(match), match))
            elif source is not None:
                sources.append(source)
        if not matches:
            return [Source(pattern, error="no files match this pattern")]
        return sources

    def _glob_matches(self, pattern: str) -> Iterator[str]:
        """Paths matching `pattern` (`**` = any depth), hidden names only when the pattern names them, no
        symbolic link to a folder ever entered, every (folder, pattern part) visited once."""
        if os.altsep:
            pattern = pattern.replace(os.altsep, os.sep)
        parts = pattern.split(os.sep)
        literal = 0
        while literal < len(parts) and not _GLOB_MAGIC.search(parts[literal]):
            literal += 1
        base = os.sep.join(parts[:literal]) or (os.sep if pattern.startswith(os.sep) else "")
        rest = [part for part in parts[literal:] if part]
        if not rest:
            return
        seen: set[tuple[int, int, int]] = set()
        pending: list[tuple[str, int]] = [(base, 0)]
        while pending:
            folder, index = pending.pop()
            try:
                info = os.stat(folder or os.curdir)
            except OSError:
                continue
            if (info.st_dev, info.st_ino, index) in seen:
                continue
            seen.add((info.st_dev, info.st_ino, index))
            part, last = rest[index], index == len(rest) - 1
            if part == "**":
                if not last:
                    pending.append((folder, index + 1))
                for entry in _listing(folder):
                    if entry.name.startswith("."):
                        continue
                    child = os.path.join(folder, entry.name)
                    if last:
                        yield child
                    if _real_folder(entry):
                        pending.append((child, index))
                    elif not last and _folder_link(entry):
                        _note(f"{child}: skipped: a symbolic link to a folder (links to folders are not followed)")
                continue
            matcher = _segment_matcher(part)
            for entry in _listing(folder):
                if not matcher(entry.name):
                    continue
                child = os.path.join(folder, entry.name)
                if last:
                    yield child
                elif _real_folder(entry):
                    pending.append((child, index + 1))
                elif _folder_link(entry):
                    _note(f"{child}: skipped: a symbolic link to a folder (links to folders are not followed)")


def _listing(folder: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder or os.curdir) as scan:
            return list(scan)
    except OSError:
        return []


def _real_folder(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _folder_link(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_symlink() and entry.is_dir()
    except OSError:
        return False


def _segment_matcher(part: str) -> Callable[[str], bool]:
    """fnmatch for one path segment, case-sensitive; wildcards never match a leading dot (as in glob)."""
    import fnmatch

    regex = re.compile(fnmatch.translate(part))
    hidden_ok = part.startswith(".")
    return lambda name: (hidden_ok or not name.startswith(".")) and regex.match(name) is not None


def _stat_problem(exc: OSError, path: Path) -> str:
    if exc.errno == errno.ELOOP:
        return "symbolic link loop (too many levels of symbolic links)"
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return "broken symbolic link"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "no such file or directory"
    return f"cannot read: {exc.strerror or exc}"


def _stream_descriptor(raw: str) -> int | None:
    """The descriptor behind /dev/fd/N, /dev/stdin or /proc/self/fd/N (this process's own), else None."""
    match = _STREAM_PATH.fullmatch(os.path.normpath(raw))
    if match is None:
        return None
    if match.group("pid") is not None and int(match.group("pid")) != os.getpid():
        return None
    if match.group("stdin"):
        return 0
    return int(match.group("fd") or match.group("pfd"))


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


_SKIPPED_WORDS = {
    "hidden": ("hidden", "hidden"),
    "output": ("written by monkey (its outputs)", "written by monkey (its outputs)"),
    "link": ("a link to a folder", "links to folders"),
    "special": ("not a regular file", "not regular files"),
}


def _nothing_to_read(skipped: dict[str, int]) -> str:
    """Why a folder gave no document: empty, or what its entries were (never "no files" when it has some)."""
    if not skipped:
        return "folder is empty"
    total = sum(skipped.values())
    parts = ", ".join(f"{count} {_SKIPPED_WORDS[kind][count != 1]}" for kind, count in skipped.items())
    entries = "its one entry was skipped" if total == 1 else f"all its {total} entries were skipped"
    return f"folder has nothing to read: {entries} ({parts})"


def _natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that orders digit runs by value ("scan2" < "scan10"), case-insensitively, ties by name."""
    tokens = re.split(r"(\d+)", name)
    return (
        tuple((0, int(token), "") if token.isdigit() else (1, 0, token.casefold()) for token in tokens),
        name,
    )


def _without_duplicates(sources: list[Source]) -> list[Source]:
    """Each file once (by its real path), each stream and each problem once (by name)."""
    seen: set[str] = set()
    unique: list[Source] = []
    for source in sources:
        if source.path is not None and source.error is None:
            key = "file:" + os.path.realpath(source.path)
        else:
            key = "name:" + source.name
        if key in seen:
            continue
        seen.add(key)
        unique.append(source)
    return unique

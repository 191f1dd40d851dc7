"""The folder an MCP client may read from: every path resolved and checked, no link followed, nothing outside.

A client (a desktop assistant, an agent) names files as paths relative to the root, or absolute paths inside
it. `RootFolder.open` turns such a path into a descriptor of the regular file it names, or a `PathRefused`
saying why not, in words the client can show or act on:

* `..` anywhere, or an absolute path elsewhere: outside the root;
* a symbolic link at any step (folder or file): links are not followed, wherever they point (a link to a
  file inside the root is refused too: what it points to can change after the check);
* a folder, a FIFO, a device: not a regular file.

Each step is opened relative to the previous one's descriptor with O_NOFOLLOW (openat), so nothing swapped in
after a check is ever reached; where the system has no such calls (Windows), each step is checked with lstat
first, which leaves a short window between check and open.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from monkey_cli.errors import MonkeyError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO swapped in must never block the open
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_AT_CALLS = os.open in os.supports_dir_fd and bool(_NOFOLLOW)


class PathRefused(MonkeyError):
    """A path a client gave that names no readable file under the root; the message says why."""


class RootFolder:
    """The one folder (and everything under it) that tools may read."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        given = Path(root).expanduser()
        if not given.is_dir():
            raise PathRefused(f"--root {root}: not a folder")
        self.given = Path(os.path.abspath(given))
        self.path = Path(os.path.realpath(given))

    def relative(self, requested: str) -> PurePosixPath:
        """`requested` as a path below the root, checked by its text alone (no file is touched)."""
        if not isinstance(requested, str) or not requested.strip():
            raise PathRefused("give the path of a file under the root folder")
        if "\x00" in requested:
            raise PathRefused(f"{requested!r}: not a path (it holds a NUL character)")
        path = PurePosixPath(requested.replace(os.sep, "/") if os.sep != "/" else requested)
        if path.is_absolute() or Path(requested).is_absolute():
            path = self._below_root(requested)
        parts = [part for part in path.parts if part not in ("", ".")]
        if ".." in parts:
            raise PathRefused(f"{requested}: outside the root folder {self.path} ('..' is not allowed)")
        if not parts:
            raise PathRefused(f"{requested}: the root folder itself; give a file under it")
        return PurePosixPath(*parts)

    def _below_root(self, requested: str) -> PurePosixPath:
        absolute = Path(os.path.abspath(requested))
        for root in (self.path, self.given):
            with contextlib.suppress(ValueError):
                return PurePosixPath(*absolute.relative_to(root).parts)
        raise PathRefused(f"{requested}: outside the root folder {self.path}; only files under it are read")

    @contextlib.contextmanager
    def open(self, requested: str) -> Iterator[tuple[PurePosixPath, int]]:
        """(the path relative to the root, a read-only descriptor of the regular file it names), closed after
        the block; PathRefused when there is no such file, or it is not one that may be read."""
        relative = self.relative(requested)
        descriptor = self._open_at(relative) if _AT_CALLS else self._open_checked(relative)
        try:
            info = os.fstat(descriptor)
            if not stat.S_ISREG(info.st_mode):
                kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
                raise PathRefused(f"{relative}: {kind}; give a document (a PDF or an image)")
            yield relative, descriptor
        finally:
            os.close(descriptor)

    def _open_at(self, relative: PurePosixPath) -> int:
        folder = os.open(self.path, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
        try:
            for depth, part in enumerate(relative.parts):
                last = depth == len(relative.parts) - 1
                flags = os.O_RDONLY | _NOFOLLOW | _CLOEXEC | (_NONBLOCK if last else _DIRECTORY)
                try:
                    opened = os.open(part, flags, dir_fd=folder)
                except OSError as exc:
                    raise _refusal(exc, PurePosixPath(*relative.parts[: depth + 1]), self.path, last) from None
                os.close(folder)
                folder = opened
            return folder
        except BaseException:
            os.close(folder)
            raise

    def _open_checked(self, relative: PurePosixPath) -> int:
        """Without openat: lstat each step, then open the whole path (a short window between the two)."""
        current = self.path
        for depth, part in enumerate(relative.parts):
            current = current / part
            shown = PurePosixPath(*relative.parts[: depth + 1])
            try:
                info = os.lstat(current)
            except OSError as exc:
                raise _refusal(exc, shown, self.path, depth == len(relative.parts) - 1) from None
            if stat.S_ISLNK(info.st_mode):
                raise PathRefused(f"{shown}: a symbolic link; links are not followed")
        try:
            return os.open(current, os.O_RDONLY | _NONBLOCK | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            raise _refusal(exc, relative, self.path, True) from None


def _refusal(exc: OSError, shown: PurePosixPath, root: Path, last: bool) -> PathRefused:
    if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and not last and _is_link(root / shown)):
        return PathRefused(f"{shown}: a symbolic link; links are not followed")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return PathRefused(f"{shown}: no such file under the root folder {root}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PathRefused(f"{shown}: permission denied")
    return PathRefused(f"{shown}: cannot open it ({exc.strerror or exc})")


def _is_link(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False

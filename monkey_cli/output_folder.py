"""The output folder (`--out DIR`): the only place monkey writes, and a record of which files in it are its own.

* Nothing is created or written outside DIR. Every folder on the way to an output is checked before it is
  entered or created: a symbolic link or anything but a folder there refuses that output (one error naming
  it; the rest of the run goes on). On POSIX systems files and folders are created relative to descriptors
  of the folders already checked, with O_NOFOLLOW, so a link planted while monkey runs is not followed either.
* Monkey's own files are recorded in `DIR/.monkey-manifest.json`. A file that is not recorded there (the
  user's own) is never replaced or removed: the output that would replace it is refused with an error naming
  the file, unless the folder was opened with `overwrite=True` (`--overwrite`).
* Every file is written whole or not at all: into a temp file in monkey's own work folder
  (`DIR/.monkey-work-<16 hex digits>`, recorded in the manifest before its first use), flushed to disk, then
  renamed into place after the manifest records it. A run killed outright leaves its work folder behind; the
  next run's first write, and every run's end, remove the recorded work folders whose run has ended (a lock on
  each tells) and only the temp files in them that monkey names; nothing else is ever deleted.
* A full disk, an exceeded quota or file-size limit, or a read-only filesystem raises `OutputFull` naming the
  file: a run stops there, and everything written before stays whole.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from monkey_cli import signals
from monkey_cli.errors import MonkeyError, MonkeyWarning, UsageError

MANIFEST_NAME = ".monkey-manifest.json"
MANIFEST_SCHEMA_VERSION = 1
WORK_PREFIX = ".monkey-work-"

_WORK_NAME = re.compile(r"\.monkey-work-[0-9a-f]{16}")
_TEMP_NAME = re.compile(r"\d+-[0-9a-f]{8}\.tmp")
_MAX_MANIFEST_BYTES = 64 << 20  # about 400,000 outputs
_LOCK_TIMEOUT_S = 10.0
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}
_LINK_ON_THE_WAY = {errno.ELOOP, errno.EMLINK, errno.ENOTDIR}

_USE_DESCRIPTORS = (
    {os.open, os.mkdir, os.stat, os.rename, os.unlink, os.rmdir} <= os.supports_dir_fd
    and hasattr(os, "O_DIRECTORY")
    and hasattr(os, "O_NOFOLLOW")
)
_FOLDER_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_CREATE_FLAGS = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
) | getattr(os, "O_BINARY", 0)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locks (stale work folders are then left alone)
    fcntl = None  # type: ignore[assignment]

Entry = dict[str, Any]


class OutputError(MonkeyError):
    """An output file could not be written; the message names it."""


class OutputRefused(OutputError):
    """An output would replace a file monkey did not write, or go through a symbolic link or a non-folder."""


class OutputFull(OutputError):
    """No room for an output (disk full, quota, file-size limit, read-only): the run has to stop."""


@dataclass
class _Folder:
    """An open folder: a descriptor (POSIX) or its path (elsewhere); `at(name)` gives os.* arguments."""

    fd: int | None
    path: str

    def at(self, name: str) -> tuple[str, int | None]:
        return (name, self.fd) if self.fd is not None else (os.path.join(self.path, name), None)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def checked_relative(relative: str | PurePosixPath) -> PurePosixPath:
    """`relative` as a path inside the folder: no absolute path, no '..', '.', empty or NUL parts."""
    path = PurePosixPath(relative)
    parts = str(relative).split("/")
    if path.is_absolute() or any(part in ("", ".", "..") or "\x00" in part for part in parts):
        raise OutputRefused(f"{relative!s}: not a path inside the output folder")
    return path


class OutputFolder:
    """`--out DIR`, opened: creates DIR if needed, reads the manifest, writes outputs (see the module doc)."""

    def __init__(self, root: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.root = Path(root)
        self.overwrite = overwrite
        self.warning: str | None = None
        if os.path.lexists(self.root) and not self.root.is_dir():
            raise UsageError(f"--out {self.root}: exists and is not a folder")
        try:
            self.root.mkdir(parents=True, exist_ok=True)  # DIR itself is what the user named: links followed
            fd = os.open(self.root, _FOLDER_FLAGS & ~getattr(os, "O_NOFOLLOW", 0)) if _USE_DESCRIPTORS else None
        except OSError as exc:
            raise UsageError(f"--out {self.root}: cannot create or open the folder ({exc.strerror or exc})") from None
        self._root = _Folder(fd, str(self.root))
        info = os.stat(self.root)
        self._identity = (info.st_dev, info.st_ino)
        self._work: _Folder | None = None
        self._work_name: str | None = None
        self._temps = 0
        self._entries, self._work_dirs = self._read_manifest(report=True)
        if self.warning:
            warnings.warn(self.warning, MonkeyWarning, stacklevel=2)

    # ------------------------------------------------------------------------------------- what is ours

    def shown(self, relative: str | PurePosixPath) -> str:
        """How messages name an output: DIR/relative."""
        return str(self.root / PurePosixPath(relative))

    def entry(self, relative: str | PurePosixPath) -> Entry | None:
        """The manifest's record of an output (None: not monkey's)."""
        return self._entries.get(str(PurePosixPath(relative)))

    def owns(self, relative: str | PurePosixPath) -> bool:
        return str(PurePosixPath(relative)) in self._entries

    def recorded(self) -> list[str]:
        """Every output the manifest lists (as last read), sorted."""
        return sorted(self._entries)

    def is_root(self, path: Path) -> bool:
        """Whether `path` is this output folder itself (by identity, whatever the spelling)."""
        try:
            info = os.stat(path)
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == self._identity

    def blocked(self, relative: str | PurePosixPath, *, folder: bool = False) -> bool:
        """Whether the place of `relative` is taken by something another name avoids: a folder where an output
        file goes, or anything but a folder (or a link: links are refused, not avoided) where an output folder
        goes. Problems on the way to it are not avoided but reported (see `check`)."""
        try:
            mode = os.lstat(self.root / PurePosixPath(relative)).st_mode
        except OSError:
            return False
        return not stat.S_ISLNK(mode) and stat.S_ISDIR(mode) != folder

    def check(self, relative: str | PurePosixPath) -> str | None:
        """Why an output cannot be written at `relative` now, or None: a link or a non-folder on the way,
        a folder in its place, or a file monkey did not write (unless overwriting)."""
        relative = checked_relative(relative)
        current = self.root
        for part in relative.parts[:-1]:
            current = current / part
            try:
                mode = os.lstat(current).st_mode
            except FileNotFoundError:
                return None  # created when written
            except OSError as exc:
                return f"{current}: cannot check it ({exc.strerror or exc})"
            if stat.S_ISLNK(mode):
                return f"{current} is a symbolic link; monkey never writes through one (remove it)"
            if not stat.S_ISDIR(mode):
                return f"{current} is not a folder"
        return self._target_problem(relative)

    def _target_problem(self, relative: PurePosixPath) -> str | None:
        target = self.root / relative
        try:
            mode = os.lstat(target).st_mode
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"{target}: cannot check it ({exc.strerror or exc})"
        if stat.S_ISDIR(mode):
            return f"{target} is a folder; an output file cannot replace it"
        if self.overwrite or self.owns(relative):
            return None
        self._entries, self._work_dirs = self._read_manifest()  # another run sharing DIR may have written it
        if self.owns(relative):
            return None
        return f"{target} exists and was not written by monkey; not replacing it (move it away, or use --overwrite)"

    # ------------------------------------------------------------------------------------------ writing

    def write(self, relative: str | PurePosixPath, data: bytes, entry: Mapping[str, Any] | None = None) -> Path:
        """Write one output atomically and record it (with `entry`'s fields) in the manifest."""
        return self.write_files([(relative, data)], {str(PurePosixPath(relative)): dict(entry or {})})[0]

    def write_files(
        self, files: Sequence[tuple[str | PurePosixPath, bytes]], entries: Mapping[str, Entry] | None = None
    ) -> list[Path]:
        """Write several outputs atomically, each whole or not at all, recorded in one manifest update.

        Raises OutputRefused (a file that is not monkey's, a link on the way: nothing of `files` is written),
        OutputFull (no room: stop the run) or OutputError.
        """
        planned = [(checked_relative(relative), data) for relative, data in files]
        for relative, _ in planned:
            problem = self.check(relative)
            if problem:
                raise OutputRefused(problem)
        staged: list[tuple[PurePosixPath, str]] = []
        try:
            for relative, data in planned:
                staged.append((relative, self._stage(relative, data)))
            with signals.deferred():  # recorded and in place, or neither: an interrupt waits for both
                for relative, _ in planned:  # again: the folder may have changed while the data was written
                    problem = self._target_problem(relative)
                    if problem:
                        raise OutputRefused(problem)
                changes = {str(relative): {**(entries or {}).get(str(relative), {})} for relative, _ in planned}
                self._save(lambda manifest, _work: manifest.update(changes))
                for relative, temp in staged:
                    self._put_in_place(relative, temp)
                staged = []
        finally:
            for _, temp in staged:
                self._discard(temp)
        return [self.root / relative for relative, _ in planned]

    def _stage(self, relative: PurePosixPath, data: bytes) -> str:
        """`data` in a new temp file of the work folder, on disk; its name."""
        work = self._work_folder()
        self._temps += 1
        name = f"{self._temps}-{secrets.token_hex(4)}.tmp"
        try:
            where, dir_fd = work.at(name)
            fd = os.open(where, _CREATE_FLAGS, 0o666, dir_fd=dir_fd)  # the umask decides, as for any new file
        except OSError as exc:
            raise _output_error(exc, self.shown(relative)) from None
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException as exc:
            self._discard(name)
            if isinstance(exc, OSError):
                raise _output_error(exc, self.shown(relative)) from None
            raise
        return name

    def _put_in_place(self, relative: PurePosixPath, temp: str) -> None:
        assert self._work is not None
        parent = self._open_parent(relative, create=True)
        try:
            source, source_fd = self._work.at(temp)
            target, target_fd = parent.at(relative.name)
            try:
                os.rename(source, target, src_dir_fd=source_fd, dst_dir_fd=target_fd)
            except OSError as exc:
                raise _output_error(exc, self.shown(relative)) from None
            _fsync_folder(parent)
        finally:
            parent.close()

    def _open_parent(self, relative: PurePosixPath, *, create: bool) -> _Folder:
        """The folder holding `relative`, each folder on the way checked (no link, a real folder) before it
        is entered or created."""
        folder = _Folder(os.dup(self._root.fd) if self._root.fd is not None else None, self._root.path)
        try:
            for part in relative.parts[:-1]:
                folder = self._enter(folder, part, create, relative)
        except BaseException:
            folder.close()
            raise
        return folder

    def _enter(self, folder: _Folder, name: str, create: bool, relative: PurePosixPath) -> _Folder:
        where, dir_fd = folder.at(name)
        shown = os.path.join(folder.path, name)
        try:
            try:
                child = self._open_folder(where, dir_fd, shown)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):  # made meanwhile: the open below checks what it is
                    os.mkdir(where, 0o777, dir_fd=dir_fd)
                child = self._open_folder(where, dir_fd, shown)
        except OutputError:
            raise
        except OSError as exc:
            raise _output_error(exc, self.shown(relative)) from None
        finally:
            folder.close()
        return child

    def _open_folder(self, where: str, dir_fd: int | None, shown: str) -> _Folder:
        try:
            if _USE_DESCRIPTORS:
                return _Folder(os.open(where, _FOLDER_FLAGS, dir_fd=dir_fd), shown)
            mode = os.lstat(where).st_mode
            if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
                raise OSError(errno.ELOOP if stat.S_ISLNK(mode) else errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            return _Folder(None, shown)
        except OSError as exc:
            if exc.errno in _LINK_ON_THE_WAY:
                raise OutputRefused(
                    f"{shown} is a symbolic link or not a folder; monkey never writes through one"
                ) from None
            raise

    def _discard(self, temp: str) -> None:
        if self._work is not None:
            where, dir_fd = self._work.at(temp)
            with contextlib.suppress(OSError):
                os.unlink(where, dir_fd=dir_fd)

    def open_file(self, relative: str | PurePosixPath, *, append: bool) -> BinaryIO:
        """An output opened for writing in place (appended to, or emptied first), for files that grow as a
        run goes (evaluation predictions): no link followed, nothing but a regular file, recorded as monkey's.
        """
        relative = checked_relative(relative)
        problem = self.check(relative)
        if problem:
            raise OutputRefused(problem)
        if not self.owns(relative):
            self.record({str(relative): {}})
        parent = self._open_parent(relative, create=True)
        try:
            where, dir_fd = parent.at(relative.name)
            mode = os.O_RDWR | os.O_APPEND if append else os.O_WRONLY | os.O_TRUNC
            flags = os.O_CREAT | mode | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
            fd = os.open(where, flags | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0), 0o666, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in _LINK_ON_THE_WAY or exc.errno == errno.ENXIO:  # a link, or a FIFO nobody reads
                raise OutputRefused(f"{self.shown(relative)} is not a regular file; not writing to it") from None
            raise _output_error(exc, self.shown(relative)) from None
        finally:
            parent.close()
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutputRefused(f"{self.shown(relative)} is not a regular file; not writing to it")
        return os.fdopen(fd, "ab+" if append else "wb")

    def remove(self, relative: str | PurePosixPath) -> None:
        """Delete one of monkey's own outputs (never a file it did not write, never through a link)."""
        relative = checked_relative(relative)
        if not (self.owns(relative) or self.overwrite):
            return
        try:
            parent = self._open_parent(relative, create=False)
        except (OSError, OutputError):
            return
        try:
            where, dir_fd = parent.at(relative.name)
            if stat.S_ISREG(os.stat(where, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                os.unlink(where, dir_fd=dir_fd)
        except OSError:
            pass
        finally:
            parent.close()
        self.record({str(relative): None})

    def clear_folder(self, relative: str | PurePosixPath, names: re.Pattern[str]) -> bool:
        """Empty one of monkey's own folders (recorded in the manifest, e.g. a training checkpoint reserved
        before a library wrote into it) of the regular files whose names `names` matches (what that library
        writes there), never through a link and nothing else, then remove the folder if that leaves it empty
        and drop its record. True when the folder is gone; a file of anyone else's keeps it."""
        relative = checked_relative(relative)
        if not self.owns(relative):
            return False
        try:
            parent = self._open_parent(relative, create=False)
            inside = self._enter(parent, relative.name, False, relative)
        except (OSError, OutputError):
            return False
        try:
            for entry in os.listdir(inside.fd if inside.fd is not None else inside.path):
                where, dir_fd = inside.at(entry)
                with contextlib.suppress(OSError):
                    mode = os.stat(where, dir_fd=dir_fd, follow_symlinks=False).st_mode
                    if names.fullmatch(entry) and stat.S_ISREG(mode):
                        os.unlink(where, dir_fd=dir_fd)
        finally:
            inside.close()
        try:
            outer = self._open_parent(relative, create=False)
        except (OSError, OutputError):
            return False
        try:
            where, dir_fd = outer.at(relative.name)
            os.rmdir(where, dir_fd=dir_fd)
        except OSError:
            return False  # not empty: something of someone else's is in it
        finally:
            outer.close()
        self.record({str(relative): None})
        return True

    # ------------------------------------------------------------------------------------------ reading

    def read(self, relative: str | PurePosixPath, limit: int = 64 << 20) -> bytes | None:
        """An output's bytes, read without following links (None: missing, not a regular file, too large)."""
        handle = self.open_read(relative)
        if handle is None:
            return None
        with handle:
            try:
                data = handle.read(limit + 1)
            except OSError:
                return None
        return data if len(data) <= limit else None

    def open_read(self, relative: str | PurePosixPath) -> BinaryIO | None:
        """An output opened for reading without following links; None if missing or not a regular file."""
        try:
            relative = checked_relative(relative)
            parent = self._open_parent(relative, create=False)
        except (OSError, OutputError):
            return None
        try:
            where, dir_fd = parent.at(relative.name)
            fd = os.open(where, _READ_FLAGS, dir_fd=dir_fd)
        except OSError:
            return None
        finally:
            parent.close()
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return os.fdopen(fd, "rb")

    # ----------------------------------------------------------------------------------------- manifest

    def record(self, changes: Mapping[str, Entry | None]) -> None:
        """Set (or, with None, remove) manifest entries, in one atomic update."""

        def apply(manifest: dict[str, Entry], _work: list[str]) -> None:
            for key, value in changes.items():
                if value is None:
                    manifest.pop(key, None)
                else:
                    manifest[key] = dict(value)

        self._save(apply)

    def _read_manifest(self, *, report: bool = False) -> tuple[dict[str, Entry], list[str]]:
        where, dir_fd = self._root.at(MANIFEST_NAME)
        try:
            if not stat.S_ISREG(os.stat(where, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                return self._unreadable("not a regular file", report)  # never opened: it may be a device
            fd = os.open(where, _READ_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            return {}, []
        except OSError as exc:
            return self._unreadable(f"cannot read it ({exc.strerror or exc})", report)
        try:
            with os.fdopen(fd, "rb") as handle:
                mode = os.fstat(handle.fileno()).st_mode
                if not stat.S_ISREG(mode):
                    return self._unreadable("not a regular file", report)
                raw = handle.read(_MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            return self._unreadable(f"cannot read it ({exc.strerror or exc})", report)
        if len(raw) > _MAX_MANIFEST_BYTES:
            return self._unreadable(f"larger than {_MAX_MANIFEST_BYTES >> 20} MiB", report)
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSON, huge numbers
            return self._unreadable(f"not valid JSON ({type(exc).__name__})", report)
        if not isinstance(data, dict) or data.get("schema_version") != MANIFEST_SCHEMA_VERSION:
            return self._unreadable(f"not a schema_version {MANIFEST_SCHEMA_VERSION} manifest", report)
        entries = data.get("entries")
        if not isinstance(entries, dict) or not all(isinstance(value, dict) for value in entries.values()):
            return self._unreadable("'entries' is not a mapping of output files", report)
        work = data.get("work_dirs", [])
        work_dirs = [name for name in work if isinstance(name, str) and _WORK_NAME.fullmatch(name)]
        return entries, work_dirs if isinstance(work, list) else []

    def _unreadable(self, cause: str, report: bool) -> tuple[dict[str, Entry], list[str]]:
        if report:
            self.warning = (
                f"{self.root / MANIFEST_NAME}: {cause}; monkey no longer knows which files it wrote, so none is "
                "reused or replaced (--overwrite replaces them)"
            )
        return {}, []

    def _save(self, change: Callable[[dict[str, Entry], list[str]], None]) -> None:
        """Re-read the manifest (another run may have added to it), apply `change`, write it atomically."""
        self._work_folder()
        with self._locked():
            entries, work_dirs = self._read_manifest()
            change(entries, work_dirs)
            document = {
                "schema_version": MANIFEST_SCHEMA_VERSION,
                "entries": dict(sorted(entries.items())),
                "work_dirs": sorted(set(work_dirs)),
            }
            data = (json.dumps(document, indent=1) + "\n").encode("utf-8")
            temp = self._stage(PurePosixPath(MANIFEST_NAME), data)
            try:
                source, source_fd = self._work.at(temp)  # type: ignore[union-attr]
                target, target_fd = self._root.at(MANIFEST_NAME)
                os.rename(source, target, src_dir_fd=source_fd, dst_dir_fd=target_fd)
            except OSError as exc:
                self._discard(temp)
                raise _output_error(exc, self.shown(MANIFEST_NAME)) from None
            _fsync_folder(self._root)
            self._entries, self._work_dirs = entries, work_dirs

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold DIR's lock while the manifest is read, changed and written (another run may share DIR)."""
        fd = self._root.fd
        if fcntl is None or fd is None:
            yield
            return
        deadline = time.monotonic() + _LOCK_TIMEOUT_S
        locked = False
        while not locked:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                if time.monotonic() > deadline:  # a stopped process holds it: go on rather than hang
                    break
                time.sleep(0.01)
            except OSError:
                break  # a filesystem without locks
        try:
            yield
        finally:
            if locked:
                fcntl.flock(fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------------------------------ work folders

    def _work_folder(self) -> _Folder:
        """This run's work folder for temp files: created, locked and recorded on first use."""
        if self._work is not None:
            return self._work
        for _ in range(100):
            name = f"{WORK_PREFIX}{secrets.token_hex(8)}"
            where, dir_fd = self._root.at(name)
            try:
                os.mkdir(where, 0o700, dir_fd=dir_fd)
                break
            except FileExistsError:
                continue
            except OSError as exc:
                raise _output_error(exc, self.shown(name)) from None
        else:  # pragma: no cover - 100 collisions of 64 random bits
            raise OutputError(f"{self.root}: cannot make a work folder")
        work = self._open_folder(where, dir_fd, os.path.join(self._root.path, name))
        if fcntl is not None and work.fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(work.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while this run lives
        self._work, self._work_name = work, name
        stale = [other for other in self._work_dirs if other != name]
        self._save(lambda _entries, work_dirs: work_dirs.append(name))
        self._remove_work_folders(stale)
        return work

    def _remove_work_folders(self, names: Sequence[str]) -> None:
        """Remove the recorded work folders of runs that have ended, with only monkey's temp files in them."""
        ended = [name for name in names if self._clear_work_folder(name)]
        if ended:
            self._save(lambda _entries, work_dirs: [work_dirs.remove(n) for n in ended if n in work_dirs])

    def _left(self, name: str) -> bool:
        """Whether the recorded work folder `name` is still there, a real folder, and its run has ended (its lock
        is free): left behind by a run killed outright."""
        if fcntl is None or self._root.fd is None:
            return False
        try:
            fd = os.open(name, _FOLDER_FLAGS, dir_fd=self._root.fd)
        except OSError:
            return False  # gone (its record goes at the next write), or not a folder monkey made
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False  # its run is still going
        finally:
            os.close(fd)  # the lock goes with the descriptor

    def _clear_work_folder(self, name: str) -> bool:
        """Empty and remove one ended run's work folder; False while its run still holds its lock."""
        if fcntl is None or self._root.fd is None:
            return False
        where, dir_fd = self._root.at(name)
        try:
            fd = os.open(where, _FOLDER_FLAGS, dir_fd=dir_fd)
        except OSError:
            return True  # gone, or something else now has that name: forget it, touch nothing
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # its run is still going
            for entry in os.listdir(fd):
                with contextlib.suppress(OSError):
                    mode = os.stat(entry, dir_fd=fd, follow_symlinks=False).st_mode
                    if _TEMP_NAME.fullmatch(entry) and stat.S_ISREG(mode):
                        os.unlink(entry, dir_fd=fd)
            with contextlib.suppress(OSError):
                os.rmdir(where, dir_fd=dir_fd)  # only if empty: a file monkey did not make stays
            return True
        finally:
            os.close(fd)

    def close(self) -> None:
        """Remove this run's work folder (its record goes at the next run's first write, which finds it gone),
        and those of runs that ended without removing theirs: a worker or a run killed outright, whose lock
        is free now (a run still going keeps its own)."""
        with contextlib.suppress(MonkeyError, OSError):  # tidying up after others never fails a finished run
            ended = [name for name in self._read_manifest()[1] if name != self._work_name and self._left(name)]
            if ended:  # otherwise nothing is touched (a refused run leaves DIR exactly as it was)
                self._work_folder()  # the manifest is written through it (a first use removes the ended ones)
                self._remove_work_folders(ended)
        if self._work is None:
            return
        name, work = self._work_name, self._work
        self._work = None
        try:
            for entry in os.listdir(work.fd if work.fd is not None else work.path):
                if _TEMP_NAME.fullmatch(entry):
                    where, dir_fd = work.at(entry)
                    with contextlib.suppress(OSError):
                        os.unlink(where, dir_fd=dir_fd)
            where, dir_fd = self._root.at(name)  # type: ignore[arg-type]
            with contextlib.suppress(OSError):
                os.rmdir(where, dir_fd=dir_fd)
        finally:
            work.close()

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class OutputsFilter:
    """Which paths are monkey's own outputs, never to be read as inputs: the output folder of this run (when
    it lies inside an input folder), and every file listed in the manifest of a folder above the path (an
    earlier run's outputs, whatever its --out was). Passed to `documents.expand_inputs(exclude=...)`.
    """

    def __init__(self, out: OutputFolder | None = None) -> None:
        self.out = out
        self._manifests: dict[str, frozenset[str] | None] = {}
        self._noted: set[str] = set()

    def __call__(self, path: Path) -> str | None:
        if self.out is not None and self.out.is_root(path):
            return f"is the output folder (--out {self.out.root}); not read as input"
        real = os.path.realpath(path)
        folder = os.path.dirname(real)
        while True:
            recorded = self._recorded(folder)
            if recorded:
                relative = PurePosixPath(*Path(os.path.relpath(real, folder)).parts)
                first = relative.parts[0]
                if str(relative) in recorded or _WORK_NAME.fullmatch(first) or first == MANIFEST_NAME:
                    self._note(folder)
                    return f"is an output monkey wrote (listed in {os.path.join(folder, MANIFEST_NAME)}); not read"
            parent = os.path.dirname(folder)
            if parent == folder:
                return None
            folder = parent

    def _recorded(self, folder: str) -> frozenset[str] | None:
        if folder not in self._manifests:
            self._manifests[folder] = _manifest_keys(os.path.join(folder, MANIFEST_NAME))
        return self._manifests[folder]

    def _note(self, folder: str) -> None:
        if folder not in self._noted:
            self._noted.add(folder)
            warnings.warn(
                f"{folder}: the files monkey wrote there (listed in its {MANIFEST_NAME}) are not read as inputs",
                MonkeyWarning,
                stacklevel=3,
            )


def _manifest_keys(path: str) -> frozenset[str] | None:
    """The outputs a manifest lists; None when there is none (or it cannot be read)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):  # a device is never opened
            return None
        fd = os.open(path, _READ_FLAGS)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            # Only a manifest of this user counts: one planted in a shared folder (/tmp) hides no one's inputs.
            if not stat.S_ISREG(info.st_mode) or (hasattr(os, "geteuid") and info.st_uid != os.geteuid()):
                return None
            data = json.loads(handle.read(_MAX_MANIFEST_BYTES + 1).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    entries = data.get("entries") if isinstance(data, dict) else None
    return frozenset(key for key in entries if isinstance(key, str)) if isinstance(entries, dict) else None


def _fsync_folder(folder: _Folder) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        if folder.fd is not None:
            os.fsync(folder.fd)
            return
        fd = os.open(folder.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _output_error(exc: OSError, shown: str) -> OutputError:
    cause = exc.strerror or str(exc)
    if exc.errno in _DISK_FULL:
        return OutputFull(f"cannot write {shown}: {cause}; stopping (everything written before is complete)")
    return OutputError(f"cannot write {shown}: {cause}")

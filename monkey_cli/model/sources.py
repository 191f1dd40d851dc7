"""Where a model comes from (a local folder or a Hugging Face hub id) and which device runs it."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

from monkey_cli.errors import CheckpointError, MonkeyError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from monkey_cli.model.configuration import MonkeyConfig

# Only data files are fetched from the hub: a checkpoint's .py files are never downloaded, let alone run.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.tiktoken"]


# What a model file may weigh when read whole into memory (config, index and vocabulary files; the weights
# themselves are memory-mapped by safetensors / torch, never read here).
MAX_JSON_BYTES = 64 * 2**20
MAX_VOCAB_BYTES = 64 * 2**20


class ModelSourceError(MonkeyError):
    """The model cannot be found locally and cannot be downloaded."""


class SlowCPUWarning(UserWarning):
    """Running the full-size model on a CPU takes minutes per page."""


def is_hub_id(source: str) -> bool:
    """`owner/name` that is not a local path (a hub id never starts with '.', '/' or '~')."""
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not Path(source).exists()


def display_name(source: str | os.PathLike[str]) -> str:
    """How records and messages name a checkpoint: as the user gave it, except a Hugging Face cache snapshot
    folder (`.../models--owner--name/snapshots/REV`), named by its hub id, with `@REV` (12 digits) when it is
    not the revision the cache's `refs/main` points to. Never an absolute cache path."""
    text = str(source)
    folder = Path(os.path.abspath(Path(text).expanduser()))
    cache = folder.parent.parent
    if folder.parent.name != "snapshots" or not cache.name.startswith("models--") or not folder.is_dir():
        return text
    parts = cache.name.removeprefix("models--").split("--")
    if len(parts) != 2 or not all(parts):
        return text
    repo = "/".join(parts)
    try:
        main = (cache / "refs" / "main").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        main = None
    return repo if main == folder.name else f"{repo}@{folder.name[:12]}"


def check_source(source: str | os.PathLike[str]) -> None:
    """ModelSourceError unless `source` is a folder or reads as a hub id (`owner/name`): a mistyped path is
    said at once, before any work, rather than taken for a checkpoint of the released shape."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir() or is_hub_id(text):
        return
    what = "a file, not a model folder" if path.exists() else "model folder not found"
    raise ModelSourceError(f"{text}: {what} (give a checkpoint folder or a hub id like echo840/Monkey)")


def resolve_source(source: str | os.PathLike[str]) -> Path:
    """A local checkpoint folder, or a hub id resolved through huggingface_hub's cache (downloading if allowed)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if not os.path.lexists(path / "config.json"):  # what else is wrong with it, load_config says
            raise ModelSourceError(f"{path}: not a Monkey checkpoint folder (no config.json)")
        return path
    check_source(text)
    return _download(text)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise ModelSourceError(
            f"{repo_id}: not in the Hugging Face cache and cannot be downloaded (offline or no network); "
            f"pass --model PATH to a downloaded checkpoint, or fetch it first with "
            f"`hf download {repo_id}` where the network is reachable"
        ) from None
    except RepositoryNotFoundError:
        raise ModelSourceError(f"{repo_id}: no such model on the Hugging Face hub") from None
    except (HfHubHTTPError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelSourceError(f"{repo_id}: download failed ({reason}); pass --model PATH to a local copy") from None


def resolve_device(device: str | None) -> str:
    """auto -> the CUDA device with the most free memory, else cpu; cuda -> cuda:0; cuda:N checked."""
    import torch

    device = (device or "auto").strip().lower()
    if device == "cpu":
        return "cpu"
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        if cuda_count == 0:
            return "cpu"
        free = [torch.cuda.mem_get_info(i)[0] for i in range(cuda_count)]
        return f"cuda:{max(range(cuda_count), key=free.__getitem__)}"
    if device == "cuda":
        device = "cuda:0"
    if device.startswith("cuda:") and device[5:].isdigit():
        if int(device[5:]) >= cuda_count:
            available = f"{cuda_count} CUDA device(s)" if cuda_count else "no CUDA device"
            raise UsageError(f"--device {device}: this machine has {available}")
        return device
    raise UsageError(f"--device must be auto, cpu, cuda or cuda:N; got {device!r}")


def warn_if_slow(device: str, parameters: int) -> None:
    """Warn (once per process) that a multi-billion-parameter model on a CPU is slow."""
    if device == "cpu" and parameters > 1_000_000_000:
        warnings.warn(
            f"running a {parameters / 1e9:.1f}B-parameter model on the CPU: expect minutes per page",
            SlowCPUWarning,
            stacklevel=3,
        )


def peek_config(source: str | os.PathLike[str], family: str | None = None) -> MonkeyConfig:
    """The checkpoint's config without loading weights or touching the network (`family` forces the model
    family, see `load_config`).

    A local folder's config.json, else the hub cache's copy; a hub id that is not cached yet is assumed to
    have the released checkpoints' shape (both published Monkey models and TextMonkey read 896x896 pages):
    Monkey's, or TextMonkey's when `family` says so or the id names it. A path that is neither a folder
    nor a hub id is a ModelSourceError.
    """
    from monkey_cli.model.configuration import check_family, load_config, real_config

    path = Path(str(source)).expanduser()
    if path.is_dir():
        return load_config(path, family)
    check_source(source)  # neither a folder nor a hub id: no released config stands in for a typo
    if is_hub_id(str(source)):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(source), "config.json")
        if isinstance(cached, str):
            return load_config(cached, family)
    forced = check_family(family)
    return real_config(forced or ("textmonkey" if "textmonkey" in str(source).lower() else "monkey"))


# --- model files: regular files inside the model folder, read with a limit -----------------------------------


def model_root(folder: Path) -> Path:
    """The folder a checkpoint's files may resolve into: the checkpoint folder itself, or for a Hugging Face
    cache snapshot (`models--owner--name/snapshots/REV`, whose files link to `../../blobs/`) the repo's cache."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder


def model_file(
    folder: str | os.PathLike[str], name: str, *, error: type[MonkeyError] = CheckpointError, required: bool = True
) -> Path | None:
    """`folder/name` when it is a regular file inside the model folder (see `model_root`), else `error`.

    `name` comes from the checkpoint (e.g. a weight index's shard names): an absolute name, `..`, a
    symbolic link leading outside the folder, a FIFO, socket, device or folder are refused with one line.
    A missing file is None unless `required`.
    """
    folder = Path(folder)
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if not name or posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in windows.parts:
        raise error(f"{folder}: refusing to read {name!r}: a model file must be named inside the model folder")
    path = folder / name
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        if required:
            raise error(f"{path}: not found") from None
        return None
    except (OSError, RuntimeError) as exc:  # a symlink loop, a permission error on the way
        raise error(f"{path}: cannot open ({exc})") from None
    if not resolved.is_relative_to(model_root(folder).resolve()):
        raise error(f"{path}: refusing to read it: it leads outside the model folder (to {resolved})")
    try:
        mode = resolved.stat().st_mode
    except OSError as exc:
        raise error(f"{path}: cannot open ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise error(f"{path}: refusing to read it: not a regular file ({_file_kind(mode)})")
    return path


def read_regular_file(path: str | os.PathLike[str], limit: int, *, error: type[MonkeyError] = CheckpointError) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. The file is opened without blocking and checked
    through its own descriptor, so a FIFO or device put in its place is refused, never waited on."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{path}: not found") from None
    except OSError as exc:
        raise error(f"{path}: cannot open ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{path}: refusing to read it: not a regular file ({_file_kind(mode)})")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise error(f"{path}: larger than the {limit // 2**20} MiB such a file may have")
    return data


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
    kinds += ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a plain file")

"""Errors a user can cause and fix. The CLI prints them as one line, without a traceback."""

from __future__ import annotations


class MonkeyError(Exception):
    """A problem with the user's input, files or environment (never a bug in monkey-cli)."""


class ConfigError(MonkeyError):
    """A checkpoint's config.json is missing, malformed or inconsistent."""


class TokenizerError(MonkeyError):
    """The vocabulary file is missing or malformed, or a prompt cannot be encoded."""


class CheckpointError(MonkeyError):
    """Weights are missing, truncated, or do not match the model built from the config."""


class DocumentError(MonkeyError):
    """A document cannot be opened or rendered."""


class UsageError(MonkeyError):
    """A command-line argument is invalid (exit code 2)."""


class MissingExtra(UsageError):
    """An optional extra is not installed: `extra` names it (pyproject's optional dependency), `module` the
    module that is missing. Its message is for Python callers; the CLI says it in its own one line."""

    def __init__(self, message: str, *, extra: str, module: str) -> None:
        super().__init__(message)
        self.extra = extra
        self.module = module


class MonkeyWarning(UserWarning):
    """Something the user should know that is not an error: an input skipped, a damaged file repaired.

    The library emits these with `warnings.warn`; the CLI prints each as one `warning: ...` line on stderr.
    """

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


class MonkeyWarning(UserWarning):
    """Something the user should know that is not an error: an input skipped, a damaged file repaired.

    The library emits these with `warnings.warn`; the CLI prints each as one `warning: ...` line on stderr.
    """

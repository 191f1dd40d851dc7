"""What every command shares: one-line errors, exit codes, stderr-only chatter, help in panels.

Every command is a `Command`: its help groups options in panels (Input, Prompt, Model, Output) and names
values by what they mean (`RANGE`, `auto|none|8bit|4bit`), never by Python types; a bad option value, from
the command line or an environment variable, is one line (`error: --dtype must be one of ...; got 'fp8'`)
and exit code 2, found while the arguments are parsed, before any command code (or heavy import) runs.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from typer._click.exceptions import NoArgsIsHelpError
from typer._click.exceptions import UsageError as ClickUsageError
from typer.core import TyperCommand

from monkey_cli import signals
from monkey_cli.errors import MissingExtra, MonkeyError
from monkey_cli.printing import terminal_line

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Loggers whose warnings are monkey-cli's own; everything else (bitsandbytes, transformers, torch, ...) is
# third-party noise, shown only with --verbose.
OWN_LOGGER = "monkey_cli"


# The progress status line while one is shown (see progress.py): cleared before any message is printed.
status_line: Any = None


def warn(message: str) -> None:
    """One line on stderr (stdout carries results only), control characters made visible, never glued
    onto a progress line."""
    status = status_line
    if status is not None:
        status.suspend()
    try:
        print(terminal_line(message), file=sys.stderr, flush=True)
    finally:
        if status is not None:
            status.resume()


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    warn(f"error: {message}")
    raise typer.Exit(code)


@contextmanager
def user_errors(verbose: bool = False) -> Iterator[None]:
    """Turn user-caused errors into one line on stderr and an exit code; tracebacks only with --verbose.

    Also decides what reaches stderr from libraries for the command's duration: monkey-cli's own notes
    always, third-party warnings and log lines only with --verbose.
    """
    route_library_output(verbose)
    try:
        try:
            yield
        except typer.Exit:  # the command's own ending (an interrupt it has reported already included)
            raise
        except Exception as exc:
            if signals.caused(exc):  # a library turned the interrupt into an error of its own
                raise KeyboardInterrupt from exc
            raise
    except typer.Exit:
        raise
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP (monkey_cli.signals): 128 + signal
        warn("interrupted")
        raise typer.Exit(signals.exit_code(EXIT_INTERRUPTED)) from None
    except MissingExtra as exc:  # the library's own words are for Python callers; a CLI names the command
        if verbose:
            traceback.print_exc()
        _missing_extra_line(exc.extra, exc.module)
    except MonkeyError as exc:  # UsageError included: both are the user's to fix (exit 2)
        if verbose:
            traceback.print_exc()
        fail(str(exc), EXIT_USAGE)
    except ModuleNotFoundError as exc:  # an optional extra's module (a command imports them when it runs)
        extra = missing_extra(exc)
        if extra is None:
            raise _unexpected(exc, verbose) from None
        if verbose:
            traceback.print_exc()
        _missing_extra_line(extra, exc.name or extra)
    except Exception as exc:  # a bug: say so in one line, show the traceback on request
        raise _unexpected(exc, verbose) from None


def _missing_extra_line(extra: str, module: str) -> NoReturn:
    fail(f"{_command_name()} needs the {extra!r} extra ({module} is not installed): pip install 'monkey-cli[{extra}]'")


def _unexpected(exc: BaseException, verbose: bool) -> typer.Exit:
    if verbose:
        traceback.print_exception(exc)
    warn(f"error: unexpected {type(exc).__name__}: {exc} (run with --verbose for the traceback)")
    return typer.Exit(EXIT_SOME_FAILED)


# --- optional extras ---------------------------------------------------------------------------------------

# Each optional extra of pyproject.toml and the top-level modules it brings. A command that needs one says so
# up front (`needs_extra`); a module of an extra that is missing later (a lazy import) gets the same line.
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn"),
    "mcp": ("mcp",),
    "finetune": ("peft",),
    "ray": ("ray",),
}
# Modules that come with an extra's packages (their dependencies): one of them missing means that extra too.
BROUGHT_BY: dict[str, str] = {
    "starlette": "serve",
    "multipart": "serve",
    "python_multipart": "serve",
    "mcp_types": "mcp",
}


def needs_extra(extra: str) -> None:
    """Raise ModuleNotFoundError (which `user_errors` turns into its one line) unless the extra's modules are
    installed; the check imports nothing, so it costs nothing before the real work."""
    import importlib.util

    for module in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def option_given(name: str, environment: bool = True) -> bool:
    """Whether the running command's option `name` was given on the command line (or, with `environment`, by
    its environment variable), rather than left at its default."""
    from typer._click.globals import get_current_context

    context = get_current_context(silent=True)
    source = context.get_parameter_source(name) if context is not None else None
    return source is not None and source.name in (("COMMANDLINE", "ENVIRONMENT") if environment else ("COMMANDLINE",))


def adapter_base(model: str, adapter: Any) -> str:
    """The --model a command loads: with --adapter and no --model given, the base the adapter was trained on
    (its training_args.json or adapter_config.json); a --model given that is another base is one line naming
    both. Needs the finetune extra, as every use of an adapter does."""
    if adapter is None:
        return model
    needs_extra("finetune")
    from monkey_cli.finetune.adapters import adapter_model

    return adapter_model(str(adapter), model if option_given("model") else None)


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The extra whose module `exc` failed to import, or None when the module belongs to no extra (a broken
    installation, a bug: not the user's to fix with pip)."""
    top = (getattr(exc, "name", None) or "").split(".")[0]
    return next((extra for extra, modules in EXTRAS.items() if top in modules), BROUGHT_BY.get(top))


def _command_name() -> str:
    """`monkey serve`, `monkey eval run`: the command being run, as typed."""
    from typer._click.globals import get_current_context

    context = get_current_context(silent=True)
    return context.command_path if context is not None else "monkey"


# --- what libraries may print ------------------------------------------------------------------------------


class _StderrLines(logging.Handler):
    """Log records as one stderr line each (`sys.stderr` looked up per line, so progress bars and test
    runners that swap it see them); other libraries' records only when `verbose`."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.verbose = False

    def emit(self, record: logging.LogRecord) -> None:
        own = record.name == OWN_LOGGER or record.name.startswith(OWN_LOGGER + ".")
        if not own and not (self.verbose and record.levelno >= logging.WARNING):
            return
        from monkey_cli.api import CLI_WORDS  # light: the API module imports torch only when a model loads

        # The library's own decisions come with their command-line spelling: a CLI speaks in flags.
        message = (getattr(record, CLI_WORDS, None) or record.getMessage()).strip().splitlines()
        prefix = "" if own and record.levelno < logging.ERROR else f"{record.levelname.lower()}: "
        warn(prefix + (message[0] if message else record.name))


_HANDLER = _StderrLines()


def route_library_output(verbose: bool) -> None:
    """monkey-cli's notes (`logging.getLogger("monkey_cli")`, its warning categories) always reach stderr as
    one line; bitsandbytes' "Failed to load CPU gemm_4bit_forward ...", transformers' advice and the like
    only with --verbose."""
    _HANDLER.verbose = verbose
    root = logging.getLogger()
    if _HANDLER not in root.handlers:
        root.addHandler(_HANDLER)
    logging.getLogger(OWN_LOGGER).setLevel(logging.INFO)
    if not verbose:
        # transformers and huggingface_hub print through handlers of their own, configured from these
        # variables when they are first imported (which happens later, inside the commands).
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.showwarning = _show_warning if not verbose else _show_every_warning


def _is_own_warning(category: type[Warning], filename: str) -> bool:
    own_folder = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return category.__module__.startswith(OWN_LOGGER) or os.path.abspath(filename).startswith(own_folder)


def _show_warning(message: Any, category: type[Warning], filename: str, lineno: int, file=None, line=None) -> None:  # noqa: ANN001
    if _is_own_warning(category, filename):
        warn(f"warning: {message}")


def _show_every_warning(
    message: Any, category: type[Warning], filename: str, lineno: int, file=None, line=None  # noqa: ANN001
) -> None:
    warn(f"warning: {message}" if _is_own_warning(category, filename) else f"warning: {message} ({filename}:{lineno})")


# --- the command class -------------------------------------------------------------------------------------


class _OneLineUsageError(typer.BadParameter):
    """A usage error shown as `error: ...` on one line (exit code 2), like every other error of the CLI."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def format_message(self) -> str:
        return self.text

    def show(self, file: Any = None) -> None:
        warn(f"error: {self.text}")


class Command(TyperCommand):
    """A typer command whose help reads well and whose usage errors are one line."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except NoArgsIsHelpError:
            raise
        except typer.BadParameter as exc:
            raise _OneLineUsageError(_bad_value(exc, ctx)) from None
        except ClickUsageError as exc:
            raise _OneLineUsageError(f"{exc.format_message()} (see {ctx.command_path} --help)") from None

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = _argument_name(param)
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        panels: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            name, help_text = record
            if param.param_type_name == "argument":
                name = _argument_name(param)
            panel = getattr(param, "rich_help_panel", None) or "Options"
            panels.setdefault(panel, []).append((name, help_text))
        for panel in sorted(panels, key=lambda name: PANEL_ORDER.index(name) if name in PANEL_ORDER else 99):
            with formatter.section(panel):
                formatter.write_dl(panels[panel])


PANEL_ORDER = ("Input", "Prompt", "Model", "Output")


def _argument_name(param: Any) -> str:
    name = param.metavar or param.name.upper()
    return name if param.nargs == 1 or name.endswith("...") else f"{name}..."


def _bad_value(exc: Any, ctx: Any) -> str:
    """`--dtype must be one of ...; got 'fp8'`, naming the environment variable the value came from."""
    param = getattr(exc, "param", None)
    if param is None or not exc.message:  # a missing argument or option: click's sentence says it
        return exc.format_message()
    name = param.opts[0] if param.param_type_name == "option" else _argument_name(param)
    source = ctx.get_parameter_source(param.name) if param.name else None
    if source is not None and source.name == "ENVIRONMENT" and param.envvar:
        name = f"{name} (from ${param.envvar})"
    from monkey_cli.cli.options import Sentence

    return f"{name}: {exc.message}" if isinstance(exc, Sentence) else f"{name} {exc.message}"


# With --server, the server's own settings decide these (it was started with them): given on the command line
# they are a usage error (from an environment variable they are left to the server, unused).
SERVER_SIDE = {
    "family": "--family", "quant": "--quant", "quant_vision": "--quant-vision", "device": "--device",
    "dtype": "--dtype", "adapter": "--adapter", "compile": "--compile/--no-compile", "batch_size": "--batch-size",
    "prompt_style": "--prompt-style", "render_timeout": "--render-timeout", "workers": "--workers", "ray": "--ray",
}  # fmt: skip
# ... and these a server does not do: it answers with its own prompts, at its model's page size, no positions.
LOCAL_ONLY = {"size": "--size", "prompt": "--prompt", "overlay": "--overlay"}


def refuse_local_options(positions: bool = False) -> None:
    """With --server: a model option given on the command line is the server's to decide, and what a server
    does not do is refused, each in one line before any work."""
    from monkey_cli.errors import UsageError

    for name, flag in SERVER_SIDE.items():
        if option_given(name, environment=False):
            raise UsageError(f"{flag} is the server's with --server (set it when starting `monkey serve`): drop it, "
                             "or run without --server")  # fmt: skip
    for name, flag in LOCAL_ONLY.items():
        if option_given(name, environment=False):
            raise UsageError(f"{flag}: not available with --server (the server uses its own prompts, at its model's "
                             "page size); run without --server")  # fmt: skip
    if positions:
        raise UsageError("text positions (spot, read --positions, ask --ground) are not available with --server; "
                         "run without --server")  # fmt: skip


def model_options(
    model: str,
    *,
    device: str,
    dtype: str,
    quant: str,
    quant_vision: bool,
    prompt_style: str,
    compile: bool | None,
    adapter: Any,
) -> Any:
    """The `pipeline.ModelOptions` of the model options every model command shares (one line for a bad pair)."""
    from monkey_cli.errors import UsageError
    from monkey_cli.pipeline import ModelOptions

    if quant_vision and quant == "none":
        raise UsageError("--quant-vision needs --quant auto, 8bit or 4bit")
    return ModelOptions(
        source=model,
        device=device,
        dtype=None if dtype == "auto" else dtype,
        quant=quant,
        quant_vision=quant_vision,
        prompt_style=prompt_style,
        compile=compile,
        adapter=None if adapter is None else str(adapter),
    )

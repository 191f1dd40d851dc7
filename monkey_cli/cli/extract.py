"""`monkey extract`: parse, call `monkey_cli.extract.run.run`, print one record per document.

stdout carries results only (json, jsonl or csv); errors, progress and the summary go to stderr.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import typer

from monkey_cli.cli import app
from monkey_cli.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    Command,
    adapter_base,
    model_options,
    option_given,
    refuse_local_options,
    user_errors,
    warn,
)
from monkey_cli.cli.options import (
    Adapter,
    AllPages,
    BatchSize,
    Compile,
    Device,
    Dtype,
    ExtractFormat,
    FieldsFile,
    FieldSpecs,
    Inputs,
    MaxNewTokens,
    MinConfidence,
    Model,
    NullProbability,
    Out,
    Overwrite,
    Pages,
    Password,
    PromptStyle,
    Quant,
    QuantVision,
    RetryFailed,
    SchemaFile,
    Server,
    Size,
    Verbose,
)
from monkey_cli.tasks import DEFAULT_MODEL


@app.command(cls=Command)
def extract(
    inputs: Inputs,
    schema: SchemaFile = None,
    fields_file: FieldsFile = None,
    field: FieldSpecs = None,
    pages: Pages = None,
    size: Size = None,
    password: Password = None,
    prompt_style: PromptStyle = "auto",
    model: Model = DEFAULT_MODEL,
    quant: Quant = "auto",
    quant_vision: QuantVision = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    adapter: Adapter = None,
    compile: Compile = None,
    max_new_tokens: MaxNewTokens = 64,
    batch_size: BatchSize = 4,
    fmt: ExtractFormat = "json",
    out: Out = None,
    overwrite: Overwrite = False,
    retry_failed: RetryFailed = False,
    all_pages: AllPages = False,
    min_confidence: MinConfidence = None,
    null_probability: NullProbability = True,
    server: Server = None,
    verbose: Verbose = False,
) -> None:
    """Extract fields from each document as validated values with confidence: monkey extract invoice.pdf
    --field 'total:number=What is the total amount due?' (one record per document)."""
    with user_errors(verbose):
        from monkey_cli.errors import UsageError
        from monkey_cli.extract import ExtractOptions
        from monkey_cli.extract.run import ExtractRunOptions

        server = server or None
        if server is not None:
            refuse_local_options()
        else:
            model = adapter_base(model, adapter)  # --adapter alone: the base it was trained on
        if max_new_tokens < 2:
            raise UsageError(f"--max-new-tokens must be at least 2 for extract; got {max_new_tokens}")
        extract_schema = _schema(schema, fields_file, field or [], fmt)
        options = ExtractRunOptions(
            inputs=tuple(inputs),
            schema=extract_schema,
            model=model_options(model, device=device, dtype=dtype, quant=quant, quant_vision=quant_vision,
                                prompt_style=prompt_style, compile=compile, adapter=adapter),  # fmt: skip
            extract=ExtractOptions(
                max_new_tokens=max_new_tokens,
                min_confidence=min_confidence,
                all_pages=all_pages,
                null_probability=null_probability,
                batch_size=batch_size,
            ),
            pages=pages,
            password=password,
            size=size,
            out_dir=out,
            fmt=fmt,
            overwrite=overwrite,
            retry_failed=retry_failed,
        )
        remote = None
        if server is not None:
            remote = (server, model if option_given("model", False) else None, option_given("max_new_tokens", False))
        _execute(options, remote)


def _schema(schema: Path | None, fields_file: Path | None, specs: list[str], fmt: str) -> Any:
    """The fields from --schema, --fields and --field, in that order (names must differ)."""
    from monkey_cli.errors import UsageError
    from monkey_cli.extract import from_short_forms, read_fields_file, read_schema_file
    from monkey_cli.extract.results import CSV_COLUMNS, CSV_TRAILING

    parts = []
    if schema is not None:
        parts.append(read_schema_file(schema))
    if fields_file is not None:
        parts.append(read_fields_file(fields_file))
    if specs:
        parts.append(from_short_forms(specs))
    if not parts:
        raise UsageError("extract needs fields: --schema FILE, --fields FILE or --field NAME:TYPE=QUESTION")
    combined = parts[0]
    for part in parts[1:]:
        combined = combined + part
    clash = [name for name in combined.names if name in (*CSV_COLUMNS, *CSV_TRAILING)]
    if fmt == "csv" and clash:
        raise UsageError(f"field {clash[0]!r} would share a CSV column with monkey's own; rename it for -f csv")
    return combined


def _execute(options: Any, remote: tuple[str, str | None, bool] | None) -> None:
    """Run locally, or with `remote` (the server's URL, the --model named, whether --max-new-tokens was given) on
    a running `monkey serve`."""
    from monkey_cli import signals
    from monkey_cli.cli.progress import Progress
    from monkey_cli.extract.results import ExtractionWriter
    from monkey_cli.extract.run import run

    stdout = sys.stdout
    if hasattr(stdout, "reconfigure"):
        stdout.reconfigure(encoding="utf-8", newline="" if options.fmt == "csv" else None)
    progress = Progress(enabled=sys.stderr.isatty())
    writer = None
    if options.out_dir is None:  # with --out, results go to the files only
        writer = ExtractionWriter(progress.guard(stdout), options.fmt, options.schema.names)
    failed = 0

    def on_record(record: Any) -> None:
        nonlocal failed
        if record.error is not None:
            failed += 1
            warn(f"error: {record.source}: {record.error}")
        progress.document_done(record.source)
        if writer is not None:
            writer.write(record)

    stdin = sys.stdin.buffer if "-" in options.inputs else None
    try:
        with progress:
            callbacks = dict(on_record=on_record, on_start=progress.start, on_stage=progress.stage,
                             on_page=progress.page_done, stdin=stdin)  # fmt: skip
            summary = run(options, **callbacks) if remote is None else _run_remote(options, remote, callbacks)
    except BrokenPipeError:  # `monkey extract ... | head`: the reader left
        sys.stderr.close()
        raise typer.Exit(EXIT_OK) from None
    except BaseException as exc:  # Ctrl-C, SIGTERM or SIGHUP: keep what is finished
        if not signals.caused(exc):
            raise
        with contextlib.suppress(OSError):
            if writer is not None:
                writer.close()
            warn("interrupted: the records finished so far were written")
        raise typer.Exit(signals.exit_code(EXIT_INTERRUPTED)) from None
    if writer is not None:
        writer.close()
    warn(summary.line())
    if failed:
        raise typer.Exit(EXIT_SOME_FAILED)


def _run_remote(options: Any, remote: tuple[str, str | None, bool], callbacks: dict[str, Any]) -> Any:
    import os

    from monkey_cli.remote import Server
    from monkey_cli.remote.extract import run

    url, model, say_cap = remote
    with Server(url, api_key=os.environ.get("MONKEY_API_KEY") or None) as server:
        return run(options, server, model=model, say_cap=say_cap, **callbacks)

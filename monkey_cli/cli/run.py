"""`monkey ask`, `monkey caption`, `monkey read`: parse, call `monkey_cli.pipeline.run`, print.

stdout carries results only (text, json, jsonl or md); errors, progress and the summary go to stderr.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import typer

from monkey_cli.cli import app
from monkey_cli.cli.common import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED, user_errors, warn
from monkey_cli.tasks import DEFAULT_MODEL

FORMATS = ("text", "json", "jsonl", "md")

# --- options every command shares (typer has no option groups: these are reused as defaults) -------------
INPUTS = typer.Argument(..., help="Files, folders, globs, or '-' for paths (or one document's bytes) on stdin.")
PAGES = typer.Option(None, "--pages", help="Pages to use, e.g. '1-3,7,-1' (1-based; -1 is the last page).")
MODEL = typer.Option(DEFAULT_MODEL, "--model", envvar="MONKEY_MODEL", help="Checkpoint folder or Hugging Face hub id.")
QUANT = typer.Option(
    "auto", "--quant", envvar="MONKEY_QUANT", help="auto (4bit on CUDA, none on CPU), none, 8bit or 4bit."
)
QUANT_VISION = typer.Option(False, "--quant-vision", help="Quantize the vision tower too (saves ~1.5 GB in 4bit).")
DEVICE = typer.Option("auto", "--device", envvar="MONKEY_DEVICE", help="auto, cpu, cuda or cuda:N.")
DTYPE = typer.Option("auto", "--dtype", help="auto, bfloat16, float16 or float32.")
MAX_NEW_TOKENS = typer.Option(512, "--max-new-tokens", min=1, help="Longest answer, in tokens.")
BATCH_SIZE = typer.Option(4, "--batch-size", min=1, help="Pages (and questions) per model batch.")
FORMAT = typer.Option("text", "--format", "-f", help="text, json, jsonl or md.")
OUT = typer.Option(None, "--out", "-o", help="Write one file per input document here (mirrors the input tree).")
OVERWRITE = typer.Option(
    False, "--overwrite", help="Redo every document, and replace files in --out that monkey did not write."
)
RETRY_FAILED = typer.Option(
    False, "--retry-failed", help="Redo documents that failed for good with the same settings in an earlier run."
)
PROMPT = typer.Option(None, "--prompt", help="Prompt template overriding the task's ('{question}' is filled in).")
PASSWORD = typer.Option(None, "--password", help="Password for encrypted PDFs.")
VERBOSE = typer.Option(False, "--verbose", "-v", help="Show tracebacks for errors.")


@app.command()
def ask(
    inputs: list[str] = INPUTS,
    question: list[str] = typer.Option(None, "--question", "-q", help="A question (repeat for several)."),
    questions_file: Path = typer.Option(None, "--questions", help="A file with one question per line."),
    pages: str = PAGES,
    model: str = MODEL,
    quant: str = QUANT,
    quant_vision: bool = QUANT_VISION,
    device: str = DEVICE,
    dtype: str = DTYPE,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = BATCH_SIZE,
    fmt: str = FORMAT,
    out: Path = OUT,
    overwrite: bool = OVERWRITE,
    retry_failed: bool = RETRY_FAILED,
    prompt: str = PROMPT,
    password: str = PASSWORD,
    verbose: bool = VERBOSE,
) -> None:
    """Answer questions about each page: monkey ask invoice.pdf -q "What is the total?"."""
    with user_errors(verbose):
        questions = _questions(question or [], questions_file)
        _run("ask", locals(), questions=questions)


@app.command()
def caption(
    inputs: list[str] = INPUTS,
    pages: str = PAGES,
    model: str = MODEL,
    quant: str = QUANT,
    quant_vision: bool = QUANT_VISION,
    device: str = DEVICE,
    dtype: str = DTYPE,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = BATCH_SIZE,
    fmt: str = FORMAT,
    out: Path = OUT,
    overwrite: bool = OVERWRITE,
    retry_failed: bool = RETRY_FAILED,
    prompt: str = PROMPT,
    password: str = PASSWORD,
    verbose: bool = VERBOSE,
) -> None:
    """Describe each page or photo in detail."""
    with user_errors(verbose):
        _run("caption", locals())


@app.command()
def read(
    inputs: list[str] = INPUTS,
    force_ocr: bool = typer.Option(False, "--force-ocr", help="Use the model even where a PDF has a text layer."),
    pages: str = PAGES,
    model: str = MODEL,
    quant: str = QUANT,
    quant_vision: bool = QUANT_VISION,
    device: str = DEVICE,
    dtype: str = DTYPE,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = BATCH_SIZE,
    fmt: str = FORMAT,
    out: Path = OUT,
    overwrite: bool = OVERWRITE,
    retry_failed: bool = RETRY_FAILED,
    prompt: str = PROMPT,
    password: str = PASSWORD,
    verbose: bool = VERBOSE,
) -> None:
    """Extract the text of each page (a PDF's own text layer when it has one, unless --force-ocr)."""
    with user_errors(verbose):
        _run("read", locals(), force_ocr=force_ocr)


def _questions(flags: list[str], questions_file: Path | None) -> list[str]:
    from monkey_cli.errors import UsageError

    questions = [q for q in flags if q.strip()]
    if questions_file is not None:
        try:
            lines = questions_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{questions_file}: cannot read questions ({exc})") from None
        questions += [line.strip() for line in lines if line.strip()]
    if not questions:
        raise UsageError("ask needs at least one question (-q QUESTION or --questions FILE)")
    return questions


def _run(task: str, args: dict, questions: list[str] | None = None, force_ocr: bool = False) -> None:
    from monkey_cli.engine import Job
    from monkey_cli.errors import UsageError
    from monkey_cli.pipeline import ModelOptions, RunOptions

    fmt = args["fmt"]
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    options = RunOptions(
        inputs=tuple(args["inputs"]),
        job=Job(
            task=task,
            questions=tuple(questions or ()),
            template=args["prompt"],
            max_new_tokens=args["max_new_tokens"],
            batch_size=args["batch_size"],
            force_ocr=force_ocr,
        ),
        model=ModelOptions(
            source=args["model"],
            device=args["device"],
            dtype=None if args["dtype"] == "auto" else args["dtype"],
            quant=args["quant"],
            quant_vision=args["quant_vision"],
        ),
        pages=args["pages"],
        password=args["password"],
        out_dir=args["out"],
        fmt=fmt,
        overwrite=args["overwrite"],
        retry_failed=args["retry_failed"],
    )
    _execute(options)


def _execute(options) -> None:
    from monkey_cli import signals
    from monkey_cli.cli.progress import Progress
    from monkey_cli.output import make_writer
    from monkey_cli.pipeline import run

    stdout = sys.stdout
    if hasattr(stdout, "reconfigure"):
        stdout.reconfigure(encoding="utf-8")  # answers can be any script; never crash on a non-UTF-8 console
    to_stdout = options.out_dir is None
    single = _single_page(options)
    streaming = to_stdout and options.fmt == "text" and stdout.isatty() and single
    writer = make_writer(options.fmt, stdout, multi=not single, show_prompt=len(options.job.questions) > 1)
    progress = Progress(enabled=sys.stderr.isatty() and not streaming)
    failed = 0

    def on_record(record) -> None:
        nonlocal failed
        if record.error is not None:
            failed += 1
            warn(f"error: {record.location}: {record.error}")
        progress.page_done()
        if to_stdout and not (streaming and record.answer_source == "model"):
            writer.write(record)

    stdin = sys.stdin.buffer if "-" in options.inputs else None
    try:
        with progress:
            summary = run(
                options,
                on_record=on_record,
                on_document=progress.document_done,
                stdin=stdin,
                streamer_factory=_stdout_streamer if streaming else None,
            )
    except BrokenPipeError:  # `monkey ... | head`: the reader left; not an error worth a traceback
        sys.stderr.close()
        raise typer.Exit(EXIT_OK) from None
    except BaseException as exc:  # Ctrl-C, SIGTERM or SIGHUP (monkey_cli.signals): keep what is finished
        if not signals.caused(exc):
            raise
        _interrupted(writer, options)
    writer.close()
    warn(summary.line())
    if failed:
        raise typer.Exit(EXIT_SOME_FAILED)


def _interrupted(writer, options) -> None:
    from monkey_cli import signals

    with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
        writer.close()
        if options.out_dir is not None:
            warn("interrupted: finished documents are saved; run the same command again to do the rest")
        else:
            warn("interrupted: the results finished so far were written")
    raise typer.Exit(signals.exit_code(EXIT_INTERRUPTED)) from None


def _single_page(options) -> bool:
    """Stream tokens only when the whole run is one image (or one selected page) and one prompt."""
    inputs = options.inputs
    if len(inputs) != 1 or inputs[0] == "-" or len(options.job.questions) > 1:
        return False
    path = Path(inputs[0])
    if not path.is_file():
        return False
    if options.pages is not None and options.pages.strip().lstrip("-").isdigit():
        return True
    with path.open("rb") as handle:
        if not handle.read(1024).lstrip().startswith(b"%PDF"):
            return True
    import pymupdf

    try:
        with pymupdf.open(path) as pdf:
            return pdf.page_count == 1
    except Exception:  # a damaged PDF: documents.py reports it; here it only means "not known to be one page"
        return False


def _stdout_streamer(tokenizer):
    from transformers import TextStreamer

    from monkey_cli.printing import terminal_text

    class TerminalStreamer(TextStreamer):
        """Tokens as they come, with control characters made visible like every other answer."""

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            super().on_finalized_text(terminal_text(text), stream_end)

    return TerminalStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

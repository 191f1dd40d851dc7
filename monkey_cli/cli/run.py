"""`monkey ask`, `monkey caption`, `monkey read`, `monkey spot`: parse, call `monkey_cli.pipeline.run`, print.

stdout carries results only (text, json, jsonl or md); errors, progress and the summary go to stderr.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from monkey_cli.cli import app
from monkey_cli.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    Command,
    adapter_base,
    needs_extra,
    option_given,
    refuse_local_options,
    user_errors,
    warn,
)
from monkey_cli.cli.options import (
    INPUT,
    POSITION_FORMATS,
    PROMPT,
    Adapter,
    BatchSize,
    Compile,
    Device,
    Dtype,
    Family,
    Format,
    Inputs,
    MaxNewTokens,
    Model,
    Out,
    Overlay,
    Overwrite,
    Pages,
    Password,
    Prompt,
    PromptStyle,
    Quant,
    QuantVision,
    Questions,
    QuestionsFile,
    Ray,
    RenderTimeout,
    RetryFailed,
    Server,
    Size,
    Verbose,
    Workers,
    bare_ray_flag,
)
from monkey_cli.documents.renderer import DEFAULT_RENDER_TIMEOUT
from monkey_cli.tasks import DEFAULT_MODEL

# A questions file is read line by line with these limits (a question longer than the model's context is
# refused later anyway; these keep a wrong file, say a video, from filling memory first).
MAX_QUESTION_BYTES = 64 * 1024
MAX_QUESTIONS_FILE_BYTES = 16 * 2**20

ForceOcr = Annotated[
    bool,
    typer.Option("--force-ocr", rich_help_panel=INPUT, help="Use the model even where a PDF has a text layer."),
]
Positions = Annotated[
    bool,
    typer.Option(
        "--positions", rich_help_panel=PROMPT,
        help="Read with text positions (TextMonkey): the same as `monkey spot` (implies --force-ocr).",
    ),
]  # fmt: skip
Ground = Annotated[
    bool,
    typer.Option(
        "--ground", rich_help_panel=PROMPT,
        help="Ask for where on the page each answer was read too (TextMonkey): records get `spans`.",
    ),
]  # fmt: skip


def _document_options(
    pages: Pages = None,
    size: Size = None,
    password: Password = None,
    render_timeout: RenderTimeout = DEFAULT_RENDER_TIMEOUT,
    prompt: Prompt = None,
    prompt_style: PromptStyle = "auto",
    model: Model = DEFAULT_MODEL,
    family: Family = "auto",
    quant: Quant = "auto",
    quant_vision: QuantVision = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    adapter: Adapter = None,
    compile: Compile = None,
    max_new_tokens: MaxNewTokens = 512,
    batch_size: BatchSize = 4,
    fmt: Format = "text",
    out: Out = None,
    overlay: Overlay = None,
    overwrite: Overwrite = False,
    retry_failed: RetryFailed = False,
    verbose: Verbose = False,
    workers: Workers = "auto",
    ray: Ray = None,
    server: Server = None,
) -> None:
    """The options ask, caption, read and spot share: only its signature is used (see `_with_document_options`)."""


class _RunCommand(Command):
    """A command with the shared options, `--ray` among them (which may come without its address)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, bare_ray_flag(args))


def _with_document_options(command: Callable[..., None]) -> Callable[..., None]:
    """`command(its own parameters, **options)` gets `_document_options`' parameters as its own (typer reads
    the signature), so the three commands declare the shared options once."""
    own = inspect.signature(command, eval_str=True).parameters.values()
    shared = inspect.signature(_document_options, eval_str=True).parameters.values()
    command.__signature__ = inspect.Signature([p for p in own if p.kind is not p.VAR_KEYWORD] + list(shared))
    return command


@app.command(cls=_RunCommand)
@_with_document_options
def ask(
    inputs: Inputs,
    question: Questions = None,
    questions_file: QuestionsFile = None,
    ground: Ground = False,
    **options: Any,
) -> None:
    """Answer questions about each page: monkey ask invoice.pdf -q "What is the total?"."""
    with user_errors(options["verbose"]):
        questions = _questions(question or [], questions_file)
        _run("ask", inputs, options, questions=questions, positions=ground)


@app.command(cls=_RunCommand)
@_with_document_options
def caption(inputs: Inputs, **options: Any) -> None:
    """Describe each page or photo in detail (in the form the checkpoint was trained on)."""
    with user_errors(options["verbose"]):
        _run("caption", inputs, options)


@app.command(cls=_RunCommand)
@_with_document_options
def read(inputs: Inputs, force_ocr: ForceOcr = False, positions: Positions = False, **options: Any) -> None:
    """Extract the text of each page (a PDF's own text layer when it has one, unless --force-ocr)."""
    with user_errors(options["verbose"]):
        if positions:
            _run("spot", inputs, options, positions=True)
        else:
            _run("read", inputs, options, force_ocr=force_ocr)


@app.command(cls=_RunCommand)
@_with_document_options
def spot(inputs: Inputs, **options: Any) -> None:
    """Read every text of each page with its position (TextMonkey's text spotting): records get `spans` (page
    pixels and PDF points); -f hocr, -f pdf (a searchable PDF) and --overlay DIR show them."""
    with user_errors(options["verbose"]):
        _run("spot", inputs, options, positions=True)


def _questions(flags: list[str], questions_file: Path | None) -> list[Any]:
    """The -q questions, then the file's lines; a line that cannot be a question (not UTF-8, too long)
    becomes a BadQuestion: it fails with a one-line reason naming the file and line, the others go on."""
    from monkey_cli.errors import UsageError

    questions: list[Any] = [q for q in flags if q.strip()]
    if questions_file is not None:
        questions += _read_questions(questions_file)
    if not questions:
        raise UsageError("ask needs at least one question (-q QUESTION or --questions FILE)")
    return questions


def _read_questions(path: Path) -> list[Any]:
    from monkey_cli.engine import BadQuestion
    from monkey_cli.errors import UsageError

    questions: list[Any] = []
    total = 0
    try:
        with path.open("rb") as handle:
            for number, line in enumerate(_bounded_lines(handle), start=1):
                total += len(line)
                if total > MAX_QUESTIONS_FILE_BYTES:
                    raise UsageError(f"--questions {path}: larger than {MAX_QUESTIONS_FILE_BYTES // 2**20} MiB")
                problem = None
                if len(line) > MAX_QUESTION_BYTES:
                    problem = f"longer than {MAX_QUESTION_BYTES // 1024} KiB"
                    line = line[:200]
                try:
                    text = line.decode("utf-8").strip()
                except UnicodeDecodeError as exc:
                    problem = problem or f"not valid UTF-8 (byte {exc.start + 1})"
                    text = line.decode("utf-8", errors="replace").strip()
                if problem:
                    questions.append(BadQuestion(text, f"{path}:{number}: {problem}"))
                elif text:
                    questions.append(text)
    except OSError as exc:
        raise UsageError(f"--questions {path}: cannot read it ({exc.strerror or exc})") from None
    return questions


def _bounded_lines(handle: Any) -> Any:
    """Lines of a binary file without their line ends; a line over MAX_QUESTION_BYTES is cut just past the
    limit (so `len` shows it) and the rest of it skipped without being held in memory."""
    while True:
        line = handle.readline(MAX_QUESTION_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_QUESTION_BYTES and not line.endswith(b"\n"):
            while (rest := handle.readline(MAX_QUESTION_BYTES)) and not rest.endswith(b"\n"):
                pass
        yield line.rstrip(b"\r\n")


def _run(
    task: str,
    inputs: list[str],
    args: dict[str, Any],
    questions: list[Any] | None = None,
    force_ocr: bool = False,
    positions: bool = False,
) -> None:
    from monkey_cli.distributed import ScaleOptions
    from monkey_cli.engine import Job
    from monkey_cli.errors import UsageError
    from monkey_cli.pipeline import ModelOptions, RunOptions

    server = args["server"] or None
    if server is not None:
        refuse_local_options(positions)
    if args["quant_vision"] and args["quant"] == "none":
        raise UsageError("--quant-vision needs --quant auto, 8bit or 4bit")
    if args["ray"] is not None and server is None:
        needs_extra("ray")
    if server is None:
        args["model"] = adapter_base(args["model"], args["adapter"])
    if not positions and (args["fmt"] in POSITION_FORMATS or args["overlay"] is not None):
        what = "--overlay" if args["overlay"] is not None else f"--format {args['fmt']}"
        raise UsageError(f"{what} shows text positions: use spot, read --positions or ask --ground")
    if args["fmt"] == "pdf" and args["out"] is None:
        raise UsageError("--format pdf writes one searchable PDF per document: give --out DIR")
    options = RunOptions(
        inputs=tuple(inputs),
        job=Job(
            task=task,
            questions=tuple(questions or ()),
            template=args["prompt"],
            max_new_tokens=args["max_new_tokens"],
            batch_size=args["batch_size"],
            force_ocr=force_ocr,
            positions=positions,
        ),
        model=ModelOptions(
            source=args["model"],
            device=args["device"],
            dtype=None if args["dtype"] == "auto" else args["dtype"],
            quant=args["quant"],
            quant_vision=args["quant_vision"],
            prompt_style=args["prompt_style"],
            compile=args["compile"],
            adapter=None if args["adapter"] is None else str(args["adapter"]),
            family=None if args["family"] == "auto" else args["family"],
        ),
        pages=args["pages"],
        password=args["password"],
        size=args["size"],
        out_dir=args["out"],
        fmt=args["fmt"],
        overwrite=args["overwrite"],
        retry_failed=args["retry_failed"],
        overlay_dir=args["overlay"],
    )
    workers = None if args["workers"] == "auto" else int(args["workers"])
    if args["ray"] is not None and args["device"].startswith("cuda:"):
        raise UsageError(f"--device {args['device']} names a GPU of this machine; with --ray use auto, cuda or cpu")
    from monkey_cli.documents.renderer import process_budget

    remote = None
    if server is not None:
        remote = _Remote(server, args["model"] if option_given("model", False) else None,
                         say_cap=option_given("max_new_tokens", False))  # fmt: skip
    with process_budget(args["render_timeout"]):
        _execute(options, ScaleOptions(workers=workers, ray=args["ray"], verbose=args["verbose"]), remote)


class _Remote:
    """Where a --server run sends its documents: the server, and the --model the user named, if any (the
    server's model must be it)."""

    def __init__(self, url: str, model: str | None, say_cap: bool) -> None:
        self.url = url
        self.model = model
        self.say_cap = say_cap  # --max-new-tokens was given: say so if the server gives shorter answers

    def run(self, options: Any, **callbacks: Any) -> Any:
        import os

        from monkey_cli import remote

        with remote.Server(self.url, api_key=os.environ.get("MONKEY_API_KEY") or None) as server:
            return remote.run(options, server, model=self.model, say_cap=self.say_cap, **callbacks)


def _execute(options: Any, scale: Any, remote: _Remote | None = None) -> None:
    import functools

    from monkey_cli import distributed, signals
    from monkey_cli.cli.progress import Progress
    from monkey_cli.output import make_writer
    from monkey_cli.pipeline import run

    single_process = remote is not None or distributed.single_process(scale, options)
    if options.overlay_dir is not None and not single_process:
        from monkey_cli.errors import UsageError

        raise UsageError("--overlay runs in one process: give --workers 1 (and no --ray)")
    stdout = sys.stdout
    if hasattr(stdout, "reconfigure"):
        stdout.reconfigure(encoding="utf-8")  # answers can be any script; never crash on a non-UTF-8 console
    to_stdout = options.out_dir is None  # with --out, results go to the files only, whatever the format
    single = _single_page(options)
    # A positions answer is shown once its markup is read, not as raw tokens.
    streaming = to_stdout and options.fmt == "text" and stdout.isatty() and single and single_process
    streaming = streaming and not options.job.positions and remote is None
    progress = Progress(enabled=sys.stderr.isatty())
    writer = None
    if to_stdout:
        multi, show_prompt = not single, len(options.job.questions) > 1
        writer = make_writer(options.fmt, progress.guard(stdout), multi=multi, show_prompt=show_prompt)
    failed = 0
    pages_seen: set[tuple[str, int]] = set()
    streamed: list[str] = []  # what the token stream printed of the (single) answer

    def on_record(record: Any) -> None:
        nonlocal failed
        if record.error is not None:
            failed += 1
            warn(f"error: {record.location}: {record.error}")
        if single_process and record.page is not None and (record.source, record.page) not in pages_seen:
            pages_seen.add((record.source, record.page))  # (workers count pages as they come: on_page)
            progress.page_done(record.pages)
        if streaming and record.answer_source == "model" and streamed:
            stdout.write("\n")  # the answer is on the terminal already: end its line
            stdout.flush()
        elif writer is not None:
            writer.write(record)

    def streamer(tokenizer: Any, *_page_and_prompt: Any) -> Any:  # one page, one prompt: nothing to tell apart
        progress.stop()  # the answer's tokens take the terminal from here on
        return _stdout_streamer(tokenizer, streamed)

    stdin = sys.stdin.buffer if "-" in options.inputs else None
    runner = (
        remote.run
        if remote is not None
        else functools.partial(run, streamer_factory=streamer if streaming else None)
        if single_process
        else functools.partial(distributed.run, scale=scale, on_page=progress.page_done)
    )
    try:
        with progress:
            summary = runner(
                options,
                on_record=on_record,
                on_document=progress.document_done,
                on_start=progress.start,
                on_stage=progress.stage,
                stdin=stdin,
            )
    except BrokenPipeError:  # `monkey ... | head`: the reader left; not an error worth a traceback
        sys.stderr.close()
        raise typer.Exit(EXIT_OK) from None
    except BaseException as exc:  # Ctrl-C, SIGTERM or SIGHUP (monkey_cli.signals): keep what is finished
        if not signals.caused(exc):
            raise
        _interrupted(writer, options)
    if writer is not None:
        writer.close()
    warn(summary.line(options.out_dir))
    if failed:
        raise typer.Exit(EXIT_SOME_FAILED)


def _interrupted(writer: Any, options: Any) -> None:
    from monkey_cli import signals

    with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
        if writer is not None:
            writer.close()
        if options.out_dir is not None:
            warn("interrupted: finished documents are saved; run the same command again to do the rest")
        else:
            warn("interrupted: the results finished so far were written")
    raise typer.Exit(signals.exit_code(EXIT_INTERRUPTED)) from None


def _single_page(options: Any) -> bool:
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


def _stdout_streamer(tokenizer: Any, printed: list[str]) -> Any:
    """Print an answer's text to stdout as its tokens are decoded, keeping what was printed in `printed`."""
    from monkey_cli.engine.streaming import IncrementalDecoder
    from monkey_cli.printing import terminal_text

    decoder = IncrementalDecoder(tokenizer)

    def on_token(token: int) -> None:
        piece = decoder.push(token)
        if piece:
            printed.append(piece)
            sys.stdout.write(terminal_text(piece))  # control characters made visible, like every answer
            sys.stdout.flush()

    return on_token

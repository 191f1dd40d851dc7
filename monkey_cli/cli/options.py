"""The options the commands share, each defined once (typer `Annotated` aliases), with their checks.

A command declares `model: Model = DEFAULT_MODEL` and gets the same flag names, short flags, environment
variable, help panel, metavar and validation as every other command taking that option. Values are
checked while the command line is parsed (see `common.Command`): nothing heavy is imported to do it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from monkey_cli.errors import UsageError
from monkey_cli.model.families import FAMILY_CHOICES
from monkey_cli.tasks import PROMPT_STYLES

INPUT, PROMPT, MODEL, OUTPUT, SCALE = "Input", "Prompt", "Model", "Output", "Scale"

FORMATS = ("text", "json", "jsonl", "md", "hocr", "pdf")
POSITION_FORMATS = ("hocr", "pdf")  # need text positions: spot, read --positions, ask --ground
EXTRACT_FORMATS = ("json", "jsonl", "csv")
QUANTS = ("auto", "none", "8bit", "4bit")
DTYPES = ("auto", "bfloat16", "float16", "float32")
WINDOW = 448  # page sizes are whole numbers of the model's 448-pixel windows
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# What `--ray` takes as its address (anything else after a bare `--ray` is an input): auto, local, or
# [ray://]HOST:PORT (a name, an IPv4 address or a bracketed IPv6 one).
_RAY_ADDRESS = re.compile(r"auto|local|(ray://)?([A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):\d{1,5}")


# --- checks (typer parsers: raise BadParameter with the part after the option's name) ----------------------


def choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(value: str) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise typer.BadParameter(f"must be one of {', '.join(choices)}; got {value!r}")
        return text

    return parse


def positive_int(value: str | int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        number = 0
    if number < 1:
        raise typer.BadParameter(f"must be a positive integer; got {value!r}")
    return number


def device(value: str) -> str:
    text = str(value).strip().lower()
    if not _DEVICE.fullmatch(text):
        raise typer.BadParameter(f"must be auto, cpu, cuda or cuda:N; got {value!r}")
    return text


class Sentence(typer.BadParameter):
    """A bad value whose reason is a sentence of its own: shown after a colon (`--pages: pages are numbered
    from 1`), where the others read on from the option's name (`--dtype must be one of ...`)."""


def pages(value: str) -> str:
    from monkey_cli.documents import parse_pages  # documents imports nothing heavy at module level

    try:
        parse_pages(value)
    except UsageError as exc:
        raise Sentence(str(exc).removeprefix(f"--pages {value!r}: ")) from None
    return value


def size(value: str) -> str:
    from monkey_cli.documents import parse_size

    try:
        height, width = parse_size(value) or (0, 0)
    except UsageError:
        raise typer.BadParameter(f"must be HEIGHTxWIDTH in pixels, e.g. 896x896; got {value!r}") from None
    if height % WINDOW or width % WINDOW:
        raise typer.BadParameter(f"must be multiples of {WINDOW} per side (e.g. 896x1344); got {value!r}")
    return f"{height}x{width}"


def render_seconds(value: str | float) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        number = -1.0
    if not 0 <= number < float("inf"):
        raise typer.BadParameter(f"must be a number of seconds (0: no limit); got {value!r}")
    return number


def workers(value: str) -> str:
    text = str(value).strip().lower()
    if text != "auto":
        try:
            return str(positive_int(text))
        except typer.BadParameter:
            raise typer.BadParameter(f"must be auto or a positive integer; got {value!r}") from None
    return text


def ray_address(value: str) -> str:
    text = str(value).strip()
    if text and not _RAY_ADDRESS.fullmatch(text):
        raise typer.BadParameter(f"must be auto, local or HOST:PORT (or nothing: a local cluster); got {value!r}")
    return text


def bare_ray_flag(args: list[str]) -> list[str]:
    """`--ray` with no address written as `--ray=` (typer options cannot take an optional value): the word
    after `--ray` is its address only when it reads as one, so `--ray docs/` runs docs/ on a local cluster."""
    result = list(args)
    for position, arg in enumerate(result):
        if arg == "--":
            break
        if arg == "--ray":
            following = result[position + 1] if position + 1 < len(result) else None
            if following is None or not _RAY_ADDRESS.fullmatch(following.strip()):
                result[position] = "--ray="
    return result


def probability(value: str) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        number = -1.0
    if not 0 <= number <= 1:  # also refuses NaN
        raise typer.BadParameter(f"must be a number from 0 to 1; got {value!r}")
    return number


def server_url(value: str) -> str:
    """An http(s) URL of a `monkey serve` (its root, or a proxy's prefix); "" runs locally (over $MONKEY_SERVER)."""
    import urllib.parse

    text = str(value).strip()
    if not text:
        return ""
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port  # raises for a port that is no number or out of range
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise typer.BadParameter(f"must be the http:// or https:// URL of a monkey serve, e.g. "
                                 f"http://127.0.0.1:8000; got {value!r}")  # fmt: skip
    if parts.username is not None or parts.password is not None:
        raise Sentence("the API key goes in $MONKEY_API_KEY, never in the URL (it would show in `ps`)")
    if parts.query or parts.fragment:
        raise typer.BadParameter(f"takes no query or fragment; got {value!r}")
    del port
    return text.rstrip("/")


def out_folder(value: str) -> Path:
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise typer.BadParameter(f"must be a folder; {value!r} is a file, not a folder")
    return path


# --- the options ---------------------------------------------------------------------------------------------


def choice_option(*flags: str, choices: tuple[str, ...], panel: str, help: str, envvar: str | None = None) -> Any:
    """An option taking one of `choices`, shown as `a|b|c` and checked while parsing."""
    return typer.Option(
        *flags, envvar=envvar, metavar="|".join(choices), parser=choice(choices), rich_help_panel=panel, help=help
    )


def out_option(help: str) -> Any:
    """--out/-o: a folder (an existing file is a usage error)."""
    return typer.Option("--out", "-o", metavar="DIR", parser=out_folder, rich_help_panel=OUTPUT, help=help)


Inputs = Annotated[
    list[str],
    typer.Argument(
        metavar="INPUT...",
        help="Files, folders, globs, or '-' for paths (or one document's bytes) on stdin.",
        show_default=False,
        rich_help_panel=INPUT,
    ),
]
Pages = Annotated[
    str | None,
    typer.Option(
        "--pages", "-p", metavar="RANGE", parser=pages, rich_help_panel=INPUT,
        help="Pages of every document, e.g. 1-3,7,-1 (1-based; -1 is the last page).",
    ),
]  # fmt: skip
Size = Annotated[
    str | None,
    typer.Option(
        "--size", metavar="HxW", parser=size, rich_help_panel=INPUT,
        help="Size pages are rendered at, height x width in pixels, multiples of 448 (default: the "
        "checkpoint's input size, 896x896 for Monkey; the model resizes other sizes to its own).",
    ),
]  # fmt: skip
Password = Annotated[
    str | None,
    typer.Option(
        "--password", envvar="MONKEY_PDF_PASSWORD", metavar="TEXT", rich_help_panel=INPUT,
        help="Password for encrypted PDFs (the variable keeps it out of the shell history).",
    ),
]  # fmt: skip
RenderTimeout = Annotated[
    float,
    typer.Option(
        "--render-timeout", envvar="MONKEY_RENDER_TIMEOUT", metavar="SECONDS", parser=render_seconds,
        rich_help_panel=INPUT,
        help="Longest one PDF page may take to render (0: no limit); a page over it is an error for that page.",
    ),
]  # fmt: skip

Questions = Annotated[
    list[str] | None,
    typer.Option("--question", "-q", metavar="TEXT", rich_help_panel=PROMPT, help="A question (repeat for several)."),
]
QuestionsFile = Annotated[
    Path | None,
    typer.Option(
        "--questions", metavar="FILE", rich_help_panel=PROMPT,
        help="A file with one question per line (UTF-8; blank lines skipped).",
    ),
]  # fmt: skip
Prompt = Annotated[
    str | None,
    typer.Option(
        "--prompt", metavar="TEMPLATE", rich_help_panel=PROMPT,
        help="Prompt template overriding the task's: '<img></img>' marks the image (else it goes first), "
        "'{question}' is filled in; the rest is plain text to the model.",
    ),
]  # fmt: skip
PromptStyle = Annotated[
    str,
    choice_option(
        "--prompt-style", envvar="MONKEY_PROMPT_STYLE", choices=PROMPT_STYLES, panel=PROMPT,
        help="Monkey-Chat's prompt forms or base Monkey's (they differ for captions); auto: chat when the "
        "checkpoint's name or path contains 'Monkey-Chat', as the original decides.",
    ),
]  # fmt: skip

Model = Annotated[
    str,
    typer.Option(
        "--model", "-m", envvar="MONKEY_MODEL", metavar="PATH|HUB-ID", rich_help_panel=MODEL,
        help="Checkpoint folder or Hugging Face hub id: echo840/Monkey-Chat (full answers) or echo840/Monkey "
        "(short benchmark answers), or a TextMonkey folder (text positions: spot, ask --ground).",
    ),
]  # fmt: skip
Family = Annotated[
    str,
    choice_option(
        "--family", envvar="MONKEY_FAMILY", choices=FAMILY_CHOICES, panel=MODEL,
        help="The checkpoint's model family: auto reads it from its config.json (TextMonkey's has add_window, "
        "use_global and resampler in 'visual'); monkey or textmonkey force it.",
    ),
]  # fmt: skip
Quant = Annotated[
    str,
    choice_option(
        "--quant", envvar="MONKEY_QUANT", choices=QUANTS, panel=MODEL,
        help="auto: the most faithful option that fits in memory (none, then 8bit, then 4bit, then also "
        "--quant-vision), said on stderr; none; 8bit (int8 weight-only); 4bit (NF4).",
    ),
]  # fmt: skip
QuantVision = Annotated[
    bool,
    typer.Option(
        "--quant-vision", rich_help_panel=MODEL,
        help="Quantize the vision tower too (saves ~1.5 GB in 4bit; with auto: only options that do).",
    ),
]  # fmt: skip
Device = Annotated[
    str,
    typer.Option(
        "--device", envvar="MONKEY_DEVICE", metavar="auto|cpu|cuda|cuda:N", parser=device, rich_help_panel=MODEL,
        help="auto: the GPU with the most free memory, else the CPU.",
    ),
]  # fmt: skip
Dtype = Annotated[
    str,
    choice_option(
        "--dtype", envvar="MONKEY_DTYPE", choices=DTYPES, panel=MODEL,
        help="auto: the checkpoint's own precision (config.json's bf16/fp16/fp32 flag: bfloat16 for the "
        "released Monkeys), float16 on a GPU without bfloat16, float32 for a float16 checkpoint on the CPU.",
    ),
]  # fmt: skip
Adapter = Annotated[
    Path | None,
    typer.Option(
        "--adapter", envvar="MONKEY_ADAPTER", metavar="DIR", rich_help_panel=MODEL,
        help="A LoRA adapter from `monkey finetune`, applied on top of --model (resumed runs notice a "
        "changed adapter by its content hash).",
    ),
]  # fmt: skip
Compile = Annotated[
    bool | None,
    typer.Option(
        "--compile/--no-compile", envvar="MONKEY_COMPILE", rich_help_panel=MODEL,
        show_default="on CUDA for large jobs",
        help="Compile the decode step with torch.compile (CUDA graphs on a GPU): much faster steps after a "
        "one-off compilation; both give the same answers. Default: on CUDA when the job is worth it (more "
        "than one round of --batch-size, or 8,192+ answer tokens), off for the CPU.",
    ),
]  # fmt: skip
MaxNewTokens = Annotated[
    int,
    typer.Option("--max-new-tokens", metavar="N", parser=positive_int, rich_help_panel=MODEL,
                 help="Longest answer, in tokens."),
]  # fmt: skip
BatchSize = Annotated[
    int,
    typer.Option(
        "--batch-size", "-b", metavar="N", parser=positive_int, rich_help_panel=MODEL,
        help="Pages (and questions) per model batch; lowered to what fits in memory (said on stderr).",
    ),
]  # fmt: skip

Format = Annotated[
    str,
    choice_option("--format", "-f", choices=FORMATS, panel=OUTPUT,
                  help="Results as text, one JSON document, JSON lines, a Markdown report; with text positions "
                  "(spot, read --positions, ask --ground) also hOCR, or a searchable PDF per document (needs --out)."),
]  # fmt: skip
Overlay = Annotated[
    Path | None,
    typer.Option(
        "--overlay", metavar="DIR", parser=out_folder, rich_help_panel=OUTPUT,
        help="Write each page with its text positions drawn and labelled as a PNG here (spot, read --positions, "
        "ask --ground): DIR/<document>/page-001-spots.png.",
    ),
]  # fmt: skip
Out = Annotated[
    Path | None,
    out_option(
        "Write one file per input document here (mirrors the input tree; a rerun resumes); "
        "nothing is printed on stdout then."
    ),
]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite", rich_help_panel=OUTPUT,
        help="Redo every document, and replace files in --out that monkey did not write.",
    ),
]  # fmt: skip
RetryFailed = Annotated[
    bool,
    typer.Option(
        "--retry-failed", rich_help_panel=OUTPUT,
        help="Redo documents that failed for good with the same settings in an earlier run.",
    ),
]  # fmt: skip
Verbose = Annotated[
    bool,
    typer.Option("--verbose", "-v", rich_help_panel=OUTPUT,
                 help="Show third-party warnings, and tracebacks for unexpected errors."),
]  # fmt: skip

Server = Annotated[
    str | None,
    typer.Option(
        "--server", envvar="MONKEY_SERVER", metavar="URL", parser=server_url, rich_help_panel=SCALE,
        show_default=False,
        help="Send the documents to a running `monkey serve` at URL (its model answers, already loaded; the API "
        "key from $MONKEY_API_KEY): the same records, files and exit codes as a local run. --server '' runs "
        "locally.",
    ),
]  # fmt: skip
Workers = Annotated[
    str,
    typer.Option(
        "--workers", envvar="MONKEY_WORKERS", metavar="N|auto", parser=workers, rich_help_panel=SCALE,
        help="Worker processes, each with its own model, sharing the documents: auto is one per visible GPU "
        "(1 on a CPU-only machine, or with --device cpu or cuda:N); on the CPU, N share the cores. With --ray: "
        "the number of model actors (auto: one per GPU in the cluster).",
    ),
]  # fmt: skip
Ray = Annotated[
    str | None,
    typer.Option(
        "--ray", metavar="[ADDRESS]", parser=ray_address, rich_help_panel=SCALE, show_default=False,
        help="Run on a Ray cluster (pip install 'monkey-cli[ray]'): auto (the cluster on this machine), "
        "HOST:PORT or ray://HOST:PORT; bare --ray starts a local one (or joins $RAY_ADDRESS). Inputs, the "
        "model and --out must be on a filesystem every node sees at the same path.",
    ),
]  # fmt: skip

# --- monkey extract ------------------------------------------------------------------------------------------

SchemaFile = Annotated[
    Path | None,
    typer.Option(
        "--schema", "-s", metavar="FILE", rich_help_panel=PROMPT,
        help="A JSON Schema object (JSON or YAML) whose properties are the fields: each property's description "
        "(else its name) is the question, its type (string, number, integer, boolean, date, enum, array of "
        "strings) constrains the answer; a property that is not required, or allows null, may be not found.",
    ),
]  # fmt: skip
FieldsFile = Annotated[
    Path | None,
    typer.Option(
        "--fields", metavar="FILE", rich_help_panel=PROMPT,
        help="A fields file (JSON or YAML): name: \"[TYPE=]QUESTION\" per line, or name: {type, question, "
        "values, required, ...}.",
    ),
]  # fmt: skip
FieldSpecs = Annotated[
    list[str] | None,
    typer.Option(
        "--field", metavar="NAME[:TYPE][=QUESTION]", rich_help_panel=PROMPT,
        help="A field, e.g. 'total:number=What is the total amount due?' (repeat for several). TYPE: string "
        "(default), number, integer, boolean, date, enum(a|b|c), list; a trailing ! (number!) makes it required.",
    ),
]  # fmt: skip
ExtractFormat = Annotated[
    str,
    choice_option("--format", "-f", choices=EXTRACT_FORMATS, panel=OUTPUT,
                  help="One JSON document, a JSON line per document, or CSV (a row per document, a column per "
                  "field)."),
]  # fmt: skip
AllPages = Annotated[
    bool,
    typer.Option("--all-pages", rich_help_panel=OUTPUT,
                 help="Keep every page's answer for every field in the record (under candidates)."),
]  # fmt: skip
MinConfidence = Annotated[
    float | None,
    typer.Option(
        "--min-confidence", metavar="P", parser=probability, rich_help_panel=OUTPUT,
        help="List the fields whose confidence is under P (0..1) in the record's needs_review (exit code 0).",
    ),
]  # fmt: skip
NullProbability = Annotated[
    bool,
    typer.Option(
        "--null-probability/--no-null-probability", rich_help_panel=OUTPUT,
        help="Score \"not found\" on every page where a field may be missing (null_probability): its tokens are "
        "teacher-forced in the field's prefill pass; --no-null-probability leaves it null.",
    ),
]  # fmt: skip

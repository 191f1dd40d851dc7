"""`monkey eval`: run the paper's VQA benchmarks, score prediction files, list the registry.

Thin commands: they parse, call `monkey_cli.evaluation`, and print. Only `eval run` loads the model (and
therefore torch); `eval score` and `eval datasets` never do.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from monkey_cli.cli import app
from monkey_cli.cli.common import EXIT_SOME_FAILED, Command, adapter_base, fail, user_errors, warn
from monkey_cli.cli.options import (
    OUTPUT,
    Adapter,
    BatchSize,
    Compile,
    Device,
    Dtype,
    MaxNewTokens,
    Model,
    Quant,
    Verbose,
    choice_option,
    out_option,
    positive_int,
)
from monkey_cli.errors import UsageError

if TYPE_CHECKING:  # the evaluation modules are imported by the commands that use them
    from monkey_cli.evaluation.datasets import DatasetSpec, EvalTask
    from monkey_cli.evaluation.runner import AnswerModel

eval_app = typer.Typer(
    help="Evaluate on the 14 VQA benchmarks of the Monkey paper, with the original's metrics.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(eval_app, name="eval")

DEFAULT_MODEL = "echo840/Monkey"
METRICS = "anls|relaxed_accuracy|accuracy|vqa_score"
EvalOut = Annotated[Path, out_option("Folder for predictions and results.")]


@eval_app.command("run", cls=Command)
def run_command(
    model: Model = DEFAULT_MODEL,
    data_root: Path | None = typer.Option(
        None, "--data-root", metavar="DIR", help="Folder laid out as the original's data/ (see `monkey eval datasets`)."
    ),
    datasets: list[str] | None = typer.Option(
        None, "--dataset", "-d", metavar="NAME", help="Registry dataset to run (repeatable), or 'all' (the default)."
    ),
    file: Path | None = typer.Option(
        None, "--file", metavar="FILE", help="Run one JSON-lines dataset file instead (needs --metric)."
    ),
    metric: str | None = typer.Option(
        None, "--metric", metavar=METRICS, help="Metric for --file: anls, relaxed_accuracy, accuracy, vqa_score."
    ),
    name: str | None = typer.Option(
        None, "--name", metavar="NAME", help="Name of the --file dataset in outputs (default: its stem)."
    ),
    gqa_postprocess: bool = typer.Option(False, "--gqa-postprocess", help="GQA answer clean-up (--file, accuracy)."),
    annotations: Path | None = typer.Option(
        None, "--annotations", metavar="FILE", help="VQA annotation JSON (--file, vqa_score)."
    ),
    questions: Path | None = typer.Option(
        None, "--questions", metavar="FILE", help="VQA questions JSON (--file, vqa_score)."
    ),
    out: EvalOut = Path("eval-results"),
    batch_size: BatchSize = 1,
    max_new_tokens: MaxNewTokens = None,  # type: ignore[assignment]  # None: each dataset's own length
    prompt: str | None = typer.Option(
        None,
        "--prompt",
        metavar="TEMPLATE",
        help="Prompt template with <img>{image}</img> and {question} (overrides the registry's).",
    ),
    image_root: Path | None = typer.Option(
        None, "--image-root", metavar="DIR", help="Resolve relative image paths against this folder only."
    ),
    limit: int | None = typer.Option(
        None, "--limit", metavar="N", parser=positive_int, help="Only the first N items of each dataset."
    ),
    device: Device = "auto",
    dtype: Dtype = "auto",
    quant: Quant = "auto",
    adapter: Adapter = None,
    compile: Compile = None,
    verbose: Verbose = False,
) -> None:
    """Answer the questions of one or more datasets, save predictions as they come, and score them.

    A rerun with the same --out resumes: question ids already answered are skipped. Answers are at most
    each dataset's own length unless --max-new-tokens says otherwise; the paper's numbers are bf16
    (--quant none, --dtype auto). Exit code 1 when some items could not be answered (see NAME.errors.jsonl).
    """
    with user_errors(verbose):
        model = adapter_base(model, adapter)
        from monkey_cli.evaluation import runner
        from monkey_cli.finetune.adapters import adapter_fingerprint
        from monkey_cli.model.sources import display_name

        if file is not None:
            tasks = [
                _file_task(
                    file,
                    data_root,
                    datasets,
                    metric,
                    name,
                    gqa_postprocess,
                    annotations,
                    questions,
                    prompt=prompt,
                    max_new_tokens=max_new_tokens,
                    image_root=image_root,
                )
            ]
        else:
            _reject_file_options(metric, name, gqa_postprocess, annotations, questions)
            tasks = _registry_tasks(
                data_root, datasets, prompt=prompt, max_new_tokens=max_new_tokens, image_root=image_root
            )
        loaded = _load_model(model, device, dtype, quant, adapter, compile, batch_size)
        runs = runner.run_tasks(
            loaded,
            tasks,
            out,
            batch_size=batch_size,
            limit=limit,
            model_name=display_name(model),
            model_info={
                "device": device,
                "dtype": dtype,
                "quant": getattr(loaded, "quant", quant),
                "adapter": None if adapter is None else str(adapter),
                "adapter_sha256": None if adapter is None else adapter_fingerprint(adapter),
            },
            report=warn,
            show_progress=sys.stderr.isatty(),
        )
        runner.print_results_table(runs)
        for run in runs:
            typer.echo(f"{run.task.name}\t{run.task.metric}\t{_shown(run.score)}")
        failed = sum(run.failed for run in runs)
        if failed:
            warn(f"{failed} item(s) failed; see the *.errors.jsonl files in {out}")
            raise typer.Exit(EXIT_SOME_FAILED)


def _file_task(
    file: Path,
    data_root: Path | None,
    datasets: list[str] | None,
    metric: str | None,
    name: str | None,
    gqa_postprocess: bool,
    annotations: Path | None,
    questions: Path | None,
    **options: Any,
) -> EvalTask:
    from monkey_cli.evaluation.datasets import file_task

    if data_root is not None or datasets:
        raise UsageError("use either --file or --data-root/--dataset, not both")
    if metric is None:
        raise UsageError("--file needs --metric (anls, relaxed_accuracy, accuracy or vqa_score)")
    return file_task(
        file,
        metric,
        name=name,
        gqa_postprocess=gqa_postprocess,
        annotations_file=annotations,
        questions_file=questions,
        **options,
    )


def _reject_file_options(
    metric: str | None, name: str | None, gqa_postprocess: bool, annotations: Path | None, questions: Path | None
) -> None:
    given = {"--metric": metric, "--name": name, "--annotations": annotations, "--questions": questions}
    given["--gqa-postprocess"] = True if gqa_postprocess else None
    for option, value in given.items():
        if value is not None:
            raise UsageError(f"{option} only applies to --file (registry datasets have their own)")


def _registry_tasks(data_root: Path | None, datasets: list[str] | None, **options: Any) -> list[EvalTask]:
    """Tasks for registry datasets; 'all' (the default) means those present under the data root."""
    from monkey_cli.evaluation.datasets import REGISTRY, check_data_root, get_spec, registry_task

    if data_root is None:
        raise UsageError("give --data-root (with --dataset NAME or all) or --file X.jsonl --metric M")
    check_data_root(data_root)
    names = list(datasets or ["all"])
    if any(n.lower() == "all" for n in names):
        if len(names) > 1:
            raise UsageError("--dataset all cannot be combined with dataset names")
        names = [spec.name for spec in REGISTRY.values() if _present(data_root, spec)]
        missing = [spec.name for spec in REGISTRY.values() if spec.name not in names]
        if not names:
            raise UsageError(f"no dataset of the registry found under {data_root} (see `monkey eval datasets`)")
        if missing:
            warn(f"skipping datasets not found under {data_root}: {', '.join(missing)}")
    canonical = dict.fromkeys(get_spec(n).name for n in names)  # in order, each once
    return [registry_task(n, data_root, **options) for n in canonical]


def _present(data_root: Path, spec: DatasetSpec) -> bool:
    return all((data_root / relative).is_file() for relative in spec.files())


def _load_model(
    model: str, device: str, dtype: str, quant: str, adapter: Path | None, compile: bool | None, batch_size: int
) -> AnswerModel:
    from monkey_cli import Monkey

    return Monkey.load(
        model, device=device, dtype=dtype, quant=quant, adapter=adapter, compile=compile, batch_size=batch_size
    )


@eval_app.command("score", cls=Command)
def score_command(
    predictions: Path = typer.Argument(
        ..., metavar="PREDICTIONS", help="Predictions: JSON lines (or one JSON array) with 'answer'."
    ),
    metric: str = typer.Option(..., "--metric", metavar=METRICS, help="How to score the answers."),
    gqa_postprocess: bool = typer.Option(
        False, "--gqa-postprocess", help="Apply the original's GQA answer clean-up before accuracy."
    ),
    annotations: Path | None = typer.Option(
        None, "--annotations", metavar="FILE", help="Official VQA annotation JSON; answers are matched by question_id."
    ),
    questions: Path | None = typer.Option(None, "--questions", metavar="FILE", help="Official VQA questions JSON."),
    output_format: Annotated[
        str, choice_option("--format", "-f", choices=("text", "json"), panel=OUTPUT, help="One line, or JSON.")
    ] = "text",
    verbose: Verbose = False,
) -> None:
    """Score a predictions file without loading a model.

    Each record needs 'answer' and 'annotation' (for vqa_score without --annotations: the human answers),
    or a 'question_id' found in --annotations. Bad records are reported on stderr and exit code is 1.
    """
    with user_errors(verbose):
        from monkey_cli.evaluation.scoring import score_predictions_file
        from monkey_cli.printing import json_text

        report = score_predictions_file(
            predictions,
            metric,
            gqa_postprocess=gqa_postprocess,
            annotations_file=annotations,
            questions_file=questions,
        )
        for error in report.errors:
            warn(str(error))
        result = report.result
        if result.n == 0:
            fail(f"{predictions}: no prediction could be scored", EXIT_SOME_FAILED)
        if output_format == "json":
            payload = {**result.to_dict(), "n_failed": len(report.errors), "predictions": str(predictions)}
            typer.echo(json_text(payload))
        else:
            typer.echo(_score_line(result.metric, result.score, result.n, result.details))
        if report.errors:
            raise typer.Exit(EXIT_SOME_FAILED)


def _score_line(metric: str, score: float, n: int, details: dict[str, Any]) -> str:
    extra = f" (unrounded {details['score_unrounded']!r})" if "score_unrounded" in details else ""
    return f"{metric} {_shown(score)}{extra} over {n} predictions"


SHOWN_DIGITS = 4  # a score on a line: 0.8333, not 0.8333333333333334 (JSON and results.json keep every digit)


def _shown(score: float | None) -> str:
    if score is None or math.isnan(score):
        return "nan"
    return repr(round(score, SHOWN_DIGITS))


@eval_app.command("datasets", cls=Command)
def datasets_command(
    data_root: Path | None = typer.Option(
        None, "--data-root", metavar="DIR", help="Also say which datasets are present here."
    ),
) -> None:
    """List the registry: metric, answer length and files (relative to the data root)."""
    from monkey_cli.evaluation.datasets import REGISTRY

    for spec in REGISTRY.values():
        metric = spec.metric + (" (GQA post-processing)" if spec.gqa_postprocess else "")
        files = ", ".join(spec.files())
        status = ""
        if data_root is not None:
            status = "present\t" if _present(data_root, spec) else "missing\t"
        typer.echo(f"{status}{spec.name}\t{metric}\t{spec.max_new_tokens}\t{files}")

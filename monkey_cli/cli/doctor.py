"""`monkey doctor`: report what this machine can run (versions, devices, quantization, cached models)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from monkey_cli.cli import app
from monkey_cli.cli.common import Command, user_errors
from monkey_cli.cli.options import (
    MODEL,
    OUTPUT,
    Compile,
    Device,
    Dtype,
    Model,
    Quant,
    Verbose,
    choice_option,
    positive_int,
)
from monkey_cli.tasks import DEFAULT_MODEL


@app.command(cls=Command)
def doctor(
    output_format: Annotated[
        str,
        choice_option("--format", "-f", choices=("text", "json"), panel=OUTPUT,
                      help="text: tables for people; json: the same facts for programs."),
    ] = "text",
    bench: Annotated[
        bool,
        typer.Option("--bench", rich_help_panel=MODEL,
                     help="Also load --model and measure the generation engine here: compile and CUDA graph "
                     "capture, first token, decode ms/token and tokens/s at batch 1 and --batch-size."),
    ] = False,
    model: Model = DEFAULT_MODEL,
    device: Device = "auto",
    dtype: Dtype = "auto",
    quant: Quant = "auto",
    compile: Compile = None,
    batch_size: Annotated[
        int,
        typer.Option("--batch-size", "-b", metavar="N", parser=positive_int, rich_help_panel=MODEL,
                     help="With --bench: the larger batch measured (lowered to what fits in memory)."),
    ] = 8,
    tokens: Annotated[
        int,
        typer.Option("--bench-tokens", metavar="N", parser=positive_int, rich_help_panel=MODEL,
                     help="With --bench: tokens per measured answer."),
    ] = 32,
    verbose: Verbose = False,
) -> None:
    """Check Python, torch, GPUs, bitsandbytes, torchao, transformers, the model cache, and which --quant fits for
    the model (--model or MONKEY_MODEL: sized from its config.json); with --bench, also how fast the engine runs
    --model on this machine."""
    with user_errors(verbose):
        from monkey_cli.doctor import bench as run_bench
        from monkey_cli.doctor import collect

        report = collect(model)
        if bench:
            report["bench"] = run_bench(
                model,
                device=device,
                dtype=None if dtype == "auto" else dtype,
                quant=None if quant == "auto" else quant,
                compile=compile,
                batch_size=batch_size,
                tokens=tokens,
            )
        if output_format == "json":
            typer.echo(json.dumps(report, indent=2))
        else:
            _print_tables(report)


# --- text rendering ------------------------------------------------------------------------------


def _print_tables(report: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=False)
    console.print(_environment_table(report))
    console.print(_devices_table(report))
    console.print(_memory_table(report["memory"]))
    console.print(_memory_table(report["memory_textmonkey"]))
    if "bench" in report:
        console.print(_bench_table(report["bench"]))
        console.print(_compile_line(report["bench"]["compile"]), markup=False, soft_wrap=True)
    found = report["problems"]
    if found:
        console.print("Problems:", style="bold")
        for line in found:
            console.print(f"  - {line}", markup=False, soft_wrap=True)
    else:
        console.print("No problems found.")


def _gb(n: int | None) -> str:
    from monkey_cli.model.memory import format_bytes

    return format_bytes(n)


def _yes_no(value: Any) -> str:
    return "unknown" if value is None else "yes" if value else "no"


def _table(title: str, *columns: str) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _environment_table(report: dict[str, Any]) -> Any:
    table = _table("Environment", "Component", "Status")
    for name, value in _environment_rows(report):
        table.add_row(name, value)
    return table


def _environment_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    def error_or(section: dict[str, Any], text: str) -> str:
        return f"error: {section['error']}" if "error" in section else text

    python, torch_info = report["python"], report["torch"]
    bnb, transformers_info, hub = report["bitsandbytes"], report["transformers"], report["huggingface_hub"]
    rows = [
        ("monkey-cli", report["monkey_cli"]["version"]),
        ("Python", error_or(python, f"{python.get('version')} ({python.get('executable')})")),
        ("Platform", error_or(python, str(python.get("platform")))),
        ("torch", error_or(torch_info, f"{torch_info.get('version')}, {torch_info.get('build')} build")),
        ("CUDA", error_or(torch_info, _cuda_summary(torch_info))),
        ("bitsandbytes", _bitsandbytes_summary(bnb)),
        ("torchao", _torchao_summary(report.get("torchao", {}))),
        ("torch.compile", error_or(report["compile"], _compile_summary(report["compile"]))),
        (
            "transformers",
            error_or(
                transformers_info,
                f"{transformers_info.get('version')} (tested range {transformers_info.get('tested_range')}: "
                f"{'inside' if transformers_info.get('in_tested_range') else 'OUTSIDE'})",
            ),
        ),
        ("Hugging Face cache", error_or(hub, str(hub.get("cache_dir")))),
        ("HF_HUB_OFFLINE", error_or(hub, _yes_no(hub.get("offline")))),
    ]
    for repo, cached in hub.get("models", {}).items():
        rows.append((repo, _cache_summary(cached)))
    # What bitsandbytes logged while it loaded (e.g. "Failed to load CPU gemm_4bit_forward ..."): hidden
    # from the other commands unless --verbose, shown here because this is where one looks for it.
    rows += [("bitsandbytes said", line) for line in dict.fromkeys(bnb.get("warnings", []))]
    return rows


def _compile_summary(info: dict[str, Any]) -> str:
    """What --compile does by default here, and whether its backend has what it needs."""
    gpu = "Triton found" if info.get("triton") else "no Triton: --compile falls back to eager on a GPU"
    cpu = f"C++ compiler {info['cxx']}" if info.get("cxx") else "no C++ compiler: --compile fails on the CPU"
    default = "on (CUDA)" if info.get("default") == "on" else "off (CPU; --compile to force)"
    return f"{default}; {gpu if info.get('cuda') else cpu}"


def _cuda_summary(torch_info: dict[str, Any]) -> str:
    if not torch_info.get("cuda_available"):
        why = "torch is a CPU-only build" if torch_info.get("build") == "CPU" else "no GPU is visible"
        return f"not available ({why}): monkey runs on the CPU"
    count = torch_info.get("device_count", 0)
    return f"available, {count} device{'s' if count != 1 else ''}"


def _bitsandbytes_summary(bnb: dict[str, Any]) -> str:
    if not bnb.get("imports"):
        return f"{bnb.get('version') or 'not installed'}: {bnb.get('error', 'does not import')}"
    checks = "; ".join(
        f"{device}: " + ", ".join(f"{quant} {result}" for quant, result in results.items())
        for device, results in bnb.get("usable", {}).items()
    )
    return f"{bnb.get('version')} ({bnb.get('native_backend')} backend); {checks}"


def _torchao_summary(info: dict[str, Any]) -> str:
    if not info.get("imports"):
        return f"{info.get('version') or 'not installed'}: {info.get('error', 'does not import')}"
    checks = "; ".join(
        f"{device}: " + ", ".join(f"{quant} {result}" for quant, result in results.items())
        for device, results in info.get("usable", {}).items()
    )
    return f"{info.get('version')}; {checks}"


def _bench_table(bench: dict[str, Any]) -> Any:
    title = (
        f"Engine speed: {bench['model']} on {bench['device']} ({bench['dtype']}, --quant {bench['quant']}), "
        f"answers of {bench['answer_tokens']} tokens; loaded in {bench['load_s']:.1f} s, warmed up in "
        f"{bench['warmup_s']:.1f} s, first token {bench['first_token_ms']:.0f} ms"
    )
    table = _table(title, "Batch", "ms/token", "tokens/s", "Host syncs/step")
    for row in bench["decode"]:
        syncs = row["host_syncs_per_step"]
        table.add_row(str(row["batch"]), f"{row['ms_per_token']:.2f}", f"{row['tokens_per_s']:.1f}",
                      "n/a (CPU)" if syncs is None else f"{syncs:g}")  # fmt: skip
    return table


def _compile_line(report: dict[str, Any]) -> str:
    """What the decode step runs as, in one line: the mode, its graphs, what fell back and why."""
    mode = report.get("mode", "eager")
    if mode == "eager":
        line = "Decode step: eager (not compiled)"
    else:
        line = f"Decode step: {mode}, {report.get('graphs', 0)} graph(s) compiled"
        if mode == "cudagraphs":
            line += f", {report.get('captured', 0)} CUDA graph(s) captured"
        line += f", {report.get('recompiles', 0)} recompile(s) after warm-up"
        if report.get("cudagraph_skips"):
            line += f", CUDA graphs skipped {report['cudagraph_skips']} time(s)"
    for fallback in report.get("fallbacks", []):
        line += f"; fell back from {fallback}"
    return line


def _cache_summary(cached: dict[str, Any]) -> str:
    if "error" in cached:
        return f"error: {cached['error']}"
    if cached["status"] == "absent":
        return "not cached"
    if cached["status"] == "incomplete":
        return f"incomplete at {cached['path']} (missing {', '.join(cached['missing'])})"
    return f"cached at {cached['path']}"


def _devices_table(report: dict[str, Any]) -> Any:
    table = _table("Devices", "Device", "Name", "Total", "Free / available", "Compute", "bf16")
    devices = report["devices"]
    if "error" in devices:
        table.add_row("?", f"error: {devices['error']}", "", "", "", "")
        return table
    cpu = devices["cpu"]
    cores = f"{cpu['cores']} cores"
    table.add_row("cpu", cores, _gb(cpu["total_bytes"]), _gb(cpu["available_bytes"]), "", "")
    for gpu in devices["cuda"]:
        if "error" in gpu:
            table.add_row("cuda", f"error: {gpu['error']}", "", "", "", "")
            continue
        table.add_row(
            gpu["device"],
            gpu["name"],
            _gb(gpu["total_bytes"]),
            _gb(gpu["free_bytes"]),
            gpu["compute_capability"],
            _yes_no(gpu["bf16"]),
        )
    return table


def _memory_table(memory: dict[str, Any]) -> Any:
    if "error" in memory:
        table = _table("Memory plan", "Error")
        table.add_row(memory["error"])
        return table
    plans = memory["plans"]
    devices = list(dict.fromkeys((p["device"], p["dtype"]) for p in plans))
    title = (
        f"Memory needed by {memory['model']}, batch size {memory['batch_size']}, "
        f"{memory['image_tokens']} image tokens per page"
    )
    table = _table(title, "Options", *(f"{device} ({dtype})" for device, dtype in devices))
    for flags in dict.fromkeys(p["flags"] for p in plans):
        cells = []
        for device, _dtype in devices:
            match = next(p for p in plans if p["flags"] == flags and p["device"] == device)
            verdict = {True: "fits", False: "too big", None: "free memory unknown"}[match["fits"]]
            chosen = " (--quant auto)" if match.get("auto") else ""
            cells.append(f"{_gb(match['total_bytes'])}, {verdict}{chosen}")
        table.add_row(flags, *cells)
    return table

"""`optimodel batch`: one recipe over every model of a folder or glob, in parallel."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from optimodel.cli.common import console, err_console, feed_progress, handle_errors
from optimodel.cli.options import DataOpt, ForceOpt, JsonOpt, NoVerifyOpt, PassTimeoutOpt, QuietOpt

ERROR_CELL = 90  # characters of an error shown in the table
WIDE = 120  # terminal width from which the table has an error column
STATUS_STYLE = {"ok": "green", "failed": "bold red", "gate_failed": "yellow"}


def render_batch(summary: dict[str, Any]) -> None:
    from optimodel.batch import STATUSES, SUMMARY_HEADERS, summary_cells

    counts = summary["counts"]
    table = Table(
        title=f"Batch: recipe {escape(summary['recipe'])} -> {escape(summary['out_dir'])}"
    )
    wide = console.width >= WIDE  # narrow: errors only in the lines on stderr
    headers = SUMMARY_HEADERS if wide else SUMMARY_HEADERS[:-1]
    for col in headers:
        table.add_column(col, overflow="fold", no_wrap=col not in ("model", "error"))
    for row in summary["models"]:
        cells = summary_cells(row)
        cells[-1] = short_error(row)
        cells = [escape(c) for c in cells[: len(headers)]]
        style = STATUS_STYLE.get(row["status"], "")
        cells[1] = f"[{style}]{cells[1]}[/]"
        table.add_row(*cells)
    console.print(table)
    line = ", ".join(f"{counts[s]} {s}" for s in STATUSES)
    console.print(
        f"{summary['status'].upper().replace('_', ' ')} | optimodel batch | "
        f"{len(summary['models'])} model(s), {line} | {summary['seconds']:.2f} s",
        markup=False,
    )


def short_error(row: dict[str, Any], limit: int = ERROR_CELL) -> str:
    """The error without the model path (the model column names it), cut for the table;
    the full line goes to stderr and the reports."""
    error = row.get("error") or ""
    for prefix in (row["model"], Path(row["model"]).name):
        if error.startswith(prefix + ": "):
            error = error[len(prefix) + 2 :]
            break
    return error if len(error) <= limit else error[: limit - 3] + "..."


@handle_errors
def batch(
    source: Annotated[
        str,
        typer.Argument(
            help="A folder of .onnx models, or a glob pattern (quote it), e.g. 'models/*.onnx'.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Output folder: <stem>.onnx and <stem>.report.json per model."
        ),
    ],
    config: Annotated[
        str,
        typer.Option("--config", "-c", help="Recipe: a YAML file or the name of one in configs/."),
    ] = "default",
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs", "-j", min=1, help="Worker processes (default: CPU count).", show_default=False
        ),
    ] = None,
    set_option: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a recipe option: PASS.OPTION=VALUE. Repeatable.",
            show_default=False,
        ),
    ] = None,
    data: DataOpt = None,
    max_drop: Annotated[
        str | None,
        typer.Option(
            "--max-drop",
            help="Gate every model on the accuracy drop (labels in --data): X points or X%.",
            show_default=False,
        ),
    ] = None,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="Also search the folder's sub-folders.")
    ] = False,
    bench: Annotated[
        bool,
        typer.Option("--bench/--no-bench", help="Benchmark input and output of each model."),
    ] = False,
    runs: Annotated[
        int | None, typer.Option("--runs", min=1, help="Timed runs per model.", show_default=False)
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads", min=0, help="Intra-op threads for the benchmark.", show_default=False
        ),
    ] = None,
    force: ForceOpt = False,
    no_verify: NoVerifyOpt = False,
    pass_timeout: PassTimeoutOpt = None,
    report: Annotated[
        list[Path] | None,
        typer.Option(
            "--report",
            help="Write a summary of all models; format from the suffix: .json or .md. Repeatable.",
            show_default=False,
        ),
    ] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Optimize every model of a folder or glob with a recipe, in parallel; a failing model
    is listed and the rest carry on (exit 1 if any failed, 3 if only a gate failed)."""
    from optimodel.batch import (
        BATCH_REPORT_SUFFIXES,
        batch_exit_code,
        batch_optimize,
        batch_summary,
        find_models,
        resolve_jobs,
        write_batch_report,
    )
    from optimodel.errors import UsageError

    for path in report or []:
        if path.suffix.lower() not in BATCH_REPORT_SUFFIXES:
            raise UsageError(f"--report {path}: unknown format '{path.suffix}'; use .json or .md")
    models = find_models(source, recursive=recursive)
    t0 = time.perf_counter()
    with feed_progress(len(models), "optimizing", quiet or json_out) as advance:
        rows = batch_optimize(
            models,
            out,
            config,
            jobs,
            set_options=set_option,
            data=data,
            force=force,
            verify=not no_verify,
            bench=bench,
            runs=runs,
            threads=threads,
            max_drop=max_drop,
            pass_timeout=pass_timeout,
            on_done=lambda _row: advance(),
        )
    summary = batch_summary(
        rows,
        out_dir=out,
        recipe_name=config,
        jobs=resolve_jobs(jobs, len(models)),
        seconds=time.perf_counter() - t0,
    )
    if json_out:
        print(json.dumps(summary, indent=2))
    elif not quiet:
        render_batch(summary)
    for path in report or []:
        write_batch_report(summary, path)
        if not quiet and not json_out:
            err_console.print(f"report written to {path}", markup=False)
    for row in rows:
        if row["status"] != "ok" and row.get("error"):
            err_console.print(f"[bold red]{row['status']}:[/] {escape(row['error'])}")
    code = batch_exit_code(rows)
    if code:
        raise typer.Exit(code)

"""`optimodel optimize`: a recipe of passes, verified after each, measured before/after."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from optimodel.cli.common import console, handle_errors, write_reports
from optimodel.cli.options import (
    DataOpt,
    ForceOpt,
    IntRangeOpt,
    JsonOpt,
    ModelArg,
    NoVerifyOpt,
    OutputOpt,
    PassTimeoutOpt,
    QuietOpt,
    ReportOpt,
    ShapeOpt,
)


def render_optimize(data: dict) -> None:
    from optimodel.cli.transform_cmd import render_transform
    from optimodel.report import STAGE_HEADERS, _fmt, stage_table

    table = Table(title=f"Recipe {escape(data['recipe']['name'])}: stages")
    for col in STAGE_HEADERS:
        table.add_column(col)
    for row in stage_table(data):
        table.add_row(*[escape(_fmt(c)) for c in row])
    console.print(table)
    if data.get("latency"):
        lat = Table(title="Latency before / after (same run)")
        for col in ("", "p50 ms", "p90 ms", "load s", "p50 ratio", "load ratio"):
            lat.add_column(col)
        for label, row in zip(("input", "output"), data["latency"], strict=False):
            lat.add_row(
                label,
                *[
                    escape(_fmt(row.get(k)))
                    for k in ("p50_ms", "p90_ms", "session_load_s", "latency_ratio", "load_ratio")
                ],
            )
        console.print(lat)
    render_transform(data)


@handle_errors
def optimize(
    model: ModelArg,
    output: OutputOpt,
    config: Annotated[
        str,
        typer.Option("--config", "-c", help="Recipe: a YAML file or the name of one in configs/."),
    ] = "default",
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
            help="Gate on the accuracy drop (labels in --data): X "
            "points or X%; exit 3 when exceeded.",
            show_default=False,
        ),
    ] = None,
    bench: Annotated[
        bool | None,
        typer.Option(
            "--bench/--no-bench",
            help="Benchmark input and output (recipe default).",
            show_default=False,
        ),
    ] = None,
    runs: Annotated[
        int | None, typer.Option("--runs", min=1, help="Timed runs per model.", show_default=False)
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads", min=0, help="Intra-op threads for the benchmark.", show_default=False
        ),
    ] = None,
    if_slower: Annotated[
        str | None,
        typer.Option(
            "--if-slower",
            help="Time input and output interleaved on the recipe's provider; if the output "
            "is slower than --max-latency-ratio: warn, keep-input (write the input model "
            "unchanged) or fail (exit 3). Recipe: bench.if_slower.",
            show_default=False,
        ),
    ] = None,
    max_latency_ratio: Annotated[
        float | None,
        typer.Option(
            "--max-latency-ratio",
            help="Output/input p50 latency above which --if-slower acts (1.05).",
            show_default=False,
        ),
    ] = None,
    force: ForceOpt = False,
    no_verify: NoVerifyOpt = False,
    shape: ShapeOpt = None,
    int_range: IntRangeOpt = "0:255",
    pass_timeout: PassTimeoutOpt = None,
    report: ReportOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run a recipe (fold, fuse, quantize, ...), verify each pass, bench and eval the result."""
    import json

    from optimodel.data import parse_int_range, parse_shapes
    from optimodel.evaluate import parse_max_drop
    from optimodel.optimize import optimize_file
    from optimodel.recipes import load_recipe
    from optimodel.report import check_report_paths, verdict

    reports = check_report_paths(report)
    gate = parse_max_drop(max_drop) if max_drop is not None else None
    recipe = load_recipe(config, data=data)
    recipe.override(set_option)
    recipe.build()
    run = optimize_file(
        model,
        output,
        recipe,
        force=force,
        verify=not no_verify,
        data=data,
        shapes=parse_shapes(shape),
        int_range=parse_int_range(int_range),
        bench=bench,
        runs=runs,
        threads=threads,
        max_drop=gate,
        pass_timeout=pass_timeout,
        if_slower=if_slower,
        max_latency_ratio=max_latency_ratio,
    )
    out = run.to_dict()
    if json_out:
        print(json.dumps(out, indent=2))
    elif not quiet:
        render_optimize(out)
    write_reports(run, reports, quiet or json_out)
    if run.status == "gate_failed":
        if not quiet and not json_out:
            console.print(f"[bold red]{escape(verdict(out))}[/]")
        raise typer.Exit(3)

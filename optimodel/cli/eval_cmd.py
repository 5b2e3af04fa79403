"""`optimodel eval`: accuracy against labels, fidelity against a reference, a CI gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from optimodel.cli.common import console, feed_progress, handle_errors, write_reports
from optimodel.cli.options import (
    BatchSizeOpt,
    CustomOpsOpt,
    DataOpt,
    IntRangeOpt,
    JsonOpt,
    ModelArg,
    ProviderOpt,
    QuietOpt,
    ReportOpt,
    SamplesOpt,
    ShapeOpt,
    ThreadsOpt,
)


def _fmt(value: Any, digits: int = 6) -> str:
    from optimodel.report import _fmt as fmt

    return escape(fmt(value, digits))


def render_eval(data: dict[str, Any]) -> None:
    from optimodel.report import (
        ACCURACY_HEADERS,
        DIFF_HEADERS,
        accuracy_rows,
        diff_rows,
        model_rows,
        verdict,
    )

    acc = data["accuracy"]
    models = Table(title="Models")
    for col in ("role", "path", "nodes", "parameters", "bytes"):
        models.add_column(col, overflow="fold")
    for row in model_rows(data):  # sha256 and opset stay in the JSON / Markdown report
        models.add_row(*[_fmt(c) for c in row[:5]])
    console.print(models)
    rows = accuracy_rows(acc)
    if rows:
        table = Table(title=escape(f"Accuracy ({acc['data']})"))
        for col in ACCURACY_HEADERS:
            table.add_column(col)
        for row in rows:
            table.add_row(*[_fmt(c) for c in row])
        console.print(table)
    if acc.get("fidelity"):
        table = Table(title="Fidelity against the reference")
        for col in DIFF_HEADERS:
            table.add_column(col)
        for row in diff_rows(acc["fidelity"]):
            table.add_row(*[_fmt(c) for c in row])
        console.print(table)
    for note in acc.get("notes", []):
        console.print(f"[yellow]note:[/] {escape(note)}")
    line = verdict(data)
    style = "green" if data["status"] == "ok" else "bold red"
    console.print(f"[{style}]{escape(line)}[/]")


@handle_errors
def eval_command(
    model: ModelArg,
    reference: Annotated[
        Path | None,
        typer.Option(
            "--reference",
            help="Reference model to measure fidelity and the drop against.",
            show_default=False,
        ),
    ] = None,
    data: DataOpt = None,
    max_drop: Annotated[
        str | None,
        typer.Option(
            "--max-drop",
            help="Gate: fail (exit 3) when accuracy drops by more than X "
            "points, or X% relative (e.g. 1 or 0.5%).",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output-name",
            help="Model output that the labels score (default: first).",
            show_default=False,
        ),
    ] = None,
    shape: ShapeOpt = None,
    batch_size: BatchSizeOpt = 32,
    samples: SamplesOpt = None,
    int_range: IntRangeOpt = "0:255",
    provider: ProviderOpt = None,
    threads: ThreadsOpt = 0,
    custom_op_library: CustomOpsOpt = None,
    report: ReportOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure task accuracy (labels in --data) and fidelity against --reference."""
    from optimodel.data import load_data, model_input_specs, parse_int_range, parse_shapes
    from optimodel.evaluate import evaluate, parse_max_drop
    from optimodel.modelio import load_model
    from optimodel.report import Report, check_report_paths, model_record
    from optimodel.runtime.sessions import SessionConfig

    reports = check_report_paths(report)
    gate = parse_max_drop(max_drop) if max_drop is not None else None
    shapes = parse_shapes(shape)
    ints = parse_int_range(int_range)
    run = Report(subcommand="eval")
    loaded = load_model(model)
    run.input_model = model_record(model, loaded)
    if reference is not None:
        run.reference_model = model_record(reference, load_model(reference))
    dataset = load_data(
        data,
        model_input_specs(loaded),
        shapes=shapes,
        batch_size=batch_size,
        num_samples=samples,
        int_range=ints,
    )
    config = SessionConfig(
        providers=provider or ["cpu"],
        threads=threads,
        custom_op_library=str(custom_op_library) if custom_op_library else None,
    )
    with feed_progress(dataset.num_feeds, "evaluating", quiet or json_out) as tick:
        result = evaluate(
            str(model),
            dataset,
            reference=str(reference) if reference else None,
            session_config=config,
            output=output,
            max_drop=gate,
            on_feed=tick,
        )
    run.accuracy = result.to_dict() | {"session": config.describe()}
    run.messages.extend(result.notes)
    if result.gate:
        run.gates.append(result.gate)
        if not result.gate["passed"]:
            run.status = "gate_failed"
    run.finish()
    data_out = run.to_dict()
    if json_out:
        print(json.dumps(data_out, indent=2))
    elif not quiet:
        render_eval(data_out)
    write_reports(run, reports, quiet or json_out)
    if run.status == "gate_failed":
        raise typer.Exit(3)

"""`optimodel compare`: where two models part ways, output by output or layer by layer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from optimodel.cli.common import console, handle_errors, write_reports
from optimodel.cli.options import (
    DataOpt,
    IntRangeOpt,
    JsonOpt,
    ModelArg,
    QuietOpt,
    ReportOpt,
    SamplesOpt,
    ShapeOpt,
)
from optimodel.quant.layers import DEFAULT_CHUNK, DEFAULT_JUMP_DB, DEFAULT_TOP

DEFAULT_FEEDS = 8


def _db(value: float | None) -> str:
    return "exact" if value is None else f"{value:.2f}"


@handle_errors
def compare(
    model: ModelArg,
    candidate: Annotated[
        Path,
        typer.Argument(
            help="Model to compare with MODEL (e.g. its int8 version).", show_default=False
        ),
    ],
    layers: Annotated[
        bool,
        typer.Option(
            "--layers",
            help="Compare every intermediate tensor both graphs compute, not only the outputs.",
        ),
    ] = False,
    chunk: Annotated[
        int, typer.Option("--chunk", min=1, help="Tensors read per session run (memory).")
    ] = DEFAULT_CHUNK,
    top: Annotated[
        int, typer.Option("--top", min=1, help="Show the K worst layers.")
    ] = DEFAULT_TOP,
    jump_db: Annotated[
        float,
        typer.Option(
            "--jump-db", help="Flag a layer whose SQNR is this many dB below its inputs'."
        ),
    ] = DEFAULT_JUMP_DB,
    data: DataOpt = None,
    samples: SamplesOpt = None,
    shape: ShapeOpt = None,
    int_range: IntRangeOpt = "0:255",
    report: ReportOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Per-output (and with --layers per-layer) SQNR and cosine between two models."""
    from optimodel.data import load_data, model_input_specs, parse_int_range, parse_shapes
    from optimodel.modelio import load_model
    from optimodel.quant.layers import compare_layers
    from optimodel.report import Report, check_report_paths, model_record
    from optimodel.verify import verify_models

    reports = check_report_paths(report)
    run = Report(subcommand="compare")
    reference, other = load_model(model), load_model(candidate)
    run.reference_model = model_record(model, reference)
    run.input_model = model_record(candidate, other)
    dataset = load_data(
        data,
        model_input_specs(reference),
        shapes=parse_shapes(shape),
        num_samples=samples or DEFAULT_FEEDS,
        int_range=parse_int_range(int_range),
    )
    batches = list(dataset)
    outputs = verify_models(
        reference,
        other,
        batches,
        tolerance="none",
        data_description=dataset.description,
    )
    run.verification = outputs.to_dict()
    if layers:
        result = compare_layers(
            reference,
            other,
            batches,
            chunk=chunk,
            jump_db=jump_db,
            data_description=dataset.description,
        )
        run.inspect = {"layer_comparison": result.to_dict(top)}
        run.messages.extend(_findings(result, top))
    run.finish()
    data_out = run.to_dict()
    if json_out:
        print(json.dumps(data_out, indent=2))
    elif not quiet:
        _render(data_out, top)
    write_reports(run, reports, quiet or json_out)


def _findings(result: Any, top: int) -> list[str]:
    lines = [
        f"compared {len(result.rows)} tensors present in both graphs on {result.feeds} feed(s) "
        f"({len(result.unmatched)} not matched), {result.chunk} per run in {result.sessions} "
        f"run(s) of each model"
    ]
    first = result.first_error
    if first is None:
        lines.append("every compared tensor is identical")
        return lines
    lines.append(
        f"first tensor that differs: {first.tensor} ({first.op_type} {first.node}), "
        f"SQNR {_db(first.snr_db)} dB"
    )
    for row in result.jumps[:3]:
        lines.append(
            f"error jump at {row.tensor} ({row.op_type} {row.node}): SQNR {_db(row.input_snr_db)} "
            f"-> {_db(row.snr_db)} dB ({row.jump_db:.2f} dB)"
        )
    worst = ", ".join(f"{r.tensor} {_db(r.snr_db)} dB" for r in result.worst(min(top, 3)))
    lines.append(f"worst: {worst}")
    return lines


def _render(data: dict[str, Any], top: int) -> None:
    outputs = Table(title="Outputs")
    for column in ("output", "SQNR dB", "cosine", "max abs diff"):
        outputs.add_column(column)
    for row in data["verification"]["outputs"]:
        outputs.add_row(
            escape(row["name"]),
            _db(row["snr_db"]),
            f"{row['cosine']:.6f}",
            f"{row['max_abs']:.4g}",
        )
    console.print(outputs)
    comparison = (data.get("inspect") or {}).get("layer_comparison")
    if comparison:
        rows = comparison["layers"]
        jumps = set(comparison["jumps"])
        worst = comparison["worst"]
        table = Table(title=f"Layers, topological order (* = SQNR jump >= "
                      f"{comparison['jump_threshold_db']:g} dB)")  # fmt: skip
        for column in ("#", "tensor", "op", "SQNR dB", "inputs dB", "jump dB", "cosine"):
            table.add_column(column)
        for row in rows:
            mark = "*" if row["tensor"] in jumps else ""
            table.add_row(
                str(row["index"]),
                escape(row["tensor"]) + mark,
                row["op_type"],
                _db(row["snr_db"]),
                _db(row["input_snr_db"]),
                "-" if row["jump_db"] is None else f"{row['jump_db']:.2f}",
                f"{row['cosine']:.6f}",
            )
        console.print(table)
        by_name = {r["tensor"]: r for r in rows}
        ranked = ", ".join(f"{escape(n)} ({_db(by_name[n]['snr_db'])} dB)" for n in worst[:top])
        console.print(f"worst {min(top, len(worst))}: {ranked or 'none'}")
    for message in data.get("messages", []):
        console.print(escape(message))

"""`optimodel bench`: latency of one or more models through ONNX Runtime, side by side."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from optimodel.cli.common import console, feed_progress, handle_errors, print_error, write_reports
from optimodel.cli.options import (
    BatchSizeOpt,
    CustomOpsOpt,
    DataOpt,
    IntRangeOpt,
    JsonOpt,
    ProviderOpt,
    QuietOpt,
    ReportOpt,
    ShapeOpt,
    ThreadsOpt,
)

ModelsArg = Annotated[
    list[Path],
    typer.Argument(
        help="ONNX model file(s); figures of the others are compared with the first.",
        show_default=False,
    ),
]


def _ms(value: Any) -> str:
    """Three significant digits below 1 ms (fast models), three decimals above."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    if value >= 100:
        return f"{value:,.1f}"
    return f"{value:.3f}" if value >= 1 else f"{value:.3g}"


def _num(value: Any, digits: int = 2) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:,.{digits}f}"


def _nodes(counts: dict[str, int]) -> str:
    from optimodel.runtime.bench import short_provider

    return ", ".join(f"{short_provider(p)} {n}" for p, n in counts.items()) or "-"


def _headers(rows: list[dict[str, Any]]) -> list[str]:
    """Model file names, or whole paths where two names collide."""
    names = [Path(row["model"]).name for row in rows]
    return [
        row["model"] if names.count(name) > 1 else name
        for row, name in zip(rows, names, strict=True)
    ]


FIGURES: list[tuple[str, str, Callable[[Any], str]]] = [
    ("batch", "batch_size", str),
    ("timed runs", "runs", lambda v: f"{v:,}"),
    ("p50 ms", "p50_ms", _ms),
    ("p90 ms", "p90_ms", _ms),
    ("p99 ms", "p99_ms", _ms),
    ("mean ms", "mean_ms", _ms),
    ("min ms", "min_ms", _ms),
    ("throughput (samples/s)", "throughput", lambda v: _num(v, 1)),
    ("session load s", "session_load_s", lambda v: _num(v, 3)),
    ("first run ms", "first_run_ms", _ms),
    ("peak RSS MB", "peak_rss_mb", lambda v: _num(v, 1)),
    ("nodes by provider", "nodes_by_provider", lambda v: _nodes(v or {})),
    ("p50 × first", "latency_ratio", _num),
    ("load × first", "load_ratio", _num),
]


def render_bench(data: dict[str, Any], out: Console | None = None) -> None:
    """One table, a column per model so they read side by side; fell-back runs in red."""
    from optimodel.runtime.bench import placement_note

    out = out or console
    rows = data["latency"]
    first = rows[0] if rows else {}
    table = Table(
        title="Latency (ONNX Runtime)",
        caption=escape(
            f"threads {first.get('threads') or 'ORT default'}, warmup {first.get('warmup')}, "
            f"io binding {'on' if first.get('io_binding') else 'off'}; "
            "× first: ratio to the first model"
        ),
    )
    table.add_column("")
    for header in _headers(rows):
        table.add_column(escape(header), justify="right")
    providers = []
    for row in rows:
        label = escape(row.get("provider_display") or row["provider"])
        providers.append(f"[bold red]{label}[/]" if row.get("fell_back") else label)
    table.add_row("provider", *providers)
    for title, key, fmt in FIGURES:
        table.add_row(title, *[escape(fmt(row.get(key))) for row in rows])
    out.print(table)
    for row in rows:
        note = placement_note(row)
        if note:
            out.print(f"[yellow]note:[/] {escape(note)}")


@handle_errors
def bench(
    models: ModelsArg,
    provider: ProviderOpt = None,
    threads: ThreadsOpt = 0,
    batch_size: BatchSizeOpt = 1,
    shape: ShapeOpt = None,
    data: DataOpt = None,
    int_range: IntRangeOpt = "0:255",
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed runs per model.")] = 100,
    warmup: Annotated[
        int, typer.Option("--warmup", min=0, help="Untimed runs before timing (after the first).")
    ] = 10,
    duration: Annotated[
        float | None,
        typer.Option(
            "--duration",
            min=0.001,
            help="Time runs for this many seconds instead of --runs times.",
            show_default=False,
        ),
    ] = None,
    io_binding: Annotated[
        bool | None,
        typer.Option(
            "--io-binding/--no-io-binding",
            help="Bind inputs and outputs on the device once (default: on for cuda/tensorrt, "
            "off for cpu), keeping host-device copies out of the figures.",
            show_default=False,
        ),
    ] = None,
    no_fallback: Annotated[
        bool,
        typer.Option(
            "--no-fallback",
            help="Fail at session creation when a node cannot run on the requested GPU "
            "provider (session.disable_cpu_ep_fallback).",
        ),
    ] = False,
    device_id: Annotated[
        int | None,
        typer.Option("--device-id", min=0, help="GPU for cuda/tensorrt.", show_default=False),
    ] = None,
    trt_fp16: Annotated[
        bool, typer.Option("--trt-fp16", help="TensorRT: allow fp16 kernels.")
    ] = False,
    trt_int8: Annotated[
        bool, typer.Option("--trt-int8", help="TensorRT: allow int8 kernels.")
    ] = False,
    trt_engine_cache: Annotated[
        Path | None,
        typer.Option(
            "--trt-engine-cache",
            help="TensorRT: cache built engines in this folder (later loads skip the build).",
            show_default=False,
        ),
    ] = None,
    trt_workspace_gb: Annotated[
        float | None,
        typer.Option(
            "--trt-workspace-gb", help="TensorRT: max workspace in GiB.", show_default=False
        ),
    ] = None,
    custom_op_library: CustomOpsOpt = None,
    report: ReportOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure latency, throughput, load time and memory; several models side by side."""
    from optimodel.data import load_data, model_input_specs, parse_int_range, parse_shapes
    from optimodel.errors import DataError
    from optimodel.modelio import load_model
    from optimodel.report import Report, check_report_paths, model_record
    from optimodel.runtime.bench import (
        add_ratios,
        benchmark_model,
        check_no_fallback,
        fallback_message,
        placement_note,
        provider_options,
    )
    from optimodel.runtime.sessions import SessionConfig, resolve_providers

    reports = check_report_paths(report)
    shapes = parse_shapes(shape)
    ints = parse_int_range(int_range)
    providers = provider or ["cpu"]
    options = provider_options(
        providers,
        device_id=device_id,
        trt_fp16=trt_fp16,
        trt_int8=trt_int8,
        trt_engine_cache=trt_engine_cache,
        trt_workspace_gb=trt_workspace_gb,
    )
    check_no_fallback(providers, no_fallback)
    resolve_providers(providers)  # a missing provider fails now, naming what to install
    if trt_engine_cache is not None:
        trt_engine_cache.mkdir(parents=True, exist_ok=True)
    config = SessionConfig(
        providers=providers,
        threads=threads,
        no_fallback=no_fallback,
        provider_options=options,
        custom_op_library=str(custom_op_library) if custom_op_library else None,
    )

    loaded = [(path, load_model(path, load_external_data=False)) for path in models]
    specs = {path: model_input_specs(model) for path, model in loaded}
    known = {spec.name for model_specs in specs.values() for spec in model_specs}
    unknown = sorted(set(shapes) - known)
    if unknown:
        raise DataError(f"--shape names unknown input(s) {', '.join(unknown)}")
    run = Report(subcommand="bench")
    records = {path: model_record(path, model) for path, model in loaded}
    run.input_model = records[models[0]]
    del loaded

    rows = []
    for path in models:
        names = {spec.name for spec in specs[path]}
        dataset = load_data(
            data,
            specs[path],
            shapes={k: v for k, v in shapes.items() if k in names},
            batch_size=batch_size,
            int_range=ints,
        )
        batch = next(iter(dataset), None)
        if batch is None:
            raise DataError(f"{dataset.source}: holds no feed to benchmark with")
        total = None if duration else 1 + warmup + runs
        with feed_progress(total, f"bench {path.name}", quiet or json_out) as tick:
            row = benchmark_model(
                path,
                config,
                batch.feed,
                runs=runs,
                warmup=warmup,
                duration=duration,
                io_binding=io_binding,
                on_run=tick,
            )
        row["data"] = dataset.description
        row["model_sha256"] = records[path]["sha256"]
        row["model_bytes"] = records[path]["bytes"]
        rows.append(row)
    run.latency = add_ratios(rows)
    failures = [fallback_message(row) for row in rows if row["fell_back"]]
    run.messages.extend(failures)
    run.messages.extend(note for row in rows if (note := placement_note(row)))
    if failures:
        run.status = "failed"
    run.finish()
    report_data = run.to_dict()
    if json_out:
        print(json.dumps(report_data, indent=2))
    elif not quiet:
        render_bench(report_data)
    write_reports(run, reports, quiet or json_out)
    for message in failures:
        print_error(escape(message))
    if failures:
        raise typer.Exit(1)

"""`optimodel quantize`: int8 / int4 through onnxruntime.quantization, verified and counted."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from optimodel.cli.common import calibration_bar, console, handle_errors, write_reports
from optimodel.cli.options import (
    DataOpt,
    ExternalDataOpt,
    ForceOpt,
    IntRangeOpt,
    JsonOpt,
    ModelArg,
    NoVerifyOpt,
    OutputOpt,
    QuietOpt,
    ReportOpt,
    SamplesOpt,
    ShapeOpt,
)
from optimodel.cli.transform_cmd import render_transform

Repeatable = list[str] | None


def _opt(*flags: str, help: str) -> Any:  # noqa: A002 - Typer's own keyword
    return typer.Option(*flags, help=help, show_default=False)


@handle_errors
def quantize(
    model: ModelArg,
    output: OutputOpt,
    mode: Annotated[
        str, typer.Option("--mode", help="dynamic | static (calibrated) | weight-only (int4).")
    ] = "dynamic",
    target: Annotated[
        str,
        typer.Option(
            "--target",
            help="cpu | cuda | tensorrt: picks the format and checks the result can run there.",
        ),
    ] = "cpu",
    per_channel: Annotated[
        bool | None,
        typer.Option(
            "--per-channel/--per-tensor",
            help="Weight scales per output channel (default) or per tensor.",
            show_default=False,
        ),
    ] = None,
    weight_type: Annotated[
        str | None, _opt("--weight-type", help="int8 (default) | uint8 weights (dynamic, static).")
    ] = None,
    op: Annotated[
        Repeatable,
        _opt("--op", help="Quantize only this op type (repeatable; default: per mode and target)."),
    ] = None,
    exclude_op: Annotated[
        Repeatable, _opt("--exclude-op", help="Keep this op type in float (repeatable).")
    ] = None,
    exclude_node: Annotated[
        Repeatable, _opt("--exclude-node", help="Keep this node in float, by name (repeatable).")
    ] = None,
    exclude_preset: Annotated[
        str | None,
        _opt(
            "--exclude-preset",
            help="Keep layers in float by architecture: stem (first weighted layer), heads "
            "(last ones), ends (both) or none; a layer doing >25% of the MACs is never kept.",
        ),
    ] = None,
    calib_data: Annotated[
        str | None,
        _opt(
            "--calib-data",
            help="Static: calibration inputs: a .npz (stacked), a folder of .npz or of "
            "test_data_set_*/input_*.pb, or 'random'.",
        ),
    ] = None,
    calib_method: Annotated[
        str | None,
        _opt(
            "--calib-method",
            help="Static: percentile (default: clips rare outliers, 8/8 PP-OCR rec lines where "
            "minmax kept 5/8) | minmax | entropy.",
        ),
    ] = None,
    calib_samples: Annotated[
        int | None, _opt("--calib-samples", help="Static: calibrate on at most N samples (128).")
    ] = None,
    quant_format: Annotated[
        str | None, _opt("--format", help="Static: qdq (default) | qoperator (QLinear* ops, CPU).")
    ] = None,
    symmetric_activations: Annotated[
        bool,
        typer.Option(
            "--symmetric-activations",
            help="Static: int8 symmetric activations (default uint8; TensorRT always int8).",
        ),
    ] = False,
    int8_outputs: Annotated[
        bool,
        typer.Option(
            "--int8-outputs",
            help="Static QDQ: quantize layer outputs everywhere (default: a cheap last "
            "layer's outputs, and on the CPU MatMul/Gemm outputs ORT still runs in int8, "
            "stay float).",
        ),
    ] = False,
    bits: Annotated[int | None, _opt("--bits", help="Weight-only: 4 (default) or 8.")] = None,
    block_size: Annotated[
        int | None, _opt("--block-size", help="Weight-only: weights per scale along K (32).")
    ] = None,
    int4_format: Annotated[
        str | None,
        _opt(
            "--int4-format",
            help="Weight-only: matmulnbits (ORT contrib op) | qdq (standard DQ int4 -> MatMul).",
        ),
    ] = None,
    asymmetric_weights: Annotated[
        bool,
        typer.Option("--asymmetric-weights", help="Weight-only: zero points per block."),
    ] = False,
    quantize_head: Annotated[
        bool,
        typer.Option(
            "--quantize-head",
            help="Weight-only: int4 for the LM-head-like last projection too (default: 8-bit).",
        ),
    ] = False,
    accuracy_level: Annotated[
        int | None,
        _opt("--accuracy-level", help="Weight-only MatMulNBits compute: 0 float, 4 int8 (CPU)."),
    ] = None,
    accuracy_budget: Annotated[
        float | None,
        typer.Option(
            "--accuracy-budget",
            min=0.0,
            help="Dynamic/static: largest drop allowed; keep the most sensitive nodes in float "
            "until it fits (exit 3 if nothing does). With labels in --eval-data: top-1 points; "
            "without: (1 - cosine) x 100 of the worst output (0.5 = cosine 0.995).",
            show_default=False,
        ),
    ] = None,
    eval_data: Annotated[
        str | None,
        _opt("--eval-data", help="Data the --accuracy-budget drop is measured on (.npz)."),
    ] = None,
    eval_samples: Annotated[
        int | None, _opt("--eval-samples", help="Use at most N samples of --eval-data.")
    ] = None,
    max_trials: Annotated[
        int | None,
        _opt(
            "--max-trials",
            help="Quantize-and-measure trials for --accuracy-budget, per weight form (12).",
        ),
    ] = None,
    fallback: Annotated[
        str | None,
        _opt(
            "--fallback",
            help="What --accuracy-budget does with a node it keeps out of int8: "
            "int8-weights (runs in float, weights stay int8 per channel: same size) or "
            "float (weights too) [default: int8-weights].",
        ),
    ] = None,
    keep_best: Annotated[
        bool,
        typer.Option(
            "--keep-best",
            help="When no configuration fits the budget, write the best one anyway (exit 3).",
        ),
    ] = False,
    bench: Annotated[
        bool,
        typer.Option(
            "--bench",
            help="Time input and output on the --target's provider (the CPU when it "
            "does not start here, said so); warn if it got slower.",
        ),
    ] = False,
    threads: Annotated[
        int, typer.Option("--threads", min=1, help="Intra-op threads for --bench.")
    ] = 1,
    if_slower: Annotated[
        str | None,
        _opt(
            "--if-slower",
            help="Time input and output on the --target's provider (which must start "
            "here); if the output is slower than --max-latency-ratio: warn, keep-float "
            "(write the input model) or fail (exit 3).",
        ),
    ] = None,
    max_latency_ratio: Annotated[
        float,
        typer.Option(
            "--max-latency-ratio",
            help="Largest quantized/input p50 latency ratio --if-slower accepts.",
        ),
    ] = 1.05,
    force: ForceOpt = False,
    no_verify: NoVerifyOpt = False,
    data: DataOpt = None,
    samples: SamplesOpt = None,
    shape: ShapeOpt = None,
    int_range: IntRangeOpt = "0:255",
    external_data: ExternalDataOpt = None,
    report: ReportOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Quantize to int8 (dynamic, static) or int4 weights, and say what really runs in int8."""
    from optimodel.errors import GateFailed
    from optimodel.report import check_report_paths

    reports = check_report_paths(report)
    given = {
        "target": target,
        "per_channel": per_channel,
        "weight_type": weight_type,
        "op_types": op,
        "exclude_ops": exclude_op,
        "exclude_nodes": exclude_node,
        "exclude_preset": exclude_preset,
        "calib_data": calib_data,
        "calib_method": calib_method,
        "calib_samples": calib_samples,
        "format": quant_format,
        "symmetric_activations": symmetric_activations or None,
        "int8_outputs": int8_outputs or None,
        "bits": bits,
        "block_size": block_size,
        "int4_format": int4_format,
        "symmetric_weights": False if asymmetric_weights else None,
        "keep_head": False if quantize_head else None,
        "accuracy_level": accuracy_level,
        "accuracy_budget": accuracy_budget,
        "eval_data": eval_data,
        "eval_samples": eval_samples,
        "max_trials": max_trials,
        "keep_best": keep_best or None,
        "fallback": fallback,
    }
    try:
        given.update(if_slower=if_slower, max_latency_ratio=max_latency_ratio)
        with calibration_bar(quiet or json_out or mode != "static"):
            run = _run(model, output, mode, force, no_verify, data, samples, shape, int_range,
                       external_data, bench, threads, given)  # fmt: skip
    except GateFailed as exc:
        failed = getattr(exc, "report", None)
        if failed is not None:  # --keep-best wrote a model: show and keep its report too
            _show(failed, reports, json_out, quiet)
        raise
    _show(run, reports, json_out, quiet)


def _run(
    model: Any,
    output: Any,
    mode: str,
    force: bool,
    no_verify: bool,
    data: str | None,
    samples: int | None,
    shape: list[str] | None,
    int_range: str,
    external_data: bool | None,
    bench: bool,
    threads: int,
    given: dict[str, Any],
) -> Any:
    from optimodel.data import parse_int_range, parse_shapes
    from optimodel.quant.api import quantize as quantize_model

    return quantize_model(
        model,
        output,
        mode=mode,
        force=force,
        verify=not no_verify,
        data=data,
        samples=samples,
        shapes=parse_shapes(shape),
        int_range=parse_int_range(int_range),
        external_data=external_data,
        bench=bench,
        threads=threads,
        **{k: v for k, v in given.items() if v is not None},
    )


def _show(run: Any, reports: list[Any], json_out: bool, quiet: bool) -> None:
    result = run.to_dict()
    if json_out:
        print(json.dumps(result, indent=2))
    elif not quiet:
        _render(result)
    write_reports(run, reports, quiet or json_out)


def _render(data: dict[str, Any]) -> None:
    """The transform tables, what was quantized, latency if measured, then warnings."""
    from optimodel.quant.api import WARNING_PREFIX

    messages = data.get("messages", [])
    warnings = [m[len(WARNING_PREFIX) :] for m in messages if m.startswith(WARNING_PREFIX)]
    notes = [m for m in messages if not m.startswith(WARNING_PREFIX)]
    render_transform({**data, "messages": notes})
    stats = data["passes"][0].get("stats") or {}
    table = Table(title="Quantization", show_header=False)
    table.add_column("")
    table.add_column("", overflow="fold")
    calibration = stats.get("calibration")
    ratio = stats.get("weight_bytes_ratio")
    rows = [
        ("mode / target", f"{stats.get('mode')} / {stats.get('target')}"),
        ("format", stats.get("format")),
        ("activations", stats.get("activations")),
        ("weights", stats.get("weights")),
        (
            "quantized layers",
            ", ".join(f"{k} {v}" for k, v in (stats.get("quantized_ops") or {}).items()) or "none",
        ),
        ("layers left in float", _float_layers(stats)),
        ("float outputs", _float_outputs(stats)),
        ("Q/DQ pairs", stats.get("qdq_pairs")),
        (
            "layer weight bytes",
            f"{stats.get('weight_bytes_before', 0):,} -> {stats.get('weight_bytes_after', 0):,}"
            + (f" ({ratio:.3f}x)" if ratio is not None else ""),
        ),
    ]
    if stats.get("compacted"):
        rows.insert(-1, ("written compactly", _compacted(stats)))
    if calibration:
        rows.append(("calibration", f"{calibration['method']} on {calibration['data']}"))
    tables = stats.get("embeddings_8bit") or []
    floats = stats.get("embeddings_kept_float") or []
    if tables or floats:  # weight-only
        rows.append(
            (
                "embedding tables",
                f"{len(tables)} in 8 bits (GatherBlockQuantized), {len(floats)} float",
            )
        )
    for label, value in rows:
        table.add_row(label, escape(str(value)))
    console.print(table)
    budget = stats.get("accuracy_budget")
    if budget:
        _render_budget(budget)
    for row in data.get("latency") or []:
        console.print(
            escape(
                f"latency {row['model']}: p50 {row['p50_ms']:.3f} ms at {row['threads']} "
                f"thread(s) ({row['latency_ratio']:.2f}x)"
            )
        )
    for gate in data.get("gates") or []:
        if gate["name"] == "latency":
            verdict = "[green]faster[/]" if gate["passed"] else "[red]not faster[/]"
            console.print(
                f"latency quantized/input (interleaved): {gate['measured']:.2f}x, limit "
                f"{gate['limit']:g}x: {verdict}"
                + (f"; {escape(gate['action'])}" if gate.get("action") else "")
            )
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")


def _compacted(stats: dict[str, Any]) -> str:
    """What optimodel.quant.compact left out of the Q/DQ file (same numbers)."""
    done = stats["compacted"]
    parts = [
        f"{done.get('zero_points_dropped', 0)} zero points dropped",
        f"{done.get('bias_scales_derived', 0)} bias scales as Mul",
        f"{done.get('names_shortened', 0)} names shortened",
        f"{done.get('value_info_dropped', 0)} value-info dropped",
    ]
    return ", ".join(parts)


def _float_outputs(stats: dict[str, Any]) -> str:
    kept = stats.get("float_outputs")
    if kept is None:
        return "n/a"
    if not kept:
        return "none (int8 up to the outputs)"
    more = ", ..." if len(kept) > 3 else ""
    return f"{len(kept)} int8 layer output(s) left in float ({', '.join(kept[:3])}{more})"


def _float_layers(stats: dict[str, Any]) -> str:
    count = stats.get("float_compute_nodes", 0)
    names = stats.get("float_compute_names") or []
    if not count:
        return "0"
    shown = ", ".join(names[:5]) + (", ..." if count > 5 else "")
    return f"{count} ({shown})"


def _render_budget(budget: dict[str, Any]) -> None:
    """Drop before and after, the nodes kept in float, and every trial with its latency."""
    unit = budget["unit"]
    kept = budget["kept_float"]
    int8_weights = budget.get("int8_weight_fallback") or []
    cost = budget.get("latency_cost_ms")
    console.print(
        escape(
            f"accuracy budget {budget['budget']:g} {unit}: full int8 dropped "
            f"{budget['drop_full_int8']:.3f}, the result drops {budget['drop']:.3f} with "
            f"{len(kept)} node(s) in float"
            + (f" ({', '.join(kept[:8])}{', ...' if len(kept) > 8 else ''})" if kept else "")
            + (f", {len(int8_weights)} with int8 weights" if int8_weights else "")
            + (
                f"; p50 {budget['p50_ms_full_int8']:.3f} -> {budget['p50_ms']:.3f} ms at 1 "
                f"thread ({cost:+.3f} ms)"
                if cost is not None
                else ""
            )
        )
    )
    table = Table(title="Accuracy-budget trials")
    for column in ("float nodes", "their weights", "drop", "p50 ms (1 thread)", "cost ms", "fits"):
        table.add_column(column)
    for trial in budget["trials"]:
        weights = "int8" if trial.get("fallback") == "int8-weights" else "float"
        table.add_row(
            str(trial["kept_float"]),
            weights if trial["kept_float"] else "-",
            f"{trial['drop']:.3f}",
            "-" if trial["p50_ms"] is None else f"{trial['p50_ms']:.4f}",
            "-" if trial["latency_cost_ms"] is None else f"{trial['latency_cost_ms']:+.4f}",
            "yes" if trial["fits"] else "no",
        )
    console.print(table)

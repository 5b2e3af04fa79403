"""`optimodel fp16`: float16 / bfloat16 conversion with measured float32 fallback."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from optimodel.cli.common import console, handle_errors
from optimodel.cli.options import (
    DataOpt,
    ExternalDataOpt,
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
from optimodel.cli.transform_cmd import finish_transform

BF16_NOTE = (
    "ONNX Runtime has no bfloat16 kernels on CPU, so the bf16 model cannot run here: it "
    "was checked with ONNX's strict type inference and its accuracy measured on a float32 "
    "emulation of it (every bf16 tensor rounded to bf16); run it with CUDA or TensorRT"
)
CPU_NOTE = (
    "fp16 mostly pays off on GPU providers (CUDA, TensorRT): ONNX Runtime on CPU runs most "
    "float16 ops by casting back to float32, so expect a smaller file, not a faster CPU run"
)
GPU_LIKE_COSINE = 0.999


def _notes(stats: dict[str, Any], bf16: bool) -> list[str]:
    """What the user should know beyond the tables: why nodes stayed float32, caveats."""
    from optimodel.runtime.sessions import available_providers

    notes = list(stats.get("notes", []))
    kept = stats.get("kept_by_reason") or {}
    if kept:
        why = ", ".join(f"{reason} {count}" for reason, count in kept.items())
        notes.append(f"{stats.get('nodes_kept_float32', 0)} nodes kept in float32 ({why})")
    cosine = stats.get("emulated_cosine")
    if not bf16 and cosine is not None and cosine < GPU_LIKE_COSINE:
        notes.append(
            f"with float16 storage between every op (as GPU kernels run it) the outputs' "
            f"cosine on the calibration data is {cosine:.5f}; ONNX Runtime on CPU keeps some "
            "intermediates in float32, so check on the GPU, or add --accuracy-fallback or "
            "--block-op"
        )
    if bf16:
        notes.append(BF16_NOTE)
    elif "CUDAExecutionProvider" not in available_providers():
        notes.append(CPU_NOTE)
    return notes


def _render_precision(stats: dict[str, Any]) -> None:
    table = Table(title=f"Precision ({escape(str(stats.get('format')))})")
    for col in ("converted", "kept float32", "casts", "weights", "calibration cosine*"):
        table.add_column(col)
    cosine = stats.get("emulated_cosine")
    table.add_row(
        f"{stats.get('nodes_converted', 0):,}",
        f"{stats.get('nodes_kept_float32', 0):,}",
        f"{stats.get('casts_inserted', 0):,}",
        f"{stats.get('weight_bytes_before', 0):,} -> {stats.get('weight_bytes_after', 0):,}",
        f"{cosine:.6f}" if isinstance(cosine, float) else "-",
    )
    console.print(table)
    kept = stats.get("kept") or []
    if kept:
        nodes = Table(title="Kept in float32")
        for col in ("node", "op", "why"):
            nodes.add_column(col, overflow="fold")
        for entry in kept[:15]:
            nodes.add_row(escape(entry["node"]), escape(entry["op"]), escape(entry["reason"]))
        if len(kept) > 15:
            nodes.add_row(f"... {len(kept) - 15} more (see --report)", "", "")
        console.print(nodes)
    console.print("* emulated 16-bit storage between every op, on the calibration data")


@handle_errors
def fp16(
    model: ModelArg,
    output: OutputOpt,
    bf16: Annotated[
        bool, typer.Option("--bf16", help="Convert to bfloat16 instead of float16.")
    ] = False,
    keep_io_types: Annotated[
        bool,
        typer.Option(
            "--keep-io-types", help="Keep float32 inputs and outputs (Casts at the boundary)."
        ),
    ] = False,
    block_op: Annotated[
        list[str] | None,
        typer.Option(
            "--block-op",
            help="Keep every node of this op type in float32 (added to the default list). "
            "Repeatable.",
            show_default=False,
        ),
    ] = None,
    block_node: Annotated[
        list[str] | None,
        typer.Option(
            "--block-node",
            help="Keep this node (by name) in float32. Repeatable.",
            show_default=False,
        ),
    ] = None,
    no_fallback: Annotated[
        bool,
        typer.Option(
            "--no-fallback",
            help="Do not measure activations; convert everything the schemas allow.",
        ),
    ] = False,
    accuracy_fallback: Annotated[
        bool,
        typer.Option(
            "--accuracy-fallback",
            help="Also keep float32 where 16-bit storage loses accuracy on the data "
            "(emulated; slower, keeps more nodes).",
        ),
    ] = False,
    samples: Annotated[
        int, typer.Option("--samples", min=1, help="Feeds used to measure activation ranges.")
    ] = 4,
    force: ForceOpt = False,
    no_verify: NoVerifyOpt = False,
    data: DataOpt = None,
    shape: ShapeOpt = None,
    int_range: IntRangeOpt = "0:255",
    pass_timeout: PassTimeoutOpt = None,
    external_data: ExternalDataOpt = None,
    report: ReportOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert to float16 (or bfloat16), keeping in float32 what overflows or breaks."""
    from optimodel.data import parse_int_range, parse_shapes
    from optimodel.passes import get_pass
    from optimodel.report import check_report_paths
    from optimodel.transform import transform_file

    reports = check_report_paths(report)
    shapes = parse_shapes(shape)
    ints = parse_int_range(int_range)
    conversion = get_pass(
        "fp16",
        bf16=bf16,
        keep_io_types=keep_io_types,
        block_ops=list(block_op or []),
        block_nodes=list(block_node or []),
        fallback=not no_fallback,
        data=data,
        shapes=shapes,
        int_range=ints,
        samples=samples,
        refine=accuracy_fallback,
        verify=not no_verify,
    )
    run = transform_file(
        model,
        output,
        [conversion],
        subcommand="fp16",
        force=force,
        # fp16 is verified like every pass (feeds cast to float16 inputs); bf16 has no ORT
        # CPU kernels, so the pass checks it on a float32 emulation itself.
        verify=not no_verify and not bf16,
        data=data,
        shapes=shapes,
        int_range=ints,
        pass_timeout=pass_timeout,
        external_data=external_data,
    )
    stats = run.passes[0].get("stats", {}) if run.passes else {}
    if stats.get("verification"):
        run.verification = stats["verification"]
    run.messages.extend(_notes(stats, bf16))
    if stats and not (quiet or json_out):
        _render_precision(stats)
    finish_transform(run, reports, json_out, quiet)

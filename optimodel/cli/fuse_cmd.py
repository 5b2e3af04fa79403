"""`optimodel fuse`: operator fusion by named patterns, verified against the input."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import typer

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


class Preset(str, Enum):
    auto = "auto"
    cnn = "cnn"
    transformer = "transformer"


class Target(str, Enum):
    ort = "ort"
    portable = "portable"


@handle_errors
def fuse(
    model: ModelArg,
    output: OutputOpt,
    preset: Annotated[
        Preset,
        typer.Option(
            "--preset",
            help="Pattern set: auto (by what the graph holds), cnn or transformer.",
        ),
    ] = Preset.auto,
    target: Annotated[
        Target,
        typer.Option(
            "--target",
            help="ort: may use ONNX Runtime's com.microsoft ops (Attention, BiasGelu...); "
            "portable: standard ONNX ops only.",
        ),
    ] = Target.ort,
    skip: Annotated[
        list[str] | None,
        typer.Option(
            "--skip",
            help="Turn a pattern off by name (e.g. conv-bn, attention); repeatable. "
            "An unknown name lists them all.",
            show_default=False,
        ),
    ] = None,
    enable: Annotated[
        list[str] | None,
        typer.Option(
            "--enable",
            help="Turn on a pattern that is off by default: skip-layernorm (ONNX Runtime's "
            "CPU kernel is slower than Add + LayerNormalization; faster on CUDA), "
            "conv-activation (FusedConv: ONNX Runtime's CPU provider fuses it itself at "
            "load; its CUDA kernel runs Relu only). Repeatable.",
            show_default=False,
        ),
    ] = None,
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
    """Fuse Conv+BN, MatMul+Add, Transpose/Reshape chains, LayerNorm, GELU and Attention."""
    from optimodel.data import parse_int_range, parse_shapes
    from optimodel.passes import get_pass
    from optimodel.report import check_report_paths
    from optimodel.transform import transform_file

    reports = check_report_paths(report)
    fuse_pass = get_pass(
        "fuse", preset=preset.value, target=target.value, skip=skip or [], enable=enable or []
    )
    run = transform_file(
        model,
        output,
        [fuse_pass],
        subcommand="fuse",
        force=force,
        verify=not no_verify,
        data=data,
        shapes=parse_shapes(shape),
        int_range=parse_int_range(int_range),
        pass_timeout=pass_timeout,
        external_data=external_data,
    )
    finish_transform(run, reports, json_out, quiet)
    if not (json_out or quiet):
        _print_fusions(run.to_dict())


def _print_fusions(data: dict[str, Any]) -> None:
    """What fired, and the warnings a transformer graph earns when key fusions did not."""
    from rich.markup import escape

    for record in data.get("passes", []):
        if record.get("name") != "fuse" or record.get("status") != "ok":
            continue
        stats = record.get("stats", {})
        fired = {k: v for k, v in stats.get("fired", {}).items() if v}
        listed = ", ".join(f"{k} x{v}" for k, v in fired.items()) or "nothing"
        console.print(f"fused: {escape(listed)}")
        for name, why in stats.get("off_by_default", {}).items():
            console.print(f"off by default: {escape(name)} ({escape(why)})")
        for warning in stats.get("warnings", []):
            console.print(f"[yellow]warning:[/] {escape(warning)}")

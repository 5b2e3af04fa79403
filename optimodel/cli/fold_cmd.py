"""`optimodel fold`: constant folding and clean-up, verified against the input."""

from __future__ import annotations

from typing import Annotated

import typer

from optimodel.cli.common import handle_errors
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


@handle_errors
def fold(
    model: ModelArg,
    output: OutputOpt,
    max_constant_bytes: Annotated[
        int,
        typer.Option(
            "--max-constant-bytes",
            min=0,
            help="Largest growth in bytes one folded constant may add (Tile/Expand guard).",
        ),
    ] = 1 << 20,
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
    """Fold constants, resolve static shapes, remove no-ops, dead code and duplicates."""
    from optimodel.data import parse_int_range, parse_shapes
    from optimodel.passes import get_pass
    from optimodel.report import check_report_paths
    from optimodel.transform import transform_file

    reports = check_report_paths(report)
    run = transform_file(
        model,
        output,
        [get_pass("fold", max_constant_bytes=max_constant_bytes)],
        subcommand="fold",
        force=force,
        verify=not no_verify,
        data=data,
        shapes=parse_shapes(shape),
        int_range=parse_int_range(int_range),
        pass_timeout=pass_timeout,
        external_data=external_data,
    )
    finish_transform(run, reports, json_out, quiet)

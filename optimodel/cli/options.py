"""Option declarations shared by several commands, so flags mean the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ModelArg = Annotated[Path, typer.Argument(help="ONNX model file (.onnx).", show_default=False)]
ShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--shape",
        help="Fix a dynamic input shape, NAME=DIMxDIM... (e.g. input=1x3x224x224). Repeatable.",
        show_default=False,
    ),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Input data: a .npz (samples stacked), a folder of one-feed .npz files, ONNX "
        "test_data_set_*/input_*.pb folders, or 'random'.",
        show_default=False,
    ),
]
BatchSizeOpt = Annotated[
    int, typer.Option("--batch-size", min=1, help="Batch size for random data and stacked .npz.")
]
SamplesOpt = Annotated[
    int | None,
    typer.Option("--samples", min=1, help="Use at most N samples / feeds.", show_default=False),
]
IntRangeOpt = Annotated[
    str, typer.Option("--int-range", help="Range LOW:HIGH of random integer inputs.")
]
ProviderOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--provider",
        help="Execution provider: cpu, cuda, tensorrt. Repeat for a priority list.",
        show_default=False,
    ),
]
ThreadsOpt = Annotated[
    int, typer.Option("--threads", min=0, help="Intra-op threads (0: ONNX Runtime's default).")
]
ReportOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--report",
        help="Write the run's report; format from the suffix: .json, .md, .html. Repeatable.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON to stdout instead of tables.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
CustomOpsOpt = Annotated[
    Path | None,
    typer.Option(
        "--custom-op-library",
        help="Shared library with custom op kernels for ONNX Runtime (loaded only when given).",
        show_default=False,
    ),
]
OutputOpt = Annotated[
    Path, typer.Option("--output", "-o", help="Where to write the model.", show_default=False)
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output file.")]
NoVerifyOpt = Annotated[
    bool, typer.Option("--no-verify", help="Skip the numeric comparison with the input model.")
]
PassTimeoutOpt = Annotated[
    float | None,
    typer.Option(
        "--pass-timeout",
        min=0,
        help="Seconds each pass may take; a pass that runs out is skipped and said.",
        show_default=False,
    ),
]
ExternalDataOpt = Annotated[
    bool | None,
    typer.Option(
        "--external-data/--no-external-data",
        help="Store weights in OUTPUT.data (default: only above the 2 GB protobuf limit).",
        show_default=False,
    ),
]

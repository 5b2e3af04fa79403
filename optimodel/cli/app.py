"""The `optimodel` Typer application: registers the commands, nothing else."""

from __future__ import annotations

from typing import Annotated

import typer

from optimodel import __version__
from optimodel.cli import (
    batch_cmd,
    bench_cmd,
    compare_cmd,
    doctor_cmd,
    eval_cmd,
    fold_cmd,
    fp16_cmd,
    fuse_cmd,
    inspect_cmd,
    optimize_cmd,
    prune_cmd,
    quantize_cmd,
)
from optimodel.cli.common import STATE

app = typer.Typer(
    name="optimodel",
    help="Optimize ONNX models and prove every step with numbers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        print(f"optimodel {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Optimize ONNX models and prove every step with numbers."""
    STATE["debug"] = debug


app.command("inspect")(inspect_cmd.inspect)
app.command("eval")(eval_cmd.eval_command)
app.command("fold")(fold_cmd.fold)
app.command("fuse")(fuse_cmd.fuse)
app.command("fp16")(fp16_cmd.fp16)
app.command("quantize")(quantize_cmd.quantize)
app.command("prune")(prune_cmd.prune)
app.command("compare")(compare_cmd.compare)
app.command("bench")(bench_cmd.bench)
app.command("doctor")(doctor_cmd.doctor)
app.command("optimize")(optimize_cmd.optimize)
app.command("batch")(batch_cmd.batch)


def main() -> None:
    app()

"""`optimodel inspect`: what a model is, as rich tables or JSON."""

from __future__ import annotations

import json
from typing import Any

from rich.markup import escape
from rich.table import Table

from optimodel.cli.common import console, handle_errors, write_reports
from optimodel.cli.options import JsonOpt, ModelArg, QuietOpt, ReportOpt, ShapeOpt


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _human_count(n: int) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _shape(dims: list[Any]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def render_inspect(info: dict[str, Any]) -> None:
    """Print inspect data as tables."""
    params = info["parameters"]
    macs = info["macs"]
    overview = Table(title=escape(str(info.get("path", "model"))), show_header=False, box=None)
    overview.add_column(style="cyan")
    overview.add_column()
    if "total_bytes" in info:
        overview.add_row(
            "size", f"{_human_bytes(info['total_bytes'])} ({info['total_bytes']:,} bytes)"
        )
    overview.add_row("IR version", str(info["ir_version"]))
    overview.add_row("opsets", ", ".join(f"{d} {v}" for d, v in info["opsets"].items()))
    if info["producer"]:
        overview.add_row("producer", info["producer"])
    overview.add_row(
        "nodes",
        f"{info['nodes']:,}"
        + (
            f" ({info['nodes_with_subgraphs']:,} with subgraphs)"
            if info["nodes_with_subgraphs"] != info["nodes"]
            else ""
        ),
    )
    overview.add_row(
        "parameters",
        f"{_human_count(params['count'])} ({params['count']:,}), {_human_bytes(params['bytes'])}",
    )
    overview.add_row(
        "sparsity",
        f"{100 * params['sparsity']:.2f}% zeros in float weights"
        + (f", {params['sparse_tensors']} tensors >= 50% zero" if params["sparse_tensors"] else ""),
    )
    assumed = ", ".join(
        f"{k}={'x'.join(map(str, v))}" for k, v in macs["assumed_input_shapes"].items()
    )
    mac_text = f"{_human_count(macs['total'])} ({macs['total']:,}) at {assumed or 'static shapes'}"
    if macs["unresolved_nodes"]:
        mac_text += f"; {macs['unresolved_nodes']} node(s) with unknown shapes not counted"
    overview.add_row("MACs", escape(mac_text))
    if info.get("custom_domains"):
        overview.add_row(
            "custom domains",
            ", ".join(f"{d} ({n} nodes)" for d, n in info["custom_domains"].items()),
        )
    for entry in info.get("external_data", []):
        overview.add_row("external data", f"{entry['file']} ({_human_bytes(entry['bytes'])})")
    for key, value in info.get("provenance", {}).items():
        overview.add_row(f"optimodel {key}", escape(value))
    console.print(overview)

    signature = Table(title="Inputs / outputs")
    for col in ("kind", "name", "dtype", "shape"):
        signature.add_column(col)
    for kind in ("inputs", "outputs"):
        for value in info[kind]:
            signature.add_row(
                kind[:-1], escape(value["name"]), value["dtype"], escape(_shape(value["shape"]))
            )
    console.print(signature)

    ops = Table(title="Operators")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in info["ops"].items():
        ops.add_row(escape(op), str(count))
    console.print(ops)

    dtypes = Table(title="Parameters by dtype")
    for col in ("dtype", "tensors", "elements", "bytes"):
        dtypes.add_column(col, justify="left" if col == "dtype" else "right")
    for dtype, entry in params["by_dtype"].items():
        dtypes.add_row(
            dtype, f"{entry['tensors']:,}", f"{entry['elements']:,}", f"{entry['bytes']:,}"
        )
    console.print(dtypes)

    if info["subgraphs"]:
        subs = Table(title="Subgraphs")
        for col in ("node", "op", "attribute", "nodes"):
            subs.add_column(col)
        for sub in info["subgraphs"]:
            subs.add_row(escape(sub["node"]), sub["op"], sub["attribute"], str(sub["nodes"]))
        console.print(subs)
    if macs["by_op"]:
        mac_table = Table(title="MACs by op")
        mac_table.add_column("op")
        mac_table.add_column("MACs", justify="right")
        for op, count in macs["by_op"].items():
            mac_table.add_row(op, f"{count:,}")
        console.print(mac_table)


@handle_errors
def inspect(
    model: ModelArg,
    json_out: JsonOpt = False,
    shape: ShapeOpt = None,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Show opset, signature, op histogram, parameters, sparsity, MACs, external data."""
    from optimodel.data import parse_shapes
    from optimodel.inspection import inspect_model
    from optimodel.modelio import check_model, load_model
    from optimodel.report import Report, check_report_paths, model_record

    reports = check_report_paths(report)
    shapes = parse_shapes(shape)
    run = Report(subcommand="inspect")
    loaded = load_model(model, check=False)
    info = inspect_model(loaded, model, shapes=shapes)
    run.input_model = model_record(model, loaded)
    run.inspect = info
    run.finish()
    if json_out:
        print(json.dumps(info, indent=2))
    elif not quiet:
        render_inspect(info)
    write_reports(run, reports, quiet or json_out)
    check_model(loaded, model, strict=True)  # shown first, judged after: invalid exits 1

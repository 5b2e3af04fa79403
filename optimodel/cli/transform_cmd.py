"""Shared driver and output for commands that write a model (fold, fuse, ...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from optimodel.cli.common import console, write_reports


def _num(value: Any) -> str:
    from optimodel.report import _fmt

    return escape(_fmt(value))


def render_transform(data: dict[str, Any]) -> None:
    """Passes table, before/after table, verification and the verdict line."""
    from optimodel.report import DIFF_HEADERS, diff_rows, verdict

    passes = Table(title="Passes")
    for col in ("pass", "status", "seconds", "nodes", "bytes", "verified cosine"):
        passes.add_column(col)
    for rec in data["passes"]:
        ver = rec.get("verification")
        cosine = min((o["cosine"] for o in ver["outputs"]), default=None) if ver else None
        passes.add_row(
            rec["name"],
            rec["status"] if rec["status"] == "ok" else f"[yellow]{escape(rec['status'])}[/]",
            f"{rec['seconds']:.3f}",
            f"{rec['nodes_before']:,} -> {rec['nodes_after']:,}",
            f"{rec['bytes_before']:,} -> {rec['bytes_after']:,}",
            _num(cosine) if cosine is not None else "-",
        )
    console.print(passes)
    before, after = data["input_model"], data["output_model"]
    models = Table(title="Model")
    for col in ("", "nodes", "parameters", "bytes", "path"):
        models.add_column(col, overflow="fold")
    for label, rec in (("before", before), ("after", after)):
        if rec is None:  # a gate removed it
            models.add_row(label, "-", "-", "-", "not written")
            continue
        models.add_row(
            label,
            _num(rec["nodes"]),
            _num(rec["parameters"]),
            _num(rec["bytes"]),
            escape(rec["path"]),
        )
    console.print(models)
    if data.get("verification"):
        ver = data["verification"]
        table = Table(title=escape(f"Verification against the input ({ver['data']})"))
        for col in DIFF_HEADERS:
            table.add_column(col)
        for row in diff_rows(ver):
            table.add_row(*[_num(c) for c in row])
        console.print(table)
    for message in data.get("messages", []):
        console.print(f"[yellow]note:[/] {escape(message)}")
    console.print(f"[green]{escape(verdict(data))}[/]")


def finish_transform(report: Any, reports: list[Path], json_out: bool, quiet: bool) -> None:
    data = report.to_dict()
    if json_out:
        print(json.dumps(data, indent=2))
    elif not quiet:
        render_transform(data)
    write_reports(report, reports, quiet or json_out)

"""`optimodel doctor`: versions, providers, CPU features and known-bad combinations."""

from __future__ import annotations

import json
from typing import Any

from rich.markup import escape
from rich.table import Table

from optimodel.cli.common import console, handle_errors
from optimodel.cli.options import JsonOpt


def render_doctor(info: dict[str, Any]) -> None:
    """Print the diagnosis as tables, warnings in yellow."""
    versions = Table(title="Versions")
    versions.add_column("package")
    versions.add_column("version")
    for name, version in info["versions"].items():
        versions.add_row(name, escape(version or "not installed"))
    for name, version in info["onnxruntime_packages"].items():
        versions.add_row(f"{name} (wheel)", escape(version))
    console.print(versions)

    providers = Table(title="Execution providers")
    providers.add_column("provider")
    providers.add_column("available")
    problems = info.get("provider_problems", {})
    for key, available in info["provider_support"].items():
        if available:
            providers.add_row(key, "[green]yes[/]")
        elif key in problems:
            providers.add_row(key, f"[red]listed, cannot start:[/] {escape(problems[key])}")
        else:
            providers.add_row(key, "no")
    others = [p for p in info["providers"] if p not in _KNOWN]
    if others:
        providers.add_row("other", escape(", ".join(others)))
    console.print(providers)
    if not info["onnxruntime_gpu_installed"]:
        console.print("CUDA and TensorRT come with: pip install 'optimodel\\[gpu]'")

    cpu = info["cpu"]
    table = Table(title="CPU", show_header=False)
    table.add_column(style="cyan")
    table.add_column()
    table.add_row("model", escape(f"{cpu['model'] or 'unknown'} ({cpu['cores']} cores)"))
    present = [name for name, on in cpu["flags"].items() if on]
    table.add_row("features", escape(", ".join(present) or "none of interest found"))
    table.add_row("int8", escape(cpu["int8"]))
    table.add_row("fp16", escape(cpu["fp16"]))
    console.print(table)
    for note in info.get("notes", []):
        console.print(f"[cyan]note:[/] {escape(note)}")
    for warning in info["warnings"]:
        console.print(f"[bold yellow]warning:[/] {escape(warning)}")
    if not info["warnings"]:
        console.print("[green]no known-bad combination found[/]")


_KNOWN = ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider")


@handle_errors
def doctor(json_out: JsonOpt = False) -> None:
    """Show versions, execution providers, CPU features, and known-bad combinations."""
    from optimodel.runtime.doctor import diagnose

    info = diagnose()
    if json_out:
        print(json.dumps(info, indent=2))
    else:
        render_doctor(info)

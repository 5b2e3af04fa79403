"""Side-by-side benchmark of optimodel and peer tools on real ONNX models.

    python benchmarks/run.py [--models a,b] [--tools x,y] [--quick] [--out RESULTS.md]

Every tool runs on every model; each output is measured against the original in the
same run (graph figures, fidelity, paired ONNX Runtime CPU latency and load time).
Writes Markdown (ratios first) and `results.json` (raw figures) next to it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import measure
import models
import render
from peers import unavailable
from tools import TOOLS, describe, run_tool

HERE = Path(__file__).resolve().parent
PACKAGES = [
    "onnx",
    "onnxruntime",
    "numpy",
    "onnxslim",
    "onnxsim",
    "onnxoptimizer",
    "pillow",
    "psutil",
    "optimodel",
]
SETTINGS = {
    "full": {"rounds": 31, "block_s": 0.02, "budget_s": 40.0, "load_reps": 9},
    "quick": {"rounds": 7, "block_s": 0.01, "budget_s": 8.0, "load_reps": 3},
}
THREADS: dict[str, int | None] = {"1 thread": 1, "default threads": None}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        cmd = ["sysctl", "-n", "machdep.cpu.brand_string"]
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
    return platform.processor() or "unknown"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine() -> dict[str, Any]:
    """CPU model and cores, memory, OS, Python and package versions."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "os": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
    }
    flags = _cpu_flags()
    if flags:
        info["int8_dot_product"] = sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
        info["avx512"] = "avx512f" in flags
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    info["packages"] = versions
    return info


def _select(given: str | None, known: list[str], what: str) -> list[str]:
    if not given:
        return known
    names = [n.strip() for n in given.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown {what}: {', '.join(bad)}; choose from: {', '.join(known)}")
    return names


def bench_model(
    bench: models.BenchModel, tools: list[str], settings: dict[str, Any], runs_dir: Path
) -> dict[str, Any]:
    """Run every tool on one model and measure each output against the original."""
    ref_session = measure.session(bench.path, None)
    output_names = [o.name for o in ref_session.get_outputs()]
    reference = measure.run_all(ref_session, output_names, bench.eval_feeds)
    del ref_session
    original = {"tool": "original", "output": str(bench.path), **measure.graph_stats(bench.path)}
    rows: list[dict[str, Any]] = [original]
    for tool in tools:
        result = run_tool(tool, bench.path, runs_dir / bench.name / tool, bench.calib_feeds)
        row: dict[str, Any] = {
            "tool": tool,
            "seconds": result.seconds,
            "peak_mb": result.peak_mb,
            "error": result.error,
            "output": str(result.output) if result.output else None,
        }
        if result.output is not None:
            row.update(measure.graph_stats(result.output))
            try:
                candidate = measure.session(result.output, None)
                outputs = measure.run_all(candidate, output_names, bench.eval_feeds)
                row["fidelity"] = measure.fidelity(reference, outputs, bench.task)
            except Exception as exc:  # a broken output is a result, not a crash
                row["load_error"] = measure_error(exc)
        rows.append(row)
        print(f"    {tool:<18} {render.progress(row)}", flush=True)

    runnable = {r["tool"]: Path(r["output"]) for r in rows if r["output"] and "load_error" not in r}
    by_tool = {r["tool"]: r for r in rows}
    for label, threads in THREADS.items():
        sessions = {name: measure.session(path, threads) for name, path in runnable.items()}
        figures = measure.latency(
            sessions,
            bench.latency_feed,
            rounds=settings["rounds"],
            block_s=settings["block_s"],
            budget_s=settings["budget_s"],
        )
        del sessions
        for name, fig in figures.items():
            by_tool[name].setdefault("latency", {})[label] = fig
        print(f"    latency ({label}): {render.ratio_line(figures)}", flush=True)
    loads = measure.load_time(runnable, reps=settings["load_reps"])
    for name, fig in loads.items():
        by_tool[name]["load"] = fig
    print(f"    load time: {render.ratio_line(loads)}", flush=True)
    return {
        "name": bench.name,
        "source": bench.source,
        "task": bench.task,
        "inputs": {k: [list(v.shape), str(v.dtype)] for k, v in bench.latency_feed.items()},
        "notes": bench.notes,
        "rows": rows,
    }


def measure_error(exc: BaseException) -> str:
    """One line for an output that ONNX Runtime cannot load or run."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:180]


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run the benchmark, write Markdown and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    registry = models.model_registry()
    parser.add_argument("--models", help=f"comma-separated subset of: {', '.join(registry)}")
    parser.add_argument(
        "--tools", help=f"comma-separated subset of: {', '.join(TOOLS)} (copy always runs)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md", help="Markdown output")
    parser.add_argument(
        "--json", type=Path, help="raw figures (default: results.json beside --out)"
    )
    parser.add_argument("--cache", type=Path, default=models.CACHE, help="model/output cache")
    args = parser.parse_args(argv)

    try:
        names = _select(args.models, list(registry), "model")
        tools = _select(args.tools, list(TOOLS), "tool")
    except ValueError as exc:
        parser.error(str(exc))
    tools = ["copy", *[t for t in tools if t != "copy"]]
    settings = SETTINGS["quick" if args.quick else "full"]
    json_path = args.json or args.out.with_name("results.json")
    started = time.perf_counter()
    info = machine()
    print(
        f"{info['cpu']}, {info['usable_cores']} usable cores; {len(names)} models x "
        f"{len(tools)} tools ({'quick' if args.quick else 'full'})",
        flush=True,
    )

    results: list[dict[str, Any]] = []
    for index, name in enumerate(names, 1):
        print(f"[{index}/{len(names)}] {name}", flush=True)
        model_start = time.perf_counter()
        bench = registry[name](args.cache)
        results.append(bench_model(bench, tools, settings, args.cache / "runs"))
        results[-1]["seconds"] = time.perf_counter() - model_start
        print(f"    ({results[-1]['seconds']:.0f} s)", flush=True)

    report = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "benchmarks/run.py", *(argv or sys.argv[1:])]),
        "machine": info,
        "settings": {
            **settings,
            "mode": "quick" if args.quick else "full",
            "threads": list(THREADS),
        },
        "tools": {t: describe(t) for t in tools},
        "unavailable": unavailable(),
        "models": results,
        "total_seconds": time.perf_counter() - started,
    }
    json_path.write_text(json.dumps(_relative(report), indent=1, default=str) + "\n")
    kept = _later_sections(args.out)
    args.out.write_text(render.markdown(_relative(report)).rstrip() + "\n" + kept)
    print(f"wrote {args.out} and {json_path} in {report['total_seconds']:.0f} s", flush=True)
    return 0


# Sections after the main run (other runs, scaling, the >2 GB model) written by other
# scripts or runs: a new main run keeps them as they are.
LATER = (
    "## Additional runs",
    "<!-- scaling:start -->",
    "<!-- huge:start -->",
    "<!-- gpu:start -->",
    "<!-- prune-calibration:start -->",
)


def _later_sections(path: Path) -> str:
    """The part of an existing RESULTS.md from its first later section on ("" if none)."""
    if not path.exists():
        return ""
    text = path.read_text()
    starts = [text.find(marker) for marker in LATER if marker in text]
    return "\n" + text[min(starts) :] if starts else ""


def _relative(value: Any) -> Any:
    """Paths inside the repository or cache as repository-relative strings."""
    root = str(models.ROOT) + os.sep
    if isinstance(value, dict):
        return {k: _relative(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v) for v in value]
    if isinstance(value, str):
        return value.replace(root, "")
    return value


if __name__ == "__main__":
    raise SystemExit(main())

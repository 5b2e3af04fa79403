"""`batch`: optimize every model of a folder or glob with one recipe, in a process pool.

Each model runs `optimize_file` in a worker process (spawned, so no state is shared)
and writes OUT/<stem>.onnx and OUT/<stem>.report.json. A model that fails becomes a row
with a one-line error and the batch carries on; a worker process that dies (killed, out
of memory, a crash in native code) breaks the whole pool, so the models it took down are
run again, each in a process of its own, and the one that dies again is reported failed.
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from optimodel.errors import OptimodelError, UsageError

STATUSES = ("ok", "failed", "gate_failed")
GLOB_CHARS = set("*?[")
MAX_MESSAGE = 400
DIED = "the worker process died while optimizing it (killed, out of memory or a native crash)"
BATCH_REPORT_SUFFIXES = (".json", ".md")

Worker = Callable[[dict[str, Any]], dict[str, Any]]


def find_models(source: str | Path, recursive: bool = False) -> list[Path]:
    """The .onnx files of a folder (recursive on request), a glob pattern, or one file."""
    text = str(source)
    path = Path(text)
    if path.is_dir():
        found = path.rglob("*.onnx") if recursive else path.glob("*.onnx")
        where = f"folder {text}" + (" (recursive)" if recursive else "")
    elif GLOB_CHARS & set(text):
        found = (Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
        where = f"pattern {text}"
    elif path.is_file():
        found = iter([path])
        where = f"file {text}"
    else:
        raise UsageError(f"{text}: no such folder or file, and not a glob pattern")
    models = sorted(p for p in found if p.is_file() and p.suffix.lower() == ".onnx")
    if not models:
        raise UsageError(
            f"no .onnx models found in {where}",
            None if recursive or not path.is_dir() else "use --recursive to search sub-folders",
        )
    return models


def plan_outputs(models: Iterable[Path], out_dir: Path) -> list[tuple[Path, Path, Path]]:
    """(model, OUT/<stem>.onnx, OUT/<stem>.report.json) for each model; refuses outputs
    that would overwrite an input or that two models would both write."""
    plan = []
    inputs = {p.resolve(): p for p in models}
    taken: dict[str, Path] = {}
    for model in models:
        output = out_dir / f"{model.stem}.onnx"
        report = out_dir / f"{model.stem}.report.json"
        if output.resolve() in inputs or report.resolve() in inputs:
            raise UsageError(
                f"--out {out_dir}: would overwrite the input {model}; "
                "choose an output folder other than the input folder"
            )
        other = taken.get(model.stem.lower())
        if other is not None:
            raise UsageError(
                f"{other} and {model} would both write {output.name} in {out_dir}; "
                "optimize them in separate batches"
            )
        taken[model.stem.lower()] = model
        plan.append((model, output, report))
    return plan


def _one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 3] + "..."


def _failure(model: str, message: str, seconds: float | None = None) -> dict[str, Any]:
    name = Path(model).name
    message = _one_line(message)
    if name not in message:
        message = f"{name}: {message}"
    return {"model": model, "status": "failed", "seconds": seconds, "error": message}


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    """The batch-table figures of one optimize report."""
    before, after = data.get("input_model") or {}, data.get("output_model") or {}
    bytes_in, bytes_out = before.get("bytes"), after.get("bytes")
    latency = data.get("latency") or []
    accuracy = data.get("accuracy") or {}
    outputs = (data.get("verification") or {}).get("outputs") or []
    cosines = [o["cosine"] for o in outputs if o.get("cosine") is not None]
    return {
        "status": data.get("status", "ok"),
        "nodes_before": before.get("nodes"),
        "nodes_after": after.get("nodes"),
        "bytes_before": bytes_in,
        "bytes_after": bytes_out,
        "bytes_ratio": round(bytes_out / bytes_in, 4) if bytes_in and bytes_out else None,
        "p50_ratio": latency[1].get("latency_ratio") if len(latency) == 2 else None,
        "accuracy_drop": accuracy.get("drop"),
        "cosine": min(cosines) if cosines else None,
        "notes": list(data.get("messages") or []),
    }


def optimize_one(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: optimize one model; every failure becomes a row, never an exception."""
    t0 = time.perf_counter()
    model = task["model"]
    try:
        from optimodel.modelio import model_scope
        from optimodel.optimize import optimize_file
        from optimodel.report import write_report

        with model_scope():  # a pool worker runs many models, each from its own folder
            report = optimize_file(model, task["output"], task["recipe"], **task["options"])
        data = report.to_dict()
        write_report(data, task["report"])
        row = {"model": model, **summarize(data), "error": None}
    except OptimodelError as exc:
        status = "gate_failed" if exc.exit_code == 3 else "failed"
        row = _failure(model, exc.message)
        row["status"] = status
    except MemoryError:
        row = _failure(model, "out of memory")
    except Exception as exc:  # a worker never raises: one bad model must not stop the rest
        row = _failure(model, f"internal error: {type(exc).__name__}: {exc}")
    row.update(output=task["output"], report=task["report"])
    if row["status"] == "failed":
        row.update(output=None, report=None)
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _run_pool(
    tasks: list[dict[str, Any]],
    jobs: int,
    worker: Worker,
    on_done: Callable[[dict[str, Any]], None],
) -> list[dict[str, Any]]:
    """Run tasks in one pool; returns the tasks lost to a dead worker (pool broken)."""
    lost = []
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"))
    try:
        futures: dict[Future[dict[str, Any]], dict[str, Any]] = {
            pool.submit(worker, task): task for task in tasks
        }
        for future in as_completed(futures):
            try:
                on_done(future.result())
            except BrokenProcessPool:
                lost.append(futures[future])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return lost


def _run_isolated(task: dict[str, Any], worker: Worker) -> dict[str, Any]:
    """One task in a process of its own, so a death is that model's alone."""
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        try:
            return pool.submit(worker, task).result()
        except BrokenProcessPool:
            return {
                **_failure(task["model"], DIED, round(time.perf_counter() - t0, 3)),
                "output": None,
                "report": None,
            }


def resolve_jobs(jobs: int | None, count: int) -> int:
    """Worker processes used: `jobs` (default: CPU count), at most one per model."""
    return max(1, min(jobs or os.cpu_count() or 1, count))


def batch_optimize(
    models: Iterable[str | Path],
    out_dir: str | Path,
    recipe_name: str = "default",
    jobs: int | None = None,
    *,
    set_options: list[str] | None = None,
    data: str | None = None,
    force: bool = False,
    verify: bool = True,
    bench: bool = False,
    runs: int | None = None,
    threads: int | None = None,
    max_drop: str | None = None,
    pass_timeout: float | None = None,
    on_done: Callable[[dict[str, Any]], None] | None = None,
    worker: Worker = optimize_one,
) -> list[dict[str, Any]]:
    """Optimize every model with the recipe in `jobs` processes; one row per model, in
    input order. The recipe and paths are checked before any process starts."""
    from optimodel.evaluate import parse_max_drop
    from optimodel.recipes import load_recipe

    paths = [Path(m) for m in models]
    if not paths:
        raise UsageError("no models to optimize")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    plan = plan_outputs(paths, out)
    existing = [output.name for _, output, _ in plan if output.exists()]
    if existing and not force:
        shown = ", ".join(existing[:3]) + (
            f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        )
        raise UsageError(
            f"--out {out}: {len(existing)} output(s) exist already ({shown})",
            "pass --force to replace them",
        )
    recipe = load_recipe(recipe_name, data=data)
    recipe.override(set_options)
    recipe.build()
    options = {
        "force": force,
        "verify": verify,
        "data": data,
        "bench": bench,
        "runs": runs,
        "threads": threads,
        "max_drop": parse_max_drop(max_drop) if max_drop is not None else None,
        "pass_timeout": pass_timeout,
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OptimodelError(f"--out {out}: cannot create the folder: {exc.strerror}") from None
    tasks = [
        {
            "model": str(model),
            "output": str(output),
            "report": str(report),
            "recipe": recipe,
            "options": options,
        }
        for model, output, report in plan
    ]
    jobs = resolve_jobs(jobs, len(tasks))
    rows: dict[str, dict[str, Any]] = {}

    def done(row: dict[str, Any]) -> None:
        rows[row["model"]] = row
        if on_done is not None:
            on_done(row)

    lost = _run_pool(tasks, jobs, worker, done)
    # no output existed before (or --force): one left by the broken pool is this batch's own
    lost = [{**t, "options": {**t["options"], "force": True}} for t in lost]
    if lost:
        with ThreadPoolExecutor(max_workers=jobs) as threads_pool:
            for row in threads_pool.map(lambda t: _run_isolated(t, worker), lost):
                done(row)
    return [rows[task["model"]] for task in tasks]


def batch_exit_code(rows: list[dict[str, Any]]) -> int:
    """1 if any model failed, else 3 if a gate failed, else 0."""
    statuses = {row["status"] for row in rows}
    if "failed" in statuses:
        return 1
    return 3 if "gate_failed" in statuses else 0


def batch_summary(
    rows: list[dict[str, Any]],
    *,
    out_dir: str | Path,
    recipe_name: str,
    jobs: int | None,
    seconds: float,
) -> dict[str, Any]:
    """One JSON-ready document for the whole batch."""
    from optimodel.report import SCHEMA_VERSION, command_line, tool_versions

    counts = {s: sum(1 for r in rows if r["status"] == s) for s in STATUSES}
    code = batch_exit_code(rows)
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": tool_versions(),
        "subcommand": "batch",
        "command": command_line(),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "status": {0: "ok", 1: "failed", 3: "gate_failed"}[code],
        "recipe": recipe_name,
        "out_dir": str(out_dir),
        "jobs": jobs,
        "counts": counts,
        "models": rows,
    }


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def quality(row: dict[str, Any]) -> str:
    """Accuracy drop (points) when measured, else the worst cosine against the input."""
    if row.get("accuracy_drop") is not None:
        return f"drop {row['accuracy_drop']:.2f}"
    if row.get("cosine") is not None:
        return f"cos {row['cosine']:.6f}"
    return "-"


def nodes_text(row: dict[str, Any]) -> str:
    if row.get("nodes_before") is None:
        return "-"
    return f"{row['nodes_before']}->{row.get('nodes_after', '-')}"


SUMMARY_HEADERS = ["model", "status", "nodes", "bytes x", "p50 x", "quality", "s", "error"]


def summary_cells(row: dict[str, Any]) -> list[str]:
    """One table row: the same cells for the terminal and the Markdown report."""
    return [
        Path(row["model"]).name,
        row["status"],
        nodes_text(row),
        fmt_ratio(row.get("bytes_ratio")),
        fmt_ratio(row.get("p50_ratio")),
        quality(row),
        "-" if row.get("seconds") is None else f"{row['seconds']:.2f}",
        row.get("error") or "",
    ]


def render_batch_markdown(summary: dict[str, Any]) -> str:
    counts = summary["counts"]
    lines = [
        f"# optimodel batch: {summary['status'].upper().replace('_', ' ')}",
        "",
        f"Recipe `{summary['recipe']}`, {len(summary['models'])} model(s) -> "
        f"`{summary['out_dir']}` with {summary['jobs']} job(s) in {summary['seconds']:.2f} s: "
        + ", ".join(f"{counts[s]} {s}" for s in STATUSES),
        "",
        "| " + " | ".join(SUMMARY_HEADERS) + " |",
        "|" + "---|" * len(SUMMARY_HEADERS),
    ]
    for row in summary["models"]:
        cells = [c.replace("|", "\\|") for c in summary_cells(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_batch_report(summary: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the batch summary atomically as .json or .md (by suffix)."""
    from optimodel.report import write_text_atomic

    target = Path(path)
    suffix = target.suffix.lower()
    if suffix == ".json":
        text = json.dumps(summary, indent=2) + "\n"
    elif suffix == ".md":
        text = render_batch_markdown(summary)
    else:
        raise UsageError(
            f"--report {target}: unknown format '{suffix}' for batch; use .json or .md"
        )
    return write_text_atomic(target, text)

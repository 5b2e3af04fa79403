"""The record of a run: JSON is the source of truth; terminal and Markdown render it.

Schema (version 1): tool versions, command line, input / output model records
(path, sha256, bytes, nodes, parameters, opset), passes, verification, latency,
accuracy, gates, and the status of the run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from optimodel import __version__
from optimodel.errors import OptimodelError, UsageError

SCHEMA_VERSION = 1
REPORT_SUFFIXES = (".json", ".md", ".html")


def command_line() -> str:
    """The command as the user typed it, with the program shown as `optimodel`."""
    import shlex

    args = list(sys.argv[1:]) if sys.argv else []
    return shlex.join(["optimodel", *args])


def tool_versions() -> dict[str, str]:
    """Versions that change results: recorded next to every figure."""
    versions = {"optimodel": __version__, "python": platform.python_version()}
    for module in ("onnx", "onnxruntime", "numpy"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:  # pragma: no cover - all are dependencies
            versions[module] = "missing"
    return versions


def model_record(
    path: str | os.PathLike[str], model: Any | None = None, data: bytes | None = None
) -> dict[str, Any]:
    """What identifies a model file in a report (`data`: the file's bytes, if read)."""
    from optimodel.modelio import (
        count_nodes,
        file_sha256,
        iter_tensors,
        load_model,
        model_files_bytes,
    )

    source = Path(path)
    if model is None:
        model = load_model(source, load_external_data=False)
    parameters = 0
    for tensor in iter_tensors(model):
        parameters += math.prod(tensor.dims) if tensor.dims else 1
    return {
        "path": str(source),
        "sha256": hashlib.sha256(data).hexdigest() if data is not None else file_sha256(source),
        "bytes": model_files_bytes(source, model),
        "nodes": count_nodes(model),
        "parameters": parameters,
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
    }


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become strings, tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "to_dict"):
        return _clean(value.to_dict())
    return value


@dataclass
class Report:
    """One run of one subcommand."""

    subcommand: str
    command: str = ""
    started_at: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )
    seconds: float = 0.0
    status: str = "ok"  # ok | failed | gate_failed
    input_model: dict[str, Any] | None = None
    output_model: dict[str, Any] | None = None
    reference_model: dict[str, Any] | None = None
    passes: list[dict[str, Any]] = field(default_factory=list)
    verification: dict[str, Any] | None = None
    latency: list[dict[str, Any]] = field(default_factory=list)
    accuracy: dict[str, Any] | None = None
    inspect: dict[str, Any] | None = None
    gates: list[dict[str, Any]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    recipe: dict[str, Any] | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    # other configurations tried (e.g. by an accuracy budget): name, latency, accuracy
    variants: list[dict[str, Any]] = field(default_factory=list)
    _t0: float = field(default_factory=time.perf_counter, repr=False)

    def finish(self) -> Report:
        self.seconds = round(time.perf_counter() - self._t0, 4)
        return self

    def to_dict(self) -> dict[str, Any]:
        data = {
            "schema_version": SCHEMA_VERSION,
            "tool": tool_versions(),
            "subcommand": self.subcommand,
            "command": self.command or command_line(),
            "started_at": self.started_at,
            "seconds": self.seconds,
            "status": self.status,
            "input_model": self.input_model,
            "output_model": self.output_model,
            "reference_model": self.reference_model,
            "passes": self.passes,
            "verification": self.verification,
            "latency": self.latency,
            "accuracy": self.accuracy,
            "inspect": self.inspect,
            "gates": self.gates,
            "messages": self.messages,
            "recipe": self.recipe,
            "stages": self.stages,
            "variants": self.variants,
        }
        return _clean(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1e5 or abs(value) < 1e-3:
            return f"{value:.3e}"
        return (
            f"{value:.{digits}g}"
            if abs(value) < 1
            else f"{value:.{digits}f}".rstrip("0").rstrip(".")
        )
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def model_rows(data: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for role in ("input_model", "reference_model", "output_model"):
        rec = data.get(role)
        if rec:
            rows.append(
                [
                    role.replace("_model", ""),
                    rec["path"],
                    rec["nodes"],
                    rec["parameters"],
                    rec["bytes"],
                    rec["opset"],
                    rec["sha256"][:12],
                ]
            )
    return rows


MODEL_HEADERS = ["role", "path", "nodes", "parameters", "bytes", "opset", "sha256"]
DIFF_HEADERS = ["output", "max abs diff", "mean abs diff", "cosine", "SNR dB", "top-1 agree"]


def diff_rows(verification: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for out in verification.get("outputs", []):
        snr = out.get("snr_db")
        rows.append(
            [
                out["name"],
                out["max_abs"],
                out["mean_abs"],
                out["cosine"],
                "identical" if snr is None else snr,
                None if out.get("top1_agreement") is None else out["top1_agreement"],
            ]
        )
    return rows


def accuracy_rows(accuracy: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for role in ("model", "reference"):
        rec = accuracy.get(role)
        if rec:
            if rec["task"] == "classification":
                rows.append(
                    [role, rec["output"], rec["samples"], rec["top1"], rec.get("top5"), None]
                )
            else:
                rows.append([role, rec["output"], rec["samples"], None, None, rec["mse"]])
    return rows


ACCURACY_HEADERS = ["model", "output", "samples", "top-1 %", "top-5 %", "MSE"]


def verdict(data: dict[str, Any]) -> str:
    """One line a CI log can grep."""
    status = data["status"].upper().replace("_", " ")
    parts = [f"{status}", f"optimodel {data['subcommand']}", f"{data['seconds']:.2f} s"]
    acc = data.get("accuracy") or {}
    if acc.get("model"):
        parts.append(f"{acc['model']['metric']} {_fmt(acc['model']['value'])}")
    if acc.get("drop") is not None:
        parts.append(f"drop {_fmt(acc['drop'])}")
    latency = data.get("latency") or []
    if len(latency) == 2 and latency[1].get("latency_ratio") is not None:
        parts.append(f"p50 x{latency[1]['latency_ratio']:.2f}")
    ver = data.get("verification") or (acc.get("fidelity") if acc else None)
    if ver and ver.get("outputs"):
        worst = min(o["cosine"] for o in ver["outputs"])
        parts.append(f"cosine {_fmt(worst, 6)}")
    for gate in data.get("gates", []):
        outcome = "passed" if gate["passed"] else "FAILED"
        if not gate["passed"] and gate.get("outcome") == "kept-float":
            outcome = "FAILED, kept float"
        parts.append(f"gate {gate['name']} {outcome}")
    return " | ".join(parts)


def render_markdown(report: Report | dict[str, Any]) -> str:
    """Markdown for a CI job summary."""
    data = report.to_dict() if isinstance(report, Report) else report
    out = [f"# optimodel {data['subcommand']}", "", f"**{verdict(data)}**", ""]
    out += [f"`{data['command']}`", ""]
    rows = model_rows(data)
    if rows:
        out += ["## Models", "", _md_table(MODEL_HEADERS, rows), ""]
    if data.get("stages"):
        out += ["## Stages", ""]
        out.append(_md_table(STAGE_HEADERS, stage_table(data)))
        out.append("")
    if data.get("passes"):
        out += ["## Passes", ""]
        out.append(
            _md_table(
                ["pass", "seconds", "nodes before", "nodes after"],
                [
                    [p["name"], p.get("seconds"), p.get("nodes_before"), p.get("nodes_after")]
                    for p in data["passes"]
                ],
            )
        )
        out.append("")
    if data.get("verification"):
        ver = data["verification"]
        out += [f"## Verification ({ver['data']}, tolerance {ver['tolerance']})", ""]
        out += [_md_table(DIFF_HEADERS, diff_rows(ver)), ""]
    acc = data.get("accuracy")
    if acc:
        out += [f"## Accuracy ({acc['data']})", ""]
        rows = accuracy_rows(acc)
        if rows:
            out += [_md_table(ACCURACY_HEADERS, rows), ""]
        if acc.get("fidelity"):
            out += ["### Fidelity against the reference", ""]
            out += [_md_table(DIFF_HEADERS, diff_rows(acc["fidelity"])), ""]
    if data.get("latency"):
        out += ["## Latency", ""]
        headers = ["model", "provider", "threads", "p50 ms", "p90 ms", "p99 ms", "mean ms"]
        out += [
            _md_table(
                headers,
                [
                    [
                        r.get("model"),
                        r.get("provider_display", r.get("provider")),
                        r.get("threads"),
                        r.get("p50_ms"),
                        r.get("p90_ms"),
                        r.get("p99_ms"),
                        r.get("mean_ms"),
                    ]
                    for r in data["latency"]
                ],
            ),
            "",
        ]
    if data.get("gates"):
        out += ["## Gates", ""]
        out += [
            _md_table(
                ["gate", "limit", "measured", "passed"],
                [[g["name"], g["limit"], g["measured"], g["passed"]] for g in data["gates"]],
            ),
            "",
        ]
    if data.get("messages"):
        out += ["## Notes", ""] + [f"- {m}" for m in data["messages"]] + [""]
    versions = ", ".join(f"{k} {v}" for k, v in data["tool"].items())
    out += [f"_{versions}_", ""]
    return "\n".join(out)


STAGE_HEADERS = ["stage", "status", "seconds", "nodes", "bytes", "cosine"]


def stage_table(data: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for st in data.get("stages", []):
        cosine = st.get("cosine_vs_previous", st.get("cosine_vs_input"))
        rows.append(
            [
                st["stage"],
                st.get("status", ""),
                st.get("seconds"),
                st.get("nodes"),
                st.get("bytes"),
                cosine,
            ]
        )
    return rows


def _html_table(headers: list[str], rows: list[list[Any]]) -> str:
    import html

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _plots(data: dict[str, Any]) -> list[str]:
    from optimodel import plots

    charts = []
    latency = data.get("latency") or []
    labels = ["input", "output"] if len(latency) == 2 and data.get("output_model") else None
    series = [
        (
            labels[i] if labels else Path(str(r.get("model", "model"))).name,
            r.get("percentiles_ms") or [],
        )
        for i, r in enumerate(latency)
    ]
    charts.append(
        plots.latency_boxes("Latency distribution per stage (p5-p95, box p25-p75)", series)
    )
    charts.append(
        plots.bars(
            "Model size per stage (bytes)",
            [(st["stage"], st.get("bytes")) for st in data.get("stages", [])],
        )
    )
    points = []
    acc = data.get("accuracy") or {}
    ver = data.get("verification") or {}
    if len(latency) == 2:
        if acc.get("model") and acc.get("reference"):
            metric = acc["model"]["metric"]
            points = [
                ("input", latency[0].get("p50_ms"), acc["reference"]["value"]),
                ("output", latency[1].get("p50_ms"), acc["model"]["value"]),
            ]
            y_label = metric
        else:
            cosine = min((o["cosine"] for o in ver.get("outputs", [])), default=None)
            points = [
                ("input", latency[0].get("p50_ms"), 1.0),
                ("output", latency[1].get("p50_ms"), cosine),
            ]
            y_label = "cosine vs input"
        for variant in data.get("variants", []):
            points.append((variant["name"], variant.get("p50_ms"), variant.get("value")))
        charts.append(
            plots.scatter(
                "Accuracy against latency for every variant", points, "p50 latency (ms)", y_label
            )
        )
    return [c for c in charts if c]


def render_html(report: Report | dict[str, Any]) -> str:
    """One self-contained HTML file (inline CSS and SVG plots, no network)."""
    import html

    data = report.to_dict() if isinstance(report, Report) else report
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>optimodel {html.escape(data['subcommand'])} report</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:60em}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#f3f3f3}td:first-child{text-align:left}"
        ".verdict{font-weight:bold;padding:0.5em;border-radius:4px}"
        ".ok{background:#e5f5e0}.bad{background:#fde0dd}code{background:#f3f3f3}</style>",
        "</head><body>",
        f"<h1>optimodel {html.escape(data['subcommand'])}</h1>",
        f"<p class='verdict {'ok' if data['status'] == 'ok' else 'bad'}'>"
        f"{html.escape(verdict(data))}</p>",
        f"<p><code>{html.escape(data['command'])}</code></p>",
    ]
    rows = model_rows(data)
    if rows:
        parts += ["<h2>Models</h2>", _html_table(MODEL_HEADERS, rows)]
    if data.get("stages"):
        parts += ["<h2>Stages</h2>", _html_table(STAGE_HEADERS, stage_table(data))]
    charts = _plots(data)
    if charts:
        parts += ["<h2>Plots</h2>", *[f"<div>{c}</div>" for c in charts]]
    if data.get("verification"):
        ver = data["verification"]
        parts += [
            f"<h2>Verification ({html.escape(str(ver.get('data', '')))})</h2>",
            _html_table(DIFF_HEADERS, diff_rows(ver)),
        ]
    acc = data.get("accuracy")
    if acc:
        parts += ["<h2>Accuracy</h2>", _html_table(ACCURACY_HEADERS, accuracy_rows(acc))]
    if data.get("latency"):
        headers = [
            "model",
            "provider",
            "threads",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "load s",
            "p50 ratio",
        ]
        parts += [
            "<h2>Latency</h2>",
            _html_table(
                headers,
                [
                    [
                        r.get("model"),
                        r.get("provider_display", r.get("provider")),
                        r.get("threads"),
                        r.get("p50_ms"),
                        r.get("p90_ms"),
                        r.get("p99_ms"),
                        r.get("session_load_s"),
                        r.get("latency_ratio"),
                    ]
                    for r in data["latency"]
                ],
            ),
        ]
    if data.get("gates"):
        parts += [
            "<h2>Gates</h2>",
            _html_table(
                ["gate", "limit", "measured", "passed"],
                [[g["name"], g["limit"], g["measured"], g["passed"]] for g in data["gates"]],
            ),
        ]
    if data.get("messages"):
        parts += ["<h2>Notes</h2><ul>"]
        parts += [f"<li>{html.escape(m)}</li>" for m in data["messages"]]
        parts += ["</ul>"]
    versions = ", ".join(f"{k} {v}" for k, v in data["tool"].items())
    parts += [f"<p><small>{html.escape(versions)}</small></p>", "</body></html>", ""]
    return "\n".join(parts)


def check_report_paths(paths: list[Path] | None) -> list[Path]:
    """Refuse unknown report suffixes before any work starts."""
    for path in paths or []:
        if path.suffix.lower() not in REPORT_SUFFIXES:
            raise UsageError(
                f"--report {path}: unknown format '{path.suffix}'; use .json, .md or .html"
            )
    return list(paths or [])


def write_report(report: Report | dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a report atomically, its format picked by the file suffix."""
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix == ".json":
        data = report.to_dict() if isinstance(report, Report) else _clean(report)
        text = json.dumps(data, indent=2) + "\n"
    elif suffix == ".md":
        text = render_markdown(report)
    elif suffix == ".html":
        text = render_html(report)
    else:
        raise UsageError(f"--report {target}: unknown format '{suffix}'; use .json, .md or .html")
    return write_text_atomic(target, text)


def write_text_atomic(target: Path, text: str) -> Path:
    """Write a text file through a temporary file and a rename: never half a report."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OptimodelError(f"{target}: cannot write the report: {exc.strerror or exc}") from exc
    return target

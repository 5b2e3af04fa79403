"""Rendering of benchmark figures: progress lines and the Markdown results page."""

from __future__ import annotations

from typing import Any


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


def _secs(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _status(row: dict[str, Any]) -> str | None:
    """Why a row has no measured model: failed, does not load, or writes no model."""
    if row.get("error"):
        return "failed"
    if row.get("load_error"):
        return "no load"
    if not row.get("output"):
        return "n/a"
    return None


def agreement_value(agreement: dict[str, Any], digits: int = 6) -> str:
    """An agreement figure: a share as a percentage, a cosine (MiniLM) as a number."""
    if agreement.get("format") == "cosine":
        low = agreement.get("min")
        text = f"{agreement['value']:.{digits}f}"
        return text if low is None or digits < 6 else f"{text} (min {low:.{digits}f})"
    return f"{agreement['value']:.0%}"


def progress(row: dict[str, Any]) -> str:
    """One console line for a finished tool run."""
    if row.get("error"):
        return f"failed: {row['error']}"
    seconds = f"{_secs(row['seconds'])} s"
    if not row.get("output"):
        return f"{seconds} (writes no model)"
    text = f"{seconds}, {row['nodes']} nodes, {_mb(row['bytes'])}"
    if row.get("load_error"):
        return f"{text}; does not load: {row['load_error']}"
    fid = row["fidelity"]
    text += f", max abs diff {fid['max_abs_diff']:.3g}, cosine {fid['cosine']:.6f}"
    if "agreement" in fid:
        text += f", {fid['agreement']['name']} {agreement_value(fid['agreement'])}"
    return text


def ratio_line(figures: dict[str, dict[str, float]]) -> str:
    """`original 12.3 ms; copy 1.01; onnxslim 0.97; ...` for the console."""
    base = figures["original"]["median_ms"]
    parts = [f"original {base:.3g} ms"]
    parts += [f"{name} {fig['ratio']:.2f}" for name, fig in figures.items() if name != "original"]
    return "; ".join(parts)


def _cell(row: dict[str, Any], key: str, original: dict[str, Any]) -> str:
    """One overview cell: a ratio to the original, a count, a fidelity figure or a status."""
    if key == "seconds":
        return "failed" if row.get("error") else _secs(row["seconds"])
    status = _status(row)
    if status:
        return status
    if key == "nodes":
        return str(row["nodes"])
    if key == "bytes":
        return _ratio(row["bytes"] / original["bytes"])
    if key == "fidelity":
        fid = row["fidelity"]
        agreement = fid.get("agreement")
        return agreement_value(agreement, 4) if agreement else f"{fid['cosine']:.4f}"
    if key == "load":
        return _ratio(row["load"]["ratio"])
    return _ratio(row["latency"][key]["ratio"])


def _first(original: dict[str, Any], key: str, task: str | None) -> str:
    """The original's own figure for the first overview column."""
    if key == "nodes":
        return str(original["nodes"])
    if key == "bytes":
        return _mb(original["bytes"])
    if key == "load":
        return f"{original['load']['median_ms']:.1f} ms"
    if key == "fidelity":
        names = {"classify": "top-1", "ctc": "lines", "segment": "mask IoU"}
        return {**names, "embedding": "embedding cosine"}.get(task or "", "cosine")
    return f"{original['latency'][key]['median_ms']:.3g} ms"


def _overview(report: dict[str, Any], key: str, title: str, tools: list[str]) -> list[str]:
    columns = tools if key == "seconds" else ["original", *tools]
    lines = [f"### {title}", "", "| model | " + " | ".join(columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for model in report["models"]:
        by_tool = {r["tool"]: r for r in model["rows"]}
        original = by_tool["original"]
        cells = [_cell(by_tool[t], key, original) if t in by_tool else "" for t in tools]
        if key != "seconds":
            cells.insert(0, _first(original, key, model["task"]))
        lines.append(f"| {model['name']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _fidelity_cells(row: dict[str, Any]) -> list[str]:
    fid = row.get("fidelity")
    if not fid:
        return ["", "", ""]
    agreement = fid.get("agreement")
    agree = f"{agreement['name']} {agreement_value(agreement)}" if agreement else ""
    return [f"{fid['max_abs_diff']:.3g}", f"{fid['cosine']:.6f}", agree]


def _note(row: dict[str, Any], original: dict[str, Any] | None = None) -> str:
    notes = []
    before = (original or {}).get("matmul_weight_bytes")
    after = row.get("matmul_weight_bytes")
    if before and after is not None and row is not original and abs(after / before - 1) > 0.005:
        notes.append(f"MatMul weights {after / before:.3f}x")
    if row.get("error"):
        notes.append(f"failed: {row['error']}")
    if row.get("load_error"):
        notes.append(f"ORT cannot load/run it: {row['load_error']}")
    if row.get("checker", "ok") != "ok":
        notes.append(f"onnx.checker {row['checker']}")
    if row.get("custom_domain_nodes"):
        notes.append(f"{row['custom_domain_nodes']} ORT-only (com.microsoft) nodes")
    if row["tool"] != "original" and row.get("output") is None and not row.get("error"):
        notes.append("writes no model")
    return "; ".join(notes).replace("|", "/")


def _model_section(model: dict[str, Any], threads: list[str]) -> list[str]:
    rows = model["rows"]
    original = rows[0]
    inputs = ", ".join(f"`{k}` {dtype} {shape}" for k, (shape, dtype) in model["inputs"].items())
    lat = "; ".join(f"{t} {original['latency'][t]['median_ms']:.3g} ms" for t in threads)
    lines = [
        f"### {model['name']}",
        "",
        f"Source: {model['source']}. Latency input: {inputs}. Data: {'; '.join(model['notes'])}.",
        f"Original: {original['nodes']} nodes ({original['constant_nodes']} Constant), "
        f"{_mb(original['bytes'])}; latency {lat}; session load "
        f"{original['load']['median_ms']:.1f} ms.",
        "",
        "| tool | tool s | tool MB | nodes (Constant) | size | "
        + " | ".join(f"latency {t}" for t in threads)
        + " | load | max abs diff | cosine | agreement | notes |",
        "|---" * (10 + len(threads)) + "|",
    ]
    for row in rows:
        measured = _status(row) is None
        seconds = "" if row.get("seconds") is None else _secs(row["seconds"])
        peak = "" if row.get("peak_mb") is None else f"{row['peak_mb']:.0f}"
        nodes = f"{row['nodes']} ({row['constant_nodes']})" if "nodes" in row else ""
        size = _ratio(row["bytes"] / original["bytes"]) if "bytes" in row else ""
        lats = [_ratio(row["latency"][t]["ratio"]) if measured else "" for t in threads]
        load = _ratio(row["load"]["ratio"]) if measured else ""
        cells = [row["tool"], seconds, peak, nodes, size, *lats, load, *_fidelity_cells(row)]
        lines.append("| " + " | ".join([*cells, _note(row, original)]) + " |")
    return [*lines, ""]


def markdown(report: dict[str, Any]) -> str:
    """The results page: machine, overview matrices of ratios, one table per model."""
    info = report["machine"]
    settings = report["settings"]
    threads = settings["threads"]
    packages = ", ".join(f"{k} {v or 'not installed'}" for k, v in info["packages"].items())
    cores = f"{info.get('usable_cores')} usable cores ({info.get('logical_cores')} logical"
    if info.get("physical_cores"):
        cores += f", {info['physical_cores']} physical"
    cores += ")"
    if info.get("memory_gib"):
        cores += f", {info['memory_gib']} GiB RAM"
    vnni = ", ".join(info.get("int8_dot_product", [])) or "none"
    unavailable = report["unavailable"]
    lines = [
        "# Benchmark results",
        "",
        f"`{report['command']}` on {report['date']}, {settings['mode']} mode, "
        f"{report['total_seconds'] / 60:.1f} min in all.",
        "",
        "Every figure of a tool is relative to the original model measured in the same run "
        "(ratio < 1: faster or smaller). The machine is shared and noisy: the `copy` row, a "
        "byte-identical copy of the original, shows how far from 1.00 noise alone moves a "
        "ratio. Absolute times are secondary. Columns are explained in "
        "[README.md](README.md).",
        "",
        "## Machine",
        "",
        f"- CPU: {info['cpu']}, {cores}; AVX-512: {'yes' if info.get('avx512') else 'no'}; "
        f"int8 dot-product instructions: {vnni}",
        f"- OS: {info['os']}; Python {info['python']}",
        f"- Packages: {packages}",
        "- Peers unavailable: "
        + ("; ".join(f"{k} ({v})" for k, v in unavailable.items()) if unavailable else "none"),
        f"- Latency: {settings['rounds']} rounds at most (cut to about {settings['budget_s']:.0f}"
        f" s per model and thread setting), blocks of about {settings['block_s'] * 1e3:.0f} ms; "
        f"load time: {settings['load_reps']} rounds; sessions with more than one thread have "
        "spin-waiting off (see README.md)",
        "",
        "## Overview",
        "",
        "Cells: ratio to the original (first column: the original's absolute figure). "
        "`failed`: the tool raised or crashed; `no load`: ONNX Runtime cannot load or run the "
        "output; `n/a`: the tool writes no model.",
        "",
    ]
    all_tools = list(report["tools"])
    writers = [
        t
        for t in all_tools
        if any(r["tool"] == t and r.get("output") for m in report["models"] for r in m["rows"])
    ]
    for thread in threads:
        lines += _overview(report, thread, f"ONNX Runtime CPU latency, {thread}", writers)
    lines += _overview(report, "load", "Session load time", writers)
    lines += _overview(report, "nodes", "Nodes (main graph + subgraphs)", writers)
    lines += _overview(report, "bytes", "File size", writers)
    lines += [
        "Fidelity on the same inputs as the original: the model's agreement figure (top-1 "
        "for classifiers, identical decoded lines for PP-OCR rec, probability-map IoU at 0.3 "
        "for PP-OCR det, mean per-sentence cosine of the sentence embeddings for MiniLM), "
        "else the cosine over all outputs.",
        "",
    ]
    lines += _overview(report, "fidelity", "Fidelity", writers)
    timed = [t for t in all_tools if t != "copy"]
    lines += _overview(report, "seconds", "Tool wall time (seconds, absolute)", timed)
    lines += ["## Per model", ""]
    for model in report["models"]:
        lines += _model_section(model, threads)
    lines += ["## Tools", ""]
    lines += [f"- `{name}`: {text}" for name, text in report["tools"].items()]
    return "\n".join(lines) + "\n"

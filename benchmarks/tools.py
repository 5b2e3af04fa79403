"""The tool registry and the isolated runner every benchmark row goes through.

A tool is `callable(src, out_dir, feeds) -> output model path or None` (None: the tool
writes no model, e.g. `optimodel inspect`). `feeds` are realistic calibration inputs.
Adding a row (an optimodel pass, another peer) is one function plus one `TOOLS` entry.

Each call runs in a fresh spawned process: a segfault or a hang becomes a "failed: ..."
row, the tool's own printing goes to `tool.log` beside its output, and the process's
memory growth is the tool's alone. Tool time covers the call only, not imports.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
from peers import PEERS, ToolFn, preload

Feed = dict[str, np.ndarray]


def copy_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> Path:
    """Control row: a byte-identical copy, so its ratios show the measurement noise."""
    out = out_dir / "model.onnx"
    shutil.copyfile(src, out)
    return out


@preload("optimodel.inspection", "optimodel.modelio")
def optimodel_inspect_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> None:
    """`optimodel inspect`: load the model and compute the full inspection report."""
    from optimodel.inspection import inspect_model
    from optimodel.modelio import load_model

    inspect_model(load_model(src), src)
    return None


def _optimodel_passes(
    src: Path,
    out_dir: Path,
    feeds: list[Feed],
    passes: list[tuple[str, dict[str, Any]]],
    verify: bool = False,
) -> Path:
    """Load, run passes, save atomically: what `optimodel fold/fuse -o` does."""
    from optimodel.passes import get_pass
    from optimodel.transform import transform_file

    out = out_dir / "model.onnx"
    transform_file(
        src,
        out,
        [get_pass(name, **options) for name, options in passes],
        subcommand="bench",
        verify=verify,
        force=True,
    )
    return out


_OPTIMODEL_IMPORTS = (
    "optimodel.transform",
    "optimodel.passes",
    "onnx_ir",
    "onnxruntime",
    "onnxruntime.transformers.optimizer",
)


@preload(*_OPTIMODEL_IMPORTS)
def optimodel_fold_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> Path:
    """`optimodel fold --no-verify`: constant folding and clean-up."""
    return _optimodel_passes(src, out_dir, feeds, [("fold", {})])


@preload(*_OPTIMODEL_IMPORTS)
def optimodel_fold_fuse_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> Path:
    """fold + `fuse --target ort` (no verify): may use com.microsoft ops."""
    return _optimodel_passes(src, out_dir, feeds, [("fold", {}), ("fuse", {"target": "ort"})])


@preload(*_OPTIMODEL_IMPORTS)
def optimodel_fold_fuse_portable_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> Path:
    """fold + `fuse --target portable` (no verify): standard ONNX ops only."""
    return _optimodel_passes(src, out_dir, feeds, [("fold", {}), ("fuse", {"target": "portable"})])


@preload(*_OPTIMODEL_IMPORTS)
def optimodel_fold_fuse_cpu_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> Path:
    """fold + `fuse --target ort --enable conv-activation`: FusedConv stored, for the CPU."""
    options = {"target": "ort", "enable": ["conv-activation"]}
    return _optimodel_passes(src, out_dir, feeds, [("fold", {}), ("fuse", options)])


@preload(*_OPTIMODEL_IMPORTS)
def optimodel_fold_fuse_verified_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> Path:
    """fold + fuse (ort) with optimodel's verification after each pass (the CLI default)."""
    return _optimodel_passes(
        src, out_dir, feeds, [("fold", {}), ("fuse", {"target": "ort"})], verify=True
    )


def _feeds_folder(out_dir: Path, feeds: list[Feed]) -> Path:
    """Calibration feeds as a folder of one-feed .npz files (optimodel's --calib-data)."""
    folder = out_dir / "calib"
    folder.mkdir(exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez(folder / f"feed_{i:03d}.npz", **feed)
    return folder


@preload(*_OPTIMODEL_IMPORTS, "onnxruntime.quantization")
def optimodel_quant_dynamic_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> Path:
    """`optimodel quantize --mode dynamic` (fold + fuse pre-processing, CPU op set)."""
    return _optimodel_passes(src, out_dir, feeds, [("quantize", {"mode": "dynamic"})])


@preload(*_OPTIMODEL_IMPORTS, "onnxruntime.quantization")
def optimodel_quant_static_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> Path:
    """`optimodel quantize --mode static --calib-data FEEDS` (U8S8 QDQ, per-channel)."""
    calib = _feeds_folder(out_dir, feeds)
    return _optimodel_passes(
        src, out_dir, feeds, [("quantize", {"mode": "static", "calib_data": str(calib)})]
    )


@preload(*_OPTIMODEL_IMPORTS, "onnxruntime.quantization.matmul_nbits_quantizer")
def optimodel_int4_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> Path:
    """`optimodel quantize --mode weight-only`: int4 MatMulNBits, block 32, head at 8 bits."""
    return _optimodel_passes(src, out_dir, feeds, [("quantize", {"mode": "weight-only"})])


@preload(*_OPTIMODEL_IMPORTS)
def optimodel_fp16_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> Path:
    """`optimodel fp16 --keep-io-types --data FEEDS`: float16 with measured fallback."""
    data = _feeds_folder(out_dir, feeds)
    return _optimodel_passes(
        src, out_dir, feeds, [("fp16", {"keep_io_types": True, "data": str(data)})]
    )


@preload(*_OPTIMODEL_IMPORTS)
def optimodel_prune_channel_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> Path:
    """fold + `prune --granularity channel --sparsity 0.3` (no recovery, no fine-tuning)."""
    return _optimodel_passes(
        src,
        out_dir,
        feeds,
        [("fold", {}), ("prune", {"granularity": "channel", "sparsity": 0.3})],
    )


@preload(*_OPTIMODEL_IMPORTS)
def optimodel_prune_channel_recovery_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> Path:
    """fold + `prune --granularity channel --sparsity 0.3 --calib-data FEEDS`: recovered."""
    calib = _feeds_folder(out_dir, feeds)
    options = {"granularity": "channel", "sparsity": 0.3, "calib_data": str(calib)}
    return _optimodel_passes(src, out_dir, feeds, [("fold", {}), ("prune", options)])


@preload(*_OPTIMODEL_IMPORTS)
def optimodel_prune50_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> Path:
    """fold + `prune --sparsity 0.5`: unstructured, plain magnitude."""
    return _optimodel_passes(src, out_dir, feeds, [("fold", {}), ("prune", {"sparsity": 0.5})])


@preload(*_OPTIMODEL_IMPORTS)
def optimodel_prune50_recovery_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> Path:
    """fold + `prune --sparsity 0.5 --calib-data FEEDS`: with least-squares recovery."""
    calib = _feeds_folder(out_dir, feeds)
    return _optimodel_passes(
        src, out_dir, feeds, [("fold", {}), ("prune", {"sparsity": 0.5, "calib_data": str(calib)})]
    )


OPTIMODEL_TOOLS: dict[str, ToolFn] = {
    "optimodel-inspect": optimodel_inspect_tool,
    "optimodel-fold": optimodel_fold_tool,
    "optimodel-fuse": optimodel_fold_fuse_tool,
    "optimodel-fuse-portable": optimodel_fold_fuse_portable_tool,
    "optimodel-fuse-cpu": optimodel_fold_fuse_cpu_tool,
    "optimodel-fuse-verified": optimodel_fold_fuse_verified_tool,
    "optimodel-quant-dynamic": optimodel_quant_dynamic_tool,
    "optimodel-quant-static": optimodel_quant_static_tool,
    "optimodel-int4": optimodel_int4_tool,
    "optimodel-fp16": optimodel_fp16_tool,
    "optimodel-prune-channel": optimodel_prune_channel_tool,
    "optimodel-prune-channel-recovery": optimodel_prune_channel_recovery_tool,
    "optimodel-prune50": optimodel_prune50_tool,
    "optimodel-prune50-recovery": optimodel_prune50_recovery_tool,
}

TOOLS: dict[str, ToolFn] = {"copy": copy_tool, **PEERS, **OPTIMODEL_TOOLS}


def describe(name: str) -> str:
    """First docstring line of a tool, for the results legend."""
    doc = TOOLS[name].__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else name


@dataclass
class ToolResult:
    """What one tool did to one model."""

    tool: str
    output: Path | None
    seconds: float | None
    peak_mb: float | None
    error: str | None


def one_line(exc: BaseException, src: Path | None = None, limit: int = 180) -> str:
    """`Type: first line of the message` (the model's path shortened to its name), cut short."""
    text = str(exc).strip()
    if src is not None:
        text = text.replace(str(src), src.name)
    line = text.splitlines()[0] if text else ""
    message = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _rss_mb(field: str = "VmRSS") -> float | None:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process, Linux only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> None:
    """Restart the VmHWM peak from the current RSS, so it covers the tool call only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _child(conn: Connection, name: str, src: Path, out_dir: Path, feeds: list[Feed]) -> None:
    with open(out_dir / "tool.log", "w") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        result: dict[str, Any] = {"output": None, "error": None, "seconds": None}
        tool = TOOLS[name]
        try:
            for module in getattr(tool, "preload", ()):
                importlib.import_module(module)
        except BaseException as exc:  # a missing or broken package fails this row only
            result["error"] = "cannot import: " + one_line(exc)
            conn.send(result)
            return
        before = _rss_mb()
        _reset_peak()
        start = time.perf_counter()
        try:
            output = tool(src, out_dir, feeds)
            result["output"] = str(output) if output is not None else None
        except BaseException as exc:  # report every failure as one line
            result["error"] = one_line(exc, src)
        result["seconds"] = time.perf_counter() - start
        peak = _rss_mb("VmHWM")
        result["peak_mb"] = max(0.0, peak - before) if peak and before else None
        sys.stdout.flush()
        sys.stderr.flush()
    conn.send(result)
    conn.close()


def run_tool(
    name: str, src: Path, out_dir: Path, feeds: list[Feed], timeout: float = 600
) -> ToolResult:
    """Run tool `name` on `src` in a fresh process; failures come back as `error`."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    ctx = mp.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(sender, name, src, out_dir, feeds), daemon=True)
    process.start()
    sender.close()
    message: dict[str, Any] | None = None
    error = None
    if receiver.poll(timeout):
        try:
            message = receiver.recv()
        except EOFError:
            process.join(10)
            error = f"process died (exit code {process.exitcode}); see tool.log"
    else:
        process.kill()
        error = f"timed out after {timeout:.0f} s"
    process.join(10)
    receiver.close()
    if message is None:
        return ToolResult(name, None, None, None, error)
    output = Path(message["output"]) if message["output"] else None
    if output is not None and not output.is_file():
        message["error"] = message["error"] or "reported an output that does not exist"
        output = None
    peak = message.get("peak_mb")
    return ToolResult(name, output, message["seconds"], peak, message["error"])

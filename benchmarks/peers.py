"""Peer tools, each called the way its documentation tells a user to call it.

Every function has the benchmark's tool signature `(src, out_dir, feeds) -> output path`
and writes its model under `out_dir`. Peer packages are imported by the runner just
before the call (`preload`), so a missing one fails its own rows, never the run, and
import time is not billed to the tool.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static

Feed = dict[str, np.ndarray]
ToolFn = Callable[[Path, Path, list[Feed]], Path | None]

# Distribution names whose versions the results record.
PEER_PACKAGES = ["onnxslim", "onnxsim", "onnxoptimizer", "onnxruntime", "onnx"]


def preload(*modules: str) -> Callable[[ToolFn], ToolFn]:
    """Mark the modules a tool needs; the runner imports them before starting its clock."""

    def mark(fn: ToolFn) -> ToolFn:
        fn.preload = modules  # type: ignore[attr-defined]
        return fn

    return mark


@contextlib.contextmanager
def _working_dir(path: Path) -> Iterator[None]:
    """Run a tool inside its output folder so any stray files it writes stay there."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@preload("onnxslim")
def onnxslim_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> Path:
    """`onnxslim.slim(in, out)` with its defaults."""
    out = out_dir / "model.onnx"
    importlib.import_module("onnxslim").slim(str(src), str(out))
    return out


@preload("onnxsim")
def onnxsim_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> Path:
    """`onnxsim.simplify(model)` with its defaults, then `onnx.save`."""
    model, ok = importlib.import_module("onnxsim").simplify(onnx.load(str(src)))
    if not ok:
        raise RuntimeError("onnxsim: simplified model failed its own check")
    out = out_dir / "model.onnx"
    onnx.save(model, str(out))
    return out


@preload("onnxoptimizer")
def onnxoptimizer_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> Path:
    """`onnxoptimizer.optimize(model)` with its default passes, then `onnx.save`."""
    model = importlib.import_module("onnxoptimizer").optimize(onnx.load(str(src)))
    out = out_dir / "model.onnx"
    onnx.save(model, str(out))
    return out


def _ort_offline(src: Path, out_dir: Path, level: ort.GraphOptimizationLevel) -> Path:
    out = out_dir / "model.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return out


def ort_basic_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> Path:
    """ONNX Runtime offline optimization, ORT_ENABLE_BASIC (portable ONNX ops only)."""
    return _ort_offline(src, out_dir, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)


def ort_extended_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> Path:
    """ONNX Runtime offline optimization, ORT_ENABLE_EXTENDED (may emit com.microsoft ops)."""
    return _ort_offline(src, out_dir, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)


def ort_quant_dynamic_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> Path:
    """`onnxruntime.quantization.quantize_dynamic(in, out)` with default arguments."""
    out = out_dir / "model.onnx"
    with _working_dir(out_dir):
        quantize_dynamic(src, out)
    return out


class FeedReader(CalibrationDataReader):
    """Calibration reader over a list of ready feeds."""

    def __init__(self, feeds: list[Feed]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> Feed | None:
        return next(self._feeds, None)


def ort_quant_static_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> Path:
    """`quantize_static(in, out, reader)`: QDQ, MinMax, int8, per-tensor (the defaults)."""
    out = out_dir / "model.onnx"
    with _working_dir(out_dir):
        quantize_static(src, out, FeedReader(feeds))
    return out


@preload("onnxruntime.quantization.matmul_nbits_quantizer")
def ort_int4_tool(src: Path, out_dir: Path, feeds: list[Feed]) -> Path:
    """`MatMulNBitsQuantizer(model).process()`: int4 MatMul weights, its defaults (block 128)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out = out_dir / "model.onnx"
    with _working_dir(out_dir):
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)))
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return out


PEERS: dict[str, ToolFn] = {
    "onnxslim": onnxslim_tool,
    "onnxsim": onnxsim_tool,
    "onnxoptimizer": onnxoptimizer_tool,
    "ort-basic": ort_basic_tool,
    "ort-extended": ort_extended_tool,
    "ort-quant-dynamic": ort_quant_dynamic_tool,
    "ort-quant-static": ort_quant_static_tool,
    "ort-int4": ort_int4_tool,
}


def unavailable() -> dict[str, str]:
    """Peer name -> reason, for peers whose package is not installed."""
    return {
        name: f"{module} is not installed"
        for name, fn in PEERS.items()
        for module in getattr(fn, "preload", ())
        if importlib.util.find_spec(module) is None
    }

"""Measure every float activation of a model on real feeds, for the fp16 fallback.

The model's intermediate values are added as graph outputs (in chunks, so a large
graph never holds all its activations at once) and run in ONNX Runtime; each value's
largest magnitude and what a 16-bit format would lose of it are kept, never the arrays.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from optimodel.precision.formats import LowFormat, relative_error
from optimodel.runtime.sessions import point_to_external_data

# Intermediate outputs per session: the first chunk measures how large values are,
# later ones are sized so one run holds about `memory_budget` bytes of activations.
FIRST_CHUNK = 64
MAX_CHUNK = 2048
MEMORY_BUDGET = 1 << 30


@dataclass
class ValueStats:
    """What the feeds showed of one value."""

    dtype: str  # numpy dtype name, "sequence" or "other"
    max_abs: float = 0.0  # over finite elements
    rel_error: float = 0.0  # worst ||x - low(x)|| / ||x|| over the feeds
    elements: int = 0  # of the last feed (ratios between values, e.g. reductions)
    nonfinite: bool = False  # NaN/Inf already in this run

    def update(self, value: object, fmt: LowFormat | None) -> None:
        if not isinstance(value, np.ndarray):
            return
        self.elements = int(value.size)
        if value.dtype.kind != "f" or not value.size:
            return
        hi, lo = float(value.max()), float(value.min())
        if math.isfinite(hi) and math.isfinite(lo):
            peak = max(hi, -lo)
        else:
            self.nonfinite = True
            finite = value[np.isfinite(value)]
            peak = float(np.max(np.abs(finite))) if finite.size else 0.0
        self.max_abs = max(self.max_abs, peak)
        if fmt is not None:
            self.rel_error = max(self.rel_error, relative_error(value, fmt))

    def to_dict(self) -> dict[str, object]:
        return {
            "dtype": self.dtype,
            "max_abs": self.max_abs,
            "rel_error": self.rel_error if math.isfinite(self.rel_error) else "inf",
        }


def _kind(value: object) -> str:
    if isinstance(value, np.ndarray):
        return value.dtype.name
    if isinstance(value, list):
        return "sequence"
    return "other"


def _session(model: onnx.ModelProto) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    point_to_external_data(model, options)
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def measure_values(
    model: onnx.ModelProto,
    feeds: Iterable[dict[str, np.ndarray]],
    names: list[str],
    fmt: LowFormat | None,
    memory_budget: int = MEMORY_BUDGET,
    outputs: list[str] | None = None,
) -> dict[str, ValueStats]:
    """Run the model on every feed and return statistics for each named main-graph value.

    `fmt` None skips the 16-bit loss figure (a converted model's own run); `outputs`
    measures only those graph outputs, from one plain run per feed. Graph
    inputs among `names` are measured from the feeds themselves. Raises whatever
    ONNX Runtime raises when the model cannot be built or run.
    """
    feeds = list(feeds)
    stats: dict[str, ValueStats] = {}
    inputs = {i.name for i in model.graph.input}
    for feed in feeds:
        for name in names:
            if name in inputs and name in feed:
                stats.setdefault(name, ValueStats(_kind(feed[name]))).update(feed[name], fmt)
    if outputs is not None:  # the graph outputs alone: one plain run per feed
        session = _session(model)
        order = [o.name for o in session.get_outputs()]  # type: ignore[attr-defined]
        for feed in feeds:
            values = dict(zip(order, session.run(None, feed), strict=True))  # type: ignore[attr-defined]
            for name in outputs:
                stats.setdefault(name, ValueStats(_kind(values.get(name)))).update(
                    values.get(name), fmt
                )
        return stats
    wanted = [n for n in dict.fromkeys(names) if n and n not in inputs]
    outputs = [o.name for o in model.graph.output]
    start, size = 0, FIRST_CHUNK
    while start < len(wanted):
        part = wanted[start : start + size]
        start += len(part)
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        extra = [n for n in part if n not in outputs]
        probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in extra)
        session = _session(probe)
        order = [o.name for o in session.get_outputs()]  # type: ignore[attr-defined]
        held = 0
        for feed in feeds:
            values = dict(zip(order, session.run(None, feed), strict=True))  # type: ignore[attr-defined]
            held = max(held, sum(v.nbytes for v in values.values() if isinstance(v, np.ndarray)))
            for name in part:
                value = values.get(name)
                stats.setdefault(name, ValueStats(_kind(value))).update(value, fmt)
            del values
        del session
        per_value = max(held / max(len(part), 1), 1.0)
        size = int(min(MAX_CHUNK, max(8, memory_budget // per_value)))
    return stats


@dataclass
class ValueDiff:
    """How a converted model's copy of a value differs from the float32 original."""

    dot: float = 0.0
    ref_sq: float = 0.0
    cand_sq: float = 0.0
    rel_p90: float = 0.0  # 90th percentile of elementwise |a-b|/|a|, worst feed

    @property
    def cosine(self) -> float:
        denom = math.sqrt(self.ref_sq) * math.sqrt(self.cand_sq)
        if denom == 0.0:
            return 1.0 if self.ref_sq == self.cand_sq == 0.0 else 0.0
        return self.dot / denom

    def update(self, a: np.ndarray, b: np.ndarray, sample: int = 1 << 16) -> None:
        x = np.asarray(a, dtype=np.float64).ravel()
        y = np.asarray(b, dtype=np.float64).ravel()
        if x.shape != y.shape:
            self.dot, self.ref_sq, self.cand_sq, self.rel_p90 = 0.0, 1.0, 1.0, math.inf
            return
        both = np.isfinite(x) & np.isfinite(y)
        x, y = x[both], y[both]
        self.dot += float(x @ y)
        self.ref_sq += float(x @ x)
        self.cand_sq += float(y @ y)
        if x.size > sample:
            x, y = x[:: x.size // sample], y[:: y.size // sample]
        nonzero = x != 0
        if nonzero.any():
            rel = np.abs(x[nonzero] - y[nonzero]) / np.abs(x[nonzero])
            self.rel_p90 = max(self.rel_p90, float(np.quantile(rel, 0.9)))


def compare_values(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: Iterable[dict[str, np.ndarray]],
    names: list[str],
    memory_budget: int = MEMORY_BUDGET,
) -> dict[str, ValueDiff]:
    """Cosine and elementwise error of each named value, candidate against reference.

    Both models must name the values alike (the converter keeps names) and take the
    same feeds (an emulated conversion does).
    """
    feeds = list(feeds)
    diffs: dict[str, ValueDiff] = {}
    start, size = 0, FIRST_CHUNK // 2
    while start < len(names):
        part = names[start : start + size]
        start += len(part)
        sessions = []
        for model in (reference, candidate):
            probe = onnx.ModelProto()
            probe.CopyFrom(model)
            have = {o.name for o in probe.graph.output}
            probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in part if n not in have)
            sessions.append(_session(probe))
        held = 0
        for feed in feeds:
            runs = []
            for session in sessions:
                order = [o.name for o in session.get_outputs()]  # type: ignore[attr-defined]
                runs.append(dict(zip(order, session.run(None, feed), strict=True)))  # type: ignore[attr-defined]
            held = max(
                held, sum(v.nbytes for r in runs for v in r.values() if hasattr(v, "nbytes"))
            )
            for name in part:
                a, b = runs[0].get(name), runs[1].get(name)
                if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype.kind == "f":
                    diffs.setdefault(name, ValueDiff()).update(a, b)
        per_value = max(held / max(len(part), 1), 1.0)
        size = int(min(MAX_CHUNK, max(8, memory_budget // per_value)))
    return diffs

"""Task accuracy against labels and fidelity against a reference model, with a CI gate.

Both models run on the same feeds in one pass over the data; task metrics come from
`labels` in the data (top-1 / top-5 for classifiers, MSE for regression), fidelity from
the verification accumulators. `--max-drop` turns the accuracy drop into exit code 3.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from optimodel.data import Dataset
from optimodel.errors import DataError, UsageError
from optimodel.runtime.sessions import SessionConfig, create_session, run_session
from optimodel.verify import (
    OutputComparator,
    VerificationResult,
    get_tolerance,
    matched_outputs,
    output_names,
)


@dataclass
class _TaskAccumulator:
    """Running task metrics for one model's chosen output."""

    kind: str | None = None
    samples: int = 0
    top1: int = 0
    top5: int = 0
    classes: int = 0
    sq_err: float = 0.0
    elements: int = 0

    def update(self, output: np.ndarray, labels: np.ndarray, where: str) -> None:
        labels = np.asarray(labels)
        if labels.dtype.kind in "iub":
            # class axis: last for [batch, classes], axis 1 for [batch, classes, ...]
            axis = output.ndim - 1 if output.ndim == 2 else 1
            expected = output.shape[:axis] + output.shape[axis + 1 :]
            if output.ndim < 2 or labels.shape != expected:
                raise DataError(
                    f"{where}: integer labels of shape {list(labels.shape)} do not match output "
                    f"shape {list(output.shape)} (expected labels of shape {list(expected)})"
                )
            self.kind = "classification"
            scores = np.moveaxis(output, axis, -1).reshape(-1, output.shape[axis])
            flat = labels.reshape(-1).astype(np.int64)
            self.classes = output.shape[axis]
            self.top1 += int(np.sum(scores.argmax(axis=1) == flat))
            k = min(5, self.classes)
            top_k = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            self.top5 += int(np.sum(np.any(top_k == flat[:, None], axis=1)))
            self.samples += flat.size
        else:
            if labels.shape != output.shape:
                raise DataError(
                    f"{where}: float labels of shape {list(labels.shape)} do not match output "
                    f"shape {list(output.shape)}"
                )
            self.kind = "regression"
            diff = output.astype(np.float64) - labels.astype(np.float64)
            self.sq_err += float(np.sum(diff * diff))
            self.elements += diff.size
            self.samples += labels.shape[0] if labels.ndim else 1

    def result(self, output: str) -> dict[str, Any]:
        if self.kind == "classification":
            return {
                "task": "classification",
                "output": output,
                "samples": self.samples,
                "top1": 100.0 * self.top1 / self.samples,
                "top5": 100.0 * self.top5 / self.samples if self.classes > 5 else None,
                "metric": "top1",
                "value": 100.0 * self.top1 / self.samples,
                "higher_is_better": True,
            }
        mse = self.sq_err / self.elements if self.elements else 0.0
        return {
            "task": "regression",
            "output": output,
            "samples": self.samples,
            "mse": mse,
            "metric": "mse",
            "value": mse,
            "higher_is_better": False,
        }


@dataclass
class MaxDrop:
    """A gate: absolute points (`1`) or relative percent (`1%`) of the reference metric."""

    value: float
    relative: bool

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.relative else f"{self.value:g} points"


def parse_max_drop(text: str) -> MaxDrop:
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(%?)\s*", text or "")
    if not match:
        raise UsageError(
            f"bad --max-drop '{text}': expected a number of points (1) or a percent (1%)"
        )
    return MaxDrop(float(match[1]), bool(match[2]))


@dataclass
class EvalResult:
    """Task metrics for the model (and reference), fidelity, and the gate verdict."""

    data: str
    feeds: int
    model: dict[str, Any] | None = None
    reference: dict[str, Any] | None = None
    fidelity: VerificationResult | None = None
    gate: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def drop(self) -> float | None:
        """Accuracy lost against the reference, in the metric's units (positive = worse)."""
        if not self.model or not self.reference:
            return None
        delta = self.reference["value"] - self.model["value"]
        return delta if self.model["higher_is_better"] else -delta

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "feeds": self.feeds,
            "model": self.model,
            "reference": self.reference,
            "drop": self.drop,
            "fidelity": self.fidelity.to_dict() if self.fidelity else None,
            "gate": self.gate,
            "notes": list(self.notes),
        }


def _choose_output(names: list[str], wanted: str | None, where: str) -> int:
    if wanted is None:
        return 0
    if wanted not in names:
        raise UsageError(f"{where}: no output '{wanted}'; outputs are {', '.join(names)}")
    return names.index(wanted)


def evaluate(
    model: str,
    dataset: Dataset,
    *,
    reference: str | None = None,
    session_config: SessionConfig | None = None,
    output: str | None = None,
    max_drop: MaxDrop | None = None,
    on_feed: Callable[[], None] | None = None,
) -> EvalResult:
    """Run the model (and reference) over the data; accuracy, fidelity, and the gate."""
    if max_drop is not None and reference is None:
        raise UsageError("--max-drop needs --reference: the drop is measured against it")
    session = create_session(model, session_config, source=model)
    names = output_names(session)
    index = _choose_output(names, output, model)
    ref_session = comparator = None
    ref_index = 0
    if reference is not None:
        ref_session = create_session(reference, session_config, source=reference)
        ref_names = matched_outputs(ref_session, session, model)
        if names[index] not in ref_names:
            raise UsageError(f"{reference}: has no output '{names[index]}' to compare")
        ref_index = ref_names.index(names[index])
        comparator = OutputComparator(ref_names)
    task, ref_task = _TaskAccumulator(), _TaskAccumulator()
    feeds = 0
    for batch in dataset:
        outs = run_session(session, batch.feed, model)
        if batch.labels is not None:
            task.update(outs[index], batch.labels, dataset.source)
        if ref_session is not None and comparator is not None:
            ref_outs = run_session(ref_session, batch.feed, str(reference))
            by_name = dict(zip(names, outs, strict=True))
            comparator.update(ref_outs, [by_name[n] for n in comparator.names])
            if batch.labels is not None:
                ref_task.update(ref_outs[ref_index], batch.labels, dataset.source)
        feeds += 1
        if on_feed:
            on_feed()
    if feeds == 0:
        raise DataError(f"{dataset.source}: no feeds to evaluate")
    result = EvalResult(data=dataset.description, feeds=feeds)
    if task.kind:
        result.model = task.result(names[index])
        if ref_task.kind:
            result.reference = ref_task.result(names[index])
    else:
        result.notes.append("the data has no 'labels': task accuracy not measured")
    if comparator is not None:
        diffs = comparator.results()
        result.fidelity = VerificationResult(
            outputs=diffs,
            feeds=comparator.feeds,
            data=dataset.description,
            tolerance="none",
            violations=get_tolerance("none").violations(diffs),
        )
    if max_drop is not None:
        result.gate = _gate(result, max_drop)
    return result


def _gate(result: EvalResult, max_drop: MaxDrop) -> dict[str, Any]:
    drop = result.drop
    if drop is None:
        raise DataError("--max-drop needs labels in the data to measure accuracy; none were found")
    base = abs(result.reference["value"]) if result.reference else 0.0
    measured = (
        (100.0 * drop / base if base else (0.0 if drop <= 0 else 100.0))
        if (max_drop.relative)
        else drop
    )
    return {
        "name": "max-drop",
        "metric": result.model["metric"] if result.model else None,
        "limit": str(max_drop),
        "measured": measured,
        "unit": "%" if max_drop.relative else "points",
        "passed": measured <= max_drop.value,
    }

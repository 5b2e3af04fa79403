"""Accuracy-budget search: prune as asked, then back off the most sensitive units until the
measured drop fits.

A *unit* is what the technique prunes as one piece (a channel group, a layer). Each has a
ladder of ratios, from the requested one down to 0. The search measures the full
configuration first; if it is over budget it measures each unit pruned alone (its
sensitivity), then repeatedly steps the most sensitive unit one rung down and measures
again. It stops at the first configuration within budget, or when every unit is back at 0
(nothing fits) or the trial budget is spent. Greedy and cheap (units x rungs evaluations
at most), which suits models whose evaluation takes seconds; it does not search upwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

RUNGS = (1.0, 0.75, 0.5, 0.25, 0.0)


@dataclass
class SearchResult:
    """The configuration chosen (or the best seen) and every measurement taken."""

    ratios: list[float]
    model: onnx.ModelProto | None
    drop: float
    fits: bool
    baseline: float
    trials: list[dict[str, Any]] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)

    def to_dict(self, units: Sequence[str]) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "baseline": self.baseline,
            "drop": self.drop,
            "ratios": {u: r for u, r in zip(units, self.ratios, strict=True)},
            "sensitivity": self.sensitivity,
            "trials": len(self.trials),
            "history": self.trials[:50],
        }


def ladders(start: Sequence[float], rungs: Sequence[float] = RUNGS) -> list[list[float]]:
    """Each unit's ratios from its starting ratio down to 0 (fractions of the start)."""
    out = []
    for ratio in start:
        steps = sorted({round(ratio * f, 6) for f in rungs}, reverse=True)
        out.append(steps if steps[-1] == 0.0 else [*steps, 0.0])
    return out


def backoff_search(
    units: Sequence[str],
    levels: Sequence[Sequence[float]],
    build: Callable[[list[float]], onnx.ModelProto],
    drop_of: Callable[[onnx.ModelProto], float],
    budget: float,
    *,
    baseline: float,
    max_trials: int = 60,
) -> SearchResult:
    """Greedy back-off from the first rung of every ladder until `drop_of(model) <= budget`."""
    position = [0] * len(units)
    trials: list[dict[str, Any]] = []

    def ratios_now() -> list[float]:
        return [levels[i][p] for i, p in enumerate(position)]

    def measure(ratios: list[float], kind: str) -> tuple[onnx.ModelProto, float]:
        model = build(ratios)
        drop = drop_of(model)
        trials.append({"kind": kind, "ratios": [round(r, 4) for r in ratios], "drop": drop})
        return model, drop

    best: tuple[float, list[float], onnx.ModelProto | None] = (float("inf"), [], None)
    model, drop = measure(ratios_now(), "full")
    if drop <= budget and any(ratios_now()):
        return SearchResult(ratios_now(), model, drop, True, baseline, trials)
    if any(ratios_now()):
        best = (drop, ratios_now(), model)
    sensitivity: dict[int, float] = {}
    for i in range(len(units)):
        if len(trials) >= max_trials:
            break
        if levels[i][0] > 0:
            alone = [levels[j][0] if j == i else 0.0 for j in range(len(units))]
            sensitivity[i] = measure(alone, f"alone:{units[i]}")[1]
        else:
            sensitivity[i] = 0.0
    while len(trials) < max_trials:
        movable = [i for i in range(len(units)) if position[i] < len(levels[i]) - 1]
        if not movable:
            break
        ranked = sorted(movable, key=lambda i: (-sensitivity.get(i, 0.0), i))
        stride = _stride(position, levels, max_trials - len(trials))
        stepped = ranked[:stride]
        old = {i: levels[i][position[i]] for i in stepped}
        for i in stepped:
            position[i] += 1
        if not any(ratios_now()):
            break
        label = units[stepped[0]] + (f" (+{len(stepped) - 1})" if len(stepped) > 1 else "")
        model, drop = measure(ratios_now(), f"backoff:{label}")
        if drop < best[0]:
            best = (drop, ratios_now(), model)
        if drop <= budget:
            model, drop = _advance(position, levels, sensitivity, measure, budget, max_trials,
                                   trials, model, drop, ratios_now)  # fmt: skip
            return SearchResult(
                ratios_now(), model, drop, True, baseline, trials, _named(units, sensitivity)
            )
        for i in stepped:
            ratio = levels[i][position[i]]
            if ratio <= 0:
                sensitivity[i] = -float("inf")
            elif len(stepped) == 1 and len(trials) < max_trials:
                alone = [ratio if j == i else 0.0 for j in range(len(units))]
                sensitivity[i] = measure(alone, f"alone:{units[i]}")[1]
            else:  # many stepped at once: estimate, as the error grows with the square
                sensitivity[i] = sensitivity.get(i, 0.0) * (ratio / old[i]) ** 2 if old[i] else 0.0
    return SearchResult(
        best[1], best[2], best[0], False, baseline, trials, _named(units, sensitivity)
    )


def _stride(position: list[int], levels: Sequence[Sequence[float]], trials_left: int) -> int:
    """How many units one back-off step moves down a rung: one (then re-measured alone, two
    trials a step) while every remaining rung fits in the trials left; more when they do not
    (MiniLM has 36 layers, 144 rungs: one at a time, 60 trials end far from any fit).
    """
    rungs = sum(len(levels[i]) - 1 - p for i, p in enumerate(position))
    steps = max(1, trials_left // 2)
    return 1 if rungs <= steps else -(-rungs // steps)


def _advance(
    position: list[int],
    levels: Sequence[Sequence[float]],
    sensitivity: dict[int, float],
    measure: Callable[[list[float], str], tuple[onnx.ModelProto, float]],
    budget: float,
    max_trials: int,
    trials: list[dict[str, Any]],
    model: onnx.ModelProto,
    drop: float,
    ratios_now: Callable[[], list[float]],
) -> tuple[onnx.ModelProto, float]:
    """After a fit, win back pruning: step the least sensitive units up again while the
    drop stays within budget (the back-off alone stops at the first fit, often too early).
    """
    for i in sorted(sensitivity, key=lambda k: (sensitivity[k], k)):
        while position[i] > 0 and len(trials) < max_trials:
            position[i] -= 1
            candidate, candidate_drop = measure(ratios_now(), "advance")
            if candidate_drop <= budget:
                model, drop = candidate, candidate_drop
                continue
            position[i] += 1
            break
    return model, drop


def _named(units: Sequence[str], sensitivity: dict[int, float]) -> dict[str, float]:
    return {units[i]: s for i, s in sensitivity.items() if s != -float("inf")}


class AccuracyProbe:
    """Task metric of candidate models, as a drop from the unpruned model.

    With `labels` in the data the metric is the task's (top-1 points, ...). Without, it is
    fidelity, as for quantize's budget: the worst output cosine against the unpruned model
    x 100, so the drop is (1 - cosine) x 100 and a budget of 2 asks for cosine >= 0.98 (an
    embedding model has no labels, and its users judge it by exactly that cosine).
    Uses `optimodel.evaluate.evaluate` (the same numbers `optimodel eval` prints) on
    temporary files, so a candidate is measured exactly as a user would measure it.
    """

    def __init__(self, reference: onnx.ModelProto, dataset: Any, workdir: str) -> None:
        self.dataset = dataset
        self.workdir = Path(workdir)
        self.count = 0
        self.reference: Path | None = None
        first = self._evaluate(reference)
        if first is None and dataset.has_labels:
            from optimodel.errors import DataError

            raise DataError(
                f"{dataset.source}: its 'labels' give no accuracy for this model's output; "
                "leave them out for a fidelity budget ((1 - cosine) x 100)"
            )
        if first is None:
            self.reference = self.workdir / "reference.onnx"
            onnx.save(reference, str(self.reference))
            first = (100.0, True, "fidelity")
        self.baseline, self.higher_is_better, self.metric = first

    @property
    def unit(self) -> str:
        return "(1 - cosine) x 100" if self.metric == "fidelity" else "points"

    def _evaluate(self, model: onnx.ModelProto) -> tuple[float, bool, str] | None:
        from optimodel.evaluate import evaluate

        self.count += 1
        path = self.workdir / f"candidate{self.count}.onnx"
        onnx.save(model, str(path))
        try:
            reference = None if self.reference is None else str(self.reference)
            result = evaluate(str(path), self.dataset, reference=reference)
        finally:
            path.unlink(missing_ok=True)
        if self.reference is not None:
            return 100.0 * float(result.fidelity.worst_cosine), True, "fidelity"
        if not result.model:
            return None
        return (
            float(result.model["value"]),
            bool(result.model["higher_is_better"]),
            str(result.model["metric"]),
        )

    def drop(self, model: onnx.ModelProto) -> float:
        """Points lost against the unpruned model (negative: it got better)."""
        measured = self._evaluate(model)
        value = measured[0] if measured else float("nan")
        return self.baseline - value if self.higher_is_better else value - self.baseline


def sensitivity_table(
    units: Sequence[str],
    levels: Sequence[float],
    build: Callable[[list[float]], onnx.ModelProto],
    drop_of: Callable[[onnx.ModelProto], float],
    *,
    baseline: float,
    metric: str,
    unit: str = "points",
) -> dict[str, Any]:
    """Each unit pruned alone at each level, every other unit dense: the drop it causes.

    The table a user reads before choosing per-layer ratios (or excluding a layer): units
    whose drop stays near 0 at high levels can take more, the others less.
    """
    rows = []
    for i, unit in enumerate(units):
        drops = []
        for level in levels:
            ratios = [0.0] * len(units)
            ratios[i] = level
            drops.append(round(float(drop_of(build(ratios))), 4))
        rows.append({"unit": unit, "drops": drops})
    return {
        "metric": metric,
        "unit": unit,
        "baseline": baseline,
        "levels": list(levels),
        "rows": rows,
        "evaluations": len(units) * len(levels),
    }

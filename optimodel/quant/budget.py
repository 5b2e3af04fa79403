"""Accuracy budget for int8: keep the most sensitive nodes in float until the drop fits.

1. Quantize everything asked for and measure the drop against the float model.
2. Over budget: rank the quantized nodes by the error each one *adds*, from one layer-wise
   comparison of the float and the fully quantized model on a few evaluation feeds
   (`optimodel.quant.layers`: the node's own SQNR, its output's SQNR against its
   inputs'). One comparison costs about two model runs per feed and chunk, where
   measuring "everything but node i" would cost a quantization and an evaluation per node.
3. Confirm with real measurements: quantize with the top 1, 2, 4, ... ranked nodes kept in
   float until one fits, then bisect between the last miss and the first fit for the
   fewest nodes that fit (the drop is assumed to shrink as more nodes stay float).
   The caller decides how a kept node is written: the pass first keeps its weights in
   int8 (`optimodel.quant.weight_fallback`), and only when that never fits searches the
   same ranking again (`previous`) with the weights in float as well.

Every tried configuration is quantized, evaluated and timed (p50 at one thread), so the
report shows what each fallback costs. The best candidate is kept: the fitting one with
the fewest float nodes (then the fastest), or, when none fits, the one with the lowest
drop. The drop is measured in one of two units:

- `top1`: with `labels` in the evaluation data, top-1 accuracy points lost against the
  float model (as `optimodel eval` measures it);
- `fidelity`: without labels, (1 - cosine) * 100 of the worst output against the float
  model's (a budget of 0.5 asks for cosine >= 0.995).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from optimodel.data import Dataset
from optimodel.runtime.sessions import SessionConfig, create_session, run_session

DEFAULT_MAX_TRIALS = 12
RANK_FEEDS = 16  # evaluation feeds the layer-wise ranking runs on
LATENCY_RUNS = 50
LATENCY_SECONDS = 2.0  # a timing stops after this long even short of LATENCY_RUNS
DQ, Q = "DequantizeLinear", "QuantizeLinear"


class DropProbe:
    """The drop of a candidate against the float model on the evaluation data."""

    def __init__(self, reference: onnx.ModelProto, dataset: Dataset, workdir: str) -> None:
        from optimodel.errors import DataError

        self.dataset = dataset
        self.workdir = Path(workdir)
        self.reference_path = self.workdir / "reference.onnx"
        onnx.save(reference, str(self.reference_path))
        self.count = 0
        self.metric = "top1" if dataset.has_labels else "fidelity"
        self.baseline: float | None = None
        if self.metric == "top1":
            result = self._evaluate(reference, with_reference=False)
            if not result.model or result.model.get("metric") != "top1":
                raise DataError(
                    f"{dataset.source}: --accuracy-budget in points needs integer class "
                    "'labels' (or none at all, for a fidelity budget)"
                )
            self.baseline = float(result.model["value"])

    @property
    def unit(self) -> str:
        return "top-1 points" if self.metric == "top1" else "(1 - cosine) x 100"

    def _evaluate(self, model: onnx.ModelProto, *, with_reference: bool) -> Any:
        from optimodel.evaluate import evaluate

        self.count += 1
        path = self.workdir / f"candidate{self.count}.onnx"
        onnx.save(model, str(path))
        try:
            return evaluate(
                str(path),
                self.dataset,
                reference=str(self.reference_path) if with_reference else None,
            )
        finally:
            path.unlink(missing_ok=True)

    def measure(self, model: onnx.ModelProto) -> tuple[float, float | None]:
        """(drop, the candidate's metric value: top-1 % or worst cosine)."""
        if self.metric == "top1":
            result = self._evaluate(model, with_reference=False)
            value = float(result.model["value"])
            return float(self.baseline) - value, value  # type: ignore[arg-type]
        result = self._evaluate(model, with_reference=True)
        cosine = float(result.fidelity.worst_cosine)
        return (1.0 - cosine) * 100.0, cosine


def latency_p50_ms(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> float:
    """Median latency of one feed at one intra-op thread (CPU), in milliseconds."""
    session = create_session(model, SessionConfig(threads=1), source="candidate model")
    for _ in range(5):
        run_session(session, feed, "candidate model")
    times = []
    started = time.perf_counter()
    while len(times) < LATENCY_RUNS and (time.perf_counter() - started < LATENCY_SECONDS):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) * 1e3, 4)


def quantized_nodes(prepared: onnx.ModelProto, quantized: onnx.ModelProto) -> list[str]:
    """Nodes of the prepared float model that the quantizer really rewrote, in graph order.

    A node counts as quantized when the quantized graph has no node of that name and op
    type any more (dynamic: MatMul -> MatMulInteger `NAME_quant`), or when it reads a
    DequantizeLinear or feeds a QuantizeLinear (Q/DQ keeps the node and its name).
    """
    by_name = {n.name: n for n in quantized.graph.node if n.name}
    producers = {o: n for n in quantized.graph.node for o in n.output if o}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in quantized.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    found = []
    for node in prepared.graph.node:
        if not node.name or node.op_type in (Q, DQ, "Constant"):
            continue
        kept = by_name.get(node.name)
        if kept is None or kept.op_type != node.op_type:
            found.append(node.name)
            continue
        reads_dq = any(
            producers.get(i) is not None and producers[i].op_type == DQ for i in kept.input if i
        )
        feeds_q = any(u.op_type == Q for o in kept.output for u in users.get(o, []))
        if reads_dq or feeds_q:
            found.append(node.name)
    return found


def rank_nodes(
    prepared: onnx.ModelProto,
    quantized: onnx.ModelProto,
    candidates: Sequence[str],
    batches: Sequence[Any],
    *,
    keep_consumers: bool = True,
) -> list[dict[str, Any]]:
    """Fallback units, most sensitive first, scored from one layer-wise comparison.

    A unit is a compared tensor with the nodes that must stay float for it to stay float:
    its quantized producer (walking back through producers whose own output was fused
    away, e.g. Conv -> Relu) and, with Q/DQ (`keep_consumers`), its quantized consumers,
    which would otherwise quantize it on their input, and the producers of its producer's
    inputs. Score: the SQNR of the error the
    tensor adds (lowest first). Candidates no unit covers follow, one node each.
    """
    from optimodel.quant.layers import compare_layers

    comparison = compare_layers(prepared, quantized, batches)
    wanted = set(candidates)
    compared = {r.tensor for r in comparison.rows}
    producers = {o: n for n in prepared.graph.node for o in n.output if o}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in prepared.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    def producer_chain(tensor: str) -> list[str]:
        chain, node, depth = [], producers.get(tensor), 0
        while node is not None and depth < 8:
            if node.name in wanted:
                chain.append(node.name)
            data = [i for i in node.input if i in producers]
            if len(data) != 1 or data[0] in compared or len(users.get(data[0], [])) != 1:
                break
            node, depth = producers[data[0]], depth + 1
        return chain

    units = []
    for row in comparison.rows:
        if row.own_snr_db is None:
            continue
        nodes = producer_chain(row.tensor)
        if keep_consumers:
            # Q/DQ: a tensor stays float only when no node around it is quantized; the
            # producer's inputs come along too (a dominant channel can hide their
            # quantization error until this layer mixes the channels)
            nodes += [u.name for u in users.get(row.tensor, []) if u.name in wanted]
            node = producers.get(row.tensor)
            for name in node.input if node is not None else []:
                if name in producers:
                    nodes += producer_chain(name)
        nodes = list(dict.fromkeys(nodes))
        if nodes:
            units.append(
                {
                    "tensor": row.tensor,
                    "nodes": nodes,
                    "own_snr_db": row.own_snr_db,
                    "snr_db": row.snr_db,
                    "jump_db": row.jump_db,
                }
            )
    units.sort(key=lambda u: u["own_snr_db"])
    covered = {n for u in units for n in u["nodes"]}
    for name in candidates:
        if name not in covered:
            units.append(
                {"tensor": None, "nodes": [name], "own_snr_db": None, "snr_db": None,
                 "jump_db": None}
            )  # fmt: skip
    return units


@dataclass
class Trial:
    """One measured configuration: the nodes kept in float and what it gave."""

    kept_float: list[str]
    drop: float
    value: float | None
    p50_ms: float | None
    fits: bool
    seconds: float
    model: onnx.ModelProto | None = field(default=None, repr=False)
    fallback: str = "float"  # how the kept nodes were written (quant/weight_fallback.py)

    def to_dict(self, full_p50: float | None) -> dict[str, Any]:
        cost = (
            round(self.p50_ms - full_p50, 4)
            if self.p50_ms is not None and full_p50 is not None
            else None
        )
        return {
            "kept_float": len(self.kept_float),
            "nodes": list(self.kept_float),
            "drop": round(self.drop, 4),
            "value": self.value,
            "p50_ms": self.p50_ms,
            "latency_cost_ms": cost,
            "fits": self.fits,
            "fallback": self.fallback,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class BudgetResult:
    """The chosen (or best) configuration and every trial."""

    budget: float
    metric: str
    unit: str
    baseline: float | None
    trials: list[Trial]
    best: Trial
    ranking: list[dict[str, Any]]
    max_trials: int

    @property
    def fits(self) -> bool:
        return self.best.fits

    def to_dict(self) -> dict[str, Any]:
        full = self.trials[0]
        return {
            "budget": self.budget,
            "metric": self.metric,
            "unit": self.unit,
            "baseline": self.baseline,
            "fits": self.fits,
            "drop_full_int8": round(full.drop, 4),
            "drop": round(self.best.drop, 4),
            "kept_float": list(self.best.kept_float),
            "p50_ms_full_int8": full.p50_ms,
            "p50_ms": self.best.p50_ms,
            "latency_cost_ms": self.best.to_dict(full.p50_ms)["latency_cost_ms"],
            "trials": [t.to_dict(full.p50_ms) for t in self.trials],
            "max_trials": self.max_trials,
            "ranking": self.ranking[:30],
            "latency": "p50 of one feed at 1 thread (CPU)",
        }


def search(
    *,
    budget: float,
    quantize: Callable[[list[str]], onnx.ModelProto],
    measure: Callable[[onnx.ModelProto], tuple[float, float | None]],
    latency: Callable[[onnx.ModelProto], float | None],
    rank: Callable[[onnx.ModelProto], list[dict[str, Any]]],
    max_trials: int = DEFAULT_MAX_TRIALS,
    metric: str = "top1",
    unit: str = "top-1 points",
    baseline: float | None = None,
    fallback: Callable[[onnx.ModelProto], str] | None = None,
    previous: BudgetResult | None = None,
) -> BudgetResult:
    """Full int8 first; over budget, fall back the ranked nodes in growing numbers.

    `fallback` tells how a candidate's kept nodes were written ("float" when None). With
    `previous` (a search that found no fit with another form), its full-int8 trial and
    ranking are reused, its trials kept, and `max_trials` counts new ones."""
    trials: list[Trial] = list(previous.trials) if previous else []
    first = len(trials)
    tried: dict[int, Trial] = {}

    def budget_left() -> bool:
        return len(trials) - first < max_trials

    measured: dict[frozenset[str], Trial] = {}

    def trial(kept: list[str]) -> Trial:
        key = frozenset(kept)  # ranked units can overlap: two counts, one node set
        if key in measured:
            return measured[key]
        start = time.perf_counter()
        model = quantize(kept)
        drop, value = measure(model)
        how = fallback(model) if kept and fallback else "float"
        found = Trial(kept, drop, value, latency(model), drop <= budget,
                      time.perf_counter() - start, model, how)  # fmt: skip
        trials.append(found)
        measured[key] = found
        return found

    if previous is not None:
        full, ranking = previous.trials[0], previous.ranking
    else:
        full = trial([])
        ranking = []
        if not full.fits and budget_left():
            ranking = rank(full.model)  # type: ignore[arg-type]
    units = [list(r["nodes"]) for r in ranking]

    def nodes_of(count: int) -> list[str]:
        return list(dict.fromkeys(n for unit in units[:count] for n in unit))

    order = units
    tried[0] = full
    miss, hit = 0, None
    k = 1
    while not full.fits and order and budget_left() and hit is None:
        k = min(k, len(order))
        tried[k] = trial(nodes_of(k))
        if tried[k].fits:
            hit = k
        else:
            miss = k
            if k == len(order):
                break
            k *= 2
    while hit is not None and hit - miss > 1 and budget_left():
        mid = (hit + miss) // 2
        tried[mid] = trial(nodes_of(mid))
        if tried[mid].fits:
            hit = mid
        else:
            miss = mid
    fitting = [t for t in trials if t.fits]
    if fitting:
        best = min(fitting, key=lambda t: (len(t.kept_float), t.p50_ms or 0.0))
    else:
        best = min(trials, key=lambda t: (t.drop, len(t.kept_float)))
    for t in trials:  # only the best model is held on to
        if t is not best:
            t.model = None
    return BudgetResult(budget, metric, unit, baseline, trials, best, ranking, max_trials)

"""Mixed-precision conversion with measured fallback: which nodes go 16-bit, and proof it runs.

The block list is built from what the model does on data (as ModelOpt's autocast
does with its data and initializer limits) rather than guessed: a node stays
float32 when a value it reads or writes leaves the 16-bit range (with headroom for
inputs the data did not show), when storing the value loses too much of it
(underflow), when a weight does not fit, when it does shape/index arithmetic, when
its schema or the block list says so. The result must then load in ONNX Runtime
and produce no NaN/Inf that float32 did not; a node that breaks either is found
(from the error message, else by bisection) and kept float32, a bounded number of
times.
"""

from __future__ import annotations

import re
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from optimodel.graphs import value_types
from optimodel.precision.convert import (
    FLOAT,
    NON_TENSOR,
    Conversion,
    GraphFacts,
    Slots,
    apply_plan,
    node_slots,
)
from optimodel.precision.formats import FLOAT16, LowFormat, relative_error
from optimodel.precision.ranges import ValueDiff, ValueStats, compare_values, measure_values
from optimodel.runtime.sessions import point_to_external_data

# Kept in float32 unless asked otherwise. Range: no fp16 in its schema, and its count
# must be exact. CumSum: a long fp16 running sum drifts. TopK / NonMaxSuppression /
# RoiAlign: orderings and box coordinates (pixels above 2048 step by 2 in fp16).
# Random*, Multinomial, Bernoulli, EyeLike: output type fixed by an attribute.
# Quantize/Dequantize: scales must stay as calibrated. Upsample: deprecated, its
# kernels differ by provider. Det: an ill-conditioned product of many terms.
DEFAULT_BLOCK_OPS = frozenset(
    {
        "Range",
        "CumSum",
        "TopK",
        "NonMaxSuppression",
        "RoiAlign",
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "EyeLike",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "Upsample",
        "Det",
    }
)
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


@dataclass
class MixedOptions:
    """How to convert; defaults are what `optimodel fp16` uses."""

    fmt: LowFormat = FLOAT16
    keep_io_types: bool = False
    block_ops: frozenset[str] = DEFAULT_BLOCK_OPS
    block_nodes: frozenset[str] = frozenset()
    fallback: bool = True  # measure ranges on the feeds and keep what does not fit
    # A value whose magnitude passes margin * format max stays float32: data seen in
    # calibration is rarely the largest a model will meet.
    overflow_margin: float = 0.5
    max_rel_error: float = 0.01  # ||x - fp16(x)|| / ||x|| above this: underflow
    # Weights are exact and mostly scalars where this bites (an epsilon of 1e-6 loses
    # 1.3% in fp16, harmlessly); one that loses more than this stays float32.
    max_weight_rel_error: float = 0.05
    max_retries: int = 8
    # Accuracy refinement on the emulated model (16-bit storage between every op, as
    # GPU kernels do; ONNX Runtime's CPU run skips some of that rounding): while the
    # outputs' cosine on the feeds is below target, the node where it drops most and
    # the upstream nodes whose elementwise error exceeds twice the format's unit
    # roundoff (the cause, e.g. a variance computed as E[x^2] - E[x]^2) stay float32.
    # Off by default: the regions it keeps can be wide (magika: 53 nodes for 0.981 ->
    # 0.997); the emulated cosine is always measured and reported.
    refine: bool = False
    target_cosine: float = 0.9999
    refine_rounds: int = 4
    refine_region: int = 24
    refine_seconds: float = 180.0


@dataclass
class MixedResult:
    """The converted model, the emulated twin of the same plan, and what happened."""

    model: onnx.ModelProto
    emulated: onnx.ModelProto
    stats: dict[str, Any]
    kept: list[dict[str, str]] = field(default_factory=list)  # node, op, reason
    notes: list[str] = field(default_factory=list)


def infer_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value ONNX shape inference can type (NON_TENSOR for others)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # inference failing is not fatal: measured types fill the gaps
        inferred = model
    types = {}
    for name, tp in value_types(inferred).items():
        types[name] = tp.tensor_type.elem_type
    for graph_value in [*inferred.graph.value_info, *inferred.graph.output]:
        if not graph_value.type.HasField("tensor_type") and graph_value.type.ByteSize():
            types[graph_value.name] = NON_TENSOR
    return types


def _measured_type(stats: ValueStats) -> int:
    if stats.dtype in ("sequence", "other"):
        return NON_TENSOR
    try:
        return helper.np_dtype_to_tensor_dtype(np.dtype(stats.dtype))
    except (TypeError, KeyError, ValueError):
        return 0


def _measured_names(model: onnx.ModelProto) -> list[str]:
    names = [i.name for i in model.graph.input]
    for node in model.graph.node:
        if node.op_type != "Constant":
            names.extend(o for o in node.output if o)
    return names


def _flags(
    stats: dict[str, ValueStats], facts: GraphFacts, options: MixedOptions
) -> dict[str, str]:
    """Values that do not survive the 16-bit format, with why."""
    fmt = options.fmt
    limit = options.overflow_margin * fmt.max
    flags: dict[str, str] = {}
    for name, st in stats.items():
        if not facts.is_float(name):
            continue
        if st.max_abs > limit:
            flags[name] = f"overflow: max |x| {st.max_abs:.3g} > {limit:.3g}"
        elif st.rel_error > options.max_rel_error:
            flags[name] = f"underflow: {fmt.short} loses {st.rel_error:.1%} of it"
    for name, array in facts.constants.items():
        finite = np.abs(array[np.isfinite(array)])
        peak = float(finite.max()) if finite.size else 0.0
        if peak > fmt.max:
            flags[name] = f"weight out of range: max |x| {peak:.3g} > {fmt.max:.6g}"
        elif relative_error(array, fmt) > options.max_weight_rel_error:
            flags[name] = f"weight underflow: {fmt.short} loses {relative_error(array, fmt):.1%}"
    return flags


def _cast_target(node: onnx.NodeProto) -> int:
    for attr in node.attribute:
        if attr.name == "to":
            return int(attr.i)
    return 0


def _index_math(
    facts: GraphFacts, slots: dict[int, Slots], nodes: list[onnx.NodeProto]
) -> set[int]:
    """Float arithmetic on integers that ends as integers (frame counts, sizes): stays fp32.

    A node qualifies when its float inputs all come from integer Casts or constants
    (forward) and its float outputs only feed integer Casts, float32-only inputs or
    other such nodes (backward).
    """
    int_derived: set[str] = set()
    candidates: set[int] = set()
    for idx, node in enumerate(nodes):
        s = slots[idx]
        if s.neutral and node.output and node.output[0] in facts.constants:
            continue
        ins = [n for n in node.input if facts.is_float(n) and n not in facts.constants]
        outs = [o for o in node.output if facts.is_float(o)]
        if outs and all(n in int_derived for n in ins):
            int_derived.update(outs)
            candidates.add(idx)
    result: set[int] = set()
    for idx in sorted(candidates, reverse=True):
        outs = [o for o in nodes[idx].output if facts.is_float(o)]
        if any(o in facts.outputs for o in outs):
            continue
        readers = [(c, i) for o in outs for c, i in facts.consumers.get(o, [])]
        if readers and all(
            c in result
            or i in slots[c].fixed_in
            or (nodes[c].op_type == "Cast" and _cast_target(nodes[c]) not in FLOAT_TYPES)
            for c, i in readers
        ):
            result.add(idx)
    return result


class _Planner:
    """Node decisions for one model; grows the float32 set on evidence."""

    def __init__(
        self, model: onnx.ModelProto, stats: dict[str, ValueStats], options: MixedOptions
    ) -> None:
        types = infer_types(model)
        for name, st in stats.items():
            measured = _measured_type(st)
            if measured:
                types[name] = measured
        self.options = options
        self.facts = GraphFacts(model, types)
        self.nodes = list(model.graph.node)
        self.slots = {i: node_slots(n, self.facts, options.fmt) for i, n in enumerate(self.nodes)}
        self.kept: dict[int, str] = {}
        self.categories: dict[int, str] = {}
        self.keep_inputs: set[str] = set()
        self.keep_outputs: set[str] = set()
        float_io = [n for n in self.facts.runtime_inputs if self.facts.is_float(n)]
        if options.keep_io_types:
            self.keep_inputs.update(float_io)
            self.keep_outputs.update(o for o in self.facts.outputs if self.facts.is_float(o))
        self.flagged_io: list[str] = []
        for idx, s in self.slots.items():
            node = self.nodes[idx]
            if s.neutral:
                continue
            if not s.convertible:
                self.keep(idx, "schema", s.reason)
            elif node.op_type in options.block_ops:
                self.keep(idx, "block list", f"op {node.op_type} is on the block list")
            elif node.name and node.name in options.block_nodes:
                self.keep(idx, "block list", "node is on the block list")
        for idx in _index_math(self.facts, self.slots, self.nodes):
            self.keep(idx, "index math", "float arithmetic on integers that ends as integers")
        self.flags = _flags(stats, self.facts, options)
        for name, reason in self.flags.items():
            self.flag(name, reason)

    def keep(self, idx: int, category: str, reason: str) -> None:
        if idx not in self.kept and not self.slots[idx].neutral:
            self.kept[idx] = reason
            self.categories[idx] = category

    def flag(self, value: str, reason: str) -> None:
        """Keep every node that would store `value` in 16 bits in float32."""
        facts = self.facts
        category = "weight range" if value in facts.constants else "range"
        producer = facts.producer.get(value)
        if producer is not None:
            self.keep(producer, category, f"writes '{value}': {reason}")
        for idx, i in facts.consumers.get(value, []):
            s = self.slots[idx]
            if i not in s.free and i not in s.fixed_in:
                self.keep(idx, category, f"reads '{value}': {reason}")
        if value in facts.runtime_inputs and value not in self.keep_inputs:
            self.keep_inputs.add(value)
            self.flagged_io.append(value)
        if value in facts.outputs and value not in self.keep_outputs:
            self.keep_outputs.add(value)
            self.flagged_io.append(value)

    @property
    def low(self) -> set[int]:
        return {
            i
            for i, s in self.slots.items()
            if not s.neutral and s.convertible and i not in self.kept
        }

    def convert(self, low: set[int] | None = None, *, emulate: bool = False) -> Conversion:
        return apply_plan(
            self.facts,
            self.slots,
            self.low if low is None else low,
            self.options.fmt,
            keep_inputs=self.keep_inputs,
            keep_outputs=self.keep_outputs,
            emulate=emulate,
        )


def load_problem(model: onnx.ModelProto, fmt: LowFormat, strict: bool) -> str | None:
    """Why the converted model would not load (None: it loads).

    float16: ONNX Runtime builds a CPU session. bfloat16 has next to no CPU kernels,
    so it is judged by ONNX's strict type inference instead (when the input passed it).
    """
    if fmt.onnx_type == TensorProto.FLOAT16:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4
        point_to_external_data(model, options)
        try:
            ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT's exception classes are not public
            return str(exc).replace("[ONNXRuntimeError] : ", "").strip() or type(exc).__name__
        return None
    if not strict:
        return None
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:  # InferenceError and friends
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


_NODE_PATTERNS = (
    r"node with name '([^']+)'",
    r"of node \(([^)]+)\)",
    r"[Nn]ode \(([^)]+)\)",
    r"[Nn]ode '([^']+)'",
)


def _culprit(message: str, planner: _Planner, low: set[int]) -> int | None:
    by_name = {planner.nodes[i].name: i for i in low if planner.nodes[i].name}
    for pattern in _NODE_PATTERNS:
        for match in re.finditer(pattern, message):
            if match.group(1) in by_name:
                return by_name[match.group(1)]
    return None


def _bisect(planner: _Planner, low: set[int], strict: bool) -> int | None:
    """The node whose conversion makes the model fail to load: smallest failing prefix."""
    order = sorted(low)
    fmt = planner.options.fmt
    if load_problem(planner.convert(set()).model, fmt, strict) is not None:
        return None  # fails with nothing converted: not a node's fault
    lo, hi = 0, len(order)  # prefix lo loads, prefix hi fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if load_problem(planner.convert(set(order[:mid])).model, fmt, strict) is None:
            lo = mid
        else:
            hi = mid
    return order[hi - 1] if order else None


def match_feed(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A float32 feed cast to the converted model's float16 inputs (numpy has no bf16)."""
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    return {
        name: value.astype(np.float16)
        if types.get(name) == TensorProto.FLOAT16 and value.dtype == np.float32
        else value
        for name, value in feed.items()
    }


def _nonfinite_origins(
    planner: _Planner,
    runnable: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]],
    reference: dict[str, ValueStats],
) -> set[int]:
    """Converted nodes that first turn finite float32 values into NaN/Inf.

    Only the outputs are run first; the intermediate values are looked at only when
    an output went non-finite, since a full probe costs several runs per feed.
    """
    feeds = [match_feed(runnable, f) for f in feeds]
    outputs = [o for o in planner.facts.outputs if planner.facts.is_float(o) and o in reference]
    if not outputs:
        return set()
    ends = measure_values(runnable, feeds, [], None, outputs=outputs)
    if not any(ends[n].nonfinite and not reference[n].nonfinite for n in outputs if n in ends):
        return set()
    names = [n for n in reference if planner.facts.is_float(n)]
    got = measure_values(runnable, feeds, names, None)
    bad = {n for n in names if n in got and got[n].nonfinite and not reference[n].nonfinite}
    if not bad:
        return set()
    low = planner.low
    origins = set()
    for idx in low:
        node = planner.nodes[idx]
        if any(o in bad for o in node.output) and not any(i in bad for i in node.input):
            origins.add(idx)
    return origins or {
        planner.facts.producer[n] for n in bad if planner.facts.producer.get(n) in low
    }


def _refine(
    planner: _Planner, model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]
) -> tuple[int, float]:
    """Keep float32 where the emulated model's outputs lose accuracy; rounds, cosine."""
    options, facts, nodes = planner.options, planner.facts, planner.nodes
    unit = 2.0**-11 if options.fmt.onnx_type == TensorProto.FLOAT16 else 2.0**-8
    outputs = [o for o in facts.outputs if facts.is_float(o) and o not in facts.runtime_inputs]
    names = [n for n in _measured_names(model) if facts.is_float(n)]
    names = [n for n in names if n not in facts.runtime_inputs]
    deadline = time.perf_counter() + options.refine_seconds
    rounds, cosine = 0, 1.0
    while True:
        emulated = planner.convert(emulate=True).model
        ends = compare_values(model, emulated, feeds, outputs)
        cosine = min((ends[o].cosine for o in outputs if o in ends), default=1.0)
        if (
            not options.refine
            or cosine >= options.target_cosine
            or rounds >= options.refine_rounds
            or time.perf_counter() > deadline
        ):
            return rounds, cosine
        diffs = compare_values(model, emulated, feeds, names)
        low = planner.low

        def cos_of(values: list[str], diffs: dict[str, ValueDiff] = diffs) -> float:
            return min((diffs[v].cosine for v in values if v in diffs), default=1.0)

        def drop(idx: int) -> float:
            ins = [i for i in nodes[idx].input if facts.is_float(i) and i not in facts.constants]
            return cos_of(ins) - cos_of(list(nodes[idx].output))

        if not low:
            return rounds, cosine
        worst = max(sorted(low), key=drop)
        if drop(worst) <= 0:
            return rounds, cosine
        # Walk upstream (through nodes already float32 too) while values carry large
        # elementwise error: the cause is where that error starts.
        region, queue, seen = [worst], deque([worst]), {worst}
        while queue and len(region) < options.refine_region:
            for value in nodes[queue.popleft()].input:
                up = facts.producer.get(value)
                if (
                    up is not None
                    and up not in seen
                    and value in diffs
                    and diffs[value].rel_p90 > 2 * unit
                ):
                    seen.add(up)
                    queue.append(up)
                    if up in low:
                        region.append(up)
        before, after = (
            cos_of(
                [i for i in nodes[worst].input if facts.is_float(i) and i not in facts.constants]
            ),
            cos_of(list(nodes[worst].output)),
        )
        for idx in region:
            reason = (
                f"{options.fmt.short} accuracy: cosine {before:.5f} -> {after:.5f} here"
                if idx == worst
                else f"{options.fmt.short} accuracy: feeds '{nodes[worst].name or worst}' "
                "with large elementwise error"
            )
            planner.keep(idx, "accuracy", reason)
        rounds += 1


def convert_mixed(
    model: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]] | None,
    options: MixedOptions | None = None,
) -> MixedResult:
    """Convert float32 to options.fmt, keeping in float32 what measurably must be."""
    options = options or MixedOptions()
    fmt = options.fmt
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=1)
    if fmt.onnx_type == TensorProto.BFLOAT16 and opset < 13:
        from optimodel.errors import OptimodelError

        raise OptimodelError(
            f"bfloat16 needs opset 13 or newer (this model is opset {opset}: its Cast and "
            "arithmetic ops have no bfloat16)",
            "convert the model to opset 13+ first (onnx.version_converter), or use float16",
        )
    notes: list[str] = []
    stats: dict[str, ValueStats] = {}
    if options.fallback and feeds:
        try:
            stats = measure_values(model, feeds, _measured_names(model), fmt)
        except Exception as exc:  # the model does not run here: convert without ranges
            line = str(exc).replace("[ONNXRuntimeError] : ", "").strip().splitlines()
            notes.append(
                "activation ranges not measured (ONNX Runtime cannot run the model: "
                f"{line[0] if line else type(exc).__name__}); only weights were checked"
            )
    elif options.fallback:
        notes.append("no data: activation ranges not measured; only weights were checked")
    planner = _Planner(model, stats, options)
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        strict = True
    except Exception:  # the input itself does not pass strict inference: do not ask it of us
        strict = False
    retries = Counter[str]()
    conversion = planner.convert()
    for _ in range(options.max_retries):
        low = planner.low
        problem = load_problem(conversion.model, fmt, strict)
        if problem is not None:
            culprit = _culprit(problem, planner, low)
            if culprit is None:
                culprit = _bisect(planner, low, strict)
            if culprit is None:
                break
            planner.keep(culprit, "load failure", f"converted model did not load: {problem[:160]}")
            retries["load"] += 1
            conversion = planner.convert()
            continue
        if not (stats and feeds):
            break
        runnable = (
            conversion.model
            if fmt.onnx_type == TensorProto.FLOAT16
            else planner.convert(emulate=True).model
        )
        try:
            origins = _nonfinite_origins(planner, runnable, feeds, stats)
        except Exception as exc:  # a run failure here is a load problem ORT found late
            notes.append(f"NaN/Inf check skipped: {str(exc).splitlines()[0][:160]}")
            break
        if not origins:
            break
        for idx in origins:
            planner.keep(idx, "nan/inf", f"produced NaN/Inf in {fmt.short} on the data")
        retries["nan"] += 1
        conversion = planner.convert()
    refine_rounds, emulated_cosine = 0, None
    if stats and feeds:
        try:
            refine_rounds, emulated_cosine = _refine(planner, model, feeds)
        except Exception as exc:  # refinement is a bonus; a run failure must not lose the result
            notes.append(f"emulated accuracy not measured: {str(exc).splitlines()[0][:160]}")
        if refine_rounds:
            conversion = planner.convert()
            retries["accuracy"] = refine_rounds
    problem = load_problem(conversion.model, fmt, strict)
    if problem is not None:
        notes.append(f"the {fmt.name} model still fails to load: {problem[:200]}")
    emulated = planner.convert(emulate=True).model
    kept = [
        {
            "node": planner.nodes[i].name or f"#{i}",
            "op": planner.nodes[i].op_type,
            "category": planner.categories[i],
            "reason": planner.kept[i],
        }
        for i in sorted(planner.kept)
    ]
    if planner.flagged_io:
        notes.append(
            f"kept float32 at the graph boundary (values out of {fmt.name} range): "
            + ", ".join(planner.flagged_io[:5])
        )
    result_stats = {
        "format": fmt.name,
        "nodes_converted": len(planner.low),
        "nodes_kept_float32": len(kept),
        "kept_by_reason": dict(Counter(k["category"] for k in kept).most_common()),
        "kept_by_op": dict(Counter(k["op"] for k in kept).most_common()),
        "casts_inserted": conversion.casts + conversion.io_casts,
        "weights_converted": conversion.constants_converted,
        "weights_duplicated": conversion.constants_duplicated,
        "weight_bytes_before": _float_bytes(model),
        "weight_bytes_after": _float_bytes(conversion.model),
        "values_measured": len(stats),
        "values_flagged": len(planner.flags),
        "retries": dict(retries),
        "emulated_cosine": emulated_cosine,
        "loads": problem is None,
        "block_ops": sorted(options.block_ops),
    }
    return MixedResult(conversion.model, emulated, result_stats, kept, notes)


def _float_bytes(model: onnx.ModelProto) -> int:
    """Bytes of float weights (fp32/fp16/bf16 initializers and Constant tensors)."""
    from optimodel.modelio import iter_tensors, tensor_bytes

    kinds = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    return sum(tensor_bytes(t) for t in iter_tensors(model) if t.data_type in kinds)


__all__ = [
    "DEFAULT_BLOCK_OPS",
    "FLOAT",
    "MixedOptions",
    "MixedResult",
    "convert_mixed",
    "infer_types",
    "load_problem",
]

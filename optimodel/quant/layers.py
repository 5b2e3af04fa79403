"""Per-layer error between a float model and its quantized (or otherwise rewritten) copy.

Both models run on the same feeds; every intermediate float tensor of the reference that
the candidate also computes is read back and compared (SQNR in dB, cosine, max abs diff).
Tensors are matched by name, which ONNX Runtime's quantizers keep:

- Q/DQ (static): a quantized node still writes its float output under the original name;
  when that tensor is re-quantized (QuantizeLinear -> DequantizeLinear), the DQ output
  is read instead, because that is the value the next layer really sees. A tensor that
  is a graph output keeps its name on the DequantizeLinear output: the same rule finds it.
- dynamic (MatMulInteger / ConvInteger): the rescaling Mul / bias Add at the end of the
  integer path writes the original output name.
- QOperator (QLinearConv, ...): the output is `NAME_quantized`, an integer tensor, read
  back and dequantized with the scale and zero point the op was given.

Only tensors present in both graphs are compared (a fusion in one of them makes the
fused-away tensors disappear). The tensors are read in chunks of `chunk` per session, as
extra graph outputs, so a large model never holds every activation at once (USER_ASKS
item 24: `--onnx-outputs mark all` ran out of memory). Sessions run at the `basic`
optimization level by default: the extra outputs would otherwise block different
fusions in different chunks, and the figures would depend on the chunk size.

Each row also carries the error its layer *adds*: the SQNR of its inputs (the worst of
the nearest compared tensors upstream) against its own, as a jump in dB and as the
layer's own SQNR (its added relative noise power), which ranks the layers that
introduce error rather than those that inherit it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from optimodel.data import Batch
from optimodel.errors import OptimodelError
from optimodel.modelio import tensor_array
from optimodel.runtime.sessions import SessionConfig, create_session, run_session
from optimodel.verify import OutputComparator

DEFAULT_CHUNK = 16
# A layer whose SQNR is this many dB below its inputs' counts as an error jump.
DEFAULT_JUMP_DB = 6.0
DEFAULT_TOP = 10
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
               onnx.TensorProto.BFLOAT16}  # fmt: skip
DQ, Q = "DequantizeLinear", "QuantizeLinear"
# QOperator ops: (output scale input index, output zero point input index).
QLINEAR_OUTPUT_PARAMS = {
    "QLinearConv": (6, 7),
    "QLinearMatMul": (6, 7),
    "QLinearAdd": (6, 7),
    "QLinearMul": (6, 7),
    "QGemm": (7, 8),
    "QLinearSigmoid": (3, 4),
    "QLinearLeakyRelu": (3, 4),
    "QLinearGlobalAveragePool": (3, 4),
    "QLinearAveragePool": (3, 4),
    "QLinearConcat": (0, 1),
    "QLinearSoftmax": (3, 4),
}


@dataclass
class Probe:
    """Where the candidate holds a reference tensor, and how to read it as float."""

    tensor: str  # name in the reference model
    read: str  # name read from the candidate
    node: str  # reference node that produces it
    op_type: str
    scale: np.ndarray | None = None  # set: `read` is an integer tensor to dequantize
    zero_point: np.ndarray | None = None

    def value(self, array: np.ndarray) -> np.ndarray:
        if self.scale is None:
            return array
        zero = self.zero_point if self.zero_point is not None else 0
        return (array.astype(np.float32) - zero) * self.scale


@dataclass
class LayerRow:
    """One compared tensor, in the reference's topological order."""

    index: int
    tensor: str
    read_as: str
    node: str
    op_type: str
    elements: int
    snr_db: float | None  # None: identical (infinite SQNR)
    cosine: float
    max_abs: float
    mean_abs: float
    input_snr_db: float | None  # worst compared input upstream; None: inputs exact
    jump_db: float | None  # input_snr_db - snr_db (None when either is exact)
    own_snr_db: float | None  # SQNR of the error this layer adds; None: adds none

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _key_snr(value: float | None) -> float:
    return math.inf if value is None else value


@dataclass
class LayerComparison:
    """Per-layer figures, the first error jumps and the worst layers."""

    rows: list[LayerRow]
    feeds: int
    data: str
    chunk: int
    sessions: int
    jump_threshold_db: float
    unmatched: list[str] = field(default_factory=list)
    optimization: str = "basic"

    @property
    def jumps(self) -> list[LayerRow]:
        """Rows, in topological order, whose SQNR fell by the threshold or more."""
        return [
            r for r in self.rows if r.jump_db is not None and r.jump_db >= self.jump_threshold_db
        ]

    @property
    def first_error(self) -> LayerRow | None:
        """The first row (topological order) that differs at all."""
        return next((r for r in self.rows if r.snr_db is not None), None)

    def worst(self, top: int = DEFAULT_TOP) -> list[LayerRow]:
        """The `top` rows with the lowest SQNR (ties: lowest cosine, earliest)."""
        ranked = sorted(self.rows, key=lambda r: (_key_snr(r.snr_db), r.cosine, r.index))
        return ranked[:top]

    def most_sensitive(self, top: int = DEFAULT_TOP) -> list[LayerRow]:
        """The `top` rows that add the most error of their own (lowest own SQNR)."""
        ranked = sorted(self.rows, key=lambda r: (_key_snr(r.own_snr_db), r.index))
        return [r for r in ranked if r.own_snr_db is not None][:top]

    def to_dict(self, top: int = DEFAULT_TOP) -> dict[str, Any]:
        first = self.first_error
        return {
            "feeds": self.feeds,
            "data": self.data,
            "chunk": self.chunk,
            "sessions": self.sessions,
            "graph_optimization": self.optimization,
            "compared": len(self.rows),
            "unmatched": len(self.unmatched),
            "unmatched_names": self.unmatched[:20],
            "jump_threshold_db": self.jump_threshold_db,
            "first_error": first.tensor if first else None,
            "jumps": [r.tensor for r in self.jumps],
            "worst": [r.tensor for r in self.worst(top)],
            "most_sensitive": [r.tensor for r in self.most_sensitive(top)],
            "layers": [r.to_dict() for r in self.rows],
        }


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference is only a help here: keep what the model says
        inferred = model
    graph = inferred.graph
    types = {}
    for value in [*graph.value_info, *graph.output, *graph.input]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:

    found = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    found[node.output[0]] = attr.t
    return {name: tensor_array(t) for name, t in found.items()}


def match_tensors(
    reference: onnx.ModelProto, candidate: onnx.ModelProto
) -> tuple[list[Probe], list[str]]:
    """Probes for the reference's float node outputs that the candidate computes too.

    Returns the probes in the reference's topological order and the names not found.
    """
    ref_types = _elem_types(reference)
    cand_producers = {o: n for n in candidate.graph.node for o in n.output if o}
    cand_users: dict[str, list[onnx.NodeProto]] = {}
    for node in candidate.graph.node:
        for name in node.input:
            cand_users.setdefault(name, []).append(node)
    cand_names = {n.name for n in candidate.graph.node if n.name}
    ref_users: dict[str, list[onnx.NodeProto]] = {}
    for node in reference.graph.node:
        for name in node.input:
            ref_users.setdefault(name, []).append(node)
    cand_constants: dict[str, np.ndarray] | None = None
    probes, unmatched = [], []
    for node in reference.graph.node:
        if node.op_type == "Constant":
            continue
        for name in node.output:
            if not name or ref_types.get(name, onnx.TensorProto.FLOAT) not in FLOAT_TYPES:
                continue
            label = node.name or f"<{node.op_type} -> {name}>"
            if name in cand_producers:
                read = name
                for user in cand_users.get(name, []):
                    if user.op_type != Q:
                        continue
                    dq = next(
                        (u for u in cand_users.get(user.output[0], []) if u.op_type == DQ), None
                    )
                    if dq is not None:
                        read = dq.output[0]
                        break
                probes.append(Probe(name, read, label, node.op_type))
                continue
            quantized = f"{name}_quantized"
            producer = cand_producers.get(quantized)
            users = ref_users.get(name, [])
            if users and all(
                u.op_type in ("Relu", "Clip") and u.name not in cand_names for u in users
            ):  # the quantizer folded the activation into the op: `quantized` is after it
                unmatched.append(name)
                continue
            params = QLINEAR_OUTPUT_PARAMS.get(producer.op_type) if producer else None
            if producer is not None and params and len(producer.input) > params[1]:
                if cand_constants is None:
                    cand_constants = _constants(candidate.graph)
                scale = cand_constants.get(producer.input[params[0]])
                zero = cand_constants.get(producer.input[params[1]])
                if scale is not None and scale.size == 1:
                    probes.append(
                        Probe(name, quantized, label, node.op_type, scale.astype(np.float32),
                              None if zero is None else zero.astype(np.float32))
                    )  # fmt: skip
                    continue
            unmatched.append(name)
    return probes, unmatched


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of the model whose graph outputs are exactly `names` (types left to ORT)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name: o for o in model.graph.output}
    del probe.graph.output[:]
    for name in names:
        if name in known:
            probe.graph.output.append(known[name])
        else:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    return probe


def _input_snr(
    reference: onnx.ModelProto, rows: dict[str, LayerRow]
) -> dict[str, tuple[float | None, bool]]:
    """For each compared tensor: the worst SQNR among the nearest compared tensors upstream.

    Value: (worst finite SQNR or None, whether any upstream tensor differs at all).
    """
    producers = {o: n for n in reference.graph.node for o in n.output if o}
    memo: dict[str, tuple[float | None, bool]] = {}

    def upstream(name: str, depth: int = 0) -> tuple[float | None, bool]:
        """SQNR seen at tensor `name` (a compared one, or through uncompared producers)."""
        if name in rows:
            row = rows[name]
            return row.snr_db, row.snr_db is not None
        if name in memo:
            return memo[name]
        node = producers.get(name)
        result: tuple[float | None, bool] = (None, False)
        if node is not None and depth < 64:
            result = _worst([upstream(i, depth + 1) for i in node.input if i])
        memo[name] = result
        return result

    out = {}
    for name in rows:
        node = producers.get(name)
        inputs = [i for i in node.input if i] if node is not None else []
        out[name] = _worst([upstream(i) for i in inputs])
    return out


def _worst(values: list[tuple[float | None, bool]]) -> tuple[float | None, bool]:
    finite = [v for v, _ in values if v is not None]
    differs = any(d for _, d in values)
    return (min(finite) if finite else None), differs


def _noise(snr_db: float | None) -> float:
    return 0.0 if snr_db is None else 10.0 ** (-snr_db / 10.0)


def compare_layers(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    batches: Sequence[Batch],
    *,
    chunk: int = DEFAULT_CHUNK,
    jump_db: float = DEFAULT_JUMP_DB,
    session_config: SessionConfig | None = None,
    data_description: str = "",
) -> LayerComparison:
    """Compare every matched intermediate tensor of `candidate` with `reference`."""
    if chunk < 1:
        raise OptimodelError(f"chunk {chunk}: must be at least 1 tensor per run")
    batches = list(batches)
    if not batches:
        raise OptimodelError("layer comparison needs at least one feed; the data is empty")
    config = session_config or SessionConfig(optimization="basic")
    probes, unmatched = match_tensors(reference, candidate)
    results: dict[str, Any] = {}
    sessions = 0
    for start in range(0, len(probes), chunk):
        part = probes[start : start + chunk]
        ref_session = create_session(
            _with_outputs(reference, [p.tensor for p in part]), config, source="reference model"
        )
        cand_session = create_session(
            _with_outputs(candidate, [p.read for p in part]), config, source="candidate model"
        )
        sessions += 1
        comparator = OutputComparator([p.tensor for p in part])
        for batch in batches:
            ref_out = run_session(ref_session, batch.feed, "reference model")
            cand_out = run_session(cand_session, batch.feed, "candidate model")
            comparator.update(
                [np.asarray(r) for r in ref_out],
                [p.value(np.asarray(c)) for p, c in zip(part, cand_out, strict=True)],
            )
        for diff in comparator.results():
            results[diff.name] = diff
        del ref_session, cand_session
    rows: dict[str, LayerRow] = {}
    for index, probe in enumerate(probes):
        diff = results[probe.tensor]
        snr = diff.snr_db
        rows[probe.tensor] = LayerRow(
            index=index,
            tensor=probe.tensor,
            read_as=probe.read,
            node=probe.node,
            op_type=probe.op_type,
            elements=diff.elements,
            snr_db=round(snr, 4) if snr is not None else None,
            cosine=diff.cosine,
            max_abs=diff.max_abs,
            mean_abs=diff.mean_abs,
            input_snr_db=None,
            jump_db=None,
            own_snr_db=None,
        )
    for name, (input_snr, _) in _input_snr(reference, rows).items():
        row = rows[name]
        row.input_snr_db = round(input_snr, 4) if input_snr is not None else None
        if row.snr_db is not None and input_snr is not None:
            row.jump_db = round(input_snr - row.snr_db, 4)
        added = _noise(row.snr_db) - _noise(input_snr)
        if row.snr_db is not None and added > 0:
            row.own_snr_db = round(-10.0 * math.log10(added), 4)
    return LayerComparison(
        rows=list(rows.values()),
        feeds=len(batches),
        data=data_description,
        chunk=chunk,
        sessions=sessions,
        jump_threshold_db=jump_db,
        unmatched=unmatched,
        optimization=config.optimization,
    )

"""Channel pruning: remove whole output channels and shrink every tensor that depends on them.

A *channel group* is the set of activations that must lose the same channels together.
It starts at a layer's output (Conv, ConvTranspose, Gemm, MatMul with a constant weight)
and grows in both directions through ops that treat channels independently:
elementwise ops (Relu, Clip, HardSwish written as Add/Clip/Mul/Div, ...), BatchNormalization,
pooling, depthwise convs, Resize over space, Flatten of [N, C, H, W] (channel c becomes rows
c*H*W .. (c+1)*H*W - 1), and binary ops whose other operand is a per-channel constant or
another member. A residual Add joins both operands, so the producers on each side are pruned
with the same kept indices (the group then has several *sources*). The group ends at the
layers that read it (the *sinks*), whose weights lose the matching input rows.

Anything else (Reshape, Concat, Shape, Softmax, a graph output, a subgraph) makes the whole
group decline with the reason, because channel positions would no longer line up.

Because every path out of a group ends in a sink, the pruned model equals the original with
the sinks' rows for the removed channels set to zero; `apply_plan(mode="zero")` builds that
model so the rewrite can be checked exactly, separately from what pruning costs in accuracy.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from optimodel.graphs import attr, copy_model, static_shape, subgraph_references
from optimodel.modelio import tensor_array
from optimodel.pruning.common import capped_smallest, node_label

UNARY = {
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
    "Celu", "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Abs", "Neg", "Exp", "Log", "Sqrt",
    "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Identity", "Cast", "Clip",
    "Dropout", "ThresholdedRelu", "Shrink",
}  # fmt: skip
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean"}
NORMS = {"BatchNormalization", "InstanceNormalization"}
POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}


class _Decline(Exception):
    """A group cannot be pruned; the message says why."""


@dataclass(frozen=True)
class View:
    """Where a group's channels sit in one tensor: axis, tensor rank, and entries per channel."""

    axis: int
    rank: int
    repeat: int = 1


@dataclass(frozen=True)
class SliceOp:
    """Slice input `index` of node number `node` along `axis` (channel c -> repeat entries)."""

    node: int
    index: int
    axis: int
    repeat: int = 1
    sink: bool = False


@dataclass
class Source:
    """A layer whose output channels are removed: its weight and output axis rank them."""

    node: int
    label: str
    weight: np.ndarray
    out_axis: int
    bn_scale: np.ndarray | None = None


@dataclass
class ChannelGroup:
    """Activations that lose the same channels, and every tensor edit that removal needs."""

    channels: int
    members: dict[str, View] = field(default_factory=dict)
    sources: list[Source] = field(default_factory=list)
    sinks: list[str] = field(default_factory=list)
    slices: list[SliceOp] = field(default_factory=list)
    depthwise: list[int] = field(default_factory=list)
    invalid: str | None = None
    source_params: int = 0

    @property
    def label(self) -> str:
        return ", ".join(s.label for s in self.sources)


@dataclass
class _Layer:
    """A Conv / ConvTranspose / Gemm / MatMul with a constant weight, seen as a layer."""

    weight: str
    out_channels: int
    in_channels: int
    w_out_axis: int
    w_in_axis: int
    act_in_axis: int  # channel axis of the data input, counted from the end (negative)


class _Analyzer:
    """Shapes, producers, consumers and constants of a model, for growing groups."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.graph = graph
        # one list of node objects: protobuf hands out a new wrapper on every access, so
        # identities are only stable on objects kept alive here
        self.nodes = list(graph.node)
        self.index = {id(n): i for i, n in enumerate(self.nodes)}
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # shape inference failing leaves ranks unknown: groups decline
            inferred = model
        self.shapes: dict[str, list[int | None]] = {}
        for value in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
            dims = static_shape(value.type)
            if dims is not None:
                self.shapes[value.name] = dims
        inputs = {i.name for i in graph.input}
        self.constants: dict[str, onnx.TensorProto] = {
            t.name: t for t in graph.initializer if t.name not in inputs
        }
        for node in self.nodes:
            if node.op_type == "Constant" and not node.domain:
                value = attr(node, "value")
                if isinstance(value, onnx.TensorProto):
                    self.constants[node.output[0]] = value
        for name, tensor in self.constants.items():
            self.shapes.setdefault(name, list(tensor.dims))
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.uses: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for name in dict.fromkeys(node.input):
                if name:
                    self.uses[name].append(node)
        self.outputs = {o.name for o in graph.output}
        self.inner_reads = subgraph_references(graph)
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = tensor_array(self.constants[name])
        return self._arrays[name]

    def rank(self, name: str) -> int | None:
        dims = self.shapes.get(name)
        return len(dims) if dims is not None else None

    def layer(self, node: onnx.NodeProto) -> _Layer | None:
        """The node as a prunable layer, or None (depthwise / grouped convs are not layers)."""
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            return None
        weight = node.input[1]
        if weight not in self.constants:
            return None
        dims = list(self.constants[weight].dims)
        op = node.op_type
        if op in ("Conv", "ConvTranspose") and len(dims) >= 3 and attr(node, "group", 1) == 1:
            if op == "Conv":
                return _Layer(weight, dims[0], dims[1], 0, 1, -(len(dims) - 1))
            return _Layer(weight, dims[1], dims[0], 1, 0, -(len(dims) - 1))
        if op == "Gemm" and len(dims) == 2 and not attr(node, "transA", 0):
            if attr(node, "transB", 0):
                return _Layer(weight, dims[0], dims[1], 0, 1, -1)
            return _Layer(weight, dims[1], dims[0], 1, 0, -1)
        if op == "MatMul" and len(dims) == 2:
            return _Layer(weight, dims[1], dims[0], 1, 0, -1)
        return None

    def depthwise(self, node: onnx.NodeProto) -> bool:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in self.constants:
            return False
        dims = list(self.constants[node.input[1]].dims)
        group = int(attr(node, "group", 1))  # type: ignore[arg-type]
        return group > 1 and len(dims) >= 3 and dims[1] == 1 and dims[0] == group


class _Grower:
    """Grows one group from a layer's output; raises _Decline with the reason."""

    def __init__(self, an: _Analyzer, group: ChannelGroup) -> None:
        self.an = an
        self.g = group
        self.queue: list[str] = []
        self.visited: set[tuple[int, str, int]] = set()

    @property
    def width(self) -> int:
        return self.g.channels

    def add(self, name: str, view: View) -> None:
        have = self.g.members.get(name)
        if have is not None:
            if have != view:
                raise _Decline(f"'{name}' is reached with two different channel layouts")
            return
        if name in self.an.constants:
            raise _Decline(f"'{name}' is a constant on a channel path")
        dims = self.an.shapes.get(name)
        if dims is not None and len(dims) == view.rank:
            size = dims[view.axis]
            if size is not None and size != self.width * view.repeat:
                raise _Decline(f"'{name}' has {size} channels where {self.width} were expected")
        self.g.members[name] = view
        self.queue.append(name)

    def grow(self, start: onnx.NodeProto, layer: _Layer) -> None:
        out = start.output[0]
        rank = self.an.rank(out)
        if rank is None:
            raise _Decline(f"the rank of '{out}' is unknown (shape inference failed)")
        self.add(out, View(rank - 1 if start.op_type in ("Gemm", "MatMul") else 1, rank))
        while self.queue:
            name = self.queue.pop()
            if name in self.an.outputs:
                raise _Decline(f"its channels reach the graph output '{name}'")
            if name in self.an.inner_reads:
                raise _Decline(f"'{name}' is read inside a subgraph")
            producer = self.an.producer.get(name)
            if producer is None:
                raise _Decline(f"its channels come from the graph input '{name}'")
            self.visit_producer(producer, name)
            for node in self.an.uses.get(name, []):
                for index, used in enumerate(node.input):
                    if used == name:
                        self.visit_consumer(node, index)

    def _once(self, node: onnx.NodeProto, role: str, index: int = 0) -> bool:
        key = (self.an.index[id(node)], role, index)
        if key in self.visited:
            return False
        self.visited.add(key)
        return True

    def visit_producer(self, node: onnx.NodeProto, name: str) -> None:
        layer = self.an.layer(node)
        if layer is None:
            self.passthrough(node)
            return
        if not self._once(node, "source"):
            return
        view = self.g.members[name]
        label = node_label(node)
        if name != node.output[0]:
            raise _Decline(f"reaches a secondary output of {node.op_type} '{label}'")
        expected = view.rank - 1 if node.op_type in ("Gemm", "MatMul") else 1
        if view.repeat != 1 or view.axis != expected:
            raise _Decline(f"channels do not line up with the outputs of '{label}'")
        if layer.out_channels != self.width:
            raise _Decline(f"'{label}' has {layer.out_channels} outputs, not {self.width}")
        i = self.an.index[id(node)]
        self.g.slices.append(SliceOp(i, 1, layer.w_out_axis))
        bias = node.input[2] if len(node.input) > 2 else ""
        if bias:
            if bias not in self.an.constants:
                raise _Decline(f"'{label}' has a non-constant bias")
            if node.op_type == "Gemm":
                self.constant_operand(node, 2, View(1, 2))
            else:
                self.g.slices.append(SliceOp(i, 2, 0))
        weight = self.an.array(layer.weight)
        bn_scale = self._bn_scale(node.output[0])
        self.g.sources.append(Source(i, label, weight, layer.w_out_axis, bn_scale))
        self.g.source_params += int(weight.size)

    def _bn_scale(self, out: str) -> np.ndarray | None:
        """|gamma| / sqrt(var + eps) of a BatchNormalization that alone reads the output."""
        users = self.an.uses.get(out, [])
        if len(users) != 1 or users[0].op_type != "BatchNormalization":
            return None
        bn = users[0]
        if not all(n in self.an.constants for n in (bn.input[1], bn.input[4])):
            return None
        eps = float(attr(bn, "epsilon", 1e-5))  # type: ignore[arg-type]
        gamma = self.an.array(bn.input[1]).astype(np.float64)
        var = self.an.array(bn.input[4]).astype(np.float64)
        return np.abs(gamma) / np.sqrt(var + eps)

    def visit_consumer(self, node: onnx.NodeProto, index: int) -> None:
        layer = self.an.layer(node)
        if layer is None:
            self.passthrough(node)
            return
        if not self._once(node, "sink", index):
            return
        if index != 0:
            raise _Decline(f"reaches the weight input of '{node_label(node)}'")
        view = self.g.members[node.input[0]]
        if view.axis - view.rank != layer.act_in_axis:
            raise _Decline(f"channels are not the reduction axis of '{node_label(node)}'")
        if node.op_type in ("Conv", "ConvTranspose") and view.repeat != 1:
            raise _Decline(f"flattened channels reach '{node_label(node)}'")
        if layer.in_channels != self.width * view.repeat:
            raise _Decline(
                f"'{node_label(node)}' reads {layer.in_channels} inputs, not "
                f"{self.width * view.repeat}"
            )
        i = self.an.index[id(node)]
        self.g.slices.append(SliceOp(i, 1, layer.w_in_axis, view.repeat, sink=True))
        self.g.sinks.append(node_label(node))

    def constant_operand(self, node: onnx.NodeProto, index: int, out: View) -> None:
        """Slice a constant operand broadcast against a member laid out as `out`."""
        name = node.input[index]
        dims = list(self.an.constants[name].dims)
        axis = out.axis - (out.rank - len(dims))
        if axis < 0 or dims[axis] == 1:
            return
        if dims[axis] != self.width * out.repeat:
            raise _Decline(
                f"constant '{name}' of {node.op_type} '{node_label(node)}' has "
                f"{dims[axis]} entries on the channel axis"
            )
        self.g.slices.append(SliceOp(self.an.index[id(node)], index, axis, out.repeat))

    def _member_view(self, node: onnx.NodeProto) -> tuple[View, int]:
        """A member's view mapped to the node's output 0, and the output's rank."""
        out = node.output[0]
        if out in self.g.members:
            view = self.g.members[out]
            return view, view.rank
        for name in node.input:
            if name in self.g.members:
                view = self.g.members[name]
                rank = self.an.rank(out)
                if rank is None:
                    rank = max(self.an.rank(i) or 0 for i in node.input if i)
                return View(view.axis + rank - view.rank, rank, view.repeat), rank
        raise _Decline(f"internal: no member at {node.op_type} '{node_label(node)}'")

    def _only_first_output(self, node: onnx.NodeProto) -> None:
        for extra in node.output[1:]:
            if extra and (self.an.uses.get(extra) or extra in self.an.outputs):
                raise _Decline(f"a secondary output of {node.op_type} '{node_label(node)}' is used")

    def passthrough(self, node: onnx.NodeProto) -> None:
        """Ops that keep channels apart: both sides join the group, constants get sliced."""
        if not self._once(node, "pass"):
            return
        op = node.op_type
        label = node_label(node)
        if node.domain not in ("", "ai.onnx"):
            raise _Decline(f"reaches custom op {node.domain}.{op} '{label}'")
        out, rank = self._member_view(node)
        self._only_first_output(node)
        data = node.input[0] if node.input else ""
        if op in UNARY or op in NORMS or op in POOLS or op in ("Resize", "Upsample"):
            if op in NORMS or op in POOLS:
                if out.axis != 1 or out.repeat != 1:
                    raise _Decline(f"channels are not axis 1 of {op} '{label}'")
            if op in ("Resize", "Upsample"):
                self._check_resize(node, out)
            elif op in NORMS:
                for k in range(1, len(node.input)):
                    if node.input[k] not in self.an.constants:
                        raise _Decline(f"{op} '{label}' has non-constant parameters")
                    self.g.slices.append(SliceOp(self.an.index[id(node)], k, 0))
            else:
                for k in range(1, len(node.input)):
                    if not node.input[k]:
                        continue
                    if node.input[k] not in self.an.constants:
                        raise _Decline(f"{op} '{label}' has a non-constant parameter")
                    if op != "Dropout":
                        self.constant_operand(node, k, out)
            in_rank = self.an.rank(data) or rank
            self.add(data, View(out.axis - (rank - in_rank), in_rank, out.repeat))
            self.add(node.output[0], out)
            return
        if op == "Conv" and self.an.depthwise(node):
            if out.axis != 1 or out.repeat != 1:
                raise _Decline(f"channels are not axis 1 of depthwise conv '{label}'")
            i = self.an.index[id(node)]
            self.g.slices.append(SliceOp(i, 1, 0))
            if len(node.input) > 2 and node.input[2]:
                self.g.slices.append(SliceOp(i, 2, 0))
            self.g.depthwise.append(i)
            self.add(data, out)
            self.add(node.output[0], out)
            return
        if op in BINARY:
            for k, name in enumerate(node.input):
                if not name:
                    continue
                if name in self.an.constants:
                    self.constant_operand(node, k, out)
                    continue
                in_rank = self.an.rank(name)
                if in_rank is None:
                    raise _Decline(f"the rank of '{name}' is unknown")
                axis = out.axis - (rank - in_rank)
                dims = self.an.shapes.get(name) or []
                if axis < 0 or (dims[axis] == 1 and self.width * out.repeat != 1):
                    continue  # broadcast along the channels: not channel-dependent
                self.add(name, View(axis, in_rank, out.repeat))
            self.add(node.output[0], out)
            return
        if op == "Flatten":
            self._flatten(node, out)
            return
        raise _Decline(f"its channels reach {op} '{label}'")

    def _check_resize(self, node: onnx.NodeProto, out: View) -> None:
        label = node_label(node)
        sizes = node.input[3] if len(node.input) > 3 else ""
        scales = node.input[2] if len(node.input) > 2 else ""
        if node.op_type == "Upsample":
            scales = node.input[1] if len(node.input) > 1 else ""
            sizes = ""
        if sizes and (sizes not in self.an.constants or self.an.array(sizes).size):
            raise _Decline(f"Resize '{label}' is given output sizes")
        if not scales or scales not in self.an.constants:
            raise _Decline(f"Resize '{label}' has non-constant scales")
        values = self.an.array(scales)
        if values.size != out.rank or values[out.axis] != 1:
            raise _Decline(f"Resize '{label}' scales the channel axis")

    def _flatten(self, node: onnx.NodeProto, out: View) -> None:
        data, result = node.input[0], node.output[0]
        dims = self.an.shapes.get(data)
        if dims is None:
            raise _Decline(f"the shape of '{data}' is unknown")
        axis = int(attr(node, "axis", 1))  # type: ignore[arg-type]
        axis = axis + len(dims) if axis < 0 else axis
        inner = dims[axis + 1 :]
        if any(d is None for d in inner):
            raise _Decline(f"Flatten '{node_label(node)}' of dynamic spatial dims")
        spread = math.prod(inner)  # type: ignore[arg-type]
        if data in self.g.members:
            view = self.g.members[data]
            if view.axis != axis:
                raise _Decline(f"Flatten '{node_label(node)}' does not start at the channels")
            self.add(result, View(1, 2, view.repeat * spread))
            return
        if out.axis != 1 or out.repeat % spread:
            raise _Decline(f"Flatten '{node_label(node)}' does not start at the channels")
        self.add(data, View(axis, len(dims), out.repeat // spread))
        self.add(result, out)


def find_groups(
    model: onnx.ModelProto,
    *,
    exclude_nodes: set[str] | None = None,
    exclude_ops: set[str] | None = None,
    min_params: int = 0,
) -> tuple[list[ChannelGroup], list[dict[str, str]]]:
    """Every prunable channel group of the main graph, and why other layers are not pruned."""
    an = _Analyzer(model)
    exclude_nodes, exclude_ops = exclude_nodes or set(), exclude_ops or set()
    groups: list[ChannelGroup] = []
    declined: list[dict[str, str]] = []
    seen: set[str] = set()
    claimed: set[tuple[int, int, int]] = set()
    for node in an.nodes:
        layer = an.layer(node)
        if layer is None or not node.output or node.output[0] in seen:
            continue
        group = ChannelGroup(channels=layer.out_channels)
        try:
            if layer.out_channels < 2:
                raise _Decline("a single output channel")
            _Grower(an, group).grow(node, layer)
        except _Decline as exc:
            group.invalid = str(exc)
        seen.update(group.members)
        seen.add(node.output[0])
        label = group.label or node_label(node)
        excluded = [
            s.label
            for s in group.sources
            if s.label in exclude_nodes or model.graph.node[s.node].op_type in exclude_ops
        ]
        keys = {(s.node, s.index, s.axis) for s in group.slices}
        if group.invalid is None and excluded:
            group.invalid = f"excluded ({', '.join(excluded)})"
        elif group.invalid is None and group.source_params < min_params:
            group.invalid = f"{group.source_params} parameters < --min-params {min_params}"
        elif group.invalid is None and keys & claimed:
            group.invalid = "shares a tensor edit with another group"
        if group.invalid is not None:
            declined.append({"pattern": "channel", "node": label, "reason": group.invalid})
            continue
        claimed |= keys
        groups.append(group)
    return groups, declined


def importance(group: ChannelGroup, norm: str = "l1") -> np.ndarray:
    """Per-channel score: each source's weight norm (times its BatchNorm scale), divided by
    that source's mean so sources of different sizes count alike, summed over sources.
    """
    total = np.zeros(group.channels, dtype=np.float64)
    for source in group.sources:
        weight = source.weight.astype(np.float64)
        rows = np.moveaxis(weight, source.out_axis, 0).reshape(group.channels, -1)
        score = np.abs(rows).sum(axis=1) if norm == "l1" else np.sqrt((rows * rows).sum(axis=1))
        if source.bn_scale is not None and source.bn_scale.shape == score.shape:
            score = score * source.bn_scale
        mean = float(score.mean())
        if mean > 0:
            total += score / mean
    return total


def keep_count(channels: int, remove: int, multiple: int = 1) -> int:
    """Channels kept when `remove` should go: at least one, and with `multiple` > 1 the
    nearest multiple of it (or all channels), because CPU conv kernels work in blocks of
    8 / 16 channels and an odd count can make the smaller layer slower.
    """
    kept = max(1, channels - max(0, int(remove)))
    if multiple <= 1 or channels <= multiple:
        return kept
    options = [*range(multiple, channels + 1, multiple), channels]
    return min(options, key=lambda k: (abs(k - kept), -k))


def keep_indices(scores: np.ndarray, kept: int) -> np.ndarray:
    """Sorted indices of the `kept` highest-scoring channels (ties: the earlier one)."""
    kept = max(1, min(int(kept), scores.size))
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:kept])


def plan_layer(
    scores: Sequence[np.ndarray], ratios: Sequence[float], multiple: int = 1
) -> list[np.ndarray]:
    """Each group loses round(ratio * channels) channels (always keeping one)."""
    return [
        keep_indices(s, keep_count(s.size, int(round(r * s.size)), multiple))
        for s, r in zip(scores, ratios, strict=True)
    ]


def plan_global(
    scores: Sequence[np.ndarray], sparsity: float, max_layer_sparsity: float, multiple: int = 1
) -> list[np.ndarray]:
    """One ranking across groups on mean-normalized scores, capped per group."""
    normalized = [s / s.mean() if s.mean() > 0 else np.zeros_like(s) for s in scores]
    total = int(round(sparsity * sum(s.size for s in scores)))
    cap = max(max_layer_sparsity, sparsity)
    caps = [min(s.size - 1, int(math.floor(cap * s.size))) for s in scores]
    counts = capped_smallest(list(normalized), total, caps)
    return [
        keep_indices(s, keep_count(s.size, c, multiple))
        for s, c in zip(scores, counts, strict=True)
    ]


def _expand(indices: np.ndarray, repeat: int) -> np.ndarray:
    if repeat == 1:
        return indices
    return (indices[:, None] * repeat + np.arange(repeat)[None, :]).ravel()


def apply_plan(
    model: onnx.ModelProto,
    groups: Sequence[ChannelGroup],
    keeps: Sequence[np.ndarray],
    *,
    mode: str = "take",
) -> onnx.ModelProto:
    """A copy with the planned channels removed (`take`), or only the sinks' rows for them
    zeroed (`zero`: the same function as the pruned model, on the original shapes).
    """
    work = copy_model(model)
    graph = work.graph
    edits: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = defaultdict(list)
    for group, keep in zip(groups, keeps, strict=True):
        if keep.size == group.channels:
            continue
        removed = np.setdiff1d(np.arange(group.channels), keep)
        for op in group.slices:
            if mode == "zero" and not op.sink:
                continue
            chosen = removed if mode == "zero" else keep
            edits[(op.node, op.index)].append((op.axis, _expand(chosen, op.repeat)))
        if mode == "take":
            for i in group.depthwise:
                node = graph.node[i]
                for a in node.attribute:
                    if a.name == "group":
                        a.i = int(keep.size)
            _resize_values(graph, group, int(keep.size))
    _rewrite_tensors(graph, edits, mode)
    return work


def _resize_values(graph: onnx.GraphProto, group: ChannelGroup, kept: int) -> None:
    for value in graph.value_info:
        view = group.members.get(value.name)
        shape = value.type.tensor_type.shape
        if view is not None and len(shape.dim) == view.rank:
            dim = shape.dim[view.axis]
            dim.Clear()
            dim.dim_value = kept * view.repeat


def _rewrite_tensors(
    graph: onnx.GraphProto,
    edits: dict[tuple[int, int], list[tuple[int, np.ndarray]]],
    mode: str,
) -> None:
    """Apply slice edits to each (node, input) constant; a tensor read elsewhere differently
    gets a new copy, so shared weights never change under another reader.
    """
    initializers = {t.name: t for t in graph.initializer}
    constant_nodes = {
        n.output[0]: n for n in graph.node if n.op_type == "Constant" and not n.domain
    }
    readers: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for i, node in enumerate(graph.node):
        for k, name in enumerate(node.input):
            if name:
                readers[name].append((i, k))
    pinned = subgraph_references(graph) | {o.name for o in graph.output}
    taken = set(initializers) | {o for n in graph.node for o in n.output}
    by_tensor: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for node_i, index in edits:
        by_tensor[graph.node[node_i].input[index]].add((node_i, index))
    replaced: set[str] = set()
    for name in by_tensor:
        if name in initializers:
            source = tensor_array(initializers[name])
        else:
            value = attr(constant_nodes[name], "value")
            source = tensor_array(value)  # type: ignore[arg-type]
        variants: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
        for reader in readers[name]:
            ops = edits.get(reader, [])
            key = tuple((axis, idx.tobytes()) for axis, idx in ops)
            variants[key].append(reader)
        in_place = len(variants) == 1 and name in initializers and name not in pinned
        for key, users in variants.items():
            if not key:
                continue
            array = source
            for axis, idx in edits[users[0]]:
                if mode == "take":
                    array = np.take(array, idx, axis=axis)
                else:
                    array = array.copy()
                    where: list[slice | np.ndarray] = [slice(None)] * array.ndim
                    where[axis] = idx
                    array[tuple(where)] = 0
            if in_place:
                initializers[name].CopyFrom(numpy_helper.from_array(array, name))
                continue
            new = _fresh(f"{name}_pruned", taken)
            graph.initializer.append(numpy_helper.from_array(array, new))
            for node_i, index in users:
                graph.node[node_i].input[index] = new
            replaced.add(name)
    _drop_unused(graph, replaced)


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}{k}"
    taken.add(name)
    return name


def _drop_unused(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove replaced initializers / Constant nodes that nothing reads any more."""
    read = {i for n in graph.node for i in n.input} | subgraph_references(graph)
    read |= {o.name for o in graph.output}
    dead = {n for n in names if n not in read}
    if not dead:
        return
    keep_inits = [t for t in graph.initializer if t.name not in dead]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    keep_nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in dead)]
    del graph.node[:]
    graph.node.extend(keep_nodes)

"""Fusion patterns for the `fuse` pass: one file per pattern, registered by name.

A `Pattern` looks at one anchor node at a time and answers with a `Rewrite` (nodes to
remove, nodes that replace them, new initializers, value renames), with a reason when
the anchor is a near miss (the shape is there but a condition fails), or with None when
the anchor does not start its shape at all. Patterns never mutate the graph: the pass
applies rewrites, refuses one that would drop a value still in use, and turns an
exception into a declined match, so a pattern bug or an odd graph (QDQ, contrib ops,
custom domains) cannot lose the model. Whole-graph fusions (ONNX Runtime's transformer
optimizer) are `GraphPattern`s that return a new model instead.

The name a pattern registers is what users type after `--skip` and what the report
counts; a `GraphPattern` serves several names at once.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import numpy_helper

from optimodel.graphs import MS_DOMAIN, STANDARD_DOMAINS, attr, static_shape
from optimodel.modelio import iter_graphs, tensor_array

__all__ = [
    "FLOAT_TYPES",
    "GROUPS",
    "TARGETS",
    "GraphOutcome",
    "GraphPattern",
    "GraphView",
    "Pattern",
    "Rewrite",
    "graph_patterns",
    "node_patterns",
    "pattern_names",
    "register",
    "shapes_only",
]

GROUPS = ("transformer", "cnn", "common")
TARGETS = ("ort", "portable")
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}


@dataclass
class Rewrite:
    """One matched subgraph and what replaces it.

    New nodes go where the last removed node was, so they read values that exist by
    then; `rename` makes every reader of a key read its value instead (for fusions
    that reduce to nothing, such as two Transposes that cancel).
    """

    remove: list[onnx.NodeProto]
    add: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    rename: dict[str, str] = field(default_factory=dict)


class GraphView:
    """Read-only indexes over one graph that patterns match against.

    Constants are initializers that are not graph inputs (those can be fed at run time)
    and outputs of Constant nodes, so unfolded models fuse too.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        types: dict[str, onnx.TypeProto],
        target: str,
        reserved: set[str] | None = None,
    ) -> None:
        self.model = model
        self.graph = model.graph
        self.target = target
        self.types = types
        self.opset = default_opset(model)
        self.nodes = list(self.graph.node)
        self.outputs = {o.name for o in self.graph.output}
        self.producers: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.by_op: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producers[out] = node
            for name in node_reads(node):
                self.consumers[name].append(node)
            if node.domain in STANDARD_DOMAINS:
                self.by_op[node.op_type].append(node)
        inputs = {i.name for i in self.graph.input}
        self.initializers = {t.name: t for t in self.graph.initializer if t.name not in inputs}
        self._arrays: dict[str, np.ndarray | None] = {}
        self.names = reserved if reserved is not None else all_names(model)

    # -- values ---------------------------------------------------------------------------

    def const(self, name: str) -> np.ndarray | None:
        """The value of a constant (initializer or Constant node output), else None."""
        if not name:
            return None
        if name not in self._arrays:
            self._arrays[name] = self._load(name)
        return self._arrays[name]

    def _load(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return tensor_array(self.initializers[name])
        node = self.producers.get(name)
        if node is None or node.op_type != "Constant" or node.domain not in STANDARD_DOMAINS:
            return None
        for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
            value = attr(node, key)
            if value is None:
                continue
            if isinstance(value, onnx.TensorProto):
                return tensor_array(value)
            dtype = np.float32 if key.startswith("value_float") else np.int64
            return np.asarray(value, dtype=dtype)
        return None

    def scalar(self, name: str) -> float | None:
        """A constant holding exactly one number, as a float."""
        value = self.const(name)
        if value is None or value.size != 1 or value.dtype.kind not in "fiu":
            return None
        return float(value.reshape(-1)[0])

    def shape(self, name: str) -> list[int | None] | None:
        value = self.const(name)
        if value is not None:
            return list(value.shape)
        return static_shape(self.types.get(name))

    def rank(self, name: str) -> int | None:
        dims = self.shape(name)
        return None if dims is None else len(dims)

    def dtype(self, name: str) -> int:
        """ONNX element type of a value (0 when unknown)."""
        if name in self.initializers:
            return self.initializers[name].data_type
        value = self.const(name)
        if value is not None:
            return onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        tp = self.types.get(name)
        return tp.tensor_type.elem_type if tp is not None else 0

    # -- structure ------------------------------------------------------------------------

    def producer(self, name: str, op_type: str | None = None) -> onnx.NodeProto | None:
        """The standard-domain node producing `name` (of `op_type` if given)."""
        node = self.producers.get(name)
        if node is None or node.domain not in STANDARD_DOMAINS:
            return None
        if op_type is not None and node.op_type != op_type:
            return None
        return node

    def readers(self, name: str) -> list[onnx.NodeProto]:
        return self.consumers.get(name, [])

    def only_reader(self, name: str, node: onnx.NodeProto) -> bool:
        """`node` is the one reader of `name` and the value leaves no other way."""
        readers = self.readers(name)
        return name not in self.outputs and len(readers) == 1 and readers[0] is node

    def sole_reader(self, name: str, op_type: str) -> onnx.NodeProto | None:
        """The single standard-domain `op_type` node reading `name`, if that is its only use."""
        readers = self.readers(name)
        if name in self.outputs or len(readers) != 1:
            return None
        node = readers[0]
        if node.domain not in STANDARD_DOMAINS or node.op_type != op_type:
            return None
        return node

    # -- building -------------------------------------------------------------------------

    def fresh(self, base: str) -> str:
        """A value or node name not used anywhere in the model yet."""
        base = base or "fused"
        name, n = base, 1
        while name in self.names:
            name = f"{base}_{n}"
            n += 1
        self.names.add(name)
        return name

    def tensor(self, array: np.ndarray, base: str) -> onnx.TensorProto:
        return numpy_helper.from_array(np.ascontiguousarray(array), self.fresh(base))

    def node(
        self,
        op_type: str,
        inputs: list[str],
        outputs: list[str],
        *,
        name: str,
        like: onnx.NodeProto | None = None,
        drop: Iterable[str] = (),
        domain: str = "",
        **attrs: Any,
    ) -> onnx.NodeProto:
        """A new node; `like` copies another node's attributes (minus `drop`, plus `attrs`)."""
        node = onnx.helper.make_node(
            op_type, inputs, outputs, name=self.fresh(name), domain=domain or None
        )
        skip = set(drop) | set(attrs)
        if like is not None:
            node.attribute.extend(a for a in like.attribute if a.name not in skip)
        for key, value in sorted(attrs.items()):
            node.attribute.append(onnx.helper.make_attribute(key, value))
        return node


@dataclass
class GraphOutcome:
    """What a whole-graph fusion did: a new model (None: unchanged), counts, reasons."""

    model: onnx.ModelProto | None
    fired: dict[str, int] = field(default_factory=dict)
    declined: list[dict[str, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    payload: bytes | None = None  # `model` serialized, when the fusion already made them


class Pattern:
    """A local fusion matched from anchor nodes (standard domain op types)."""

    name: ClassVar[str]
    group: ClassVar[str]  # one of GROUPS
    anchors: ClassVar[tuple[str, ...]]
    targets: ClassVar[tuple[str, ...]] = TARGETS
    order: ClassVar[int] = 50  # lower runs first within a round
    summary: ClassVar[str] = ""
    # Whether its rewrites let shape inference learn more (e.g. a constant Reshape target):
    # the next round then re-infers types.
    refines_types: ClassVar[bool] = False

    def match(self, view: GraphView, node: onnx.NodeProto) -> Rewrite | str | None:
        """A rewrite, a reason it declines, or None when `node` does not start the pattern."""
        raise NotImplementedError


class GraphPattern:
    """A fusion over the whole model that serves several pattern names."""

    name: ClassVar[str]
    serves: ClassVar[tuple[str, ...]]
    group: ClassVar[str]
    targets: ClassVar[tuple[str, ...]] = TARGETS
    summary: ClassVar[str] = ""

    def run(
        self, model: onnx.ModelProto, enabled: set[str], types: dict[str, onnx.TypeProto]
    ) -> GraphOutcome:
        """Fuse what `enabled` names; `types` holds what shape inference knows of `model`."""
        raise NotImplementedError


_NODE_PATTERNS: dict[str, Pattern] = {}
_GRAPH_PATTERNS: dict[str, GraphPattern] = {}
_loaded = False


def register(cls: type[Pattern] | type[GraphPattern]) -> Any:
    """Class decorator: make a pattern available by its name."""
    table: dict[str, Any] = _GRAPH_PATTERNS if issubclass(cls, GraphPattern) else _NODE_PATTERNS
    if cls.name in table and type(table[cls.name]) is not cls:
        raise RuntimeError(f"two fusion patterns named '{cls.name}'")
    table[cls.name] = cls()
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def node_patterns() -> list[Pattern]:
    """Local patterns in the order a round applies them."""
    _load_all()
    return sorted(_NODE_PATTERNS.values(), key=lambda p: (p.order, p.name))


def graph_patterns() -> list[GraphPattern]:
    _load_all()
    return [_GRAPH_PATTERNS[k] for k in sorted(_GRAPH_PATTERNS)]


# Patterns `--enable` turns on, with why they are off: ONNX Runtime's CPU
# SkipLayerNormalization kernel is 6-8x slower than Add + LayerNormalization (see
# `residual_order`); CUDA's is fast. FusedConv is the reverse: ONNX Runtime's CPU
# provider writes it itself at load, its CUDA kernel refuses most activations and ran
# slower with Relu (see `conv_activation`).
OFF_BY_DEFAULT: dict[str, str] = {
    "skip-layernorm": "ONNX Runtime's CPU kernel is slower than Add + LayerNormalization; "
    "--enable skip-layernorm for CUDA",
    "conv-activation": "ONNX Runtime's CPU provider fuses Conv + activation itself at load "
    "and its CUDA FusedConv runs Relu only; --enable conv-activation stores it for the CPU",
}


def pattern_names() -> dict[str, str]:
    """Every name `--skip` accepts -> its group."""
    names = {p.name: p.group for p in node_patterns()}
    for gp in graph_patterns():
        for served in gp.serves:
            names.setdefault(served, gp.group)
    return dict(sorted(names.items()))


# -- helpers shared by the pattern files -----------------------------------------------------


def default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in STANDARD_DOMAINS:
            return int(op.version)
    return 1


def node_reads(node: onnx.NodeProto) -> set[str]:
    """Values a node reads: its inputs and what its subgraphs take from outer scopes."""
    names = {i for i in node.input if i}
    for a in node.attribute:
        subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for sub in subs:
            used: set[str] = set()
            defined: set[str] = set()
            for inner in iter_graphs(sub):
                defined.update(i.name for i in inner.input)
                defined.update(t.name for t in inner.initializer)
                for n in inner.node:
                    used.update(i for i in n.input if i)
                    defined.update(n.output)
                used.update(o.name for o in inner.output)
            names |= used - defined
    return names


def ensure_order(graph: onnx.GraphProto) -> bool:
    """Stable topological sort, only when a node reads a value produced after it; whether
    it sorted."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    nodes = list(graph.node)
    reads = [node_reads(n) for n in nodes]
    produced = {o for n in nodes for o in n.output if o}
    available = set(known)
    for node, needs in zip(nodes, reads, strict=True):
        if (needs & produced) - available:
            break
        available.update(node.output)
    else:
        return False
    pending = list(range(len(nodes)))
    ordered: list[onnx.NodeProto] = []
    available = set(known)
    while pending:
        rest = []
        for i in pending:
            if (reads[i] & produced) <= available:
                ordered.append(nodes[i])
                available.update(nodes[i].output)
            else:
                rest.append(i)
        if len(rest) == len(pending):
            raise RuntimeError("fused graph has a cycle")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
    return True


def all_names(model: onnx.ModelProto) -> set[str]:
    names: set[str] = set()
    for graph in iter_graphs(model.graph):
        names.update(i.name for i in graph.input)
        names.update(o.name for o in graph.output)
        names.update(t.name for t in graph.initializer)
        for node in graph.node:
            names.add(node.name)
            names.update(node.input)
            names.update(node.output)
    names.discard("")
    return names


SMALL_CONSTANT = 64  # elements; larger initializers reach shape inference as typed inputs


def shapes_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with large initializers turned into typed graph inputs, for shape
    inference: their values never decide a shape, and copying them is most of its cost.

    FusedConv stands in as the Conv it computes (same output shape): ONNX shape inference
    knows no com.microsoft schema and would lose every shape after it."""
    light = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    for node in graph.node:
        if node.op_type == "FusedConv" and node.domain == MS_DOMAIN:
            node.op_type, node.domain = "Conv", ""
            del node.input[3:]
            kept = [a for a in node.attribute if not a.name.startswith("activation")]
            del node.attribute[:]
            node.attribute.extend(kept)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    declared = {i.name for i in model.graph.input}
    for tensor in model.graph.initializer:
        if int(np.prod(tensor.dims)) <= SMALL_CONSTANT:
            graph.initializer.append(tensor)
        elif tensor.name not in declared:
            graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            )
    return light


def other_input(node: onnx.NodeProto, name: str) -> str | None:
    """For a binary node reading `name` once, its other input."""
    if len(node.input) != 2:
        return None
    if node.input[0] == name and node.input[1] != name:
        return node.input[1]
    if node.input[1] == name and node.input[0] != name:
        return node.input[0]
    return None


def close(value: float | None, expected: float, rel: float = 1e-3) -> bool:
    return value is not None and abs(value - expected) <= rel * abs(expected)

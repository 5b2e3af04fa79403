"""Float32 -> float16/bfloat16 rewriting on protos, node by node, from a plan.

Why not onnxconverter-common's (or ORT's copy of) `convert_float_to_float16`: it
relies on shape inference having typed every value, clamps out-of-range weights to
the fp16 maximum (a BatchNormalization variance of 9.8e7 becomes 65504 and the model
quietly gives different answers), appends its Casts after the last node (not
topologically sorted, so the ONNX checker refuses the result) and, in
onnxconverter-common, does not patch Cast nodes (the model does not load). Here each
node's float slots come from its ONNX schema (which inputs share the output's type,
which accept any float, which are float32 only), a weight that does not fit stays
float32 for the nodes that read it, Casts are inserted right before their first
reader, and the same plan can be "emulated": every low-precision tensor is rounded
to the 16-bit format but stored and computed in float32, which ONNX Runtime on CPU
can run for bfloat16 too.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optimodel.graphs import MS_DOMAIN, STANDARD_DOMAINS, copy_model, has_subgraph
from optimodel.modelio import iter_graphs, tensor_array
from optimodel.precision.formats import LowFormat

FLOAT = TensorProto.FLOAT
NON_TENSOR = -1  # a sequence, map or optional value

# Ops whose output type is set by a `dtype` attribute: left in float32.
ATTRIBUTE_TYPED = {
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "EyeLike",
    "Multinomial",
    "Bernoulli",
    "SequenceEmpty",
}


# ONNX Runtime's com.microsoft ops that `fuse --target ort` writes, which ONNX has no schema
# for: every float input and output shares one type T (float or float16), except the
# outputs listed, which stay float32 (SkipLayerNormalization's mean and inv_std_var).
# ORT runs them in float16 on CUDA and, in recent versions, on the CPU; an older ORT
# that cannot is caught by the load check, which keeps the node in float32.
CONTRIB_T_OPS: dict[str, frozenset[int]] = {
    "Attention": frozenset(),
    "MultiHeadAttention": frozenset(),
    "EmbedLayerNormalization": frozenset(),
    "SkipLayerNormalization": frozenset({1, 2}),
    "SkipSimplifiedLayerNormalization": frozenset({1, 2}),
    "BiasGelu": frozenset(),
    "FastGelu": frozenset(),
    "Gelu": frozenset(),
    "QuickGelu": frozenset(),
    "BiasAdd": frozenset(),
    "FusedMatMul": frozenset(),
}


@dataclass
class Slots:
    """How one node's float inputs and outputs may be typed in the converted model."""

    convertible: bool = True  # False: the node must stay float32 (reason says why)
    reason: str = ""
    neutral: bool = False  # no slot to convert (e.g. Shape, Cast to int): left as it is
    free: set[int] = field(default_factory=set)  # inputs that accept either precision
    fixed_in: set[int] = field(default_factory=set)  # inputs that must stay float32
    fixed_out: set[int] = field(default_factory=set)  # outputs that stay float32


class GraphFacts:
    """What the converter needs to know about a model's main graph, computed once."""

    def __init__(self, model: onnx.ModelProto, types: dict[str, int]) -> None:
        self.model = model
        graph = model.graph
        self.types = types
        self.opsets = {(o.domain or ""): o.version for o in model.opset_import}
        inits = {t.name for t in graph.initializer}
        self.overridable = {i.name for i in graph.input} & inits
        self.runtime_inputs = [i.name for i in graph.input if i.name not in inits]
        self.outputs = [o.name for o in graph.output]
        self.constants: dict[str, np.ndarray] = {}
        self.constant_nodes: dict[str, int] = {}
        for tensor in graph.initializer:
            if tensor.name not in self.overridable and tensor.data_type == FLOAT:
                self.constants[tensor.name] = tensor_array(tensor)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.sub_refs: dict[int, set[str]] = {}
        defined = {i.name for i in graph.input} | inits
        for idx, node in enumerate(graph.node):
            value = constant_value(node)
            if value is not None and value.dtype == np.float32:
                self.constants[node.output[0]] = value
                self.constant_nodes[node.output[0]] = idx
            for i, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((idx, i))
            for name in node.output:
                if name:
                    self.producer[name] = idx
            defined.update(o for o in node.output if o)
            if has_subgraph(node):
                self.sub_refs[idx] = _outer_names(node) & defined
        for name in self.constants:
            self.types[name] = FLOAT

    def is_float(self, name: str) -> bool:
        return bool(name) and self.types.get(name) == FLOAT

    def opset(self, domain: str) -> int:
        return self.opsets.get("" if domain == "ai.onnx" else domain, 1)


def constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The array a standard Constant node holds (tensor or float attributes), else None."""
    if node.op_type != "Constant" or node.domain not in STANDARD_DOMAINS or not node.attribute:
        return None
    attr = node.attribute[0]
    if attr.name == "value":
        return tensor_array(attr.t)
    if attr.name == "value_float":
        return np.array(attr.f, dtype=np.float32)
    if attr.name == "value_floats":
        return np.array(list(attr.floats), dtype=np.float32)
    return None


def _outer_names(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for attr in node.attribute:
        subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in subs:
            for inner in iter_graphs(sub):
                for n in inner.node:
                    names.update(i for i in n.input if i)
                names.update(o.name for o in inner.output)
    return names


def _formal(params: list, index: int) -> object | None:
    if index < len(params):
        return params[index]
    if params and params[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return params[-1]
    return None


def node_slots(node: onnx.NodeProto, facts: GraphFacts, fmt: LowFormat) -> Slots:
    """Read the node's ONNX schema: which float slots convert, which must stay float32."""
    if node.output and node.output[0] in facts.constant_nodes:
        return Slots(neutral=True)  # a float Constant: converted as a constant, per reader
    touched = [n for n in [*node.input, *node.output] if n]
    float_in = [i for i, n in enumerate(node.input) if facts.is_float(n)]
    float_out = [i for i, n in enumerate(node.output) if facts.is_float(n)]
    if not float_in and not float_out:
        return Slots(neutral=True)
    unknown = [n for n in touched if facts.types.get(n, 0) == 0]
    if unknown:
        return Slots(False, f"type of '{unknown[0]}' unknown")
    if any(facts.types.get(n) == NON_TENSOR for n in touched):
        return Slots(False, "reads or writes a sequence/map")
    if node.op_type == "Clip" and node.domain in STANDARD_DOMAINS and facts.opset("") < 12:
        # Measured on an H100: PP-OCR cls (opset 11) ran its 18 float16 Clips on the CPU,
        # 1.44x slower than float32; ONNX Runtime's CUDA Clip takes float16 from opset 12.
        return Slots(False, "Clip before opset 12 has no float16 CUDA kernel (runs on the CPU)")
    if node.domain == MS_DOMAIN and node.op_type in CONTRIB_T_OPS:
        return Slots(fixed_out={i for i in float_out if i in CONTRIB_T_OPS[node.op_type]})
    if node.domain not in STANDARD_DOMAINS:
        return Slots(False, f"op of domain '{node.domain}' (no ONNX schema to check)")
    if has_subgraph(node):
        return Slots(False, "has subgraphs (If/Loop/Scan stay float32)")
    if node.op_type in ATTRIBUTE_TYPED:
        return Slots(False, "output type set by an attribute")
    try:
        schema = onnx.defs.get_schema(node.op_type, facts.opset(node.domain), node.domain)
    except onnx.defs.SchemaError:
        return Slots(False, "no ONNX schema for this opset")
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    uses: Counter[str] = Counter()
    out_params = set()
    for params, names, is_out in (
        (schema.inputs, node.input, False),
        (schema.outputs, node.output, True),
    ):
        for i, name in enumerate(names):
            formal = _formal(list(params), i)
            if name and formal is not None:
                uses[formal.type_str] += 1
                if is_out:
                    out_params.add(formal.type_str)
    slots = Slots()
    converts = False
    label = f"{node.op_type}-{schema.since_version}"
    for i in float_in:
        formal = _formal(list(schema.inputs), i)
        if formal is None:
            return Slots(False, f"more inputs than {label} declares")
        kinds = allowed.get(formal.type_str, {formal.type_str})
        if "tensor(float)" not in kinds:
            return Slots(False, f"{label} input '{formal.name}' takes no float32")
        if fmt.type_str not in kinds:
            slots.fixed_in.add(i)
        elif uses[formal.type_str] == 1 and formal.type_str not in out_params:
            slots.free.add(i)
        else:
            converts = True
    for i in float_out:
        formal = _formal(list(schema.outputs), i)
        if formal is None:
            return Slots(False, f"more outputs than {label} declares")
        kinds = allowed.get(formal.type_str, {formal.type_str})
        if fmt.type_str in kinds and formal.type_str in allowed:
            converts = True
        elif formal.type_str == "tensor(float)":
            slots.fixed_out.add(i)
        else:
            return Slots(False, f"{label} output '{formal.name}' has no {fmt.name}")
    if not converts:
        slots.neutral = True
    return slots


class _Names:
    """Fresh value and node names that collide with nothing in the model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.used: set[str] = set()
        for graph in iter_graphs(model.graph):
            self.used.update(i.name for i in graph.input)
            self.used.update(o.name for o in graph.output)
            self.used.update(t.name for t in graph.initializer)
            for node in graph.node:
                self.used.update(node.output)
                self.used.add(node.name)

    def new(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name


def _rename_inputs(nodes: Iterable[onnx.NodeProto], old: str, new: str, *, outputs: bool) -> None:
    """Readers of `old` read `new` (nested subgraphs and their outputs too)."""
    for node in nodes:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        if outputs:
            for i, name in enumerate(node.output):
                if name == old:
                    node.output[i] = new
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                _rename_inputs(sub.node, old, new, outputs=False)
                for out in sub.output:
                    if out.name == old:
                        out.name = new


@dataclass
class Conversion:
    """A converted model and the counts the report shows."""

    model: onnx.ModelProto
    casts: int = 0
    io_casts: int = 0
    constants_converted: int = 0
    constants_duplicated: int = 0


def apply_plan(
    facts: GraphFacts,
    slots: dict[int, Slots],
    low_nodes: set[int],
    fmt: LowFormat,
    *,
    keep_inputs: set[str],
    keep_outputs: set[str],
    emulate: bool = False,
) -> Conversion:
    """Rewrite a copy of the model: `low_nodes` compute in `fmt`, every other node in float32.

    `keep_inputs` / `keep_outputs`: float graph inputs and outputs that stay float32
    (Casts at the boundary). `emulate`: float32 everywhere, with every value that would
    be stored in `fmt` rounded to it, so ONNX Runtime on CPU can run the plan.
    """
    model = copy_model(facts.model)
    graph = model.graph
    nodes = list(graph.node)
    names = _Names(model)
    low, short = fmt.onnx_type, fmt.short
    result = Conversion(model)

    home: dict[str, int] = {}
    for name in facts.runtime_inputs:
        if facts.is_float(name):
            home[name] = FLOAT if name in keep_inputs else low
    for idx, node in enumerate(nodes):
        if node.output and node.output[0] in facts.constants:
            continue
        fixed = slots[idx].fixed_out if idx in slots else set()
        for j, out in enumerate(node.output):
            if facts.is_float(out):
                home[out] = low if idx in low_nodes and j not in fixed else FLOAT

    def wanted(idx: int, i: int) -> int | None:
        s = slots.get(idx)
        if s is not None and i in s.free:
            return None
        if s is not None and i in s.fixed_in:
            return FLOAT
        return low if idx in low_nodes else FLOAT

    # Constants: each reader gets the precision it computes in, converted offline.
    need: dict[str, set[int]] = defaultdict(set)
    for idx, node in enumerate(nodes):
        for i, name in enumerate(node.input):
            if name in facts.constants:
                need[name].add(wanted(idx, i) or FLOAT)
        for ref in facts.sub_refs.get(idx, ()):
            if ref in facts.constants:
                need[ref].add(FLOAT)
    for name in facts.outputs:
        if name in facts.constants:
            need[name].add(FLOAT)
    low_name: dict[str, str] = {}
    in_place = {c for c, kinds in need.items() if kinds == {low}}
    both = {c for c, kinds in need.items() if low in kinds and c not in in_place}

    def low_tensor(array: np.ndarray, name: str) -> onnx.TensorProto:
        if emulate:
            return numpy_helper.from_array(fmt.round(array), name)
        return fmt.tensor(array, name)

    extra_inits = []
    for tensor in graph.initializer:
        if tensor.name in in_place:
            tensor.CopyFrom(low_tensor(facts.constants[tensor.name], tensor.name))
            result.constants_converted += 1
        elif tensor.name in both:
            low_name[tensor.name] = names.new(f"{tensor.name}_{short}")
            extra_inits.append(low_tensor(facts.constants[tensor.name], low_name[tensor.name]))
            result.constants_duplicated += 1
    graph.initializer.extend(extra_inits)

    cache: dict[tuple[str, int], str] = {}

    def round_pair(src: str, dst: str) -> list[onnx.NodeProto]:
        mid = names.new(f"{dst}_{short}")
        return [
            helper.make_node("Cast", [src], [mid], to=low, name=names.new(f"{mid}_round")),
            helper.make_node("Cast", [mid], [dst], to=FLOAT, name=names.new(f"{dst}_round")),
        ]

    def provide(value: str, target: int | None, pending: list[onnx.NodeProto]) -> str:
        """The name under which `value` is available in `target` precision."""
        if value in facts.constants:
            return low_name.get(value, value) if target == low else value
        h = home.get(value)
        if emulate and value in facts.runtime_inputs and h == low:
            target = low  # a low graph input arrives rounded; reads see it rounded
            if (value, low) not in cache:
                cache[(value, low)] = names.new(f"{value}_{short}")
                pending.extend(round_pair(value, cache[(value, low)]))
            return cache[(value, low)]
        if target is None or h is None or h == target:
            return value
        if emulate and target == FLOAT:
            return value
        key = (value, target)
        if key not in cache:
            tag = "fp32" if target == FLOAT else short
            cache[key] = names.new(f"{value}_to_{tag}")
            if emulate:
                pending.extend(round_pair(value, cache[key]))
            else:
                pending.append(
                    helper.make_node(
                        "Cast", [value], [cache[key]], to=target, name=names.new(f"{value}_cast")
                    )
                )
                result.casts += 1
        return cache[key]

    new_nodes: list[onnx.NodeProto] = []
    for idx, node in enumerate(nodes):
        pending: list[onnx.NodeProto] = []
        after: list[onnx.NodeProto] = []
        out0 = node.output[0] if node.output else ""
        if out0 in facts.constant_nodes and facts.constant_nodes[out0] == idx:
            if out0 in in_place:
                del node.attribute[:]
                node.attribute.append(
                    helper.make_attribute("value", low_tensor(facts.constants[out0], ""))
                )
                result.constants_converted += 1
            new_nodes.append(node)
            if out0 in both:
                value = low_tensor(facts.constants[out0], "")
                new_nodes.append(
                    helper.make_node(
                        "Constant",
                        [],
                        [low_name[out0]],
                        value=value,
                        name=names.new(low_name[out0]),
                    )
                )
            continue
        for i, name in enumerate(node.input):
            if facts.is_float(name):
                node.input[i] = provide(name, wanted(idx, i), pending)
        for ref in sorted(facts.sub_refs.get(idx, ())):
            if facts.is_float(ref) and ref not in facts.constants:
                new = provide(ref, FLOAT, pending)
                if new != ref:
                    _rename_inputs([node], ref, new, outputs=False)
        if idx in low_nodes:
            _patch_typed_attributes(node, fmt, emulate)
            if emulate:
                fixed = slots[idx].fixed_out
                for j, out in enumerate(node.output):
                    if facts.is_float(out) and j not in fixed:
                        raw = names.new(f"{out}_f32")
                        node.output[j] = raw
                        after.extend(round_pair(raw, out))
        new_nodes.extend(pending)
        new_nodes.append(node)
        new_nodes.extend(after)

    tail: list[onnx.NodeProto] = []
    inputs = set(facts.runtime_inputs)
    renamed: dict[str, int] = {}
    for out in graph.output:
        name = out.name
        if not facts.is_float(name) or name in facts.constants or name in inputs:
            continue
        want = FLOAT if name in keep_outputs else low
        have = home.get(name, FLOAT)
        if have != want:
            internal = names.new(f"{name}_{'fp32' if have == FLOAT else short}")
            _rename_inputs(new_nodes, name, internal, outputs=True)
            if emulate:
                tail.extend(
                    round_pair(internal, name)
                    if want == low
                    else [helper.make_node("Identity", [internal], [name])]
                )
            else:
                tail.append(
                    helper.make_node("Cast", [internal], [name], to=want, name=names.new(name))
                )
                result.io_casts += 1
            renamed[name] = want
        if not emulate:
            out.type.tensor_type.elem_type = want
    if not emulate:
        for value in graph.input:
            if home.get(value.name) == low:
                value.type.tensor_type.elem_type = low
        for info in graph.value_info:
            if info.name in renamed:
                info.type.tensor_type.elem_type = renamed[info.name]
            elif info.name in home and info.type.HasField("tensor_type"):
                info.type.tensor_type.elem_type = home[info.name]
            elif info.name in in_place:
                info.type.tensor_type.elem_type = low
    del graph.node[:]
    graph.node.extend(new_nodes + tail)
    return result


def _patch_typed_attributes(node: onnx.NodeProto, fmt: LowFormat, emulate: bool) -> None:
    """Cast's `to` and ConstantOfShape's `value` carry the output type: move them to fmt."""
    if node.op_type == "Cast" and not emulate:
        for attr in node.attribute:
            if attr.name == "to" and attr.i == FLOAT:
                attr.i = fmt.onnx_type
    elif node.op_type == "ConstantOfShape":
        values = [a for a in node.attribute if a.name == "value"]
        array = tensor_array(values[0].t) if values else np.zeros(1, np.float32)
        if array.dtype != np.float32:
            return
        tensor = numpy_helper.from_array(fmt.round(array), "") if emulate else fmt.tensor(array, "")
        kept = [a for a in node.attribute if a.name != "value"]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute("value", tensor)])

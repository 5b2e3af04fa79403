"""Static int8 (Q/DQ) written compactly: the same model, the same numbers, fewer bytes.

Int8 weights are a quarter of their float size; what keeps a quantized file above that is
what ONNX Runtime's quantizer writes around them. Measured on PP-OCRv4 det (4.75 MB float):
the int8 weights are 0.247x of the float file, the whole quantized file 0.300x. The rest,
and what is done about it here, none of which changes a value the model computes:

- All-zero zero points of stored weights and int32 biases (4 bytes per channel for a
  bias): a DequantizeLinear without one means the same, a zero of the data's own type.
  Not for a Gemm's weights: ONNX Runtime then no longer fuses it into QGemm.
- A bias scale that is exactly `input scale * weight scale` (what ONNX Runtime's
  quantizer writes, bit for bit, unless it had to widen it) is computed by a Mul of the
  two stored scales instead of stored per channel; ONNX Runtime folds the Mul when the
  session loads, before it fuses the Q/DQ group into QLinearConv. CPU target only.
- The quantizer's generated names (`conv2d_0.w_0_fused_DequantizeLinear_Output`, ...)
  become short ones; the model's own tensor and node names, inputs and outputs stay.
- Value-info entries nothing needs: for values no node reads, values read only by a
  QuantizeLinear, and values whose type ONNX shape inference gives back exactly; then
  (CPU) all the rest when ONNX Runtime builds the same optimized graph without them.

PP-OCRv4 det goes from 0.300x to 0.269x of the float file, rec from 0.281x to 0.266x,
with identical outputs and the same kernels after ONNX Runtime's optimizations.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from optimodel.graphs import consumers, drop_unread_initializers, subgraph_references
from optimodel.modelio import iter_graphs, tensor_array

Q, DQ = "QuantizeLinear", "DequantizeLinear"
# Layers whose int8 weights ONNX Runtime fuses without a stored zero point (measured).
ZERO_POINT_OPTIONAL = {"Conv", "ConvTranspose", "MatMul"}
BIASED = {"Conv": 2, "Gemm": 2, "ConvTranspose": 2}  # op -> bias input index


def _stored(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    inputs = {i.name for i in graph.input}
    return {t.name: t for t in graph.initializer if t.name not in inputs}


def drop_zero_points(model: onnx.ModelProto) -> int:
    """Remove all-zero zero points from DequantizeLinear nodes over stored int32 biases, and
    over stored weights read only by layers whose Q/DQ fusion takes a missing zero point
    (ONNX Runtime's QGemm fusion does not: a Gemm's weights keep theirs)."""
    dropped = 0
    for graph in iter_graphs(model.graph):
        stored = _stored(graph)
        readers = consumers(graph)
        for node in graph.node:
            if node.op_type != DQ or len(node.input) < 3 or node.input[0] not in stored:
                continue
            zero = stored.get(node.input[2])
            if zero is None or zero.data_type != stored[node.input[0]].data_type:
                continue
            users = {u.op_type for u in readers.get(node.output[0], [])}
            if zero.data_type != onnx.TensorProto.INT32 and not users <= ZERO_POINT_OPTIONAL:
                continue
            if not np.any(tensor_array(zero)):
                del node.input[2]
                dropped += 1
        drop_unread_initializers(graph)
    return dropped


def _scale_of(name: str, producers: dict[str, onnx.NodeProto], stored: dict) -> str | None:
    node = producers.get(name)
    if node is None or node.op_type != DQ or node.input[1] not in stored:
        return None
    return node.input[1]


def derive_bias_scales(model: onnx.ModelProto) -> int:
    """Replace stored bias scales equal to `input scale * weight scale` by that product."""
    graph = model.graph
    stored = _stored(graph)
    producers = {o: n for n in graph.node for o in n.output}
    reads = Counter(i for n in graph.node for i in n.input) + Counter(subgraph_references(graph))
    muls: dict[int, onnx.NodeProto] = {}
    for node in graph.node:
        index = BIASED.get(node.op_type)
        if index is None or len(node.input) <= index:
            continue
        bias = producers.get(node.input[index])
        x_scale = _scale_of(node.input[0], producers, stored)
        w_scale = _scale_of(node.input[1], producers, stored)
        if bias is None or bias.op_type != DQ or x_scale is None or w_scale is None:
            continue
        b_scale = stored.get(bias.input[1])
        if b_scale is None or reads[b_scale.name] != 1:
            continue
        xs, ws = tensor_array(stored[x_scale]), tensor_array(stored[w_scale])
        if xs.dtype != np.float32 or ws.dtype != np.float32 or xs.size != 1:
            continue
        product, have = (xs * ws).astype(np.float32), tensor_array(b_scale)
        if product.shape != have.shape or not np.array_equal(
            product.view(np.uint32), have.view(np.uint32)
        ):
            continue  # widened by the quantizer (a bias too large for int32 at that scale)
        muls[id(bias)] = onnx.helper.make_node(
            "Mul", [x_scale, w_scale], [b_scale.name], name=b_scale.name
        )
    if not muls:
        return 0
    order: list[onnx.NodeProto] = []
    for node in graph.node:
        if id(node) in muls:
            order.append(muls[id(node)])
        order.append(node)
    derived = {m.output[0] for m in muls.values()}
    kept = [t for t in graph.initializer if t.name not in derived]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(order)
    return len(muls)


def _names(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """Every value name and every node name in the model, subgraphs included."""
    values: set[str] = set()
    nodes: set[str] = set()
    for inner in iter_graphs(model.graph):
        values.update(t.name for t in inner.initializer)
        values.update(v.name for v in [*inner.input, *inner.output, *inner.value_info])
        for node in inner.node:
            values.update(node.input)
            values.update(node.output)
            nodes.add(node.name)
    return values, nodes


def shorten_generated_names(model: onnx.ModelProto, reference: onnx.ModelProto) -> int:
    """Give the value names the quantizer made up (absent from `reference`, the model it
    was given; main graph only) short ones: `q0`, `q1`, ... The model's own names stay, so
    `compare --layers` and exclusions by name still find them."""
    graph = model.graph
    own, own_nodes = _names(reference)
    fixed = own | {v.name for v in [*graph.input, *graph.output]} | subgraph_references(graph)
    taken = _names(model)[0] | own
    renames: dict[str, str] = {}
    counter = 0

    def short(name: str) -> str:
        nonlocal counter
        if name not in renames:
            while f"q{counter}" in taken:
                counter += 1
            renames[name] = f"q{counter}"
            counter += 1
        return renames[name]

    def generated(name: str) -> bool:
        return bool(name) and name not in fixed

    for node in graph.node:
        for i, name in enumerate(node.input):
            if generated(name):
                node.input[i] = short(name)
        for i, name in enumerate(node.output):
            if generated(name):
                node.output[i] = short(name)
    for node in graph.node:  # the quantizer's own nodes are named after what they write
        if node.name not in own_nodes and node.output and node.output[0]:
            node.name = node.output[0]
    for tensor in graph.initializer:
        if generated(tensor.name):
            tensor.name = short(tensor.name)
    for value in graph.value_info:
        if value.name in renames:
            value.name = renames[value.name]
    return len(renames)


def prune_value_info(model: onnx.ModelProto, infer: bool = True) -> int:
    """Drop the main graph's value-info entries that carry nothing ONNX Runtime uses."""
    graph = model.graph
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    outer = subgraph_references(graph)
    kept = [v for v in graph.value_info if v.name in outer or readers.get(v.name, {Q}) != {Q}]
    if infer and kept:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.value_info[:]
        try:
            inferred = onnx.shape_inference.infer_shapes(probe).graph.value_info
        except Exception:  # inference refuses the model: keep every entry it would judge
            inferred = []
        again = {v.name: v.type for v in inferred}
        kept = [v for v in kept if again.get(v.name) != v.type]
    dropped = len(graph.value_info) - len(kept)
    if dropped:
        del graph.value_info[:]
        graph.value_info.extend(kept)
    return dropped


def drop_value_info_ort_ignores(model: onnx.ModelProto) -> int:
    """Drop the main graph's remaining value-info when ONNX Runtime's CPU provider builds
    the same optimized graph (the same ops) without it. Shapes that decide a fusion stay:
    on PP-OCRv4 rec, one SkipLayerNormalization needs them."""
    from optimodel.quant.outputs import cpu_optimized

    graph = model.graph
    if not graph.value_info:
        return 0
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    try:
        same = _op_counts(cpu_optimized(model)) == _op_counts(cpu_optimized(bare))
    except Exception:  # ONNX Runtime's own error: no evidence, so nothing dropped
        return 0
    if not same:
        return 0
    dropped = len(graph.value_info)
    del graph.value_info[:]
    return dropped


def _op_counts(model: onnx.ModelProto) -> Counter[tuple[str, str]]:
    return Counter((n.domain, n.op_type) for g in iter_graphs(model.graph) for n in g.node)


def compact_qdq(
    model: onnx.ModelProto, reference: onnx.ModelProto, target: str, big: bool = False
) -> dict[str, int]:
    """Apply every compaction above to a Q/DQ model of `reference` in place; counts of what
    changed."""
    counts = {
        "zero_points_dropped": drop_zero_points(model),
        "bias_scales_derived": derive_bias_scales(model) if target == "cpu" else 0,
    }
    counts["names_shortened"] = shorten_generated_names(model, reference)
    counts["value_info_dropped"] = prune_value_info(model, infer=not big)
    if target == "cpu" and not big:
        counts["value_info_dropped"] += drop_value_info_ort_ignores(model)
    return counts

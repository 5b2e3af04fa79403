"""Float outputs after static int8: the Q/DQ pairs between a model's last weighted layers
and its graph outputs are taken out.

Static calibration fixes each activation's range from the calibration samples. Where the
range is too short for real inputs, an int8 tensor clips; inside the network the next layer
absorbs some of that, but at the outputs the clipped values are the answer. Measured on
magika (static int8, 8 calibration files): on one calibration set the logits reached 10.2
while real files reached 21.8, the int8 logits clipped and 6 of 64 confident predictions
flipped; the same logits quantized alone in the float model reproduce exactly those 6.

Only Q/DQ pairs on the way from a graph output back to the first weighted layer are
removed, so that layer's input and weights stay int8 (the size is unchanged) and only its
output is float. It runs in float only when that layer is cheap: the rewrite is made when
the weighted layers reached do at most `MAX_OUTPUT_SHARE` of the MACs together (a
classifier's head, a detector's last convolution), never for a heavy last layer.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import onnx

from optimodel.modelio import iter_graphs
from optimodel.quant.presets import DATA_FIRST, SHAPE_ONLY, WEIGHTED, mac_shares

MAX_OUTPUT_SHARE = 0.01  # of all MACs: the layers writing the outputs, together


def _pairs_before_outputs(
    graph: onnx.GraphProto,
) -> tuple[list[tuple[onnx.NodeProto, onnx.NodeProto]], list[onnx.NodeProto]]:
    """(QuantizeLinear, DequantizeLinear) pairs met walking back from the graph outputs
    through unweighted nodes, and the weighted nodes where the walk stopped."""
    producers = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    pairs: dict[int, tuple[onnx.NodeProto, onnx.NodeProto]] = {}
    heads: dict[int, onnx.NodeProto] = {}
    seen: set[str] = set()
    queue = deque(o.name for o in graph.output)
    while queue:
        value = queue.popleft()
        if value in seen or value not in producers:
            continue
        seen.add(value)
        node = producers[value]
        if node.op_type in WEIGHTED:
            heads[id(node)] = node
            continue
        if node.op_type in SHAPE_ONLY:
            continue
        if node.op_type == "DequantizeLinear":
            quant = producers.get(node.input[0])
            if quant is not None and quant.op_type == "QuantizeLinear":
                if readers.get(quant.output[0], 0) == 1:
                    pairs[id(node)] = (quant, node)
                queue.append(quant.input[0])
            continue  # a DQ of a stored int8 weight: nothing upstream
        data = node.input[:1] if node.op_type in DATA_FIRST else node.input
        queue.extend(name for name in data if name)
    return list(pairs.values()), list(heads.values())


def float_outputs(
    model: onnx.ModelProto, feed: dict[str, np.ndarray] | None = None
) -> tuple[onnx.ModelProto, list[str]]:
    """Remove the Q/DQ pairs between the last cheap weighted layers and the outputs, in
    place; the names of the tensors left in float (empty: nothing changed)."""
    graph = model.graph
    pairs, heads = _pairs_before_outputs(graph)
    if not pairs:
        return model, []
    shares = mac_shares(model, feed)
    if sum(shares.get(h.name, 0.0) for h in heads) > MAX_OUTPUT_SHARE:
        return model, []
    outputs = {o.name for o in graph.output}
    written = {o for n in graph.node for o in n.output}
    nested = {i for g in list(iter_graphs(graph))[1:] for n in g.node for i in n.input}
    drop: set[int] = set()
    kept: list[str] = []
    for quant, dequant in pairs:
        source, target = quant.input[0], dequant.output[0]
        drop.add(id(quant))
        kept.append(target if target in outputs else source)
        if target in outputs and (source not in written or source in outputs or source in nested):
            # a graph input, another output or read by a body: copied under the output's name
            dequant.op_type, dequant.domain = "Identity", ""
            dequant.input[:] = [source]
            del dequant.attribute[:]
            continue
        drop.add(id(dequant))
        if target in outputs:
            # the graph output keeps its name: whoever wrote `source` now writes `target`
            for node in graph.node:
                node.output[:] = [target if o == source else o for o in node.output]
                if id(node) not in drop:
                    node.input[:] = [target if i == source else i for i in node.input]
        else:
            for node in graph.node:
                node.input[:] = [source if i == target else i for i in node.input]
    nodes = [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for g in iter_graphs(graph) for n in g.node for i in n.input}  # bodies read too
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return model, kept

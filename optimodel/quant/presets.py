"""Layers kept in float by architecture, before any measurement (`--exclude-preset`).

Int8 error hurts most where a model meets the world: the first weighted layer reads raw
inputs (a one-hot byte histogram, pixels) whose range calibration squeezes, and the last
one writes the logits, boxes or masks that are compared. Both are usually a small share
of the compute. Measured with static int8 (min/max calibration) on this CPU: keeping
magika's first layer in float took top-1 agreement from 95% to 100% at 0.46x latency
instead of 0.43x; with percentile calibration, `heads` took it from 96.9% to 98.4%.

- `stem`: the first weighted layer on each path from a graph input;
- `heads`: the last weighted layer on each path to a graph output;
- `ends`: both; `none`: nothing.

A layer is left out of a preset when it does more than `MAX_SHARE` of the model's
multiply-accumulates (estimated from its weights where shapes do not resolve): keeping
it in float would give away most of the gain. `--accuracy-budget` starts its search from the preset.
Paths follow data, not shapes: a Shape node, and the shape / index arguments of Reshape,
Expand, Slice and the like, are not paths.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import onnx

WEIGHTED = {"Conv", "ConvTranspose", "MatMul", "Gemm"}
PRESETS = ("none", "stem", "heads", "ends")
MAX_SHARE = 0.25  # of all MACs: a bigger layer is never kept in float by a preset
# Ops whose later inputs are shapes, indices or sizes, not data flowing through.
DATA_FIRST = {
    "Reshape", "Expand", "Tile", "Slice", "Resize", "Pad", "Squeeze", "Unsqueeze", "Gather",
    "GatherElements", "TopK", "Upsample", "ReduceSum", "ReduceMean", "ReduceMax", "Split",
}  # fmt: skip
SHAPE_ONLY = {"Shape", "Size", "ConstantOfShape", "Range", "NonZero"}


def _weight_size(node: onnx.NodeProto, sizes: dict[str, int]) -> int:
    return sum(sizes.get(name, 0) for name in node.input[1:2])


def _frontier(graph: onnx.GraphProto, starts: set[str], forward: bool) -> list[onnx.NodeProto]:
    """Weighted nodes reached from `starts` along data edges through unweighted nodes."""
    producers = {out: n for n in graph.node for out in n.output}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, index))
    found: dict[int, onnx.NodeProto] = {}
    seen_values: set[str] = set()
    queue = deque(starts)
    while queue:
        value = queue.popleft()
        if value in seen_values:
            continue
        seen_values.add(value)
        if forward:
            steps = [n for n, i in readers.get(value, []) if i == 0 or n.op_type not in DATA_FIRST]
        else:
            steps = [producers[value]] if value in producers else []
        for node in steps:
            if node.op_type in SHAPE_ONLY:
                continue
            if node.op_type in WEIGHTED:
                found[id(node)] = node
                continue
            if forward:
                queue.extend(node.output)
            else:
                data = node.input[:1] if node.op_type in DATA_FIRST else node.input
                queue.extend(name for name in data if name)
    return list(found.values())


def _measured_macs(
    model: onnx.ModelProto, nodes: list[onnx.NodeProto], feed: dict[str, np.ndarray]
) -> dict[str, int]:
    """MACs of `nodes` from the shapes one ONNX Runtime run on `feed` really produces."""
    import onnxruntime as ort

    from optimodel.inspection import MAC_OPS, node_macs

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    wanted = {name for n in nodes for name in (n.input[0], n.output[0]) if name not in known}
    for name in sorted(wanted):
        probe.graph.output.append(onnx.ValueInfoProto(name=name))
    try:
        session = ort.InferenceSession(
            probe.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        names = [o.name for o in session.get_outputs()]
        values = dict(zip(names, session.run(names, feed), strict=True))
    except Exception:  # an estimate only: the weights-based one stands
        return {}
    sizes = {t.name: list(t.dims) for t in model.graph.initializer}
    shapes = {name: list(np.shape(v)) for name, v in values.items()} | sizes
    found = {}
    for node in nodes:
        if node.op_type in MAC_OPS:
            macs = node_macs(node, shapes)
            if macs is not None:
                found[node.name] = macs
    return found


def preset_nodes(
    model: onnx.ModelProto, preset: str, feed: dict[str, np.ndarray] | None = None
) -> list[str]:
    """Names of the nodes `preset` keeps in float (main graph; named nodes only).

    `feed`: a real sample, for the MAC shares: its input shapes resolve most layers, and
    one run measures the rest (dynamic dims count as 1 otherwise, which undersizes every
    convolution of an image model).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if preset == "none":
        return []
    graph = model.graph
    shares = mac_shares(model, feed)
    initializers = {t.name for t in graph.initializer}
    picked: list[onnx.NodeProto] = []
    if preset in ("stem", "ends"):
        inputs = {i.name for i in graph.input if i.name not in initializers}
        picked += _frontier(graph, inputs, forward=True)
    if preset in ("heads", "ends"):
        picked += _frontier(graph, {o.name for o in graph.output}, forward=False)
    names: list[str] = []
    for node in picked:
        if node.name and node.name not in names and shares.get(node.name, 0.0) <= MAX_SHARE:
            names.append(node.name)
    return names


def mac_shares(
    model: onnx.ModelProto, feed: dict[str, np.ndarray] | None = None
) -> dict[str, float]:
    """Each named weighted node's share of the model's multiply-accumulates (main graph).

    `feed`: a real sample: its input shapes resolve most layers, and one run measures the
    rest (dynamic dims count as 1 otherwise, which undersizes every convolution of an
    image model); a layer still unresolved is sized by its weights.
    """
    from optimodel.inspection import macs_by_node

    graph = model.graph
    sizes = {t.name: int(np.prod(t.dims)) for t in graph.initializer}
    weighted = [n for n in graph.node if n.op_type in WEIGHTED]
    shapes = {k: tuple(np.shape(v)) for k, v in feed.items()} if feed else None
    macs = macs_by_node(model, shapes)
    unresolved = [n for n in weighted if n.name not in macs]
    if unresolved and feed:
        macs.update(_measured_macs(model, unresolved, feed))
    resolved = [n for n in weighted if n.name in macs]
    per_weight = sum(macs[n.name] for n in resolved) / max(
        1, sum(_weight_size(n, sizes) for n in resolved)
    )
    for node in weighted:
        macs.setdefault(node.name, int(_weight_size(node, sizes) * (per_weight or 1)))
    total = sum(max(0, macs.get(n.name, 0)) for n in weighted) or 1
    return {n.name: max(0, macs.get(n.name, 0)) / total for n in weighted if n.name}


# A lookup table below this many elements stays float in static int8 (1 MiB as float32).
SMALL_TABLE_ELEMENTS = 1 << 18


def small_lookup_tables(model: onnx.ModelProto) -> list[str]:
    """Gather nodes (main graph) reading a stored table too small to gain from int8.

    A position or token-type embedding is added to every token, so its int8 rounding is the
    same error everywhere; int8 saves little on a small table. Measured on MiniLM, static
    int8: all three tables in int8, embedding cosine 0.9894 at 0.253x the float size; the
    word table alone, 0.9901 at 0.259x.
    """
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "Gather"
        and n.name
        and n.input[0] in dims
        and int(np.prod(dims[n.input[0]])) < SMALL_TABLE_ELEMENTS
    ]

"""Small graph helpers on ONNX protos shared by the passes: uses, renames, types.

Kept here so each pass file holds only its own rewrite.
"""

from __future__ import annotations

from collections import defaultdict

import onnx

from optimodel.modelio import iter_graphs

STANDARD_DOMAINS = ("", "ai.onnx")
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def has_subgraph(node: onnx.NodeProto) -> bool:
    return any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
    )


def node_subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies a node holds directly (If branches, Loop / Scan body), not nested ones."""
    subs: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            subs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            subs.extend(attr.graphs)
    return subs


def subgraph_references(graph: onnx.GraphProto) -> set[str]:
    """Names that nodes inside this graph's subgraphs read from outer scopes."""
    names: set[str] = set()
    for node in graph.node:
        for sub in node_subgraphs(node):
            for inner in iter_graphs(sub):
                for n in inner.node:
                    names.update(i for i in n.input if i)
                names.update(o.name for o in inner.output)
    return names


def drop_unread_initializers(graph: onnx.GraphProto) -> None:
    """Remove the initializers nothing reads: no node, no subgraph, no graph input or
    output (onnx-ir drops them for the main graph only; a rewrite leaves them behind)."""
    read = {i for n in graph.node for i in n.input} | subgraph_references(graph)
    read |= {v.name for v in [*graph.input, *graph.output]}
    kept = [t for t in graph.initializer if t.name in read]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Value name -> nodes of this graph that read it (not counting subgraphs)."""
    uses: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                uses[name].append(node)
    return uses


def rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Make every reader of `old` read `new`, inside subgraphs too (SSA: no shadowing)."""
    for inner in iter_graphs(graph):
        for node in inner.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
        if inner is not graph:
            for out in inner.output:
                if out.name == old:
                    out.name = new


def rename_all_uses(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """`rename_uses` for many names in one sweep; chains (a->b, b->c) resolve to the end."""

    def final(name: str) -> str:
        seen = set()
        while name in renames and name not in seen:
            seen.add(name)
            name = renames[name]
        return name

    for inner in iter_graphs(graph):
        for node in inner.node:
            for i, name in enumerate(node.input):
                if name in renames:
                    node.input[i] = final(name)
        if inner is not graph:
            for out in inner.output:
                if out.name in renames:
                    out.name = final(out.name)


def fresh_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first not in `taken`, which it joins."""
    name, n = base, 1
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Name -> type for every value that shape inference (or the model) knows."""
    types: dict[str, onnx.TypeProto] = {}
    for graph in iter_graphs(model.graph):
        for value in [*graph.input, *graph.output, *graph.value_info]:
            if value.type.HasField("tensor_type"):
                types[value.name] = value.type
        for init in graph.initializer:
            types[init.name] = onnx.helper.make_tensor_type_proto(init.data_type, list(init.dims))
    return types


def static_shape(tp: onnx.TypeProto | None) -> list[int | None] | None:
    """Dims of a tensor type (None for unknown dims), or None when the rank is unknown."""
    if tp is None or not tp.tensor_type.HasField("shape"):
        return None
    return [int(d.dim_value) if d.HasField("dim_value") else None for d in tp.tensor_type.shape.dim]


def elem_type(tp: onnx.TypeProto | None) -> int:
    return tp.tensor_type.elem_type if tp is not None else 0

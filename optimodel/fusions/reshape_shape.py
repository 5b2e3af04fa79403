"""reshape-shape: a Reshape whose target is built from its input's own Shape gets a constant.

Exporters spell "keep the batch and sequence dims" as Shape -> Gather/Slice -> Unsqueeze
-> Concat (with Casts on the way) feeding a Reshape. An entry that is the input's own
dimension at the same position is exactly what 0 means to Reshape (allowzero=0), so the
whole chain becomes one constant such as [0, 0, 4, 16]; a dimension that shape
inference knows statically is written as its number. The chain then has no readers
left and goes with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from optimodel.fusions import GraphView, Pattern, Rewrite, register
from optimodel.graphs import attr

INT_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
MAX_DEPTH = 12


@dataclass(frozen=True)
class Dim:
    """Dimension `index` of value `source`, read at run time by a Shape node."""

    source: str
    index: int


Entry = int | Dim


def _ints(view: GraphView, name: str) -> list[int] | None:
    value = view.const(name) if name else None
    if value is None or value.dtype.kind not in "iu":
        return None
    return [int(v) for v in value.reshape(-1)]


def shape_entries(view: GraphView, name: str, depth: int = 0) -> tuple[list[Entry], bool] | None:
    """The entries of a small int tensor built from Shape nodes and constants.

    Returns (entries, is_scalar), or None when some step is not understood.
    """
    if depth > MAX_DEPTH:
        return None
    value = view.const(name)
    if value is not None:
        if value.dtype.kind not in "iu" or value.ndim > 1:
            return None
        return [int(v) for v in value.reshape(-1)], value.ndim == 0
    node = view.producer(name)
    if node is None:
        return None
    op = node.op_type
    if op == "Shape":
        rank = view.rank(node.input[0])
        if rank is None:
            return None
        start, end = int(attr(node, "start", 0)), attr(node, "end", None)  # type: ignore[arg-type]
        picked = range(rank)[start : None if end is None else int(end)]  # type: ignore[arg-type]
        return [Dim(node.input[0], i) for i in picked], False
    if op == "Cast":
        if attr(node, "to") not in INT_TYPES:
            return None
        return shape_entries(view, node.input[0], depth + 1)
    if op in ("Gather", "Slice", "Unsqueeze", "Squeeze", "Concat"):
        return _combine(view, node, depth)
    return None


def _combine(view: GraphView, node: onnx.NodeProto, depth: int) -> tuple[list[Entry], bool] | None:
    op = node.op_type
    if op == "Concat":
        if int(attr(node, "axis", 0)) not in (0, -1):  # type: ignore[arg-type]
            return None
        out: list[Entry] = []
        for part in node.input:
            got = shape_entries(view, part, depth + 1)
            if got is None or got[1]:
                return None
            out.extend(got[0])
        return out, False
    base = shape_entries(view, node.input[0], depth + 1)
    if base is None:
        return None
    entries, scalar = base
    if op == "Gather":
        index = view.const(node.input[1])
        if scalar or int(attr(node, "axis", 0)) != 0 or index is None or index.ndim > 1:  # type: ignore[arg-type]
            return None
        try:
            picked = [entries[int(i)] for i in index.reshape(-1)]
        except IndexError:
            return None
        return picked, index.ndim == 0
    if op == "Slice":
        return None if scalar else _slice(view, node, entries)
    axes = _axes(view, node)
    if op == "Unsqueeze":
        return (entries, False) if scalar and axes in ([0], [-1]) else None
    if not scalar and len(entries) == 1 and axes in (None, [0], [-1]):
        return entries, True  # Squeeze of a one-element vector
    return None


def _axes(view: GraphView, node: onnx.NodeProto) -> list[int] | None:
    """Axes of an Unsqueeze / Squeeze (attribute before opset 13, input since)."""
    if view.opset < 13:
        axes = attr(node, "axes")
        return None if axes is None else [int(a) for a in axes]  # type: ignore[union-attr]
    return _ints(view, node.input[1]) if len(node.input) > 1 else None


def _slice(
    view: GraphView, node: onnx.NodeProto, entries: list[Entry]
) -> tuple[list[Entry], bool] | None:
    """A constant one-axis Slice of a shape vector."""
    if view.opset < 10:
        starts, ends = attr(node, "starts"), attr(node, "ends")
        axes, steps = attr(node, "axes", [0]), [1]
    else:
        extra = list(node.input[3:5]) + ["", ""]
        starts, ends = _ints(view, node.input[1]), _ints(view, node.input[2])
        axes = _ints(view, extra[0]) if extra[0] else [0]
        steps = _ints(view, extra[1]) if extra[1] else [1]
    if starts is None or ends is None or axes is None or steps is None:
        return None
    starts, ends, axes, steps = (list(v) for v in (starts, ends, axes, steps))  # type: ignore[call-overload]
    if axes not in ([0], [-1]) or len(starts) != 1 or len(steps) != 1 or not steps[0]:
        return None
    return entries[slice(int(starts[0]), int(ends[0]), int(steps[0]))], False


def _same_dim(view: GraphView, dim: Dim, data: str, position: int) -> bool:
    """Whether `dim` is certainly dimension `position` of `data`."""
    if dim.source == data:
        return dim.index == position
    a, b = view.shape(dim.source), view.shape(data)
    if a is None or b is None or dim.index >= len(a) or position >= len(b):
        return False
    ta, tb = view.types.get(dim.source), view.types.get(data)
    if ta is None or tb is None:
        return False
    da = ta.tensor_type.shape.dim[dim.index]
    db = tb.tensor_type.shape.dim[position]
    return bool(da.dim_param) and da.dim_param == db.dim_param


def _static(view: GraphView, dim: Dim) -> int | None:
    dims = view.shape(dim.source)
    if dims is None or dim.index >= len(dims):
        return None
    return dims[dim.index]


@register
class ReshapeShape(Pattern):
    name = "reshape-shape"
    group = "common"
    anchors = ("Reshape",)
    order = 74
    summary = "Reshape target built from Shape/Gather/Concat chains -> a constant"
    refines_types = True

    def match(self, view: GraphView, reshape: onnx.NodeProto) -> Rewrite | str | None:
        if len(reshape.input) < 2 or view.const(reshape.input[1]) is not None:
            return None
        found = shape_entries(view, reshape.input[1])
        if found is None or found[1] or not any(isinstance(e, Dim) for e in found[0]):
            return None
        data, allowzero = reshape.input[0], bool(attr(reshape, "allowzero", 0))
        target: list[int] = []
        for position, entry in enumerate(found[0]):
            if isinstance(entry, int):
                target.append(entry)
            elif not allowzero and _same_dim(view, entry, data, position):
                target.append(0)
            elif (static := _static(view, entry)) is not None:
                target.append(static)
            else:
                return f"entry {position} is a run-time dimension other than the input's own"
        if target.count(-1) > 1:
            return None
        shape = view.tensor(np.array(target, dtype=np.int64), f"{reshape.input[1]}_const")
        node = view.node(
            "Reshape",
            [data, shape.name],
            list(reshape.output),
            name=reshape.name or "Reshape",
            like=reshape,
        )
        return Rewrite(remove=[reshape], add=[node], initializers=[shape])

"""reshape-infer-dim: a Reshape target with one run-time entry becomes a constant with -1.

jax2tf and similar exporters build targets such as [batch, 512, 256] from another
tensor's Shape, so reshape-shape cannot write the batch as 0 (it is not the input's own
dimension) nor as a number. When every other entry is a known positive number, the one
run-time entry is already decided by the element count: a Reshape that succeeds with it
gives the same result with -1 there (a run-time 0 copying the input's dimension or a
run-time -1 included). Targets with a 0 or -1 elsewhere are left alone: ONNX Runtime
refuses -1 beside a zero-sized dimension, so [0, -1, ...] would break empty batches the
original accepts. The Shape chain goes once nothing else reads it.
"""

from __future__ import annotations

import numpy as np
import onnx

from optimodel.fusions import GraphView, Pattern, Rewrite, register
from optimodel.fusions.reshape_shape import INT_TYPES, MAX_DEPTH, Dim, shape_entries
from optimodel.graphs import attr

Known = int | None  # None: decided only at run time


def _dim(view: GraphView, dim: Dim) -> Known:
    dims = view.shape(dim.source)
    if dims is None or dim.index >= len(dims):
        return None
    return dims[dim.index]


def target_entries(view: GraphView, name: str, depth: int = 0) -> list[Known] | None:
    """Each entry of a 1-D int target: its number when known before run time, else None.

    Shape chains reshape-shape reads give their numbers; a Concat part it cannot read
    still counts, as run-time entries, when its length is known.
    """
    if depth > MAX_DEPTH:
        return None
    found = shape_entries(view, name)
    if found is not None:
        entries, scalar = found
        return None if scalar else [_dim(view, e) if isinstance(e, Dim) else e for e in entries]
    node = view.producer(name)
    if node is not None and node.op_type == "Concat":
        if int(attr(node, "axis", 0)) not in (0, -1):  # type: ignore[arg-type]
            return None
        out: list[Known] = []
        for part in node.input:
            got = target_entries(view, part, depth + 1)
            if got is None:
                return None
            out.extend(got)
        return out
    if node is not None and node.op_type == "Cast" and view.dtype(node.input[0]) in INT_TYPES:
        got = target_entries(view, node.input[0], depth + 1)
        if got is None or attr(node, "to") not in INT_TYPES:
            return None
        if attr(node, "to") == onnx.TensorProto.INT32 and any(
            e is not None and not -(2**31) <= e < 2**31 for e in got
        ):
            return None  # the cast would wrap the number
        return got
    dims = view.shape(name)
    if dims is None or len(dims) != 1 or dims[0] is None:
        return None
    return [None] * dims[0]


@register
class ReshapeInferDim(Pattern):
    name = "reshape-infer-dim"
    group = "common"
    anchors = ("Reshape",)
    order = 76  # after reshape-shape, which keeps more entries as they are
    summary = "Reshape target with one run-time entry and known others -> a constant with -1"
    refines_types = True

    def match(self, view: GraphView, reshape: onnx.NodeProto) -> Rewrite | str | None:
        if len(reshape.input) < 2 or view.const(reshape.input[1]) is not None:
            return None
        entries = target_entries(view, reshape.input[1])
        if entries is None:
            return None
        unknown = [i for i, e in enumerate(entries) if e is None]
        if len(unknown) != 1:
            return None if not unknown else f"{len(unknown)} target entries are run-time values"
        if any(e is not None and e <= 0 for e in entries):
            return "target also holds 0 or -1; -1 beside it would break zero-sized inputs"
        target = np.array([-1 if e is None else e for e in entries], dtype=np.int64)
        shape = view.tensor(target, f"{reshape.input[1]}_const")
        node = view.node(
            "Reshape",
            [reshape.input[0], shape.name],
            list(reshape.output),
            name=reshape.name or "Reshape",
            like=reshape,
        )
        return Rewrite(remove=[reshape], add=[node], initializers=[shape])

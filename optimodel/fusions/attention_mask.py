"""Padding masks of torch.export (dynamo) graphs, rewritten into a form ONNX Runtime's
Attention fusion matches.

transformers >= 5 builds the additive attention mask by evaluating a mask function over
index grids. The TorchScript exporter writes the lookup `mask[batch, key]` as
Flatten/Gather/Reshape + Expand, which ORT's FusionAttention knows; the dynamo exporter
writes it as

    Where(And(<always true>, GatherND(mask2d, Concat(batch grid, key grid))), 0, min)

which it does not ("failed to match mask path"), so no layer fuses. Where the grids are
shown to enumerate the rows and columns of the 2-D mask (Range(0, n, 1) over the mask's
own dimensions) and the other And terms are shown to be true everywhere, the same mask
is written in the form of transformers 4's SDPA export, which ORT matches:

    Where(Cast(Sub(1, Cast(Expand(Unsqueeze(Unsqueeze(mask2d)), Shape(cond)))), bool), min, 0)

The condition is the old one negated, expanded to the old condition's shape, and the two
branch constants are the same ones swapped, so the graph computes the same numbers whether
or not ORT fuses afterwards; ORT then takes `mask2d` as the Attention key padding mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from optimodel.fusions import GraphView
from optimodel.fusions.reshape_shape import Dim, shape_entries
from optimodel.graphs import attr, copy_model

MAX_DEPTH = 8  # And terms and grid steps followed; exporters use three or four


@dataclass(frozen=True)
class Grid:
    """A tensor whose value at every position is that position's index along `axis`.

    `rank` is the tensor's rank; `source` is the Range(0, n, 1) it was made from, whose
    length is the extent along `axis` (or 1, stretched by an Expand: index 0 everywhere).
    """

    axis: int
    rank: int
    source: onnx.NodeProto


@dataclass
class MaskRewrite:
    """What the normalization did: the rewritten model (None: unchanged) and why not."""

    model: onnx.ModelProto | None
    rewritten: int
    declined: list[str]


def _unsqueeze_axes(view: GraphView, node: onnx.NodeProto) -> list[int] | None:
    if len(node.input) > 1:
        value = view.const(node.input[1])
        return None if value is None else [int(a) for a in value.reshape(-1)]
    axes = attr(node, "axes")
    return None if axes is None else [int(a) for a in axes]  # type: ignore[union-attr]


def index_grid(view: GraphView, name: str, depth: int = 0) -> Grid | None:
    """`name` as an index grid: Range(0, n, 1) through Unsqueeze and Expand, else None."""
    node = view.producer(name)
    if node is None or depth > MAX_DEPTH:
        return None
    if node.op_type == "Range":
        if view.scalar(node.input[0]) == 0 and view.scalar(node.input[2]) == 1:
            return Grid(0, 1, node)
        return None
    if node.op_type == "Unsqueeze":
        inner = index_grid(view, node.input[0], depth + 1)
        axes = _unsqueeze_axes(view, node)
        if inner is None or not axes:
            return None
        rank = inner.rank + len(axes)
        inserted = {a % rank for a in axes}
        kept = [i for i in range(rank) if i not in inserted]
        return Grid(kept[inner.axis], rank, inner.source)
    if node.op_type == "Expand":  # broadcasting copies values along the index's own axis
        inner = index_grid(view, node.input[0], depth + 1)
        target = view.shape(node.input[1])
        if inner is None or target is None or len(target) != 1 or target[0] is None:
            return None
        rank = max(inner.rank, int(target[0]))
        return Grid(inner.axis + rank - inner.rank, rank, inner.source)
    return None


def _always_true(view: GraphView, name: str, depth: int = 0) -> bool:
    """A bool tensor shown to be true everywhere: a constant, an index grid >= c <= 0, And."""
    value = view.const(name)
    if value is not None:
        return value.dtype == np.bool_ and bool(value.all())
    node = view.producer(name)
    if node is None or depth > MAX_DEPTH:
        return False
    if node.op_type == "And":
        return all(_always_true(view, i, depth + 1) for i in node.input)
    if node.op_type in ("GreaterOrEqual", "LessOrEqual"):
        index, bound = node.input if node.op_type == "GreaterOrEqual" else node.input[::-1]
        low = view.scalar(bound)
        return index_grid(view, index) is not None and low is not None and low <= 0
    return False


def _and_terms(view: GraphView, name: str, depth: int = 0) -> list[str]:
    node = view.producer(name, "And")
    if node is None or depth > MAX_DEPTH:
        return [name]
    return [t for i in node.input for t in _and_terms(view, i, depth + 1)]


def _dim_key(view: GraphView, name: str, index: int) -> int | str | None:
    """A dimension as shape inference knows it: its number or its symbol, else None."""
    tp = view.types.get(name)
    if tp is None or not tp.tensor_type.HasField("shape"):
        return None
    dims = tp.tensor_type.shape.dim
    if index >= len(dims):
        return None
    dim = dims[index]
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    return dim.dim_param or None


def _spans(view: GraphView, grid: Grid, data: str, index: int) -> bool:
    """Whether the grid's Range length is dimension `index` of `data`.

    Shown by its limit read from a Shape (of `data` itself, or of a value whose dimension
    has the same number or symbol), else by the Range output's inferred length.
    """
    want = _dim_key(view, data, index)
    found = shape_entries(view, grid.source.input[1])
    if found is not None and found[1] and len(found[0]) == 1:
        entry = found[0][0]
        if isinstance(entry, Dim):
            if (entry.source, entry.index) == (data, index):
                return True
            return want is not None and _dim_key(view, entry.source, entry.index) == want
        return want is not None and entry == want
    return want is not None and _dim_key(view, grid.source.output[0], 0) == want


def gathered_mask(view: GraphView, name: str) -> str:
    """The 2-D mask that GatherND `name` reads as mask[batch, key] laid out [B, 1, 1, S].

    Raises ValueError with the reason when the lookup is anything else.
    """
    node = view.producer(name, "GatherND")
    if node is None:
        raise ValueError("the mask is not read by a GatherND")
    data = node.input[0]
    if int(attr(node, "batch_dims", 0)) != 0:  # type: ignore[arg-type]
        raise ValueError("GatherND has batch_dims")
    if view.rank(data) != 2:
        raise ValueError("GatherND does not read a 2-D mask")
    concat = view.producer(node.input[1], "Concat")
    if concat is None or len(concat.input) != 2:
        raise ValueError("GatherND indices are not a Concat of two index grids")
    grids: list[Grid] = []
    for part in concat.input:
        unsqueeze = view.producer(part, "Unsqueeze")
        grid = index_grid(view, unsqueeze.input[0]) if unsqueeze is not None else None
        if unsqueeze is None or grid is None:
            raise ValueError("a GatherND index is not an index grid")
        if [a % (grid.rank + 1) for a in _unsqueeze_axes(view, unsqueeze) or []] != [grid.rank]:
            raise ValueError("a GatherND index grid is not stacked on the last axis")
        grids.append(grid)
    axis = int(attr(concat, "axis", 0))  # type: ignore[arg-type]
    if any(g.rank != 4 for g in grids) or axis % 5 != 4:
        raise ValueError("GatherND indices are not [B, 1, 1, S, 2]")
    if (grids[0].axis, grids[1].axis) != (0, 3):
        raise ValueError("GatherND does not read mask[batch, key] into [B, 1, 1, S]")
    if not (_spans(view, grids[0], data, 0) and _spans(view, grids[1], data, 1)):
        raise ValueError("the index ranges are not shown to span the mask's dimensions")
    return data


def _match(view: GraphView, where: onnx.NodeProto) -> str | None:
    """The 2-D mask behind a dynamo-style additive mask; None when `where` is not one.

    Raises ValueError with the reason for a near miss.
    """
    cond, keep, fill = where.input
    terms = _and_terms(view, cond)
    lookups = [t for t in terms if view.producer(t, "GatherND") is not None]
    if not lookups:
        return None
    if not any(
        r.op_type == "Add" and any(s.op_type == "Softmax" for s in view.readers(r.output[0]))
        for r in view.readers(where.output[0])
    ):
        return None
    keep_value, fill_value = view.const(keep), view.const(fill)
    if keep_value is None or keep_value.size != 1 or float(keep_value.reshape(-1)[0]) != 0.0:
        raise ValueError("the mask adds something other than 0 where attention is allowed")
    if fill_value is None or fill_value.size != 1 or not float(fill_value.reshape(-1)[0]) < 0:
        raise ValueError("the mask fill is not a negative constant")
    if len(lookups) != 1:
        raise ValueError("the mask condition reads the mask more than once")
    others = [t for t in terms if t != lookups[0]]
    if not all(_always_true(view, t) for t in others):
        raise ValueError("the mask condition has terms not shown to be always true")
    return gathered_mask(view, lookups[0])


def _rewrite(
    view: GraphView, where: onnx.NodeProto, mask: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and initializers of the SDPA-form mask, writing `where`'s output."""
    cond, keep, fill = where.input
    dtype = onnx.helper.tensor_dtype_to_np_dtype(view.dtype(fill))
    inits: list[onnx.TensorProto] = [view.tensor(np.array(1, dtype=dtype), "mask_one")]
    axes: list[list[str]] = []
    attrs: list[dict[str, list[int]]] = []
    for axis in (1, 2):
        if view.opset >= 13:
            inits.append(view.tensor(np.array([axis], dtype=np.int64), f"mask_axis_{axis}"))
            axes.append([inits[-1].name])
            attrs.append({})
        else:
            axes.append([])
            attrs.append({"axes": [axis]})
    v = {k: view.fresh(f"{where.output[0]}_{k}") for k in ("u1", "u2", "s", "e", "f", "i", "n")}
    base = where.name or where.output[0]
    nodes = [
        view.node("Unsqueeze", [mask, *axes[0]], [v["u1"]], name=f"{base}_u1", **attrs[0]),
        view.node("Unsqueeze", [v["u1"], *axes[1]], [v["u2"]], name=f"{base}_u2", **attrs[1]),
        view.node("Shape", [cond], [v["s"]], name=f"{base}_shape"),
        view.node("Expand", [v["u2"], v["s"]], [v["e"]], name=f"{base}_expand"),
        view.node("Cast", [v["e"]], [v["f"]], name=f"{base}_cast", to=view.dtype(fill)),
        view.node("Sub", [inits[0].name, v["f"]], [v["i"]], name=f"{base}_sub"),
        view.node("Cast", [v["i"]], [v["n"]], name=f"{base}_masked", to=onnx.TensorProto.BOOL),
        view.node("Where", [v["n"], fill, keep], [where.output[0]], name=f"{base}_where"),
    ]
    return nodes, inits


def normalize_attention_masks(
    model: onnx.ModelProto, types: dict[str, onnx.TypeProto]
) -> MaskRewrite:
    """Rewrite every dynamo-style additive attention mask; the input is left as it was."""
    view = GraphView(model, types, "ort")
    declined: list[str] = []
    found: dict[int, tuple[list[onnx.NodeProto], list[onnx.TensorProto]]] = {}
    for where in view.by_op.get("Where", []):
        if len(where.input) != 3:
            continue
        try:
            mask = _match(view, where)
        except ValueError as exc:
            declined.append(f"mask '{where.name or where.output[0]}': {exc}")
            continue
        if mask is not None:
            found[id(where)] = _rewrite(view, where, mask)
    if not found:
        return MaskRewrite(None, 0, declined)
    result = copy_model(model)
    nodes: list[onnx.NodeProto] = []
    for node, original in zip(result.graph.node, view.nodes, strict=True):
        if id(original) in found:
            added, inits = found[id(original)]
            nodes.extend(added)
            result.graph.initializer.extend(inits)
        else:
            nodes.append(node)
    del result.graph.node[:]
    result.graph.node.extend(nodes)
    return MaskRewrite(result, len(found), declined)

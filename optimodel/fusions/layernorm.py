"""layernorm: the decomposed LayerNorm exporters emit becomes LayerNormalization (opset 17).

Matched from its first ReduceMean: mean -> Sub -> Pow 2 (or Mul by itself) -> ReduceMean
-> Add eps -> Sqrt -> Div (or Reciprocal + Mul), then an optional Mul by a constant
gamma and Add of a constant beta. Every intermediate must stay inside the pattern. Below
opset 17 there is no standard op, so the decomposed form is kept and the reason said.
"""

from __future__ import annotations

import numpy as np
import onnx

from optimodel.fusions import FLOAT_TYPES, GraphView, Pattern, Rewrite, other_input, register
from optimodel.graphs import STANDARD_DOMAINS, attr

LAYERNORM_OPSET = 17


def reduce_axes(view: GraphView, node: onnx.NodeProto) -> list[int] | None:
    """Axes of a keepdims ReduceMean (attribute before opset 18, input since)."""
    if not attr(node, "keepdims", 1):
        return None
    if view.opset < 18:
        axes = attr(node, "axes")
    else:
        axes = view.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if axes is None:
        return None
    return [int(a) for a in np.asarray(axes).reshape(-1)]


def _trailing(axes: list[int], rank: int | None) -> int | None:
    """How many trailing axes `axes` covers, if it is exactly the last k axes."""
    k = len(axes)
    if rank is not None:
        norm = sorted(a % rank for a in axes)
        return k if norm == list(range(rank - k, rank)) else None
    return k if sorted(axes) == list(range(-k, 0)) else None


def _affine(
    view: GraphView, name: str, dims: list[int | None], rank: int | None
) -> np.ndarray | None:
    """A constant gamma/beta as an array of the normalized dims, or None if it does not fit."""
    value = view.const(name)
    if value is None or value.ndim > (rank if rank is not None else len(dims)):
        return None  # it would broadcast the result to a higher rank
    shape = list(value.shape)
    while len(shape) > len(dims) and shape[0] == 1:
        shape.pop(0)
    if len(shape) != len(dims):
        return None
    target = []
    for s, d in zip(shape, dims, strict=True):
        if d is None and s == 1:
            return None  # would broadcast to a size only known at run time
        if d is not None and s not in (1, d):
            return None
        target.append(s if d is None else d)
    return np.broadcast_to(value.reshape(shape), target)


def _squares(view: GraphView, node: onnx.NodeProto, name: str) -> bool:
    """Whether `node` computes name ** 2 (Pow by 2, or Mul by itself)."""
    if node.op_type == "Pow":
        return node.input[0] == name and view.scalar(node.input[1]) == 2
    return node.op_type == "Mul" and list(node.input) == [name, name]


def _next(view: GraphView, name: str, op_type: str) -> onnx.NodeProto | None:
    return view.sole_reader(name, op_type)


def match_layernorm(view: GraphView, mean: onnx.NodeProto) -> dict | str | None:
    """The parts of a decomposed LayerNorm starting at `mean`, a reason, or None."""
    x = mean.input[0]
    sub = _next(view, mean.output[0], "Sub")
    if sub is None or list(sub.input) != [x, mean.output[0]]:
        return None
    diff = sub.output[0]
    readers = view.readers(diff)
    if diff in view.outputs or len(readers) != 2:
        return None
    square = next((n for n in readers if _squares(view, n, diff)), None)
    divide = next((n for n in readers if n.op_type in ("Div", "Mul") and n is not square), None)
    if square is None or divide is None:
        return None
    var = _next(view, square.output[0], "ReduceMean")
    if var is None:
        return None
    add_eps = _next(view, var.output[0], "Add")
    eps_name = other_input(add_eps, var.output[0]) if add_eps is not None else None
    eps = view.scalar(eps_name) if eps_name else None
    if add_eps is None or eps is None:
        return None
    sqrt = _next(view, add_eps.output[0], "Sqrt")
    if sqrt is None:
        return None
    nodes = [mean, sub, square, var, add_eps, sqrt]
    if divide.op_type == "Div":
        if list(divide.input) != [diff, sqrt.output[0]] or not view.only_reader(
            sqrt.output[0], divide
        ):
            return None
    else:
        recip = _next(view, sqrt.output[0], "Reciprocal")
        if recip is None or other_input(divide, diff) != recip.output[0]:
            return None
        if not view.only_reader(recip.output[0], divide):
            return None
        nodes.append(recip)
    nodes.append(divide)
    axes, axes2 = reduce_axes(view, mean), reduce_axes(view, var)
    if axes is None or axes != axes2:
        return "ReduceMean axes differ, are not constant or keepdims=0"
    rank = view.rank(x)
    k = _trailing(axes, rank)
    if k is None:
        return "LayerNorm over axes that are not the trailing ones"
    shape = view.shape(x)
    dims: list[int | None] = list(shape[-k:]) if shape is not None else [None] * k
    out = divide.output[0]
    gamma = beta = None
    mul = _next(view, out, "Mul")
    if mul is not None and view.const(other_input(mul, out) or "") is not None:
        gamma = _affine(view, other_input(mul, out) or "", dims, rank)
        if gamma is not None:
            nodes.append(mul)
            out = mul.output[0]
            add = _next(view, out, "Add")
            if add is not None and view.const(other_input(add, out) or "") is not None:
                beta = _affine(view, other_input(add, out) or "", dims, rank)
                if beta is not None:
                    nodes.append(add)
                    out = add.output[0]
    for node in nodes[:-1]:
        for o in node.output:
            if o in view.outputs:
                return "an intermediate LayerNorm value is a graph output"
    return {
        "x": x,
        "nodes": nodes,
        "out": out,
        "axis": -k,
        "eps": eps,
        "dims": dims,
        "gamma": gamma,
        "beta": beta,
    }


@register
class LayerNorm(Pattern):
    name = "layernorm"
    group = "transformer"
    anchors = ("ReduceMean",)
    order = 1
    summary = "decomposed LayerNorm -> LayerNormalization (opset >= 17)"

    def match(self, view: GraphView, mean: onnx.NodeProto) -> Rewrite | str | None:
        found = match_layernorm(view, mean)
        if not isinstance(found, dict):
            return found
        if view.opset < LAYERNORM_OPSET:
            return (
                f"LayerNormalization needs opset {LAYERNORM_OPSET}; the model has opset "
                f"{view.opset}, so the decomposed form is kept"
            )
        x = found["x"]
        elem = view.dtype(x)
        if elem not in FLOAT_TYPES:
            return "LayerNorm input is not floating point (or its type is unknown)"
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        dims = found["dims"]
        gamma = found["gamma"]
        if gamma is None:
            if any(d is None for d in dims):
                return "no gamma and the normalized dims are dynamic"
            gamma = np.ones(dims)
        inits = [view.tensor(np.asarray(gamma).astype(dtype), f"{x}_ln_scale")]
        inputs = [x, inits[0].name]
        if found["beta"] is not None:
            inits.append(view.tensor(np.asarray(found["beta"]).astype(dtype), f"{x}_ln_bias"))
            inputs.append(inits[1].name)
        node = view.node(
            "LayerNormalization",
            inputs,
            [found["out"]],
            name=mean.name or "LayerNormalization",
            axis=found["axis"],
            epsilon=found["eps"],
        )
        return Rewrite(remove=found["nodes"], add=[node], initializers=inits)


def _reduce_mean(
    view: GraphView, x: str, out: str, axes: list[int], name: str
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """ReduceMean keeping dims over `axes` (attribute before opset 18, input since)."""
    if view.opset < 18:
        return view.node("ReduceMean", [x], [out], name=name, axes=axes), []
    axes_t = view.tensor(np.array(axes, np.int64), f"{name}_axes")
    return view.node("ReduceMean", [x, axes_t.name], [out], name=name), [axes_t]


def expand_layernorm(
    view: GraphView, node: onnx.NodeProto
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | None:
    """A last-axis LayerNormalization or ONNX Runtime's SimplifiedLayerNormalization (RMS)
    written as standard ops, for opsets that lack them; None if it cannot be."""
    rms = node.op_type == "SimplifiedLayerNormalization"
    if node.domain not in STANDARD_DOMAINS or len(node.input) < 2:
        return None
    if int(attr(node, "axis", -1)) != -1 or len([o for o in node.output if o]) != 1:  # type: ignore[arg-type]
        return None
    x, scale = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] and not rms else None
    elem = view.dtype(scale)
    if elem not in FLOAT_TYPES:
        return None
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    eps = float(attr(node, "epsilon", 1e-5))  # type: ignore[arg-type]
    base = node.name or node.op_type
    two = view.tensor(np.array(2, dtype), f"{base}_two")
    eps_t = view.tensor(np.array(eps, dtype), f"{base}_eps")
    inits = [two, eps_t]
    v = {k: view.fresh(f"{base}_{k}") for k in ("mean", "d", "sq", "var", "ve", "std", "n")}
    nodes: list[onnx.NodeProto] = []
    centered = x
    if not rms:
        mean, extra = _reduce_mean(view, x, v["mean"], [-1], f"{base}_mean")
        nodes += [mean, view.node("Sub", [x, v["mean"]], [v["d"]], name=f"{base}_sub")]
        inits += extra
        centered = v["d"]
    var, extra = _reduce_mean(view, v["sq"], v["var"], [-1], f"{base}_var")
    inits += extra
    nodes += [
        view.node("Pow", [centered, two.name], [v["sq"]], name=f"{base}_pow"),
        var,
        view.node("Add", [v["var"], eps_t.name], [v["ve"]], name=f"{base}_eps_add"),
        view.node("Sqrt", [v["ve"]], [v["std"]], name=f"{base}_sqrt"),
        view.node("Div", [centered, v["std"]], [v["n"]], name=f"{base}_div"),
    ]
    scaled = node.output[0] if bias is None else view.fresh(f"{base}_scaled")
    nodes.append(view.node("Mul", [v["n"], scale], [scaled], name=f"{base}_scale"))
    if bias is not None:
        nodes.append(view.node("Add", [scaled, bias], [node.output[0]], name=f"{base}_bias"))
    return nodes, inits

"""gelu: the exported GELU formulas become the standard Gelu op (opset 20).

Both forms exporters write are matched from their transcendental node:
exact 0.5 * x * (1 + erf(x / sqrt 2)), and the tanh approximation
0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))) -> Gelu(approximate="tanh").
Constants must be within 0.1% of the textbook values. Below opset 20 the `ort` target
writes ONNX Runtime's com.microsoft Gelu / FastGelu instead, and `portable` keeps the
decomposed form and says why.
"""

from __future__ import annotations

import math

import onnx

from optimodel.fusions import FLOAT_TYPES, GraphView, Pattern, Rewrite, close, other_input, register
from optimodel.graphs import MS_DOMAIN

GELU_OPSET = 20
SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _scaled_by(view: GraphView, name: str, factor: float) -> tuple[str, onnx.NodeProto] | None:
    """If `name` = x * factor (or x / (1/factor)) by a single node, (x, that node)."""
    node = view.producer(name)
    if node is None or len(node.input) != 2:
        return None
    if node.op_type == "Mul":
        for a, b in ((0, 1), (1, 0)):
            if close(view.scalar(node.input[b]), factor):
                return node.input[a], node
    if node.op_type == "Div" and close(view.scalar(node.input[1]), 1.0 / factor):
        return node.input[0], node
    return None


def _tail(
    view: GraphView, inner: onnx.NodeProto, x: str
) -> tuple[list[onnx.NodeProto], str] | None:
    """Match `0.5 * x * (1 + inner)` after `inner`; (its nodes, final output)."""
    add = view.sole_reader(inner.output[0], "Add")
    if add is None or not close(view.scalar(other_input(add, inner.output[0]) or ""), 1.0):
        return None
    one_plus = add.output[0]
    mul = view.sole_reader(one_plus, "Mul")
    if mul is None:
        return None
    other = other_input(mul, one_plus)
    if other is None:
        return None
    if other == x:  # (x * (1 + t)) * 0.5
        half = view.sole_reader(mul.output[0], "Mul")
        if half is None or not close(view.scalar(other_input(half, mul.output[0]) or ""), 0.5):
            return None
        return [add, mul, half], half.output[0]
    if close(view.scalar(other), 0.5):  # ((1 + t) * 0.5) * x
        last = view.sole_reader(mul.output[0], "Mul")
        if last is None or other_input(last, mul.output[0]) != x:
            return None
        return [add, mul, last], last.output[0]
    found = _scaled_by(view, other, 0.5)  # (x * 0.5) * (1 + t)
    if found is None or found[0] != x or not view.only_reader(other, mul):
        return None
    return [found[1], add, mul], mul.output[0]


def _cube_of(view: GraphView, name: str) -> tuple[str, list[onnx.NodeProto]] | None:
    """If `name` = x^3 (Pow 3, or x*x*x), (x, its nodes)."""
    node = view.producer(name)
    if node is None:
        return None
    if node.op_type == "Pow" and close(view.scalar(node.input[1]), 3.0):
        return node.input[0], [node]
    if node.op_type == "Mul" and len(node.input) == 2:
        for a, b in ((0, 1), (1, 0)):
            sq = view.producer(node.input[b], "Mul")
            if sq is not None and list(sq.input) == [node.input[a]] * 2:
                if view.only_reader(sq.output[0], node):
                    return node.input[a], [sq, node]
    return None


def match_tanh(view: GraphView, tanh: onnx.NodeProto) -> tuple[str, list, str] | None:
    found = _scaled_by(view, tanh.input[0], SQRT_2_OVER_PI)
    if found is None:
        return None
    inner_sum, scale = found
    add = view.producer(inner_sum, "Add")
    if add is None or len(add.input) != 2:
        return None
    for a, b in ((0, 1), (1, 0)):
        x = add.input[a]
        cubic = _scaled_by(view, add.input[b], 0.044715)
        if cubic is None:
            continue
        cube = _cube_of(view, cubic[0])
        if cube is None or cube[0] != x:
            continue
        nodes = [*cube[1], cubic[1], add, scale]
        inner = [n.output[0] for n in nodes]
        if any(len(view.readers(o)) != 1 or o in view.outputs for o in inner):
            return None
        tail = _tail(view, tanh, x)
        if tail is None:
            return None
        return x, [*nodes, tanh, *tail[0]], tail[1]
    return None


def match_erf(view: GraphView, erf: onnx.NodeProto) -> tuple[str, list, str] | None:
    found = _scaled_by(view, erf.input[0], 1.0 / SQRT2)
    if found is None or not view.only_reader(erf.input[0], erf):
        return None
    x, scale = found
    tail = _tail(view, erf, x)
    if tail is None:
        return None
    return x, [scale, erf, *tail[0]], tail[1]


@register
class Gelu(Pattern):
    name = "gelu"
    group = "transformer"
    anchors = ("Erf", "Tanh")
    order = 2
    summary = "Erf / tanh GELU formulas -> Gelu (opset >= 20)"

    def match(self, view: GraphView, node: onnx.NodeProto) -> Rewrite | str | None:
        found = match_erf(view, node) if node.op_type == "Erf" else match_tanh(view, node)
        if found is None:
            return None
        x, nodes, out = found
        if view.dtype(x) not in FLOAT_TYPES:
            return "GELU input is not floating point (or its type is unknown)"
        tanh = node.op_type == "Tanh"
        if view.opset >= GELU_OPSET:
            extra = {"approximate": "tanh"} if tanh else {}
            gelu = view.node("Gelu", [x], [out], name=node.name or "Gelu", **extra)
        elif view.target == "ort":  # ONNX Runtime's own ops, at any opset
            op = "FastGelu" if tanh else "Gelu"
            gelu = view.node(op, [x], [out], name=node.name or op, domain=MS_DOMAIN)
        else:
            return (
                f"Gelu needs opset {GELU_OPSET}; the model has opset {view.opset}, "
                "so the decomposed form is kept"
            )
        return Rewrite(remove=nodes, add=[gelu])

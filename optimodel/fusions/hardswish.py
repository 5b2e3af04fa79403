"""hardswish: x * relu6(x + 3) / 6, as Paddle and older exporters write it, becomes one op.

MobileNetV3 and PP-LCNet (PP-OCR det / rec / cls) activate most layers with it, exported
as Add(x, 3) -> Clip(0, 6) -> Mul(x, .) -> Div(., 6) (or Mul by 1/6, or the Div before the
Mul): four element-wise passes over the tensor that ONNX Runtime runs one by one (its
optimizer has no fusion for them). From opset 14 it becomes HardSwish; below, the same
function as HardSigmoid(x, alpha=1/6, beta=0.5) -> Mul(x, .), which every opset has
(opset 6+). Both are standard ONNX, so the `portable` target gets them too. Measured on a
[1, 32, 160, 160] tensor at one thread: 0.75 ms for the four ops, 0.46 ms for either form.
`quantize` does not apply it in its own preparation (see optimodel.quant.prepare).
"""

from __future__ import annotations

import onnx

from optimodel.fusions import GraphView, Pattern, Rewrite, close, other_input, register

HARDSWISH_OPSET = 14
# ONNX Runtime's CPU provider has HardSigmoid / HardSwish for these only (no float64)
TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def _scalar(view: GraphView, name: str) -> float | None:
    """A constant of one value that cannot change the shape it is broadcast against."""
    value = view.const(name)
    return view.scalar(name) if value is not None and value.ndim <= 1 else None


def _clip_bounds(view: GraphView, clip: onnx.NodeProto) -> tuple[float | None, float | None]:
    """Clip's (min, max): inputs from opset 11, attributes before."""
    if view.opset >= 11:
        low = _scalar(view, clip.input[1]) if len(clip.input) > 1 and clip.input[1] else None
        high = _scalar(view, clip.input[2]) if len(clip.input) > 2 and clip.input[2] else None
        return low, high
    values = {a.name: a.f for a in clip.attribute}
    return values.get("min"), values.get("max")


def _divided_by_six(view: GraphView, node: onnx.NodeProto | None, value: str) -> bool:
    """`node` computes value / 6 (Div by 6 or Mul by 1/6)."""
    if node is None:
        return False
    other = other_input(node, value)
    if other is None:
        return False
    if node.op_type == "Div":
        return node.input[0] == value and close(_scalar(view, other), 6.0)
    return node.op_type == "Mul" and close(_scalar(view, other), 1.0 / 6.0)


@register
class HardSwish(Pattern):
    name = "hardswish"
    group = "common"  # CNNs mostly, but also mobile vision transformers
    anchors = ("Clip",)
    order = 30
    summary = "x * Clip(x + 3, 0, 6) / 6 -> HardSwish (HardSigmoid + Mul below opset 14)"

    def match(self, view: GraphView, node: onnx.NodeProto) -> Rewrite | str | None:
        low, high = _clip_bounds(view, node)
        if not (close(low, 0.0, 0) and close(high, 6.0)):
            return None
        add = view.producer(node.input[0], "Add")
        if add is None or not view.only_reader(add.output[0], node):
            return None
        x = next(
            (add.input[a] for a, b in ((0, 1), (1, 0)) if close(_scalar(view, add.input[b]), 3.0)),
            None,
        )
        if x is None:
            return None
        clipped = node.output[0]
        first = view.readers(clipped)
        if clipped in view.outputs or len(first) != 1:
            return None
        step = first[0]
        if step.op_type == "Mul" and other_input(step, clipped) == x:  # (x * c) / 6
            last = view.readers(step.output[0])
            if step.output[0] in view.outputs or len(last) != 1:
                return None
            if not _divided_by_six(view, last[0], step.output[0]):
                return None
            nodes = [add, node, step, last[0]]
        elif _divided_by_six(view, step, clipped):  # x * (c / 6)
            mul = view.sole_reader(step.output[0], "Mul")
            if mul is None or other_input(mul, step.output[0]) != x:
                return None
            nodes = [add, node, step, mul]
        else:
            return None
        if view.dtype(x) not in TYPES:
            return "HardSwish input is not float32 / float16 (or its type is unknown)"
        out = nodes[-1].output[0]
        if view.opset >= HARDSWISH_OPSET:
            return Rewrite(remove=nodes, add=[view.node("HardSwish", [x], [out], name="HardSwish")])
        gate = view.fresh(f"{x}_hardsigmoid")
        return Rewrite(
            remove=nodes,
            add=[
                view.node(
                    "HardSigmoid", [x], [gate], name="HardSigmoid", alpha=1.0 / 6.0, beta=0.5
                ),
                view.node("Mul", [x, gate], [out], name="HardSwish_Mul"),
            ],
        )

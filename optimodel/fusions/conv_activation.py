"""conv-activation: Conv followed by its activation becomes ONNX Runtime's FusedConv.

ONNX Runtime does this itself when it loads a model at its default level; writing it
offline (`--target ort` only: FusedConv is a com.microsoft op other runtimes lack) gives
the node count its EXTENDED offline optimizer reaches, in a file that still passes the
ONNX checker. The activations are the ones FusedConv's CPU kernel applies: Relu, Tanh,
Sigmoid, LeakyRelu (alpha), HardSigmoid (alpha, beta) and Clip with constant bounds.
The Conv output must feed the activation alone and not be a graph output.
"""

from __future__ import annotations

import numpy as np
import onnx

from optimodel.fusions import FLOAT_TYPES, GraphView, Pattern, Rewrite, register
from optimodel.graphs import attr

MS_DOMAIN = "com.microsoft"
# FusedConv's CPU kernel takes float only.
FUSED_TYPES = {onnx.TensorProto.FLOAT}


def _activation(view: GraphView, node: onnx.NodeProto) -> tuple[str, list[float]] | str | None:
    """FusedConv's (activation, activation_params) for `node`, a reason, or None."""
    op = node.op_type
    if op in ("Relu", "Tanh", "Sigmoid"):
        return op, []
    if op == "LeakyRelu":
        return op, [float(attr(node, "alpha", 0.01))]
    if op == "HardSigmoid":
        return op, [float(attr(node, "alpha", 0.2)), float(attr(node, "beta", 0.5))]
    if op == "Clip":
        if len(node.input) == 1 and view.opset < 11:  # bounds as attributes before opset 11
            low = attr(node, "min", float(np.finfo(np.float32).min))
            high = attr(node, "max", float(np.finfo(np.float32).max))
            return op, [float(low), float(high)]  # type: ignore[arg-type]
        bounds = []
        for index, default in ((1, np.finfo(np.float32).min), (2, np.finfo(np.float32).max)):
            name = node.input[index] if len(node.input) > index else ""
            if not name:
                bounds.append(float(default))
                continue
            value = view.scalar(name)
            if value is None:
                return "Clip bounds are not constants"
            bounds.append(value)
        return op, bounds
    return None


@register
class ConvActivation(Pattern):
    name = "conv-activation"
    group = "cnn"
    anchors = ("Relu", "Tanh", "Sigmoid", "LeakyRelu", "HardSigmoid", "Clip")
    targets = ("ort",)
    order = 90  # after the Conv + BN / Mul / Add / Pad fusions have settled each Conv
    summary = "Conv + Relu / Sigmoid / Tanh / LeakyRelu / HardSigmoid / Clip -> FusedConv (ort)"

    def match(self, view: GraphView, node: onnx.NodeProto) -> Rewrite | str | None:
        conv = view.producer(node.input[0], "Conv") if node.input else None
        if conv is None:
            return None
        if not view.only_reader(conv.output[0], node):
            return "the Conv output has other readers"
        found = _activation(view, node)
        if found is None or isinstance(found, str):
            return found
        if view.dtype(conv.output[0]) not in FUSED_TYPES:
            kind = "float16/other" if view.dtype(conv.output[0]) in FLOAT_TYPES else "unknown"
            return f"FusedConv runs float32 only (this Conv is {kind})"
        activation, params = found
        extra = {"activation_params": params} if params else {}
        fused = view.node(
            "FusedConv",
            list(conv.input),
            [node.output[0]],
            name=conv.name or "FusedConv",
            like=conv,
            domain=MS_DOMAIN,
            activation=activation,
            **extra,
        )
        return Rewrite(remove=[conv, node], add=[fused])

"""conv-mul-add: a per-channel constant Mul / Add / Sub / Div after a Conv joins its weights.

Exporters often leave a Conv's bias (or a folded normalization) as a separate Add or Mul
by a constant of shape [C,1,1] / [1,C,1,1]. Scaling the weight and bias (or shifting the
bias) removes the node. Only constants that broadcast on the channel axis alone qualify:
anything else would change the output shape or mix spatial positions.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx

from optimodel.fusions import GraphView, Pattern, Rewrite, register
from optimodel.fusions.conv_bn import conv_params, output_channels, replace_conv, scale_weight


def per_channel(value: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """The constant as a [channels] vector if it broadcasts on axis 1 of a rank-`rank` tensor."""
    if value.ndim > rank:
        return None
    dims = (1,) * (rank - value.ndim) + tuple(value.shape)
    if dims[0] != 1 or any(d != 1 for d in dims[2:]) or dims[1] not in (1, channels):
        return None
    return np.broadcast_to(value.astype(np.float64).reshape(-1), (channels,))


@register
class ConvMulAdd(Pattern):
    name = "conv-mul-add"
    group = "cnn"
    anchors = ("Mul", "Add", "Sub", "Div")
    order = 25
    summary = "Conv followed by Mul/Add/Sub/Div by a per-channel constant folded into it"
    conv_op: ClassVar[str] = "Conv"  # the producer this pattern folds into

    def match(self, view: GraphView, node: onnx.NodeProto) -> Rewrite | str | None:
        if len(node.input) != 2:
            return None
        sides = (0, 1) if node.op_type in ("Mul", "Add") else (0,)
        conv = None
        for side in sides:
            conv = view.producer(node.input[side], self.conv_op)
            if conv is not None:
                const_name = node.input[1 - side]
                break
        if conv is None:
            return None
        value = view.const(const_name)
        if value is None:
            return None  # a residual Add of two tensors, not this pattern
        if not view.only_reader(conv.output[0], node):
            return f"{self.conv_op} output has other consumers"
        found = conv_params(view, conv)
        if isinstance(found, str):
            return found
        weight, bias = found
        if value.dtype != weight.dtype:
            return f"constant dtype {value.dtype} differs from the weight's {weight.dtype}"
        channels = output_channels(conv, weight)
        vec = per_channel(value, weight.ndim, channels)
        if vec is None:
            return f"constant of shape {list(value.shape)} is not per-channel"
        b = np.zeros(channels) if bias is None else bias.astype(np.float64).reshape(-1)
        w = weight.astype(np.float64)
        if node.op_type == "Mul":
            w, b = scale_weight(conv, weight, vec), b * vec
        elif node.op_type == "Div":
            if np.any(vec == 0):
                return "division by a constant with zeros"
            w, b = scale_weight(conv, weight, 1.0 / vec), b / vec
        elif node.op_type == "Add":
            b = b + vec
        else:
            b = b - vec
        new, tensors = replace_conv(view, conv, w, b, weight.dtype, node.output[0])
        return Rewrite(remove=[conv, node], add=[new], initializers=tensors)

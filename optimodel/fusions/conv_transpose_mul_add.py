"""conv-transpose-mul-add: a per-channel constant Mul / Add / Sub / Div after a ConvTranspose.

Paddle2ONNX writes a ConvTranspose's bias as a separate Add of a [1, C, 1, 1] constant,
which then also keeps a following BatchNormalization from folding (conv-bn needs the
ConvTranspose right before it). The arithmetic is that of conv-mul-add; only the weight
layout differs ([C_in, C_out / group, k...]), so scaling goes through `scale_weight` and
the channel count through `output_channels`.
"""

from __future__ import annotations

import numpy as np
import onnx

from optimodel.fusions import GraphView, Pattern, Rewrite, register
from optimodel.fusions.conv_bn import conv_params, output_channels, replace_conv, scale_weight
from optimodel.fusions.conv_mul_add import per_channel


@register
class ConvTransposeMulAdd(Pattern):
    name = "conv-transpose-mul-add"
    group = "cnn"
    anchors = ("Mul", "Add", "Sub", "Div")
    order = 26
    summary = "ConvTranspose followed by Mul/Add/Sub/Div by a per-channel constant folded into it"

    def match(self, view: GraphView, node: onnx.NodeProto) -> Rewrite | str | None:
        if len(node.input) != 2:
            return None
        sides = (0, 1) if node.op_type in ("Mul", "Add") else (0,)
        conv, const_name = None, ""
        for side in sides:
            conv = view.producer(node.input[side], "ConvTranspose")
            if conv is not None:
                const_name = node.input[1 - side]
                break
        if conv is None:
            return None
        value = view.const(const_name)
        if value is None:
            return None  # an Add of two tensors, not this pattern
        if not view.only_reader(conv.output[0], node):
            return "ConvTranspose output has other consumers"
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

"""affine-conv: a per-channel constant Mul / Add / Sub / Div *before* an unpadded Conv joins it.

PP-LCNetV3 (PP-OCRv4 det and rec) follows activations with a "learnable affine block",
y = a * x + b with scalar a and b, and ONNX Runtime folds neither into the next Conv, so
each one is two more passes over a feature map. When the Conv reads its whole input
window everywhere (no padding), conv(a * x + b) = conv'(x) with W'[o, c] = W[o, c] * a_c
and bias'[o] = bias[o] + sum over c and the window of W[o, c] * b_c. Padding would break
that (the zeros around the border would have to become b), so padded Convs are left alone;
in PP-LCNetV3 the affine blocks in front of the 1x1 pointwise Convs qualify.
"""

from __future__ import annotations

import numpy as np
import onnx

from optimodel.fusions import GraphView, Pattern, Rewrite, register
from optimodel.fusions.conv_bn import conv_params, replace_conv
from optimodel.fusions.conv_mul_add import per_channel
from optimodel.graphs import attr

MAX_STEPS = 2  # Mul then Add, the affine block's form


def _unpadded(conv: onnx.NodeProto) -> bool:
    pad = attr(conv, "auto_pad", b"NOTSET")
    if pad not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        return False
    pads = attr(conv, "pads", None)
    return pads is None or not any(pads)  # type: ignore[arg-type]


def _step(
    view: GraphView, node: onnx.NodeProto, rank: int, channels: int
) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(data input, scale, shift) when `node` is data * s + t with per-channel constant s, t."""
    if node.op_type not in ("Mul", "Add", "Sub", "Div") or len(node.input) != 2:
        return None
    sides = (0, 1) if node.op_type in ("Mul", "Add") else (0,)
    for side in sides:
        value = view.const(node.input[1 - side])
        if value is None or view.const(node.input[side]) is not None:
            continue
        shape = view.shape(node.input[side])
        if shape is None or len(shape) != rank or shape[1] != channels:
            return None  # the constant would broadcast the data to a new shape
        vec = per_channel(value, rank, channels)
        if vec is None:
            return None
        ones, zeros = np.ones(channels), np.zeros(channels)
        if node.op_type == "Mul":
            return node.input[side], vec, zeros
        if node.op_type == "Add":
            return node.input[side], ones, vec
        if node.op_type == "Sub":
            return node.input[side], ones, -vec
        if np.any(vec == 0):
            return None
        return node.input[side], 1.0 / vec, zeros
    return None


@register
class AffineConv(Pattern):
    name = "affine-conv"
    group = "cnn"
    anchors = ("Conv",)
    order = 35  # after hardswish, whose trailing Div by 6 it would otherwise take
    summary = "per-channel constant Mul/Add/Sub/Div before an unpadded Conv folded into it"

    def match(self, view: GraphView, conv: onnx.NodeProto) -> Rewrite | str | None:
        if len(conv.input) < 2 or attr(conv, "group", 1) != 1:
            return None
        found = conv_params(view, conv)
        if isinstance(found, str):
            return None
        weight, bias = found
        if weight.ndim < 3:
            return None
        channels = int(weight.shape[1])
        scale, shift = np.ones(channels), np.zeros(channels)
        removed: list[onnx.NodeProto] = []
        data, reader = conv.input[0], conv
        for _ in range(MAX_STEPS):
            node = view.producer(data)
            if node is None or not view.only_reader(data, reader):
                break
            step = _step(view, node, weight.ndim, channels)
            if step is None:
                break
            data, s, t = step
            shift = scale * t + shift  # x = scale * (s * u + t) + shift
            scale = scale * s
            removed.append(node)
            reader = node
        if not removed:
            return None
        if not _unpadded(conv):
            return "the Conv pads its input: an offset before it cannot move into the bias"
        ones = (1,) * (weight.ndim - 2)
        w = weight.astype(np.float64)
        new_w = w * scale.reshape(1, -1, *ones)
        b = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64).reshape(-1)
        new_b = b + (w * shift.reshape(1, -1, *ones)).sum(axis=tuple(range(1, w.ndim)))
        node, tensors = replace_conv(view, conv, new_w, new_b, weight.dtype, conv.output[0])
        node.input[0] = data
        return Rewrite(remove=[*removed, conv], add=[node], initializers=tensors)

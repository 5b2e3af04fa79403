"""conv-bn: BatchNormalization after Conv / ConvTranspose folds into the weights and bias.

Inference-mode BN is a per-channel affine map, so W' = W * s and b' = (b - mean) * s + beta
with s = gamma / sqrt(var + eps). The arithmetic runs in float64 and is cast back to the
weight dtype once, so fp16 weights lose no more than one rounding.
"""

from __future__ import annotations

import numpy as np
import onnx

from optimodel.fusions import FLOAT_TYPES, GraphView, Pattern, Rewrite, register
from optimodel.graphs import attr

CONVS = ("Conv", "ConvTranspose")


def _statistics_used(view: GraphView, bn: onnx.NodeProto) -> bool:
    return any(o and (view.readers(o) or o in view.outputs) for o in bn.output[1:])


def conv_params(
    view: GraphView, conv: onnx.NodeProto
) -> tuple[np.ndarray, np.ndarray | None] | str:
    """The constant weight and bias (None when absent) of a conv, or why they are not usable."""
    weight = view.const(conv.input[1]) if len(conv.input) > 1 else None
    if weight is None:
        return f"{conv.op_type} weight is not a constant (quantized or computed at run time)"
    if view.dtype(conv.input[1]) not in FLOAT_TYPES:
        return f"{conv.op_type} weight is not floating point"
    bias = None
    if len(conv.input) > 2 and conv.input[2]:
        bias = view.const(conv.input[2])
        if bias is None:
            return f"{conv.op_type} bias is not a constant"
    return weight, bias


def output_channels(conv: onnx.NodeProto, weight: np.ndarray) -> int:
    if conv.op_type == "ConvTranspose":
        return int(weight.shape[1]) * int(attr(conv, "group", 1))  # type: ignore[arg-type]
    return int(weight.shape[0])


def scale_weight(conv: onnx.NodeProto, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Multiply each output channel of a (transposed) conv weight by `scale`, in float64."""
    w = weight.astype(np.float64)
    ones = (1,) * (w.ndim - 2)
    if conv.op_type == "ConvTranspose":  # W: [C_in, M / group, k...]
        group = int(attr(conv, "group", 1))  # type: ignore[arg-type]
        c_in, per = w.shape[0], w.shape[1]
        grouped = w.reshape(group, c_in // group, per, *w.shape[2:])
        grouped = grouped * scale.reshape(group, 1, per, *ones)
        return grouped.reshape(w.shape)
    return w * scale.reshape(-1, 1, *ones)


def replace_conv(
    view: GraphView,
    conv: onnx.NodeProto,
    weight: np.ndarray,
    bias: np.ndarray,
    dtype: np.dtype,
    output: str,
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A copy of `conv` with new constant weight and bias, writing `output`."""
    w_t = view.tensor(weight.astype(dtype), f"{conv.input[1]}_fused")
    b_t = view.tensor(bias.astype(dtype), f"{conv.name or conv.output[0]}_bias_fused")
    node = view.node(
        conv.op_type,
        [conv.input[0], w_t.name, b_t.name],
        [output],
        name=conv.name or conv.op_type,
        like=conv,
    )
    return node, [w_t, b_t]


@register
class ConvBatchNorm(Pattern):
    name = "conv-bn"
    group = "cnn"
    anchors = ("BatchNormalization",)
    order = 20
    summary = "BatchNormalization after Conv/ConvTranspose folded into its weights"

    def match(self, view: GraphView, bn: onnx.NodeProto) -> Rewrite | str | None:
        if len(bn.input) < 5:
            return None
        if attr(bn, "training_mode", 0) or _statistics_used(view, bn):
            return "BatchNormalization runs in training mode (statistics outputs used)"
        if not attr(bn, "spatial", 1):
            return "BatchNormalization with spatial=0 is not per-channel"
        conv = view.producer(bn.input[0])
        if conv is None or conv.op_type not in CONVS:
            return "input is not produced by Conv/ConvTranspose; BatchNormalization kept"
        if not view.only_reader(conv.output[0], bn):
            return f"{conv.op_type} output has other consumers"
        params = [view.const(n) for n in bn.input[1:5]]
        if any(p is None for p in params):
            return "BatchNormalization scale/bias/mean/var are not constants"
        found = conv_params(view, conv)
        if isinstance(found, str):
            return found
        weight, bias = found
        channels = output_channels(conv, weight)
        if any(p.size != channels for p in params):  # type: ignore[union-attr]
            return f"BatchNormalization parameters do not have {channels} channels"
        gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)  # type: ignore[union-attr]
        eps = float(attr(bn, "epsilon", 1e-5))  # type: ignore[arg-type]
        with np.errstate(all="ignore"):
            scale = gamma / np.sqrt(var + eps)
        if not np.all(np.isfinite(scale)):
            return "BatchNormalization variance makes a non-finite scale"
        b = np.zeros(channels) if bias is None else bias.astype(np.float64).reshape(-1)
        new_w = scale_weight(conv, weight, scale)
        new_b = (b - mean) * scale + beta
        node, tensors = replace_conv(view, conv, new_w, new_b, weight.dtype, bn.output[0])
        return Rewrite(remove=[conv, bn], add=[node], initializers=tensors)

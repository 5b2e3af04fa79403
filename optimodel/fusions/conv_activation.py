"""conv-activation: Conv + activation becomes ONNX Runtime's FusedConv (`--target ort`, opt-in).

Off by default (`OFF_BY_DEFAULT`): ONNX Runtime's CPU provider makes this same fusion
itself when it loads a model, so writing it offline gains no speed there, and on the
CUDA provider it costs: its FusedConv kernel refuses every activation but Relu (the
session does not start) and with Relu ran 3-25% slower than Conv + Relu on an H100
(benchmarks/RESULTS.md, GPU section). `--enable conv-activation` is for a model that
will run on ONNX Runtime's CPU provider and should be stored at the node count of ONNX
Runtime's own EXTENDED offline optimizer (PP-OCR cls: 179 -> 155 nodes), still passing
the ONNX checker. The activations are those the CPU kernel applies: Relu, Sigmoid, Tanh,
LeakyRelu, HardSigmoid and Clip with constant bounds. `quantize`, `prune` and `fp16`
expand FusedConv back first (`fused_conv.expand_fused_conv`).
"""

from __future__ import annotations

import numpy as np
import onnx

from optimodel.fusions import GraphView, Pattern, Rewrite, register
from optimodel.graphs import MS_DOMAIN, attr

# activation -> its attributes in the order FusedConv's activation_params holds them,
# with ONNX's defaults.
PARAMS: dict[str, tuple[tuple[str, float], ...]] = {
    "Relu": (),
    "Sigmoid": (),
    "Tanh": (),
    "LeakyRelu": (("alpha", 0.01),),
    "HardSigmoid": (("alpha", 0.2), ("beta", 0.5)),
}
FLOAT_MAX = float(np.finfo(np.float32).max)


def _clip_bounds(view: GraphView, clip: onnx.NodeProto) -> list[float] | str:
    """[min, max] of a Clip whose bounds are constants, or why not."""
    if view.opset < 11:
        low = attr(clip, "min", -FLOAT_MAX)
        high = attr(clip, "max", FLOAT_MAX)
        return [float(low), float(high)]  # type: ignore[arg-type]
    bounds = []
    for index, default in ((1, -FLOAT_MAX), (2, FLOAT_MAX)):
        name = clip.input[index] if len(clip.input) > index else ""
        if not name:
            bounds.append(default)
            continue
        value = view.scalar(name)
        if value is None:
            return "Clip bounds are computed at run time"
        bounds.append(float(value))
    return bounds


@register
class ConvActivation(Pattern):
    name = "conv-activation"
    group = "cnn"
    anchors = (*PARAMS, "Clip")
    targets = ("ort",)
    order = 90  # after the Conv + BN / Mul / Add / Pad fusions have settled each Conv
    summary = "Conv + Relu/Sigmoid/Tanh/LeakyRelu/HardSigmoid/Clip -> FusedConv (ort, CPU)"

    def match(self, view: GraphView, node: onnx.NodeProto) -> Rewrite | str | None:
        conv = view.producer(node.input[0], "Conv") if node.input else None
        if conv is None:
            return None
        if not view.only_reader(conv.output[0], node):
            return "the Conv output has other readers"
        if view.dtype(conv.output[0]) != onnx.TensorProto.FLOAT:
            return "FusedConv's CPU kernel runs float32 only"
        if node.op_type == "Clip":
            params = _clip_bounds(view, node)
            if isinstance(params, str):
                return params
        else:
            params = [
                float(attr(node, key, default))  # type: ignore[arg-type]
                for key, default in PARAMS[node.op_type]
            ]
        extra = {"activation_params": params} if params else {}
        fused = view.node(
            "FusedConv",
            list(conv.input),
            [node.output[0]],
            name=conv.name or "FusedConv",
            like=conv,
            domain=MS_DOMAIN,
            activation=node.op_type,
            **extra,
        )
        return Rewrite(remove=[conv, node], add=[fused])

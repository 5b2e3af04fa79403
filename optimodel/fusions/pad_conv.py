"""pad-conv: a zero constant Pad on spatial axes before a Conv becomes the Conv's own pads.

Conv pads with zeros, so only constant-mode Pad with value 0, non-negative pads and
nothing on the batch or channel axes qualifies, and the Conv must use explicit pads
(auto_pad NOTSET) for the sums to mean the same thing.
"""

from __future__ import annotations

import numpy as np
import onnx

from optimodel.fusions import GraphView, Pattern, Rewrite, register
from optimodel.graphs import attr


def _text(value: object, default: str) -> str:
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


def _pad_amounts(view: GraphView, pad: onnx.NodeProto, rank: int) -> list[int] | str:
    """Full [begin..., end...] pads of a zero constant Pad over `rank` axes, or why not."""
    if _text(attr(pad, "mode"), "constant") != "constant":
        return "Pad mode is not constant"
    if view.opset < 11:
        pads = attr(pad, "pads")
        value = float(attr(pad, "value", 0.0))  # type: ignore[arg-type]
        axes = None
    else:
        pads = view.const(pad.input[1]) if len(pad.input) > 1 else None
        value_name = pad.input[2] if len(pad.input) > 2 else ""
        value = view.scalar(value_name) if value_name else 0.0
        axes_name = pad.input[3] if len(pad.input) > 3 else ""
        axes = view.const(axes_name) if axes_name else None
        if axes_name and axes is None:
            return "Pad axes are computed at run time"
    if pads is None:
        return "Pad amounts are computed at run time"
    if value is None or value != 0.0:
        return "Pad value is not zero"
    amounts = [int(p) for p in np.asarray(pads).reshape(-1)]
    if axes is None:
        if len(amounts) != 2 * rank:
            return "Pad amounts do not match the input rank"
        return amounts
    full = [0] * (2 * rank)
    picked = [int(a) % rank for a in np.asarray(axes).reshape(-1)]
    if len(amounts) != 2 * len(picked):
        return "Pad amounts do not match its axes"
    for i, axis in enumerate(picked):
        full[axis] += amounts[i]
        full[rank + axis] += amounts[len(picked) + i]
    return full


@register
class PadConv(Pattern):
    name = "pad-conv"
    group = "cnn"
    anchors = ("Conv",)
    order = 10
    summary = "zero constant Pad on spatial axes merged into the Conv's pads"

    def match(self, view: GraphView, conv: onnx.NodeProto) -> Rewrite | str | None:
        pad = view.producer(conv.input[0], "Pad")
        if pad is None:
            return None
        if not view.only_reader(pad.output[0], conv):
            return "Pad output has other consumers"
        if _text(attr(conv, "auto_pad"), "NOTSET") != "NOTSET":
            return "Conv uses auto_pad; explicit pads needed"
        weight_shape = view.shape(conv.input[1]) if len(conv.input) > 1 else None
        kernel = attr(conv, "kernel_shape")
        rank = (
            len(weight_shape)
            if weight_shape is not None
            else len(kernel) + 2  # type: ignore[arg-type]
            if kernel is not None
            else view.rank(conv.input[0])
        )
        if rank is None:
            return "rank of the Conv input is unknown"
        found = _pad_amounts(view, pad, rank)
        if isinstance(found, str):
            return found
        if any(p < 0 for p in found):
            return "Pad crops (negative pads)"
        begin, end = found[:rank], found[rank:]
        if begin[0] or begin[1] or end[0] or end[1]:
            return "Pad touches the batch or channel axis"
        spatial = rank - 2
        conv_pads = [int(p) for p in attr(conv, "pads", [0] * (2 * spatial))]  # type: ignore[union-attr]
        merged = [conv_pads[i] + begin[2 + i] for i in range(spatial)] + [
            conv_pads[spatial + i] + end[2 + i] for i in range(spatial)
        ]
        node = view.node(
            "Conv",
            [pad.input[0], *conv.input[1:]],
            list(conv.output),
            name=conv.name or "Conv",
            like=conv,
            drop=("auto_pad",),
            pads=merged,
        )
        return Rewrite(remove=[pad, conv], add=[node])

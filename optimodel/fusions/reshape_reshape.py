"""reshape-reshape: a Reshape of a Reshape keeps only the last one.

Only the element order matters to Reshape, so the inner one is redundant unless the
outer shape copies a dimension (a 0 entry without allowzero) from the inner result.
"""

from __future__ import annotations

import numpy as np
import onnx

from optimodel.fusions import GraphView, Pattern, Rewrite, register
from optimodel.graphs import attr


@register
class ReshapeReshape(Pattern):
    name = "reshape-reshape"
    group = "common"
    anchors = ("Reshape",)
    order = 75
    summary = "Reshape of a Reshape keeps only the last"

    def match(self, view: GraphView, outer: onnx.NodeProto) -> Rewrite | str | None:
        if len(outer.input) < 2:
            return None
        inner = view.producer(outer.input[0], "Reshape")
        if inner is None:
            return None
        if not view.only_reader(inner.output[0], outer):
            return "inner Reshape output has other consumers"
        if not attr(outer, "allowzero", 0):
            shape = view.const(outer.input[1])
            if shape is None:
                return "outer shape is computed at run time and may copy dims (0) from the inner"
            if np.any(shape == 0):
                return "outer shape copies a dimension (0) from the inner result"
        node = view.node(
            "Reshape",
            [inner.input[0], outer.input[1]],
            [outer.output[0]],
            name=outer.name or "Reshape",
            like=outer,
        )
        return Rewrite(remove=[inner, outer], add=[node])

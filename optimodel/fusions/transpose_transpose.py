"""transpose-transpose: two Transposes in a row compose into one, or into nothing.

Transpose(Transpose(x, p1), p2) == Transpose(x, q) with q[i] = p1[p2[i]]; when q is the
identity both go and readers take x directly (an Identity remains only when the result
is a graph output, which must keep its name).
"""

from __future__ import annotations

import onnx

from optimodel.fusions import GraphView, Pattern, Rewrite, register
from optimodel.graphs import attr


def _perm(view: GraphView, node: onnx.NodeProto) -> list[int] | None:
    perm = attr(node, "perm")
    if perm is not None:
        return [int(p) for p in perm]  # type: ignore[union-attr]
    rank = view.rank(node.input[0])
    return None if rank is None else list(reversed(range(rank)))


@register
class TransposeTranspose(Pattern):
    name = "transpose-transpose"
    group = "common"
    anchors = ("Transpose",)
    order = 70
    summary = "consecutive Transposes composed; dropped when they cancel"

    def match(self, view: GraphView, outer: onnx.NodeProto) -> Rewrite | str | None:
        inner = view.producer(outer.input[0], "Transpose")
        if inner is None:
            return None
        p1, p2 = _perm(view, inner), _perm(view, outer)
        if p1 is None or p2 is None:
            return "rank unknown for a Transpose without perm"
        if len(p1) != len(p2):
            return "perms of different lengths"
        composed = [p1[p] for p in p2]
        exclusive = view.only_reader(inner.output[0], outer)
        remove = [inner, outer] if exclusive else [outer]
        source, out = inner.input[0], outer.output[0]
        if composed == list(range(len(composed))):
            if out in view.outputs:
                keep = view.node("Identity", [source], [out], name=outer.name or "Identity")
                return Rewrite(remove=remove, add=[keep])
            return Rewrite(remove=remove, rename={out: source})
        if not exclusive:
            return "inner Transpose output has other consumers"
        node = view.node(
            "Transpose", [source], [out], name=outer.name or "Transpose", perm=composed
        )
        return Rewrite(remove=remove, add=[node])

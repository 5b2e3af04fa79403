"""output-identity: an Identity feeding a graph output merges into the node before it.

Exporters add it to give the output its name; the producer can write that name itself
when nothing else reads its own output. Graph inputs passed straight through keep
their Identity.
"""

from __future__ import annotations

import onnx

from optimodel.fusions import GraphView, Pattern, Rewrite, register


@register
class OutputIdentity(Pattern):
    name = "output-identity"
    group = "common"
    anchors = ("Identity",)
    order = 90
    summary = "Identity before a graph output merged into its producer"

    def match(self, view: GraphView, identity: onnx.NodeProto) -> Rewrite | str | None:
        out = identity.output[0]
        if out not in view.outputs:
            return None
        source = identity.input[0]
        producer = view.producers.get(source)
        if producer is None:
            return None
        if not view.only_reader(source, identity):
            return "the value before the Identity has other readers or is an output"
        if list(producer.output).count(source) != 1 or out in producer.output:
            return None
        node = onnx.NodeProto()
        node.CopyFrom(producer)
        node.output[list(producer.output).index(source)] = out
        return Rewrite(remove=[producer, identity], add=[node])

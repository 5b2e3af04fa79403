"""conv-activation: Conv followed by Relu becomes ONNX Runtime's FusedConv.

ONNX Runtime does this itself when it loads a model at its default level; writing it
offline (`--target ort` only: FusedConv is a com.microsoft op other runtimes lack) gives
a smaller graph that still passes the ONNX checker. Only Relu is fused: FusedConv's CPU
kernel also applies Tanh, Sigmoid, LeakyRelu, HardSigmoid and Clip, but its CUDA kernel
refuses to load anything but Relu (measured: a FusedConv with HardSigmoid stops the CUDA
session from starting), and a `--target ort` model must run on every ONNX Runtime
provider. The CPU provider fuses those activations itself at load time.
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


CPU_ONLY = ("Tanh", "Sigmoid", "LeakyRelu", "HardSigmoid", "Clip")


@register
class ConvActivation(Pattern):
    name = "conv-activation"
    group = "cnn"
    anchors = ("Relu", *CPU_ONLY)
    targets = ("ort",)
    order = 90  # after the Conv + BN / Mul / Add / Pad fusions have settled each Conv
    summary = "Conv + Relu -> FusedConv (ort)"

    def match(self, view: GraphView, node: onnx.NodeProto) -> Rewrite | str | None:
        conv = view.producer(node.input[0], "Conv") if node.input else None
        if conv is None:
            return None
        if not view.only_reader(conv.output[0], node):
            return "the Conv output has other readers"
        if node.op_type in CPU_ONLY:
            return (
                f"FusedConv with {node.op_type} loads on ONNX Runtime's CPU provider only "
                "(its CUDA kernel runs Relu alone); the CPU provider fuses it at load time"
            )
        if view.dtype(conv.output[0]) not in FUSED_TYPES:
            kind = "float16/other" if view.dtype(conv.output[0]) in FLOAT_TYPES else "unknown"
            return f"FusedConv runs float32 only (this Conv is {kind})"
        fused = view.node(
            "FusedConv",
            list(conv.input),
            [node.output[0]],
            name=conv.name or "FusedConv",
            like=conv,
            domain=MS_DOMAIN,
            activation="Relu",
        )
        return Rewrite(remove=[conv, node], add=[fused])


def expand_fused_conv(model: onnx.ModelProto) -> int:
    """Turn FusedConv back into Conv + its activation, in place; returns how many.

    Passes that rewrite Convs by their standard schema (ONNX Runtime's quantizers, channel
    pruning) do not know FusedConv: a model fused for ONNX Runtime is expanded first, so
    `fuse` then `quantize` works as well as `quantize` alone.
    """
    from optimodel.modelio import iter_graphs

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    names = {o for g in iter_graphs(model.graph) for n in g.node for o in n.output}
    names |= {t.name for g in iter_graphs(model.graph) for t in g.initializer}
    count = 0
    for graph in iter_graphs(model.graph):
        nodes: list[onnx.NodeProto] = []
        for node in graph.node:
            fused = node.op_type == "FusedConv" and node.domain == MS_DOMAIN
            if not fused or len([i for i in node.input if i]) > 3:  # a Z (sum) input: leave it
                nodes.append(node)
                continue
            activation = attr(node, "activation", b"")
            activation = activation.decode() if isinstance(activation, bytes) else str(activation)
            params = [float(v) for v in attr(node, "activation_params", []) or []]
            middle = _fresh(f"{node.output[0]}_conv", names)
            conv = onnx.helper.make_node("Conv", list(node.input), [middle], name=node.name)
            conv.attribute.extend(
                a for a in node.attribute if a.name not in ("activation", "activation_params")
            )
            inputs, extra = [middle], {}
            if activation == "LeakyRelu" and params:
                extra = {"alpha": params[0]}
            elif activation == "HardSigmoid" and len(params) >= 2:
                extra = {"alpha": params[0], "beta": params[1]}
            elif activation == "Clip" and len(params) >= 2:
                if opset < 11:
                    extra = {"min": params[0], "max": params[1]}
                else:
                    for value, suffix in zip(params[:2], ("min", "max"), strict=True):
                        bound = _fresh(f"{node.name or 'clip'}_{suffix}", names)
                        graph.initializer.append(
                            onnx.numpy_helper.from_array(np.array(value, np.float32), bound)
                        )
                        inputs.append(bound)
            act = onnx.helper.make_node(
                activation, inputs, list(node.output), name=_fresh(f"{node.name}_act", names)
            )
            for key, value in extra.items():
                act.attribute.append(onnx.helper.make_attribute(key, value))
            nodes.extend([conv, act])
            count += 1
        if count:
            del graph.node[:]
            graph.node.extend(nodes)
    return count


def _fresh(base: str, taken: set[str]) -> str:
    name, n = base, 1
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name

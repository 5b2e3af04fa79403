"""FusedConv (ONNX Runtime's Conv + activation) expanded back into standard ONNX.

optimodel does not write FusedConv: ONNX Runtime's CPU provider fuses Conv + activation
itself when it loads a model, so an offline FusedConv gains nothing there (measured
0.87-0.98x the original either way on PP-OCR), and on the CUDA provider it costs:
the CUDA kernel refuses any activation but Relu, and with Relu it ran 3-25% slower than
Conv + Relu on an H100 (benchmarks/RESULTS.md, GPU section). Models saved by ONNX
Runtime's own offline optimizer carry it, though, and the passes that rewrite Convs by
their standard schema (ONNX Runtime's quantizers, channel pruning) do not know it: they
expand it first with `expand_fused_conv`.
"""

from __future__ import annotations

import numpy as np
import onnx

from optimodel.graphs import MS_DOMAIN, attr, fresh_name


def expand_fused_conv(model: onnx.ModelProto) -> int:
    """Turn FusedConv back into Conv + its activation, in place; returns how many.

    A FusedConv with a Z (sum) input is left as it is.
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
            middle = fresh_name(f"{node.output[0]}_conv", names)
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
                        bound = fresh_name(f"{node.name or 'clip'}_{suffix}", names)
                        graph.initializer.append(
                            onnx.numpy_helper.from_array(np.array(value, np.float32), bound)
                        )
                        inputs.append(bound)
            act = onnx.helper.make_node(
                activation, inputs, list(node.output), name=fresh_name(f"{node.name}_act", names)
            )
            for key, value in extra.items():
                act.attribute.append(onnx.helper.make_attribute(key, value))
            nodes.extend([conv, act])
            count += 1
        if count:
            del graph.node[:]
            graph.node.extend(nodes)
    return count

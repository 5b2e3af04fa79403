"""What a quantized model really does: integer ops, Q/DQ pairs, float leftovers, weight bytes.

A quantizer that "succeeds" can still leave most layers in float (USER_ASKS item 8), so
the figures are read back from the produced graph, not from what was asked for. In QDQ
form a Conv / MatMul / Gemm counts as quantized when its activation and weight inputs
both come from DequantizeLinear (ONNX Runtime then fuses it into an integer kernel);
a DequantizeLinear weight in front of a float activation is weight-only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import onnx

from optimodel.graphs import consumers
from optimodel.modelio import tensor_bytes

# Float layers that carry the weights and most of the arithmetic.
COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Ops whose kernels compute in integer arithmetic (or on packed low-bit weights).
INTEGER_OPS = {
    "ConvInteger",
    "MatMulInteger",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulNBits",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QGemm",
    "QAttention",
    "DynamicQuantizeLSTM",
    "GatherBlockQuantized",
    "QLinearConvTranspose",
}
MATMUL_FAMILY = {
    "MatMul",
    "Attention",  # com.microsoft: the packed Q/K/V projection weight
    "QAttention",
    "Gemm",
    "MatMulInteger",
    "QLinearMatMul",
    "MatMulNBits",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QGemm",
}
# Which inputs of each layer hold its weight (and the weight's quantization parameters).
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1,),
    "ConvTranspose": (1,),
    "MatMul": (0, 1),
    "Gemm": (1,),
    "Gather": (0,),
    "ConvInteger": (1, 3),
    "MatMulInteger": (1, 3),
    "QLinearConv": (3, 4, 5),
    "QLinearMatMul": (3, 4, 5),
    "MatMulNBits": (1, 2, 3),
    "DynamicQuantizeMatMul": (1, 2, 3),
    "MatMulIntegerToFloat": (1, 3, 5),
    "QGemm": (3, 4, 5),
    "GatherBlockQuantized": (0, 2, 3),
    "Attention": (1,),
    "QAttention": (1, 4, 7),
    "EmbedLayerNormalization": (2, 3, 4),  # word, position and segment tables
}
# Value-preserving ops a weight may pass through between its initializer and the layer.
_PASS_THROUGH = {"Reshape", "Transpose", "Cast", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
DQ = "DequantizeLinear"
Q = "QuantizeLinear"


Scope = tuple[onnx.GraphProto, dict[str, onnx.NodeProto], dict[str, onnx.TensorProto]]


def _scopes(
    graph: onnx.GraphProto,
    producers: dict[str, onnx.NodeProto] | None = None,
    constants: dict[str, onnx.TensorProto] | None = None,
) -> Iterator[Scope]:
    """Each graph with the producers and constants visible in it (outer scopes included)."""
    inputs = {i.name for i in graph.input}
    constants = {k: v for k, v in (constants or {}).items() if k not in inputs}
    constants.update({t.name: t for t in graph.initializer if t.name not in inputs})
    producers = {k: v for k, v in (producers or {}).items() if k not in inputs}
    producers.update({o: n for n in graph.node for o in n.output if o})
    yield graph, producers, constants
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                yield from _scopes(sub, producers, constants)


def _weight_tensors(
    name: str,
    producers: dict[str, onnx.NodeProto],
    constants: dict[str, onnx.TensorProto],
    depth: int = 0,
) -> list[onnx.TensorProto]:
    """The constants a weight value is computed from (through DQ and reshapes), else []."""
    if name in constants:
        return [constants[name]]
    node = producers.get(name)
    if node is None or depth > 4:
        return []
    if node.op_type == "Constant":
        return [t for a in node.attribute if a.name == "value" for t in [a.t]]
    if node.op_type == DQ or node.op_type in _PASS_THROUGH:
        found: list[onnx.TensorProto] = []
        for index, inp in enumerate(node.input):
            if not inp:
                continue
            tensors = _weight_tensors(inp, producers, constants, depth + 1)
            if index == 0 and not tensors:
                return []  # the data is computed at run time: not a weight
            found.extend(tensors)
        return found
    return []


def _from_dq(name: str, producers: dict[str, onnx.NodeProto]) -> bool:
    node = producers.get(name)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = producers.get(node.input[0])
    return node is not None and node.op_type == DQ


def weight_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of layer weights (with scales and zero points): all layers and MatMul-like ones."""
    seen: set[str] = set()
    total = matmul = 0
    for graph, producers, constants in _scopes(model.graph):
        for node in graph.node:
            indices = WEIGHT_INPUTS.get(node.op_type)
            if indices is None:
                continue
            if node.op_type == "MatMul":  # the constant side, if either
                indices = tuple(
                    i for i in indices if _weight_tensors(node.input[i], producers, constants)
                )[:1]
            for index in indices:
                if index >= len(node.input) or not node.input[index]:
                    continue
                for tensor in _weight_tensors(node.input[index], producers, constants):
                    key = tensor.name
                    if key in seen:
                        continue
                    seen.add(key)
                    size = tensor_bytes(tensor)
                    total += size
                    if node.op_type in MATMUL_FAMILY:
                        matmul += size
    return {"all": total, "matmul": matmul}


def quantization_stats(model: onnx.ModelProto) -> dict[str, Any]:
    """Integer ops by kind, Q/DQ pairs, and compute nodes left in float (with names)."""
    quantized: Counter[str] = Counter()
    float_nodes: list[str] = []
    qdq_pairs = weight_dq = dynamic_q = activation_matmuls = 0
    for graph, producers, constants in _scopes(model.graph):
        uses = consumers(graph)
        for node in graph.node:
            op = node.op_type
            if op in INTEGER_OPS:
                bits = next((a.i for a in node.attribute if a.name == "bits"), None)
                quantized[f"{op} ({bits}-bit)" if bits else op] += 1
            elif op == Q:
                qdq_pairs += sum(1 for user in uses.get(node.output[0], []) if user.op_type == DQ)
            elif op == DQ and _weight_tensors(node.input[0], producers, constants):
                weight_dq += 1
            elif op == "DynamicQuantizeLinear":
                dynamic_q += 1
            elif op in COMPUTE_OPS:
                weight_index = 1
                if op == "MatMul" and not _from_dq(node.input[1], producers):
                    weight_index = 0 if _from_dq(node.input[0], producers) else 1
                act_index = 1 - weight_index if op == "MatMul" else 0
                weight_q = _from_dq(node.input[weight_index], producers)
                act_q = _from_dq(node.input[act_index], producers)
                if weight_q and act_q:
                    quantized[f"QDQ {op}"] += 1
                elif weight_q:
                    quantized[f"weight-only {op}"] += 1
                elif any(_weight_tensors(i, producers, constants) for i in node.input[:2]):
                    float_nodes.append(node.name or f"<unnamed {op}>")
                else:  # two run-time operands (attention scores): no weight to quantize
                    activation_matmuls += 1
    return {
        "quantized_ops": dict(sorted(quantized.items())),
        "quantized_total": sum(quantized.values()),
        "float_compute_nodes": len(float_nodes),
        "float_compute_names": float_nodes[:20],
        "float_activation_matmuls": activation_matmuls,
        "qdq_pairs": qdq_pairs,
        "weight_dequantize_nodes": weight_dq,
        "dynamic_quantize_nodes": dynamic_q,
    }

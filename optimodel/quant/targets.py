"""Which quantized ops each execution provider can run, checked before a model is written.

Dynamic quantization's ConvInteger / MatMulInteger have no CUDA or TensorRT kernels, and
TensorRT takes only standard Q/DQ with symmetric int8 (USER_ASKS items 10 and 11): a model
that loads on the CPU and fails on the target is refused here, with what to do instead.
The table covers the ops onnxruntime.quantization emits; float ops are not checked (the
input model had them already).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from optimodel.errors import OptimodelError
from optimodel.modelio import iter_graphs, tensor_array

TARGETS = ("cpu", "cuda", "tensorrt")
MS = "com.microsoft"

# (domain, op) of every op the ORT quantizers can emit; "" is the ONNX standard domain.
QUANT_OPS = {
    ("", "QuantizeLinear"),
    ("", "DequantizeLinear"),
    ("", "DynamicQuantizeLinear"),
    ("", "ConvInteger"),
    ("", "MatMulInteger"),
    ("", "QLinearConv"),
    ("", "QLinearMatMul"),
    *(
        (MS, op)
        for op in (
            "QuantizeLinear",
            "DequantizeLinear",
            "DynamicQuantizeMatMul",
            "MatMulIntegerToFloat",
            "DynamicQuantizeLSTM",
            "QAttention",
            "QEmbedLayerNormalization",
            "QGemm",
            "QLinearAdd",
            "QLinearMul",
            "QLinearSigmoid",
            "QLinearLeakyRelu",
            "QLinearSoftmax",
            "QLinearConcat",
            "QLinearWhere",
            "QLinearGlobalAveragePool",
            "QLinearAveragePool",
            "QLinearReduceMean",
            "QLinearConvTranspose",
            "MatMulNBits",
            "GatherBlockQuantized",
        )
    ),
}

# Quantized ops each provider has kernels for (the CPU provider runs them all).
SUPPORTED: dict[str, set[tuple[str, str]]] = {
    "cpu": set(QUANT_OPS),
    "cuda": {
        ("", "QuantizeLinear"),
        ("", "DequantizeLinear"),
        (MS, "QuantizeLinear"),
        (MS, "DequantizeLinear"),
        (MS, "MatMulNBits"),
        (MS, "GatherBlockQuantized"),
    },
    "tensorrt": {("", "QuantizeLinear"), ("", "DequantizeLinear")},
}
ADVICE = {
    "cuda": "use --mode static (QDQ format) or --mode weight-only for CUDA",
    "tensorrt": (
        "use --mode static (QDQ, symmetric int8) or --mode weight-only --int4-format qdq "
        "for TensorRT"
    ),
    "cpu": "",
}
# TensorRT reads Q/DQ of these element types only (int4 for block-wise weights).
TRT_QDQ_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT4, onnx.TensorProto.FLOAT8E4M3FN}


def _domain(node: onnx.NodeProto) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def unsupported_ops(model: onnx.ModelProto, target: str) -> Counter[str]:
    """Quantized ops of the model the target provider cannot run, by name, with counts."""
    allowed = SUPPORTED[target]
    found: Counter[str] = Counter()
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            key = (_domain(node), node.op_type)
            if key in QUANT_OPS and key not in allowed:
                found[f"{key[0]}.{key[1]}" if key[0] else key[1]] += 1
    return found


def _zero_point(
    node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]
) -> onnx.TensorProto | None:
    if len(node.input) > 2 and node.input[2]:
        return constants.get(node.input[2])
    return None


def asymmetric_qdq(model: onnx.ModelProto) -> list[str]:
    """Q/DQ nodes TensorRT refuses: a type other than int8/int4/fp8, or a non-zero zero point."""
    problems = []
    for graph in iter_graphs(model.graph):
        constants = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                continue
            label = node.name or node.op_type
            data = constants.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
            zp = _zero_point(node, constants)
            for tensor, what in ((data, "input"), (zp, "zero point")):
                if tensor is not None and tensor.data_type not in TRT_QDQ_TYPES:
                    type_name = onnx.TensorProto.DataType.Name(tensor.data_type).lower()
                    problems.append(f"{label}: {type_name} {what}")
                    break
            else:
                if zp is not None and np.any(tensor_array(zp).astype(np.float32)):
                    problems.append(f"{label}: non-zero zero point")
    return problems


def check_target(model: onnx.ModelProto, target: str, where: str = "quantized model") -> None:
    """Raise a one-line error if the target provider cannot run the quantized ops."""
    missing = unsupported_ops(model, target)
    if missing:
        ops = ", ".join(f"{op} ({n})" for op, n in sorted(missing.items()))
        raise OptimodelError(
            f"{where}: uses {ops}, which the {target} provider has no kernels for; {ADVICE[target]}"
        )
    if target == "tensorrt":
        problems = asymmetric_qdq(model)
        if problems:
            raise OptimodelError(
                f"{where}: TensorRT takes symmetric int8 Q/DQ only, found {len(problems)} "
                f"that are not ({'; '.join(problems[:3])}); {ADVICE['tensorrt']}"
            )

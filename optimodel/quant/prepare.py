"""Get a model into the shape ONNX Runtime's quantizers expect, without quant_pre_process.

`quant_pre_process` fails shape inference on most real models we tried and litters the
working folder, so the same ground is covered with optimodel's own passes: `fold` turns
Constant-node weights into initializers (quantize_dynamic crashes on them, quantize_static
leaves them in fp32), `fuse` folds BatchNormalization into Conv, and the opset is converted
with onnx.version_converter where the quantized form needs a newer one: per-channel Q/DQ
needs the `axis` attribute of opset 13, int4 DequantizeLinear needs opset 21. ONNX
Runtime's own fallback only rewrites the opset number, which breaks ops whose signature
changed (Squeeze, Unsqueeze, Split, ReduceSum at 13).
"""

from __future__ import annotations

from typing import Any

import onnx

from optimodel.errors import OptimodelError
from optimodel.graphs import STANDARD_DOMAINS, consumers
from optimodel.modelio import infer_shapes, iter_graphs, tensor_array

# Fuse-pass options that keep its output to standard ops (no com.microsoft fusions that
# the quantizers and TensorRT do not know), when the pass offers them. `hardswish` and
# `affine-conv` are left to the user's own `fuse`: the int8 error of a model such as
# PP-OCRv4 rec moves with activation scales changed in the 5th digit, and its static int8
# output cosine went from 0.9799 with the exported form to 0.9719 (hardswish) and 0.9650
# (affine-conv, which moves which tensor feeds the Conv's QuantizeLinear).
FUSE_PREFERENCES: dict[str, Any] = {
    "preset": "cnn",
    "target": "portable",
    "skip": ["hardswish", "affine-conv"],
}


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), 0)


def fold(model: onnx.ModelProto) -> onnx.ModelProto:
    from optimodel.passes import get_pass

    return get_pass("fold").run(model).model


def fold_batchnorm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """Conv + BatchNormalization -> Conv through the `fuse` pass (CNN patterns only)."""
    from optimodel.passes import available_passes, get_pass

    before = _count(model, "BatchNormalization")
    if before == 0:
        return model, "no BatchNormalization"
    fuse = available_passes()["fuse"]
    options = {k: v for k, v in FUSE_PREFERENCES.items() if k in fuse.defaults}
    try:
        fused = get_pass("fuse", **options).run(model).model
    except OptimodelError:
        raise
    except Exception as exc:  # a fuse bug must not stop quantization: keep the BatchNorms
        return model, f"BatchNormalization kept (fuse failed: {type(exc).__name__})"
    return fused, f"fuse pass: {before - _count(fused, 'BatchNormalization')} folded"


def _count(model: onnx.ModelProto, op: str) -> int:
    return sum(1 for g in iter_graphs(model.graph) for n in g.node if n.op_type == op)


def convert_opset(model: onnx.ModelProto, version: int, why: str) -> onnx.ModelProto:
    """Upgrade the default-domain opset with onnx.version_converter; one-line error if it fails."""
    current = opset_of(model)
    if current >= version:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, version)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises RuntimeError / ValidationError / others
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OptimodelError(
            f"{why} needs opset {version}, and converting this opset {current} model failed: "
            f"{line[:200]}",
            hint="convert the model to a newer opset when exporting it, or drop the option "
            "that needs it",
        ) from exc
    if converted.ir_version < model.ir_version:
        converted.ir_version = model.ir_version
    return fold(converted)  # the converter writes new Constant nodes (axes inputs)


def shape_inference(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """ONNX shape inference; the quantizers need value types, failure is a note not an error."""
    return infer_shapes(model)


def _weight_matmuls(graph: onnx.GraphProto) -> dict[str, tuple[int, int]]:
    """MatMul nodes with a constant 2-D weight as input B: name -> (K, N)."""
    inits = {t.name: t for t in graph.initializer}
    found = {}
    for node in graph.node:
        if node.op_type == "MatMul" and not node.domain and len(node.input) > 1:
            weight = inits.get(node.input[1])
            if weight is not None and len(weight.dims) == 2 and node.name:
                found[node.name] = (int(weight.dims[0]), int(weight.dims[1]))
    return found


def head_matmuls(model: onnx.ModelProto) -> list[str]:
    """LM-head-like MatMuls: the last weight MatMuls before an output, widening K -> N > K.

    A vocabulary or class projection sits after every other weight layer and widens its
    input; int4 there hurts most (ONNX Runtime PR #24384: an int4 lm_head made phi-4-mini
    repeat itself). A narrowing last layer (an FFN down-projection) is an ordinary layer.
    """
    graph = model.graph
    weights = _weight_matmuls(graph)
    if len(weights) < 2:
        return []
    uses = consumers(graph)
    outputs = {o.name for o in graph.output}
    layers = {"MatMul", "Gemm", "Conv", "ConvTranspose"}
    heads = []
    for node in graph.node:
        if node.name not in weights:
            continue
        k, n = weights[node.name]
        if n <= k:
            continue
        stack, seen, last = list(node.output), set(), True
        while stack and last:
            value = stack.pop()
            if value in seen:
                continue
            seen.add(value)
            for user in uses.get(value, []):
                if user.op_type in layers and user.name in weights:
                    last = False
                    break
                stack.extend(user.output)
        reaches_output = bool(seen & outputs)
        if last and reaches_output:
            heads.append(node.name)
    return heads


def name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes unique names: exclusions and reports refer to nodes by name."""
    taken = {n.name for g in iter_graphs(model.graph) for n in g.node if n.name}
    counter = 0
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            if not node.name:
                while f"{node.op_type}_{counter}" in taken:
                    counter += 1
                node.name = f"{node.op_type}_{counter}"
                taken.add(node.name)


def gemm_to_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Gemm with a constant weight -> MatMul (+ Add): ORT's int4 quantizer handles MatMul only.

    Only the plain form (alpha = beta = 1, no transA) is rewritten; transB is applied to the
    stored weight once. The MatMul keeps the Gemm's name so --exclude-node still finds it.
    """
    from onnx import numpy_helper

    graph = model.graph
    inputs = {i.name for i in graph.input}
    inits = {t.name: t for t in graph.initializer if t.name not in inputs}
    readers = consumers(graph)
    new_nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight = inits.get(node.input[1]) if node.op_type == "Gemm" and not node.domain else None
        if (
            weight is None
            or len(weight.dims) != 2
            or attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            new_nodes.append(node)
            continue
        name = weight.name
        if attrs.get("transB", 0):
            array = tensor_array(weight).T.copy()
            name = f"{weight.name}_transposed" if len(readers[weight.name]) > 1 else weight.name
            if name == weight.name:
                weight.CopyFrom(numpy_helper.from_array(array, name))
            else:
                graph.initializer.append(numpy_helper.from_array(array, name))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = f"{node.output[0]}_matmul" if bias else node.output[0]
        new_nodes.append(
            onnx.helper.make_node("MatMul", [node.input[0], name], [product], name=node.name)
        )
        if bias:
            new_nodes.append(
                onnx.helper.make_node(
                    "Add", [product, bias], [node.output[0]], name=f"{node.name}_bias"
                )
            )
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(new_nodes)
    return model, count

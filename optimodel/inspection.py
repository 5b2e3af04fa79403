"""What a model is: signature, ops, parameters, sparsity, MACs, external data, subgraphs.

`inspect_model` returns a plain dict (the JSON of `optimodel inspect --json`); the CLI
renders it as tables. MACs come from shapes that ONNX shape inference resolves after
the model's dynamic input dims are fixed (to `--shape` or 1).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from optimodel.data import model_input_specs, resolve_shape
from optimodel.modelio import (
    FOLDER_KEY,
    count_nodes,
    external_data_files,
    external_folder,
    iter_graphs,
    iter_tensors,
    read_provenance,
    tensor_array,
    tensor_bytes,
)

STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview.training"}
MAC_OPS = {
    "Conv": "conv",
    "ConvInteger": "conv",
    "QLinearConv": "conv",
    "ConvTranspose": "conv_transpose",
    "Gemm": "gemm",
    "MatMul": "matmul",
    "MatMulInteger": "matmul",
    "QLinearMatMul": "matmul",
    "FusedMatMul": "matmul",
    "MatMulNBits": "matmul_nbits",
}
SPARSITY_MIN_ELEMENTS = 64


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _dtype_name(data_type: int) -> str:
    try:
        return helper.tensor_dtype_to_string(data_type).replace("TensorProto.", "").lower()
    except (KeyError, ValueError):
        return f"type{data_type}"


def _signature(values: Any) -> list[dict[str, Any]]:
    result = []
    for value in values:
        ttype = value.type.tensor_type
        dims: list[Any] = []
        if ttype.HasField("shape"):
            for dim in ttype.shape.dim:
                if dim.HasField("dim_value"):
                    dims.append(int(dim.dim_value))
                else:
                    dims.append(dim.dim_param or "?")
        result.append({"name": value.name, "dtype": _dtype_name(ttype.elem_type), "shape": dims})
    return result


def _parameters(model: onnx.ModelProto) -> dict[str, Any]:
    by_dtype: dict[str, dict[str, int]] = {}
    total_elems = total_bytes = zeros = counted = 0
    sparse_tensors = 0
    for tensor in iter_tensors(model):
        elems = math.prod(tensor.dims) if tensor.dims else 1
        nbytes = tensor_bytes(tensor)
        entry = by_dtype.setdefault(
            _dtype_name(tensor.data_type), {"tensors": 0, "elements": 0, "bytes": 0}
        )
        entry["tensors"] += 1
        entry["elements"] += elems
        entry["bytes"] += nbytes
        total_elems += elems
        total_bytes += nbytes
        is_float = tensor.data_type in (
            onnx.TensorProto.FLOAT,
            onnx.TensorProto.FLOAT16,
            onnx.TensorProto.BFLOAT16,
            onnx.TensorProto.DOUBLE,
        )
        # external tensors of a lazily loaded model are read one at a time
        readable = tensor.data_location != onnx.TensorProto.EXTERNAL or external_folder()
        if is_float and elems >= SPARSITY_MIN_ELEMENTS and readable:
            tensor_zeros = int(np.count_nonzero(tensor_array(tensor) == 0))
            zeros += tensor_zeros
            counted += elems
            if tensor_zeros * 2 >= elems:
                sparse_tensors += 1
    return {
        "count": total_elems,
        "bytes": total_bytes,
        "by_dtype": dict(sorted(by_dtype.items(), key=lambda kv: -kv[1]["bytes"])),
        "sparsity": zeros / counted if counted else 0.0,
        "sparse_tensors": sparse_tensors,
    }


def _shape_map(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    shapes: dict[str, list[int | None]] = {}
    for graph in iter_graphs(model.graph):
        for value in [*graph.input, *graph.output, *graph.value_info]:
            ttype = value.type.tensor_type
            if ttype.HasField("shape"):
                shapes[value.name] = [
                    # -1 / 0 (as some exporters write a dynamic dim) count as unknown
                    int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                    for d in ttype.shape.dim
                ]
        for init in graph.initializer:
            shapes[init.name] = list(init.dims)
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        shapes[node.output[0]] = list(attr.t.dims)
    return shapes


def _known(shape: list[int | None] | None) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def node_macs(node: onnx.NodeProto, shapes: dict[str, list[int | None]]) -> int | None:
    kind = MAC_OPS[node.op_type]
    out = shapes.get(node.output[0]) if node.output else None
    if kind == "conv":
        weight_index = 3 if node.op_type == "QLinearConv" else 1
        if len(node.input) <= weight_index:
            return None
        weight = shapes.get(node.input[weight_index])
        if _known(out) and _known(weight):
            return math.prod(out) * math.prod(weight[1:])  # type: ignore[arg-type]
        return None
    if kind == "conv_transpose":
        x, weight = shapes.get(node.input[0]), shapes.get(node.input[1])
        if _known(x) and _known(weight):
            return math.prod(x) * math.prod(weight[1:])  # type: ignore[arg-type]
        return None
    if kind == "gemm":
        a = shapes.get(node.input[0])
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        if _known(out) and _known(a) and len(a) == 2:  # type: ignore[arg-type]
            k = a[0] if trans_a else a[1]  # type: ignore[index]
            return math.prod(out) * int(k)  # type: ignore[arg-type]
        return None
    if kind == "matmul":
        a_index = 0
        a = shapes.get(node.input[a_index])
        if _known(out) and _known(a) and a:
            return math.prod(out) * int(a[-1])  # type: ignore[arg-type,index]
        return None
    if kind == "matmul_nbits":
        k = next((attr.i for attr in node.attribute if attr.name == "K"), None)
        if _known(out) and k:
            return math.prod(out) * int(k)  # type: ignore[arg-type]
        return None
    return None


def _fixed_input_model(
    model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]
) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """A copy of the graph skeleton with dynamic input dims fixed, for shape inference."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    assumed: dict[str, list[int]] = {}
    specs = {s.name: s for s in model_input_specs(model)}
    for value in fixed.graph.input:
        spec = specs.get(value.name)
        if spec is None or not value.type.tensor_type.HasField("shape"):
            continue
        dims = resolve_shape(spec, shapes, 1)
        assumed[value.name] = list(dims)
        for dim, size in zip(value.type.tensor_type.shape.dim, dims, strict=False):
            dim.Clear()
            dim.dim_value = size
    return fixed, assumed


def macs_by_node(
    model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, int]:
    """Multiply-accumulates of each named Conv / Gemm / MatMul of the main graph that resolves."""
    fixed, _ = _fixed_input_model(model, shapes or {})
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError):
        return {}
    known = _shape_map(inferred)
    found = {}
    for node in inferred.graph.node:
        if node.op_type in MAC_OPS and node.name:
            macs = node_macs(node, known)
            if macs is not None:
                found[node.name] = macs
    return found


def estimate_macs(
    model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, Any]:
    """Multiply-accumulates of Conv / Gemm / MatMul (and their quantized forms)."""
    fixed, assumed = _fixed_input_model(model, shapes or {})
    note = None
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as exc:
        inferred = fixed
        note = f"shape inference failed: {str(exc).splitlines()[0] if str(exc) else exc}"
    known = _shape_map(inferred)
    by_op: Counter[str] = Counter()
    unresolved = 0
    for graph in iter_graphs(inferred.graph):
        for node in graph.node:
            if node.op_type not in MAC_OPS:
                continue
            macs = node_macs(node, known)
            if macs is None:
                unresolved += 1
            else:
                by_op[node.op_type] += macs
    result: dict[str, Any] = {
        "total": int(sum(by_op.values())),
        "by_op": dict(by_op.most_common()),
        "assumed_input_shapes": assumed,
        "unresolved_nodes": unresolved,
    }
    if note:
        result["note"] = note
    return result


def _subgraphs(graph: onnx.GraphProto) -> list[dict[str, Any]]:
    found = []
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                total = sum(len(g.node) for g in iter_graphs(sub))
                found.append(
                    {"node": node.name, "op": node.op_type, "attribute": attr.name, "nodes": total}
                )
                found.extend(_subgraphs(sub))
    return found


def inspect_model(
    model: onnx.ModelProto,
    path: str | Path | None = None,
    *,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, Any]:
    """Everything `optimodel inspect` shows, as JSON-ready data."""
    ops: Counter[str] = Counter()
    domains: Counter[str] = Counter()
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            ops[_op_key(node)] += 1
            if node.domain not in STANDARD_DOMAINS:
                domains[node.domain] += 1
    info: dict[str, Any] = {}
    if path is not None:
        source = Path(path)
        files = external_data_files(model, source.parent, source)
        info["path"] = str(source)
        info["file_bytes"] = source.stat().st_size
        info["external_data"] = [
            {
                "file": str(f.relative_to(source.parent.resolve()))
                if f.is_relative_to(source.parent.resolve())
                else f.name,
                "bytes": f.stat().st_size,
            }
            for f in sorted(files)
        ]
        info["total_bytes"] = info["file_bytes"] + sum(e["bytes"] for e in info["external_data"])
    info.update(
        {
            "ir_version": model.ir_version,
            "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
            "producer": " ".join(p for p in (model.producer_name, model.producer_version) if p),
            "inputs": _signature(
                v
                for v in model.graph.input
                if v.name not in {i.name for i in model.graph.initializer}
            ),
            "outputs": _signature(model.graph.output),
            "nodes": len(model.graph.node),
            "nodes_with_subgraphs": count_nodes(model),
            "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
            "parameters": _parameters(model),
            "macs": estimate_macs(model, shapes),
            "custom_domains": dict(domains.most_common()),
            "subgraphs": _subgraphs(model.graph),
            "metadata": {
                p.key: p.value for p in model.metadata_props if p.key != FOLDER_KEY
            },  # the lazy-load folder is optimodel's bookkeeping, not the model's
            "provenance": read_provenance(model),
        }
    )
    return info

"""matmul-add-gemm: MatMul by a constant 2-D weight plus a bias becomes one Gemm.

Gemm takes 2-D inputs only, so the MatMul stays when A has another rank (batched
activations of a transformer); its bias Add is then ONNX Runtime's own MatMul+Add
business. The bias must broadcast to [N] so the output shape cannot change.
"""

from __future__ import annotations

import onnx

from optimodel.fusions import FLOAT_TYPES, GraphView, Pattern, Rewrite, register


@register
class MatMulAddGemm(Pattern):
    name = "matmul-add-gemm"
    group = "common"
    anchors = ("Add",)
    order = 60
    summary = "MatMul(2-D A, constant B) + bias -> Gemm"

    def match(self, view: GraphView, add: onnx.NodeProto) -> Rewrite | str | None:
        if len(add.input) != 2:
            return None
        for side in (0, 1):
            matmul = view.producer(add.input[side], "MatMul")
            if matmul is not None:
                bias_name = add.input[1 - side]
                break
        else:
            return None
        if not view.only_reader(matmul.output[0], add):
            return "MatMul output has other consumers"
        weight = view.const(matmul.input[1])
        if weight is None:
            return "MatMul B is not a constant"
        if weight.ndim != 2:
            return f"MatMul B is {weight.ndim}-D; Gemm takes 2-D B"
        rank = view.rank(matmul.input[0])
        if rank is None:
            return "rank of MatMul A is unknown; MatMul kept"
        if rank != 2:
            return f"MatMul A is {rank}-D; Gemm takes 2-D A, MatMul kept"
        if view.dtype(matmul.input[1]) not in FLOAT_TYPES:
            return "MatMul is not floating point"
        bias = view.const(bias_name)
        if bias is None:
            return "bias is not a constant"
        n = int(weight.shape[1])
        if tuple(bias.shape) not in ((), (1,), (n,), (1, 1), (1, n)):
            return f"bias of shape {list(bias.shape)} does not broadcast to [{n}]"
        if bias.dtype != weight.dtype:
            return "bias dtype differs from the weight's"
        gemm = view.node(
            "Gemm",
            [matmul.input[0], matmul.input[1], bias_name],
            [add.output[0]],
            name=matmul.name or "Gemm",
        )
        return Rewrite(remove=[matmul, add], add=[gemm])

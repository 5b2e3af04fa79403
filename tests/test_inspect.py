"""inspect: every sample model, real figures for params and MACs, JSON and tables."""

from __future__ import annotations

import json

import onnx
import pytest

from optimodel.inspection import estimate_macs, inspect_model
from tests.conftest import SAMPLE_MODELS, SAMPLES, parse_model


@pytest.mark.parametrize("path", SAMPLE_MODELS, ids=lambda p: p.stem)
def test_inspect_every_sample_model_as_json(cli, path):
    result = cli("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    model = onnx.load(str(path))
    assert info["nodes"] == len(model.graph.node)
    assert info["opsets"]["ai.onnx"] == 17
    assert info["parameters"]["count"] > 0
    assert sum(info["ops"].values()) == info["nodes_with_subgraphs"]
    assert info["total_bytes"] == path.stat().st_size


def test_inspect_tables(cli):
    result = cli("inspect", SAMPLES / "digits_cnn.onnx")
    assert result.exit_code == 0
    for text in ("BatchNormalization", "[batch, 1, 8, 8]", "MACs", "Parameters by dtype"):
        assert text in result.stdout


def test_digits_cnn_figures():
    info = inspect_model(onnx.load(str(SAMPLES / "digits_cnn.onnx")))
    # Conv weights + biases + 4 BN x 4 params + Gemm: counted from the tensors themselves.
    model = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    expected = sum(int(onnx.numpy_helper.to_array(t).size) for t in model.graph.initializer)
    assert info["parameters"]["count"] == expected
    assert info["parameters"]["by_dtype"]["float"]["bytes"] == expected * 4
    # MACs at batch 1: 3x3 convs on 8x8 (1->16, 16->16, 16->16) and 4x4 (16->32), Gemm 32x10
    macs = 64 * 16 * 9 + 2 * 64 * 16 * 16 * 9 + 16 * 32 * 16 * 9 + 32 * 10
    assert info["macs"]["total"] == macs
    assert info["macs"]["unresolved_nodes"] == 0


def test_macs_for_matmul_gemm_conv_and_shapes():
    model = parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 16, 16] x, float[N, 8, 32] a) => (float[N, 4, 14, 14] c, float[N, 8, 5] m,
                                                      float[N, 6] g)
        <float[4, 3, 3, 3] w = {...108 zeros}, float[32, 5] b = {...}, float[6, 32] gw = {...}>
        {
            c = Conv(x, w)
            m = MatMul(a, b)
            flat = ReduceMean<axes = [1], keepdims = 0>(a)
            g = Gemm<transB = 1>(flat, gw)
        }""".replace("{...108 zeros}", "{" + ",".join(["0"] * 108) + "}")
        .replace("float[32, 5] b = {...}", "float[32, 5] b = {" + ",".join(["1"] * 160) + "}")
        .replace("float[6, 32] gw = {...}", "float[6, 32] gw = {" + ",".join(["2"] * 192) + "}")
    )
    macs = estimate_macs(model, {"x": (2, 3, 16, 16), "a": (2, 8, 32)})
    assert macs["by_op"]["Conv"] == 2 * 4 * 14 * 14 * 3 * 3 * 3
    assert macs["by_op"]["MatMul"] == 2 * 8 * 5 * 32
    assert macs["by_op"]["Gemm"] == 2 * 6 * 32
    info = inspect_model(model)
    assert info["parameters"]["sparsity"] == pytest.approx(108 / (108 + 160 + 192))


def test_control_flow_subgraphs_and_custom_domain(tmp_path, cli):
    info = inspect_model(onnx.load(str(SAMPLES / "control_flow.onnx")))
    assert {s["op"] for s in info["subgraphs"]} == {"If", "Loop"}
    assert info["nodes_with_subgraphs"] > info["nodes"]
    custom = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        ),
        opset_imports=[
            onnx.helper.make_opsetid("", 17),
            onnx.helper.make_opsetid("com.example", 1),
        ],
    )
    path = tmp_path / "custom.onnx"
    onnx.save(custom, path)
    result = cli("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["custom_domains"] == {"com.example": 1}

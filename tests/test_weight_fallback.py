"""Int8-weight fallback: a layer kept out of int8 runs in float on int8-stored weights.

Real ONNX Runtime sessions: outputs against the float layer, the bytes saved, and the
weights it must leave alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from optimodel.quant.stats import quantization_stats, weight_bytes
from optimodel.quant.weight_fallback import store_weights_int8

RNG = np.random.default_rng(7)


def _model(opset: int = 17) -> onnx.ModelProto:
    """Conv -> Flatten -> Gemm(transB) -> MatMul, one tiny MatMul, one shared weight."""
    inits = [
        numpy_helper.from_array(RNG.normal(size=(48, 3, 3, 3)).astype(np.float32) * 0.3, "cw"),
        numpy_helper.from_array(RNG.normal(size=48).astype(np.float32), "cb"),
        numpy_helper.from_array(RNG.normal(size=(64, 48 * 6 * 6)).astype(np.float32) * 0.03, "gw"),
        numpy_helper.from_array(RNG.normal(size=(64, 64)).astype(np.float32) * 0.1, "mw"),
        numpy_helper.from_array(RNG.normal(size=(64, 8)).astype(np.float32), "tiny"),
        numpy_helper.from_array(RNG.normal(size=(8, 8)).astype(np.float32), "shared"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "gw"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "mw"], ["m"], name="matmul"),
        helper.make_node("MatMul", ["m", "tiny"], ["t"], name="tiny_matmul"),
        helper.make_node("MatMul", ["t", "shared"], ["s1"], name="shared_1"),
        helper.make_node("MatMul", ["s1", "shared"], ["y"], name="shared_2"),
    ]
    graph = helper.make_graph(
        nodes,
        "fallback",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray], name: str) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([name], feed)[0]


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return copy


def test_weights_become_int8_per_channel_and_outputs_stay_close():
    model = _model()
    before = weight_bytes(model)["all"]
    feed = {"x": RNG.normal(size=(2, 3, 6, 6)).astype(np.float32)}
    reference = {n: _run(_with_output(model, n), feed, n) for n in ("c", "g", "m", "y")}
    names = ["conv", "gemm", "matmul", "tiny_matmul", "shared_1", "shared_2"]
    changed = store_weights_int8(model, names)
    onnx.checker.check_model(model, full_check=True)
    assert changed == ["conv", "gemm", "matmul"]  # tiny (512 values) and shared: left alone
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    inits = {t.name: t for t in model.graph.initializer}
    for layer, axis, channels in (("conv", 0, 48), ("gemm", 0, 64), ("matmul", 1, 64)):
        node = next(n for n in model.graph.node if n.name == layer)
        deq = dq[node.input[1]]
        assert next(a.i for a in deq.attribute if a.name == "axis") == axis
        assert inits[deq.input[0]].data_type == TensorProto.INT8
        assert list(inits[deq.input[1]].dims) == [channels]
    assert {"cw", "gw", "mw"}.isdisjoint(inits) and {"tiny", "shared"} <= set(inits)
    after = weight_bytes(model)["all"]
    print(f"\n[weight fallback] layer weight bytes {before:,} -> {after:,}")
    assert after < 0.4 * before
    for name, ref in reference.items():
        got = _run(_with_output(model, name), feed, name)
        cosine = float(np.dot(ref.ravel(), got.ravel()) / np.linalg.norm(ref) / np.linalg.norm(got))
        assert cosine > 0.9995, (name, cosine)
        assert not np.array_equal(ref, got)  # the weights really were rounded
    stats = quantization_stats(model)
    assert stats["quantized_ops"] == {"weight-only Conv": 1, "weight-only Gemm": 1,
                                      "weight-only MatMul": 1}  # fmt: skip


def test_an_all_zero_channel_stays_zero():
    model = _model()
    inits = {t.name: t for t in model.graph.initializer}
    weight = numpy_helper.to_array(inits["mw"]).copy()
    weight[:, 5] = 0.0
    inits["mw"].CopyFrom(numpy_helper.from_array(weight, "mw"))
    store_weights_int8(model, ["matmul"])
    feed = {"x": RNG.normal(size=(2, 3, 6, 6)).astype(np.float32)}
    out = _run(_with_output(model, "m"), feed, "m")
    assert np.isfinite(out).all() and np.all(out[:, 5] == 0.0)


def test_before_opset_13_nothing_changes():
    """Per-channel DequantizeLinear needs opset 13: older models keep their float weights."""
    model = _model(opset=12)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    assert store_weights_int8(model, ["conv", "gemm", "matmul"]) == []
    assert model == copy

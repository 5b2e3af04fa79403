"""fold: what it removes, that outputs stay identical, the size cap, idempotence, safety."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from optimodel.data import load_data, model_input_specs
from optimodel.errors import VerificationError
from optimodel.passes import Pass, PassResult, get_pass
from optimodel.pipeline import run_passes
from tests.conftest import SAMPLE_MODELS, SAMPLES, parse_model, sha256


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _feeds(model: onnx.ModelProto, n: int = 3, **shapes) -> list:
    return list(load_data("random", model_input_specs(model), shapes=shapes, num_samples=n))


@pytest.mark.parametrize("path", SAMPLE_MODELS, ids=lambda p: p.stem)
def test_fold_keeps_every_sample_model_identical_and_is_idempotent(path):
    model = onnx.load(str(path))
    feeds = _feeds(model)
    once, records = run_passes(model, [get_pass("fold")], batches=feeds)
    assert records[0].status == "ok"
    for batch in feeds:
        for a, b in zip(_run(model, batch.feed), _run(once, batch.feed), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    twice = get_pass("fold").run(once).model
    assert len(twice.graph.node) == len(once.graph.node)
    assert sum(len(t.raw_data) for t in twice.graph.initializer) == sum(
        len(t.raw_data) for t in once.graph.initializer
    )


def test_fold_cleans_the_foldable_sample():
    model = onnx.load(str(SAMPLES / "foldable.onnx"))
    result = get_pass("fold").run(model)
    ops = _ops(result.model)
    for gone in ("Constant", "Identity", "Dropout", "Cast", "ConstantOfShape", "Expand"):
        assert ops[gone] == 0, (gone, ops)
    assert len(result.model.graph.node) < len(model.graph.node) / 2
    names = {t.name for t in result.model.graph.initializer}
    assert "unused_weight" not in names
    assert result.stats["removed_Dropout"] == 1 and result.stats["removed_Identity"] == 1
    # the model's stored bytes shrink too (dead + duplicate initializers gone)
    assert result.model.ByteSize() < model.ByteSize() / 2


def test_static_shape_chain_resolves():
    model = parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 6, 4] x) => (float[2, 24] y)
        <int64[1] axes0 = {0}>
        {
            s = Shape(x)
            i0 = Constant<value = int64 {0}>()
            d0 = Gather<axis = 0>(s, i0)
            u = Unsqueeze(d0, axes0)
            minus = Constant<value = int64[1] {-1}>()
            shape = Concat<axis = 0>(u, minus)
            y = Reshape(x, shape)
        }"""
    )
    result = get_pass("fold").run(model).model
    assert _ops(result) == Counter({"Reshape": 1})
    x = np.arange(48, dtype=np.float32).reshape(2, 6, 4)
    np.testing.assert_array_equal(_run(result, {"x": x})[0], x.reshape(2, 24))


def test_dynamic_dims_keep_their_shape_nodes_but_static_gathers_fold():
    model = parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 6, 4] x) => (float[N, 24] y)
        <int64 i0 = {0}, int64 i1 = {1}, int64 i2 = {2}, int64[1] ax = {0}>
        {
            s = Shape(x)
            d0 = Gather<axis = 0>(s, i0)
            d1 = Gather<axis = 0>(s, i1)
            d2 = Gather<axis = 0>(s, i2)
            m = Mul(d1, d2)
            u0 = Unsqueeze(d0, ax)
            u1 = Unsqueeze(m, ax)
            shape = Concat<axis = 0>(u0, u1)
            y = Reshape(x, shape)
        }"""
    )
    result = get_pass("fold").run(model).model
    ops = _ops(result)
    assert ops["Mul"] == 0 and ops["Gather"] == 1  # 6*4 folded; the batch dim stays dynamic
    x = np.ones((3, 6, 4), dtype=np.float32)
    np.testing.assert_array_equal(_run(result, {"x": x})[0], x.reshape(3, 24))


def test_net_size_cap_never_bloats_and_small_results_fold():
    model = parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 1024] x) => (float[N, 1024] y, float[N, 1024] z)
        <int64[2] shape = {1024, 1024}, int64[1] axes = {0}>
        {
            big = ConstantOfShape<value = float[1] {0.5}>(shape)
            s = ReduceSum<keepdims = 1>(big, axes)
            y = Add(x, s)
            z = Add(x, big)
        }"""
    )
    capped = get_pass("fold").run(model)
    ops = _ops(capped.model)
    assert ops["ConstantOfShape"] == 1  # 4 MB constant not materialized
    assert ops["ReduceSum"] == 0  # its small reduction still folded
    assert capped.model.ByteSize() < 64 * 1024
    assert capped.stats["kept_to_cap_size"] >= 1
    uncapped = get_pass("fold", max_constant_bytes=1 << 30).run(model)
    assert _ops(uncapped.model)["ConstantOfShape"] == 0
    assert uncapped.model.ByteSize() > 4 * 1024 * 1024
    x = np.random.default_rng(0).random((1, 1024), dtype=np.float32)
    for out in (capped.model, uncapped.model):
        y, z = _run(out, {"x": x})
        np.testing.assert_allclose(y, x + 512.0, rtol=1e-6)
        np.testing.assert_allclose(z, np.broadcast_to(x + 0.5, (1024, 1024)), rtol=1e-6)


def test_quantized_and_custom_ops_are_left_alone():
    weight = numpy_helper.from_array(np.arange(-8, 8, dtype=np.int8).reshape(4, 4), "wq")
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("DequantizeLinear", ["wq", "scale", "zp"], ["w"]),
            onnx.helper.make_node("MatMul", ["x", "w"], ["h"]),
            onnx.helper.make_node("Fancy", ["h"], ["y"], domain="com.example"),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
        [
            weight,
            numpy_helper.from_array(np.array(0.1, np.float32), "scale"),
            numpy_helper.from_array(np.array(0, np.int8), "zp"),
        ],
    )
    model = onnx.helper.make_model(
        graph,
        opset_imports=[
            onnx.helper.make_opsetid("", 17),
            onnx.helper.make_opsetid("com.example", 1),
        ],
    )
    result = get_pass("fold").run(model).model
    assert [n.op_type for n in result.graph.node] == ["DequantizeLinear", "MatMul", "Fancy"]
    assert result.graph.initializer[0].data_type == onnx.TensorProto.INT8


def test_custom_op_model_folds_unverified_with_a_note(cli, tmp_path):
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Identity", ["x"], ["a"]),
            onnx.helper.make_node("Fancy", ["a"], ["y"], domain="com.example"),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = onnx.helper.make_model(
        graph,
        opset_imports=[
            onnx.helper.make_opsetid("", 17),
            onnx.helper.make_opsetid("com.example", 1),
        ],
    )
    src = tmp_path / "custom.onnx"
    onnx.save(model, src)
    report = tmp_path / "r.json"
    result = cli("fold", src, "-o", tmp_path / "out.onnx", "--report", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert any("verification skipped" in m for m in data["messages"])
    assert [n.op_type for n in onnx.load(str(tmp_path / "out.onnx")).graph.node] == ["Fancy"]


class _BreakWeights(Pass):
    name = "test-break-weights"

    def run(self, model):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        init = copy.graph.initializer[0]
        arr = numpy_helper.to_array(init) * 2
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
        return PassResult(copy, True)


class _Slow(Pass):
    name = "test-slow"

    def run(self, model):
        import time

        deadline = time.perf_counter() + 5
        while time.perf_counter() < deadline:
            pass
        return PassResult(model, False)


def test_divergence_names_the_pass():
    model = onnx.load(str(SAMPLES / "mlp.onnx"))
    with pytest.raises(VerificationError, match="test-break-weights"):
        run_passes(model, [get_pass("fold"), _BreakWeights()], batches=_feeds(model))


def test_pass_timeout_skips_the_pass_and_keeps_going():
    model = onnx.load(str(SAMPLES / "foldable.onnx"))
    out, records = run_passes(
        model, [_Slow(), get_pass("fold")], batches=_feeds(model), pass_timeout=0.2
    )
    assert records[0].status == "skipped" and "budget" in records[0].reason
    assert records[0].seconds < 2
    assert records[1].status == "ok" and len(out.graph.node) < len(model.graph.node)


def test_fold_cli_writes_verified_output_with_provenance(cli, tmp_path):
    src = SAMPLES / "foldable.onnx"
    before = sha256(src)
    out = tmp_path / "folded.onnx"
    report = tmp_path / "fold.json"
    result = cli("fold", src, "-o", out, "--report", report)
    assert result.exit_code == 0, result.output
    assert sha256(src) == before
    data = json.loads(report.read_text())
    assert data["passes"][0]["name"] == "fold"
    assert data["verification"]["ok"] and data["verification"]["outputs"][0]["max_abs"] == 0
    assert data["output_model"]["nodes"] < data["input_model"]["nodes"]
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["optimodel.passes"] == "fold"
    again = cli("fold", src, "-o", out)
    assert again.exit_code == 1 and "--force" in again.output
    same = cli("fold", src, "-o", src, "--force")
    assert same.exit_code == 1 and "overwrite the input" in same.output
    assert sha256(src) == before

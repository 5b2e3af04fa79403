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


class _SeesItsBytes(Pass):
    """Records the bytes the pipeline registered for its input, then changes a weight."""

    name = "test-sees-bytes"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes | None, bytes]] = []

    def run(self, model):
        from optimodel.modelio import registered_bytes

        self.seen.append((registered_bytes(model), model.SerializeToString()))
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        copy.producer_version = f"{copy.producer_version}+"
        return PassResult(copy, True)


def test_each_pass_gets_its_inputs_checked_bytes_and_they_are_its_own():
    """The pipeline hands a pass the bytes it checked its input with (no second
    serialization); they must be exactly that model's, after every accepted pass."""
    model = onnx.load(str(SAMPLES / "foldable.onnx"))
    spy = _SeesItsBytes()
    payload = model.SerializeToString()
    run_passes(model, [get_pass("fold"), spy, spy], batches=_feeds(model), payload=payload)
    assert len(spy.seen) == 2
    for registered, actual in spy.seen:
        assert registered is not None and registered == actual


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


# ----------------------------------------------------------- If / Loop / Scan bodies


def _body(graph: onnx.GraphProto, op: str, name: str = "body") -> onnx.GraphProto:
    """The `name` graph attribute of the first `op` node of `graph`."""
    node = next(n for n in graph.node if n.op_type == op)
    return next(a.g for a in node.attribute if a.name == name)


def _body_ops(graph: onnx.GraphProto) -> Counter[str]:
    return Counter(n.op_type for n in graph.node)


def _producer(graph: onnx.GraphProto, output: str) -> onnx.NodeProto | None:
    return next((n for n in graph.node if output in n.output), None)


def _assert_same_outputs(
    original: onnx.ModelProto, folded: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]
) -> None:
    onnx.checker.check_model(folded, full_check=True)
    for feed in feeds:
        for a, b in zip(_run(original, feed), _run(folded, feed), strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


IF_MODEL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y)
<float[4] bias = {1, 2, 3, 4}, float[2, 3] grid = {1, 2, 3, 4, 5, 6}, float zero = {0}>
{
    s = ReduceSum<keepdims = 0>(x)
    c = Greater(s, zero)
    y = If(c) <
        then_branch = then_g () => (float[N, 4] t_out)
        <float[4] a = {0.5, 1.5, -2, 3}, float[4] b = {2, 2, 0.25, -1}, int64 idx = {1}>
        {
            m = Mul(a, b)
            shp = Shape(grid)
            d = Gather<axis = 0>(shp, idx)
            df = Cast<to = 1>(d)
            ob = Add(bias, a)
            scaled = Mul(m, df)
            k = Add(scaled, ob)
            t_out = Mul(x, k)
        },
        else_branch = else_g () => (float[N, 4] e_out)
        <int32[4] ints = {1, -2, 3, -4}>
        {
            f = Cast<to = 1>(ints)
            two = Constant<value = float {2}>()
            g2 = Mul(f, two)
            e_out = Sub(x, g2)
        }
    >
}"""


def test_if_branches_fold_body_outer_and_shape_constants():
    model = parse_model(IF_MODEL)
    result = get_pass("fold").run(model)
    then_g = _body(result.model.graph, "If", "then_branch")
    else_g = _body(result.model.graph, "If", "else_branch")
    assert _body_ops(then_g) == Counter({"Mul": 1})  # only the product with run-time x
    assert _body_ops(else_g) == Counter({"Sub": 1})
    assert result.stats["subgraph_nodes_folded"] == 9
    assert result.stats["folded_Shape"] == 1 and result.stats["folded_Cast"] == 2
    # the constants the folded nodes read are gone: body ones and the outer ones alike
    assert [t.name for t in then_g.initializer] == ["k"]
    assert [t.name for t in else_g.initializer] == ["g2"]
    assert {t.name for t in result.model.graph.initializer} == {"zero"}
    np.testing.assert_array_equal(
        numpy_helper.to_array(then_g.initializer[0]),
        np.array([0.5, 1.5, -2, 3]) * [2, 2, 0.25, -1] * 3 + np.array([1.5, 3.5, 1, 7]),
    )
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((3, 4), dtype=np.float32) for _ in range(4)]
    xs += [-x for x in xs]  # both branches taken
    assert {bool(x.sum() > 0) for x in xs} == {True, False}
    _assert_same_outputs(model, result.model, [{"x": x} for x in xs])


LOOP_MODEL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x, int64 trips) => (float[N, 4] y, float[4] acc_final, float[K, 4] steps)
<float[4] w = {0.25, -0.5, 1, 2}, float[4] start = {0, 0, 0, 0}, bool go = {1},
 float[3, 5] box = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}>
{
    y, acc_final, steps = Loop(trips, go, x, start) <body = loop_body
        (int64 i, bool cond, float[N, 4] h, float[4] acc)
        => (bool cond_out, float[N, 4] h_out, float[4] acc_out, float[4] step)
        <float[4] u = {1, 2, 3, 4}, float[4] v = {0.5, 0.25, -1, 0.125}, float one = {1},
         int64 zero_i = {0}>
        {
            uv = Mul(u, v)
            wu = Add(w, uv)
            sb = Shape(box)
            n0 = Gather<axis = 0>(sb, zero_i)
            n0f = Cast<to = 1>(n0)
            k = Mul(wu, n0f)
            fi = Cast<to = 1>(i)
            acc_out = Add(acc, one)
            later = Greater(i, zero_i)
            inner = If(later) <
                then_branch = inner_then () => (float[4] tk) {
                    c1 = Mul(w, u)
                    c2 = Sub(c1, k)
                    tk = Add(acc, c2)
                },
                else_branch = inner_else () => (float[4] ek) {
                    c3 = Neg(w)
                    ek = Mul(acc, c3)
                }
            >
            hk = Mul(h, k)
            h_out = Add(hk, inner)
            step = Mul(inner, fi)
            cond_out = Identity(cond)
        }>
}"""


def test_loop_body_and_nested_if_fold_but_formal_inputs_and_carried_state_stay():
    model = parse_model(LOOP_MODEL)
    result = get_pass("fold").run(model)
    body = _body(result.model.graph, "Loop")
    inner_then = _body(body, "If", "then_branch")
    inner_else = _body(body, "If", "else_branch")
    for gone in ("Shape", "Gather", "Neg"):
        assert _body_ops(body)[gone] == 0, gone
    assert {t.name for t in body.initializer} == {"k", "zero_i", "one"}
    # the nested If reads the Loop body's folded `k` and the main graph's `w`
    assert _body_ops(inner_then) == Counter({"Add": 1}) and _producer(inner_then, "c2") is None
    assert [t.name for t in inner_then.initializer] == ["c2"]
    assert _body_ops(inner_else) == Counter({"Mul": 1})
    # iteration number, condition and carried state are run-time values, never constants
    for name, op in (("fi", "Cast"), ("acc_out", "Add"), ("later", "Greater"), ("step", "Mul")):
        node = _producer(body, name)
        assert node is not None and node.op_type == op, name
    assert _producer(body, "cond_out") is not None
    formal = {i.name for i in body.input}
    assert not formal & {t.name for t in body.initializer}
    assert result.stats["subgraph_nodes_folded"] == 9
    rng = np.random.default_rng(1)
    feeds = [
        {"x": rng.standard_normal((2, 4), dtype=np.float32), "trips": np.array(n, np.int64)}
        for n in (1, 2, 3, 5)
    ]
    _assert_same_outputs(model, result.model, feeds)
    again = get_pass("fold").run(result.model)
    assert "subgraph_nodes_folded" not in again.stats


def test_scan_body_folds_constants_but_not_state_or_scanned_slices():
    model = parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] xs) => (float[4] total, float[N, 4] ys)
        <float[4] init = {0, 0, 0, 0}, float[4] gain = {1, -2, 3, 0.5}>
        {
            total, ys = Scan<num_scan_inputs = 1, body = scan_body
                (float[4] s, float[4] row) => (float[4] s_out, float[4] y_row)
                <float[4] half = {0.5, 0.5, 0.5, 0.5}>
                {
                    g2 = Mul(gain, half)
                    sq = Mul(g2, g2)
                    s_out = Add(s, row)
                    y_row = Mul(row, sq)
                }>(init, xs)
        }"""
    )
    result = get_pass("fold").run(model)
    body = _body(result.model.graph, "Scan")
    assert _body_ops(body) == Counter({"Add": 1, "Mul": 1})
    assert _producer(body, "s_out").input[:] == ["s", "row"]
    assert [t.name for t in body.initializer] == ["sq"]
    assert result.stats["subgraph_nodes_folded"] == 2
    rng = np.random.default_rng(2)
    feeds = [{"xs": rng.standard_normal((n, 4), dtype=np.float32)} for n in (1, 3, 6)]
    _assert_same_outputs(model, result.model, feeds)


def test_body_never_folds_an_overridable_outer_initializer():
    model = parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x, bool c, float scale) => (float[N, 4] y)
        <float scale = {2}>
        {
            y = If(c) <
                then_branch = t () => (float[N, 4] t_out) <float two = {2}> {
                    d = Mul(scale, two)
                    t_out = Mul(x, d)
                },
                else_branch = e () => (float[N, 4] e_out) <float three = {3}> {
                    e_out = Mul(x, three)
                }
            >
        }"""
    )
    result = get_pass("fold").run(model)
    then_g = _body(result.model.graph, "If", "then_branch")
    assert _producer(then_g, "d") is not None
    assert "subgraph_nodes_folded" not in result.stats
    x = np.random.default_rng(3).standard_normal((2, 4), dtype=np.float32)
    feeds = [
        {"x": x, "c": np.array(c), "scale": np.array(s, np.float32)}
        for c in (True, False)
        for s in (2.0, -5.0)
    ]
    _assert_same_outputs(model, result.model, feeds)


def test_body_size_cap_keeps_large_constants_as_nodes():
    model = parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 1024] x, int64 trips) => (float[N, 1024] y)
        <bool go = {1}>
        {
            y = Loop(trips, go, x) <body = b (int64 i, bool c, float[N, 1024] h)
                => (bool c_out, float[N, 1024] h_out)
                <int64[2] shape = {1024, 1024}, int64[1] axes = {0}>
                {
                    big = ConstantOfShape<value = float[1] {0.5}>(shape)
                    s = ReduceSum<keepdims = 1>(big, axes)
                    row = Gather<axis = 0>(big, i)
                    hs = Add(h, s)
                    h_out = Add(hs, row)
                    c_out = Identity(c)
                }>
        }"""
    )
    capped = get_pass("fold").run(model)
    body = _body(capped.model.graph, "Loop")
    assert _body_ops(body)["ConstantOfShape"] == 1 and _body_ops(body)["ReduceSum"] == 0
    assert capped.stats["kept_to_cap_size"] >= 1
    assert capped.model.ByteSize() < 64 * 1024
    uncapped = get_pass("fold", max_constant_bytes=1 << 30).run(model)
    assert _body_ops(_body(uncapped.model.graph, "Loop"))["ConstantOfShape"] == 0
    rng = np.random.default_rng(4)
    feeds = [
        {"x": rng.standard_normal((1, 1024), dtype=np.float32), "trips": np.array(n, np.int64)}
        for n in (1, 3)
    ]
    for out in (capped.model, uncapped.model):
        _assert_same_outputs(model, out, feeds)


def test_control_flow_sample_folds_with_identical_outputs():
    model = onnx.load(str(SAMPLES / "control_flow.onnx"))
    result = get_pass("fold").run(model)
    out = result.model
    assert _producer(_body(out.graph, "Loop"), "loop_relu_out") is not None
    assert [t.name for t in _body(out.graph, "If", "else_branch").initializer] == ["else_weight"]
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((n, 8), dtype=np.float32) for n in (1, 2, 4)]
    for x in [*xs, *(-x for x in xs)]:
        for a, b in zip(_run(model, {"x": x}), _run(out, {"x": x}), strict=True):
            np.testing.assert_array_equal(a, b)

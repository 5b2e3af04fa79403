"""fuse: every pattern fires where it should, declines with a reason where it must not,
keeps outputs equal (ONNX Runtime runs, explicit tolerances) and is idempotent."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import typer
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from optimodel.errors import UsageError
from optimodel.fusions import Pattern
from optimodel.passes import get_pass
from optimodel.pipeline import run_passes
from optimodel.transform import transform_file
from tests.conftest import SAMPLE_MODELS, SAMPLES, parse_model

RNG = np.random.default_rng(0)
F = TensorProto.FLOAT


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feed: dict, tol: float = 1e-5) -> None:
    for x, y in zip(_run(a, feed), _run(b, feed), strict=True):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _model(nodes, inputs, outputs, inits=(), opset: int = 17, extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8 if opset < 21 else 10
    onnx.checker.check_model(model)
    return model


def _fuse(model: onnx.ModelProto, **options):
    return get_pass("fuse", **options).run(model)


def _x(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _reasons(result, pattern: str) -> list[str]:
    return [d["reason"] for d in result.declined if d["pattern"] == pattern]


# -- CNN patterns ------------------------------------------------------------------------------


def _conv_bn(consumers: int = 1, transpose: bool = False, constant_nodes: bool = False):
    op = "ConvTranspose" if transpose else "Conv"
    w_shape = (3, 4, 3, 3) if transpose else (4, 3, 3, 3)
    weights = {
        "W": _x(*w_shape),
        "B": _x(4),
        "scale": RNG.uniform(0.5, 2, 4).astype(np.float32),
        "bias": _x(4),
        "mean": _x(4),
        "var": RNG.uniform(0.5, 2, 4).astype(np.float32),
    }
    nodes = [
        helper.make_node(op, ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"], name="bn"
        ),
    ]
    outputs = [helper.make_tensor_value_info("y", F, ["N", 4, 6, 6])]
    if consumers == 2:
        nodes.append(helper.make_node("Relu", ["c"], ["r"], name="relu"))
        outputs.append(helper.make_tensor_value_info("r", F, ["N", 4, 6, 6]))
    inits = [_const(k, v) for k, v in weights.items()]
    if constant_nodes:  # unfolded export: weights as Constant nodes
        nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in inits] + nodes
        inits = []
    inputs = [helper.make_tensor_value_info("x", F, ["N", 3, 6, 6])]
    return _model(nodes, inputs, outputs, inits)


@pytest.mark.parametrize("transpose", [False, True], ids=["conv", "conv-transpose"])
@pytest.mark.parametrize("constant_nodes", [False, True], ids=["initializers", "constants"])
def test_conv_bn_folds_into_the_weights(transpose, constant_nodes):
    model = _conv_bn(transpose=transpose, constant_nodes=constant_nodes)
    result = _fuse(model)
    assert result.modified and result.stats["fired"]["conv-bn"] == 1
    ops = _ops(result.model)
    assert ops["BatchNormalization"] == 0 and ops["ConvTranspose" if transpose else "Conv"] == 1
    assert ops["Constant"] == 0  # the old weights went with the BN
    _same_outputs(model, result.model, {"x": _x(2, 3, 6, 6)})


def test_conv_bn_declines_when_the_conv_output_is_shared_and_can_be_skipped():
    shared = _fuse(_conv_bn(consumers=2))
    assert not shared.modified and _ops(shared.model)["BatchNormalization"] == 1
    assert _reasons(shared, "conv-bn") == ["Conv output has other consumers"]
    skipped = _fuse(_conv_bn(), skip=["conv-bn"])
    assert not skipped.modified and _ops(skipped.model)["BatchNormalization"] == 1
    assert "conv-bn" not in skipped.stats["fired"]


def _conv_then(op: str, const: np.ndarray, second: tuple[str, np.ndarray] | None = None):
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node(op, ["c", "k"], ["m" if second else "y"], name="op"),
    ]
    inits = [_const("W", _x(4, 3, 1, 1)), _const("k", const)]
    if second:
        nodes.append(helper.make_node(second[0], ["m", "k2"], ["y"], name="op2"))
        inits.append(_const("k2", second[1]))
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F, ["N", 3, 5, 5])],
        [helper.make_tensor_value_info("y", F, ["N", 4, 5, 5])],
        inits,
    )


def test_conv_mul_add_folds_per_channel_constants():
    model = _conv_then(
        "Mul", RNG.uniform(0.5, 2, (4, 1, 1)).astype(np.float32), ("Add", _x(1, 4, 1, 1))
    )
    result = _fuse(model)
    assert _ops(result.model) == Counter({"Conv": 1})
    assert result.stats["fired"]["conv-mul-add"] == 2  # the Add joins in a second round
    _same_outputs(model, result.model, {"x": _x(2, 3, 5, 5)})
    for op, value in (("Sub", np.float32(0.25)), ("Div", np.full((4, 1, 1), 3, np.float32))):
        single = _conv_then(op, value)
        fused = _fuse(single)
        assert _ops(fused.model) == Counter({"Conv": 1}), op
        _same_outputs(single, fused.model, {"x": _x(1, 3, 5, 5)})


def test_conv_mul_add_declines_spatial_constants():
    result = _fuse(_conv_then("Mul", _x(1, 1, 5, 5)))
    assert not result.modified
    assert _reasons(result, "conv-mul-add") == ["constant of shape [1, 1, 5, 5] is not per-channel"]


@pytest.mark.parametrize("op", ["Add", "Mul", "Sub", "Div"])
def test_conv_transpose_mul_add_folds_the_bias_and_lets_bn_follow(op):
    """Paddle2ONNX's ConvTranspose -> Add(bias) -> BatchNormalization becomes one node."""
    const = RNG.uniform(0.5, 2, (1, 4, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("ConvTranspose", ["x", "W"], ["c"], name="up", strides=[2, 2], group=2),
        helper.make_node(op, ["c", "k"], ["a"], name="bias"),
        helper.make_node("BatchNormalization", ["a", "s", "b", "m", "v"], ["y"], name="bn"),
    ]
    inits = [
        _const("W", _x(4, 2, 2, 2)),  # [C_in, C_out / group, k, k]: 4 output channels
        _const("k", const),
        _const("s", RNG.uniform(0.5, 2, 4).astype(np.float32)),
        _const("b", _x(4)),
        _const("m", _x(4)),
        _const("v", RNG.uniform(0.5, 2, 4).astype(np.float32)),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F, ["N", 4, 5, 5])],
        [helper.make_tensor_value_info("y", F, ["N", 4, 10, 10])],
        inits,
    )
    result = _fuse(model)
    assert _ops(result.model) == Counter({"ConvTranspose": 1})
    assert result.stats["fired"]["conv-transpose-mul-add"] == 1
    assert result.stats["fired"]["conv-bn"] == 1
    _same_outputs(model, result.model, {"x": _x(2, 4, 5, 5)})
    out = helper.make_tensor_value_info("a", F, ["N", 4, 10, 10])
    spatial = _fuse(
        _model(nodes[:2], model.graph.input, [out], [inits[0], _const("k", _x(10, 10))])
    )
    assert not spatial.modified
    assert _reasons(spatial, "conv-transpose-mul-add") == [
        "constant of shape [10, 10] is not per-channel"
    ]


def _conv_act(op: str, inputs_extra=(), shared: bool = False, **attrs):
    weight = _const("W", RNG.standard_normal((6, 3, 3, 3)).astype(np.float32))
    bias = _const("B", RNG.standard_normal(6).astype(np.float32))
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(op, ["c", *[i.name for i in inputs_extra]], ["y"], name="act", **attrs),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])]
    if shared:
        nodes.append(helper.make_node("Neg", ["c"], ["z"], name="other"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 6, 8, 8]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    return _model(nodes, [x], outputs, [weight, bias, *inputs_extra])


@pytest.mark.parametrize("op", ["Relu", "HardSigmoid"])
def test_conv_activation_stays_standard_by_default(op):
    """No offline FusedConv unless asked: ORT's CPU provider fuses it at load, its CUDA
    kernel is slower (and refuses HardSigmoid)."""
    model = _conv_act(op, ())
    fused = _fuse(model, target="ort")
    assert _ops(fused.model) == {"Conv": 1, op: 1}
    assert "conv-activation" in fused.stats["off_by_default"]


CONV_ACTIVATIONS = [
    ("Relu", (), {}),
    ("Sigmoid", (), {}),
    ("Tanh", (), {}),
    ("LeakyRelu", (), {"alpha": 0.2}),
    ("HardSigmoid", (), {"alpha": 1 / 6, "beta": 0.5}),
    ("Clip", (_const("lo", np.float32(0.0)), _const("hi", np.float32(6.0))), {}),
    ("Clip", (_const("lo", np.float32(-0.5)),), {}),  # no upper bound
]


@pytest.mark.parametrize(("op", "extra", "attrs"), CONV_ACTIVATIONS)
def test_conv_activation_enabled_writes_fused_conv_with_the_same_outputs(op, extra, attrs):
    model = _conv_act(op, extra, **attrs)
    result = _fuse(model, target="ort", enable=["conv-activation"])
    assert result.stats["fired"]["conv-activation"] == 1
    assert _ops(result.model) == {"FusedConv": 1}
    onnx.checker.check_model(result.model, full_check=True)
    _same_outputs(model, result.model, {"x": _x(1, 3, 8, 8)})
    again = _fuse(result.model, target="ort", enable=["conv-activation"])
    assert not again.modified


def test_conv_activation_declines_what_it_cannot_fuse():
    shared = _fuse(_conv_act("Relu", (), shared=True), target="ort", enable=["conv-activation"])
    assert "FusedConv" not in _ops(shared.model)
    assert _reasons(shared, "conv-activation") == ["the Conv output has other readers"]
    portable = _fuse(_conv_act("Relu", ()), target="portable", enable=["conv-activation"])
    assert "FusedConv" not in _ops(portable.model)
    assert portable.stats["warnings"] == [
        "--enable conv-activation: it writes com.microsoft ops, so it runs with --target ort only"
    ]


def test_shapes_are_inferred_through_fused_conv():
    """A Reshape after a FusedConv still gets its constant shape (ONNX inference knows no
    com.microsoft schema: FusedConv stands in as Conv)."""
    weight = _const("W", _x(6, 3, 3, 3))
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Shape", ["r"], ["s"], name="shape"),
        helper.make_node("Reshape", ["r", "s"], ["y"], name="reshape"),
    ]
    x = helper.make_tensor_value_info("x", F, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", F, [1, 6, 8, 8])
    model = _model(nodes, [x], [y], [weight])
    fused = _fuse(model, target="ort", enable=["conv-activation"], skip=["reshape-shape"])
    assert _ops(fused.model) == {"FusedConv": 1, "Shape": 1, "Reshape": 1}
    again = _fuse(fused.model, target="ort")
    assert again.stats["fired"]["reshape-shape"] == 1
    _same_outputs(model, again.model, {"x": _x(1, 3, 8, 8)})


def _fused_conv_model(op: str) -> onnx.ModelProto:
    """Conv + `op` written as one FusedConv, as ONNX Runtime's own optimizer saves it."""
    params = {"LeakyRelu": [0.1], "HardSigmoid": [0.16666, 0.5], "Clip": [0.0, 6.0]}.get(op)
    extra = {"activation_params": params} if params else {}
    weight = _const("W", RNG.standard_normal((6, 3, 3, 3)).astype(np.float32))
    bias = _const("B", RNG.standard_normal(6).astype(np.float32))
    node = helper.make_node(
        "FusedConv",
        ["x", "W", "B"],
        ["y"],
        name="conv",
        domain="com.microsoft",
        pads=[1, 1, 1, 1],
        activation=op,
        **extra,
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])
    ms = [helper.make_opsetid("com.microsoft", 1)]
    return _model([node], [x], [y], [weight, bias], extra_opsets=ms)


@pytest.mark.parametrize("op", ["Relu", "HardSigmoid", "Clip", "LeakyRelu"])
def test_fused_conv_expands_back_for_passes_that_read_conv(op):
    from optimodel.fusions.fused_conv import expand_fused_conv

    fused = _fused_conv_model(op)
    expanded = onnx.ModelProto()
    expanded.CopyFrom(fused)
    assert expand_fused_conv(expanded) == 1
    assert _ops(expanded) == {"Conv": 1, op: 1}
    onnx.checker.check_model(expanded, full_check=True)
    _same_outputs(fused, expanded, {"x": _x(1, 3, 8, 8)})


def test_fp16_expands_fused_conv_first():
    """FusedConv's CPU kernel is float32 only and its CUDA one runs Relu alone, so fp16
    converts the standard Conv + activation instead."""
    fused = _fused_conv_model("HardSigmoid")
    result = get_pass("fp16").run(fused)
    assert _ops(result.model) == {"Conv": 1, "HardSigmoid": 1}
    assert result.stats["notes"][0] == "1 FusedConv -> Conv + activation"
    assert _ops(fused) == {"FusedConv": 1}  # the input is left as it was
    x = _x(1, 3, 8, 8)
    assert result.model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    got = _run(result.model, {"x": x.astype(np.float16)})[0].astype(np.float32)
    np.testing.assert_allclose(got, _run(fused, {"x": x})[0], atol=2e-2, rtol=2e-2)


def test_quantize_reads_a_model_saved_by_onnxruntimes_optimizer(tmp_path):
    """FusedConv written by ORT's EXTENDED offline optimizer does not block static int8."""
    saved = tmp_path / "ort_extended.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(saved)
    ort.InferenceSession(
        str(SAMPLES / "digits_cnn.onnx"), options, providers=["CPUExecutionProvider"]
    )
    fused = onnx.load(str(saved))
    assert _ops(fused).get("FusedConv", 0) > 0
    quantized = get_pass("quantize", mode="static", calib_data=str(SAMPLES / "digits_test.npz"))
    result = quantized.run(fused)
    assert result.stats["quantized_total"] > 0 and "FusedConv" not in _ops(result.model)
    data = np.load(SAMPLES / "digits_test.npz", allow_pickle=False)
    model = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    before = _run(model, {"input": data["input"]})[0]
    after = _run(result.model, {"input": data["input"]})[0]
    assert (after.argmax(1) == before.argmax(1)).mean() > 0.97


def _pad_conv(mode: str = "constant", pads=(0, 0, 1, 2, 0, 0, 2, 1), value: float = 0.0):
    nodes = [
        helper.make_node("Pad", ["x", "pads", "v"], ["p"], name="pad", mode=mode),
        helper.make_node("Conv", ["p", "W"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    inits = [
        _const("pads", np.array(pads, np.int64)),
        _const("v", np.array(value, np.float32)),
        _const("W", _x(2, 3, 3, 3)),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", F, ["N", 2, "H", "W"])],
        inits,
    )


def test_pad_conv_merges_zero_spatial_padding():
    model = _pad_conv()
    result = _fuse(model)
    assert _ops(result.model) == Counter({"Conv": 1})
    conv = result.model.graph.node[0]
    assert list(helper.get_attribute_value(conv.attribute[-1])) == [2, 3, 3, 2]
    _same_outputs(model, result.model, {"x": _x(2, 3, 6, 6)})


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"mode": "reflect"}, "Pad mode is not constant"),
        ({"value": 1.0}, "Pad value is not zero"),
        ({"pads": (0, 1, 0, 0, 0, 0, 0, 0)}, "Pad touches the batch or channel axis"),
    ],
)
def test_pad_conv_declines(kwargs, reason):
    result = _fuse(_pad_conv(**kwargs))
    assert not result.modified and _reasons(result, "pad-conv") == [reason]


def test_digits_cnn_fuses_every_batchnorm_with_identical_predictions():
    model = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    result = _fuse(model, target="portable")
    assert result.stats["fired"]["conv-bn"] == 4
    assert _ops(result.model)["BatchNormalization"] == 0
    assert len(result.model.graph.node) == len(model.graph.node) - 4
    data = np.load(SAMPLES / "digits_test.npz", allow_pickle=False)
    before = _run(model, {"input": data["input"]})[0]
    after = _run(result.model, {"input": data["input"]})[0]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
    assert np.array_equal(after.argmax(1), before.argmax(1))
    assert (after.argmax(1) == data["labels"]).mean() == (before.argmax(1) == data["labels"]).mean()


# -- common patterns ---------------------------------------------------------------------------


def _matmul_add(rank: int):
    shape = ["N", 4] if rank == 2 else ["N", "S", 4]
    return _model(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
            helper.make_node("Add", ["m", "b"], ["y"], name="add"),
        ],
        [helper.make_tensor_value_info("x", F, shape)],
        [helper.make_tensor_value_info("y", F, [*shape[:-1], 3])],
        [_const("W", _x(4, 3)), _const("b", _x(3))],
    )


def test_matmul_add_becomes_gemm_for_2d_inputs_only():
    model = _matmul_add(2)
    result = _fuse(model)
    assert _ops(result.model) == Counter({"Gemm": 1})
    _same_outputs(model, result.model, {"x": _x(5, 4)})
    batched = _fuse(_matmul_add(3))
    assert not batched.modified and _ops(batched.model) == Counter({"MatMul": 1, "Add": 1})
    assert _reasons(batched, "matmul-add-gemm") == [
        "MatMul A is 3-D; Gemm takes 2-D A, MatMul kept"
    ]
    assert not _fuse(model, skip="matmul-add-gemm").modified


TRANSPOSES = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 4, 5] x) => (float[N, 4, 5, 3] y, float[N, 3, 4, 5] z)
{{
    a = Transpose<perm = [0, 2, 3, 1]>(x)
    b = Transpose<perm = [0, 2, 1, 3]>(a)
    y = Transpose<perm = [0, 2, 1, 3]>(b)
    c = Transpose<perm = [0, 3, 1, 2]>(y)
    {z}
}}"""


def test_transposes_compose_and_cancel():
    model = parse_model(TRANSPOSES.format(z="z = Relu(c)"))
    result = _fuse(model)
    # a->b->y composes to one Transpose; c cancels it, so Relu reads x directly
    assert _ops(result.model) == Counter({"Transpose": 1, "Relu": 1})
    relu = next(n for n in result.model.graph.node if n.op_type == "Relu")
    assert list(relu.input) == ["x"]
    _same_outputs(model, result.model, {"x": _x(2, 3, 4, 5)})
    # a cancelling pair that ends in a graph output keeps the name through an Identity
    out = parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 4] x) => (float[N, 3, 4] y)
        {
            a = Transpose<perm = [0, 2, 1]>(x)
            y = Transpose<perm = [0, 2, 1]>(a)
        }"""
    )
    cancelled = _fuse(out).model
    assert _ops(cancelled) == Counter({"Identity": 1})
    _same_outputs(out, cancelled, {"x": _x(2, 3, 4)})


def test_reshape_of_reshape_keeps_the_last_unless_it_copies_dims():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 6, 4] x) => (float[M, 12] y)
    <int64[3] s1 = {{-1, 2, 12}}, int64[2] s2 = {shape}>
    {{
        a = Reshape(x, s1)
        y = Reshape(a, s2)
    }}"""
    model = parse_model(text.format(shape="{-1, 12}"))
    result = _fuse(model)
    assert _ops(result.model) == Counter({"Reshape": 1})
    _same_outputs(model, result.model, {"x": _x(3, 6, 4)})
    copying = _fuse(parse_model(text.format(shape="{0, -1}")))
    assert not copying.modified
    assert _reasons(copying, "reshape-reshape") == [
        "outer shape copies a dimension (0) from the inner result"
    ]


def test_reshape_target_built_from_shape_becomes_constant():
    model = parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[B, S, 8] x) => (float[B, S, 2, 4] y)
        <int64 i0 = {0}, int64 i1 = {1}, int64[1] ax = {0}, int64[2] heads = {2, 4}>
        {
            s = Shape(x)
            d0 = Gather(s, i0)
            d1 = Gather(s, i1)
            u0 = Unsqueeze(d0, ax)
            u1 = Unsqueeze(d1, ax)
            shape = Concat<axis = 0>(u0, u1, heads)
            y = Reshape(x, shape)
        }"""
    )
    result = _fuse(model)
    assert _ops(result.model) == Counter({"Reshape": 1})
    target = next(t for t in result.model.graph.initializer if t.dims == [4])
    assert numpy_helper.to_array(target).tolist() == [0, 0, 2, 4]
    for batch, seq in ((1, 1), (3, 7)):
        _same_outputs(model, result.model, {"x": _x(batch, seq, 8)})


RESHAPE_FROM_OTHER_SHAPE = """<ir_version: 8, opset_import: ["" : 17]>
g (float[B, 4, 6] x, float[C, 3] other) => (float[D, M, K] y)
<int64[1] zero = {{0}}, int64[1] one = {{1}}, int32[1] mid = {{{mid}}}, int32[1] last = {{{last}}}>
{{
    s = Shape(other)
    s32 = Cast<to = 6>(s)
    batch = Slice(s32, zero, one, zero)
    shape32 = Concat<axis = 0>(batch, mid, last)
    shape = Cast<to = 7>(shape32)
    y = Reshape(x, shape)
}}"""


def test_reshape_target_with_one_run_time_entry_gets_minus_one():
    """magika (jax2tf): the batch comes from another tensor's Shape, the rest are numbers."""
    model = parse_model(RESHAPE_FROM_OTHER_SHAPE.format(mid=2, last=12))
    result = _fuse(model)
    assert _ops(model)["Reshape"] == 1 and len(model.graph.node) == 6
    assert _ops(result.model) == Counter({"Reshape": 1})
    assert result.stats["fired"]["reshape-infer-dim"] == 1
    target = next(t for t in result.model.graph.initializer if t.dims == [3])
    assert numpy_helper.to_array(target).tolist() == [-1, 2, 12]
    for batch in (1, 3, 0):  # an empty batch reshapes the same way too
        _same_outputs(model, result.model, {"x": _x(batch, 4, 6), "other": _x(batch, 3)})


def test_reshape_target_with_a_zero_entry_keeps_its_run_time_dim():
    """[0, -1, ...] would make ONNX Runtime refuse an empty input the original accepts."""
    result = _fuse(parse_model(RESHAPE_FROM_OTHER_SHAPE.format(mid=0, last=6)))
    assert not result.modified
    assert _reasons(result, "reshape-infer-dim") == [
        "target also holds 0 or -1; -1 beside it would break zero-sized inputs"
    ]


def test_output_identity_merges_into_its_producer():
    model = parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y, float[N, 4] x2)
        {
            r = Relu(x)
            y = Identity(r)
            x2 = Identity(x)
        }"""
    )
    result = _fuse(model)
    assert _ops(result.model) == Counter({"Relu": 1, "Identity": 1})  # input pass-through stays
    _same_outputs(model, result.model, {"x": _x(2, 4)})


# -- transformer patterns ----------------------------------------------------------------------

LAYERNORM = """<ir_version: {ir}, opset_import: ["" : {opset}]>
g (float[B, S, 8] x) => (float[B, S, 8] y)
<float two = {{2.0}}, float eps = {{1e-5}}, float[8] gamma = {{1, 2, 3, 4, 5, 6, 7, 8}},
 float[8] beta = {{0, 1, 0, 1, 0, 1, 0, 1}}>
{{
    mean = ReduceMean<axes = [-1]>(x)
    d = Sub(x, mean)
    sq = Pow(d, two)
    var = ReduceMean<axes = [-1]>(sq)
    ve = Add(var, eps)
    std = Sqrt(ve)
    n = Div(d, std)
    g = Mul(n, gamma)
    y = Add(g, beta)
}}"""


LAYERNORM_VARIANT = (  # squares by Mul, divides by Reciprocal + Mul: the same LayerNorm
    ("sq = Pow(d, two)", "sq = Mul(d, d)"),
    ("n = Div(d, std)", "r = Reciprocal(std)\n    n = Mul(r, d)"),
)


@pytest.mark.parametrize("variant", [False, True], ids=["pow-div", "mul-reciprocal"])
def test_layernorm_becomes_the_standard_op_from_opset_17(variant):
    text = LAYERNORM
    for old, new in LAYERNORM_VARIANT if variant else ():
        text = text.replace(old, new)
    model = parse_model(text.format(ir=8, opset=17))
    for target in ("portable", "ort"):
        result = _fuse(model, target=target)
        assert _ops(result.model) == Counter({"LayerNormalization": 1}), target
        assert result.stats["fired"]["layernorm"] == 1
        _same_outputs(model, result.model, {"x": _x(2, 3, 8)})
    old = _fuse(parse_model(LAYERNORM.format(ir=7, opset=12)), target="portable")
    assert not old.modified
    assert "needs opset 17" in _reasons(old, "layernorm")[0]
    assert not _fuse(model, target="portable", skip=["layernorm"]).modified


GELU_ERF = """<ir_version: 9, opset_import: ["" : {opset}]>
g (float[N, 16] x) => (float[N, 16] y)
<float root2 = {{1.4142135}}, float one = {{1.0}}, float half = {{0.5}}>
{{
    a = Div(x, root2)
    e = Erf(a)
    b = Add(e, one)
    c = Mul(x, b)
    y = Mul(c, half)
}}"""

GELU_TANH = """<ir_version: 9, opset_import: ["" : {opset}]>
g (float[N, 16] x) => (float[N, 16] y)
<float k = {{0.044715}}, float c = {{0.7978845608}}, float one = {{1.0}},
 float half = {{0.5}}>
{{
    x2 = Mul(x, x)
    p = Mul(x2, x)
    q = Mul(k, p)
    s = Add(x, q)
    t = Mul(s, c)
    h = Tanh(t)
    a = Add(h, one)
    hx = Mul(x, half)
    y = Mul(hx, a)
}}"""


@pytest.mark.parametrize("text, approximate", [(GELU_ERF, None), (GELU_TANH, "tanh")])
def test_gelu_forms_become_the_standard_op_from_opset_20(text, approximate):
    model = parse_model(text.format(opset=20))
    result = _fuse(model, preset="transformer", target="portable")
    assert _ops(result.model) == Counter({"Gelu": 1})
    node = result.model.graph.node[0]
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute}.get(
        "approximate", b"none"
    ) == (approximate.encode() if approximate else b"none")
    _same_outputs(model, result.model, {"x": _x(4, 16) * 3})
    old = _fuse(parse_model(text.format(opset=17)), preset="transformer", target="portable")
    assert not old.modified and "needs opset 20" in _reasons(old, "gelu")[0]
    # target ort: ONNX Runtime's own Gelu / FastGelu at any opset
    ort_fused = _fuse(parse_model(text.format(opset=17)), preset="transformer")
    assert _ops(ort_fused.model) == Counter({"FastGelu" if approximate else "Gelu": 1})
    _same_outputs(model, ort_fused.model, {"x": _x(4, 16) * 3}, tol=1e-4)


def _transformer_feed(batch: int = 2, seq: int = 7) -> dict[str, np.ndarray]:
    return {"hidden_states": _x(batch, seq, 64)}


def test_transformer_sample_with_ort_target_fuses_attention_layernorm_and_gelu():
    model = onnx.load(str(SAMPLES / "transformer_block.onnx"))
    result = _fuse(model, target="ort", enable=["skip-layernorm"])
    fired = result.stats["fired"]
    assert fired["layernorm"] == 2 and fired["gelu"] == 1 and fired["attention"] == 1
    assert fired["skip-layernorm"] == 1
    ops = _ops(result.model)
    assert ops["Attention"] == 1 and ops["Softmax"] == 0 and ops["ReduceMean"] == 0
    assert ops["Erf"] == 0
    assert len(result.model.graph.node) < len(model.graph.node) / 5
    assert "warnings" not in result.stats
    domains = {o.domain for o in result.model.opset_import}
    assert "com.microsoft" in domains
    onnx.checker.check_model(result.model)
    for batch, seq in ((1, 1), (2, 7)):
        _same_outputs(model, result.model, _transformer_feed(batch, seq), tol=1e-4)
    # folding first changes nothing about what fuses
    folded = get_pass("fold").run(model).model
    assert _fuse(folded, target="ort", enable=["skip-layernorm"]).stats["fired"] == fired


def test_fused_model_bytes_handed_on_are_the_models_own():
    """fuse hands the pipeline the bytes ONNX Runtime's fusions were checked with, so the
    model is not serialized again; they must be exactly the model's, and a pattern that
    fires afterwards must drop them."""
    from optimodel.modelio import known_bytes, model_bytes, registered_bytes

    model = get_pass("fold").run(onnx.load(str(SAMPLES / "transformer_block.onnx"))).model
    result = _fuse(model, target="ort")
    assert result.stats["fired"]["attention"] == 1
    assert result.payload == result.model.SerializeToString()
    changed = _fuse(model, target="ort", skip=["attention"])  # local patterns fire last
    assert changed.payload is None or changed.payload == changed.model.SerializeToString()
    # the registry answers for the very object only, and only inside the block
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with known_bytes(model, b"registered"):
        assert model_bytes(model) == b"registered" and registered_bytes(copy) is None
    assert registered_bytes(model) is None and model_bytes(model) == model.SerializeToString()


def test_transformer_sample_with_portable_target_uses_standard_ops_only():
    model = onnx.load(str(SAMPLES / "transformer_block.onnx"))
    result = _fuse(model, target="portable")
    assert {n.domain for n in result.model.graph.node} <= {""}
    ops = _ops(result.model)
    assert ops["LayerNormalization"] == 2 and ops["ReduceMean"] == 0
    assert ops["Shape"] == 0 and ops["Gather"] == 0  # reshape targets became constants
    assert any("attention not fused" in w for w in result.stats["warnings"])
    assert "needs opset 20" in _reasons(result, "gelu")[0]  # the sample is opset 17
    _same_outputs(model, result.model, _transformer_feed(), tol=1e-4)


def test_presets_pick_pattern_groups():
    transformer = onnx.load(str(SAMPLES / "transformer_block.onnx"))
    cnn_only = _fuse(transformer, preset="cnn")
    assert cnn_only.stats["groups"] == ["cnn", "common"]
    assert _ops(cnn_only.model)["Attention"] == 0 and _ops(cnn_only.model)["ReduceMean"] == 4
    digits = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    assert _fuse(digits).stats["groups"] == ["cnn", "common"]
    # a classifier head (MatMul by a weight + Softmax) is not attention
    mlp = onnx.load(str(SAMPLES / "mlp.onnx"))
    assert "transformer" not in _fuse(mlp).stats["groups"]


def test_attention_and_layernorm_misses_are_warned_about():
    model = parse_model(LAYERNORM.format(ir=7, opset=12))
    result = _fuse(model, preset="transformer", target="portable")
    warnings = result.stats["warnings"]
    assert any(w.startswith("layernorm fused 0 times: LayerNormalization needs") for w in warnings)
    assert any("attention not fused" in w for w in warnings)


# -- safety ------------------------------------------------------------------------------------


def _qdq_and_custom():
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "scale", "zp"], ["w"], name="dq"),
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node(
            "BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"], name="bn", epsilon=1e-3
        ),
        helper.make_node("Transpose", ["bn"], ["t"], name="t", perm=[0, 2, 3, 1]),
        helper.make_node("Fancy", ["t"], ["f"], name="fancy", domain="com.example"),
        helper.make_node("Transpose", ["f"], ["y"], name="t2", perm=[0, 3, 1, 2]),
    ]
    inits = [
        _const("wq", RNG.integers(-8, 8, (2, 2, 1, 1)).astype(np.int8)),
        _const("scale", np.array(0.1, np.float32)),
        _const("zp", np.array(0, np.int8)),
        *(_const(k, np.ones(2, np.float32)) for k in "sbmv"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F, ["N", 2, 3, 3])],
        [helper.make_tensor_value_info("y", F, ["N", 2, "H", "W"])],
        inits,
        extra_opsets=[helper.make_opsetid("com.example", 1)],
    )


def test_qdq_and_custom_domain_graphs_pass_through_unchanged():
    model = _qdq_and_custom()
    result = _fuse(model, preset="transformer")
    assert not result.modified
    assert result.model.SerializeToString() == model.SerializeToString()
    both = _fuse(model, preset="cnn")
    assert not both.modified
    assert _reasons(both, "conv-bn") == [
        "Conv weight is not a constant (quantized or computed at run time)"
    ]


def test_contrib_ops_and_matmulnbits_graph_does_not_crash():
    nodes = [
        helper.make_node(
            "MatMulNBits",
            ["x", "wq", "scales"],
            ["m"],
            name="mm4",
            domain="com.microsoft",
            K=16,
            N=8,
            bits=4,
            block_size=16,
        ),
        helper.make_node("Add", ["m", "b"], ["a"], name="add"),
        helper.make_node("Softmax", ["a"], ["y"], name="softmax", axis=-1),
    ]
    inits = [
        _const("wq", RNG.integers(0, 255, (8, 1, 8)).astype(np.uint8)),
        _const("scales", np.full(8, 0.01, np.float32)),
        _const("b", _x(8)),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F, ["N", 16])],
        [helper.make_tensor_value_info("y", F, ["N", 8])],
        inits,
        extra_opsets=[helper.make_opsetid("com.microsoft", 1)],
    )
    for preset in ("auto", "transformer", "cnn"):
        result = _fuse(model, preset=preset)
        assert not result.modified
        assert _ops(result.model) == _ops(model)
    _run(model, {"x": _x(2, 16)})


class _Exploding(Pattern):
    name = "conv-bn"
    group = "cnn"
    anchors = ("BatchNormalization",)

    def match(self, view, node):
        raise ZeroDivisionError("boom")


def test_a_pattern_that_raises_declines_and_leaves_the_graph(monkeypatch):
    import optimodel.passes.fuse as fuse_module

    real = fuse_module.node_patterns
    monkeypatch.setattr(
        fuse_module,
        "node_patterns",
        lambda: [_Exploding() if p.name == "conv-bn" else p for p in real()],
    )
    model = _conv_bn()
    result = _fuse(model)
    assert not result.modified and _ops(result.model)["BatchNormalization"] == 1
    assert _reasons(result, "conv-bn") == ["internal error ZeroDivisionError: boom"]


def test_unknown_options_are_usage_errors():
    with pytest.raises(UsageError, match="unknown pattern"):
        get_pass("fuse", skip=["conv-bnn"])
    with pytest.raises(UsageError, match="unknown preset"):
        get_pass("fuse", preset="rnn")
    with pytest.raises(UsageError, match="unknown target"):
        get_pass("fuse", target="tensorrt")


@pytest.mark.parametrize("path", SAMPLE_MODELS, ids=lambda p: p.stem)
@pytest.mark.parametrize("target", ["ort", "portable"])
def test_fuse_is_verified_exact_and_idempotent_on_every_sample(path, target):
    from optimodel.data import load_data, model_input_specs

    model = onnx.load(str(path))
    given = model.SerializeToString()
    shapes = {"hidden_states": (2, 5, 64)} if path.stem == "transformer_block" else {}
    feeds = list(load_data("random", model_input_specs(model), shapes=shapes, num_samples=2))
    once, records = run_passes(model, [get_pass("fuse", target=target)], batches=feeds)
    assert records[0].status == "ok", records[0].reason
    assert model.SerializeToString() == given, "the input model object is left as it was"
    twice = get_pass("fuse", target=target).run(once)
    assert not twice.modified
    assert twice.model.SerializeToString() == once.SerializeToString()


# -- command line ------------------------------------------------------------------------------


@pytest.fixture
def fuse_cli():
    """The fuse command in a scratch Typer app (app.py registers it separately)."""
    from optimodel.cli.fuse_cmd import fuse

    app = typer.Typer()
    app.command("fuse")(fuse)
    app.command("other")(lambda: None)  # two commands keep `fuse` a subcommand

    def run(*args):
        return CliRunner().invoke(app, ["fuse", *map(str, args)])

    return run


def test_fuse_command_writes_a_verified_model_and_report(fuse_cli, tmp_path):
    out, report = tmp_path / "fused.onnx", tmp_path / "fuse.json"
    result = fuse_cli(SAMPLES / "digits_cnn.onnx", "-o", out, "--report", report)
    assert result.exit_code == 0, result.output
    assert "conv-bn x4" in result.stdout
    data = json.loads(report.read_text())
    assert data["passes"][0]["stats"]["fired"]["conv-bn"] == 4
    assert data["verification"]["ok"]
    assert _ops(onnx.load(str(out)))["BatchNormalization"] == 0
    skipped = fuse_cli(
        SAMPLES / "digits_cnn.onnx", "-o", out, "--force", "--skip", "conv-bn", "--json"
    )
    assert skipped.exit_code == 0, skipped.output
    assert json.loads(skipped.stdout)["passes"][0]["stats"]["fired"] == {
        k: 0 for k in data["passes"][0]["stats"]["fired"] if k != "conv-bn"
    }
    bad = fuse_cli(SAMPLES / "digits_cnn.onnx", "-o", tmp_path / "x.onnx", "--skip", "nope")
    assert bad.exit_code == 2 and "conv-bn" in bad.output


def test_transform_file_runs_fuse_with_the_portable_target(tmp_path):
    report = transform_file(
        SAMPLES / "transformer_block.onnx",
        tmp_path / "out.onnx",
        [get_pass("fuse", target="portable")],
        subcommand="fuse",
        shapes={"hidden_states": (2, 6, 64)},
    )
    data = report.to_dict()
    assert data["verification"]["ok"]
    saved = onnx.load(str(tmp_path / "out.onnx"))
    assert {n.domain for n in saved.graph.node} == {""}
    assert _ops(saved)["LayerNormalization"] == 2


def _ort_optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> Counter:
    """Op counts of the graph ONNX Runtime runs after its own load-time optimizations."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return _ops(onnx.load(options.optimized_model_filepath))


def test_ort_target_leaves_skip_layernorm_to_the_fast_cpu_pair(tmp_path):
    # ONNX Runtime's CPU SkipLayerNormalization is slower than Add + LayerNormalization:
    # by default the residual is added before the bias, a form ORT does not fuse at load
    model = onnx.load(str(SAMPLES / "transformer_block.onnx"))
    result = _fuse(model, target="ort")
    assert "skip-layernorm" not in result.stats["fired"]
    assert "skip-layernorm" in result.stats["off_by_default"]
    assert result.stats["fired"]["attention"] == 1
    assert result.stats["bias_after_residual"] >= 1
    ops = _ops(result.model)
    assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] == 2
    onnx.checker.check_model(result.model)
    loaded = _ort_optimized_ops(result.model, tmp_path)
    assert loaded["SkipLayerNormalization"] == 0 and loaded["LayerNormalization"] == 2
    assert loaded["Attention"] == 1
    for batch, seq in ((1, 1), (2, 7)):
        _same_outputs(model, result.model, _transformer_feed(batch, seq), tol=1e-4)
    # the fused kernel is there for those who want it (CUDA)
    fused = _fuse(model, target="ort", enable=["skip-layernorm"])
    assert _ops(fused.model)["SkipLayerNormalization"] == 1
    assert "off_by_default" not in fused.stats


def test_bias_after_residual_keeps_the_graph_sorted_and_the_numbers():
    from optimodel.fusions.residual_order import bias_after_residual

    model = onnx.parser.parse_model(  # weights added below
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[B, S, 8] x, float[B, S, 8] h) => (float[B, S, 8] y) {
            m = MatMul(x, w)
            t = Add(b, m)
            r = Relu(h)
            s = Add(r, t)
            y = LayerNormalization<axis = -1>(s, gamma, beta)
        }"""
    )
    for name, shape in (("w", (8, 8)), ("b", (8,)), ("gamma", (8,)), ("beta", (8,))):
        model.graph.initializer.append(numpy_helper.from_array(_x(*shape), name))
    before = onnx.ModelProto()
    before.CopyFrom(model)
    assert bias_after_residual(model) == 1
    onnx.checker.check_model(model)  # the Add that reads r now runs after Relu
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    assert list(adds[0].input) == ["m", "r"] and list(adds[1].input) == ["t", "b"]
    _same_outputs(before, model, {"x": _x(2, 3, 8), "h": _x(2, 3, 8)}, tol=1e-5)
    assert bias_after_residual(model) == 0  # nothing left to move


def test_enable_accepts_only_patterns_that_are_off_by_default():
    with pytest.raises(UsageError, match="only patterns off by default"):
        get_pass("fuse", enable=["conv-bn"])


def test_skip_layernorm_over_a_broadcasting_add_stays_exact():
    text = LAYERNORM.replace("(float[B, S, 8] x)", "(float[B, S, 8] h, float[1, S, 8] pos)")
    text = text.replace("{{\n    mean", "{{\n    x = Add(h, pos)\n    mean")
    model = parse_model(text.format(ir=8, opset=17))
    result = _fuse(model, preset="transformer", enable=["skip-layernorm"])
    assert result.stats["fired"]["skip-layernorm"] == 1
    # the shapes differ, so ONNX Runtime's own broadcast checks decided
    assert result.stats["ort_symbolic_shape_inference"] is True
    for batch in (1, 3):
        _same_outputs(model, result.model, {"h": _x(batch, 5, 8), "pos": _x(1, 5, 8)})


def test_half_precision_models_are_verified_at_fp16_tolerance():
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from optimodel.data import load_data, model_input_specs

    model = convert_float_to_float16(
        onnx.load(str(SAMPLES / "digits_cnn.onnx")), keep_io_types=True
    )
    fuse = get_pass("fuse")
    feeds = list(load_data("random", model_input_specs(model), num_samples=2))
    fused, records = run_passes(model, [fuse], batches=feeds)
    assert records[0].status == "ok" and records[0].verification["tolerance"] == "fp16"
    assert _ops(fused)["BatchNormalization"] == 0
    data = np.load(SAMPLES / "digits_test.npz", allow_pickle=False)
    before = _run(model, {"input": data["input"]})[0].argmax(1)
    after = _run(fused, {"input": data["input"]})[0].argmax(1)
    assert (before == after).mean() >= 0.995
    assert get_pass("fuse").tolerance == "exact"  # the class default is untouched


def test_attention_dims_read_from_the_graph_even_with_minus_one_heads():
    """Exporters that write `view(b, s, -1, head)` defeat ORT's own head-count detection."""
    from optimodel.fusions.ort_transformer import attention_dims

    model = onnx.load(str(SAMPLES / "transformer_block.onnx"))
    assert attention_dims(model) == (4, 64)


def test_ort_fusion_that_changes_the_output_is_declined():
    """A reshape target with batch and sequence swapped still matches ORT's Attention
    pattern; the probe run catches the changed output and nothing of ORT's is kept."""
    model = onnx.load(str(SAMPLES / "transformer_block.onnx"))
    node = next(n for n in model.graph.node if n.name == "attn_q_heads_concat")
    node.input[0], node.input[1] = node.input[1], node.input[0]
    result = get_pass("fuse").run(model)
    x = np.random.default_rng(0).random((1, 32, 64), dtype=np.float32)
    expected = _run_model(model, {"hidden_states": x})
    got = _run_model(result.model, {"hidden_states": x})
    assert got.shape == expected.shape == (32, 32, 64)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert any("changed what the graph computes" in d["reason"] for d in result.declined)


def _run_model(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


# -- dynamo-exported attention -----------------------------------------------------------------


def _dynamo_attention(hidden: int = 16, head: int = 8, swap_grids: bool = False):
    """One BERT layer as torch.onnx.export(dynamo=True) writes it for transformers 5.

    The padding mask is looked up as GatherND(mask, [batch, key] index grids) under an
    always-true query term, then Where(..., 0, min); the scale is a Mul after Q K^T.
    `swap_grids` reads mask[key, batch] instead, which must not be taken for a mask.
    """
    rng = np.random.default_rng(7)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return _const(name, (rng.standard_normal(shape) * 0.3).astype(np.float32))

    i64 = lambda name, *v: _const(name, np.array(v, dtype=np.int64))  # noqa: E731
    inits = [
        i64("zero", 0),
        i64("one", 1),
        i64("ax12", 1, 2),
        i64("ax01", 0, 1),
        i64("ax2", 2),
        i64("ax3", 3),
        i64("axm1", -1),
        i64("heads", -1),
        i64("head_size", head),
        _const("all_true", np.array(True)),
        _const("keep", np.array(0.0, dtype=np.float32)),
        _const("fill", np.array(np.finfo(np.float32).min, dtype=np.float32)),
        _const("scale", np.array(1 / np.sqrt(head), dtype=np.float32)),
        _const("ln_g", np.ones(hidden, np.float32)),
        _const("ln_b", np.zeros(hidden, np.float32)),
    ]
    for name in ("q", "k", "v", "o"):
        inits += [weight(f"w_{name}", hidden, hidden), weight(f"b_{name}", hidden)]
    grids = ("u_b", "u_k") if not swap_grids else ("u_k", "u_b")
    node = helper.make_node
    nodes = [
        node("LayerNormalization", ["x", "ln_g", "ln_b"], ["h"], epsilon=1e-12),
        node("Shape", ["x"], ["dim_b"], start=0, end=1),
        node("Shape", ["x"], ["dim_s"], start=1, end=2),
        node("Squeeze", ["dim_b"], ["n_b"]),
        node("Squeeze", ["dim_s"], ["n_s"]),
        node("Cast", ["attention_mask"], ["mask"], to=TensorProto.BOOL),
        node("Range", ["zero", "n_b", "one"], ["r_b"]),
        node("Range", ["zero", "n_s", "one"], ["r_s"]),
        node("Unsqueeze", ["r_b", "ax12"], ["b3"]),
        node("Unsqueeze", ["b3", "ax3"], ["b4"]),  # [B, 1, 1, 1]
        node("Unsqueeze", ["r_s", "ax01"], ["s3"]),
        node("Unsqueeze", ["s3", "ax3"], ["q4"]),  # [1, 1, S, 1]
        node("Unsqueeze", ["s3", "ax2"], ["k4"]),  # [1, 1, 1, S]
        node("GreaterOrEqual", ["q4", "zero"], ["q_ok"]),
        node("And", ["all_true", "q_ok"], ["rows_ok"]),
        node("Max", ["b4", "k4"], ["bk"]),
        node("Shape", ["bk"], ["bk_shape"]),
        node("Expand", ["b4", "bk_shape"], ["e_b"]),
        node("Unsqueeze", ["e_b", "axm1"], ["u_b"]),
        node("Expand", ["k4", "bk_shape"], ["e_k"]),
        node("Unsqueeze", ["e_k", "axm1"], ["u_k"]),
        node("Concat", list(grids), ["index"], axis=-1),
        node("GatherND", ["mask", "index"], ["allowed"]),
        node("And", ["rows_ok", "allowed"], ["cond"]),
        node("Where", ["cond", "keep", "fill"], ["additive"]),
        node("Concat", ["dim_b", "dim_s", "heads", "head_size"], ["split"], axis=0),
        node("Concat", ["dim_b", "dim_s", "heads"], ["merge"], axis=0),
    ]
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [
            node("MatMul", ["h", f"w_{name}"], [f"{name}_mm"]),
            node("Add", [f"{name}_mm", f"b_{name}"], [f"{name}_lin"]),
            node("Reshape", [f"{name}_lin", "split"], [f"{name}_4d"], allowzero=1),
            node("Transpose", [f"{name}_4d"], [f"{name}_t"], perm=perm),
        ]
    nodes += [
        node("MatMul", ["q_t", "k_t"], ["scores"]),
        node("Mul", ["scores", "scale"], ["scaled"]),
        node("Add", ["scaled", "additive"], ["masked"]),
        node("Softmax", ["masked"], ["probs"], axis=-1),
        node("MatMul", ["probs", "v_t"], ["ctx"]),
        node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        node("Reshape", ["ctx_t", "merge"], ["ctx_3d"], allowzero=1),
        node("MatMul", ["ctx_3d", "w_o"], ["o_mm"]),
        node("Add", ["o_mm", "b_o"], ["o_lin"]),
        node("Add", ["o_lin", "h"], ["residual"]),
        node("LayerNormalization", ["residual", "ln_g", "ln_b"], ["y"], epsilon=1e-12),
    ]
    inputs = [
        helper.make_tensor_value_info("x", F, ["batch", "sequence", hidden]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
    ]
    outputs = [helper.make_tensor_value_info("y", F, ["batch", "sequence", hidden])]
    return _model(nodes, inputs, outputs, inits)


def _masked_feed(batch: int, seq: int, hidden: int = 16) -> dict[str, np.ndarray]:
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[0, seq - 2 :] = 0  # right padding
    mask[-1, 1] = 0  # a hole: the raw 2-D mask keeps its meaning
    return {"x": _x(batch, seq, hidden), "attention_mask": mask}


def test_dynamo_exported_attention_fuses_after_its_mask_is_rewritten():
    from optimodel.fusions.attention_mask import normalize_attention_masks
    from optimodel.passes.fuse import _infer

    model = _dynamo_attention()
    # the rewrite alone computes the very same numbers
    rewritten = normalize_attention_masks(model, _infer(model))
    assert rewritten.rewritten == 1 and rewritten.model is not None
    onnx.checker.check_model(rewritten.model)
    feed = _masked_feed(2, 6)
    for a, b in zip(_run(model, feed), _run(rewritten.model, feed), strict=True):
        np.testing.assert_array_equal(a, b)

    result = _fuse(model, target="ort")
    assert result.stats["fired"]["attention"] == 1
    assert result.stats["attention_masks_rewritten"] == 1
    ops = _ops(result.model)
    assert ops["Attention"] + ops["MultiHeadAttention"] == 1
    assert ops["Softmax"] == ops["GatherND"] == ops["Where"] == 0
    onnx.checker.check_model(result.model)
    for batch, seq in ((1, 5), (3, 6)):
        _same_outputs(model, result.model, _masked_feed(batch, seq), tol=1e-4)


def test_dynamo_mask_read_another_way_is_left_alone_with_a_reason():
    model = _dynamo_attention(swap_grids=True)  # mask[key, batch]: not a padding mask
    result = _fuse(model, target="ort")
    assert result.stats["fired"]["attention"] == 0
    assert "attention_masks_rewritten" not in result.stats
    reason = _reasons(result, "attention")[0]
    assert "failed to match mask path" in reason and "mask[batch, key]" in reason
    assert _ops(result.model)["GatherND"] == 1


# -- hardswish -------------------------------------------------------------------------------

HARDSWISH = """<ir_version: 8, opset_import: ["" : {opset}]>
g (float[N, 8, 5, 5] x) => (float[N, 8, 5, 5] y{extra_out})
<float three = {{{three}}}, float zero = {{0.0}}, float six = {{{six}}},
 float sixth = {{0.1666667}}>
{{
    a = Add({add_args})
    c = {clip}
{tail}
}}"""
TAILS = {
    "div-after-mul": "    m = Mul(x, c)\n    y = Div(m, six)",
    "mul-by-sixth": "    m = Mul(c, x)\n    y = Mul(m, sixth)",
    "div-first": "    d = Div(c, six)\n    y = Mul(x, d)",
}


def _hardswish(form: str, opset: int, six: float = 6.0, three: float = 3.0, extra_out=""):
    clip = "Clip <min = 0.0, max = 6.0> (a)" if opset < 11 else "Clip(a, zero, six)"
    text = HARDSWISH.format(
        opset=opset, three=three, six=six, clip=clip, tail=TAILS[form],
        add_args="three, x" if form == "mul-by-sixth" else "x, three",
        extra_out=", float[N, 8, 5, 5] a" if extra_out else "",
    )  # fmt: skip
    return parse_model(text)


@pytest.mark.parametrize("form", sorted(TAILS))
@pytest.mark.parametrize(
    ("opset", "expected"),
    [
        (10, {"HardSigmoid": 1, "Mul": 1}),
        (13, {"HardSigmoid": 1, "Mul": 1}),
        (14, {"HardSwish": 1}),
    ],
)
@pytest.mark.parametrize("target", ["ort", "portable"])
def test_hardswish_chain_becomes_one_op(form, opset, expected, target):
    model = _hardswish(form, opset)
    result = _fuse(model, target=target)
    assert _ops(result.model) == Counter(expected), _ops(result.model)
    assert result.stats["fired"]["hardswish"] == 1
    onnx.checker.check_model(result.model, full_check=True)
    x = np.linspace(-6, 6, 2 * 8 * 25, dtype=np.float32).reshape(2, 8, 5, 5)
    _same_outputs(model, result.model, {"x": x}, tol=1e-6)
    again = _fuse(result.model, target=target)
    assert not again.modified


@pytest.mark.parametrize(
    "changed", [{"six": 5.0}, {"three": 2.0}, {"extra_out": "a"}], ids=["clip-5", "add-2", "used"]
)
def test_hardswish_lookalikes_stay(changed):
    model = _hardswish("div-after-mul", 14, **changed)
    result = _fuse(model)
    assert "HardSwish" not in _ops(result.model)
    assert result.stats["fired"].get("hardswish", 0) == 0


# -- affine-conv -----------------------------------------------------------------------------


def _affine_conv(steps, pads=(0, 0, 0, 0), kernel=1, group=1, extra_reader=False):
    """x -> steps (op, constant) -> Conv(kernel, pads, group) -> y (and the affine output)."""
    nodes, inits, data = [], [], "x"
    for i, (op, value) in enumerate(steps):
        inits.append(_const(f"k{i}", np.asarray(value, np.float32)))
        nodes.append(helper.make_node(op, [data, f"k{i}"], [f"s{i}"], name=f"{op}_{i}"))
        data = f"s{i}"
    weight = _x(6, 4 // group, kernel, kernel)
    inits += [_const("w", weight), _const("b", _x(6))]
    nodes.append(
        helper.make_node("Conv", [data, "w", "b"], ["y"], name="conv", pads=list(pads), group=group)
    )
    side = 5 - kernel + 1 + pads[0] + pads[2]
    outputs = [helper.make_tensor_value_info("y", F, [2, 6, side, side])]
    if extra_reader:
        outputs.append(helper.make_tensor_value_info(data, F, [2, 4, 5, 5]))
    return _model(nodes, [helper.make_tensor_value_info("x", F, [2, 4, 5, 5])], outputs, inits)


@pytest.mark.parametrize(
    "steps",
    [
        [("Mul", 1.7), ("Add", -0.4)],  # the learnable affine block: scalar a, b
        [("Mul", _x(1, 4, 1, 1)), ("Sub", _x(4, 1, 1))],
        [("Div", np.array([2.0, -4.0, 0.5, 8.0]).reshape(4, 1, 1))],
        [("Add", 3.0)],
    ],
    ids=["scalar-mul-add", "per-channel-mul-sub", "per-channel-div", "add"],
)
@pytest.mark.parametrize("kernel", [1, 3])
def test_affine_before_an_unpadded_conv_joins_its_weights(steps, kernel):
    model = _affine_conv(steps, kernel=kernel)
    result = _fuse(model, target="portable")
    assert _ops(result.model) == Counter({"Conv": 1})
    assert result.stats["fired"]["affine-conv"] == 1
    onnx.checker.check_model(result.model, full_check=True)
    _same_outputs(model, result.model, {"x": _x(2, 4, 5, 5) * 3}, tol=1e-5)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"pads": (1, 1, 1, 1), "kernel": 3}, "pads its input"),
        ({"extra_reader": True}, None),  # the affine output is used elsewhere too
        ({"group": 2}, None),
    ],
    ids=["padded", "shared", "grouped"],
)
def test_affine_conv_declines(options, reason):
    model = _affine_conv([("Mul", 1.7), ("Add", -0.4)], **options)
    result = _fuse(model, target="portable")
    assert result.stats["fired"].get("affine-conv", 0) == 0
    assert _ops(result.model)["Conv"] == 1 and _ops(result.model)["Add"] == 1
    if reason:
        assert reason in _reasons(result, "affine-conv")[0]
    _same_outputs(model, result.model, {"x": _x(2, 4, 5, 5)})


def test_affine_conv_leaves_an_affine_that_widens_its_input():
    """A grayscale image normalized into 3 channels: the Sub broadcasts [N, 1, H, W] to
    [N, 3, H, W], so the Conv cannot read the 1-channel tensor instead."""
    std = RNG.uniform(1, 2, (1, 3, 1, 1)).astype(np.float32)
    inits = [_const("mean", _x(1, 3, 1, 1)), _const("std", std), _const("w", _x(5, 3, 2, 2))]
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["c"], name="sub"),
        helper.make_node("Div", ["c", "std"], ["n"], name="div"),
        helper.make_node("Conv", ["n", "w"], ["y"], name="conv"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F, [1, 1, 6, 6])],
        [helper.make_tensor_value_info("y", F, [1, 5, 5, 5])],
        inits,
    )
    result = _fuse(model, target="portable")
    # the Div (already 3 channels) may join the Conv; the widening Sub must stay
    assert _ops(result.model)["Sub"] == 1
    _same_outputs(model, result.model, {"x": _x(1, 1, 6, 6)})


def test_hardswish_leaves_float64_and_shape_changing_constants():
    text = HARDSWISH.format(
        opset=14, three=3.0, six=6.0, clip="Clip(a, zero, six)", tail=TAILS["div-after-mul"],
        add_args="x, three", extra_out="",
    )  # fmt: skip
    double = parse_model(text.replace("float", "double"))
    result = _fuse(double)
    assert "HardSwish" not in _ops(result.model)
    assert "float32 / float16" in _reasons(result, "hardswish")[0]
    x = np.linspace(-6, 6, 2 * 8 * 25).reshape(2, 8, 5, 5)
    _same_outputs(double, result.model, {"x": x})
    # a "3" stored as [1, 1, 1, 1, 1] would broadcast x to rank 5: not a scalar here
    wide = parse_model(
        text.replace("float three = {3.0}", "float[1, 1, 1, 1, 1] three = {3.0}").replace(
            "(float[N, 8, 5, 5] y)", "(float[1, N, 8, 5, 5] y)"
        )
    )
    assert "HardSwish" not in _ops(_fuse(wide).model)

"""fp16: accuracy and size on the samples, IO types, measured fallback, weights, load bisection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimodel.data import load_data, model_input_specs
from optimodel.passes import get_pass
from optimodel.precision import BFLOAT16, MixedOptions, convert_mixed
from optimodel.precision import mixed as mixed_module
from optimodel.precision.mixed import match_feed
from tests.conftest import ROOT, SAMPLE_MODELS, SAMPLES, parse_model, sha256

FP16, FP32, BF16 = TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.BFLOAT16


@pytest.fixture
def fp16_cli(cli):
    """The `cli` fixture with `fp16` registered, until app.py registers it itself."""
    from optimodel.cli import fp16_cmd
    from optimodel.cli.app import app

    if not any(c.name == "fp16" for c in app.registered_commands):
        app.command("fp16")(fp16_cmd.fp16)
    return cli


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _feeds(model: onnx.ModelProto, n: int = 2, seed: int = 0, **shapes) -> list[dict]:
    specs = model_input_specs(model)
    return [b.feed for b in load_data("random", specs, shapes=shapes, num_samples=n, seed=seed)]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def _outputs(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    return [
        np.asarray(o, dtype=np.float32) for o in _session(model).run(None, match_feed(model, feed))
    ]


def _weight_bytes(model: onnx.ModelProto, kind: int) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer if t.data_type == kind)


def test_transformer_block_keeps_cosine_and_halves_weights(capsys):
    model = onnx.load(str(SAMPLES / "transformer_block.onnx"))
    result = get_pass("fp16", shapes={"hidden_states": (2, 16, 64)}).run(model)
    out = result.model
    assert result.stats["nodes_kept_float32"] == 0 and result.stats["loads"]
    assert out.graph.input[0].type.tensor_type.elem_type == FP16
    assert out.graph.output[0].type.tensor_type.elem_type == FP16
    for feed in _feeds(model, 3, seed=5, hidden_states=(2, 16, 64)):
        cosine = _cosine(_outputs(model, feed)[0], _outputs(out, feed)[0])
        assert cosine >= 0.999
    with capsys.disabled():
        print(f"\ntransformer_block fp16 cosine {cosine:.7f}")
    before, after = _weight_bytes(model, FP32), _weight_bytes(out, FP16)
    assert _weight_bytes(out, FP32) < 0.01 * before  # only shape constants are left
    assert after == pytest.approx(before / 2, rel=0.02)
    assert result.stats["weight_bytes_after"] <= 0.51 * result.stats["weight_bytes_before"]


def test_keep_io_types_keeps_float32_boundary():
    model = onnx.load(str(SAMPLES / "mlp.onnx"))
    out = get_pass("fp16", keep_io_types=True).run(model).model
    assert [v.type.tensor_type.elem_type for v in out.graph.input] == [FP32]
    assert [v.type.tensor_type.elem_type for v in out.graph.output] == [FP32]
    casts = [n for n in out.graph.node if n.op_type == "Cast"]
    assert {helper.get_attribute_value(c.attribute[0]) for c in casts} == {FP16, FP32}
    onnx.checker.check_model(out, full_check=True)
    feed = _feeds(model, 1)[0]
    got = _session(out).run(None, feed)[0]  # a plain float32 feed runs as is
    assert got.dtype == np.float32
    assert _cosine(_outputs(model, feed)[0], got) >= 0.9999


# y = ReduceSum(x * 1e5) * 1e-6: x*1e5 passes 65504 and is inf in float16.
OVERFLOW = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 64] x) => (float[1, 1] y, float[1, 64] z)
<float big = {100000.0}, float small = {0.000001}, int64[1] axes = {1}, float twelve = {12.0}>
{
    h = Mul(x, big)
    s = ReduceSum<keepdims = 1>(h, axes)
    y = Mul(s, small)
    t = Mul(x, twelve)
    z = Exp(t)
}"""


def test_overflowing_activations_stay_float32_and_correct():
    model = parse_model(OVERFLOW)
    feed = {"x": np.linspace(0.5, 1.0, 64, dtype=np.float32)[None]}
    want = _outputs(model, feed)
    naive = convert_mixed(model, [feed], MixedOptions(fallback=False))
    # Without the fallback: z is stored in fp16 (inf). ONNX Runtime's CPU run keeps the
    # Mul -> ReduceSum pair in float32 internally, so y shows its inf in the emulated run
    # (fp16 storage between every op, as GPU kernels have it).
    assert not np.isfinite(_outputs(naive.model, feed)[1]).all()
    assert not np.isfinite(_outputs(naive.emulated, feed)[0]).all()
    result = convert_mixed(model, _feeds(model, 2, seed=1) + [feed], MixedOptions())
    for converted in (result.model, result.emulated):
        y, z = _outputs(converted, feed)
        np.testing.assert_allclose(y, want[0], rtol=1e-3)
        np.testing.assert_allclose(z, want[1], rtol=1e-2)  # exp(12x) of an fp16 input
    kept = {k["node"] or k["op"]: k for k in result.kept}
    ops = sorted(k["op"] for k in result.kept)
    assert ops.count("Mul") >= 2 and "ReduceSum" in ops and "Exp" in ops, kept
    assert all(k["category"] == "range" for k in result.kept)
    assert any("overflow" in k["reason"] for k in result.kept)
    # the overflowing outputs keep float32 at the boundary (said), the rest is float16
    assert result.model.graph.output[1].type.tensor_type.elem_type == FP32
    assert any("graph boundary" in n for n in result.notes)


def test_batchnorm_variance_out_of_range_stays_correct():
    var = np.array([1e8, 9.8e7, 4.0, 1.0], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["h"]),
            helper.make_node("Relu", ["h"], ["y"]),
        ],
        "bn",
        [helper.make_tensor_value_info("x", FP32, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", FP32, [1, 4, 8, 8])],
        [
            numpy_helper.from_array(np.array([1e4, 1e4, 1.0, 1.0], np.float32), "s"),
            numpy_helper.from_array(np.zeros(4, np.float32), "b"),
            numpy_helper.from_array(np.zeros(4, np.float32), "m"),
            numpy_helper.from_array(var, "v"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    feed = {"x": np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    want = _outputs(model, feed)[0]
    result = convert_mixed(model, [feed], MixedOptions())
    assert [k["op"] for k in result.kept] == ["BatchNormalization"]
    assert "9.8e+07" in result.kept[0]["reason"] or "1e+08" in result.kept[0]["reason"]
    assert _cosine(want, _outputs(result.model, feed)[0]) >= 0.9999
    inits = {t.name: t.data_type for t in result.model.graph.initializer}
    assert inits["v"] == FP32
    # ONNX Runtime's converter clamps the variance to 65504 and changes the answer.
    from onnxruntime.transformers.float16 import convert_float_to_float16

    clamped = convert_float_to_float16(model, keep_io_types=True)
    assert _cosine(want, _outputs(clamped, feed)[0]) < 0.99


@pytest.mark.parametrize("path", SAMPLE_MODELS, ids=lambda p: p.stem)
def test_every_sample_model_converts_and_loads(path):
    model = onnx.load(str(path))
    result = get_pass("fp16").run(model)
    assert result.stats["loads"], result.stats
    onnx.checker.check_model(result.model)
    assert result.stats["nodes_converted"] > 0
    for feed in _feeds(model, 2):
        for a, b in zip(_outputs(model, feed), _outputs(result.model, feed), strict=True):
            assert _cosine(a, b) >= 0.999


def test_control_flow_stays_float32_inside_subgraphs():
    model = onnx.load(str(SAMPLES / "control_flow.onnx"))
    result = get_pass("fp16").run(model)
    kept = {k["op"]: k["reason"] for k in result.stats["kept"]}
    assert "subgraphs" in kept["If"] and "subgraphs" in kept["Loop"]


def test_shape_arithmetic_stays_float32():
    model = parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4100] x) => (float[N, 4100] y)
        <float half = {0.5}, float two = {2.0}>
        {
            s = Shape(x)
            f = Cast<to = 1>(s)
            h = Mul(f, half)
            d = Mul(h, two)
            i = Cast<to = 7>(d)
            y = Reshape(x, i)
        }"""
    )
    result = convert_mixed(model, _feeds(model, 1, x=(1, 4100)), MixedOptions())
    kept = sorted((k["op"], k["category"]) for k in result.kept)
    assert kept == [("Cast", "index math"), ("Mul", "index math"), ("Mul", "index math")]
    feed = {"x": np.ones((1, 4100), np.float32)}
    assert _outputs(result.model, feed)[0].shape == (1, 4100)


def test_load_failure_is_found_by_name_and_by_bisection(monkeypatch):
    model = onnx.load(str(SAMPLES / "mlp.onnx"))
    target = next(n for n in model.graph.node if n.op_type == "Relu")
    real = mixed_module.load_problem

    def broken(named: bool):
        def check(candidate, fmt, strict):
            node = next(n for n in candidate.graph.node if n.name == target.name)
            types = {
                v.name: v.type.tensor_type.elem_type
                for v in onnx.shape_inference.infer_shapes(candidate).graph.value_info
            }
            if types.get(node.input[0]) == FP16:  # the Relu runs in float16: "fails"
                where = f" node with name '{target.name}'" if named else ""
                return f"NOT_IMPLEMENTED: no kernel for{where}"
            return real(candidate, fmt, strict)

        return check

    for named in (True, False):
        monkeypatch.setattr(mixed_module, "load_problem", broken(named))
        result = convert_mixed(model, _feeds(model, 1), MixedOptions())
        assert [k["node"] for k in result.kept] == [target.name]
        assert result.kept[0]["category"] == "load failure"
        assert result.stats["retries"]["load"] == 1 and result.stats["loads"]


def test_block_op_and_node_lists():
    model = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    conv = next(n.name for n in model.graph.node if n.op_type == "Conv")
    result = get_pass("fp16", block_ops=["Relu"], block_nodes=[conv]).run(model)
    kept = {(k["op"], k["node"]) for k in result.stats["kept"]}
    assert ("Conv", conv) in kept
    assert sum(1 for op, _ in kept if op == "Relu") == 4
    assert "Range" in result.stats["block_ops"]  # the default list stays on


def test_bf16_is_emulated_for_verification(fp16_cli, tmp_path):
    out, report = tmp_path / "bf.onnx", tmp_path / "bf.json"
    src = SAMPLES / "transformer_block.onnx"
    result = fp16_cli("fp16", src, "-o", out, "--bf16", "--report", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["verification"]["ok"] and data["verification"]["emulated"]
    assert any("no bfloat16 kernels" in m for m in data["messages"])
    model = onnx.load(str(out))
    assert any(t.data_type == BF16 for t in model.graph.initializer)
    assert model.graph.input[0].type.tensor_type.elem_type == BF16
    onnx.checker.check_model(model, full_check=True)
    result = convert_mixed(onnx.load(str(src)), None, MixedOptions(fmt=BFLOAT16))
    assert result.stats["format"] == "bfloat16"


def test_fp16_cli_report_and_safety(fp16_cli, tmp_path):
    src = SAMPLES / "digits_cnn.onnx"
    before = sha256(src)
    out, report = tmp_path / "d16.onnx", tmp_path / "d16.json"
    args = ("--data", SAMPLES / "digits_test.npz", "--keep-io-types", "--report", report)
    result = fp16_cli("fp16", src, "-o", out, *args)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    stats = data["passes"][0]["stats"]
    assert stats["nodes_converted"] == 17 and stats["casts_inserted"] == 2
    assert stats["weight_bytes_after"] < 0.55 * stats["weight_bytes_before"]
    assert data["verification"]["ok"] and data["verification"]["outputs"][0]["cosine"] > 0.999
    assert data["output_model"]["bytes"] < 0.6 * data["input_model"]["bytes"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert any("GPU providers" in m for m in data["messages"])
    assert sha256(src) == before
    again = fp16_cli("fp16", src, "-o", out)
    assert again.exit_code == 1 and "--force" in again.output
    quiet = fp16_cli("fp16", src, "-o", out, "--force", "--quiet", "--no-verify")
    assert quiet.exit_code == 0 and quiet.stdout == ""


REAL = ROOT / "benchmarks" / ".cache"


def _real(pattern: str) -> Path | None:
    found = sorted(REAL.glob(pattern)) if REAL.is_dir() else []
    return found[0] if found else None


@pytest.mark.slow
@pytest.mark.parametrize(
    ("pattern", "shape", "ints"),
    [
        ("magika-*/magika/models/standard_v3_3/model.onnx", {"bytes": (1, 2048)}, (0, 256)),
        (
            "rapidocr*/rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            {"x": (1, 3, 320, 320)},
            None,
        ),
        (
            "rapidocr*/rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
            {"x": (1, 3, 48, 320)},
            None,
        ),
        (
            "rapidocr*/rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            {"x": (1, 3, 48, 192)},
            None,
        ),
    ],
    ids=["magika", "ppocr_det", "ppocr_rec", "ppocr_cls"],
)
def test_real_models_convert_load_and_agree(pattern, shape, ints, capsys):
    path = _real(pattern)
    if path is None:
        pytest.skip("benchmark model not downloaded (see BENCHMARK_MODELS.md)")
    model = onnx.load(str(path))
    specs = model_input_specs(model)
    calib = [
        b.feed
        for b in load_data(
            "random", specs, shapes=shape, num_samples=2, seed=1, int_range=ints or (0, 255)
        )
    ]
    result = convert_mixed(model, calib, MixedOptions(keep_io_types=True))
    assert result.stats["loads"]
    feeds = [
        b.feed
        for b in load_data("random", specs, shapes=shape, num_samples=2, int_range=ints or (0, 255))
    ]
    cosine = min(
        _cosine(a, b)
        for feed in feeds
        for a, b in zip(_outputs(model, feed), _outputs(result.model, feed), strict=True)
    )
    ratio = result.model.ByteSize() / model.ByteSize()
    with capsys.disabled():
        kept = result.stats["kept_by_reason"]
        print(f"\n{path.name}: cosine {cosine:.6f}, bytes x{ratio:.3f}, kept {kept}")
    assert ratio < 0.56
    if "det" not in path.name:  # random pixels give the detector an all-background map
        assert cosine >= 0.999


def test_fp16_converts_the_onnxruntime_ops_fuse_writes():
    """fuse --target ort, then fp16: Attention, SkipLayerNormalization, BiasGelu go float16
    (the order a GPU deployment wants), not kept float32 for want of an ONNX schema."""
    model = onnx.load(str(SAMPLES / "transformer_block.onnx"))
    fused = get_pass("fuse", target="ort", enable=["skip-layernorm"]).run(model).model
    contrib = {n.op_type for n in fused.graph.node if n.domain == "com.microsoft"}
    assert {"Attention", "SkipLayerNormalization", "BiasGelu"} <= contrib
    result = get_pass("fp16", keep_io_types=True).run(fused)
    kept = {k["op"] for k in result.stats["kept"]}
    assert not kept & contrib, result.stats["kept"]
    half = {i.name for i in result.model.graph.initializer if i.data_type == TensorProto.FLOAT16}
    for node in result.model.graph.node:
        if node.op_type in ("Attention", "BiasGelu"):
            assert any(name in half for name in node.input), node.op_type
    feeds = _feeds(model, n=3)
    ref, got = _session(model), _session(result.model)
    for feed in feeds:
        a = ref.run(None, feed)[0]
        b = got.run(None, match_feed(result.model, feed))[0]
        assert _cosine(a, np.asarray(b, np.float32)) > 0.999


@pytest.mark.parametrize(("opset", "converted"), [(11, False), (13, True)])
def test_clip_goes_float16_only_where_cuda_has_the_kernel(opset, converted):
    """ONNX Runtime's CUDA Clip takes float16 from opset 12; before, it would run on the CPU."""
    nodes = [
        helper.make_node("Mul", ["x", "k"], ["m"], name="mul"),
        helper.make_node("Clip", ["m", "lo", "hi"], ["y"], name="clip"),
    ]
    inits = [
        numpy_helper.from_array(np.full(4, 0.5, np.float32), "k"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    result = get_pass("fp16", keep_io_types=True).run(model)
    kept = {k["node"]: k["reason"] for k in result.stats["kept"]}
    assert ("clip" not in kept) == converted
    if not converted:
        assert "no float16 CUDA kernel" in kept["clip"]
    feed = {"x": np.linspace(-4, 20, 8, dtype=np.float32).reshape(2, 4)}
    np.testing.assert_allclose(_outputs(result.model, feed)[0], _outputs(model, feed)[0], atol=1e-2)

"""quantize: every mode on the sample models, accuracy on trained digits, int4 size, targets, data.

Real ONNX Runtime sessions throughout; fidelity figures are printed (`pytest -s`) so a
run shows what each mode costs, and asserted against realistic floors.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimodel.data import load_data, model_input_specs
from optimodel.errors import OptimodelError, UsageError
from optimodel.evaluate import evaluate
from optimodel.passes import get_pass
from optimodel.pipeline import run_passes
from optimodel.quant.api import WARNING_PREFIX, quantize
from optimodel.quant.calibration import DatasetReader, chunk_size
from optimodel.quant.targets import check_target
from tests.conftest import SAMPLES

SHAPES = {"transformer_block": {"hidden_states": (1, 8, 64)}}
DYNAMIC = ["mlp", "digits_cnn", "transformer_block", "foldable", "control_flow"]
STATIC = ["mlp", "digits_cnn", "transformer_block", "foldable", "control_flow"]
WEIGHT_ONLY = ["mlp", "transformer_block", "foldable", "control_flow"]
# Layers ONNX Runtime's static quantizer cannot reach: MatMuls inside If / Loop bodies
# (dynamic mode quantizes them: see test_dynamic_quantizes_inside_if_and_loop_bodies).
NOTHING_TO_QUANTIZE = {("control_flow", "static")}


def _opset17(graph: onnx.GraphProto) -> onnx.ModelProto:
    """A test graph as a model ONNX Runtime's quantizer takes (opset 17, IR 8)."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _feeds(model: onnx.ModelProto, name: str = "", n: int = 3) -> list:
    shapes = SHAPES.get(name, {})
    return list(load_data("random", model_input_specs(model), shapes=shapes, num_samples=n))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture
def qcli(cli):
    """`optimodel quantize ...`, through the main app once the command is registered there."""
    from optimodel.cli.app import app

    if any(c.name == "quantize" for c in app.registered_commands):
        return cli
    import typer
    from typer.testing import CliRunner

    from optimodel.cli import quantize_cmd
    from tests.conftest import CliResult

    local = typer.Typer(pretty_exceptions_enable=False)

    @local.callback()
    def _root() -> None:
        """Stand-in for the root callback."""

    local.command("quantize")(quantize_cmd.quantize)
    runner = CliRunner()

    def run(*args: str) -> CliResult:
        result = runner.invoke(local, [str(a) for a in args])
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run


def _mode_cases() -> list[tuple[str, str]]:
    return (
        [(m, "dynamic") for m in DYNAMIC]
        + [(m, "static") for m in STATIC]
        + [(m, "weight-only") for m in WEIGHT_ONLY]
    )


@pytest.mark.parametrize(("name", "mode"), _mode_cases(), ids=lambda v: v)
def test_every_sample_model_quantizes_in_each_mode_that_applies(name, mode):
    model = onnx.load(str(SAMPLES / f"{name}.onnx"))
    options = {"mode": mode}
    if mode == "static":
        options.update(calib_data="random", calib_samples=16, shapes=SHAPES.get(name))
    feeds = _feeds(model, name)
    out, records = run_passes(model, [get_pass("quantize", **options)], batches=feeds)
    record = records[0]
    assert record.status == "ok", record.reason
    onnx.checker.check_model(out)
    session = _session(out)
    for batch in feeds:
        session.run(None, batch.feed)
    cosine = min(o["cosine"] for o in record.verification["outputs"])
    stats = record.stats
    print(
        f"\n{name} {mode}: cosine {cosine:.5f}, {stats['quantized_ops']}, "
        f"{stats['float_compute_nodes']} float layers, {stats['qdq_pairs']} Q/DQ pairs, "
        f"weights {stats['weight_bytes_before']} -> {stats['weight_bytes_after']} bytes"
    )
    assert cosine >= 0.98
    if (name, mode) in NOTHING_TO_QUANTIZE:
        assert stats["quantized_total"] == 0
        assert any("nothing was quantized" in w for w in stats["warnings"])
    else:
        assert stats["quantized_total"] > 0
        assert stats["weight_bytes_after"] < stats["weight_bytes_before"]


def test_dynamic_quantizes_inside_if_and_loop_bodies():
    from optimodel.modelio import iter_graphs

    model = onnx.load(str(SAMPLES / "control_flow.onnx"))
    result = get_pass("quantize", mode="dynamic").run(model)
    inner = [n.op_type for g in list(iter_graphs(result.model.graph))[1:] for n in g.node]
    assert inner.count("MatMulInteger") == 3 and "MatMul" not in inner
    assert result.stats["quantized_total"] == 3 and result.stats["float_compute_nodes"] == 0
    for feed in _feeds(model, n=6):  # both If branches and the Loop, against the float model
        (want,) = _session(model).run(None, feed.feed)
        (got,) = _session(result.model).run(None, feed.feed)
        assert _cosine(want, got) > 0.999


def test_dynamic_cpu_leaves_conv_to_static_and_says_so():
    model = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    result = get_pass("quantize", mode="dynamic").run(model)
    ops = _ops(result.model)
    assert ops["ConvInteger"] == 0 and ops["MatMulInteger"] == 1  # the Gemm head
    assert any("Conv layer(s) left in float" in w for w in result.stats["warnings"])
    forced = get_pass("quantize", mode="dynamic", op_types=["Conv", "MatMul"]).run(model)
    assert _ops(forced.model)["ConvInteger"] == 4


def _split_digits(tmp_path: Path, calib: int = 100) -> tuple[Path, Path]:
    with np.load(SAMPLES / "digits_test.npz") as data:
        x, y = data["input"], data["labels"]
    np.savez(tmp_path / "calib.npz", input=x[:calib], labels=y[:calib])
    np.savez(tmp_path / "eval.npz", input=x[calib:], labels=y[calib:])
    return tmp_path / "calib.npz", tmp_path / "eval.npz"


def test_static_digits_cnn_keeps_accuracy_on_held_out_images(tmp_path):
    """Calibrate on the first 100 test images, measure on the other 350 (never seen)."""
    calib, held_out = _split_digits(tmp_path)
    out = tmp_path / "digits.int8.onnx"
    report = quantize(
        SAMPLES / "digits_cnn.onnx",
        out,
        mode="static",
        calib_data=str(calib),
        calib_samples=100,
        data=str(held_out),
        samples=32,
    )
    stats = report.passes[0]["stats"]
    assert stats["quantized_ops"] == {"QDQ Conv": 4, "QDQ Gemm": 1}
    assert stats["float_compute_nodes"] == 0
    assert stats["calibration"]["samples"] == 100
    dataset = load_data(held_out, model_input_specs(onnx.load(str(out))))
    result = evaluate(str(out), dataset, reference=str(SAMPLES / "digits_cnn.onnx"))
    print(
        f"\ndigits static int8: top-1 {result.model['top1']:.2f}% vs float "
        f"{result.reference['top1']:.2f}% on {result.model['samples']} held-out images "
        f"(drop {result.drop:.2f} points), top-1 agreement "
        f"{result.fidelity.outputs[0].top1_agreement:.4f}, size "
        f"{report.input_model['bytes']} -> {report.output_model['bytes']} bytes"
    )
    assert result.model["samples"] == 350
    assert result.drop <= 0.5


def test_weight_only_int4_transformer_block_size_and_fidelity():
    model = onnx.load(str(SAMPLES / "transformer_block.onnx"))
    result = get_pass("quantize", mode="weight-only").run(model)
    stats = result.stats
    assert _ops(result.model)["MatMulNBits"] == 6  # 2 MatMuls of activations stay as they are
    assert stats["quantized_ops"] == {"MatMulNBits (4-bit)": 6}
    ratio = stats["matmul_weight_bytes_ratio"]
    x = np.random.default_rng(0).standard_normal((4, 16, 64)).astype(np.float32)
    ref = _session(model).run(None, {"hidden_states": x})[0]
    got = _session(result.model).run(None, {"hidden_states": x})[0]
    cosine = _cosine(ref, got)
    print(f"\ntransformer_block int4: MatMul weights {ratio:.4f}x of fp32, cosine {cosine:.5f}")
    assert ratio <= 0.16
    assert cosine >= 0.99


def test_weight_only_int4_qdq_format_is_standard_onnx():
    model = onnx.load(str(SAMPLES / "transformer_block.onnx"))
    result = get_pass("quantize", mode="weight-only", int4_format="qdq").run(model)
    out = result.model
    assert {o.domain for o in out.opset_import} == {""}
    assert next(o.version for o in out.opset_import if o.domain == "") == 21
    ints = {t.name: t for t in out.graph.initializer}
    dq_weights = [ints[n.input[0]] for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq_weights) == 6
    assert {t.data_type for t in dq_weights} == {onnx.TensorProto.INT4}
    assert result.stats["matmul_weight_bytes_ratio"] <= 0.16
    assert any("opset 17 -> 21" in s for s in result.stats["preprocessing"])
    x = np.random.default_rng(0).standard_normal((2, 8, 64)).astype(np.float32)
    ref = _session(model).run(None, {"hidden_states": x})[0]
    assert _cosine(ref, _session(out).run(None, {"hidden_states": x})[0]) >= 0.99


def _tiny_lm() -> onnx.ModelProto:
    """Embedding -> hidden projection -> widening vocabulary head, like a language model."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((96, 32)).astype(np.float32), "embed"),
        numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "w_hidden"),
        numpy_helper.from_array(rng.standard_normal((32, 96)).astype(np.float32), "w_head"),
    ]
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["e"], name="embedding"),
        helper.make_node("MatMul", ["e", "w_hidden"], ["h"], name="hidden"),
        helper.make_node("Relu", ["h"], ["r"], name="act"),
        helper.make_node("MatMul", ["r", "w_head"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes,
        "lm",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["B", "T", 96])],
        inits,
    )
    return _opset17(graph)


def test_weight_only_keeps_embedding_float_and_lm_head_at_8_bits():
    model = _tiny_lm()
    result = get_pass("quantize", mode="weight-only").run(model)
    by_name = {n.name: n for n in result.model.graph.node}
    bits = {
        n.name: next(a.i for a in n.attribute if a.name == "bits")
        for n in result.model.graph.node
        if n.op_type == "MatMulNBits"
    }
    assert bits == {"hidden_Q4": 4, "lm_head_Q8": 8}  # onnxruntime names them by bits
    assert by_name["embedding"].op_type == "Gather"
    assert result.stats["head_nodes"] == ["lm_head"]
    assert result.stats["embeddings_kept_float"] == ["embedding"]
    everything = get_pass("quantize", mode="weight-only", keep_head=False).run(model)
    assert everything.stats["quantized_ops"] == {"MatMulNBits (4-bit)": 2}
    qdq = get_pass("quantize", mode="weight-only", int4_format="qdq").run(model)
    assert [n.op_type for n in qdq.model.graph.node if n.name == "lm_head"] == ["MatMul"]
    ids = np.array([[1, 5, 9, 95]], dtype=np.int64)
    ref = _session(model).run(None, {"ids": ids})[0]
    for out in (result.model, qdq.model):
        assert _cosine(ref, _session(out).run(None, {"ids": ids})[0]) >= 0.98


def _wide_vocabulary_lm(vocabulary: int = 4200) -> onnx.ModelProto:
    """An embedding table over 1 MiB (4200 x 64 floats) -> a projection."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((vocabulary, 64)).astype(np.float32), "embed"),
        numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) / 8, "w"),
    ]
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["e"], name="embedding"),
        helper.make_node("MatMul", ["e", "w"], ["y"], name="proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "wide",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", "T", 64])],
        inits,
    )
    return _opset17(graph)


def test_weight_only_stores_a_large_embedding_table_in_8_bits():
    """The word table becomes uint8 blocks read by GatherBlockQuantized (only the gathered
    rows are dequantized); --exclude-node keeps it float; small tables stay float."""
    model = _wide_vocabulary_lm()
    # the projection stays float, so the output difference is the table's rounding alone
    result = get_pass("quantize", mode="weight-only", exclude_nodes=["proj"]).run(model)
    ops = {n.name: n.op_type for n in result.model.graph.node}
    assert ops["embedding"] == "GatherBlockQuantized"
    assert result.stats["embeddings_8bit"] == ["embedding"]
    assert result.stats["embeddings_kept_float"] == []
    table = next(t for t in result.model.graph.initializer if t.name == "embed_u8")
    assert table.data_type == TensorProto.UINT8 and list(table.dims) == [4200, 64]
    assert "embed" not in {t.name for t in result.model.graph.initializer}
    onnx.checker.check_model(result.model, full_check=True)
    ids = np.random.default_rng(2).integers(0, 4200, size=(3, 40)).astype(np.int64)
    ref = _session(model).run(None, {"ids": ids})[0]
    got = _session(result.model).run(None, {"ids": ids})[0]
    print(f"\n[int4] 8-bit embedding table: output cosine {_cosine(ref, got):.6f}")
    assert _cosine(ref, got) >= 0.9999
    kept = get_pass("quantize", mode="weight-only", exclude_nodes=["embedding"]).run(model)
    assert {n.name: n.op_type for n in kept.model.graph.node}["embedding"] == "Gather"
    small = get_pass("quantize", mode="weight-only").run(_wide_vocabulary_lm(1000))
    assert small.stats["embeddings_kept_float"] == ["embedding"]


def test_dynamic_mode_for_cuda_is_refused_with_a_clear_error(qcli, tmp_path):
    with pytest.raises(UsageError, match="cuda provider cannot run; use --mode static"):
        get_pass("quantize", mode="dynamic", target="cuda")
    out = tmp_path / "m.onnx"
    result = qcli("quantize", SAMPLES / "mlp.onnx", "-o", out, "--target", "cuda")
    assert result.exit_code == 2
    assert "--mode static" in result.stderr and "Traceback" not in result.output
    assert not out.exists()


def test_tensorrt_static_is_symmetric_int8_per_channel_qdq():
    model = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    result = get_pass(
        "quantize", mode="static", target="tensorrt", calib_data="random", calib_samples=16
    ).run(model)
    out = result.model
    ints = {t.name: t for t in out.graph.initializer}
    qdq = [n for n in out.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and {n.domain for n in qdq} == {""}
    zero_points = [ints[n.input[2]] for n in qdq if len(n.input) > 2]
    assert zero_points and {z.data_type for z in zero_points} == {onnx.TensorProto.INT8}
    assert all(not numpy_helper.to_array(z).any() for z in zero_points)
    weight_dq = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in ints]
    assert {ints[n.input[0]].data_type for n in weight_dq} == {onnx.TensorProto.INT8}  # no bias
    conv_scales = [ints[n.input[1]] for n in weight_dq if len(ints[n.input[0]].dims) == 4]
    assert all(s.dims and s.dims[0] > 1 for s in conv_scales)  # per output channel
    assert not any(op.startswith(("QLinear", "ConvInteger")) for op in _ops(out))
    check_target(out, "tensorrt")
    assert result.stats["activations"] == "int8 symmetric"


def _with_op(op: str, domain: str = "") -> onnx.ModelProto:
    node = helper.make_node(op, ["x"], ["y"], domain=domain)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    return helper.make_model(graph)


@pytest.mark.parametrize(
    ("op", "domain", "target"),
    [
        ("ConvInteger", "", "cuda"),
        ("MatMulInteger", "", "tensorrt"),
        ("QLinearConv", "", "cuda"),
        ("QLinearAdd", "com.microsoft", "tensorrt"),
        ("MatMulNBits", "com.microsoft", "tensorrt"),
        ("DynamicQuantizeMatMul", "com.microsoft", "cuda"),
    ],
)
def test_target_check_names_ops_the_provider_cannot_run(op, domain, target):
    with pytest.raises(OptimodelError, match=f"{op}.*{target} provider"):
        check_target(_with_op(op, domain), target)
    check_target(_with_op(op, domain), "cpu")


def test_tensorrt_check_refuses_uint8_qdq():
    model = onnx.load(str(SAMPLES / "mlp.onnx"))
    cpu = get_pass("quantize", mode="static", calib_data="random", calib_samples=8).run(model)
    with pytest.raises(OptimodelError, match="TensorRT takes symmetric int8"):
        check_target(cpu.model, "tensorrt")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "static", "target": "cuda", "format": "qoperator"}, "use --format qdq"),
        ({"mode": "weight-only", "target": "tensorrt", "int4_format": "matmulnbits"}, "qdq"),
        ({"mode": "dynamic", "bits": 4}, "--bits applies to --mode weight-only"),
        ({"mode": "weight-only", "block_size": 24}, "power of two"),
        ({"mode": "weight-only", "int4_format": "qdq", "bits": 8}, "--bits 4 only"),
        ({"mode": "static"}, "needs --calib-data"),
        ({"mode": "fast"}, "choose from dynamic, static, weight-only"),
    ],
)
def test_bad_option_combinations_are_usage_errors(options, message):
    options = {"calib_data": "random", **options} if options.get("format") else options
    with pytest.raises(UsageError, match=message):
        get_pass("quantize", **options)


def _digits_cli(qcli, tmp_path: Path, calib: Path | str) -> object:
    return qcli(
        "quantize",
        SAMPLES / "digits_cnn.onnx",
        "-o",
        tmp_path / "out.onnx",
        "--mode",
        "static",
        "--calib-data",
        calib,
    )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("names", "missing input(s) input; unknown key(s) image"),
        ("shape", "axis 2 is 9, not 8"),
        ("dtype", "is int64 but the model expects float32"),
        ("empty_file", "not a readable .npz"),
        ("zero_samples", "holds zero samples"),
        ("missing", "no such data file or folder"),
        ("empty_folder", "folder holds no .npz files"),
        ("bad_first_file", "missing input(s) input"),
    ],
)
def test_bad_calibration_data_is_one_clear_error_line(qcli, tmp_path, case, message):
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    path = tmp_path / "calib.npz"
    if case == "names":
        np.savez(path, image=x)
    elif case == "shape":
        np.savez(path, input=np.zeros((4, 1, 9, 9), np.float32))
    elif case == "dtype":
        np.savez(path, input=np.zeros((4, 1, 8, 8), np.int64))
    elif case == "empty_file":
        path.write_bytes(b"")
    elif case == "zero_samples":
        np.savez(path, input=np.zeros((0, 1, 8, 8), np.float32))
    elif case == "missing":
        path = tmp_path / "nope.npz"
    else:
        path = tmp_path / "feeds"
        path.mkdir()
        if case == "bad_first_file":
            np.savez(path / "000.npz", pixels=x[:1])
    result = _digits_cli(qcli, tmp_path, path)
    assert result.exit_code == 1, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) <= 3
    assert not (tmp_path / "out.onnx").exists()


def test_folder_of_one_feed_files_calibrates(tmp_path):
    folder = tmp_path / "feeds"
    folder.mkdir()
    with np.load(SAMPLES / "digits_test.npz") as data:
        for i in range(12):
            np.savez(folder / f"{i:03d}.npz", input=data["input"][i : i + 1])
    model = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    result = get_pass("quantize", mode="static", calib_data=str(folder)).run(model)
    assert result.stats["calibration"]["samples"] == 12
    assert result.stats["calibration"]["chunk"] == 12
    assert result.stats["quantized_ops"]["QDQ Conv"] == 4


@pytest.mark.parametrize("method", ["percentile", "entropy", "minmax"])
def test_feeds_of_varying_lengths_calibrate_one_at_a_time(tmp_path, method):
    # ONNX Runtime's histogram calibrators stack the outputs of a chunk of samples, which
    # fails on sentences of different lengths: such a folder calibrates sample by sample
    folder = tmp_path / "feeds"
    folder.mkdir()
    rng = np.random.default_rng(3)
    lengths = [5, 9, 3, 12, 7, 9]
    for i, seq in enumerate(lengths):
        np.savez(folder / f"{i:03d}.npz", hidden_states=rng.standard_normal((1, seq, 64)))
    model = onnx.load(str(SAMPLES / "transformer_block.onnx"))
    result = get_pass("quantize", mode="static", calib_data=str(folder), calib_method=method).run(
        model
    )
    assert result.stats["calibration"]["samples"] == len(lengths)
    assert result.stats["calibration"]["chunk"] == 1
    feed = {"hidden_states": rng.standard_normal((1, 11, 64)).astype(np.float32)}
    (expected,) = _session(model).run(None, feed)
    (got,) = _session(result.model).run(None, feed)
    assert got.shape == expected.shape == (1, 11, 64)
    assert _cosine(got, expected) > 0.98


def test_onnx_test_data_sets_calibrate(tmp_path):
    from onnx import numpy_helper

    with np.load(SAMPLES / "digits_test.npz") as data:
        for i in range(10):
            folder = tmp_path / "sets" / f"test_data_set_{i}"
            folder.mkdir(parents=True)
            tensor = numpy_helper.from_array(data["input"][i : i + 1], "input")
            (folder / "input_0.pb").write_bytes(tensor.SerializeToString())
    model = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    result = get_pass("quantize", mode="static", calib_data=str(tmp_path / "sets")).run(model)
    assert result.stats["calibration"]["samples"] == 10
    assert "ONNX test data set" in result.stats["calibration"]["data"]
    assert result.stats["quantized_ops"]["QDQ Conv"] == 4


def test_random_calibration_warns(qcli, tmp_path):
    result = _digits_cli(qcli, tmp_path, "random")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stdout and "calibrating on random data" in result.stdout


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_runs_in_chunks(method):
    model = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    result = get_pass(
        "quantize", mode="static", calib_data="random", calib_samples=20, calib_method=method
    ).run(model)
    calibration = result.stats["calibration"]
    assert calibration["method"] == method
    assert calibration["samples"] == 20 and calibration["chunk"] == 10
    assert 0 < calibration["activation_mb_per_sample"] < 1
    assert result.stats["quantized_total"] == 5


def test_calibration_chunk_shrinks_to_the_memory_budget(monkeypatch):
    from optimodel.quant import calibration

    model = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    feed = next(iter(load_data("random", model_input_specs(model)))).feed
    per_sample = calibration.activation_bytes(model, feed)
    assert per_sample and per_sample > 8 * 8 * 4  # more than the input alone
    monkeypatch.setattr(calibration, "CALIB_MEMORY_BUDGET", 3 * per_sample)
    result = get_pass("quantize", mode="static", calib_data="random", calib_samples=12).run(model)
    assert result.stats["calibration"]["chunk"] in (3, 4)  # the folded model is a bit smaller


def test_reader_serves_sequential_ranges_in_one_pass():
    model = onnx.load(str(SAMPLES / "mlp.onnx"))
    dataset = load_data("random", model_input_specs(model), num_samples=6)
    reader = DatasetReader(dataset, 6)
    seen = []
    for start in range(0, 6, 3):
        reader.set_range(start, start + 3)
        seen.append([feed["features"] for feed in iter(reader.get_next, None)])
    assert [len(chunk) for chunk in seen] == [3, 3]
    expected = [b.feed["features"] for b in dataset]
    for got, want in zip(seen[0] + seen[1], expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert chunk_size(100) == 10 and chunk_size(450) == 15 and chunk_size(7) == 7


def _constant_weight_cnn(opset: int = 12) -> onnx.ModelProto:
    """Conv weights in Constant nodes followed by BatchNorm, as PaddlePaddle exports them."""
    rng = np.random.default_rng(0)

    def const(name: str, array: np.ndarray) -> onnx.NodeProto:
        return helper.make_node(
            "Constant", [], [name], value=numpy_helper.from_array(array.astype(np.float32), name)
        )

    nodes = [
        const("w", rng.standard_normal((8, 3, 3, 3))),
        const("gamma", rng.random(8) + 0.5),
        const("beta", rng.standard_normal(8)),
        const("mean", rng.standard_normal(8) * 0.1),
        const("var", rng.random(8) + 0.5),
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"], name="bn"
        ),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("Squeeze", ["r"], ["y"], name="squeeze", axes=[0]),
    ]
    graph = helper.make_graph(
        nodes,
        "paddle_like",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [8, 16, 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    onnx.checker.check_model(model)
    return model


def test_constant_node_weights_quantize_and_per_channel_qdq_upgrades_the_opset():
    model = _constant_weight_cnn(opset=12)
    feeds = _feeds(model)
    dyn, records = run_passes(
        model, [get_pass("quantize", mode="dynamic", op_types=["Conv"])], batches=feeds
    )
    assert records[0].status == "ok" and _ops(dyn)["ConvInteger"] == 1
    static, records = run_passes(
        model,
        [get_pass("quantize", mode="static", per_channel=True, calib_data="random")],
        batches=feeds,
    )
    assert records[0].status == "ok", records[0].reason
    assert next(o.version for o in static.opset_import if o.domain == "") == 13
    assert _ops(static)["BatchNormalization"] == 0 and _ops(static)["Constant"] == 0
    assert records[0].stats["quantized_ops"] == {"QDQ Conv": 1}
    assert any("opset 12 -> 13" in s for s in records[0].stats["preprocessing"])


def test_failed_opset_conversion_is_a_clear_error(monkeypatch):
    def broken(model, version):
        raise RuntimeError("No Adapter For Squeeze\nC++ stack ...")

    monkeypatch.setattr(onnx.version_converter, "convert_version", broken)
    quantizer = get_pass("quantize", mode="static", per_channel=True, calib_data="random")
    with pytest.raises(OptimodelError, match="needs opset 13.*No Adapter For Squeeze"):
        quantizer.run(_constant_weight_cnn(opset=12))


def test_static_defaults_to_per_channel_and_leaves_residual_adds_alone():
    model = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    result = get_pass("quantize", mode="static", calib_data="random", calib_samples=8).run(model)
    assert result.stats["weights"] == "int8 per-channel"
    assert "Add" not in result.stats["op_types"]  # the residual Add computes in float
    tensor = get_pass(
        "quantize", mode="static", calib_data="random", calib_samples=8, per_channel=False
    ).run(model)
    assert tensor.stats["weights"] == "int8 per-tensor"


def test_default_per_channel_falls_back_to_per_tensor_when_the_opset_cannot_move(monkeypatch):
    def broken(model, version):
        raise RuntimeError("No Adapter For Squeeze")

    monkeypatch.setattr(onnx.version_converter, "convert_version", broken)
    quantizer = get_pass("quantize", mode="static", calib_data="random", calib_samples=4)
    result = quantizer.run(_constant_weight_cnn(opset=12))
    assert result.stats["weights"] == "int8 per-tensor"
    assert any("quantized per-tensor instead" in w for w in result.stats["warnings"])
    assert next(o.version for o in result.model.opset_import if o.domain == "") == 12


def test_accuracy_loss_beyond_the_tolerance_writes_nothing_and_says_what_to_try(qcli, tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", features=rng.random((16, 32), dtype=np.float32) * 1e-3)
    np.savez(tmp_path / "real.npz", features=rng.standard_normal((8, 32)).astype(np.float32) * 50)
    out = tmp_path / "q.onnx"
    result = qcli(
        "quantize", SAMPLES / "mlp.onnx", "-o", out, "--mode", "static",
        "--calib-data", tmp_path / "calib.npz", "--data", tmp_path / "real.npz",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "changed the model's outputs" in result.stderr and "--calib-method" in result.stderr
    assert not out.exists()


def test_exclusions_keep_layers_in_float():
    model = onnx.load(str(SAMPLES / "transformer_block.onnx"))
    one = get_pass("quantize", mode="dynamic", exclude_nodes=["attn_q_matmul"]).run(model)
    assert one.stats["quantized_ops"] == {"MatMulInteger": 5}
    assert one.stats["float_compute_names"] == ["attn_q_matmul"]
    assert [n.op_type for n in one.model.graph.node if n.name == "attn_q_matmul"] == ["MatMul"]
    none = get_pass("quantize", mode="dynamic", exclude_ops=["MatMul"]).run(model)
    assert none.stats["quantized_total"] == 0 and none.stats["float_compute_nodes"] == 6
    with pytest.raises(
        UsageError, match="no such node after folding and fusion.*layers that can be excluded"
    ):
        get_pass("quantize", mode="dynamic", exclude_nodes=["nope"]).run(model)


def test_exclusion_by_input_model_name_survives_fusion():
    model = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    result = get_pass(
        "quantize", mode="static", calib_data="random", calib_samples=8, exclude_nodes=["stem_conv"]
    ).run(model)
    (kept,) = result.stats["excluded_nodes"]
    assert kept == "stem_conv" or kept.startswith("stem_conv_")  # Conv+BN may rename it
    assert result.stats["float_compute_names"] == [kept]
    assert result.stats["quantized_ops"]["QDQ Conv"] == 3


def test_cli_writes_only_the_output_and_reports_json(qcli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = SAMPLES / "transformer_block.onnx"
    result = qcli(
        "quantize", src, "-o", "q.onnx", "--mode", "static", "--calib-data", "random",
        "--calib-method", "entropy", "--shape", "hidden_states=1x8x64", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    stats = data["passes"][0]["stats"]
    assert stats["quantized_ops"] == {"QDQ MatMul": 8}
    assert data["verification"]["ok"] and data["verification"]["tolerance"] == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]
    props = {p.key: p.value for p in onnx.load("q.onnx").metadata_props}
    assert props["optimodel.passes"] == "quantize"


def test_larger_output_is_flagged(qcli, tmp_path, tiny_model):
    src = tmp_path / "tiny.onnx"
    onnx.save(tiny_model, src)
    result = qcli(
        "quantize", src, "-o", tmp_path / "q.onnx", "--mode", "static", "--calib-data", "random"
    )
    assert result.exit_code == 0, result.output
    assert "warning: the quantized model is larger than the input" in result.stdout


def test_the_pass_prints_nothing_and_leaves_logging_alone(capfd):
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    model = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    get_pass("quantize", mode="static", calib_data="random", calib_method="entropy").run(model)
    get_pass("quantize", mode="weight-only").run(onnx.load(str(SAMPLES / "mlp.onnx")))
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert (list(root.handlers), root.level) == before


def test_quantize_api_reports_warnings_in_messages(tmp_path):
    report = quantize(SAMPLES / "digits_cnn.onnx", tmp_path / "d.onnx", mode="dynamic")
    warnings = [m for m in report.messages if m.startswith(WARNING_PREFIX)]
    assert any("Conv layer(s) left in float" in w for w in warnings)
    assert report.passes[0]["stats"]["quantized_ops"] == {"MatMulInteger": 1}


def test_tiny_model_quantizes_dynamically(tiny_model):
    out = get_pass("quantize", mode="dynamic").run(tiny_model).model
    x = np.eye(4, dtype=np.float32)
    ref = _session(tiny_model).run(None, {"x": x})[0]
    np.testing.assert_allclose(_session(out).run(None, {"x": x})[0], ref, atol=0.05)


# ---------------------------------------------------------------- accuracy budget


def _outlier_digits(tmp_path: Path, scale: float = 2000.0) -> Path:
    """The trained digits CNN, rewritten so one activation has a huge dynamic range.

    Channel 0 of block1's BatchNorm is scaled up by `scale` (ReLU keeps the factor) and the
    matching input channel of block2's Conv scaled down by it: the float model computes
    the same function, but per-tensor int8 of that activation crushes the other 15
    channels to zero. Deterministic, and the culprit is known.
    """
    model = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor).copy()
        if tensor.name in ("block.1.weight", "block.1.bias"):
            array[0] *= scale
        elif tensor.name == "block.3.weight":
            array[:, 0] /= scale
        else:
            continue
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    path = tmp_path / "outlier.onnx"
    onnx.save(model, str(path))
    return path


def test_accuracy_budget_keeps_the_sensitive_layers_float(qcli, tmp_path):
    src = _outlier_digits(tmp_path)
    calib, held_out = _split_digits(tmp_path)
    out = tmp_path / "budget.onnx"
    result = qcli(
        "quantize", src, "-o", out, "--mode", "static", "--calib-data", calib,
        "--accuracy-budget", "1", "--eval-data", held_out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    budget = data["passes"][0]["stats"]["accuracy_budget"]
    print(
        f"\n[budget] digits CNN with one outlier channel, static int8 on 350 held-out images: "
        f"full int8 drops {budget['drop_full_int8']:.2f} top-1 points; --accuracy-budget 1 "
        f"keeps {len(budget['kept_float'])} node(s) float ({', '.join(budget['kept_float'])}) "
        f"and drops {budget['drop']:.2f}; p50 at 1 thread {budget['p50_ms_full_int8']:.4f} -> "
        f"{budget['p50_ms']:.4f} ms; {len(budget['trials'])} trials: "
        + "; ".join(f"{t['kept_float']} float -> {t['drop']:.2f}" for t in budget["trials"])
    )
    assert budget["metric"] == "top1" and budget["baseline"] == 100.0
    assert budget["drop_full_int8"] > 50  # plain static int8 is far over budget
    assert budget["fits"] and budget["drop"] <= 1.0
    assert {"block1_conv_1", "block2_conv_1"} <= set(budget["kept_float"])
    assert len(budget["kept_float"]) < 8  # not everything: the rest stays int8
    assert all(t["p50_ms"] > 0 for t in budget["trials"])
    stats = data["passes"][0]["stats"]
    assert stats["quantized_total"] >= 2 and "block2_conv_1" in stats["excluded_nodes"]
    assert data["gates"] == [
        {"name": "accuracy-budget", "metric": "top1", "limit": 1.0,
         "measured": budget["drop"], "unit": "top-1 points", "passed": True}
    ]  # fmt: skip
    # the written model really is within budget, measured independently
    dataset = load_data(held_out, model_input_specs(onnx.load(str(out))))
    measured = evaluate(str(out), dataset, reference=str(src))
    assert measured.drop <= 1.0


def test_fidelity_budget_without_labels(tmp_path):
    src = _outlier_digits(tmp_path)
    with np.load(SAMPLES / "digits_test.npz") as data:
        np.savez(tmp_path / "inputs.npz", input=data["input"][:64])
    result = get_pass(
        "quantize", mode="dynamic", op_types=["Conv", "MatMul"], accuracy_budget=0.5,
        eval_data=str(tmp_path / "inputs.npz"),
    ).run(onnx.load(str(src)))  # fmt: skip
    budget = result.stats["accuracy_budget"]
    print(
        f"\n[budget] fidelity, dynamic: (1 - cosine) x 100 {budget['drop_full_int8']:.3f} -> "
        f"{budget['drop']:.4f} with {budget['kept_float']} float"
    )
    assert budget["metric"] == "fidelity" and budget["fits"]
    assert budget["drop_full_int8"] > 0.5 >= budget["drop"]


def _rare_outlier_mlp(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An MLP calibrated on data with one sample 200x too large, evaluated on typical ones.

    Min/max calibration stretches every activation range to that sample, so int8
    activations round typical inputs to a few levels; the weights are ordinary, and
    rounding them per channel costs almost nothing.
    """
    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
        ],
        "rare_outlier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        [
            numpy_helper.from_array((rng.normal(size=(64, 128)) / 8).astype(np.float32), "w1"),
            numpy_helper.from_array((rng.normal(size=(128, 16)) / 11).astype(np.float32), "w2"),
        ],
    )
    onnx.save(_opset17(graph), str(tmp_path / "mlp.onnx"))
    calib = rng.normal(size=(33, 64)).astype(np.float32)
    calib[0] *= 200
    np.savez(tmp_path / "calib.npz", x=calib)
    np.savez(tmp_path / "eval.npz", x=rng.normal(size=(64, 64)).astype(np.float32))
    return tmp_path / "mlp.onnx", tmp_path / "calib.npz", tmp_path / "eval.npz"


@pytest.mark.parametrize("fallback", ["int8-weights", "float"])
def test_budget_fallback_keeps_int8_weights_unless_asked(qcli, tmp_path, fallback):
    src, calib, held_out = _rare_outlier_mlp(tmp_path)
    out = tmp_path / f"{fallback}.onnx"
    args = ["quantize", src, "-o", out, "--mode", "static", "--calib-data", calib,
            "--calib-method", "minmax", "--accuracy-budget", "1",
            "--eval-data", held_out]  # fmt: skip
    if fallback == "float":
        args += ["--fallback", "float"]
    shown = qcli(*args)
    assert shown.exit_code == 0, shown.output
    if fallback == "int8-weights":
        assert "2 with int8 weights" in shown.stdout
    result = qcli(*args, "--json", "--force")
    stats = json.loads(result.stdout)["passes"][0]["stats"]
    budget = stats["accuracy_budget"]
    print(
        f"\n[budget] rare calibration outlier, --fallback {fallback}: drop "
        f"{budget['drop_full_int8']:.2f} -> {budget['drop']:.4f} with {budget['kept_float']} "
        f"out of int8; layer weight bytes {stats['weight_bytes_ratio']:.3f}x"
    )
    assert budget["drop_full_int8"] > 10 and budget["fits"] and budget["drop"] <= 1
    assert budget["fallback"] == fallback
    assert {"fc1", "fc2"} <= set(budget["kept_float"])
    session = _session(onnx.load(str(out)))
    with np.load(held_out) as data:
        x = data["x"]
    reference = _session(onnx.load(str(src))).run(None, {"x": x})[0]
    assert _cosine(reference, session.run(None, {"x": x})[0]) >= 0.99
    if fallback == "int8-weights":
        assert budget["int8_weight_fallback"] == ["fc1", "fc2"]
        assert stats["quantized_ops"] == {"weight-only MatMul": 2}
        assert stats["weight_bytes_ratio"] < 0.3  # the size of full int8
    else:
        assert budget["int8_weight_fallback"] == [] and stats["weight_bytes_ratio"] == 1.0


def test_budget_falls_back_to_float_weights_when_int8_weights_never_fit(tmp_path, monkeypatch):
    """The outlier digits CNN: rounding block2's weights per channel zeroes the inputs
    that carry the scaled-up channel, so only float weights fit; the same ranking is
    searched again and the trials of both searches are reported. Every trial reads the
    first one's calibration back instead of calibrating again."""
    import importlib

    from optimodel.passes.quantize import _takes_calibration_cache

    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")
    calibrations = []
    create = ort_quantize.create_calibrator
    monkeypatch.setattr(
        ort_quantize,
        "create_calibrator",
        lambda *a, **k: calibrations.append(1) or create(*a, **k),
    )
    src = _outlier_digits(tmp_path)
    calib, held_out = _split_digits(tmp_path)
    result = get_pass(
        "quantize", mode="static", calib_data=str(calib), accuracy_budget=1.0,
        eval_data=str(held_out),
    ).run(onnx.load(str(src)))  # fmt: skip
    budget = result.stats["accuracy_budget"]
    tried = [(t["fallback"], t["kept_float"], t["fits"]) for t in budget["trials"]]
    assert budget["fits"] and budget["fallback"] == "float", tried
    assert any(how == "int8-weights" and not fits for how, _, fits in tried)
    assert len({(how, count) for how, count, _ in tried}) == len(tried)  # none measured twice
    if _takes_calibration_cache(ort_quantize.quantize_static):
        assert len(calibrations) == 1 < len(tried)


def test_budget_below_opset_13_keeps_float_weights_and_says_so(tmp_path):
    """Per-channel DequantizeLinear needs opset 13; dynamic mode keeps an opset-12 model
    as it is, so the kept nodes stay float, their trials say so, and the same search is
    not run a second time."""
    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
        ],
        "opset12",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        [
            numpy_helper.from_array((rng.normal(size=(64, 128)) / 8).astype(np.float32), "w1"),
            numpy_helper.from_array((rng.normal(size=(128, 32)) / 11).astype(np.float32), "w2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 8
    np.savez(tmp_path / "eval.npz", x=rng.normal(size=(16, 64)).astype(np.float32))
    result = get_pass(
        "quantize", mode="dynamic", accuracy_budget=1e-5, eval_data=str(tmp_path / "eval.npz"),
        keep_best=True,
    ).run(model)  # fmt: skip
    budget = result.stats["accuracy_budget"]
    assert budget["int8_weight_fallback"] == []
    assert all(t["fallback"] == "float" for t in budget["trials"])
    kept = [tuple(sorted(t["nodes"])) for t in budget["trials"]]
    assert len(set(kept)) == len(kept)  # no configuration measured twice


def test_impossible_budget_exits_3_and_writes_nothing(qcli, tmp_path):
    src = _outlier_digits(tmp_path)
    calib, held_out = _split_digits(tmp_path)
    out = tmp_path / "none.onnx"
    args = [
        "quantize", src, "-o", out, "--mode", "static", "--calib-data", calib,
        "--accuracy-budget", "1", "--eval-data", held_out, "--max-trials", "1",
    ]  # fmt: skip
    result = qcli(*args)
    assert result.exit_code == 3, result.output
    assert "no quantization within an accuracy drop of 1 top-1 points" in result.stderr
    assert "--keep-best" in result.stderr and "Traceback" not in result.output
    assert not out.exists()
    kept = qcli(*args, "--keep-best", "--report", tmp_path / "r.json")
    assert kept.exit_code == 3, kept.output
    assert out.exists() and "wrote the best candidate" in kept.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "gate_failed" and not report["gates"][0]["passed"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "dynamic", "accuracy_budget": 1.0}, "needs --eval-data"),
        ({"mode": "weight-only", "accuracy_budget": 1.0}, "applies to --mode dynamic / static"),
        ({"mode": "dynamic", "eval_data": "x.npz"}, "need --accuracy-budget"),
        ({"mode": "dynamic", "accuracy_budget": -1.0, "eval_data": "x.npz"}, ">= 0"),
        ({"mode": "dynamic", "fallback": "float"}, "needs it"),
        ({"mode": "weight-only", "fallback": "float"}, "applies to --mode dynamic / static"),
        (
            {"mode": "dynamic", "accuracy_budget": 1.0, "eval_data": "x.npz", "fallback": "fp16"},
            "choose from int8-weights, float",
        ),
    ],
)
def test_bad_budget_options_are_usage_errors(options, message):
    with pytest.raises(UsageError, match=message):
        get_pass("quantize", **options)


def test_histogram_calibration_falls_back_to_minmax_where_control_flow_hides_tensors():
    """Percentile (the default) needs a histogram per tensor; an If branch can leave none."""
    model = onnx.load(str(SAMPLES / "control_flow.onnx"))
    result = get_pass("quantize", mode="static", calib_data="random", calib_samples=8).run(model)
    assert result.stats["calibration"]["method"] == "minmax"
    assert any("calibrated with minmax instead" in w for w in result.stats["warnings"])
    digits = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    data = str(SAMPLES / "digits_test.npz")
    stats = get_pass("quantize", mode="static", calib_data=data, calib_samples=32).run(digits).stats
    assert stats["calibration"]["method"] == "percentile"


def test_calibration_reports_progress_per_sample():
    from optimodel.quant.calibration import calibration_progress

    seen: list[tuple[int, int]] = []
    model = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    quantizer = get_pass(
        "quantize", mode="static", calib_data=str(SAMPLES / "digits_test.npz"), calib_samples=24
    )
    with calibration_progress(lambda done, total: seen.append((done, total))):
        quantizer.run(model)
    assert seen[-1] == (24, 24)
    assert [d for d, _ in seen] == list(range(1, 25))


RICH_OVERRIDES = ("NO_COLOR", "TTY_COMPATIBLE", "FORCE_COLOR")  # what tells rich "no terminal"


def test_quantize_on_a_terminal_draws_the_calibration_bar_with_memory(tmp_path):
    import os
    import pty
    import subprocess
    import sys
    import threading

    main, secondary = pty.openpty()
    out = tmp_path / "q.onnx"
    chunks: list[bytes] = []

    def drain() -> None:  # read while it runs: a full terminal buffer would block the child
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = subprocess.run(
        [sys.executable, "-m", "optimodel", "quantize", str(SAMPLES / "digits_cnn.onnx"),
         "-o", str(out), "--mode", "static", "--calib-data", str(SAMPLES / "digits_test.npz")],
        stdout=subprocess.PIPE, stderr=secondary, text=True, timeout=120,
        env={
            **{k: v for k, v in os.environ.items() if k not in RICH_OVERRIDES},
            "COLUMNS": "100",
            "TERM": "xterm-256color",
        },
    )  # fmt: skip
    os.close(secondary)
    reader.join(timeout=10)
    os.close(main)
    shown = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, shown
    assert "calibrating" in shown and "RSS" in shown and " MB" in shown


def _mlp_with_shape_path() -> onnx.ModelProto:
    """x -> MatMul(W1) -> Reshape(shape from Shape(x)) -> MatMul(W2) -> MatMul(W3) -> y.

    The input also reaches the second MatMul through Shape -> Reshape's shape argument:
    that is not a data path, so the stem is the first MatMul alone.
    """
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal((16, 64)).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.standard_normal((64, 4)).astype(np.float32), "W3"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="first"),
        helper.make_node("Shape", ["x"], ["xs"], name="shape"),
        helper.make_node("Slice", ["xs", "zero", "one"], ["xs_head"], name="slice"),
        helper.make_node("Concat", ["xs_head", "minus_one"], ["xs_fixed"], name="cat", axis=0),
        helper.make_node("Reshape", ["h1", "xs_fixed"], ["r"], name="reshape"),
        helper.make_node("MatMul", ["r", "W2"], ["h2"], name="middle"),
        helper.make_node("Relu", ["h2"], ["a2"], name="relu"),
        helper.make_node("MatMul", ["a2", "W3"], ["y"], name="last"),
    ]
    inits += [
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        inits,
    )
    model = _opset17(graph)
    onnx.checker.check_model(model)
    return model


def test_exclude_presets_pick_the_first_and_last_weighted_layers_along_data_paths():
    from optimodel.quant.presets import preset_nodes

    model = _mlp_with_shape_path()
    feed = {"x": np.ones((2, 8), np.float32)}
    assert preset_nodes(model, "stem", feed) == ["first"]
    assert preset_nodes(model, "heads", feed) == ["last"]
    assert sorted(preset_nodes(model, "ends", feed)) == ["first", "last"]
    assert preset_nodes(model, "none", feed) == []
    digits = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    ends = preset_nodes(digits, "ends")
    ops = {n.name: n.op_type for n in digits.graph.node}
    assert [ops[n] for n in ends] == ["Conv", "Gemm"]


def test_exclude_preset_keeps_those_layers_in_float_and_says_so():
    model = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    data = str(SAMPLES / "digits_test.npz")
    result = get_pass(
        "quantize", mode="static", calib_data=data, calib_samples=32, exclude_preset="ends"
    ).run(model)
    assert any("--exclude-preset ends: kept" in w for w in result.stats["warnings"])
    float_gemm = [n for n in result.model.graph.node if n.op_type == "Gemm"]
    assert float_gemm, "the Gemm head stays a float Gemm"
    inputs = {n.output[0]: n.op_type for n in result.model.graph.node}
    assert inputs.get(float_gemm[0].input[1]) != "DequantizeLinear"
    with pytest.raises(UsageError, match="--exclude-preset body"):
        get_pass("quantize", mode="static", calib_data=data, exclude_preset="body").run(model)


def _mlp(
    widths: list[int], shape: list, *, bias: bool = False, relu_last: bool = False, seed: int = 3
) -> onnx.ModelProto:
    """x[shape] (last dim 256) through MatMul (+ bias Add) + Relu layers of `widths` outputs;
    the last layer ends in a Relu only with `relu_last`."""
    rng = np.random.default_rng(seed)
    inits, nodes, prev, k = [], [], "x", 256
    for i, n in enumerate(widths):
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
        prev, k = f"m{i}", n
        if bias:
            b = rng.standard_normal(n).astype(np.float32)
            inits.append(numpy_helper.from_array(b, f"b{i}"))
            nodes.append(helper.make_node("Add", [prev, f"b{i}"], [f"a{i}"], name=f"add{i}"))
            prev = f"a{i}"
        if i < len(widths) - 1 or relu_last:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"], name=f"relu{i}"))
            prev = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [*shape[:-1], widths[-1]])],
        inits,
    )
    return _opset17(graph)


def test_static_int8_leaves_the_outputs_of_a_cheap_head_in_float(tmp_path):
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((16, 1, 256)).astype(np.float32))
    model = _mlp([512, 512, 4], [1, 256])  # the head: 2k of 395k MACs
    default = get_pass("quantize", mode="static", calib_data=str(calib)).run(model)
    quantized = get_pass("quantize", mode="static", calib_data=str(calib), int8_outputs=True)
    int8_out = quantized.run(model)
    assert default.stats["float_outputs"] == ["m2"] and int8_out.stats["float_outputs"] == []

    def writer(m: onnx.ModelProto) -> str:
        return next(n.op_type for n in m.graph.node if "m2" in n.output)

    assert writer(default.model) == "MatMul" and writer(int8_out.model) == "DequantizeLinear"
    producers = {o: n.op_type for n in default.model.graph.node for o in n.output}
    head = next(n for n in default.model.graph.node if "m2" in n.output)
    assert producers[head.input[1]] == "DequantizeLinear", "the head's weights stay int8"
    assert default.stats["quantized_ops"] == int8_out.stats["quantized_ops"]
    # fresh inputs from the calibration's distribution: int8 outputs add their rounding
    x = rng.standard_normal((32, 1, 256)).astype(np.float32)
    runs = {
        name: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        for name, m in {"float": model, "default": default.model, "int8": int8_out.model}.items()
    }
    out = {k: np.concatenate([s.run(None, {"x": r})[0] for r in x]) for k, s in runs.items()}

    def error(name: str) -> float:
        return float(np.abs(out[name] - out["float"]).mean())

    assert error("default") < error("int8")
    heavy = _mlp([64, 64, 512], [1, 256])  # the head is half the MACs: left as it was
    kept = get_pass("quantize", mode="static", calib_data=str(calib)).run(heavy)
    assert kept.stats["float_outputs"] == []


def test_float_outputs_copies_a_graph_input_under_the_output_name():
    from optimodel.quant.outputs import float_outputs

    scale = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    zero = numpy_helper.from_array(np.array(128, np.uint8), "z")
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
            helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["y"], name="dq"),
        ],
        "qdq_only",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [scale, zero],
    )
    model = _opset17(graph)
    model, kept = float_outputs(model, model)
    assert kept == ["y"] and [n.op_type for n in model.graph.node] == ["Identity"]
    onnx.checker.check_model(model)
    x = np.linspace(-9, 9, 6, dtype=np.float32).reshape(2, 3)  # beyond the int8 range
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(got.run(None, {"x": x})[0], x)


def test_matmul_outputs_stay_float_only_where_ort_keeps_the_int8_kernel(tmp_path):
    from optimodel.quant.outputs import dequantized_weights

    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((8, 1, 16, 256)).astype(np.float32))
    x = rng.standard_normal((1, 16, 256)).astype(np.float32)
    for shape, expected in ((["batch", "seq", 256], ["m0", "m1", "m2"]), ([1, 16, 256], [])):
        model = _mlp([256, 256, 256], shape, bias=True, relu_last=True, seed=5)
        result = get_pass("quantize", mode="static", calib_data=str(calib)).run(model)
        # with fixed shapes ORT turns MatMul + Add into a float Gemm unless the output is
        # quantized: there the pairs stay, and no layer runs on dequantized weights
        assert result.stats["float_outputs"] == expected
        assert dequantized_weights(result.model) == set()
        ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = ort.InferenceSession(
            result.model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        a, b = ref.run(None, {"x": x})[0].ravel(), got.run(None, {"x": x})[0].ravel()
        assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) > 0.99


def test_cuda_static_leaves_matmul_outputs_float_for_fidelity(tmp_path):
    """ONNX Runtime's CUDA provider runs Q/DQ MatMuls as dequantize + float MatMul, so a
    pair after the output only rounds: for --target cuda all of them go, checked by
    numbers against the same model with --int8-outputs."""
    rng = np.random.default_rng(1)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((8, 1, 16, 256)).astype(np.float32))
    model = _mlp([256, 256, 256], [1, 16, 256], bias=True, relu_last=True, seed=7)
    options = {"mode": "static", "calib_data": str(calib), "target": "cuda"}
    default = get_pass("quantize", **options).run(model)
    rounded = get_pass("quantize", **options, int8_outputs=True).run(model)
    assert default.stats["float_outputs"] == ["m0", "m1", "m2"]
    assert rounded.stats["float_outputs"] == []
    assert default.stats["activations"] == "uint8 asymmetric"  # TensorRT alone needs int8
    assert _ops(default.model)["QuantizeLinear"] < _ops(rounded.model)["QuantizeLinear"]
    x = rng.standard_normal((16, 1, 16, 256)).astype(np.float32)
    runs = {k: _session(m) for k, m in (("f", model), ("d", default.model), ("r", rounded.model))}
    out = {
        k: np.concatenate([s.run(None, {"x": v})[0].ravel() for v in x]) for k, s in runs.items()
    }
    assert _cosine(out["f"], out["d"]) > _cosine(out["f"], out["r"])
    assert _cosine(out["f"], out["d"]) > 0.999


def _embedding_model() -> onnx.ModelProto:
    """ids -> word table (4096 x 64, int8-worthy) + position table (16 x 64) -> MatMul."""
    rng = np.random.default_rng(2)
    word = numpy_helper.from_array(rng.standard_normal((4096, 64)).astype(np.float32), "word")
    pos = numpy_helper.from_array(rng.standard_normal((16, 64)).astype(np.float32), "pos")
    w = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Gather", ["word", "ids"], ["we"], name="word_gather"),
        helper.make_node("Gather", ["pos", "positions"], ["pe"], name="pos_gather"),
        helper.make_node("Add", ["we", "pe"], ["emb"], name="add"),
        helper.make_node("MatMul", ["emb", "w"], ["y"], name="proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "embed",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8]),
            helper.make_tensor_value_info("positions", TensorProto.INT64, [1, 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 32])],
        [word, pos, w],
    )
    return _opset17(graph)


def test_static_stores_large_embedding_tables_in_int8_and_keeps_small_ones_float(tmp_path):
    rng = np.random.default_rng(3)
    calib = tmp_path / "calib.npz"
    ids = rng.integers(0, 4096, (16, 1, 8)).astype(np.int64)
    np.savez(calib, ids=ids, positions=np.tile(np.arange(8, dtype=np.int64), (16, 1, 1)))
    model = _embedding_model()
    result = get_pass("quantize", mode="static", calib_data=str(calib)).run(model)
    stored = {t.name: t.data_type for t in result.model.graph.initializer}
    writers = {o: n for n in result.model.graph.node for o in n.output}
    gathers = {n.name: n for n in result.model.graph.node if n.op_type == "Gather"}
    word_in = writers[gathers["word_gather"].input[0]]
    assert word_in.op_type == "DequantizeLinear"
    assert stored[word_in.input[0]] in (TensorProto.INT8, TensorProto.UINT8)
    assert gathers["pos_gather"].input[0] == "pos" and stored["pos"] == TensorProto.FLOAT
    assert "pos_gather" in result.stats["excluded_nodes"]
    assert result.model.ByteSize() < model.ByteSize() * 0.4
    feed = {"ids": rng.integers(0, 4096, (1, 8)), "positions": np.arange(8)[None]}
    a = _session(model).run(None, feed)[0]
    b = _session(result.model).run(None, feed)[0]
    assert _cosine(a, b) > 0.99

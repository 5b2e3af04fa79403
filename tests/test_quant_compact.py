"""Compact Q/DQ writing: fewer bytes, the same numbers, the same ONNX Runtime kernels."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)

from optimodel.graphs import copy_model
from optimodel.passes import get_pass
from optimodel.quant.compact import compact_qdq, derive_bias_scales
from tests.conftest import SAMPLES


class _Images(CalibrationDataReader):
    def __init__(self, images: np.ndarray) -> None:
        self._it = iter({"input": x[None]} for x in images)

    def get_next(self) -> dict | None:
        return next(self._it, None)


def _images() -> np.ndarray:
    with np.load(SAMPLES / "digits_test.npz") as data:
        return data["input"][:64].astype(np.float32)


@pytest.fixture(scope="module")
def digits_qdq(tmp_path_factory) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The digits CNN and ONNX Runtime's own static U8S8 per-channel QDQ of it."""
    tmp = tmp_path_factory.mktemp("qdq")
    src = SAMPLES / "digits_cnn.onnx"
    out = tmp / "int8.onnx"
    quantize_static(
        str(src),
        str(out),
        _Images(_images()[:16]),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        extra_options={"WeightSymmetric": True},
    )
    return onnx.load(str(src)), onnx.load(str(out))


def _optimized_ops(model: onnx.ModelProto, path: Path) -> Counter[str]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _names(model: onnx.ModelProto) -> set[str]:
    values = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        values.update([*node.input, *node.output, node.name])
    return values - {""}


def test_compact_qdq_is_smaller_with_identical_outputs_and_kernels(digits_qdq, tmp_path):
    reference, quantized = digits_qdq
    compact = copy_model(quantized)
    counts = compact_qdq(compact, reference, "cpu")
    onnx.checker.check_model(compact, full_check=True)
    before, after = quantized.ByteSize(), compact.ByteSize()
    convs = sum(1 for n in reference.graph.node if n.op_type in ("Conv", "Gemm"))
    print(f"\ndigits int8 QDQ: {before:,} -> {after:,} bytes, {counts}")
    assert after < before
    assert counts["zero_points_dropped"] >= 2 * convs - 1  # weights (not the Gemm's) and biases
    assert counts["bias_scales_derived"] == convs
    assert counts["names_shortened"] > 0
    assert not compact.graph.value_info, "ONNX Runtime builds the same graph without them"
    writers = {o: n for n in compact.graph.node for o in n.output}
    for layer in (n for n in compact.graph.node if n.op_type in ("Conv", "Gemm")):
        weights = writers[layer.input[1]]
        assert len(weights.input) == (3 if layer.op_type == "Gemm" else 2), (
            "weights lose their zero point, except a Gemm's (ONNX Runtime's QGemm needs it)"
        )
        assert len(writers[layer.input[2]].input) == 2, "no int32 bias keeps one"
    # the model's own names all survive; only the quantizer's made-up ones changed
    own = _names(reference) & _names(quantized)
    assert own <= _names(compact)
    images = _images()
    runs = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        for m in (quantized, compact)
    ]
    for image in images[16:48]:
        a, b = (s.run(None, {"input": image[None]})[0] for s in runs)
        assert np.array_equal(a, b)
    ops = _optimized_ops(quantized, tmp_path / "a.onnx")
    assert ops == _optimized_ops(compact, tmp_path / "b.onnx")
    assert ops["QLinearConv"] == convs - 1, "every Conv still fuses to an integer kernel"


def test_a_bias_scale_the_quantizer_widened_stays_stored(digits_qdq):
    _, quantized = digits_qdq
    model = copy_model(quantized)
    bias_dq = next(
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized")
        and any(t.name == n.input[0] and t.data_type == onnx.TensorProto.INT32
                for t in model.graph.initializer)
    )  # fmt: skip
    scale = next(t for t in model.graph.initializer if t.name == bias_dq.input[1])
    widened = numpy_helper.to_array(scale).copy()
    widened[0] = np.nextafter(widened[0], np.float32(1))
    scale.CopyFrom(numpy_helper.from_array(widened, scale.name))
    convs = sum(1 for n in model.graph.node if n.op_type in ("Conv", "Gemm"))
    assert derive_bias_scales(model) == convs - 1
    assert any(t.name == scale.name for t in model.graph.initializer)
    assert not any(n.op_type == "Mul" and n.output[0] == scale.name for n in model.graph.node)


def test_quantize_pass_writes_compact_qdq_and_tensorrt_keeps_stored_scales(tmp_path):
    calib = str(tmp_path / "calib.npz")
    np.savez(calib, input=_images()[:16])
    model = onnx.load(str(SAMPLES / "digits_cnn.onnx"))
    cpu = get_pass("quantize", mode="static", calib_data=calib).run(model)
    assert cpu.stats["compacted"]["bias_scales_derived"] >= 4
    assert cpu.stats["compacted"]["zero_points_dropped"] > 0
    trt = get_pass("quantize", mode="static", calib_data=calib, target="tensorrt").run(model)
    assert trt.stats["compacted"]["bias_scales_derived"] == 0
    for node in trt.model.graph.node:  # TensorRT reads every scale from a stored tensor
        if node.op_type == "DequantizeLinear":
            assert node.input[1] in {t.name for t in trt.model.graph.initializer}


def test_cli_says_what_was_written_compactly(cli, tmp_path):
    out = tmp_path / "digits.int8.onnx"
    result = cli(
        "quantize", SAMPLES / "digits_cnn.onnx", "-o", out, "--mode", "static",
        "--calib-data", SAMPLES / "digits_test.npz", "--calib-samples", "32",
    )  # fmt: skip
    assert result.exit_code == 0, result.stdout
    text = " ".join(result.stdout.split())
    assert "written compactly" in text and "5 bias scales as Mul" in text
    report = cli(
        "quantize", SAMPLES / "mlp.onnx", "-o", tmp_path / "mlp.int8.onnx", "--mode", "dynamic"
    )  # fmt: skip
    assert report.exit_code == 0 and "written compactly" not in report.stdout

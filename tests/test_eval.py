"""eval: accuracy of the trained digits CNN on its test split, fidelity, the CI gate."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from optimodel.data import load_data, model_input_specs
from optimodel.errors import UsageError
from optimodel.evaluate import evaluate, parse_max_drop
from tests.conftest import SAMPLES

DIGITS = SAMPLES / "digits_cnn.onnx"
DIGITS_DATA = SAMPLES / "digits_test.npz"


def _numpy_accuracy(path) -> float:
    """Accuracy computed independently of optimodel: plain ORT + numpy."""
    import onnxruntime as ort

    data = np.load(DIGITS_DATA)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": data["input"]})[0]
    return 100.0 * float(np.mean(logits.argmax(1) == data["labels"]))


@pytest.fixture(scope="module")
def damaged_digits(tmp_path_factory):
    """The digits CNN with its classifier weights damaged: a real accuracy drop."""
    model = onnx.load(str(DIGITS))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    init = next(t for t in model.graph.initializer if t.name == gemm.input[1])
    weights = numpy_helper.to_array(init).copy()
    rng = np.random.default_rng(0)
    weights += rng.normal(0, 0.6 * weights.std(), weights.shape).astype(np.float32)
    init.CopyFrom(numpy_helper.from_array(weights, init.name))
    path = tmp_path_factory.mktemp("damaged") / "damaged.onnx"
    onnx.save(model, path)
    return path


def test_digits_accuracy_matches_independent_computation():
    specs = model_input_specs(onnx.load(str(DIGITS)))
    result = evaluate(str(DIGITS), load_data(DIGITS_DATA, specs, batch_size=64))
    assert result.model["task"] == "classification"
    assert result.model["samples"] == 450
    assert result.model["top1"] == pytest.approx(_numpy_accuracy(DIGITS))
    assert result.model["top1"] >= 95.0
    assert result.model["top5"] >= result.model["top1"]


def test_drop_and_fidelity_against_reference(damaged_digits):
    specs = model_input_specs(onnx.load(str(DIGITS)))
    data = load_data(DIGITS_DATA, specs, batch_size=64)
    result = evaluate(str(damaged_digits), data, reference=str(DIGITS))
    expected_drop = _numpy_accuracy(DIGITS) - _numpy_accuracy(damaged_digits)
    assert expected_drop > 0.5  # the damage is real
    assert result.drop == pytest.approx(expected_drop)
    fidelity = result.fidelity.outputs[0]
    assert fidelity.cosine < 1.0 and fidelity.max_abs > 0
    assert 0 < fidelity.top1_agreement < 1


def test_gate_exit_codes(cli, damaged_digits, tmp_path):
    drop = _numpy_accuracy(DIGITS) - _numpy_accuracy(damaged_digits)
    report = tmp_path / "gate.json"
    args = ["eval", damaged_digits, "--reference", DIGITS, "--data", DIGITS_DATA]
    failing = cli(*args, "--max-drop", f"{drop / 2:.3f}", "--report", report)
    assert failing.exit_code == 3, failing.output
    data = json.loads(report.read_text())
    assert data["status"] == "gate_failed" and data["gates"][0]["passed"] is False
    assert data["gates"][0]["measured"] == pytest.approx(drop)
    passing = cli(*args, "--max-drop", f"{drop + 0.5:.3f}", "--quiet")
    assert passing.exit_code == 0 and passing.stdout == ""
    relative = cli(*args, "--max-drop", "0.01%", "--quiet")
    assert relative.exit_code == 3


def test_eval_report_formats(cli, tmp_path):
    json_path, md_path, html_path = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.html"
    result = cli(
        "eval",
        DIGITS,
        "--data",
        DIGITS_DATA,
        "--reference",
        DIGITS,
        "--report",
        json_path,
        "--report",
        md_path,
        "--report",
        html_path,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(json_path.read_text())
    assert data["schema_version"] == 1
    assert data["tool"]["onnxruntime"]
    assert data["input_model"]["sha256"] and data["input_model"]["nodes"] == 17
    assert data["accuracy"]["model"]["top1"] == pytest.approx(_numpy_accuracy(DIGITS))
    assert data["accuracy"]["fidelity"]["outputs"][0]["cosine"] == pytest.approx(1.0)
    md = md_path.read_text()
    assert "| model | logits | 450 |" in md and "## Accuracy" in md
    assert html_path.read_text().startswith("<!DOCTYPE html>")


def test_regression_mse_and_several_outputs(tmp_path):
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 2] x) => (float[N, 2] y, float[N, 2] z)
        { y = Identity(x)
          two = Constant<value = float {2.0}>()
          z = Mul(x, two) }"""
    )
    path = tmp_path / "reg.onnx"
    onnx.save(model, path)
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    np.savez(tmp_path / "d.npz", x=x, labels=x + 1)
    data = load_data(tmp_path / "d.npz", model_input_specs(model), batch_size=3)
    result = evaluate(str(path), data, reference=str(path))
    assert result.model["task"] == "regression" and result.model["mse"] == pytest.approx(1.0)
    assert [o.name for o in result.fidelity.outputs] == ["y", "z"]
    second = evaluate(str(path), data, output="z")
    assert second.model["mse"] == pytest.approx(float(np.mean((2 * x - x - 1) ** 2)))


def test_parse_max_drop():
    assert parse_max_drop("1").value == 1 and not parse_max_drop("1").relative
    assert parse_max_drop("0.5%").relative
    with pytest.raises(UsageError):
        parse_max_drop("abc")

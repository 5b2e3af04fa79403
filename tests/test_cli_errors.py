"""Bad input: one clear line, the right exit code, no traceback, nothing written."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.conftest import SAMPLES, run_subprocess, sha256

DIGITS = SAMPLES / "digits_cnn.onnx"


def _custom_domain_model(path):
    model = onnx.helper.make_model(
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
    model.ir_version = 8  # loadable by every supported ONNX Runtime: the op is what fails
    onnx.save(model, path)


def _make_case(name: str, tmp_path):
    """Build the bad input for a case; returns (command args, expected code, message)."""
    report = tmp_path / "report.json"
    if name == "missing file":
        return ["inspect", tmp_path / "nope.onnx"], 1, "no such file"
    if name == "text file":
        bad = tmp_path / "notes.onnx"
        bad.write_text("just some text\n" * 20)
        return ["inspect", bad, "--report", report], 1, "not"
    if name == "truncated model":
        bad = tmp_path / "trunc.onnx"
        bad.write_bytes(DIGITS.read_bytes()[:20000])
        return ["eval", bad, "--report", report], 1, "trunc.onnx"
    if name == "folder":
        return ["inspect", tmp_path], 1, "folder"
    if name == "unknown op domain":
        bad = tmp_path / "custom.onnx"
        _custom_domain_model(bad)
        return ["eval", bad, "--report", report], 1, "com.example"
    if name == "bad shape":
        return ["eval", DIGITS, "--shape", "input=1xfoo", "--report", report], 2, "--shape"
    if name == "shape of unknown input":
        return ["eval", DIGITS, "--shape", "image=1x1x8x8", "--report", report], 1, "image"
    if name == "bad data file":
        data = tmp_path / "d.npz"
        np.savez(data, input=np.zeros((4, 3, 8, 8), np.float32))
        return ["eval", DIGITS, "--data", data, "--report", report], 1, "d.npz"
    if name == "pickled data":
        data = tmp_path / "p.npz"
        np.savez(data, input=np.array([object()], dtype=object))
        return ["eval", DIGITS, "--data", data, "--report", report], 1, "pickle"
    if name == "bad report suffix":
        return ["inspect", DIGITS, "--report", tmp_path / "r.txt"], 2, ".txt"
    if name == "max-drop without reference":
        return ["eval", DIGITS, "--max-drop", "1", "--report", report], 2, "--reference"
    if name == "missing provider":
        return ["eval", DIGITS, "--provider", "cuda", "--report", report], 1, "optimodel[gpu]"
    raise AssertionError(name)


CASES = [
    "missing file",
    "text file",
    "truncated model",
    "folder",
    "unknown op domain",
    "bad shape",
    "shape of unknown input",
    "bad data file",
    "pickled data",
    "bad report suffix",
    "max-drop without reference",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_in_process(cli, tmp_path, case):
    args, code, message = _make_case(case, tmp_path)
    before = {p: sha256(p) for p in tmp_path.rglob("*") if p.is_file()}
    result = cli(*args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    after = {p: sha256(p) for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing written, inputs untouched


def test_missing_provider_names_the_package(cli, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    args, code, message = _make_case("missing provider", tmp_path)
    result = cli(*args)
    assert result.exit_code == code and message in result.output


@pytest.mark.parametrize("case", ["text file", "unknown op domain", "bad shape", "pickled data"])
def test_bad_input_real_process(tmp_path, case):
    args, code, message = _make_case(case, tmp_path)
    proc = run_subprocess(*args)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    if code == 1:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) <= 2 and lines[0].startswith("error:")


def test_debug_shows_traceback(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("text")
    proc = run_subprocess("--debug", "inspect", bad)
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_version_and_module_entry_point():
    proc = run_subprocess("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("optimodel ")

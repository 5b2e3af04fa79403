"""GPU providers for real: run only where ONNX Runtime's CUDA provider starts a session.

CI has no GPU, so these are skipped there; on a machine with onnxruntime-gpu and a CUDA
device they check that what optimodel writes for `--target cuda` / fp16 really runs on
the GPU, that `bench --provider cuda` reports GPU placement, and that a TensorRT request
on a machine without TensorRT is said, never silently timed on another provider.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from optimodel.passes import get_pass
from optimodel.runtime.bench import ASSIGNMENT_ENTRY, assignment_counts
from optimodel.runtime.provider_probe import probe_provider

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
CNN = SAMPLES / "digits_cnn.onnx"
DIGITS = SAMPLES / "digits_test.npz"
CUDA = "CUDAExecutionProvider"


@cache
def cuda_runs() -> bool:
    """True when a CUDA session really starts (listed is not enough: libraries may lack)."""
    return probe_provider(CUDA) is None


pytestmark = pytest.mark.skipif(not cuda_runs(), reason="no working CUDA provider here")


def _gpu_session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.add_session_config_entry(ASSIGNMENT_ENTRY, "1")
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=[CUDA, "CPUExecutionProvider"])


def _digits() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DIGITS, allow_pickle=False) as data:
        arrays = [data[k] for k in data.files]
    images = next(a for a in arrays if a.dtype == np.float32)
    labels = next(a for a in arrays if a.dtype.kind in "iu")
    return images, labels


def _logits(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i : i + 1]})[0] for i in range(64)])


def test_bench_on_cuda_runs_on_the_gpu(cli, tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    result = cli("bench", CNN, "--provider", "cuda", "--runs", "20", "--report", report)
    assert result.exit_code == 0, result.output
    row = json.loads(report.read_text())["latency"][0]
    assert row["fell_back"] is False
    assert CUDA in row["providers_active"]
    assert row["nodes_by_provider"].get(CUDA, 0) > 0
    assert row["io_binding"] is True


def test_fp16_model_runs_on_cuda_and_keeps_accuracy() -> None:
    images, labels = _digits()
    model = onnx.load(CNN)
    fp16 = get_pass("fp16", keep_io_types=True).run(model).model
    reference = _logits(_gpu_session(CNN), images)
    session = _gpu_session(fp16)
    counts = assignment_counts(session) or {}
    assert counts.get(CUDA, 0) >= counts.get("CPUExecutionProvider", 0)
    logits = _logits(session, images)
    assert np.abs(logits - reference).max() < 0.05
    agree = np.mean(logits.argmax(-1) == reference.argmax(-1))
    assert agree >= 0.98
    assert (
        np.mean(logits.argmax(-1) == labels[:64])
        >= np.mean(reference.argmax(-1) == labels[:64]) - 0.02
    )


def test_int8_for_cuda_runs_on_cuda_with_qdq_on_the_gpu() -> None:
    images, _ = _digits()
    model = onnx.load(CNN)
    result = get_pass(
        "quantize", mode="static", target="cuda", calib_data=str(DIGITS), calib_samples=64
    ).run(model)
    ops = {n.op_type for n in result.model.graph.node}
    assert "QuantizeLinear" in ops and not ops & {"ConvInteger", "MatMulInteger"}
    session = _gpu_session(result.model)
    counts = assignment_counts(session) or {}
    assert counts.get(CUDA, 0) > 0
    reference = _logits(_gpu_session(CNN), images)
    assert np.mean(_logits(session, images).argmax(-1) == reference.argmax(-1)) >= 0.95


def test_tensorrt_request_is_never_silently_timed_elsewhere(cli, tmp_path: Path) -> None:
    """Without TensorRT's libraries the run fails or is labelled as fallen back."""
    report = tmp_path / "bench.json"
    result = cli("bench", CNN, "--provider", "tensorrt", "--runs", "5", "--report", report)
    assert "Traceback" not in result.output
    if result.exit_code != 0:
        assert "TensorRT" in result.output
    if report.exists():
        row = json.loads(report.read_text())["latency"][0]
        if "TensorrtExecutionProvider" not in row["providers_active"]:
            assert row["fell_back"] is True and result.exit_code != 0
            assert "these are CPU figures" in result.output or "CUDA figures" in result.output


def test_doctor_says_whether_each_gpu_provider_starts(cli) -> None:
    result = cli("doctor", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["provider_support"]["cuda"] is True
    if not info["provider_support"]["tensorrt"]:
        assert (
            "tensorrt" in info["provider_problems"]
            or "TensorrtExecutionProvider" not in (info["providers"])
        )


def test_speed_gate_for_a_cuda_target_times_on_cuda(cli, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    result = cli("quantize", CNN, "--mode", "static", "--target", "cuda", "-o", out,
                 "--calib-data", DIGITS, "--if-slower", "warn", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    gate = report["gates"][-1]
    assert gate["name"] == "latency" and "CUDA" in gate["metric"]
    assert any("dequantize + float kernels" in m for m in report["messages"])

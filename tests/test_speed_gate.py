"""`quantize --if-slower`: a quantized model that is not faster is never shipped silently.

Which way the timing goes on this machine is not what is tested (timing never decides
a unit test): the limit is set far below or far above any real ratio, so the decision
is fixed and the test checks what each policy writes and says.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from optimodel.runtime.paired import paired_timing
from tests.conftest import SAMPLES, sha256

MLP = SAMPLES / "mlp.onnx"
NEVER = "1e-9"  # no model is this much faster: the gate always finds it slower
ALWAYS = "1000"


def _outputs(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _feed(path):
    model = onnx.load(str(path))
    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(0).standard_normal(dims).astype(np.float32)


def test_keep_float_writes_the_input_model_and_says_why(cli, tmp_path):
    out = tmp_path / "q.onnx"
    result = cli("quantize", MLP, "--mode", "dynamic", "-o", out, "--json",
                 "--if-slower", "keep-float", "--max-latency-ratio", NEVER)  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    gate = report["gates"][-1]
    assert gate["name"] == "latency" and not gate["passed"]
    assert gate["outcome"] == "kept-float" and gate["measured"] > 0
    assert any("kept the float model" in m for m in report["messages"])
    written = onnx.load(str(out))
    assert {n.op_type for n in written.graph.node} == {
        n.op_type for n in onnx.load(str(MLP)).graph.node
    }
    x = _feed(MLP)
    np.testing.assert_array_equal(_outputs(out, x), _outputs(MLP, x))
    # the int8 candidate is reported, not written
    variant = report["variants"][-1]
    assert variant["name"] == "quantized (not kept)" and variant["verification"]["ok"]


def test_fail_writes_nothing_and_exits_3(cli, tmp_path):
    out = tmp_path / "q.onnx"
    before = sha256(MLP)
    result = cli("quantize", MLP, "--mode", "dynamic", "-o", out,
                 "--if-slower", "fail", "--max-latency-ratio", NEVER)  # fmt: skip
    assert result.exit_code == 3
    assert "not faster than the input" in result.output
    assert not out.exists() and not out.with_name("q.onnx.data").exists()
    assert sha256(MLP) == before


def test_a_faster_enough_model_is_written_quantized(cli, tmp_path):
    out = tmp_path / "q.onnx"
    result = cli("quantize", MLP, "--mode", "dynamic", "-o", out, "--json",
                 "--if-slower", "fail", "--max-latency-ratio", ALWAYS)  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["gates"][-1]["passed"]
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(out)).graph.node}


def test_warn_writes_the_quantized_model_and_warns(cli, tmp_path):
    out = tmp_path / "q.onnx"
    result = cli("quantize", MLP, "--mode", "dynamic", "-o", out, "--json",
                 "--if-slower", "warn", "--max-latency-ratio", NEVER)  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["gates"][-1]["outcome"] == "warned"
    assert any("latency on this CPU" in m for m in report["messages"])
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(out)).graph.node}


def test_bad_policy_and_ratio_are_usage_errors(cli, tmp_path):
    out = tmp_path / "q.onnx"
    bad = cli("quantize", MLP, "-o", out, "--if-slower", "sometimes")
    assert bad.exit_code == 2 and "--if-slower" in bad.output
    zero = cli("quantize", MLP, "-o", out, "--if-slower", "warn", "--max-latency-ratio", "0")
    assert zero.exit_code == 2 and "--max-latency-ratio" in zero.output
    assert not out.exists()


def test_paired_timing_interleaves_rounds(tmp_path):
    timing = paired_timing(MLP, MLP, {"features": _feed(MLP)}, rounds=3, round_seconds=0.01)
    assert timing.rounds == 3 and timing.runs_per_round >= 3
    assert timing.a_ms > 0 and timing.b_ms > 0 and timing.ratio > 0
    assert set(timing.to_dict()) >= {"a_p50_ms", "b_p50_ms", "ratio", "method"}


def _cuda_starts() -> bool:
    from optimodel.runtime.provider_probe import probe_provider

    return probe_provider("CUDAExecutionProvider") is None


def test_gate_for_a_gpu_target_needs_that_gpu_and_says_so_before_any_work(cli, tmp_path):
    """A CPU timing says nothing of a --target cuda model: no GPU here is a usage error."""
    if _cuda_starts():
        pytest.skip("CUDA starts here")
    out = tmp_path / "q.onnx"
    before = sha256(MLP)
    result = cli("quantize", MLP, "--mode", "static", "--target", "cuda", "-o", out,
                 "--calib-data", "random", "--if-slower", "fail")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "cuda provider does not start here" in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and sha256(MLP) == before


def test_bench_for_a_gpu_target_without_it_times_the_cpu_and_says_so(cli, tmp_path):
    if _cuda_starts():
        pytest.skip("CUDA starts here")
    out = tmp_path / "q.onnx"
    result = cli("quantize", MLP, "--mode", "static", "--target", "cuda", "-o", out,
                 "--calib-data", "random", "--bench", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert any("timed on the CPU" in m and "not CUDA figures" in m for m in report["messages"])
    assert len(report["latency"]) == 2


def test_optimize_fail_writes_nothing_and_exits_3(cli, tmp_path):
    out = tmp_path / "o.onnx"
    before = sha256(MLP)
    result = cli("optimize", MLP, "-o", out, "--if-slower", "fail", "--max-latency-ratio", NEVER)
    assert result.exit_code == 3, result.output
    assert "optimized model is" in result.output and "nothing was written" in result.output
    assert not out.exists() and sha256(MLP) == before


def test_optimize_recipe_keep_input_writes_the_input_model(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\npasses:\n  - fold\n  - fuse\n"
        f"bench:\n  if_slower: keep-input\n  max_latency_ratio: {NEVER}\n  runs: 5\n"
    )
    out = tmp_path / "o.onnx"
    result = cli("optimize", MLP, "-o", out, "--config", recipe, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    gate = report["gates"][-1]
    assert gate["name"] == "latency" and gate["outcome"] == "kept-input"
    assert any("kept the input model instead" in m for m in report["messages"])
    x = _feed(MLP)
    np.testing.assert_array_equal(_outputs(out, x), _outputs(MLP, x))


def test_optimize_gate_for_a_gpu_recipe_without_the_gpu_is_a_usage_error(cli, tmp_path):
    if _cuda_starts():
        pytest.skip("CUDA starts here")
    out = tmp_path / "o.onnx"
    result = cli("optimize", MLP, "-o", out, "--config", "fp16-gpu", "--if-slower", "warn")
    assert result.exit_code == 2, result.output
    assert "cuda provider does not start here" in result.output
    assert not out.exists()

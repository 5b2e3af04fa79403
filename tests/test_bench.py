"""`optimodel bench`: real ONNX Runtime sessions on the sample models, small run counts."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from optimodel.cli import bench_cmd
from optimodel.errors import UsageError
from optimodel.runtime.bench import (
    add_ratios,
    benchmark_model,
    fallback_message,
    fell_back_providers,
    profile_node_counts,
    provider_label,
    provider_options,
)
from optimodel.runtime.sessions import SessionConfig, create_session

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
MLP = SAMPLES / "mlp.onnx"
CNN = SAMPLES / "digits_cnn.onnx"
DIGITS = SAMPLES / "digits_test.npz"
FAST = ("--runs", "5", "--warmup", "1")
ROW_FIELDS = {
    "model",
    "provider",
    "providers_active",
    "fell_back",
    "threads",
    "batch_size",
    "runs",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "mean_ms",
    "min_ms",
    "throughput",
    "session_load_s",
    "first_run_ms",
    "peak_rss_mb",
    "nodes_by_provider",
    "latency_ratio",
    "load_ratio",
    "io_binding",
}


def _app() -> typer.Typer:
    """The real app once `bench` is registered there; until then one of its own."""
    from optimodel.cli.app import app

    if any(cmd.name == "bench" for cmd in app.registered_commands):
        return app
    own = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    own.command("bench")(bench_cmd.bench)
    own.command("version")(lambda: None)  # a second command keeps `bench` a subcommand
    return own


def bench(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(_app(), ["bench", *map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def bench_json(*args: object) -> dict:
    code, out, err = bench(*args, "--json")
    assert code == 0, err
    return json.loads(out)


def _graph_nodes(path: Path) -> int:
    def count(graph: onnx.GraphProto) -> int:
        total = len(graph.node)
        for node in graph.node:
            for attr in node.attribute:
                if attr.g.node:
                    total += count(attr.g)
        return total

    return count(onnx.load(str(path)).graph)


def test_side_by_side_json_figures_and_ratios() -> None:
    data = bench_json(MLP, CNN, *FAST)
    rows = data["latency"]
    assert data["subcommand"] == "bench" and data["status"] == "ok"
    assert [Path(r["model"]).name for r in rows] == ["mlp.onnx", "digits_cnn.onnx"]
    for row in rows:
        assert ROW_FIELDS <= row.keys()
        assert row["provider"] == "cpu" and row["fell_back"] is False
        assert row["providers_active"][-1] == "CPUExecutionProvider"
        assert row["runs"] == 5 and row["batch_size"] == 1 and row["threads"] == 0
        assert 0 < row["min_ms"] <= row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["mean_ms"] > 0 and row["throughput"] > 0
        assert row["session_load_s"] > 0 and row["first_run_ms"] > 0
        assert row["peak_rss_mb"] > 0 and row["rss_delta_mb"] >= 0
        assert row["io_binding"] is False
    assert rows[0]["latency_ratio"] == 1.0 and rows[0]["load_ratio"] == 1.0
    second = rows[1]
    assert second["latency_ratio"] == pytest.approx(second["p50_ms"] / rows[0]["p50_ms"], rel=1e-3)
    assert second["load_ratio"] == pytest.approx(
        second["session_load_s"] / rows[0]["session_load_s"], rel=1e-2
    )


def test_nodes_by_provider_counts_cpu_nodes() -> None:
    for row in bench_json(MLP, CNN, *FAST)["latency"]:
        counts = row["nodes_by_provider"]
        assert set(counts) == {"CPUExecutionProvider"}
        assert 0 < counts["CPUExecutionProvider"] <= _graph_nodes(Path(row["model"]))


def test_profile_node_counts_and_no_profile_file_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    feed = {"input": np.zeros((2, 1, 8, 8), np.float32)}
    row = benchmark_model(CNN, SessionConfig(), feed, runs=3, warmup=0, node_counts="profile")
    assert row["nodes_by_provider_source"] == "profile"
    assert 0 < row["nodes_by_provider"]["CPUExecutionProvider"] <= _graph_nodes(CNN)
    assert list(tmp_path.iterdir()) == []


def test_profile_parser_counts_distinct_nodes(tmp_path: Path) -> None:
    event = {"cat": "Node", "name": "a_kernel_time", "args": {"provider": "CUDAExecutionProvider"}}
    events = [
        event,
        event,  # the same node run twice (a Loop body) counts once
        {"cat": "Node", "name": "b_kernel_time", "args": {"provider": "CPUExecutionProvider"}},
        {"cat": "Node", "name": "b_fence_before", "args": {"provider": "CPUExecutionProvider"}},
        {"cat": "Session", "name": "model_run", "args": {}},
    ]
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(events))
    assert profile_node_counts(profile) == {"CUDAExecutionProvider": 1, "CPUExecutionProvider": 1}


def test_missing_provider_names_the_gpu_extra() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    code, out, err = bench(MLP, "--provider", "cuda", *FAST)
    assert code == 1
    assert "optimodel[gpu]" in err and "CUDAExecutionProvider" in err
    assert "Traceback" not in out + err


def test_fell_back_decision_on_a_real_cpu_session() -> None:
    session = create_session(MLP)
    active = session.get_providers()
    assert "CUDAExecutionProvider" not in active
    assert fell_back_providers(["cuda"], active) == ["CUDAExecutionProvider"]
    assert fell_back_providers(["tensorrt", "cuda"], active) == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
    ]
    assert fell_back_providers(["cpu"], active) == []
    # Kept by name but given no node: a CPU run all the same.
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert fell_back_providers(["cuda"], gpu, {"CPUExecutionProvider": 6}) == [
        "CUDAExecutionProvider"
    ]
    assert (
        fell_back_providers(["cuda"], gpu, {"CUDAExecutionProvider": 5, "CPUExecutionProvider": 1})
        == []
    )


def test_fell_back_row_is_labelled_and_rendered_red() -> None:
    feed = {"features": np.zeros((1, 32), np.float32)}
    row = benchmark_model(MLP, SessionConfig(), feed, runs=3, warmup=0)
    # What a `--provider cuda` session that quietly dropped CUDA looks like.
    row["provider"] = "cuda"
    row["fell_back_providers"] = fell_back_providers(
        ["cuda"], row["providers_active"], row["nodes_by_provider"]
    )
    row["fell_back"] = bool(row["fell_back_providers"])
    row["provider_display"] = provider_label(row)
    assert row["fell_back"] is True
    assert row["provider_display"] == "cuda→CPU (fell back)"
    assert "requested CUDA but the session ran on CPU: these are CPU figures" in fallback_message(
        row
    )
    out = Console(record=True, width=200, color_system=None)
    bench_cmd.render_bench({"latency": add_ratios([row])}, out)
    text = out.export_text()
    assert "cuda→CPU (fell back)" in text
    assert "mlp.onnx" in text


def test_duration_runs_until_time_is_up() -> None:
    row = bench_json(MLP, "--duration", "0.3", "--warmup", "0")["latency"][0]
    assert row["duration_s"] == 0.3
    assert row["elapsed_s"] >= 0.3
    assert row["runs"] > 5


def test_data_file_feeds_its_first_batch() -> None:
    row = bench_json(CNN, "--data", DIGITS, "--batch-size", "16", *FAST)["latency"][0]
    assert row["batch_size"] == 16
    assert row["input_shapes"] == {"input": [16, 1, 8, 8]}
    assert "digits_test.npz" in row["data"]


def test_shape_threads_and_io_binding_are_recorded() -> None:
    row = bench_json(MLP, "--shape", "features=4x32", "--threads", "1", "--io-binding", *FAST)[
        "latency"
    ][0]
    assert row["batch_size"] == 4 and row["threads"] == 1 and row["io_binding"] is True
    assert row["p50_ms"] > 0


def test_report_writes_json_and_markdown(tmp_path: Path) -> None:
    json_path, md_path = tmp_path / "bench.json", tmp_path / "bench.md"
    code, _, err = bench(MLP, CNN, *FAST, "--report", json_path, "--report", md_path)
    assert code == 0, err
    data = json.loads(json_path.read_text())
    assert len(data["latency"]) == 2 and data["latency"][0]["latency_ratio"] == 1.0
    markdown = md_path.read_text()
    assert "## Latency" in markdown and "digits_cnn.onnx" in markdown


def test_table_output_shows_models_side_by_side() -> None:
    code, out, err = bench(MLP, CNN, *FAST)
    assert code == 0, err
    assert "mlp.onnx" in out and "digits_cnn.onnx" in out
    assert "p50 ms" in out and "nodes by provider" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--trt-fp16",), "--provider tensorrt"),
        (("--device-id", "0"), "--provider cuda"),
        (("--no-fallback",), "--no-fallback"),
        (("--shape", "nope=1x2"), "nope"),
    ],
)
def test_bad_option_combinations_fail_in_one_line(args: tuple[str, ...], message: str) -> None:
    code, out, err = bench(MLP, *FAST, *args)
    assert code in (1, 2)
    assert message in err and "Traceback" not in out + err


def test_tensorrt_and_cuda_flags_become_provider_options(tmp_path: Path) -> None:
    options = provider_options(
        ["tensorrt", "cuda"],
        device_id=1,
        trt_fp16=True,
        trt_int8=True,
        trt_engine_cache=tmp_path,
        trt_workspace_gb=2,
    )
    assert options["CUDAExecutionProvider"] == {"device_id": "1"}
    assert options["TensorrtExecutionProvider"] == {
        "device_id": "1",
        "trt_fp16_enable": "True",
        "trt_int8_enable": "True",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(tmp_path),
        "trt_max_workspace_size": str(2 * 2**30),
    }
    assert provider_options(["cpu"]) == {}
    with pytest.raises(UsageError):
        provider_options(["cuda"], trt_fp16=True)

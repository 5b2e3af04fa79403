"""compare: per-layer SQNR / cosine between the float digits CNN and its static int8 copy."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

from optimodel.data import load_data, model_input_specs
from optimodel.passes import get_pass
from optimodel.quant.layers import compare_layers, match_tensors
from tests.conftest import SAMPLES, CliResult

DIGITS = SAMPLES / "digits_cnn.onnx"
DIGITS_DATA = SAMPLES / "digits_test.npz"


@pytest.fixture(scope="module")
def digits_int8() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    model = onnx.load(str(DIGITS))
    quantized = get_pass(
        "quantize", mode="static", calib_data=str(DIGITS_DATA), calib_samples=32
    ).run(model)
    return model, quantized.model


def _feeds(model: onnx.ModelProto, n: int = 8) -> list:
    return list(load_data(DIGITS_DATA, model_input_specs(model), num_samples=n))


@pytest.fixture
def ccli(cli):
    """`optimodel compare ...`, through the main app once the command is registered there."""
    from optimodel.cli.app import app

    if any(c.name == "compare" for c in app.registered_commands):
        return cli
    import typer
    from typer.testing import CliRunner

    from optimodel.cli import compare_cmd

    local = typer.Typer(pretty_exceptions_enable=False)

    @local.callback()
    def _root() -> None:
        """Stand-in for the root callback."""

    local.command("compare")(compare_cmd.compare)
    runner = CliRunner()

    def run(*args: str) -> CliResult:
        result = runner.invoke(local, [str(a) for a in args])
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run


def test_layers_of_static_int8_are_compared_in_topological_order(digits_int8):
    model, quantized = digits_int8
    result = compare_layers(model, quantized, _feeds(model), chunk=4)
    names = [r.tensor for r in result.rows]
    print(
        "\n"
        + "\n".join(
            f"{r.index:2} {r.tensor:24} {r.op_type:18} SQNR {r.snr_db:7.2f} dB "
            f"cosine {r.cosine:.5f} jump {r.jump_db}"
            for r in result.rows
        )
    )
    assert len(result.rows) >= 8 and names[-1] == "logits"
    assert "stem_relu_out" in names and "pool_out" in names
    order = [n.output[0] for n in model.graph.node]
    assert [order.index(n) for n in names] == sorted(order.index(n) for n in names)
    assert all(r.snr_db is not None and math.isfinite(r.snr_db) for r in result.rows)
    assert all(r.snr_db > 20 and r.cosine > 0.99 for r in result.rows)  # good calibration
    worst = result.worst(5)
    assert [r.snr_db for r in worst] == sorted(r.snr_db for r in worst)
    assert result.first_error is not None and result.first_error.tensor == names[0]
    # Q/DQ: a re-quantized tensor is read where the next layer reads it, after its DQ
    by_name = {r.tensor: r for r in result.rows}
    writers = {o: n.op_type for n in quantized.graph.node for o in n.output}
    assert writers[by_name["stem_relu_out"].read_as] == "DequantizeLinear"
    assert by_name["logits"].read_as == "logits"


def test_chunking_gives_the_same_numbers(digits_int8):
    model, quantized = digits_int8
    feeds = _feeds(model, 4)
    small = compare_layers(model, quantized, feeds, chunk=2)
    whole = compare_layers(model, quantized, feeds, chunk=100)
    assert small.sessions == math.ceil(len(small.rows) / 2) and whole.sessions == 1
    assert [r.tensor for r in small.rows] == [r.tensor for r in whole.rows]
    np.testing.assert_allclose(
        [r.snr_db for r in small.rows], [r.snr_db for r in whole.rows], rtol=1e-9
    )
    np.testing.assert_allclose(
        [r.cosine for r in small.rows], [r.cosine for r in whole.rows], rtol=1e-12
    )


def test_dynamic_quantization_keeps_output_names():
    model = onnx.load(str(DIGITS))
    dynamic = get_pass("quantize", mode="dynamic", op_types=["Conv", "MatMul"]).run(model).model
    probes, _ = match_tensors(model, dynamic)
    read = {p.tensor: p.read for p in probes}
    assert read["stem_bn_out"] == "stem_bn_out" and read["logits"] == "logits"
    result = compare_layers(model, dynamic, _feeds(model, 2))
    assert all(r.snr_db is not None and r.snr_db > 20 for r in result.rows)


def test_identical_models_have_no_error(digits_int8):
    model, _ = digits_int8
    result = compare_layers(model, model, _feeds(model, 2), chunk=5)
    assert result.rows and all(r.snr_db is None and r.max_abs == 0 for r in result.rows)
    assert result.first_error is None and result.jumps == []


def test_cli_json_and_report(ccli, tmp_path, digits_int8):
    _, quantized = digits_int8
    path = tmp_path / "q.onnx"
    onnx.save(quantized, str(path))
    report = tmp_path / "cmp.json"
    result = ccli(
        "compare", DIGITS, path, "--layers", "--data", DIGITS_DATA, "--samples", "4",
        "--chunk", "3", "--top", "3", "--json", "--report", report,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    layers = data["inspect"]["layer_comparison"]
    assert layers["chunk"] == 3 and layers["feeds"] == 4 and len(layers["worst"]) == 3
    assert layers["layers"][-1]["tensor"] == "logits"
    assert data["verification"]["outputs"][0]["name"] == "logits"
    assert json.loads(report.read_text())["subcommand"] == "compare"
    table = ccli("compare", DIGITS, path, "--layers", "--data", DIGITS_DATA, "--samples", "2")
    assert table.exit_code == 0 and "first tensor that differs" in table.stdout

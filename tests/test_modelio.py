"""Model I/O: loading, refusing bad files, atomic saves, external data, provenance."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from optimodel.errors import ModelLoadError, OptimodelError
from optimodel.modelio import (
    Provenance,
    check_model,
    load_model,
    read_provenance,
    save_model,
)
from tests.conftest import SAMPLES, sha256


def run(model_path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_save_then_load_round_trips_numbers(tmp_path, tiny_model):
    out = save_model(tiny_model, tmp_path / "tiny.onnx", provenance=Provenance("optimodel test"))
    x = np.array([[1, 2, 3, 4], [-1, 0, 1, 0]], dtype=np.float32)
    np.testing.assert_allclose(run(out, x), [[5.5, 5.5, 7], [0, 0, 1]], atol=1e-6)
    loaded = load_model(out)
    assert read_provenance(loaded)["command"] == "optimodel test"
    assert read_provenance(loaded)["version"]


def test_save_with_known_bytes_writes_the_stamped_model(tmp_path, tiny_model):
    """The provenance is appended to the model's known bytes, not serialized again: the
    file must parse to exactly the stamped model, and a second stamp must replace the
    first (no duplicated keys)."""
    tiny_model.metadata_props.add(key="author", value="someone")
    known = tiny_model.SerializeToString()
    out = save_model(
        tiny_model, tmp_path / "a.onnx", provenance=Provenance("optimodel a"), payload=known
    )
    written = onnx.load(str(out))
    assert written == tiny_model  # the in-memory model was stamped the same way
    assert [p.key for p in written.metadata_props].count("optimodel.command") == 1
    assert [p.key for p in written.metadata_props][0] == "author"
    again = save_model(
        written,
        tmp_path / "b.onnx",
        provenance=Provenance("optimodel b"),
        payload=written.SerializeToString(),
    )
    second = onnx.load(str(again))
    assert read_provenance(second)["command"] == "optimodel b"
    assert [p.key for p in second.metadata_props].count("optimodel.command") == 1
    x = np.ones((1, 4), np.float32)
    np.testing.assert_array_equal(run(out, x), run(again, x))


def test_refuses_to_overwrite_input(tmp_path, tiny_model):
    src = tmp_path / "m.onnx"
    onnx.save(tiny_model, src)
    before = sha256(src)
    with pytest.raises(OptimodelError, match="overwrite the input"):
        save_model(tiny_model, src, input_path=src, force=True)
    with pytest.raises(OptimodelError, match="overwrite the input"):
        save_model(tiny_model, tmp_path / "." / "m.onnx", input_path=src, force=True)
    assert sha256(src) == before


def test_existing_output_needs_force(tmp_path, tiny_model):
    out = tmp_path / "o.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(OptimodelError, match="--force"):
        save_model(tiny_model, out)
    assert out.read_bytes() == b"keep me"
    save_model(tiny_model, out, force=True)
    assert load_model(out).graph.node[0].op_type == "MatMul"


def test_failed_save_keeps_existing_output_and_leaves_no_temp(tmp_path, tiny_model):
    out = tmp_path / "o.onnx"
    save_model(tiny_model, out)
    before = sha256(out)
    broken = onnx.ModelProto()
    broken.CopyFrom(tiny_model)
    broken.graph.node[0].input[0] = "does_not_exist"
    with pytest.raises(ModelLoadError, match="checker"):
        save_model(broken, out, force=True)
    assert sha256(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]


def test_external_data_saved_next_to_output_with_relative_location(tmp_path):
    weight = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["y"])],
        "ext",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 64])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    out = save_model(model, tmp_path / "sub" / "big.onnx", external_data=True)
    data = tmp_path / "sub" / "big.onnx.data"
    assert data.stat().st_size == weight.nbytes
    raw = onnx.load(str(out), load_external_data=False)
    locations = {
        e.value for t in raw.graph.initializer for e in t.external_data if e.key == "location"
    }
    assert locations == {"big.onnx.data"}
    x = np.ones((2, 64), dtype=np.float32)
    np.testing.assert_allclose(run(out, x), x @ weight, rtol=1e-5)
    # the in-memory model still holds its data after an external save
    assert numpy_helper.to_array(model.graph.initializer[0]).shape == (64, 64)
    # and a moved copy of the pair still loads (relative location)
    moved = tmp_path / "moved"
    moved.mkdir()
    os.replace(out, moved / "big.onnx")
    os.replace(data, moved / "big.onnx.data")
    np.testing.assert_allclose(run(moved / "big.onnx", x), x @ weight, rtol=1e-5)
    assert np.array_equal(
        numpy_helper.to_array(load_model(moved / "big.onnx").graph.initializer[0]), weight
    )


def _external_model(tmp_path: Path, location: str) -> Path:
    tensor = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "W")
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [tensor],
    )
    path = tmp_path / "models" / "m.onnx"
    path.parent.mkdir(exist_ok=True)
    onnx.save(onnx.helper.make_model(graph), path)
    return path


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("../secret.bin", "escapes"),
        ("/etc/passwd", "absolute"),
        ("missing.bin", "missing"),
    ],
)
def test_refuses_untrusted_external_data(tmp_path, location, message):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    path = _external_model(tmp_path, location)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_refuses_symlink_escaping_folder(tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    path = _external_model(tmp_path, "link.bin")
    (path.parent / "link.bin").symlink_to(tmp_path / "secret.bin")
    with pytest.raises(ModelLoadError, match="escapes"):
        load_model(path)


def test_refuses_truncated_external_data(tmp_path):
    path = _external_model(tmp_path, "w.bin")
    (path.parent / "w.bin").write_bytes(b"\0" * 10)  # 64 bytes needed
    raw = onnx.load(str(path), load_external_data=False)
    raw.graph.initializer[0].external_data.add(key="length", value="64")
    onnx.save(raw, path)
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b"this is a text file, not a model\n" * 4, "not"),
        (bytes(range(256)) * 8, "not"),
    ],
)
def test_refuses_non_models(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_refuses_truncated_model(tmp_path):
    data = (SAMPLES / "digits_cnn.onnx").read_bytes()
    path = tmp_path / "trunc.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=str(path.name)):
        load_model(path)


def test_missing_and_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(ModelLoadError, match="folder"):
        load_model(tmp_path)


def test_checker_error_is_one_line(tiny_model):
    tiny_model.graph.node[1].input[1] = "undefined_tensor"
    with pytest.raises(ModelLoadError) as info:
        check_model(tiny_model, "tiny.onnx")
    assert "tiny.onnx: fails the ONNX checker" in str(info.value)
    assert "\n" not in str(info.value)

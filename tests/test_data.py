"""Data loading: stacked .npz, folders of feeds, random data, and refusals (no pickle)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from optimodel.data import load_data, model_input_specs, parse_int_range, parse_shapes
from optimodel.errors import DataError, UsageError
from tests.conftest import SAMPLES


@pytest.fixture(scope="module")
def digits_specs():
    return model_input_specs(onnx.load(str(SAMPLES / "digits_cnn.onnx")))


@pytest.fixture(scope="module")
def transformer_specs():
    return model_input_specs(onnx.load(str(SAMPLES / "transformer_block.onnx")))


def test_parse_shapes():
    assert parse_shapes(["x=1x3x224x224", "mask:2,16"]) == {"x": (1, 3, 224, 224), "mask": (2, 16)}
    for bad in ["x=", "x=1xax3", "=1x2", "x=0x3", "x"]:
        with pytest.raises(UsageError, match="--shape"):
            parse_shapes([bad])


def test_parse_int_range():
    assert parse_int_range("0:255") == (0, 255)
    assert parse_int_range("-5,5") == (-5, 5)
    with pytest.raises(UsageError):
        parse_int_range("9:1")


def test_stacked_npz_batches_along_dynamic_batch_axis(digits_specs):
    data = load_data(SAMPLES / "digits_test.npz", digits_specs, batch_size=100)
    batches = list(data)
    assert [b.size for b in batches] == [100, 100, 100, 100, 50]
    assert batches[0].feed["input"].shape == (100, 1, 8, 8)
    assert batches[-1].labels.shape == (50,)
    assert data.has_labels and data.num_feeds == 5
    whole = np.load(SAMPLES / "digits_test.npz")
    np.testing.assert_array_equal(batches[1].feed["input"], whole["input"][100:200])


def test_stacked_npz_with_extra_samples_axis(tmp_path, transformer_specs):
    arr = np.random.default_rng(0).random((3, 2, 5, 64), dtype=np.float32)
    np.savez(tmp_path / "d.npz", hidden_states=arr)
    feeds = list(load_data(tmp_path / "d.npz", transformer_specs))
    assert len(feeds) == 3 and feeds[2].feed["hidden_states"].shape == (2, 5, 64)
    np.testing.assert_array_equal(feeds[2].feed["hidden_states"], arr[2])


def test_folder_of_feeds_with_varying_shapes(tmp_path, transformer_specs):
    rng = np.random.default_rng(1)
    for i, seq in enumerate([3, 7, 5]):
        np.savez(tmp_path / f"feed_{i:02d}.npz", hidden_states=rng.random((1, seq, 64)))
    feeds = list(load_data(tmp_path, transformer_specs))
    assert [f.feed["hidden_states"].shape[1] for f in feeds] == [3, 7, 5]
    assert load_data(tmp_path, transformer_specs).same_shapes is False  # from the headers
    assert all(f.feed["hidden_states"].dtype == np.float32 for f in feeds)  # cast from float64


def test_random_data_uses_shape_and_int_range():
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (int32[N, L] ids, float[N, 3] f) => (int32[N, L] y) { y = Identity(ids) }"""
    )
    specs = model_input_specs(model)
    data = load_data("random", specs, shapes={"ids": (2, 2048)}, int_range=(0, 256), num_samples=3)
    feeds = list(data)
    assert len(feeds) == 3
    ids = feeds[0].feed["ids"]
    assert ids.shape == (2, 2048) and ids.dtype == np.int32
    assert ids.min() >= 0 and ids.max() <= 256
    assert feeds[0].feed["f"].shape == (1, 3)
    again = list(load_data("random", specs, shapes={"ids": (2, 2048)}, int_range=(0, 256)))
    np.testing.assert_array_equal(again[0].feed["ids"], ids)  # seeded: reproducible


def test_refuses_pickled_npz(tmp_path, digits_specs):
    np.savez(tmp_path / "evil.npz", input=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="pickle"):
        list(load_data(tmp_path / "evil.npz", digits_specs))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"image": np.zeros((2, 1, 8, 8), np.float32)}, "missing input"),
        ({"input": np.zeros((2, 1, 8, 9), np.float32)}, "axis 3 is 9, not 8"),
        ({"input": np.zeros((2, 8, 8), np.float32)}, "rank"),
        ({"input": np.zeros((2, 1, 8, 8), np.int64)}, "int64 but the model expects float32"),
        ({"input": np.zeros((0, 1, 8, 8), np.float32)}, "zero samples"),
    ],
)
def test_bad_npz_is_one_clear_error(tmp_path, digits_specs, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=message):
        list(load_data(tmp_path / "d.npz", digits_specs))


def test_bad_files_and_folders(tmp_path, digits_specs):
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_data(tmp_path / "x.npz", digits_specs)
    with pytest.raises(DataError, match="no such"):
        load_data(tmp_path / "nope.npz", digits_specs)
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(DataError, match="unsupported"):
        load_data(tmp_path / "x.csv", digits_specs)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .npz"):
        load_data(empty, digits_specs)
    with pytest.raises(DataError, match="unknown input"):
        load_data("random", digits_specs, shapes={"image": (1, 1, 8, 8)})
    with pytest.raises(DataError, match="conflicts"):
        load_data("random", digits_specs, shapes={"input": (1, 3, 8, 8)})


def test_random_ids_stay_inside_the_table_they_index():
    """token_type_ids into a 2-row table get 0/1 (a 0..255 id would crash the Gather);
    ids into a big vocabulary keep the usual range; other ints are left alone."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Gather", ["vocab", "tokens"], ["t"]),
        helper.make_node("Cast", ["types"], ["cast"], to=TensorProto.INT64),
        helper.make_node("Gather", ["segment", "cast"], ["s"]),
        helper.make_node("Add", ["t", "s"], ["y"]),
        helper.make_node("Identity", ["other"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ids",
        [
            helper.make_tensor_value_info("tokens", TensorProto.INT64, ["N", 8]),
            helper.make_tensor_value_info("types", TensorProto.INT32, ["N", 8]),
            helper.make_tensor_value_info("other", TensorProto.INT64, ["N"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 4]),
            helper.make_tensor_value_info("z", TensorProto.INT64, ["N"]),
        ],
        [
            numpy_helper.from_array(np.ones((1000, 4), np.float32), "vocab"),
            numpy_helper.from_array(np.ones((2, 4), np.float32), "segment"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    specs = {s.name: s for s in model_input_specs(model)}
    assert specs["tokens"].index_limit == 1000
    assert specs["types"].index_limit == 2
    assert specs["other"].index_limit is None
    feed = next(iter(load_data("random", list(specs.values()), batch_size=64))).feed
    assert set(np.unique(feed["types"])) <= {0, 1}
    assert feed["tokens"].max() > 1 and feed["other"].max() > 1
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    session.run(None, feed)  # runs: no id outside its table


def test_random_ids_stay_inside_onnxruntimes_fused_embedding_tables():
    """After `fuse --target ort` the lookups are one EmbedLayerNormalization node."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    tables = {"word": (50, 16), "position": (8, 16), "segment": (2, 16)}
    inits = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        for name, shape in tables.items()
    ]
    inits += [
        numpy_helper.from_array(np.ones(16, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(16, np.float32), "beta"),
    ]
    node = helper.make_node(
        "EmbedLayerNormalization",
        ["ids", "segments", "word", "position", "segment", "gamma", "beta"],
        ["out", "mask_index"],
        domain="com.microsoft",
        epsilon=1e-5,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT32, [1, 8]),
            helper.make_tensor_value_info("segments", TensorProto.INT32, [1, 8]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 16])],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    model.ir_version = 8
    specs = {s.name: s for s in model_input_specs(model)}
    assert specs["ids"].index_limit == 50 and specs["segments"].index_limit == 2
    feed = next(iter(load_data("random", list(specs.values()), num_samples=1))).feed
    assert feed["ids"].max() < 50 and feed["segments"].max() < 2
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, feed)[0].shape == (1, 8, 16)


def _pb_sets(root, arrays, named=True):
    """ONNX's test-data layout: root/test_data_set_N/input_0.pb, one feed per set."""
    from onnx import numpy_helper

    for i, array in enumerate(arrays):
        folder = root / f"test_data_set_{i}"
        folder.mkdir(parents=True)
        tensor = numpy_helper.from_array(array, "input" if named else "")
        (folder / "input_0.pb").write_bytes(tensor.SerializeToString())


def test_onnx_test_data_sets_are_feeds(tmp_path, digits_specs):
    with np.load(SAMPLES / "digits_test.npz") as data:
        images = [data["input"][i : i + 1] for i in range(12)]
    _pb_sets(tmp_path / "named", images)
    _pb_sets(tmp_path / "positional", images, named=False)  # unnamed: matched by position
    for root in (tmp_path / "named", tmp_path / "positional"):
        dataset = load_data(root, digits_specs)
        feeds = list(dataset)
        assert dataset.num_feeds == 12 and len(feeds) == 12
        for feed, image in zip(feeds, images, strict=True):  # test_data_set_10 after _9
            np.testing.assert_array_equal(feed.feed["input"], image)
    one = list(load_data(tmp_path / "named" / "test_data_set_3", digits_specs))
    assert len(one) == 1
    np.testing.assert_array_equal(one[0].feed["input"], images[3])


def test_bad_onnx_test_data_sets_are_one_line_errors(tmp_path, digits_specs):
    _pb_sets(tmp_path / "wrong_shape", [np.zeros((1, 1, 5, 5), np.float32)])
    with pytest.raises(DataError, match="expects"):
        load_data(tmp_path / "wrong_shape", digits_specs)
    corrupt = tmp_path / "corrupt" / "test_data_set_0"
    corrupt.mkdir(parents=True)
    (corrupt / "input_0.pb").write_bytes(b"\xff\xff not a tensor")
    with pytest.raises(DataError, match="not a readable TensorProto"):
        load_data(tmp_path / "corrupt", digits_specs)
    extra = tmp_path / "wrong_count" / "test_data_set_0"
    _pb_sets(tmp_path / "wrong_count", [np.zeros((1, 1, 8, 8), np.float32)])
    (extra / "input_1.pb").write_bytes((extra / "input_0.pb").read_bytes())
    with pytest.raises(DataError, match="2 input_\\*.pb file"):
        load_data(tmp_path / "wrong_count", digits_specs)

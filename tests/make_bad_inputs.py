"""Generate a corpus of malformed and hostile model files for the hardening tests.

Run as a script (`python tests/make_bad_inputs.py DIR`) to write the corpus into DIR,
or call `build_corpus(DIR)` from a test. Each case says which exit codes each command
may end with: a clean error (1, or 2 for usage) or, where the input is legal but odd,
success.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "sample_models" / "digits_cnn.onnx"

ERROR = frozenset({1})
OK = frozenset({0})
EITHER = frozenset({0, 1})


@dataclass
class Case:
    """One hostile input and the exit codes each command may give for it."""

    name: str
    path: Path
    expect: dict[str, frozenset[int]] = field(default_factory=dict)
    default: frozenset[int] = ERROR

    def allowed(self, command: str) -> frozenset[int]:
        return self.expect.get(command, self.default)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto] | None = None,
    outputs: list[onnx.ValueInfoProto] | None = None,
    initializers: list[onnx.TensorProto] | None = None,
    opset: int = 17,
    extra_opsets: dict[str, int] | None = None,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "bad",
        inputs
        if inputs is not None
        else [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        outputs
        if outputs is not None
        else [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializers or [],
    )
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def _short_tensor() -> onnx.TensorProto:
    """A float [1, 4] tensor whose raw data holds 6 bytes instead of 16."""
    tensor = onnx.TensorProto(name="k", data_type=TensorProto.FLOAT, raw_data=b"\0" * 6)
    tensor.dims.extend([1, 4])
    return tensor


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _external(
    folder: Path, name: str, location: str, make_file: Callable[[Path], None] | None
) -> Path:
    sub = folder / name
    sub.mkdir()
    tensor = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], initializers=[tensor])
    if make_file:
        make_file(sub)
    return _save(model, sub / "model.onnx")


def build_corpus(folder: Path) -> list[Case]:
    """Write every hostile input into `folder` and describe what each command may do."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "outside.bin").write_bytes(np.ones(16, np.float32).tobytes())
    cases: list[Case] = []
    digits = DIGITS.read_bytes()
    relu = [helper.make_node("Relu", ["x"], ["y"])]

    def raw(name: str, data: bytes) -> None:
        path = folder / name
        path.write_bytes(data)
        cases.append(Case(name, path))

    raw("empty.onnx", b"")
    raw("random_bytes.onnx", np.random.default_rng(0).bytes(4096))
    raw("truncated.onnx", digits[: len(digits) // 3])
    raw("truncated_tail.onnx", digits[:-7])
    raw("text.onnx", b"this is not a model\n" * 40)
    raw("json.onnx", b'{"graph": {"node": []}}')
    raw("zip.onnx", b"PK\x03\x04" + b"\0" * 100)
    (folder / "folder.onnx").mkdir()
    cases.append(Case("folder.onnx", folder / "folder.onnx"))
    cases.append(Case("missing.onnx", folder / "missing.onnx"))

    no_graph = onnx.ModelProto()
    no_graph.ir_version = 8
    cases.append(Case("no_graph.onnx", _save(no_graph, folder / "no_graph.onnx")))

    cycle = _model(
        [
            helper.make_node("Relu", ["b"], ["a"], name="n1"),
            helper.make_node("Relu", ["a"], ["b"], name="n2"),
            helper.make_node("Add", ["x", "b"], ["y"], name="n3"),
        ]
    )
    cases.append(Case("cycle.onnx", _save(cycle, folder / "cycle.onnx")))
    dangling = _model([helper.make_node("Add", ["x", "nowhere"], ["y"])])
    cases.append(Case("dangling_input.onnx", _save(dangling, folder / "dangling_input.onnx")))
    duplicate = _model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Abs", ["x"], ["y"])]
    )
    cases.append(Case("duplicate_output.onnx", _save(duplicate, folder / "duplicate_output.onnx")))
    unproduced = _model(
        relu, outputs=[helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])]
    )
    cases.append(
        Case("unproduced_output.onnx", _save(unproduced, folder / "unproduced_output.onnx"))
    )
    cases.append(
        Case("unknown_opset.onnx", _save(_model(relu, opset=999), folder / "unknown_opset.onnx"))
    )
    no_opset = _model(relu)
    del no_opset.opset_import[:]
    cases.append(Case("no_opset.onnx", _save(no_opset, folder / "no_opset.onnx")))
    empty_op = _model([helper.make_node("", ["x"], ["y"])])
    cases.append(Case("empty_op_type.onnx", _save(empty_op, folder / "empty_op_type.onnx")))
    unknown_op = _model([helper.make_node("NoSuchOp", ["x"], ["y"])])
    cases.append(Case("unknown_op.onnx", _save(unknown_op, folder / "unknown_op.onnx")))
    custom = _model(
        [helper.make_node("Fancy", ["x"], ["y"], domain="com.example")],
        extra_opsets={"com.example": 1},
    )
    # A custom-domain op is legal: inspect lists it, fold keeps it (unverified, said);
    # commands that must execute the model fail cleanly without its kernel library.
    cases.append(
        Case(
            "custom_domain.onnx",
            _save(custom, folder / "custom_domain.onnx"),
            expect={"inspect": OK, "fold": OK, "fuse": OK, "prune": OK, "optimize": OK},
        )
    )
    type_clash = _model(
        [helper.make_node("Add", ["x", "k"], ["y"])],
        initializers=[numpy_helper.from_array(np.ones((1, 4), np.int64), "k")],
    )
    cases.append(Case("type_mismatch.onnx", _save(type_clash, folder / "type_mismatch.onnx")))
    short_raw = _model(
        [helper.make_node("Add", ["x", "k"], ["y"])],
        initializers=[_short_tensor()],
    )
    cases.append(
        Case("raw_data_too_short.onnx", _save(short_raw, folder / "raw_data_too_short.onnx"))
    )
    untyped = _model(relu, inputs=[onnx.ValueInfoProto(name="x")])
    cases.append(Case("untyped_input.onnx", _save(untyped, folder / "untyped_input.onnx")))
    negative = _model(
        relu,
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, -4])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, -4])],
    )
    cases.append(
        Case(
            "negative_dim.onnx",
            _save(negative, folder / "negative_dim.onnx"),
            expect={"inspect": EITHER},
        )
    )
    huge = _model(
        relu,
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1 << 20, 1 << 20])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [1 << 20, 1 << 20])],
    )
    cases.append(
        Case("huge_dim.onnx", _save(huge, folder / "huge_dim.onnx"), expect={"inspect": OK})
    )
    string_in = _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        inputs=[helper.make_tensor_value_info("x", TensorProto.STRING, [1])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.STRING, [1])],
    )
    cases.append(
        Case(
            "string_input.onnx",
            _save(string_in, folder / "string_input.onnx"),
            expect={"inspect": OK},
        )
    )
    weights = np.ones((4, 4), np.float32)
    weights[0, 0], weights[1, 1] = np.nan, np.inf
    nan = _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        initializers=[numpy_helper.from_array(weights, "W")],
    )
    # NaN / Inf weights are legal data: every command works and never crashes on them.
    cases.append(
        Case(
            "nan_weights.onnx",
            _save(nan, folder / "nan_weights.onnx"),
            default=OK,
            expect={"quantize": EITHER},  # no int8 scale exists for NaN: a clean refusal
        )
    )
    zero = _model(
        [helper.make_node("Concat", ["x", "E"], ["y"], axis=0)],
        initializers=[numpy_helper.from_array(np.zeros((0, 4), np.float32), "E")],
    )
    cases.append(
        Case("zero_size_tensor.onnx", _save(zero, folder / "zero_size_tensor.onnx"), default=OK)
    )
    bad_loop = _model(
        [
            helper.make_node(
                "Loop",
                ["", "cond"],
                ["y"],
                body=helper.make_graph([], "body", [], []),
            )
        ],
        initializers=[numpy_helper.from_array(np.array(True), "cond")],
    )
    cases.append(Case("bad_loop_body.onnx", _save(bad_loop, folder / "bad_loop_body.onnx")))

    cases.append(Case("ext_missing.onnx", _external(folder, "ext_missing", "w.bin", None)))
    cases.append(Case("ext_dotdot.onnx", _external(folder, "ext_dotdot", "../outside.bin", None)))
    cases.append(
        Case(
            "ext_absolute.onnx",
            _external(folder, "ext_absolute", str((folder / "outside.bin").resolve()), None),
        )
    )

    def link(sub: Path) -> None:
        os.symlink(folder / "outside.bin", sub / "w.bin")

    cases.append(Case("ext_symlink.onnx", _external(folder, "ext_symlink", "w.bin", link)))

    def short(sub: Path) -> None:
        (sub / "w.bin").write_bytes(b"\0" * 8)

    short_ext = _external(folder, "ext_short", "w.bin", short)
    model = onnx.load(str(short_ext), load_external_data=False)
    model.graph.initializer[0].external_data.add(key="length", value="64")
    _save(model, short_ext)
    cases.append(Case("ext_truncated.onnx", short_ext))
    return cases


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "bad_inputs")
    for case in build_corpus(target):
        print(case.name)

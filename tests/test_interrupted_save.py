"""A save killed with SIGKILL leaves no output or a complete one, never a partial one."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import ROOT

CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from optimodel.modelio import save_model

    weights = [numpy_helper.from_array(np.full((1024, 1024 * 4), i, np.float32), f"w{i}")
               for i in range(6)]  # 6 x 16 MB
    nodes, prev = [], "x"
    for i in range(6):
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"y{i}"]))
        nodes.append(helper.make_node("Slice", [f"y{i}", "s", "e", "a"], [f"z{i}"]))
        prev = f"z{i}"
    extra = [numpy_helper.from_array(np.array(v, np.int64), n)
             for n, v in (("s", [0]), ("e", [1024]), ("a", [1]))]
    graph = helper.make_graph(
        nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 1024])], weights + extra)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    print("ready", flush=True)
    save_model(model, sys.argv[1], force=True, external_data=True)
    print("saved", flush=True)
    """
)


def _outcome(out: Path) -> str:
    """'absent', 'complete' or a description of a partial output."""
    if not out.exists():
        return "absent"
    try:
        model = onnx.load(str(out))
        onnx.checker.check_model(model)
        arrays = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer[:6]]
        if all(a.shape == (1024, 4096) and float(a[0, 0]) == i for i, a in enumerate(arrays)):
            return "complete"
        return "partial: wrong weights"
    except Exception as exc:  # what a half-written model looks like
        return f"partial: {type(exc).__name__}: {exc}"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("delay", [0.0, 0.15, 0.3, 0.6])
def test_sigkill_during_save(tmp_path, delay):
    out = tmp_path / "big.onnx"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    state = _outcome(out)
    assert state in ("absent", "complete"), state
    print(f"killed after {delay} s: output {state}")
    # a later save to the same output cleans the temporary folder the killed one left
    from optimodel.modelio import load_model, save_model

    small = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    small.ir_version = 8
    save_model(small, out, force=True)
    assert load_model(out).graph.node[0].op_type == "Relu"
    assert not list(tmp_path.glob(".big.onnx.*.tmp"))


def test_failed_force_rewrite_keeps_the_existing_output(tmp_path):
    from optimodel.modelio import save_model

    out = tmp_path / "m.onnx"
    weights = np.ones((64, 64), np.float32)
    good = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("MatMul", ["x", "W"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
            [onnx.numpy_helper.from_array(weights, "W")],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    good.ir_version = 8
    save_model(good, out, external_data=True)
    before = (out.read_bytes(), (tmp_path / "m.onnx.data").read_bytes())
    bad = onnx.ModelProto()
    bad.CopyFrom(good)
    bad.graph.node[0].input[1] = "missing"
    with pytest.raises(Exception, match="checker"):
        save_model(bad, out, force=True, external_data=True)
    assert (out.read_bytes(), (tmp_path / "m.onnx.data").read_bytes()) == before

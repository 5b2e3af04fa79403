"""Does an execution provider really start here? Being listed in the build is not enough.

onnxruntime-gpu lists CUDA and TensorRT whether or not their libraries are installed; a
missing libcudnn or libnvinfer shows only when a session starts, and then ONNX Runtime
prints the reason to the console and quietly retries on the CPU. `probe_provider` starts
a one-node session on the provider alone, captures that console text at the file
descriptor level (it comes from C++ as well as Python) and returns the reason in one line.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# What ONNX Runtime prints when a provider's library cannot load, most telling first.
_REASONS = (
    re.compile(r"with error: (.+?)(?:\x1b\[|$)", re.MULTILINE),
    re.compile(r"EP Error (.+?) when using", re.DOTALL),
)


@contextlib.contextmanager
def captured_output() -> Iterator[list[str]]:
    """Capture stdout and stderr, fds 1 and 2 and Python's; the text lands in the list."""
    box: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    python_text = io.StringIO()  # where sys.stdout is not fd 1 (a test runner, a notebook)
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(python_text), contextlib.redirect_stderr(python_text):
                yield box
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            box.append(sink.read().decode("utf-8", "replace") + python_text.getvalue())


def failure_reason(text: str) -> str | None:
    """The one line that says why a provider did not start, from ONNX Runtime's output."""
    for pattern in _REASONS:
        match = pattern.search(text)
        if match:
            return " ".join(match.group(1).split())[:240]
    return None


def _tiny_model() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def probe_provider(name: str) -> str | None:
    """None when provider `name` (ORT's name) starts a session here, else why not."""
    import onnxruntime as ort

    if name not in ort.get_available_providers():
        return f"{name} is not in this ONNX Runtime build"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session, error = None, ""
    with captured_output() as text:
        try:
            session = ort.InferenceSession(_tiny_model(), options, providers=[name])
        except Exception as exc:  # the reason is the finding
            error = " ".join(str(exc).split())[:240]
    if session is None:
        return failure_reason(text[0]) or error
    if name not in session.get_providers():
        return failure_reason(text[0]) or "the session fell back to the CPU"
    return None

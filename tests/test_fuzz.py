"""Mutated sample models through every pass: a verified output or a clean error, never a crash.

Hypothesis mutates the sample models (drop or duplicate a node, change an attribute,
swap two inputs, change an initializer's or a graph input's dtype, change an input dim),
saves each mutant and runs fold, fuse, quantize (dynamic), prune (0.5 unstructured) and
fp16 on it through `transform_file` with verification on. Each run must end in a written
output that passes the ONNX checker and loads in ONNX Runtime, or in an `OptimodelError`;
any other exception, a pass skipped for an internal error, a dead worker or a run over
the time limit is a finding.

The runs happen in a worker process (`python -m tests.test_fuzz --serve`) that reads one
JSON job a line and answers one JSON line, so a hang or crash in native code is caught
by a timeout and the worker is restarted.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from onnx import AttributeProto, TensorProto, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_MODELS = sorted((ROOT / "sample_models").glob("*.onnx"))
RUN_TIMEOUT = 60.0  # seconds one transform_file run may take, worker start included
PASS_NAMES = ("fold", "fuse", "quantize", "prune", "fp16")

# ---------------------------------------------------------------------------- worker


def _passes(name: str) -> list[Any]:
    from optimodel.passes import get_pass

    options: dict[str, dict[str, Any]] = {
        "fold": {},
        "fuse": {},
        "quantize": {"mode": "dynamic"},
        "prune": {"sparsity": 0.5, "granularity": "unstructured", "min_params": 1},
        "fp16": {},
    }
    return [get_pass(name, **options[name])]


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One transform_file run; what it ended in, as a JSON-able dict."""
    from optimodel.errors import OptimodelError
    from optimodel.transform import transform_file

    source, target = Path(job["input"]), Path(job["output"])
    try:
        report = transform_file(
            source, target, _passes(job["pass"]), subcommand=job["pass"], verify=True
        )
    except OptimodelError as exc:
        if target.exists():
            return {"outcome": "bad", "detail": f"output left behind after error: {exc}"}
        return {"outcome": "error", "detail": str(exc)}
    except Exception:
        return {"outcome": "crash", "detail": traceback.format_exc(limit=8)}
    internal = [p["reason"] for p in report.passes if "internal error" in (p["reason"] or "")]
    if internal:
        return {"outcome": "crash", "detail": f"pass skipped: {internal[0]}"}
    try:
        onnx.checker.check_model(str(target))
        import onnxruntime as ort

        ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    except Exception as exc:
        return {"outcome": "bad", "detail": f"output unusable: {type(exc).__name__}: {exc}"}
    return {"outcome": "ok", "detail": ""}


def _serve() -> None:
    """Answer JSON jobs read from stdin, one JSON line each, until stdin closes."""
    import warnings

    warnings.simplefilter("ignore")
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    for line in sys.stdin:
        if line.strip():
            out.write(json.dumps(_run_job(json.loads(line))) + "\n")
            out.flush()


class Worker:
    """A long-lived worker process; restarted after a hang or a death."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.Popen(
            [sys.executable, "-m", "tests.test_fuzz", "--serve"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )

    def run(self, job: dict[str, Any], timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        proc = self.proc
        assert proc.stdin and proc.stdout
        start = time.monotonic()
        try:
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout)
        line = proc.stdout.readline() if ready else ""
        seconds = time.monotonic() - start
        if line:
            return {**json.loads(line), "seconds": seconds}
        if not ready:
            self.close()
            return {"outcome": "hang", "detail": f"no answer in {timeout:g} s", "seconds": seconds}
        code = proc.wait(timeout=10)
        self.proc = None
        return {"outcome": "crash", "detail": f"worker died (exit {code})", "seconds": seconds}

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


# ---------------------------------------------------------------------------- mutations

INT_VALUES = (-(2**31), -7, -2, -1, 0, 1, 2, 3, 5, 64, 2**31 - 1, 2**40)
FLOAT_VALUES = (0.0, -1.0, 1e-30, 0.5, 2.0, 1e30, float("inf"), float("-inf"), float("nan"))
DTYPES = (
    TensorProto.FLOAT,
    TensorProto.UINT8,
    TensorProto.INT8,
    TensorProto.INT32,
    TensorProto.INT64,
    TensorProto.BOOL,
    TensorProto.FLOAT16,
    TensorProto.DOUBLE,
    TensorProto.BFLOAT16,
    TensorProto.STRING,
    TensorProto.UNDEFINED,
    99,  # no such type
)
# Attributes a node may gain (defaults that are usually left out).
EXTRA_ATTRS = {
    "Conv": ("strides", "dilations", "group", "pads"),
    "Gemm": ("transA", "transB", "alpha", "beta"),
    "MaxPool": ("pads", "ceil_mode", "dilations"),
    "Softmax": ("axis",),
    "Flatten": ("axis",),
    "Concat": ("axis",),
    "Gather": ("axis",),
    "MatMul": ("axis",),  # not an attribute of MatMul at all
}
FLOAT_ATTRS = {"alpha", "beta", "epsilon", "momentum"}
INTS_ATTRS = {"strides", "dilations", "pads", "kernel_shape", "perm", "axes"}

_MODELS: dict[Path, onnx.ModelProto] = {}


def _load(path: Path) -> onnx.ModelProto:
    if path not in _MODELS:
        _MODELS[path] = onnx.load(str(path))
    model = onnx.ModelProto()
    model.CopyFrom(_MODELS[path])
    return model


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                found += _graphs(attr.g)
    return found


def _nodes(model: onnx.ModelProto) -> list[tuple[onnx.GraphProto, int]]:
    return [(g, i) for g in _graphs(model.graph) for i in range(len(g.node))]


def _pick(data: st.DataObject, items: list[Any], label: str) -> Any:
    return items[data.draw(st.integers(0, len(items) - 1), label=label)]


def drop_node(model: onnx.ModelProto, data: st.DataObject) -> str:
    graph, i = _pick(data, _nodes(model), "node")
    node = graph.node[i]
    del graph.node[i]
    return f"drop {node.op_type} {node.name or node.output[0]!r}"


def duplicate_node(model: onnx.ModelProto, data: st.DataObject) -> str:
    graph, i = _pick(data, _nodes(model), "node")
    copy = onnx.NodeProto()
    copy.CopyFrom(graph.node[i])
    renamed = data.draw(st.booleans(), label="rename outputs")
    if renamed:  # a valid, dead twin rather than a second producer of the same names
        copy.name += "_dup"
        for k, out in enumerate(copy.output):
            copy.output[k] = f"{out}_dup" if out else out
    graph.node.insert(i + 1, copy)
    return f"duplicate {copy.op_type} {graph.node[i].name!r} (renamed outputs: {renamed})"


def swap_inputs(model: onnx.ModelProto, data: st.DataObject) -> str:
    candidates = [(g, i) for g, i in _nodes(model) if len(g.node[i].input) >= 2]
    graph, i = _pick(data, candidates, "node")
    node = graph.node[i]
    a = data.draw(st.integers(0, len(node.input) - 1), label="a")
    b = data.draw(st.integers(0, len(node.input) - 1).filter(lambda k: k != a), label="b")
    node.input[a], node.input[b] = node.input[b], node.input[a]
    return f"swap inputs {a},{b} of {node.op_type} {node.name!r}"


def _attr_value(data: st.DataObject, name: str, kind: int) -> Any:
    if kind == AttributeProto.FLOAT:
        return data.draw(st.sampled_from(FLOAT_VALUES), label="float")
    if kind == AttributeProto.INTS:
        small = st.sampled_from((-1, 0, 1, 2, 3, 4, 8, 100))
        return data.draw(st.lists(small, min_size=0, max_size=5), label="ints")
    if name == "to":
        return data.draw(st.sampled_from(DTYPES), label="to")
    return data.draw(st.sampled_from(INT_VALUES), label="int")


def change_attribute(model: onnx.ModelProto, data: st.DataObject) -> str:
    numeric = (AttributeProto.INT, AttributeProto.FLOAT, AttributeProto.INTS)
    candidates = []
    for graph, i in _nodes(model):
        node = graph.node[i]
        for attr in node.attribute:
            if attr.type in numeric:
                candidates.append((node, attr.name, attr.type))
        present = {a.name for a in node.attribute}
        for name in EXTRA_ATTRS.get(node.op_type, ()):
            if name not in present:
                kind = AttributeProto.INT
                if name in FLOAT_ATTRS:
                    kind = AttributeProto.FLOAT
                elif name in INTS_ATTRS:
                    kind = AttributeProto.INTS
                candidates.append((node, name, kind))
    node, name, kind = _pick(data, candidates, "attribute")
    value = _attr_value(data, name, kind)
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.append(onnx.helper.make_attribute(name, value, attr_type=kind))
    return f"set {node.op_type} {node.name!r} {name}={value!r}"


def change_initializer_dtype(model: onnx.ModelProto, data: st.DataObject) -> str:
    inits = [t for g in _graphs(model.graph) for t in g.initializer]
    tensor = _pick(data, inits, "initializer")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    convert = data.draw(st.booleans(), label="convert values")
    try:  # an earlier mutation may have left bytes that no longer fit the shape
        values = numpy_helper.to_array(tensor)
    except (KeyError, TypeError, ValueError):
        convert = False
    if convert and dtype not in (TensorProto.UNDEFINED, 99):
        target = onnx.helper.tensor_dtype_to_np_dtype(dtype)
        if dtype == TensorProto.STRING:
            values = values.astype(str).astype(object)
        else:
            with np.errstate(all="ignore"):
                values = values.astype(target)
        new = numpy_helper.from_array(values, tensor.name)
        tensor.CopyFrom(new)
    else:  # relabel the bytes: their length no longer has to fit
        tensor.data_type = dtype
    return f"initializer {tensor.name!r} -> dtype {dtype} (converted: {convert})"


def change_input_dtype(model: onnx.ModelProto, data: st.DataObject) -> str:
    value = _pick(data, list(model.graph.input), "input")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    value.type.tensor_type.elem_type = dtype
    return f"input {value.name!r} -> dtype {dtype}"


def change_input_dim(model: onnx.ModelProto, data: st.DataObject) -> str:
    value = _pick(data, list(model.graph.input), "input")
    dims = value.type.tensor_type.shape.dim
    k = data.draw(st.integers(0, len(dims)), label="dim")
    new = data.draw(
        st.sampled_from((0, 1, 2, 3, 7, 64, 1000, "batch", "sequence", "other", None)),
        label="value",
    )
    if k == len(dims):  # one more dim
        dim = dims.add()
    else:
        dim = dims[k]
    if new is None:
        dim.Clear()
    elif isinstance(new, str):
        dim.dim_param = new
    else:
        dim.dim_value = new
    return f"input {value.name!r} dim {k} -> {new!r}"


MUTATIONS = {
    "drop_node": drop_node,
    "duplicate_node": duplicate_node,
    "swap_inputs": swap_inputs,
    "change_attribute": change_attribute,
    "change_initializer_dtype": change_initializer_dtype,
    "change_input_dtype": change_input_dtype,
    "change_input_dim": change_input_dim,
}


# ---------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_mutant(worker: Worker, folder: Path, data: st.DataObject) -> None:
    source = data.draw(st.sampled_from(SAMPLE_MODELS), label="model")
    model = _load(source)
    kinds = data.draw(st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=2))
    for kind in kinds:
        note(f"{source.name}: {MUTATIONS[kind](model, data)}")
    mutant = folder / f"mutant_{time.monotonic_ns()}.onnx"
    mutant.write_bytes(model.SerializeToString())
    before = _digest(mutant)
    problems = []
    for name in PASS_NAMES:
        output = mutant.with_suffix(f".{name}.onnx")
        answer = worker.run({"input": str(mutant), "output": str(output), "pass": name})
        if answer["outcome"] not in ("ok", "error"):
            problems.append(f"{name}: {answer['outcome']}: {answer['detail']}")
        elif answer["seconds"] > RUN_TIMEOUT:
            problems.append(f"{name}: took {answer['seconds']:.0f} s")
        output.unlink(missing_ok=True)
    if _digest(mutant) != before:
        problems.append("the input file changed")
    mutant.unlink()
    assert not problems, "\n".join(problems)


FAST = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SLOW = settings(FAST, max_examples=400)


@FAST
@given(data=st.data())
def test_mutated_models(worker, tmp_path_factory, data):
    _check_mutant(worker, tmp_path_factory.getbasetemp(), data)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_mutated_models_many(worker, tmp_path_factory, data):
    _check_mutant(worker, tmp_path_factory.getbasetemp(), data)


def _regression(worker: Worker, folder: Path, name: str, model: onnx.ModelProto) -> None:
    mutant = folder / f"{name}.onnx"
    mutant.write_bytes(model.SerializeToString())
    for pass_name in PASS_NAMES:
        output = folder / f"{name}.{pass_name}.onnx"
        answer = worker.run({"input": str(mutant), "output": str(output), "pass": pass_name})
        assert answer["outcome"] == "error", (pass_name, answer)
        assert mutant.name in answer["detail"]


def test_unknown_dtype_is_a_clean_error(worker, tmp_path):
    """Found by the fuzzer: inference raised a bare ValueError for data type 99."""
    model = _load(ROOT / "sample_models" / "mlp.onnx")
    model.graph.input[0].type.tensor_type.elem_type = 99
    _regression(worker, tmp_path, "dtype99", model)


def test_oversized_raw_data_is_a_clean_error(worker, tmp_path):
    """Found by the fuzzer: float bytes relabelled bfloat16 pass the checker, then crash passes."""
    model = _load(ROOT / "sample_models" / "foldable.onnx")
    unused = next(t for t in model.graph.initializer if t.name == "unused_weight")
    unused.data_type = TensorProto.BFLOAT16
    _regression(worker, tmp_path, "oversized", model)


def test_worker_reports_a_hang(worker, tmp_path):
    """The time limit really fires: a job that never answers is a hang, not a stall."""
    slow = Worker()
    try:
        slow.proc = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(30)"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        answer = slow.run({"pass": "fold"}, timeout=0.5)
    finally:
        slow.close()
    assert answer["outcome"] == "hang"


if __name__ == "__main__" and "--serve" in sys.argv:
    _serve()

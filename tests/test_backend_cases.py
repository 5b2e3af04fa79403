"""Semantics: fold (and fuse) on every ONNX backend node test case ORT can run.

The onnx package ships a model plus inputs and expected outputs per operator test.
Each case that ONNX Runtime runs correctly unmodified is passed through our passes and
must still produce the expected outputs: zero crashes, zero mismatches. Cases ORT
cannot run are counted with their reasons.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import numpy as np
import onnx
import pytest

from optimodel.data import Batch
from optimodel.passes import available_passes, get_pass
from optimodel.pipeline import run_passes

GRAPH_PASSES = [name for name in ("fold", "fuse") if name in available_passes()]


@pytest.fixture(scope="module")
def cases() -> list[Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from onnx.backend.test.case.node import collect_testcases

        return list(collect_testcases())


def _session(model: onnx.ModelProto) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _close(actual: Any, expected: Any, rtol: float, atol: float) -> bool:
    if isinstance(expected, (list, tuple)):
        return len(actual) == len(expected) and all(
            _close(a, e, rtol, atol) for a, e in zip(actual, expected, strict=True)
        )
    if expected is None:
        return actual is None
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        return False
    if expected.dtype.kind in "fc":
        return bool(np.allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True))
    if expected.dtype.kind in "OUS":
        return bool(np.array_equal(actual.astype(str), expected.astype(str)))
    return bool(np.array_equal(actual, expected))


def _feed_value(value: Any) -> Any:
    if isinstance(value, onnx.TensorProto):
        return onnx.numpy_helper.to_array(value)
    if isinstance(value, np.generic):
        return np.asarray(value)
    if isinstance(value, list):
        return [_feed_value(v) for v in value]
    return value


def _feed(model: onnx.ModelProto, inputs: list[Any]) -> dict[str, Any]:
    init = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in init]
    return {n: _feed_value(v) for n, v in zip(names, inputs, strict=False)}


def _run(session: Any, model: onnx.ModelProto, inputs: list[Any]) -> list[Any]:
    return session.run(None, _feed(model, inputs))


def _check(case: Any, model: onnx.ModelProto) -> str | None:
    """None if every data set matches the expected outputs, else what differed."""
    session = _session(model)
    for inputs, expected in case.data_sets:
        got = _run(session, model, inputs)
        if not _close(got, expected, case.rtol, case.atol):
            return "outputs differ from the expected outputs"
    return None


def test_graph_passes_on_backend_node_cases(cases):
    assert GRAPH_PASSES, "no graph pass registered"
    unsupported: Counter[str] = Counter()
    checked = 0
    failures: list[str] = []
    skipped: Counter[str] = Counter()
    for case in cases:
        if case.kind != "node" or not case.data_sets:
            continue
        try:
            reason = _check(case, case.model)
        except Exception as exc:  # ORT refuses the unmodified model
            text = str(exc).split("\n")[0].replace("[ONNXRuntimeError] : ", "")
            reason = text.split(":", 2)[-1].strip()[:60] or type(exc).__name__
        if reason is not None:
            unsupported[reason] += 1
            continue
        batches = [Batch(_feed(case.model, inputs)) for inputs, _ in case.data_sets]
        try:
            model, records = run_passes(
                case.model, [get_pass(n) for n in GRAPH_PASSES], batches=batches, source=case.name
            )
        except Exception as exc:  # a crash, or a numeric divergence found by the pipeline
            failures.append(f"{case.name}: {type(exc).__name__}: {exc}")
            continue
        skipped.update(f"{r.name}: {r.reason}"[:90] for r in records if r.status != "ok")
        try:
            problem = _check(case, model)
        except Exception as exc:
            problem = f"the rewritten model fails to run: {str(exc).splitlines()[0][:200]}"
        if problem:
            failures.append(f"{case.name}: {problem}")
        checked += 1
    print(
        f"\nbackend node cases: {checked} checked through {GRAPH_PASSES}, "
        f"{sum(unsupported.values())} that ONNX Runtime cannot run unmodified:"
    )
    for reason, count in unsupported.most_common(12):
        print(f"  {count:4d}  {reason}")
    print(f"passes skipped by the pipeline (output unusable, model kept): {sum(skipped.values())}")
    for reason, count in skipped.most_common(5):
        print(f"  {count:4d}  {reason}")
    assert checked > 1000
    assert not failures, "\n".join(failures[:20])

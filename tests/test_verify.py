"""Verification: per-output figures from two real ORT runs, and the tolerance policy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from optimodel.data import load_data, model_input_specs
from optimodel.errors import VerificationError
from optimodel.verify import OutputComparator, Tolerance, get_tolerance, verify_models
from tests.conftest import SAMPLES


def _perturbed(model: onnx.ModelProto, scale: float) -> onnx.ModelProto:
    """A copy whose first weight tensor is multiplied by (1 + scale)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    init = max(copy.graph.initializer, key=lambda t: len(t.raw_data) or 0)
    arr = numpy_helper.to_array(init) * (1 + scale)
    init.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), init.name))
    return copy


def test_identical_models_verify_exactly():
    path = str(SAMPLES / "digits_cnn.onnx")
    model = onnx.load(path)
    data = load_data(SAMPLES / "digits_test.npz", model_input_specs(model), batch_size=64)
    result = verify_models(path, model, data, tolerance="exact")
    assert result.ok and result.feeds == 8
    (out,) = result.outputs
    assert out.name == "logits" and out.elements == 450 * 10
    assert out.max_abs == 0 and out.cosine == pytest.approx(1.0) and out.snr_db is None
    assert out.top1_agreement == 1.0


def test_perturbed_model_fails_exact_but_passes_loose():
    model = onnx.load(str(SAMPLES / "mlp.onnx"))
    changed = _perturbed(model, 0.05)
    data = load_data("random", model_input_specs(model), batch_size=16, num_samples=3)
    exact = verify_models(model, changed, data, tolerance="exact")
    assert not exact.ok
    assert any("max abs diff" in v for v in exact.violations)
    (out,) = exact.outputs
    assert 0 < out.max_abs < 0.5
    assert 0.99 < out.cosine < 1.0
    assert out.snr_db is not None and 10 < out.snr_db < 80
    loose = verify_models(model, changed, data, tolerance="int8")
    assert loose.ok


def test_multi_output_and_dynamic_sequence():
    path = SAMPLES / "transformer_block.onnx"
    model = onnx.load(str(path))
    data = load_data("random", model_input_specs(model), shapes={"hidden_states": (2, 9, 64)})
    result = verify_models(str(path), _perturbed(model, 1e-3), data, tolerance="fp16")
    assert result.ok and result.outputs[0].elements == 4 * 2 * 9 * 64
    assert result.outputs[0].top1_agreement is None  # 3-D output: no top-1


def test_comparator_statistics_are_right():
    comp = OutputComparator(["a"])
    ref = np.array([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]], dtype=np.float32)
    cand = np.array([[1.0, 2.5, 3.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    comp.update([ref], [cand])
    (diff,) = comp.results()
    assert diff.max_abs == pytest.approx(1.0)
    assert diff.mean_abs == pytest.approx(2.5 / 6)
    expected_cos = float(ref.ravel() @ cand.ravel()) / (np.linalg.norm(ref) * np.linalg.norm(cand))
    assert diff.cosine == pytest.approx(expected_cos)
    assert diff.top1_agreement == 0.5
    assert diff.snr_db == pytest.approx(10 * np.log10(15 / 2.25))


def test_nan_mismatch_is_a_violation():
    comp = OutputComparator(["a"])
    comp.update([np.array([1.0, np.nan, np.inf])], [np.array([1.0, np.nan, 5.0])])
    (diff,) = comp.results()
    assert diff.nonfinite_mismatch == 1
    assert get_tolerance("fp16").violations([diff])


def test_shape_mismatch_raises():
    comp = OutputComparator(["a"])
    with pytest.raises(VerificationError, match="shape"):
        comp.update([np.zeros((2, 3))], [np.zeros((3, 2))])


def test_tolerance_scales_with_reference_magnitude():
    tol = Tolerance("t", atol=1e-4, rtol=1e-3, min_cosine=0.0)
    comp = OutputComparator(["a"])
    comp.update([np.array([1000.0])], [np.array([1000.5])])
    assert tol.violations(comp.results()) == []  # 0.5 <= 1e-4 + 1e-3 * 1000


def test_near_zero_outputs_judged_by_absolute_error():
    """A 1e-11 output map that differs by rounding noise is the same model."""
    comp = OutputComparator(["p"])
    ref = np.full(64, 1e-11)
    comp.update([ref], [ref + np.linspace(0, 6e-8, 64)])
    (diff,) = comp.results()
    assert diff.cosine < 0.999
    assert get_tolerance("exact").violations([diff]) == []
    assert get_tolerance("fp16").violations([diff])  # no absolute bound there: cosine rules

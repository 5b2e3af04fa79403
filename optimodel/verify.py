"""Numerical verification: run two models on the same inputs and compare every output.

Statistics are accumulated batch by batch (running sums, never all outputs in memory)
so verification scales to large data. A `Tolerance` turns the figures into a verdict
that passes and gates share.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from optimodel.data import Batch
from optimodel.errors import OptimodelError, VerificationError
from optimodel.runtime.sessions import SessionConfig, create_session, run_session


@dataclass
class OutputDiff:
    """How one output of a candidate differs from the reference, over all feeds."""

    name: str
    elements: int
    max_abs: float
    mean_abs: float
    cosine: float
    snr_db: float | None  # None when the outputs are identical (infinite SNR)
    ref_max_abs: float
    top1_agreement: float | None = None  # for 2-D [batch, classes] outputs
    nonfinite_mismatch: int = 0  # positions where NaN/Inf appear in one output only

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Accumulator:
    name: str
    elements: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    dot: float = 0.0
    ref_sq: float = 0.0
    cand_sq: float = 0.0
    err_sq: float = 0.0
    ref_max_abs: float = 0.0
    top1_same: int = 0
    top1_total: int = 0
    nonfinite_mismatch: int = 0

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if ref.shape != cand.shape:
            raise VerificationError(
                f"output '{self.name}' has shape {list(cand.shape)}, "
                f"the reference {list(ref.shape)}"
            )
        if ref.dtype.kind not in "fiub" or cand.dtype.kind not in "fiub":
            if not np.array_equal(ref, cand):
                self.nonfinite_mismatch += int(np.sum(ref != cand))
            self.elements += ref.size
            return
        r = ref.astype(np.float64, copy=False).ravel()
        c = cand.astype(np.float64, copy=False).ravel()
        r_fin, c_fin = np.isfinite(r), np.isfinite(c)
        both = r_fin & c_fin
        # NaN/Inf in the same place with the same value count as agreement.
        same_special = ~r_fin & ~c_fin & ((r == c) | (np.isnan(r) & np.isnan(c)))
        self.nonfinite_mismatch += int(np.sum(~both & ~same_special))
        r, c = r[both], c[both]
        err = np.abs(r - c)
        self.elements += ref.size
        if err.size:
            self.max_abs = max(self.max_abs, float(err.max()))
            self.ref_max_abs = max(self.ref_max_abs, float(np.abs(r).max()))
        self.sum_abs += float(err.sum())
        self.dot += float(r @ c)
        self.ref_sq += float(r @ r)
        self.cand_sq += float(c @ c)
        self.err_sq += float(err @ err)
        if ref.ndim == 2 and ref.shape[1] > 1:
            self.top1_same += int(np.sum(ref.argmax(axis=1) == cand.argmax(axis=1)))
            self.top1_total += ref.shape[0]

    def result(self) -> OutputDiff:
        denom = math.sqrt(self.ref_sq) * math.sqrt(self.cand_sq)
        if denom > 0:
            cosine = self.dot / denom
        else:  # both all-zero is a perfect match; one all-zero is not
            cosine = 1.0 if self.ref_sq == self.cand_sq == 0 else 0.0
        if self.err_sq == 0:
            snr = None
        elif self.ref_sq == 0:
            snr = -math.inf
        else:
            snr = 10.0 * math.log10(self.ref_sq / self.err_sq)
        return OutputDiff(
            name=self.name,
            elements=self.elements,
            max_abs=self.max_abs,
            mean_abs=self.sum_abs / self.elements if self.elements else 0.0,
            cosine=min(1.0, cosine),
            snr_db=snr if snr is None or math.isfinite(snr) else -999.0,
            ref_max_abs=self.ref_max_abs,
            top1_agreement=self.top1_same / self.top1_total if self.top1_total else None,
            nonfinite_mismatch=self.nonfinite_mismatch,
        )


@dataclass(frozen=True)
class Tolerance:
    """When a candidate counts as the same model: |diff| <= atol + rtol*max|ref|, cosine."""

    name: str
    atol: float | None
    rtol: float
    min_cosine: float
    min_top1: float | None = None

    def violations(self, diffs: Iterable[OutputDiff]) -> list[str]:
        problems = []
        for diff in diffs:
            if diff.nonfinite_mismatch:
                problems.append(f"'{diff.name}': {diff.nonfinite_mismatch} NaN/Inf values differ")
            if self.atol is not None:
                bound = self.atol + self.rtol * diff.ref_max_abs
                if diff.max_abs > bound:
                    problems.append(f"'{diff.name}': max abs diff {diff.max_abs:.3g} > {bound:.3g}")
            # every difference below atol is rounding noise, whatever the cosine says: on
            # near-zero outputs (a sigmoid map of 1e-11) the cosine of noise is meaningless
            negligible = self.atol is not None and diff.max_abs <= self.atol
            if diff.cosine < self.min_cosine and not negligible:
                problems.append(f"'{diff.name}': cosine {diff.cosine:.6f} < {self.min_cosine}")
            if (
                self.min_top1 is not None
                and diff.top1_agreement is not None
                and diff.top1_agreement < self.min_top1
            ):
                problems.append(
                    f"'{diff.name}': top-1 agreement {diff.top1_agreement:.3f} < {self.min_top1}"
                )
        return problems


# Graph rewrites must not change meaning; lower precisions get looser bounds.
TOLERANCES = {
    "exact": Tolerance("exact", atol=1e-4, rtol=1e-4, min_cosine=0.99999),
    "fp16": Tolerance("fp16", atol=None, rtol=0.0, min_cosine=0.999),
    "int8": Tolerance("int8", atol=None, rtol=0.0, min_cosine=0.98),
    "prune": Tolerance("prune", atol=None, rtol=0.0, min_cosine=0.9),
    "none": Tolerance("none", atol=None, rtol=0.0, min_cosine=-1.0),
}


def get_tolerance(name: str) -> Tolerance:
    try:
        return TOLERANCES[name]
    except KeyError:
        raise OptimodelError(
            f"unknown tolerance '{name}'; choose from {', '.join(TOLERANCES)}"
        ) from None


@dataclass
class VerificationResult:
    """Per-output differences over `feeds` runs, and the tolerance verdict."""

    outputs: list[OutputDiff]
    feeds: int
    data: str
    tolerance: str
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def worst_cosine(self) -> float:
        return min((o.cosine for o in self.outputs), default=1.0)

    @property
    def worst_max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "tolerance": self.tolerance,
            "data": self.data,
            "feeds": self.feeds,
            "outputs": [o.to_dict() for o in self.outputs],
            "violations": list(self.violations),
        }


def _flat(value: Any) -> np.ndarray:
    """One array for a tensor, a sequence of tensors (ORT returns a list), a map or None."""
    if value is None:
        return np.zeros(0)
    if isinstance(value, dict):
        value = [value[k] for k in sorted(value)]
    if isinstance(value, (list, tuple)):
        parts = [_flat(v).ravel() for v in value]
        if not parts:
            return np.zeros(0)
        kinds = {p.dtype.kind for p in parts}
        return (
            np.concatenate(parts)
            if len(kinds) == 1
            else np.concatenate([p.astype(np.float64) for p in parts])
        )
    return np.asarray(value)


def _as_arrays(name: str, ref: Any, cand: Any) -> tuple[np.ndarray, np.ndarray]:
    """Arrays to compare; sequences must agree in length and element shapes first."""
    if isinstance(ref, (list, tuple, dict)) or isinstance(cand, (list, tuple, dict)):
        if type(ref) is not type(cand) or len(ref) != len(cand):
            raise VerificationError(f"output '{name}': sequence lengths or kinds differ")
        if isinstance(ref, (list, tuple)):
            for a, b in zip(ref, cand, strict=True):
                if np.shape(a) != np.shape(b):
                    raise VerificationError(f"output '{name}': sequence element shapes differ")
    return _flat(ref), _flat(cand)


class OutputComparator:
    """Accumulates differences between reference and candidate outputs, by output name."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self._acc = {name: _Accumulator(name) for name in names}
        self.feeds = 0

    def update(self, ref: list[Any], cand: list[Any]) -> None:
        for name, r, c in zip(self.names, ref, cand, strict=True):
            self._acc[name].update(*_as_arrays(name, r, c))
        self.feeds += 1

    def results(self) -> list[OutputDiff]:
        return [self._acc[name].result() for name in self.names]


def output_names(session: Any) -> list[str]:
    return [o.name for o in session.get_outputs()]


def matched_outputs(ref_session: Any, cand_session: Any, cand_source: str) -> list[str]:
    """Output names both models share; the candidate may not drop any reference output."""
    ref_names = output_names(ref_session)
    cand_names = set(output_names(cand_session))
    missing = [n for n in ref_names if n not in cand_names]
    if missing:
        raise VerificationError(
            f"{cand_source}: outputs {', '.join(missing)} of the reference are missing"
        )
    return ref_names


def verify_models(
    reference: str | onnx.ModelProto,
    candidate: str | onnx.ModelProto,
    batches: Iterable[Batch],
    *,
    tolerance: Tolerance | str = "exact",
    session_config: SessionConfig | None = None,
    data_description: str = "",
    on_feed: Callable[[], None] | None = None,
) -> VerificationResult:
    """Run both models on every feed and compare all outputs under the tolerance."""
    tol = get_tolerance(tolerance) if isinstance(tolerance, str) else tolerance
    ref_source = reference if isinstance(reference, str) else "reference model"
    cand_source = candidate if isinstance(candidate, str) else "candidate model"
    ref_session = create_session(reference, session_config, source=str(ref_source))
    cand_session = create_session(candidate, session_config, source=str(cand_source))
    names = matched_outputs(ref_session, cand_session, str(cand_source))
    comparator = OutputComparator(names)
    for batch in batches:
        ref_out = run_session(ref_session, batch.feed, str(ref_source))
        cand_out = run_session(cand_session, batch.feed, str(cand_source))
        cand_by_name = dict(zip(output_names(cand_session), cand_out, strict=True))
        comparator.update(ref_out, [cand_by_name[n] for n in names])
        if on_feed:
            on_feed()
    if comparator.feeds == 0:
        raise OptimodelError("verification ran on zero feeds; the data is empty")
    diffs = comparator.results()
    return VerificationResult(
        outputs=diffs,
        feeds=comparator.feeds,
        data=data_description,
        tolerance=tol.name,
        violations=tol.violations(diffs),
    )

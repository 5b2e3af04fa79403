"""Run passes with a safety net: checker, numeric comparison, time budget, records.

After every pass the model is checked and its outputs compared with those of the
stage before it on the same feeds, so a divergence names the pass that caused it.
A pass that runs out of its time budget, or crashes, is skipped and said; the model
stays what the previous verified stage produced.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from optimodel.data import Batch
from optimodel.errors import OptimodelError, VerificationError
from optimodel.modelio import (
    REUSE_MAX_BYTES,
    check_model,
    count_nodes,
    external_data_folder,
    external_folder,
    known_bytes,
    model_size,
    reusable_bytes,
)
from optimodel.passes import Pass
from optimodel.runtime.sessions import SessionConfig, create_session, run_session
from optimodel.verify import OutputComparator, get_tolerance


class PassTimeout(Exception):
    """Raised inside a pass when its time budget is spent."""


@contextmanager
def time_budget(seconds: float | None) -> Iterator[None]:
    """Interrupt the enclosed Python code after `seconds` (main thread, POSIX only)."""
    usable = (
        seconds
        and seconds > 0
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def _expire(signum: int, frame: Any) -> None:
        raise PassTimeout

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))  # type: ignore[arg-type]
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class PassRecord:
    """What one pass did, for the report."""

    name: str
    seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    modified: bool = False
    status: str = "ok"  # ok | skipped
    reason: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    declined: list[dict[str, str]] = field(default_factory=list)
    verification: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "reason": self.reason,
            "seconds": round(self.seconds, 4),
            "modified": self.modified,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "stats": self.stats,
            "declined": self.declined[:50],
            "declined_total": len(self.declined),
            "verification": self.verification,
        }


class StageOutputs:
    """Outputs of the latest verified stage on fixed feeds, to compare the next one to."""

    def __init__(self, batches: list[Batch], config: SessionConfig | None) -> None:
        self.batches = batches
        self.config = config
        self.names: list[str] = []
        self.outputs: list[list[np.ndarray]] = []
        # the input model's outputs: the final model is compared with them, no re-run
        self.first: tuple[list[str], list[list[np.ndarray]]] | None = None

    def final(self, tolerance: str) -> dict[str, Any]:
        """The last accepted stage against the input model, from outputs already computed."""
        assert self.first is not None, "the input model has not been run"
        return self.compare(self.names, self.outputs, tolerance, "result", self.first)

    def run(self, model: onnx.ModelProto, source: str) -> tuple[list[str], list[list[np.ndarray]]]:
        session = create_session(model, self.config, source=source)
        names = [o.name for o in session.get_outputs()]
        return names, [run_session(session, b.feed, source) for b in self.batches]

    def set(self, names: list[str], outputs: list[list[np.ndarray]]) -> None:
        if self.first is None:
            self.first = (names, outputs)
        self.names, self.outputs = names, outputs

    def compare(
        self,
        names: list[str],
        outputs: list[list[np.ndarray]],
        tolerance: str,
        where: str,
        reference: tuple[list[str], list[list[np.ndarray]]] | None = None,
    ) -> dict[str, Any]:
        """Candidate outputs against the latest stage (or `reference`) under a tolerance."""
        ref_names, ref_outputs = reference or (self.names, self.outputs)
        missing = [n for n in ref_names if n not in names]
        if missing:
            raise VerificationError(f"{where}: removed model output(s) {', '.join(missing)}")
        comparator = OutputComparator(ref_names)
        for ref, cand in zip(ref_outputs, outputs, strict=True):
            by_name = dict(zip(names, cand, strict=True))
            comparator.update(ref, [by_name[n] for n in ref_names])
        diffs = comparator.results()
        violations = get_tolerance(tolerance).violations(diffs)
        return {
            "ok": not violations,
            "tolerance": tolerance,
            "feeds": comparator.feeds,
            "outputs": [d.to_dict() for d in diffs],
            "violations": violations,
        }


def _external_data_of(model: onnx.ModelProto) -> Any:
    """Inside a pass, tensors of a lazily loaded model are read from its own folder."""
    folder = external_folder(model)
    return external_data_folder(folder) if folder is not None else nullcontext()


def _accept(
    candidate: onnx.ModelProto,
    record: PassRecord,
    stage: StageOutputs | None,
    p: Pass,
    source: str,
    payload: bytes | None = None,
) -> tuple[int, bytes | None] | None:
    """Check and verify a pass's output: its size in bytes and, for a model worth it, its
    serialized bytes (for the next pass); or None (pass skipped, said) if it is unusable.
    `payload`: the bytes, when the pass already made them.

    A numeric divergence is not skipped: it raises, naming the pass, because it means
    the pass is wrong for this model and the user must know.
    """
    where = f"pass '{p.name}'"
    try:
        # numpy_helper wrote every tensor a pass made: their raw sizes hold by construction
        payload = payload if payload is not None else reusable_bytes(candidate)
        size = check_model(
            candidate, f"{source} after {where}", raw_sizes=False, serialized=payload
        )
        if payload is not None and len(payload) > REUSE_MAX_BYTES:
            payload = None  # not held on to through the next pass
    except OptimodelError as exc:
        record.status, record.reason = "skipped", f"its output fails the checker: {exc.message}"
        return None
    if stage is None:
        return size, payload
    try:
        with known_bytes(candidate, payload):
            names, outputs = stage.run(candidate, f"{source} after {where}")
    except OptimodelError as exc:  # the rewrite no longer loads or runs
        record.status = "skipped"
        record.reason = f"its output does not run in ONNX Runtime: {exc.message}"
        return None
    record.verification = stage.compare(names, outputs, p.tolerance, where)
    if not record.verification["ok"]:
        raise VerificationError(
            f"{source}: {where} changed the model's outputs: "
            f"{'; '.join(record.verification['violations'][:3])}; skip it or report the model"
        )
    stage.set(names, outputs)
    return size, payload


def run_passes(
    model: onnx.ModelProto, passes: list[Pass], **options: Any
) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """Apply passes in order, verifying each against the stage before it; `options` are
    those of `run_passes_with_bytes`.

    `batches=None` skips the numeric comparison (`--no-verify`); the checker always runs.
    A `stage` whose input outputs are already set (see `transform_file`) is used as is.
    `size` is the input's size in bytes when the caller knows it (from its check), and
    `payload` its serialized bytes: each pass may reuse its input's bytes (`known_bytes`).
    """
    result, records, _ = run_passes_with_bytes(model, passes, **options)
    return result, records


def run_passes_with_bytes(
    model: onnx.ModelProto,
    passes: list[Pass],
    *,
    batches: list[Batch] | None = None,
    session_config: SessionConfig | None = None,
    pass_timeout: float | None = None,
    source: str = "model",
    on_pass: Callable[[PassRecord], None] | None = None,
    stage: StageOutputs | None = None,
    size: int | None = None,
    payload: bytes | None = None,
) -> tuple[onnx.ModelProto, list[PassRecord], bytes | None]:
    """`run_passes`, plus the result's serialized bytes when known (None otherwise), so
    saving it need not serialize it again."""
    if stage is None and batches is not None:
        stage = StageOutputs(batches, session_config)
    if stage is not None and stage.first is None:
        with known_bytes(model, payload):
            stage.set(*stage.run(model, source))
    records = []
    current = model
    current_size = size if size is not None else model_size(model)
    for p in passes:
        record = PassRecord(
            name=p.name, nodes_before=count_nodes(current), bytes_before=current_size
        )
        start = time.perf_counter()
        try:
            with time_budget(pass_timeout), _external_data_of(current):
                with known_bytes(current, payload):
                    result = p.run(current)
        except PassTimeout:
            record.status, record.reason = "skipped", f"ran out of its {pass_timeout:g} s budget"
        except OptimodelError:
            raise
        except RecursionError:
            record.status, record.reason = "skipped", "graph too deep for this pass"
        except Exception as exc:  # a pass bug must not lose the user's model
            record.status = "skipped"
            record.reason = f"internal error: {type(exc).__name__}: {str(exc)[:200]}"
        record.seconds = time.perf_counter() - start
        if record.status == "ok":
            record.modified = result.modified
            record.stats = result.stats
            record.declined = result.declined
            accepted = (
                _accept(result.model, record, stage, p, source, result.payload)
                if result.modified
                else None
            )
            if accepted is not None:
                current, (current_size, payload) = result.model, accepted
        record.nodes_after = count_nodes(current)
        record.bytes_after = current_size
        records.append(record)
        if on_pass:
            on_pass(record)
    return current, records, payload


def default_pass_output(path: Path, suffix: str) -> Path:
    """`model.onnx` -> `model.<suffix>.onnx`, the output name used when -o is omitted."""
    return path.with_name(f"{path.stem}.{suffix}.onnx")

"""Model file in, verified model file out: what every model-writing command does.

Checks the output path before any work, runs the passes through the verifying
pipeline, compares the final model with the input, saves atomically with provenance
and returns the run's report.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from optimodel.data import load_data, model_input_specs
from optimodel.modelio import (
    Provenance,
    check_model,
    check_output_path,
    custom_domains,
    load_model,
    save_model,
)
from optimodel.passes import Pass
from optimodel.pipeline import PassRecord, run_passes
from optimodel.report import Report, model_record
from optimodel.runtime.sessions import SessionConfig
from optimodel.verify import verify_models

VERIFY_FEEDS = 2


def transform_file(
    input_path: str | Path,
    output_path: str | Path,
    passes: list[Pass],
    *,
    subcommand: str,
    force: bool = False,
    verify: bool = True,
    data: str | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    batch_size: int = 1,
    samples: int | None = None,
    int_range: tuple[int, int] = (0, 255),
    session_config: SessionConfig | None = None,
    pass_timeout: float | None = None,
    external_data: bool | None = None,
    on_pass: Callable[[PassRecord], None] | None = None,
) -> Report:
    """Load, run passes with verification, save atomically, and report what changed."""
    source, target = Path(input_path), Path(output_path)
    check_output_path(target, input_path=source, force=force)
    report = Report(subcommand=subcommand)
    model = load_model(source)
    check_model(model, source, strict=True)
    report.input_model = model_record(source, model)
    batches = None
    dataset = None
    if verify and not _runnable(model, session_config, report, source):
        verify = False
    if verify:
        dataset = load_data(
            data,
            model_input_specs(model),
            shapes=shapes,
            batch_size=batch_size,
            num_samples=samples or VERIFY_FEEDS,
            int_range=int_range,
        )
        batches = list(dataset)
    result, records = run_passes(
        model,
        passes,
        batches=batches,
        session_config=session_config,
        pass_timeout=pass_timeout,
        source=str(source),
        on_pass=on_pass,
    )
    report.passes = [r.to_dict() for r in records]
    for record in records:
        if record.status == "skipped":
            report.messages.append(f"pass '{record.name}' skipped: {record.reason}")
    if batches is not None and dataset is not None:
        final = verify_models(
            model,
            result,
            batches,
            tolerance=_loosest(passes),
            session_config=session_config,
            data_description=dataset.description,
        )
        report.verification = final.to_dict()
    names = tuple(r.name for r in records if r.status == "ok")
    save_model(
        result,
        target,
        input_path=source,
        force=force,
        external_data=external_data,
        provenance=Provenance.from_argv(passes=names),
    )
    report.output_model = model_record(target, result)
    return report.finish()


def _runnable(model: Any, config: SessionConfig | None, report: Report, source: Path) -> bool:
    """Whether ONNX Runtime can run the input.

    A model with custom-domain ops it has no kernels for is still transformed (its
    unknown ops kept as they are), unverified, and the report says so; any other
    model ONNX Runtime refuses is refused here too.
    """
    from optimodel.errors import OptimodelError
    from optimodel.runtime.sessions import create_session

    try:
        create_session(model, config, source=str(source))
    except OptimodelError:
        domains = custom_domains(model)
        if not domains:
            raise
        report.messages.append(
            f"numeric verification skipped: ONNX Runtime has no kernels for "
            f"{', '.join(sorted(domains))} ops (pass --custom-op-library to verify); "
            f"the ONNX checker still ran"
        )
        return False
    return True


def _loosest(passes: list[Pass]) -> str:
    from optimodel.verify import TOLERANCES

    order = list(TOLERANCES)
    return max((p.tolerance for p in passes), key=order.index, default="exact")


def summary_line(report: Report) -> dict[str, Any]:
    """Before/after figures a command prints in one line."""
    before, after = report.input_model or {}, report.output_model or {}
    return {
        "nodes": (before.get("nodes"), after.get("nodes")),
        "parameters": (before.get("parameters"), after.get("parameters")),
        "bytes": (before.get("bytes"), after.get("bytes")),
    }

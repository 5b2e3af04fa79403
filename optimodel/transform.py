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
    known_bytes,
    load_model_with_bytes,
    reusable_bytes,
    save_model,
)
from optimodel.passes import Pass
from optimodel.pipeline import PassRecord, StageOutputs, run_passes_with_bytes
from optimodel.report import Report, model_record
from optimodel.runtime.sessions import SessionConfig

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
    model, file_bytes = load_model_with_bytes(source, check=False)
    # the file's own bytes, else serialized once: the checks, then the first pass
    payload = file_bytes if file_bytes is not None else reusable_bytes(model)
    size = check_model(model, source, strict=True, serialized=payload)
    report.input_model = model_record(source, model, file_bytes)
    stage = None
    if verify:
        dataset = load_data(
            data,
            model_input_specs(model),
            shapes=shapes,
            batch_size=batch_size,
            num_samples=samples or VERIFY_FEEDS,
            int_range=int_range,
        )
        with known_bytes(model, payload):
            stage = _input_stage(model, StageOutputs(list(dataset), session_config), report, source)
    result, records, result_bytes = run_passes_with_bytes(
        model,
        passes,
        session_config=session_config,
        pass_timeout=pass_timeout,
        source=str(source),
        on_pass=on_pass,
        stage=stage,
        size=size,
        payload=payload,
    )
    report.passes = [r.to_dict() for r in records]
    for record in records:
        if record.status == "skipped":
            report.messages.append(f"pass '{record.name}' skipped: {record.reason}")
    if stage is not None:
        report.verification = {**stage.final(_loosest(passes)), "data": dataset.description}
    names = tuple(r.name for r in records if r.status == "ok")
    save_model(
        result,
        target,
        input_path=source,
        force=force,
        external_data=external_data,
        provenance=Provenance.from_argv(passes=names),
        payload=result_bytes,
    )
    report.output_model = model_record(target, result)
    return report.finish()


def _input_stage(
    model: Any, stage: StageOutputs, report: Report, source: Path
) -> StageOutputs | None:
    """Run the input once; its outputs are what every pass and the result are compared to.

    A model with custom-domain ops ONNX Runtime has no kernels for is still transformed
    (its unknown ops kept as they are), unverified, and the report says so; any other
    model ONNX Runtime refuses is refused here too.
    """
    from optimodel.errors import OptimodelError

    try:
        stage.set(*stage.run(model, str(source)))
    except OptimodelError:
        domains = custom_domains(model)
        if not domains:
            raise
        report.messages.append(
            f"numeric verification skipped: ONNX Runtime has no kernels for "
            f"{', '.join(sorted(domains))} ops (pass --custom-op-library to verify); "
            f"the ONNX checker still ran"
        )
        return None
    return stage


def _loosest(passes: list[Pass]) -> str:
    from optimodel.verify import TOLERANCES

    order = list(TOLERANCES)
    return max((p.tolerance for p in passes), key=order.index, default="exact")

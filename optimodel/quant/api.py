"""`optimodel quantize` as a function: quantize a model file, verify it, say what it cost.

The command line is a thin layer over `quantize()`. Beyond the generic transform it
verifies on the calibration data when no `--data` is given (random inputs are out of the
distribution the ranges were calibrated on), refuses to leave an unquantized model under
the output name when the pass could not run, and turns the pass's own findings (layers
left in float, a bigger file, a slower model) into warnings in the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optimodel.data import RANDOM
from optimodel.errors import GateFailed, OptimodelError, VerificationError
from optimodel.report import Report
from optimodel.runtime.sessions import SessionConfig

WARNING_PREFIX = "warning: "
ACCURACY_HINT = {
    "static": "nothing was written; try --calib-method entropy or percentile, more or more "
    "typical --calib-data, --exclude-node for the sensitive layers, or --mode dynamic "
    "(--no-verify writes it anyway)",
    "dynamic": "nothing was written; try --per-channel or --exclude-node for the sensitive "
    "layers (--no-verify writes it anyway)",
    "weight-only": "nothing was written; try --block-size 16, --bits 8 or --exclude-node "
    "(--no-verify writes it anyway)",
}
# Feeds of the calibration data the result is verified on when no --data is given.
CALIB_VERIFY_FEEDS = 16
# A quantized model this much slower than the input is flagged (timing noise is ~ +-3 %).
SLOWER_THAN = 1.05


def quantize(
    model: str | Path,
    output: str | Path,
    *,
    mode: str = "dynamic",
    force: bool = False,
    verify: bool = True,
    data: str | None = None,
    samples: int | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    int_range: tuple[int, int] = (0, 255),
    external_data: bool | None = None,
    bench: bool = False,
    threads: int = 1,
    runs: int = 50,
    **options: Any,
) -> Report:
    """Quantize `model` into `output` (options: those of the `quantize` pass) and report."""
    from optimodel.passes import get_pass
    from optimodel.transform import transform_file

    quantizer = get_pass("quantize", mode=mode, shapes=shapes, int_range=int_range, **options)
    calib = options.get("calib_data")
    notes = []
    if verify and data is None and options.get("accuracy_budget") is not None:
        data = str(options.get("eval_data"))
        samples = samples or CALIB_VERIFY_FEEDS
    if verify and data is None and calib and str(calib) != RANDOM:
        data = str(calib)
        samples = samples or CALIB_VERIFY_FEEDS
        notes.append(
            "verified on the calibration data (no --data given): random inputs would fall "
            "outside the calibrated ranges; pass --data for held-out inputs"
        )
    try:
        report = transform_file(
            model,
            output,
            [quantizer],
            subcommand="quantize",
            force=force,
            verify=verify,
            data=data,
            shapes=shapes,
            samples=samples,
            int_range=int_range,
            external_data=external_data,
        )
    except VerificationError as exc:
        raise VerificationError(exc.message, hint=ACCURACY_HINT[mode]) from exc
    record = report.passes[0]
    if record["status"] != "ok":
        _remove_output(Path(output))
        raise OptimodelError(
            f"{model}: quantization did not run ({record['reason']}); no model was written"
        )
    report.messages.extend(notes)
    stats = record.get("stats") or {}
    warnings = list(stats.get("warnings", []))
    before, after = report.input_model or {}, report.output_model or {}
    if after.get("bytes", 0) > before.get("bytes", 0):
        warnings.append(
            f"the quantized model is larger than the input ({before['bytes']:,} -> "
            f"{after['bytes']:,} bytes)"
        )
    if bench:
        warnings.extend(_bench(report, Path(model), Path(output), data, shapes, threads, runs))
    report.messages.extend(WARNING_PREFIX + w for w in warnings)
    budget = stats.get("accuracy_budget")
    if budget is not None:
        report.gates.append(
            {
                "name": "accuracy-budget",
                "metric": budget["metric"],
                "limit": budget["budget"],
                "measured": budget["drop"],
                "unit": budget["unit"],
                "passed": bool(budget["fits"]),
            }
        )
        if not budget["fits"]:  # --keep-best: the best candidate was written; still a failure
            report.status = "gate_failed"
            failure = GateFailed(
                f"{budget.get('message', 'accuracy budget not met')}; wrote the best candidate "
                f"to {output} (--keep-best)",
                hint="allow a larger --accuracy-budget or --max-trials",
            )
            failure.report = report  # type: ignore[attr-defined]
            raise failure
    return report


def _remove_output(path: Path) -> None:
    for leftover in (path, Path(f"{path}.data")):
        if leftover.is_file():
            leftover.unlink()


def _bench(
    report: Report,
    source: Path,
    target: Path,
    data: str | None,
    shapes: dict[str, tuple[int, ...]] | None,
    threads: int,
    runs: int,
) -> list[str]:
    """CPU latency of input and output on one feed; a warning if quantizing made it slower."""
    from optimodel.data import load_data, model_input_specs
    from optimodel.modelio import load_model
    from optimodel.runtime.bench import add_ratios, benchmark_model

    specs = model_input_specs(load_model(source))
    batch = next(iter(load_data(data, specs, shapes=shapes, num_samples=1)))
    config = SessionConfig(threads=threads)
    rows = [
        benchmark_model(path, config, batch.feed, runs=runs, warmup=max(3, runs // 10))
        for path in (source, target)
    ]
    report.latency = add_ratios(rows)
    ratio = report.latency[1].get("latency_ratio")
    if ratio is not None and ratio > SLOWER_THAN:
        return [
            f"the quantized model is slower than the input on this CPU at {threads} thread(s): "
            f"p50 {rows[0]['p50_ms']:.3f} -> {rows[1]['p50_ms']:.3f} ms ({ratio:.2f}x)"
        ]
    return []

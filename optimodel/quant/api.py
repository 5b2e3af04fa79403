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
from optimodel.errors import GateFailed, OptimodelError, UsageError, VerificationError
from optimodel.report import Report
from optimodel.speed_gate import (
    SLOWER_THAN,
    TimingConfig,
    apply_speed_gate,
    remove_output,
    speed_failure,
    timing_config,
)

WARNING_PREFIX = "warning: "
SPEED_HINT = (
    "try another --mode or --target, --exclude-op for slow layers, or --if-slower "
    "keep-float to write the float model"
)
ACCURACY_HINT = {
    "static": "nothing was written; try --accuracy-budget 2 --eval-data DATA (keeps the "
    "most sensitive layers out of int8 until the cosine is >= 0.98), --calib-method minmax "
    "or entropy, more or more typical --calib-data, or --mode dynamic (--no-verify writes "
    "it anyway)",
    "dynamic": "nothing was written; try --accuracy-budget 2 --eval-data DATA (keeps the "
    "most sensitive layers out of int8 until the cosine is >= 0.98), --per-channel or "
    "--exclude-node (--no-verify writes it anyway)",
    "weight-only": "nothing was written; try --block-size 16, --bits 8 or --exclude-node "
    "(--no-verify writes it anyway)",
}
# Feeds of the calibration data the result is verified on when no --data is given.
CALIB_VERIFY_FEEDS = 16
# What to do when the quantized model is slower than --max-latency-ratio allows.
IF_SLOWER = {"warn": "warn", "keep-float": "keep", "fail": "fail"}


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
    if_slower: str | None = None,
    max_latency_ratio: float = SLOWER_THAN,
    **options: Any,
) -> Report:
    """Quantize `model` into `output` (options: those of the `quantize` pass) and report.

    `if_slower` times input and output here (interleaved) and, when the output's latency
    ratio is above `max_latency_ratio`: `warn`s, writes the float input instead
    (`keep-float`), or removes the output and fails the gate (`fail`, exit 3).
    """
    from optimodel.passes import get_pass
    from optimodel.transform import transform_file

    if if_slower is not None and if_slower not in IF_SLOWER:
        raise UsageError(f"--if-slower {if_slower}: choose from {', '.join(IF_SLOWER)}")
    if not max_latency_ratio > 0:
        raise UsageError(f"--max-latency-ratio {max_latency_ratio}: must be above 0")

    timing = timing_config(str(options.get("target") or "cpu"), threads, strict=bool(if_slower))
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
        remove_output(Path(output))
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
    if bench or if_slower:
        from optimodel.data import load_data, model_input_specs
        from optimodel.modelio import load_model

        original = load_model(model)  # the timing feed; also what keep-float writes
        specs = model_input_specs(original)
        feed = next(iter(load_data(data, specs, shapes=shapes, num_samples=1))).feed
        said = _bench(report, Path(model), Path(output), feed, timing, runs)
        warnings.extend([] if if_slower else said)  # the speed gate says it, interleaved
        if if_slower:
            warnings.extend(
                apply_speed_gate(report, Path(model), Path(output), original, feed, timing,
                                 IF_SLOWER[if_slower], max_latency_ratio)
            )  # fmt: skip
    report.messages.extend(WARNING_PREFIX + w for w in warnings)
    if report.status == "gate_failed":
        raise speed_failure(report, max_latency_ratio, "quantized", SPEED_HINT)
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


def _bench(
    report: Report,
    source: Path,
    target: Path,
    feed: dict[str, Any],
    timing: TimingConfig,
    runs: int,
) -> list[str]:
    """Latency of input and output on one feed; a warning if quantizing made it slower."""
    from optimodel.runtime.bench import add_ratios, benchmark_model

    rows = [
        benchmark_model(path, timing.session, feed, runs=runs, warmup=max(3, runs // 10))
        for path in (source, target)
    ]
    report.latency = add_ratios(rows)
    said = [timing.note] if timing.note else []
    ratio = report.latency[1].get("latency_ratio")
    if ratio is not None and ratio > SLOWER_THAN:
        said.append(
            f"the quantized model is slower than the input on {timing.where}: "
            f"p50 {rows[0]['p50_ms']:.3f} -> {rows[1]['p50_ms']:.3f} ms ({ratio:.2f}x)"
        )
    return said

"""`optimize`: run a recipe, then measure before and after, into one report.

The recipe's passes go through the verifying pipeline (transform_file); then the
input and output models are benchmarked side by side in the same run and, when the
data has labels, evaluated for task accuracy with an optional `max_drop` gate.
Every stage (input, each pass, output) becomes a row of the report.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from optimodel.data import load_data, model_input_specs
from optimodel.errors import OptimodelError, UsageError
from optimodel.evaluate import MaxDrop, evaluate
from optimodel.modelio import load_model
from optimodel.pipeline import PassRecord
from optimodel.recipes import Recipe
from optimodel.report import Report
from optimodel.runtime.sessions import PROVIDERS, SessionConfig
from optimodel.speed_gate import SLOWER_THAN, TimingConfig, apply_speed_gate, timing_config
from optimodel.transform import transform_file

# --if-slower / bench.if_slower: what to do when the optimized model is not faster.
IF_SLOWER = {"warn": "warn", "keep-input": "keep", "fail": "fail"}


def stage_rows(report: Report) -> list[dict[str, Any]]:
    """One row per stage: input, every pass, output (nodes, bytes, verification)."""
    rows = []
    before = report.input_model or {}
    rows.append({"stage": "input", "nodes": before.get("nodes"), "bytes": before.get("bytes")})
    for rec in report.passes:
        ver = rec.get("verification") or {}
        outputs = ver.get("outputs") or []
        rows.append(
            {
                "stage": rec["name"],
                "status": rec["status"],
                "seconds": rec["seconds"],
                "nodes": rec["nodes_after"],
                "bytes": rec["bytes_after"],
                "cosine_vs_previous": min((o["cosine"] for o in outputs), default=None),
            }
        )
    after = report.output_model or {}
    final = report.verification or {}
    rows.append(
        {
            "stage": "output",
            "nodes": after.get("nodes"),
            "bytes": after.get("bytes"),
            "cosine_vs_input": min((o["cosine"] for o in final.get("outputs", [])), default=None),
        }
    )
    return rows


def optimize_file(
    model: str | Path,
    output: str | Path,
    recipe: Recipe,
    *,
    force: bool = False,
    verify: bool = True,
    data: str | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    int_range: tuple[int, int] = (0, 255),
    bench: bool | None = None,
    runs: int | None = None,
    threads: int | None = None,
    max_drop: MaxDrop | None = None,
    pass_timeout: float | None = None,
    on_pass: Callable[[PassRecord], None] | None = None,
    if_slower: str | None = None,
    max_latency_ratio: float | None = None,
) -> Report:
    """Run the recipe with verification, then bench and eval before/after.

    `if_slower` (or the recipe's `bench.if_slower`): warn, keep-input (write the input
    model unchanged) or fail when the output is not faster (`optimodel.speed_gate`).
    """
    data = data or recipe.verify.get("data") or recipe.eval.get("data")
    recipe.bind_data(data)
    policy = if_slower or recipe.bench.get("if_slower")
    if policy is not None and policy not in IF_SLOWER:
        raise UsageError(f"--if-slower {policy}: choose from {', '.join(IF_SLOWER)}")
    limit = float(max_latency_ratio or recipe.bench.get("max_latency_ratio") or SLOWER_THAN)
    if not limit > 0:
        raise UsageError(f"--max-latency-ratio {limit}: must be above 0")
    bench_threads = int(threads if threads is not None else recipe.bench.get("threads", 1))
    providers = [str(p) for p in recipe.bench.get("providers") or ["cpu"]]
    if providers[0] in PROVIDERS:
        timing = timing_config(providers[0], bench_threads, strict=policy is not None)
    else:  # a provider optimodel has no short name for: time it as the recipe says
        config = SessionConfig(providers=providers, threads=bench_threads)
        timing = TimingConfig(config, ", ".join(providers))
    report = transform_file(
        model,
        output,
        recipe.build(),
        subcommand="optimize",
        force=force,
        verify=verify,
        data=data,
        shapes=shapes,
        samples=recipe.verify.get("samples"),
        int_range=int_range,
        pass_timeout=pass_timeout,
        on_pass=on_pass,
    )
    report.recipe = recipe.to_dict()
    specs = model_input_specs(load_model(model, check=False))
    do_bench = bench if bench is not None else recipe.bench.get("enabled", True)
    feed = None
    if do_bench or policy:
        dataset = load_data(data, specs, shapes=shapes, int_range=int_range, num_samples=1)
        feed = next(iter(dataset)).feed
    if do_bench:
        report.latency = _bench_pair(model, output, recipe, feed, runs, timing.session)
        if timing.note:
            report.messages.append(timing.note)
    if policy:
        said = apply_speed_gate(report, Path(model), Path(output), load_model(model), feed,
                                timing, IF_SLOWER[policy], limit, what="optimized",
                                keep_name="keep-input")  # fmt: skip
        report.messages.extend(said)
        if report.status == "gate_failed":  # the output is gone: nothing to evaluate
            report.stages = stage_rows(report)
            return report.finish()
    if data and data != "random":
        dataset = load_data(data, specs, shapes=shapes, batch_size=32, int_range=int_range)
        if dataset.has_labels:
            gate = max_drop or _recipe_drop(recipe)
            result = evaluate(str(output), dataset, reference=str(model), max_drop=gate)
            report.accuracy = result.to_dict()
            if result.gate:
                report.gates.append(result.gate)
                if not result.gate["passed"]:
                    report.status = "gate_failed"
    report.stages = stage_rows(report)
    if len(report.latency) == 2 and not policy:  # the speed gate has said it already
        ratio = report.latency[1].get("latency_ratio")
        if ratio is not None and ratio > SLOWER_THAN:
            report.messages.append(
                f"the optimized model is SLOWER than the input here (p50 x{ratio:.2f} at "
                f"{report.latency[1].get('threads')} thread(s)); consider a recipe without it"
            )
    return report.finish()


def _recipe_drop(recipe: Recipe) -> MaxDrop | None:
    from optimodel.evaluate import parse_max_drop

    value = recipe.eval.get("max_drop")
    return parse_max_drop(str(value)) if value is not None else None


def _bench_pair(
    model: str | Path,
    output: str | Path,
    recipe: Recipe,
    feed: dict[str, Any],
    runs: int | None,
    config: SessionConfig,
) -> list[dict[str, Any]]:
    """Input and output timed in the same run, ratios relative to the input."""
    from optimodel.runtime.bench import add_ratios, benchmark_model

    count = int(runs or recipe.bench.get("runs", 50))
    warmup = int(recipe.bench.get("warmup", 5))
    rows = []
    for path in (model, output):
        try:
            rows.append(benchmark_model(path, config, feed, runs=count, warmup=warmup))
        except OptimodelError as exc:
            raise OptimodelError(f"{path}: benchmark failed: {exc.message}") from None
    return add_ratios(rows)
